"""The benchmark command runs and writes JSON of the documented shape (timings not checked)."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def test_benchmarks_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks", "--preset", "seed", "--steps", "3", "--repeats", "1",
           "--impl", "torch_eager", "kdjax_step", "kdjax_fused", "kdjax_sweep", "--precision",
           "tensorfloat32", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    for key in ("device", "backend", "versions", "peak_gflops", "presets"):
        assert key in data
    # both sides were set to the same precision, and the JSON says which
    assert data["precision"] == {"option": "tensorfloat32", "jax": "tensorfloat32", "torch": "high"}
    seed = data["presets"]["seed"]
    for impl in ("torch_eager", "kdjax_step", "kdjax_fused", "kdjax_sweep"):
        r = seed["results"][impl]
        assert r["us_per_step"]["min"] <= r["us_per_step"]["median"] <= r["us_per_step"]["max"]
        assert r["gflops"] > 0 and 0 < r["frac_peak"]
    assert set(seed["speedup_vs_torch_eager"]) == {"kdjax_step", "kdjax_fused", "kdjax_sweep"}


def test_benchmarks_bad_impl():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--impl", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--impl expected" in proc.stderr
