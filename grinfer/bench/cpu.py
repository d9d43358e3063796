"""CPU time of processes (Linux /proc): what a request costs a server or the load generator, which on a
shared, busy machine says more than wall-clock latency does."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process `pid` and its live descendants (e.g. tritonserver's backend
    stubs); ValueError if there is no such process."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):  # the process ended meanwhile
            continue
        child = int(stat.parent.name)
        parents[child], cpu[child] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
    if pid not in cpu:
        raise ValueError(f"no process {pid}")
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(cpu[p] for p in tree)


def own_cpu_s() -> float:
    """User + system CPU seconds this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
