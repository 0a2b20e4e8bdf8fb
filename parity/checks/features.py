"""Feature losses (``kdjax.features``) against our PyTorch versions of mdistiller's, value and
student gradient, NHWC on kdjax's side and NCHW on torch's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from kdjax import features
from parity import feature_reference as fref
from parity.checks.common import TOL, Ctx, Result, compare

# (name, kdjax loss, torch loss, student NHWC shape, teacher NHWC shape, flatten to [batch, -1]?)
CASES = [
    ("hint (FitNet MSE)", features.hint, fref.fitnet_hint, (6, 4, 4, 8), (6, 4, 4, 8), False),
    ("attention transfer, equal maps", features.attention_transfer, fref.at, (6, 8, 8, 4), (6, 8, 8, 16), False),
    ("attention transfer, student map larger (8 -> 4)", features.attention_transfer, fref.at, (6, 8, 8, 4),
     (6, 4, 4, 16), False),
    ("attention transfer, teacher map larger, uneven (6 -> 4)", features.attention_transfer, fref.at,
     (6, 4, 4, 4), (6, 6, 6, 16), False),
    ("similarity preserving (SP)", features.similarity_preserving, fref.sp, (6, 4, 4, 8), (6, 2, 2, 32), False),
    ("relational KD (RKD)", features.rkd, fref.rkd, (6, 12), (6, 20), True),
    ("probabilistic transfer (PKT)", features.pkt, fref.pkt, (6, 12), (6, 20), True),
]


def check_features(ctx: Ctx) -> list[Result]:
    out = []
    rng = np.random.default_rng(31)
    for name, ours, theirs, s_shape, t_shape, flat in CASES:
        s, t = rng.standard_normal(s_shape), rng.standard_normal(t_shape)
        js, jt = jnp.asarray(s, ctx.jdtype), jnp.asarray(t, ctx.jdtype)
        value, grad = jax.jit(jax.value_and_grad(ours))(js, jt)
        nchw = (lambda a: a) if flat else (lambda a: a.transpose(0, 3, 1, 2))
        ts = ctx.t(nchw(s)).requires_grad_()
        ref = theirs(ts, ctx.t(nchw(t)))
        ref.backward()
        want_grad = ts.grad.detach().cpu().numpy()
        want_grad = want_grad if flat else want_grad.transpose(0, 2, 3, 1)  # back to NHWC
        tol = TOL[ctx.dtype]["grad"]
        out.append(compare(f"feature loss: {name}", ctx, {"value": value, "grad": grad},
                           {"value": ref.detach().reshape(()), "grad": torch.from_numpy(want_grad)}, tol))
    return out
