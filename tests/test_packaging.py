"""What an install puts on a machine: one `patchwork` package and its command,
every version from the committed locks."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import distributions, version
from pathlib import Path

import pytest

from tests.conftest import REPO

LOCKS = {name: REPO / "locks" / f"{name}.txt" for name in ("serve", "test", "bench")}
# What the source tree holds besides the package's own files.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                                    "checkpoints", "teachers", "results")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> dict[str, str]:
    """package -> version of a lock file (``name==version`` lines)."""
    found = {}
    for line in lock.read_text().splitlines():
        if match := re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip()):
            found[canonical(match[1])] = match[2]
    return found


def requirement_names(requirements: list[str]) -> set[str]:
    return {canonical(re.match(r"[A-Za-z0-9._-]+", requirement)[0]) for requirement in requirements}


@pytest.mark.timeout(600)
def test_a_wheel_installs_one_package_whose_command_runs_anywhere(tmp_path):
    source, wheels, venv = tmp_path / "source", tmp_path / "wheels", tmp_path / "venv"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    before = set(p.name for p in site.iterdir())
    (wheel,) = wheels.glob("patchwork-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    added = sorted(p.name for p in site.iterdir() if p.name not in before)
    assert added == ["patchwork", f"patchwork-{version('patchwork')}.dist-info"]
    # The dependencies come from the test environment, after the venv's own site-packages.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in ([], ["serve"], ["client"], ["train"]):
        run = subprocess.run([str(venv / "bin" / "patchwork"), *command, "--help"], cwd=elsewhere,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, (command, run.stderr)
        assert run.stdout.startswith(f"usage: {' '.join(['patchwork', *command])} "), run.stdout
    where = subprocess.run([str(python), "-c", "import patchwork.engines.loading, patchwork.v1.bytelm_pb2 as m; "
                            "print(m.__file__)"], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(site / "patchwork")


def test_the_locks_pin_every_dependency_once():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    serve, test, bench = (pins(LOCKS[name]) for name in ("serve", "test", "bench"))
    assert requirement_names(project["dependencies"]) <= set(serve)
    for extra, lock in (("test", test), ("bench", bench)):
        assert requirement_names(project["optional-dependencies"][extra]) <= set(lock)
        assert {name: lock[name] for name in serve} == serve  # one version of each package in every set
    assert {name: test[name] for name in bench} == bench
    # torch carries no local label: the CPU build where one lies on disk, PyPI's build elsewhere
    assert "+" not in serve["torch"]


def test_the_environment_running_the_tests_is_the_lock():
    """``make test`` installs locks/test.txt; every package in it has its locked version."""
    installed = {canonical(d.metadata["Name"]): d.version for d in distributions()}
    wrong = {name: (pinned, installed.get(name)) for name, pinned in pins(LOCKS["test"]).items()
             if installed.get(name, "").split("+")[0] != pinned}
    assert wrong == {}
