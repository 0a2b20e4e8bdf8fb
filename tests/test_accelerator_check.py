"""The accelerator script's CPU dry run: every step runs at tiny shapes and writes its JSON
under the one folder given (timings not checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def test_accelerator_check_dry_run(tmp_path):
    out = tmp_path / "acc"
    # no tunix venv, as on the device: that row reports itself skipped (its ~10 s run in tunix's venv
    # is not the script's; test_tunix_row_skips_with_its_reason below checks the skip alone)
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, KDJAX_TUNIX_VENV=str(tmp_path / "no-tunix"))
    env.pop("DEVICE", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "accelerator_check.sh"), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = json.loads((out / "steps.json").read_text())
    assert set(steps) == {"versions", "parity", "bench-all"}
    assert all(s["exit"] == 0 for s in steps.values()), steps
    parity = json.loads((out / "parity.json").read_text())
    assert parity  # float32 and float64, matmul precision highest
    bench = json.loads((out / "bench_all.json").read_text())
    assert bench["tiny"] and bench["precision"]["option"] == "highest"
    assert set(bench["presets"]) == {"seed", "hinton", "cifar"}  # wide: hinton's rows at other shapes
    for name in ("features", "lm", "gpt2", "llama", "on_policy"):
        assert name in bench, name
    assert "tunix not installed" in bench["llama"]["results"]["tunix"]["skipped"]
    # the convolution presets report the NCHW torch row as the CPU reference
    assert bench["presets"]["cifar"]["torch_nchw"] and bench["features"]["torch_nchw"]


def test_accelerator_check_real_run_fits_eight_minutes():
    """The device run's per-step time limits sum to at most 8 minutes on one device (the
    dry run's bench-all, the multi-device scaling step and the optional demo not counted)."""
    import re

    text = (ROOT / "benchmarks" / "accelerator_check.sh").read_text()
    limits = {name: int(s) for name, s in re.findall(r"^\s*step ([\w-]+) (\d+) ", text, re.M)}
    device_run = {k: v for k, v in limits.items() if k not in ("bench-all", "scaling", "demo")}
    assert {"parity", "bench-mlp", "bench-image", "bench-lm", "bench-gpt2", "bench-llama",
            "bench-on_policy"} <= set(device_run)
    assert sum(device_run.values()) <= 480, device_run


def test_tunix_row_skips_with_its_reason(monkeypatch, tmp_path):
    """Without tunix's venv (CI) the llama preset's tunix row is reported skipped, with why."""
    from benchmarks.tunix_row import bench_tunix, tunix_python

    monkeypatch.setenv("KDJAX_TUNIX_VENV", str(tmp_path / "absent"))
    py, why = tunix_python()
    assert py is None and "tunix not installed" in why and "tunix_venv.sh" in why
    r = bench_tunix(None, None, [1.0, 1.0], temperature=2.0, alpha=0.5, repeats=1)
    assert r == {"skipped": why}
