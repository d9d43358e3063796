"""scripts/setup.sh, as the README describes it: the serving set-up leaves the test extras out, each
set-up runs once (a stamp keyed on pyproject.toml), `--test` adds the extras, a failed set-up leaves no
stamp, a warm call returns without touching pip, and without torch in the venv the CPU wheel is taken
from the local wheel folder.

It runs the real script with real pip on a scratch project whose venv sees this venv's packages
through a .pth file (torch, pip and setuptools included), so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from readme_util import ROOT

PROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "setup-probe"
version = "0"
dependencies = ["numpy"]

[project.optional-dependencies]
test = ["setup-probe-extra @ {extra}"]

[tool.setuptools]
packages = []
"""
EXTRA = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "setup-probe-extra"
version = "0"

[tool.setuptools]
py-modules = ["setup_probe_extra"]
"""


def make_project(tmp_path: Path, pyproject: str, borrowed: Path) -> Path:
    """A project with scripts/setup.sh and a venv that sees the packages in `borrowed` through a .pth file."""
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/setup.sh", root / "scripts/setup.sh")
    (root / "pyproject.toml").write_text(pyproject)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root / ".venv"], check=True)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([root / ".venv/bin/python", "-c", where], check=True, capture_output=True, text=True)
    (Path(site.stdout.strip()) / "borrowed.pth").write_text(f"{borrowed}\n")
    return root


def local_project(tmp_path: Path, name: str, pyproject: str, module: str) -> Path:
    """A one-module project directory."""
    path = tmp_path / name
    path.mkdir()
    (path / "pyproject.toml").write_text(pyproject)
    (path / f"{module}.py").write_text(f"__version__ = {name!r}\n")
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The scratch project on a venv that borrows all of this venv's packages (torch among them)."""
    extra = local_project(tmp_path, "extra", EXTRA, "setup_probe_extra")
    return make_project(tmp_path, PROJECT.format(extra=extra.as_uri()), Path(sysconfig.get_paths()["purelib"]))


def setup(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the project's scripts/setup.sh with pip offline (no index, no build isolation, no machine config)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "PIP_NO_BUILD_ISOLATION": "0", "PIP_NO_INDEX": "1",
           "PIP_CONFIG_FILE": os.devnull, **(env or {})}
    return subprocess.run(["bash", "scripts/setup.sh", *args], cwd=root, env=env, capture_output=True, text=True)


def has_extra(root: Path) -> bool:
    probe = subprocess.run([root / ".venv/bin/python", "-c", "import setup_probe_extra"], capture_output=True)
    return probe.returncode == 0


def break_pip(root: Path) -> None:
    """Take the borrowed packages (pip among them) away: any further install attempt fails."""
    next((root / ".venv/lib").glob("python*/site-packages/borrowed.pth")).unlink()


def test_serving_set_up_installs_once_and_leaves_the_test_extras_out(project: Path):
    first = setup(project)
    assert first.returncode == 0, first.stderr
    assert "Editable installation" not in first.stderr  # setuptools' boxed note is quieted
    assert (project / ".venv/.grinfer-setup-serve").is_file()
    assert not (project / ".venv/.grinfer-setup-test").exists()
    assert not has_extra(project)

    break_pip(project)
    start = time.monotonic()
    warm = setup(project)
    assert warm.returncode == 0, warm.stderr  # the stamp matched: pip was not run
    assert time.monotonic() - start < 1.0


def test_test_set_up_adds_the_extras_and_covers_serving(project: Path):
    assert setup(project).returncode == 0
    result = setup(project, "--test")
    assert result.returncode == 0, result.stderr
    assert has_extra(project)
    break_pip(project)
    assert setup(project, "--test").returncode == 0
    assert setup(project).returncode == 0


def test_a_changed_pyproject_reinstalls_and_a_failed_set_up_leaves_no_stamp(project: Path):
    assert setup(project).returncode == 0
    break_pip(project)
    with (project / "pyproject.toml").open("a") as f:
        f.write("# a new dependency would go here\n")
    assert setup(project).returncode != 0  # it tried to install again (and could not)
    assert setup(project, "--test").returncode != 0
    assert not (project / ".venv/.grinfer-setup-test").exists()


def test_unknown_argument_is_a_usage_error(project: Path):
    result = setup(project, "--bogus")
    assert result.returncode == 2 and "usage: scripts/setup.sh [--test]" in result.stderr


STANDIN_TORCH = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "torch"
version = "2.13.0+cpu"

[tool.setuptools]
py-modules = ["torch"]
"""


def test_without_torch_the_cpu_wheel_comes_from_the_local_wheel_folder(tmp_path: Path):
    # a venv that has pip and setuptools but no torch, and a wheel folder with a (stand-in) CPU torch wheel:
    # the script must pick `torch==2.13.0+cpu` from the folder, which no index holds here (PIP_NO_INDEX)
    here = Path(sysconfig.get_paths()["purelib"])
    tools = tmp_path / "tools"
    tools.mkdir()
    for pattern in ("pip", "pip-*.dist-info", "setuptools", "setuptools-*.dist-info", "_distutils_hack"):
        for path in here.glob(pattern):
            (tools / path.name).symlink_to(path)
    wheels = tmp_path / "wheels"
    source = local_project(tmp_path, "2.13.0+cpu", STANDIN_TORCH, "torch")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels,
                    source], check=True, capture_output=True)
    root = make_project(tmp_path, PROJECT.replace('dependencies = ["numpy"]', "dependencies = []")
                        .replace('test = ["setup-probe-extra @ {extra}"]', "test = []"), tools)
    result = setup(root, env={"TORCH_WHEELS": str(wheels)})
    assert result.returncode == 0, result.stderr
    which = "import torch; print(torch.__version__, torch.__file__)"
    version = subprocess.run([root / ".venv/bin/python", "-c", which], capture_output=True, text=True)
    number, file = version.stdout.split()
    assert number == "2.13.0+cpu" and file.endswith("site-packages/torch.py"), version.stderr  # the stand-in
