"""What every check shares: tolerances, the ``Result`` row, the ``Ctx`` of a run, ``compare``."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch



DTYPES = ("float64", "float32")
# float64 rtol: losses of logits +-1e3 are ~4e3, where one ulp is 9e-13; CPU and CUDA
# libm round exp/log differently (4 ulp seen on an H200), so atol alone is below rounding.
F64 = (1e-12, 1e-14)
TOL = {  # (atol, rtol) per kind of quantity
    "float64": {"logits": F64, "loss": F64, "grad": F64, "adam": F64, "run": F64},
    "float32": {"logits": (1e-6, 1e-5), "loss": (1e-6, 1e-5), "grad": (1e-5, 1e-4),
                "adam": (1e-7, 2.4e-7)},  # + 2 ulp: BatchNorm scales sit at 1, one ulp is 1.2e-7
}
# float32 runs of 100 Adam steps drift chaotically: Adam divides by sqrt(v) + eps, so a
# rounding difference in a tiny gradient is amplified by up to lr/eps. We compare the
# per-step loss curves: tightly over the first steps (before the amplification has
# had time to act), loosely over the whole run (measured drift here: <= 6e-3 on losses
# of about 1.6 after 100 teacher steps).
RUN_EARLY_STEPS_F32 = 10
RUN_LOSS_TOL_F32 = (2e-2, 1e-2)
STEPS, BATCH, N, D, C = 100, 64, 500, 50, 5
T_GRID, ALPHA_GRID = (0.5, 1.0, 3.0, 4.0, 20.0), (0.0, 0.3, 0.7, 1.0)


@dataclasses.dataclass
class Result:
    name: str
    dtype: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool
    note: str = ""
    skipped: bool = False  # a peer package that cannot be imported: never counted as passed


@dataclasses.dataclass(frozen=True)
class Ctx:
    """Where and in which precision a check runs."""

    dtype: str
    torch_device: str = "cpu"

    @property
    def jdtype(self):
        return jnp.float64 if self.dtype == "float64" else jnp.float32

    @property
    def tdtype(self):
        return torch.float64 if self.dtype == "float64" else torch.float32

    def t(self, a):
        """NumPy -> torch tensor on the reference device (floats in this dtype)."""
        a = np.asarray(a)
        tensor = torch.from_numpy(a.copy())
        if np.issubdtype(a.dtype, np.floating):
            tensor = tensor.to(self.tdtype)
        elif np.issubdtype(a.dtype, np.integer):
            tensor = tensor.long()
        return tensor.to(self.torch_device)


def _flat(tree) -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            for kk, vv in _flat(v).items():
                out[f"{k}.{kk}" if kk else k] = vv
        return out
    if isinstance(tree, torch.Tensor):
        tree = tree.detach().cpu().numpy()
    return {"": np.asarray(tree, dtype=np.float64)}


def compare(name: str, ctx: Ctx, got, want, tol, note: str = "") -> Result:
    """Compare two trees (same keys) elementwise: |got - want| <= atol + rtol * |want|."""
    atol, rtol = tol
    g, w = _flat(got), _flat(want)
    if g.keys() != w.keys():
        return Result(name, ctx.dtype, float("inf"), float("inf"), atol, rtol, False,
                      f"keys differ: {sorted(g.keys() ^ w.keys())}")
    max_abs = max_rel = 0.0
    passed = True
    for k in g:
        a, b = g[k], w[k]
        if a.shape != b.shape:
            return Result(name, ctx.dtype, float("inf"), float("inf"), atol, rtol, False,
                          f"{k}: shape {a.shape} vs {b.shape}")
        err = np.abs(a - b)
        if not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
            passed = False
        max_abs = max(max_abs, float(err.max(initial=0.0)))
        max_rel = max(max_rel, float((err / np.maximum(np.abs(b), 1e-300)).max(initial=0.0)))
        passed &= bool(np.all(err <= atol + rtol * np.abs(b)))
    return Result(name, ctx.dtype, max_abs, max_rel, atol, rtol, bool(passed), note)


@contextlib.contextmanager
def precision(ctx: Ctx):
    """x64 for float64 checks; full-precision float32 matmuls everywhere."""
    with jax.enable_x64(ctx.dtype == "float64"), jax.default_matmul_precision("highest"):
        yield
