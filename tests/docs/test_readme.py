"""The README's commands, run in the README's order at tiny sizes, so that they cannot drift.

Every command line of the README's ```bash blocks is either run (train, eval, demo, import-movielens,
serve, the curl calls against that server, bench), or, where it needs a GPU, parsed by the `grinfer`
command without running, or not run for a stated reason (`NOT_RUN`). The tiny-size rewrites are
listed in `Walkthrough.tiny`: a small MovieLens-format directory for `~/ml-1m`, a temporary `runs/`,
one epoch, mtgr-tiny for the larger presets, a free port, short benchmark runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import typer
from readme_util import README, bash_commands, write_movielens
from typer.testing import CliRunner

from grinfer.bench.served import wait_ready
from grinfer.cli import app
from grinfer.serving.background import free_port

SYNTHETIC = "synthetic:users=60,items=300,events=25,seed=0"
SMALLER_PRESET = {"mtgr-small": "mtgr-tiny", "mtgr-medium": "mtgr-tiny", "mtgr-large": "mtgr-tiny"}
ABLATION_BASE = ["--data", "~/ml-1m", "--task", "ranking", "--preset", "mtgr-tiny", "--out", "runs/ablation"]
SHORT_RUN = {"bench": ["--iters", "2", "--warmup", "1"], "bench --server": ["--requests", "16", "--duration", "5"]}
NOT_RUN = {
    "scripts/serve.sh": "the set-up plus `exec grinfer serve`, whose command is run here; a fresh set-up takes minutes",
    "scripts/test.sh": "the whole suite (this test is part of it); CI runs it through .ci/run",
    "TORCH_SPEC": "installs a CUDA build of torch: needs PyTorch's index over the network and a GPU",
    "scripts/triton_env.sh": "builds the Triton environment over PyPI; tests/triton builds it with this script",
    "~/triton-env/bin/tritonserver": "needs that environment; tests/triton starts it on an exported repository",
}
KEY = "readme-key"
READY_TIMEOUT_S = 240


class Walkthrough:
    """Runs README commands in order in a scratch directory; holds the server the curl calls talk to."""

    def __init__(self, tmp: Path):
        self.tmp, self.ml = tmp, write_movielens(tmp / "ml-1m")
        self.home = tmp / "home"
        self.port, self.grpc_port = free_port(), free_port()
        self.server: subprocess.Popen | None = None
        self.log = tmp / "serve.log"
        self.ran: list[str] = []

    def tiny(self, words: list[str]) -> list[str]:
        """The README's command at tiny sizes, on the scratch directory and the test server's port."""
        words = [w for word in words for w in (ABLATION_BASE if word == "..." else [word])]
        out = []
        for i, word in enumerate(words):
            before = words[i - 1] if i else ""
            if word == "~/ml-1m":
                word = str(self.ml)
            elif word.startswith("runs/"):
                word = str(self.tmp / word)
            elif before == "--data" and word == "synthetic":
                word = SYNTHETIC
            elif before == "--preset":
                word = SMALLER_PRESET.get(word, word)
            elif before == "--epochs":
                word = "1"
            out.append(word.replace("$KEY", KEY).replace("localhost:8000", f"127.0.0.1:{self.port}")
                       .replace("127.0.0.1:8000", f"127.0.0.1:{self.port}"))
        if out[:2] == ["grinfer", "train"] and "--epochs" not in out:
            out += ["--epochs", "1"]
        if out[:2] == ["grinfer", "serve"] and "--backend" not in out:
            # the default (auto) probes and compiles every backend at each start: minutes on 2 cores; its probe
            # is tested in tests/engine/test_probe.py and tests/serving/test_backend_admin.py
            out += ["--backend", "eager"]
        return out

    def run(self, words: list[str]) -> None:
        """Run (or parse, or skip for its reason) one README command."""
        name = words[0].split("=")[0] if "=" in words[0] else words[0]
        if name in NOT_RUN:
            if name.startswith("scripts/"):
                assert os.access(Path(README.parent, name), os.X_OK), f"{name} is not an executable script"
            return
        if name == "curl":
            return self.curl(self.tiny(words))
        assert name == "grinfer", f"README command {' '.join(words)!r}: neither run nor listed in NOT_RUN"
        sub = words[1]
        if "cuda" in words:  # a GPU command: the CLI must accept it; it is not run here
            command = typer.main.get_command(app)
            command.commands[sub].make_context(sub, words[2:])
            return
        args = self.tiny(words)
        self.ran.append(sub)
        if sub == "serve":
            return self.start_server(args)
        args += SHORT_RUN.get("bench --server" if "--server" in args else sub, []) if sub == "bench" else []
        result = CliRunner().invoke(app, args[1:])
        assert result.exit_code == 0, f"{' '.join(args)} exited {result.exit_code}:\n{result.output}"
        for flag, kind in (("--out", "checkpoint"), ("--json", "file")):
            if flag in args:
                written = Path(args[args.index(flag) + 1])
                assert written.exists(), f"{' '.join(args)}: wrote no {kind} at {written}"

    def start_server(self, args: list[str]) -> None:
        assert self.server is None, "the README starts a second server before stopping the first"
        argv = [sys.executable, "-m", "grinfer.cli", *args[1:], "--port", str(self.port),
                "--grpc-port", str(self.grpc_port)]
        if "--device" not in argv:
            argv += ["--device", "cpu"]
        env = {**os.environ, "GRINFER_HOME": str(self.home)}
        self.server = subprocess.Popen(argv, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        wait_ready(self.server, f"http://127.0.0.1:{self.port}", READY_TIMEOUT_S,
                   lambda: f"{' '.join(args)}:\n{self.log.read_text()}", poll_s=0.5)

    def curl(self, words: list[str]) -> None:
        """A README curl call, made with httpx: -d is the (POST) body, -H a header, the URL the target."""
        assert self.server is not None, f"{' '.join(words)}: the README calls the server before starting one"
        body, headers, url = None, {}, None
        it = iter(words[1:])
        for word in it:
            if word == "-d":
                body = next(it)
            elif word == "-H":
                name, _, value = next(it).partition(":")
                headers[name.strip()] = value.strip()
            elif not word.startswith("-"):
                url = word if word.startswith("http") else f"http://{word}"
        response = httpx.request("POST" if body is not None else "GET", url, content=body, headers=headers, timeout=60)
        assert response.status_code == 200, f"{' '.join(words)}: {response.status_code} {response.text}"
        assert isinstance(response.json(), dict)
        self.ran.append("curl")

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.wait(timeout=30)


def test_readme_commands_run(tmp_path, monkeypatch):
    monkeypatch.setenv("GRINFER_HOME", str(tmp_path / "home"))
    walk = Walkthrough(tmp_path)
    try:
        for words in bash_commands(README.read_text()):
            walk.run(words)
    finally:
        walk.stop()
    # the walkthrough has substance: a README that lost these commands would pass an empty check
    assert {"train", "eval", "demo", "import-movielens", "serve", "curl", "bench"} <= set(walk.ran)
    metrics = json.loads(Path(tmp_path / "runs/both/eval.json").read_text())
    assert {"retrieval", "ranking"} <= set(metrics)


def test_tiny_rewrites_keep_the_command_and_shrink_it(tmp_path):
    walk = Walkthrough(tmp_path)
    assert walk.tiny(["grinfer", "train", "--data", "~/ml-1m", "--preset", "mtgr-small", "--out", "runs/both"]) == [
        "grinfer", "train", "--data", str(walk.ml), "--preset", "mtgr-tiny", "--out", str(tmp_path / "runs/both"),
        "--epochs", "1"]
    assert walk.tiny(["curl", "-s", "localhost:8000/v1/users/42", "-H", "X-API-Key: $KEY"]) == [
        "curl", "-s", f"127.0.0.1:{walk.port}/v1/users/42", "-H", f"X-API-Key: {KEY}"]


def test_a_command_the_walkthrough_does_not_know_fails_it(tmp_path):
    with pytest.raises(AssertionError, match="neither run nor listed"):
        Walkthrough(tmp_path).run(["wget", "http://example.com"])


def test_a_gpu_command_with_a_flag_the_cli_lacks_fails_parsing(tmp_path):
    with pytest.raises(Exception, match="No such option: --no-such-flag"):
        Walkthrough(tmp_path).run(["grinfer", "bench", "--device", "cuda", "--no-such-flag"])
