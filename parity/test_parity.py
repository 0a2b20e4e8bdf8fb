"""Every parity check, in both dtypes, as a pytest test (needs torch)."""

import pytest

pytest.importorskip("torch")

from parity.checks import CHECKS, DTYPES, Ctx, run_check  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CHECKS))
def test_parity(name, dtype):
    results = run_check(name, Ctx(dtype))
    assert results, "a check produced no rows"
    failed = [r for r in results if not r.passed]
    assert not failed, "\n".join(
        f"{r.name} [{r.dtype}]: max abs {r.max_abs:.3e}, max rel {r.max_rel:.3e}, "
        f"atol {r.atol:g} rtol {r.rtol:g} {r.note}" for r in failed)
