"""The seed's MLPs: forward, loss, gradients, one Adam step, 100-step runs, end to end, dropout."""

from __future__ import annotations

import contextlib
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import kdjax
from kdjax import convert, losses
from parity import reference as ref
from parity.checks.common import (Ctx, Result, compare, TOL, RUN_EARLY_STEPS_F32, RUN_LOSS_TOL_F32, STEPS, BATCH, N, D, C, T_GRID, ALPHA_GRID)


# ----------------------------------------------------------------------------- inputs

def seed_data():
    ds = kdjax.data.synthetic(N, D, C, seed=42, test_samples=1)
    return ds.x_train, ds.y_train


def torch_models(ctx: Ctx, seed: int = 0):
    """Reference teacher and student with torch's own init (seeded), in ctx's dtype."""
    torch.manual_seed(seed)
    teacher = ref.TeacherMLP(D, 256, C).to(ctx.tdtype).to(ctx.torch_device)
    student = ref.StudentMLP(D, 64, C).to(ctx.tdtype).to(ctx.torch_device)
    return teacher, student


def to_flax(module: torch.nn.Module, ctx: Ctx):
    params = convert.torch_to_flax(module.state_dict())
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, ctx.jdtype), params)


def jax_models(ctx: Ctx):
    return kdjax.TeacherMLP(256, C, dtype=ctx.jdtype), kdjax.StudentMLP(64, C, dtype=ctx.jdtype)


def schedule(steps=STEPS):
    return np.asarray(kdjax.data.random_batch_schedule(jax.random.PRNGKey(7), N, BATCH, steps))


def dropout_masks(steps=STEPS, hidden=256, p=0.3):
    """[steps, 2, batch, hidden] keep-masks (1 = keep) shared by both sides."""
    rng = np.random.default_rng(11)
    return (rng.random((steps, 2, BATCH, hidden)) >= p).astype(np.float64)


@contextlib.contextmanager
def injected_dropout(masks):
    """Replace kdjax's dropout outputs by ``x * mask / (1 - rate)`` (masks[0], masks[1])."""
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Dropout) and context.method_name == "__call__":
            which = {"dropout1": 0, "dropout2": 1}[module.name]
            x = args[0]
            return x * masks[which].astype(x.dtype) / (1 - module.rate)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def kdjax_run_with_masks(model, state, data, sched, masks):
    """kdjax's own (unjitted) CE train step, scanned, with injected dropout masks."""
    step = kdjax.make_train_step(model, "ce", jit=False)
    rng = jax.random.PRNGKey(0)  # unused: masks replace the random dropout

    @jax.jit
    def run(state, sched, masks):
        def body(state, inp):
            idx, m = inp
            batch = {k: jnp.take(v, idx, axis=0) for k, v in data.items()}
            with injected_dropout(m):
                return step(state, batch, rng)
        return jax.lax.scan(body, state, (sched, masks))

    return run(state, sched, masks)


# ----------------------------------------------------------------------------- checks

def check_forward(ctx: Ctx) -> list[Result]:
    x, _ = seed_data()
    t_ref, s_ref = torch_models(ctx)
    teacher, student = jax_models(ctx)
    out = []
    for name, mref, mj in [("forward teacher (eval)", t_ref, teacher), ("forward student", s_ref, student)]:
        mref.eval()
        with torch.no_grad():
            want = mref(ctx.t(x)).cpu().numpy()
        got = mj.apply({"params": to_flax(mref, ctx)}, jnp.asarray(x, ctx.jdtype), train=False)
        out.append(compare(name, ctx, got, want, TOL[ctx.dtype]["logits"]))
    torch.manual_seed(2)
    mlp_ref = ref.MLP(D, (40, 30), C).to(ctx.tdtype).to(ctx.torch_device)
    with torch.no_grad():
        want = mlp_ref(ctx.t(x)).cpu().numpy()
    got = kdjax.MLP((40, 30), C, dtype=ctx.jdtype).apply({"params": to_flax(mlp_ref, ctx)},
                                                         jnp.asarray(x, ctx.jdtype))
    out.append(compare("forward MLP (benchmark nets)", ctx, got, want, TOL[ctx.dtype]["logits"]))
    return out


def _loss_rows(ctx: Ctx, name: str, cases, note="") -> Result:
    """cases: iterable of (s, t, y, T, alpha) NumPy inputs; compares soft, hard, total."""
    got, want = {}, {}
    for i, (s, t, y, T, alpha) in enumerate(cases):
        js, jt, jy = jnp.asarray(s, ctx.jdtype), jnp.asarray(t, ctx.jdtype), jnp.asarray(y)
        got[f"{i}"] = {"soft": jnp.mean(losses.soft_kl(js, jt, T)) * T**2,
                       "hard": jnp.mean(losses.hard_ce(js, jy)),
                       "total": losses.distillation_loss(js, jt, jy, T, alpha)}
        ts, tt, ty = ctx.t(s), ctx.t(t), ctx.t(y)
        want[f"{i}"] = {"soft": ref.soft_term(ts, tt, T) * T**2, "hard": ref.hard_term(ts, ty),
                        "total": ref.distillation_loss(ts, tt, ty, T, alpha)}
    return compare(name, ctx, got, want, TOL[ctx.dtype]["loss"], note)


def check_loss(ctx: Ctx) -> list[Result]:
    rng = np.random.default_rng(3)
    B = 64
    s, t = rng.standard_normal((B, C)) * 3, rng.standard_normal((B, C)) * 3
    y = rng.integers(0, C, B)
    grid = [(s, t, y, T, a) for T, a in itertools.product(T_GRID, ALPHA_GRID)]
    one_hot_t = np.where(np.eye(C)[y] > 0, 30.0, -30.0)  # teacher ~ one-hot (p = 1 - 4e-26)
    big_s, big_t = np.sign(s) * 1e3, np.sign(t) * 1e3
    under_t = t.copy(); under_t[:, 0] = -1e4  # softmax(t/T)[:, 0] underflows to exactly 0
    T_ALPHA = [(T, 0.7) for T in T_GRID]
    return [
        _loss_rows(ctx, "loss grid: soft, hard, total", grid, "T {0.5,1,3,4,20} x alpha {0,.3,.7,1}"),
        _loss_rows(ctx, "loss near-one-hot teacher", [(s, one_hot_t, y, T, a) for T, a in T_ALPHA]),
        _loss_rows(ctx, "loss logits +-1e3", [(big_s, big_t, y, T, a) for T, a in T_ALPHA]),
        _loss_rows(ctx, "loss teacher probs underflow to 0", [(s, under_t, y, T, a) for T, a in T_ALPHA]),
    ]


def check_grads(ctx: Ctx) -> list[Result]:
    x, y = seed_data()
    x, y = x[:BATCH], y[:BATCH]
    t_ref, s_ref = torch_models(ctx)
    teacher, student = jax_models(ctx)
    t_ref.eval()
    out = []
    for T, alpha in [(3.0, 0.7), (0.5, 0.3), (20.0, 1.0)]:
        s_ref.zero_grad()
        with torch.no_grad():
            tl = t_ref(ctx.t(x))
        ref.distillation_loss(s_ref(ctx.t(x)), tl, ctx.t(y), T, alpha).backward()
        want = {k: p.grad for k, p in s_ref.named_parameters()}
        jtl = teacher.apply({"params": to_flax(t_ref, ctx)}, jnp.asarray(x, ctx.jdtype))

        def loss(p):
            logits = student.apply({"params": p}, jnp.asarray(x, ctx.jdtype))
            return losses.distillation_loss(logits, jtl, jnp.asarray(y), T, alpha)

        got = convert.flax_to_torch(jax.grad(loss)(to_flax(s_ref, ctx)))
        out.append(compare(f"grads student T={T} a={alpha}", ctx, got, want, TOL[ctx.dtype]["grad"]))
    return out


def check_adam_step(ctx: Ctx) -> list[Result]:
    x, y = seed_data()
    x, y = x[:BATCH], y[:BATCH]
    t_ref, s_ref = torch_models(ctx)
    teacher, student = jax_models(ctx)
    state = kdjax.state_from_params(to_flax(s_ref, ctx))
    jtl = teacher.apply({"params": to_flax(t_ref, ctx)}, jnp.asarray(x, ctx.jdtype))
    step = kdjax.make_train_step(student, "kd")
    batch = {"x": jnp.asarray(x, ctx.jdtype), "y": jnp.asarray(y), "teacher_logits": jtl}
    state, _ = step(state, batch, jax.random.PRNGKey(0), kdjax.make_hyper(3.0, 0.7, ctx.jdtype))
    adam_state = state.opt_state.inner_state[0]

    opt = torch.optim.Adam(s_ref.parameters(), lr=1e-3)
    t_ref.eval()
    with torch.no_grad():
        tl = t_ref(ctx.t(x))
    ref.distillation_loss(s_ref(ctx.t(x)), tl, ctx.t(y), 3.0, 0.7).backward()
    opt.step()
    named = dict(s_ref.named_parameters())
    tol = TOL[ctx.dtype]["adam"]
    return [
        compare("adam step: params", ctx, convert.flax_to_torch(state.params), named, tol),
        compare("adam step: first moment", ctx, convert.flax_to_torch(adam_state.mu),
                {k: opt.state[p]["exp_avg"] for k, p in named.items()}, tol),
        compare("adam step: second moment", ctx, convert.flax_to_torch(adam_state.nu),
                {k: opt.state[p]["exp_avg_sq"] for k, p in named.items()}, tol),
    ]


def _run_rows(ctx: Ctx, name: str, got_params, want_module, got_loss, want_loss) -> list[Result]:
    if ctx.dtype == "float64":
        tol = TOL["float64"]["run"]
        return [compare(f"{name}: params", ctx, convert.flax_to_torch(got_params),
                        dict(want_module.named_parameters()), tol),
                compare(f"{name}: loss curve", ctx, got_loss, np.asarray(want_loss), tol)]
    got_loss, want_loss = np.asarray(got_loss), np.asarray(want_loss)
    k = RUN_EARLY_STEPS_F32
    return [compare(f"{name}: loss, first {k} steps", ctx, got_loss[:k], want_loss[:k],
                    TOL["float32"]["loss"], "before rounding is amplified"),
            compare(f"{name}: loss curve", ctx, got_loss, want_loss, RUN_LOSS_TOL_F32,
                    "float32: loose (chaotic drift)")]


def check_runs(ctx: Ctx) -> list[Result]:
    x, y = seed_data()
    sched, masks = schedule(), dropout_masks()
    t_ref, s_ref = torch_models(ctx)
    teacher, student = jax_models(ctx)
    data = {"x": jnp.asarray(x, ctx.jdtype), "y": jnp.asarray(y)}
    out = []

    # teacher, CE with dropout, identical injected masks
    t_state = kdjax.state_from_params(to_flax(t_ref, ctx))
    t_state, t_loss = kdjax_run_with_masks(teacher, t_state, data, jnp.asarray(sched),
                                           jnp.asarray(masks, ctx.jdtype))
    want = ref.train(t_ref, ctx.t(x), ctx.t(y), ctx.t(sched), masks=ctx.t(masks))
    out += _run_rows(ctx, f"{STEPS}-step teacher CE + dropout masks", t_state.params, t_ref,
                     t_loss["loss"], want)

    # standard student, CE
    torch.manual_seed(1)
    s_ce = ref.StudentMLP(D, 64, C).to(ctx.tdtype).to(ctx.torch_device)
    s_state = kdjax.state_from_params(to_flax(s_ce, ctx))
    s_state, s_loss = kdjax.make_run(student, "ce")(s_state, data, jnp.asarray(sched), jax.random.PRNGKey(0))
    want = ref.train(s_ce, ctx.t(x), ctx.t(y), ctx.t(sched))
    out += _run_rows(ctx, f"{STEPS}-step student CE", s_state.params, s_ce, s_loss["loss"], want)

    # distilled student from the same trained teacher (the reference's, converted, so that
    # float32 teacher drift does not leak in): kdjax caches its logits, torch runs it online
    d_state = kdjax.state_from_params(to_flax(s_ref, ctx))
    tl = kdjax.predict_logits(teacher, to_flax(t_ref, ctx), data["x"])
    d_state, d_loss = kdjax.make_run(student, "kd")(
        d_state, dict(data, teacher_logits=tl), jnp.asarray(sched), jax.random.PRNGKey(0),
        kdjax.make_hyper(3.0, 0.7, ctx.jdtype))
    want = ref.train(s_ref, ctx.t(x), ctx.t(y), ctx.t(sched), objective="kd", teacher=t_ref)
    out += _run_rows(ctx, f"{STEPS}-step student KD (T=3, a=0.7)", d_state.params, s_ref,
                     d_loss["loss"], want)
    return out


def check_end_to_end(ctx: Ctx) -> list[Result]:
    """Teacher trained by the reference (torch's own dropout RNG), converted, then one
    student distilled from it by kdjax and by the reference."""
    x, y = seed_data()
    sched = schedule()
    t_ref, s_ref = torch_models(ctx, seed=5)
    torch.manual_seed(123)
    ref.train(t_ref, ctx.t(x), ctx.t(y), ctx.t(sched[::-1].copy()))
    teacher, student = jax_models(ctx)
    data = {"x": jnp.asarray(x, ctx.jdtype), "y": jnp.asarray(y)}
    tl = kdjax.predict_logits(teacher, to_flax(t_ref, ctx), data["x"])
    state = kdjax.state_from_params(to_flax(s_ref, ctx))
    state, loss = kdjax.make_run(student, "kd")(
        state, dict(data, teacher_logits=tl), jnp.asarray(sched), jax.random.PRNGKey(0),
        kdjax.make_hyper(4.0, 0.5, ctx.jdtype))
    want = ref.train(s_ref, ctx.t(x), ctx.t(y), ctx.t(sched), objective="kd", teacher=t_ref,
                     temperature=4.0, alpha=0.5)
    return _run_rows(ctx, "end to end: torch teacher -> KD student", state.params, s_ref,
                     loss["loss"], want)


def check_dropout_stats(ctx: Ctx) -> list[Result]:
    """kdjax's dropout keeps 1 - p of units (binomial 5-sigma bound) and scales by 1/(1-p)."""
    p, n = 0.3, 1_000_000
    teacher = kdjax.TeacherMLP(1000, C, dtype=ctx.jdtype)
    drop = nn.Dropout(p, deterministic=False)
    y = drop.apply({}, jnp.ones((n,), ctx.jdtype), rngs={"dropout": jax.random.PRNGKey(3)})
    y = np.asarray(y, np.float64)
    kept = y != 0
    rate = kept.mean()
    bound = 5 * np.sqrt(p * (1 - p) / n)
    keep_row = Result("dropout keep rate (p=0.3)", ctx.dtype, abs(rate - (1 - p)),
                      abs(rate - (1 - p)) / (1 - p), bound, 0.0, bool(abs(rate - (1 - p)) <= bound),
                      f"kept {rate:.5f} of {n:,}; 5-sigma bound")
    scale = compare("dropout scaling 1/(1-p)", ctx, y[kept], np.full(kept.sum(), 1 / (1 - p)),
                    (0.0, 4 * float(np.finfo(np.dtype(ctx.dtype)).eps)))
    # and the teacher's two dropout layers draw independent masks
    params = kdjax.create_train_state(teacher, jax.random.PRNGKey(0), 8).params
    masks = {}

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout):  # run dropout on ones to see its mask
            probe = next_fun(jnp.ones_like(args[0]), *args[1:], **kwargs)
            masks[context.module.name] = np.asarray(probe != 0)
            return args[0] * probe
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        teacher.apply({"params": params}, jnp.ones((64, 8), ctx.jdtype) * 10, train=True,
                      rngs={"dropout": jax.random.PRNGKey(1)})
    agree = float((masks["dropout1"] == masks["dropout2"]).mean())
    indep = Result("dropout layers independent", ctx.dtype, abs(agree - 0.58), 0.0, 0.02, 0.0,
                   bool(abs(agree - 0.58) <= 0.02), f"mask agreement {agree:.3f} (independent: 0.58)")
    return [keep_row, scale, indep]
