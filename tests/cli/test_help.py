"""Help text is plain (bracketed text survives, no `--help <bool>`) and lists every server and engine
setting with its environment variable."""

import pytest
from typer.testing import CliRunner

from grinfer.cli import app
from grinfer.config import ENGINE_SETTINGS, SERVER_SETTINGS

runner = CliRunner()


def help_text(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def test_serve_help_keeps_brackets_and_lists_every_setting_with_its_variable():
    text = help_text("serve")
    assert "[server] table" in text and "[engine] table" in text and "[GRINFER_DEVICE, default auto]" in text
    flat = " ".join(text.split())  # a flag's help may wrap anywhere
    assert "[GRINFER_BACKEND, default auto]" in flat and "[GRINFER_KV_CACHE_MB, default 256]" in flat
    for flag in ("--kv-cache-mb", "--kv-host-mb", "--kv-disk-mb", "--pipeline-depth", "--max-batch-tokens",
                 "--max-queue", "--dense", "--kv-dtype", "--backend"):
        assert f"{flag} <" in text, flag
    for name in (*SERVER_SETTINGS, *ENGINE_SETTINGS):  # GRINFER_HOME, GRINFER_MAX_QUEUE, GRINFER_KV_CACHE_MB, ...
        assert f"GRINFER_{name.upper()}=" in text, name


@pytest.mark.parametrize("command", [(), ("train",), ("eval",), ("bench",), ("serve",), ("import-movielens",),
                                     ("demo",)])
def test_help_has_no_type_oddities(command):
    text = help_text(*command)
    assert "<bool>" not in text and "list[" not in text and "╭" not in text
    assert "--help" in text and "Show this message and exit." in text
