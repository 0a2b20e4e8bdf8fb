"""Every parity check, in both dtypes, as a pytest test (needs torch)."""

import pytest

pytest.importorskip("torch")

import numpy as np  # noqa: E402

from parity.checks import CHECKS, DTYPES, TOL, Ctx, compare, run_check  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CHECKS))
def test_parity(name, dtype):
    if name == "gpt2_hf":
        pytest.importorskip("transformers")  # in the parity extra, so CI runs it
    results = run_check(name, Ctx(dtype))
    assert results, "a check produced no rows"
    failed = [r for r in results if not r.passed and not r.skipped]
    assert not failed, "\n".join(
        f"{r.name} [{r.dtype}]: max abs {r.max_abs:.3e}, max rel {r.max_rel:.3e}, "
        f"atol {r.atol:g} rtol {r.rtol:g} {r.note}" for r in failed)
    skipped = [r for r in results if r.skipped]
    if skipped:  # a peer package that did not install: said, never counted as passed
        pytest.skip("; ".join(f"{r.name}: {r.note}" for r in skipped))


def test_float64_tolerance_admits_rounding_not_error():
    """float64 must allow a few ulp at any magnitude (CPU and CUDA libm differ there) and
    nothing that looks like an algorithmic difference."""
    tol, ctx = TOL["float64"]["loss"], Ctx("float64")

    def passes(got, want):
        return compare("x", ctx, {"v": np.float64(got)}, {"v": np.float64(want)}, tol).passed

    big = 4096.0 + 0.3  # a loss of logits +-1e3; one ulp here is 9.1e-13 > atol
    assert passes(big + 4 * np.spacing(big), big)
    assert not passes(big * (1 + 1e-12), big)
    assert passes(0.5 + 5e-13, 0.5)
    assert not passes(0.5 + 1e-11, 0.5)


def test_convolution_rows_pass_on_the_entry_points_xla_path(tmp_path):
    """``python -m parity`` runs with the entry points' XLA options (Eigen convolutions on
    CPU, kdjax.app.xla): the float32 ResNet rows pass there too, as users run them."""
    import json
    import os
    import subprocess
    import sys

    from kdjax.app import xla

    out = tmp_path / "p.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "KDJAX_XLA_DEFAULTS")}
    p = subprocess.run([sys.executable, "-m", "parity", "--only", "resnet_forward", "resnet_grads", "resnet_steps",
                        "--dtype", "float32", "--json", str(out)], capture_output=True, text=True, timeout=600,
                       env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert (xla.EIGEN_CONVOLUTIONS in r["XLA_FLAGS"]) == (xla._jaxlib_version() in xla.KNOWN_JAXLIB)
    assert r["results"] and all(row["passed"] for row in r["results"])
