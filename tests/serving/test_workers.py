"""`grinfer serve --workers N`: front-end processes on one port feeding the one engine process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
from test_startup import wait_for

from grinfer.serving.background import free_port

API_KEY = "k"


def test_workers_share_the_port_the_engine_and_what_users_did(served_checkpoint, tmp_path):
    port = free_port()
    env = {**os.environ, "GRINFER_HOME": str(tmp_path / "home")}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "grinfer.cli", "serve",
                             "--backend", "eager", "--model", str(served_checkpoint),
                             "--workers", "2", "--port", str(port), "--grpc-port", "0", "--store",
                             f"sqlite:///{tmp_path / 's.db'}", "--api-key", API_KEY], stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, timeout=120)
        items = [{"item": i} for i in (1, 5, 9, 13, 17)]

        def rank() -> httpx.Response:  # a new connection each time: the kernel picks the process
            r = httpx.post(f"{url}/v1/rank", json={"user": "3", "candidates": items}, timeout=30)
            assert r.status_code == 200, r.text
            return r

        seen: set[str] = set()
        sent = 0

        def both_workers_answered() -> bool:
            nonlocal sent
            seen.add(rank().headers["x-grinfer-process"])
            sent += 1
            return {"worker-0", "worker-1"} <= seen

        wait_for(both_workers_answered, timeout=120)
        # once both workers listen, the engine process leaves the port (its HTTP work would share the GIL
        # with the engine thread): from then on every new connection reaches a worker
        wait_for(lambda: b"the engine process left it" in (tmp_path / "server.log").read_bytes(), timeout=60)
        before = rank().json()["items"]
        sent += 1
        # an hour old: the candidates' time-gap bucket (request time - last event) is then the same for every
        # rank below however many seconds they take on a loaded machine (a just-now event's gap grows 0, 1, 2 s)
        event = {"item": 21, "action": 5, "ts": int(time.time()) - 3600}
        r = httpx.post(f"{url}/v1/events", json={"user": "3", "events": [event]},
                       headers={"X-API-Key": API_KEY}, timeout=30)
        assert r.status_code == 200
        after = [rank() for _ in range(12)]
        sent += len(after)
        assert {r.headers["x-grinfer-process"] for r in after} <= {"worker-0", "worker-1"}
        scores = {tuple(round(i["score"], 6) for i in r.json()["items"]) for r in after}
        assert len(scores) == 1  # every process saw the new event (no stale per-process user cache) ...
        assert scores != {tuple(round(i["score"], 6) for i in before)}  # ... and it moved the scores
        assert after[0].json()["cache"] == "partial" and all(r.json()["cache"] == "hit" for r in after[1:])
        text = httpx.get(f"{url}/metrics", timeout=10).text
        counted = sum(float(v) for v in re.findall(r'grinfer_request_seconds_count\{[^}]*endpoint="/v1/rank"[^}]*\} '
                                                   r'(\S+)', text))
        assert counted == sent  # one scrape adds up every process's requests
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        finally:
            proc.kill()
            log.close()
    # uvicorn re-raises the SIGTERM it handled once it has drained, so the exit is the signal's
    assert code in (0, -signal.SIGTERM), (tmp_path / "server.log").read_text()[-3000:]
    pids = re.search(r"2 front-end workers started \(pids (\d+), (\d+)\)", (tmp_path / "server.log").read_text())
    assert pids is not None
    for pid in map(int, pids.groups()):  # the workers went with the server
        assert not _alive(pid), pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
