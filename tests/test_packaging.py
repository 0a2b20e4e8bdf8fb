"""The built wheel holds every module of the package (a `pip install .` that imports)."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_contains_every_module(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info where it builds
    shutil.copytree(ROOT / "kdjax", src / "kdjax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("kdjax-*.whl")
    in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    in_tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "kdjax").rglob("*.py")}
    assert in_tree <= in_wheel, f"missing from the wheel: {sorted(in_tree - in_wheel)}"
    assert not {n for n in in_wheel if n.startswith(("parity/", "benchmarks/", "tests/"))}
