"""On-policy distillation: TRL's GKD loss (the installed package and our PyTorch version of
it) and tinker-cookbook's on-policy reverse KL (advantages and the importance-sampling
loss, our PyTorch version)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from parity import onpolicy_reference as ref
from parity.checks.common import Ctx, Result, TOL, compare


def _inputs(seed=51, b=3, n=7, v=13):
    rng = np.random.default_rng(seed)
    s, t = rng.normal(size=(b, n, v)) * 2, rng.normal(size=(b, n, v)) * 3
    labels = np.where(rng.random((b, n)) < 0.7, rng.integers(0, v, (b, n)), -100)
    return s, t, labels


def check_gkd(ctx: Ctx) -> list[Result]:
    """``onpolicy.generalized_jsd_loss`` (value and student gradient) against TRL 1.16's own
    ``GKDTrainer.generalized_jsd_loss`` (when trl is installed) and against our PyTorch
    version of it, beta 0, 0.3, 0.5, 1 at T = 1 and 2; the reverse-KL advantages (with and
    without a discount) and the importance-sampling loss against our PyTorch version of
    tinker-cookbook's."""
    from kdjax import onpolicy

    s, t, labels = _inputs()
    out = []
    try:
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
        trl_loss = GKDTrainer.generalized_jsd_loss
    except ImportError:
        trl_loss = None
    tol = TOL[ctx.dtype]["grad"]
    for beta in (0.0, 0.3, 0.5, 1.0):
        for temperature in (1.0, 2.0):
            f = lambda x: onpolicy.generalized_jsd_loss(x, jnp.asarray(t, ctx.jdtype), jnp.asarray(labels), beta,
                                                        temperature)
            value, grad = jax.value_and_grad(f)(jnp.asarray(s, ctx.jdtype))
            refs = [("ours", lambda a, b_, y: ref.generalized_jsd(a, b_, y, beta, temperature))]
            if trl_loss is not None:
                refs.append(("TRL 1.16", lambda a, b_, y: trl_loss(a, b_, y, beta=beta, temperature=temperature)))
            for who, loss in refs:
                ts = ctx.t(s).requires_grad_()
                want = loss(ts, ctx.t(t), ctx.t(labels))
                want.backward()
                out.append(compare(f"GKD generalized JSD vs {who}, beta={beta:g}, T={temperature:g}", ctx,
                                   {"value": value, "grad": grad}, {"value": want.detach(), "grad": ts.grad}, tol))
    rng = np.random.default_rng(52)
    sampled, teacher, target = (rng.normal(size=(3, 9)) - 2 for _ in range(3))
    mask = rng.random((3, 9)) < 0.8
    for coef, discount in ((1.0, 0.0), (0.5, 0.9)):
        adv = onpolicy.reverse_kl_advantages(jnp.asarray(sampled, ctx.jdtype), jnp.asarray(teacher, ctx.jdtype),
                                             jnp.asarray(mask), coef, discount)
        f = lambda x: onpolicy.importance_sampling_loss(x, jnp.asarray(sampled, ctx.jdtype), adv)
        value, grad = jax.value_and_grad(f)(jnp.asarray(target, ctx.jdtype))
        want_adv = ref.reverse_kl_advantages(ctx.t(sampled), ctx.t(teacher), torch.from_numpy(mask), coef, discount)
        tt = ctx.t(target).requires_grad_()
        want = ref.importance_sampling(tt, ctx.t(sampled), want_adv)
        want.backward()
        out.append(compare(f"on-policy reverse KL (tinker-cookbook), coef={coef:g}, discount={discount:g}", ctx,
                           {"advantages": adv, "value": value, "grad": grad},
                           {"advantages": want_adv, "value": want.detach(), "grad": tt.grad}, tol))
    return out
