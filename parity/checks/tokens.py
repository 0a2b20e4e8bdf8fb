"""Token-level losses: every divergence, the convention table, the fused vocabulary loss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from kdjax import losses
from kdjax import fused as fused_loss
from parity import conventions
from parity import reference as ref
from parity.checks.common import (Ctx, Result, compare, F64, TOL)


# ----------------------------------------------------------------------------- token-level losses

TOK_B, TOK_L, TOK_V = 4, 6, 11


def token_inputs(kind: str, seed: int = 21):
    """Masked 3-D logits ``[4, 6, 11]``: "normal" (scale 3), "+-1e3", or "underflow" (the
    teacher's class 0 at -1e4: its probability is exactly 0). Labels are -100 where masked."""
    rng = np.random.default_rng(seed)
    s, t = rng.standard_normal((TOK_B, TOK_L, TOK_V)) * 3, rng.standard_normal((TOK_B, TOK_L, TOK_V)) * 3
    if kind == "+-1e3":
        s, t = np.sign(s) * 1e3, np.sign(t) * 1e3
    elif kind == "underflow":
        t[..., 0] = -1e4
    mask = rng.random((TOK_B, TOK_L)) < 0.7
    mask[0, 0] = True
    y = np.where(mask, rng.integers(0, TOK_V, (TOK_B, TOK_L)), -100)
    return s, t, y, mask


DIV_CASES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 1.0)]


def check_divergences(ctx: Ctx) -> list[Result]:
    """Every divergence per position and as the masked token-level loss (value, student
    gradient), against PyTorch, on masked 3-D logits: ordinary, +-1e3, and teacher
    probabilities that underflow to 0; DKD against mdistiller's formula."""
    out = []
    # defined per call: jit caches traces by function, and a mutation test's patched loss
    # must not stay in that cache
    @functools.partial(jax.jit, static_argnames=("divergence", "beta"))
    def loss_and_grad(s, t, y, where, temperature, alpha, divergence, beta):
        loss = lambda a: losses.distillation_loss(a, t, y, temperature, alpha, where=where,
                                                  divergence=divergence, beta=beta)
        return jax.value_and_grad(loss)(s)
    for kind in ("normal", "+-1e3", "underflow"):
        s, t, y, mask = token_inputs(kind)
        js, jt, jy, jm = (jnp.asarray(s, ctx.jdtype), jnp.asarray(t, ctx.jdtype), jnp.asarray(y),
                          jnp.asarray(mask))
        for name, beta in DIV_CASES:
            got, want = {}, {}
            for T, alpha in [(0.5, 0.3), (1.0, 0.7), (4.0, 1.0)]:
                per = {"kl": losses.soft_kl, "reverse_kl": losses.reverse_kl,
                       "jsd": lambda a, b, T, beta=beta: losses.jsd(a, b, T, beta)}[name]
                val, grad = loss_and_grad(js, jt, jy, jm, T, alpha, name, beta)
                got[f"T{T}"] = {"per_position": per(js, jt, T), "loss": val, "grad": grad}
                ts = ctx.t(s).requires_grad_()
                ref_loss = ref.masked_distillation_loss(ts, ctx.t(t), ctx.t(y), ctx.t(mask).bool(), T, alpha, name, beta)
                ref_loss.backward()
                want[f"T{T}"] = {"per_position": ref.DIVERGENCES[name](ctx.t(s), ctx.t(t), T, beta).detach(),
                                 "loss": ref_loss.detach(), "grad": ts.grad}
            tol = TOL[ctx.dtype]["grad"] if ctx.dtype == "float32" else F64
            if kind == "+-1e3" and ctx.dtype == "float32":  # values of ~1e3-1e6: relative rounding
                tol = (1e-3, 1e-5)
            label = name if name != "jsd" else f"jsd beta={beta}"
            out.append(compare(f"divergence {label}, {kind} logits (masked 3-D)", ctx, got, want, tol))
    # DKD: per position, its mean = mdistiller's dkd_loss (ordinary logits: mdistiller's
    # -1000 masking is exact only while logits / T stay well inside +-1000)
    s, t, y, mask = token_inputs("normal")
    rows = np.argwhere(mask)
    s2, t2, y2 = (a[mask] for a in (s, t, y))
    got, want = {}, {}
    for T, a, b in [(4.0, 1.0, 8.0), (1.0, 0.5, 2.0)]:
        got[f"T{T}"] = jnp.mean(losses.dkd(jnp.asarray(s2, ctx.jdtype), jnp.asarray(t2, ctx.jdtype),
                                           jnp.asarray(y2), T, a, b))
        want[f"T{T}"] = conventions.mdistiller_dkd(ctx.t(s2), ctx.t(t2), ctx.t(y2), T, a, b, ce_weight=0.0)
    out.append(compare(f"divergence dkd (mean over {len(rows)} tokens) = mdistiller dkd_loss", ctx, got, want,
                       TOL[ctx.dtype]["loss"]))
    return out


def _convention_inputs(ctx: Ctx):
    s, t, y, mask = token_inputs("normal", seed=22)
    y_real = np.where(mask, y, np.random.default_rng(22).integers(0, TOK_V, y.shape))  # real labels at padding
    return s, t, y, mask, y_real


def check_conventions(ctx: Ctx) -> list[Result]:
    """The convention table: each library's loss (parity/conventions.py, our re-implementation
    following its source) against the kdjax call that returns the same number, masked 3-D
    logits ``[4, 6, 11]`` with labels -100 at padding."""
    s, t, y, mask, y_real = _convention_inputs(ctx)
    js, jt, jy, jm = jnp.asarray(s, ctx.jdtype), jnp.asarray(t, ctx.jdtype), jnp.asarray(y), jnp.asarray(mask)
    jy_real = jnp.asarray(y_real)
    sv, tv, yv = ctx.t(s[mask]), ctx.t(t[mask]), ctx.t(y[mask])  # the valid tokens, [n, V]
    log_q = lambda T: F_log_softmax(ctx.t(s).reshape(-1, TOK_V) / T)
    log_p = lambda T: F_log_softmax(ctx.t(t).reshape(-1, TOK_V) / T)
    one_hot = np.eye(TOK_V)[y_real]
    T = 2.0
    L = losses
    hinton_all = lambda T: T**2 * jnp.mean(L.soft_kl(js, jt, T))  # every position, padding included
    rows = {
        "torchdistill KDLoss(T=2, alpha=0.3)": (
            L.distillation_loss(js, jt, jy, T, alpha=0.7, where=jm),
            conventions.torchdistill_kd(sv, tv, yv, T, alpha=0.3)),
        "torchdistill KDLoss(T=2, alpha=0): no T^2": (
            L.distillation_loss(js, jt, jy, T, alpha=1.0, where=jm) / T**2,
            conventions.torchdistill_kd(sv, tv, yv, T, alpha=0.0)),
        "mdistiller KD (CE 0.1, KD 0.9)": (
            (0.1 + 0.9) * L.distillation_loss(js, jt, jy, T, alpha=0.9 / (0.1 + 0.9), where=jm),
            conventions.mdistiller_kd(sv, tv, yv, T, 0.1, 0.9)),
        "mdistiller DKD (CE 1, alpha 1, beta 8, T 4), labels -100 at padding": (
            L.distillation_loss(js, jt, jy, 4.0, alpha=0.0, where=jm)
            + L.masked_mean(L.dkd(js, jt, jy, 4.0, 1.0, 8.0, where=jm), jm),
            conventions.mdistiller_dkd(sv, tv, yv, 4.0, 1.0, 8.0, ce_weight=1.0)),
        "Liger-Kernel LigerJSD(beta=0.3), ignore_index": (
            L.masked_mean(L.jsd(js, jt, T, 0.3), jm), conventions.liger_jsd(log_q(T), log_p(T), ctx.t(y).reshape(-1), 0.3)),
        "Liger-Kernel LigerJSD(beta=0): forward KL": (
            L.masked_mean(L.jsd(js, jt, T, 0.0), jm), conventions.liger_jsd(log_q(T), log_p(T), ctx.t(y).reshape(-1), 0.0)),
        "tunix LogitStrategy(T=2, alpha=0.5), real labels at padding": (
            L.distillation_loss(js, jt, jy_real, T, 0.5), conventions.tunix_logit(s, t, one_hot, T, 0.5)),
        "tunix LogitStrategy(T=2, alpha=0.5), its example's labels x mask": (
            0.5 * hinton_all(T) + 0.5 * jnp.mean(L.hard_ce(js, jy, where=jm)),
            conventions.tunix_logit(s, t, one_hot * mask[..., None], T, 0.5)),
        "EasyDeL distillation_loss(T=2, alpha=0.9, hard labels)": (
            L.distillation_loss(js, jt, jy, T, 0.9, where=jm), conventions.easydel_distillation(s, t, mask, y, True, T, 0.9)),
        "NVIDIA ModelOpt LogitsDistillationLoss(T=2), valid tokens": (
            L.distillation_loss(js, jt, jy, T, 1.0, where=jm), conventions.modelopt_logits(sv, tv, T)),
        "NVIDIA ModelOpt LogitsDistillationLoss(T=2, reduction='mean'): / vocab": (
            L.distillation_loss(js, jt, jy, T, 1.0, where=jm) / TOK_V, conventions.modelopt_logits(sv, tv, T, "mean")),
        "Keras 3 LogitsDistillation(T=2, loss=KLDivergence())": (
            hinton_all(T), conventions.keras_logits_distillation(s, t, T, kl_instance=True)),
    }
    for beta in (0.0, 0.3, 0.5, 1.0):  # TRL: temperature 1 in the loss (GKDTrainer samples at its temperature)
        rows[f"TRL generalized_jsd_loss(beta={beta:g}), labels -100"] = (
            L.masked_mean(L.jsd(js, jt, 1.0, beta), jm), conventions.trl_generalized_jsd(ctx.t(s), ctx.t(t), ctx.t(y), beta))
    rows["TRL generalized_jsd_loss(beta=0.5), no labels: / batch size"] = (
        jnp.sum(L.jsd(js, jt, 1.0, 0.5)) / TOK_B, conventions.trl_generalized_jsd(ctx.t(s), ctx.t(t), None, 0.5))
    for beta, call in ((0.0, L.reverse_kl), (1.0, L.soft_kl), (0.5, lambda a, b, T: L.jsd(a, b, T, 0.5))):
        rows[f"EasyDeL GKD generalized_jsd_loss(beta={beta:g}, T=2)"] = (
            L.masked_mean(call(js, jt, T), jm), conventions.easydel_gkd_jsd(s, t, mask, beta, T))
    out = [compare(f"convention: {name}", ctx, got, _numpy(want), TOL[ctx.dtype]["loss"])
           for name, (got, want) in rows.items()]
    # EasyDeL weighs its mixture the other way: at beta = 0.3 no jsd(beta') of kdjax's equals it
    easydel = conventions.easydel_gkd_jsd(s, t, mask, 0.3, T)
    gap = min(abs(float(L.masked_mean(L.jsd(js, jt, T, b), jm)) - easydel) for b in (0.3, 0.7))
    out.append(Result("convention: EasyDeL GKD(beta=0.3) is neither jsd(0.3) nor jsd(0.7)", ctx.dtype, gap,
                      gap / abs(easydel), 1e-3, 0.0, bool(gap > 1e-3), f"smallest gap {gap:.3g} (must exceed 1e-3)"))
    return out


def _numpy(value):
    return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)


def _real_package(name: str):
    """Import a peer package, or the reason it cannot be imported."""
    import importlib

    if name == "keras":
        import os
        import sys

        if "keras" not in sys.modules:
            os.environ["KERAS_BACKEND"] = "jax"  # must precede the import; the parity entry point's business
    try:
        module = importlib.import_module(name)
    except Exception as e:  # an absent or broken install: reported as skipped, with the reason
        return None, f"{name} not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if name == "keras" and module.backend.backend() != "jax":
        return None, f"keras runs on the {module.backend.backend()} backend here, not jax"
    return module, None


def check_conventions_packages(ctx: Ctx) -> list[Result]:
    """The same rows against the peers' real packages where they install (the parity extra:
    keras on the JAX backend, trl, torchdistill): each package's loss against the kdjax call
    (and, for Keras's default, against our re-implementation: no kdjax call equals it). A
    package that cannot be imported gives skipped rows with the reason."""
    s, t, y, mask, _ = _convention_inputs(ctx)
    js, jt, jy, jm = jnp.asarray(s, ctx.jdtype), jnp.asarray(t, ctx.jdtype), jnp.asarray(y), jnp.asarray(mask)
    sv, tv, yv = ctx.t(s[mask]), ctx.t(t[mask]), ctx.t(y[mask])
    L, T, tol, out = losses, 2.0, TOL[ctx.dtype]["loss"], []

    def rows(package, make, tol=tol, note=""):
        module, why = _real_package(package)
        if module is None:
            return [Result(f"{package} (real package)", ctx.dtype, float("nan"), float("nan"), tol[0], tol[1],
                           False, why, skipped=True)]
        return [compare(f"{package} {name}", ctx, got, _numpy(want), tol, note) for name, (got, want) in make().items()]

    def torchdistill_rows():
        from torchdistill.losses.mid_level import KDLoss

        kd = lambda alpha: KDLoss("s", "output", "t", "output", temperature=T, alpha=alpha)(
            {"s": {"output": sv}}, {"t": {"output": tv}}, yv)
        return {"KDLoss(T=2, alpha=0.3)": (L.distillation_loss(js, jt, jy, T, alpha=0.7, where=jm), kd(0.3)),
                "KDLoss(T=2, alpha=0): no T^2": (L.distillation_loss(js, jt, jy, T, alpha=1.0, where=jm) / T**2, kd(0.0))}

    def trl_rows():
        from trl.experimental.gkd import GKDTrainer

        gjsd = lambda labels, beta: GKDTrainer.generalized_jsd_loss(ctx.t(s), ctx.t(t), labels=labels, beta=beta)
        r = {f"GKDTrainer.generalized_jsd_loss(beta={b:g})": (L.masked_mean(L.jsd(js, jt, 1.0, b), jm),
                                                              gjsd(ctx.t(y), b)) for b in (0.0, 0.3, 0.5, 1.0)}
        r["GKDTrainer.generalized_jsd_loss(beta=0.5), no labels"] = (jnp.sum(L.jsd(js, jt, 1.0, 0.5)) / TOK_B,
                                                                    gjsd(None, 0.5))
        return r

    def keras_rows():
        import keras

        dtype = "float64" if ctx.dtype == "float64" else "float32"
        ld = lambda loss: keras.distillation.LogitsDistillation(temperature=T, loss=loss).compute_loss(
            jt, js)  # (teacher_outputs, student_outputs)
        return {"LogitsDistillation(T=2, loss=KLDivergence())": (
                    T**2 * jnp.mean(L.soft_kl(js, jt, T)), ld(keras.losses.KLDivergence(dtype=dtype))),
                "LogitsDistillation(T=2) default 'kl_divergence' = our re-implementation (on logits, not "
                "softmaxes; no kdjax call)": (conventions.keras_logits_distillation(s, t, T), ld("kl_divergence"))}

    out += rows("torchdistill", torchdistill_rows) + rows("trl", trl_rows)
    if _real_package("trl")[0] is not None:
        out += _trl_option_rows(ctx)
    # Keras's LogitsDistillation on float64 inputs differs from the same formula by ~1e-7
    # relative (measured; its KLDivergence alone is exact), so float64 rows get float32's tolerance
    out += rows("keras", keras_rows, TOL["float32"]["loss"],
                "float32 tolerance: Keras rounds inside LogitsDistillation" if ctx.dtype == "float64" else "")
    return out


# (beta, T, (student, teacher) logit_scale, (student, teacher) final_logit_softcapping, num_items_in_batch)
TRL_OPTION_CASES = [(0.5, 1.0, (1.0, 1.0), (None, None), None), (0.0, 2.0, (0.5, 1.3), (None, None), None),
                    (1.0, 1.0, (1.0, 1.0), (5.0, 8.0), None), (0.3, 2.0, (0.7, 1.2), (6.0, None), 17.0)]


def _trl_option_rows(ctx: Ctx) -> list[Result]:
    """``losses.gkd_loss`` against the installed TRL 1.16: ``GKDTrainer.generalized_jsd_loss``
    with ``reduction="sum"|"mean"|"batchmean"`` and ``num_items_in_batch`` (labels -100 and
    none); ``DistillationTrainer``'s divergence with ``logit_scale``/``final_logit_softcapping``
    and ``num_items_in_batch``, per token from TRL's own ``_stats_tile``/``_jsd_tile``/
    ``_backward_tile`` (``trl/kernels/chunked_divergence.py``) run in this dtype and reduced as
    ``_chunked_divergence_loss``, value and student gradient; and the whole
    ``_chunked_divergence_loss`` (identity ``lm_head``), which computes in float32."""
    import math

    from trl.experimental.gkd import GKDTrainer
    from trl.kernels import chunked_divergence as cd
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    s, t, y, mask, _ = _convention_inputs(ctx)
    js, jt, jm = jnp.asarray(s, ctx.jdtype), jnp.asarray(t, ctx.jdtype), jnp.asarray(mask)
    tol, out = TOL[ctx.dtype]["loss"], []
    for reduction in losses.REDUCTIONS:
        for labels in (True, False):
            for beta, T, nib in ((0.0, 1.0, None), (0.4, 2.0, None), (1.0, 1.0, None), (0.4, 2.0, 17.0)):
                if nib is not None and (reduction != "batchmean" or not labels):
                    continue
                got = losses.gkd_loss(js, jt, where=jm if labels else None, beta=beta, temperature=T,
                                      reduction=reduction, num_items_in_batch=nib)
                want = GKDTrainer.generalized_jsd_loss(ctx.t(s), ctx.t(t), ctx.t(y) if labels else None, beta, T,
                                                       reduction=reduction, num_items_in_batch=nib)
                out.append(compare(f"trl GKDTrainer.generalized_jsd_loss(beta={beta:g}, T={T:g}, reduction="
                                   f"{reduction!r}{', num_items_in_batch=17' if nib else ''}), "
                                   f"{'labels -100' if labels else 'no labels'} = gkd_loss", ctx, got,
                                   _numpy(want), tol))
    V = TOK_V
    s2, t2, valid = ctx.t(s).reshape(-1, V), ctx.t(t).reshape(-1, V), torch.from_numpy(mask.reshape(-1))
    for beta, T, scales, caps, nib in TRL_OPTION_CASES:
        kw = dict(s_scale=scales[0], s_softcap=caps[0] or 1.0, t_scale=scales[1], t_softcap=caps[1] or 1.0,
                  inv_t=1 / T, S_HAS_SOFTCAP=caps[0] is not None, T_HAS_SOFTCAP=caps[1] is not None, BLOCK_SIZE=None)
        with torch.no_grad():  # TRL's per-token forward and backward, in this dtype
            z = lambda: torch.zeros(s2.shape[0], dtype=s2.dtype)
            s_max, t_max, s_sum, s_x, t_sum, t_gap, s_gap = z() - math.inf, z() - math.inf, z(), z(), z(), z(), z()
            cd._stats_tile(s2, None, t2, None, s_max, s_sum, s_x, t_max, t_sum, t_gap, s_gap, V, **kw)
            s_log_z, t_log_z = s_max + torch.log(s_sum), t_max + torch.log(t_sum)
            if beta == 0.0:
                div = aux = t_gap / t_sum - t_log_z + s_log_z
            elif beta == 1.0:
                div = aux = s_gap / s_sum - s_log_z + t_log_z
            else:
                div, aux = z(), z()
                cd._jsd_tile(s2, None, t2, None, s_log_z, t_log_z, div, aux, V, beta, **kw)
            denom = valid.sum().clamp(min=1).to(s2.dtype) if nib is None else torch.tensor(nib, dtype=s2.dtype)
            value = div.masked_fill(~valid, 0).sum() / denom
            grad = s2.clone()
            cd._backward_tile(grad, None, t2, None, s_log_z, t_log_z, aux, valid.to(s2.dtype) / denom, V, beta,
                              kw["s_scale"], kw["s_softcap"], kw["t_scale"], kw["t_softcap"], kw["inv_t"],
                              0 if beta == 0.0 else 1 if beta == 1.0 else 2, kw["S_HAS_SOFTCAP"], kw["T_HAS_SOFTCAP"],
                              None)
        ours = lambda a: losses.gkd_loss(a, jt, where=jm, beta=beta, temperature=T, num_items_in_batch=nib,
                                         logit_scale=scales, final_logit_softcapping=caps)
        g_val, g_grad = jax.value_and_grad(ours)(js)
        name = (f"trl DistillationTrainer divergence (beta={beta:g}, T={T:g}, logit_scale={scales}, "
                f"final_logit_softcapping={caps}{', num_items_in_batch=17' if nib else ''})")
        out.append(compare(f"{name}: TRL's tiles in {ctx.dtype} = gkd_loss", ctx,
                           {"value": g_val, "grad": g_grad}, {"value": value.numpy(),
                                                              "grad": grad.reshape(s.shape).numpy()},
                           TOL[ctx.dtype]["grad"]))
        hs = torch.from_numpy(s.reshape(1, -1, V)).float().requires_grad_()
        eye = torch.eye(V)
        full, _, _ = _chunked_divergence_loss(hs, torch.from_numpy(t.reshape(1, -1, V)).float(), eye, eye,
                                              valid.reshape(1, -1), beta, num_items_in_batch=nib,
                                              student_logit_scale=scales[0], teacher_logit_scale=scales[1],
                                              student_final_logit_softcapping=caps[0],
                                              teacher_final_logit_softcapping=caps[1], temperature=T)
        full.backward()
        out.append(compare(f"{name}: _chunked_divergence_loss (float32 inside TRL) = gkd_loss", ctx,
                           {"value": g_val, "grad": g_grad},
                           {"value": full.detach().double().numpy(), "grad": hs.grad.reshape(s.shape).double().numpy()},
                           TOL["float32"]["grad"], "float32 tolerance: TRL's kernel computes in float32"))
    return out


def F_log_softmax(x):
    return torch.log_softmax(x, dim=-1)


def check_fused(ctx: Ctx) -> list[Result]:
    """kdjax.fused.linear_distillation_loss: value and gradients (hidden, kernel, bias) against
    kdjax's naive loss on the full logits and against a PyTorch chunked loop; teacher as
    logits and as hidden states + head."""
    rng = np.random.default_rng(23)
    n, d, v = 150, 16, 97
    h, w, b = rng.standard_normal((n, d)), rng.standard_normal((d, v)) * 0.3, rng.standard_normal(v) * 0.1
    th, tw = rng.standard_normal((n, 12)), rng.standard_normal((12, v)) * 0.5
    mask = rng.random(n) < 0.8
    y = np.where(mask, rng.integers(0, v, n), -100)
    J = lambda a: jnp.asarray(a, ctx.jdtype)
    t_logits = th @ tw
    out = []
    for divergence, beta in [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.4)]:
        kw = dict(temperature=2.0, alpha=0.6, where=jnp.asarray(mask), divergence=divergence, beta=beta)
        fused = lambda h_, w_, b_: fused_loss.linear_distillation_loss(
            h_, w_, jnp.asarray(y), student_bias=b_, teacher_hidden=J(th), teacher_kernel=J(tw), chunk_size=32, **kw)
        naive = lambda h_, w_, b_: losses.distillation_loss(h_ @ w_ + b_[None, :], J(t_logits), jnp.asarray(y),
                                                            kw["temperature"], kw["alpha"], where=kw["where"],
                                                            divergence=divergence, beta=beta)
        got = jax.jit(jax.value_and_grad(fused, (0, 1, 2)))(J(h), J(w), J(b))
        mine = jax.jit(jax.value_and_grad(naive, (0, 1, 2)))(J(h), J(w), J(b))
        th_, tw_, tb_ = ctx.t(h).requires_grad_(), ctx.t(w).requires_grad_(), ctx.t(b).requires_grad_()
        torch_val = ref.chunked_linear_distillation_loss(th_, tw_, tb_, ctx.t(y), ctx.t(mask).bool(),
                                                         ctx.t(t_logits), 2.0, 0.6, divergence, beta, 32)
        torch_val.backward()
        pack = lambda val, g: {"value": val, "d_hidden": g[0], "d_kernel": g[1], "d_bias": g[2]}
        tol = TOL[ctx.dtype]["grad"] if ctx.dtype == "float32" else F64
        out.append(compare(f"fused {divergence}: = naive kdjax loss", ctx, pack(*got), pack(*mine), tol))
        out.append(compare(f"fused {divergence}: = PyTorch chunked loop", ctx, pack(*got),
                           pack(torch_val.detach(), (th_.grad, tw_.grad, tb_.grad)), tol))
    return out


def check_topk(ctx: Ctx) -> list[Result]:
    """kdjax.losses' sparse family against our PyTorch transcription of DistillKit's
    (``parity/distillkit_reference.py``): per-position values and the student gradient, k = 7
    of 61. KL, JSD and TVD in both missing-mass modes at T = 1 and 2 and with targets
    generated at T = 0.7; hinge (the teacher's gaps and a fixed margin) and logistic ranking
    with a position mask and two unsupported teacher tokens."""
    from kdjax import losses
    from parity import distillkit_reference as dk

    rng = np.random.default_rng(41)
    s, t = rng.normal(size=(3, 6, 61)) * 2, rng.normal(size=(3, 6, 61)) * 3
    values, indices = losses.topk_logprobs(jnp.asarray(t, jnp.float64 if ctx.dtype == "float64" else jnp.float32), 7)
    values = jnp.asarray(values, ctx.jdtype)
    ids = torch.from_numpy(np.asarray(indices)).long()
    out = []

    def row(name, ours, theirs):
        got = {"value": ours(jnp.asarray(s, ctx.jdtype)), "grad": jax.grad(lambda x: jnp.sum(ours(x)))(
            jnp.asarray(s, ctx.jdtype))}
        ts = ctx.t(s).requires_grad_()
        want = theirs(ts)
        want.sum().backward()
        out.append(compare(name, ctx, got, {"value": want.detach(), "grad": ts.grad}, TOL[ctx.dtype]["grad"]))

    divergences = {"KL": (losses.topk_kl, dk.sparse_kl), "JSD": (losses.topk_jsd, dk.sparse_jsd),
                   "TVD": (losses.topk_tvd, dk.sparse_tvd)}
    for label, (ours, theirs) in divergences.items():
        for missing in losses.MISSING:
            for temperature, gen in ((1.0, 1.0), (2.0, 1.0), (2.0, 0.7)):
                row(f"top-k {label} (DistillKit), k = 7 of 61, missing={missing}, T={temperature:g}"
                    + ("" if gen == 1.0 else f", targets at T={gen:g}"),
                    lambda x: ours(x, values, indices, temperature, missing=missing, generation_temperature=gen),
                    lambda x: theirs(x, ids.to(x.device), ctx.t(np.asarray(values)), temperature, missing, gen=gen))
    where = np.ones((3, 6), bool)
    where[1, 4:] = False
    thin = np.asarray(values).copy()
    thin[0, 0, -2:] = -40.0  # below eps: not supported, no pair uses them
    thin = jnp.asarray(thin, ctx.jdtype)
    for margin in (None, 0.1):
        row(f"top-k hinge (DistillKit), margin={margin}, masked",
            lambda x: losses.topk_hinge(x, thin, indices, margin=margin, where=jnp.asarray(where)),
            lambda x: dk.sparse_hinge(x, ids.to(x.device), ctx.t(np.asarray(thin)), torch.from_numpy(where).to(x.device),
                                      margin))
    row("top-k logistic ranking (DistillKit), masked",
        lambda x: losses.topk_logistic_ranking(x, thin, indices, where=jnp.asarray(where)),
        lambda x: dk.sparse_logistic_ranking(x, ids.to(x.device), ctx.t(np.asarray(thin)),
                                             torch.from_numpy(where).to(x.device)))
    out += _tunix_topk_rows(ctx, s, t, values, indices, row)
    return out


def _tunix_topk_rows(ctx: Ctx, s, t, values, indices, row) -> list[Result]:
    """tunix's renormalised top-k (``LogitStrategy(distill_top_k=7)``, our PyTorch transcription
    ``parity/tunix_reference.py``) against ``topk_kl(renormalize=True)`` per position and
    ``topk_distillation_loss(renormalize=True)`` as tunix's whole loss (real labels, every
    position), value and student gradient."""
    from kdjax import losses
    from parity import tunix_reference as tx

    for temperature in (1.0, 2.0):
        row(f"top-k KL renormalised (tunix distill_top_k), k = 7 of 61, T={temperature:g}",
            lambda x: losses.topk_kl(x, values, indices, temperature, renormalize=True),
            lambda x: tx.topk_kl(x, ctx.t(t), 7, temperature))
    labels = np.random.default_rng(42).integers(0, 61, s.shape[:-1])
    row("tunix LogitStrategy(T=2, alpha=0.3, distill_top_k=7) = topk_distillation_loss(renormalize=True)",
        lambda x: losses.topk_distillation_loss(x, values, indices, jnp.asarray(labels), 2.0, 0.3, renormalize=True),
        lambda x: tx.logit_strategy_loss(x, ctx.t(t), ctx.t(labels), 7, 2.0, 0.3))
    return []
