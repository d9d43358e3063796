"""Where a running server's Python time goes: py-spy sampling of its processes during a load level.

`StackRecorder(pid, seconds, path)` starts `py-spy record` on the server and its children (the front-end
workers) in the background, writing collapsed stacks (one line per distinct stack: frames separated by
`;`, then the sample count); `summarize(path)` turns them into the functions with the most self and
inclusive samples, per process. py-spy is optional (not a dependency): without it the recorder says so
and records nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path


class StackRecorder:
    """py-spy on `pid` (and its subprocesses) for `seconds`, without pausing the process (`--nonblocking`)."""

    def __init__(self, pid: int, seconds: float, path: Path, rate: int = 200):
        self.path, self.proc, self.unavailable = path, None, None
        exe = shutil.which("py-spy")
        if exe is None:
            self.unavailable = "py-spy is not installed"
            return
        cmd = [exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--format", "raw",
               "--rate", str(rate), "--duration", str(max(1, round(seconds))), "--output", str(path)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finish(self, timeout_s: float = 30.0) -> str | None:
        """Wait for py-spy to write its file; the reason when nothing was recorded."""
        if self.proc is None:
            return self.unavailable
        try:
            _, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return "py-spy did not finish"
        if self.proc.returncode != 0 or not self.path.exists():
            return f"py-spy exited with {self.proc.returncode}: {err.strip()[-300:]}"
        return None


def _process_of(frames: list[str]) -> tuple[str, list[str]]:
    """py-spy's raw stacks with --subprocesses start with a 'process PID:"command"' frame per generation
    (the server, then a worker it spawned), then the thread: the innermost process and its frames."""
    starts = [i for i, f in enumerate(frames) if f.startswith("process ")]
    if not starts:
        return "process", frames
    head = frames[starts[-1]]
    role = "worker" if "multiprocessing" in head else "server"
    return f"{head.split(':', 1)[0]} ({role})", frames[starts[-1] + 1:]


def _function(frame: str) -> str:
    """'name (path/file.py:LINE)' -> 'name (path/file.py)': samples add up per function, not per line."""
    head, sep, tail = frame.rpartition(":")
    return f"{head})" if sep and tail.rstrip(")").isdigit() else frame


def summarize(path: Path, top: int = 20) -> str:
    """A text table per process and thread: total samples, then the functions with the most self samples
    (the innermost frame) and the most inclusive samples (anywhere on the stack)."""
    by_process: dict[str, Counter] = defaultdict(Counter)
    inclusive: dict[str, Counter] = defaultdict(Counter)
    threads: dict[str, Counter] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        process, frames = _process_of(stack.split(";"))
        frames = [_function(f) for f in frames]
        n = int(count)
        if not frames:  # a sample of the process with no Python stack (in native code)
            frames = ["(native)"]
        threads[process][frames[0]] += n
        frames = frames[1:] or frames
        by_process[process][frames[-1]] += n
        for frame in set(frames):
            inclusive[process][frame] += n
    out = []
    for process, selfs in sorted(by_process.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(selfs.values())
        out.append(f"== {process}: {total} samples; threads: "
                   + ", ".join(f"{t} {c / total:.0%}" for t, c in threads[process].most_common(6)))
        out.append(f"  {'self %':>7}  function")
        out += [f"  {c / total:>7.1%}  {frame}" for frame, c in selfs.most_common(top)]
        out.append(f"  {'incl %':>7}  function")
        out += [f"  {c / total:>7.1%}  {frame}" for frame, c in inclusive[process].most_common(top)]
    return "\n".join(out) if out else "no samples"
