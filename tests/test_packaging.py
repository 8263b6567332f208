"""The wheel installs `relay` (all of it) and `relay_bench`, and no generic top-level name like `bench`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 120


def test_wheel_installs_no_top_level_bench(tmp_path: Path) -> None:
    # Built from a copy: setuptools reuses a build/ folder, and the checkout stays clean.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "results", "*.egg-info")
    for folder in ("relay", "bench"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip_wheel, str(source), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT_S,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"relay", "relay_bench"}, top_level
    assert "relay/lua/send.lua" in names and "relay_bench/cli.py" in names
    # Every module of the package is in the wheel (a subpackage missing from
    # pyproject.toml's list would install a relay that cannot import it).
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "relay").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))
