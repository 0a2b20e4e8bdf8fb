"""The parity checks: kdjax against the PyTorch reference, check by check.

Every check builds identical inputs for both sides (weights copied with
``kdjax.convert``, the same NumPy batches, NCHW for torch's ResNets, index schedule and
dropout masks), runs both, and returns ``Result`` rows: max abs / max rel error against
a tolerance. The seed's MLPs: ``forward`` ... ``dropout_stats``; ResNets with BatchNorm,
SGD, Adam and learning-rate schedules: ``resnet_*`` and ``lr_schedules``.
``python -m parity`` prints them; ``parity/test_parity.py`` asserts them.

Tolerances (DESIGN.md): float64 separates algorithmic bugs from rounding, so every
comparison there is atol 1e-12 plus rtol 1e-14 (about 45 ulp; it only matters above
magnitude ~100, where 1e-12 is less than one ulp). float32 checks the shipped path:
logits and loss atol 1e-6 / rtol 1e-5, gradients atol 1e-5 / rtol 1e-4, one optimizer
step atol 1e-7 + two ulp.
Long float32 runs are compared by loss curve only (see ``RUN_LOSS_TOL_F32``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import kdjax
from kdjax import convert, losses
from kdjax import fused as fused_loss
from parity import conventions
from parity import reference as ref

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
    return np.asarray(kdjax.data.seed_schedule(jax.random.PRNGKey(7), N, BATCH, steps))


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


# ----------------------------------------------------------------------------- ResNets

RES_N, RES_HW, RES_C, RES_BATCH, RES_STEPS = 96, 8, 5, 16, 100
RES_TEACHER = dict(stage_sizes=(2, 2), widths=(8, 16))
RES_STUDENT = dict(stage_sizes=(1, 1), widths=(4, 8))
RES_SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)


def image_data(n=RES_N, hw=RES_HW, seed=4):
    """NHWC images for kdjax, their NCHW copy for torch, and labels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, hw, hw, 3))
    return x, np.ascontiguousarray(x.transpose(0, 3, 1, 2)), rng.integers(0, RES_C, n)


def randomize_batchnorm(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm weights and running statistics, so eval mode tests them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
                m.bias.copy_(0.3 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.5 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def torch_resnet(ctx: Ctx, cfg: dict, seed: int, num_classes=RES_C, stem="cifar"):
    torch.manual_seed(seed)
    return ref.ResNet(cfg["stage_sizes"], cfg["widths"], num_classes, stem).to(ctx.tdtype).to(ctx.torch_device)


def kdjax_resnet(ctx: Ctx, cfg: dict, num_classes=RES_C, stem="cifar"):
    return kdjax.ResNet(cfg["stage_sizes"], cfg["widths"], num_classes, stem, dtype=ctx.jdtype)


def to_variables(module: torch.nn.Module, model, ctx: Ctx, x_shape) -> dict:
    """The torch module's state_dict as the kdjax model's variables (kdjax.convert)."""
    like = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(x_shape, ctx.jdtype))
    return jax.tree_util.tree_map(jnp.asarray, convert.torch_to_variables(module.state_dict(), like))


def torch_state(module: torch.nn.Module) -> dict:
    """Parameters and BatchNorm statistics by name (num_batches_tracked left out)."""
    return {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


def as_torch(variables) -> dict:
    return convert.variables_to_torch(variables, num_batches_tracked=None)


def check_resnet_forward(ctx: Ctx) -> list[Result]:
    """Eval and train mode logits, and the running statistics after one train forward."""
    x, x_t, _ = image_data(32)
    x16, x16_t, _ = image_data(8, hw=16, seed=5)
    tol = TOL[ctx.dtype]["logits"]
    out = []
    for name, cfg, stem, xj, xt in [("teacher (cifar stem)", RES_TEACHER, "cifar", x, x_t),
                                    ("student (cifar stem)", RES_STUDENT, "cifar", x, x_t),
                                    ("student (imagenet stem)", RES_STUDENT, "imagenet", x16, x16_t)]:
        m = torch_resnet(ctx, cfg, seed=1, stem=stem)
        randomize_batchnorm(m, seed=2)
        model = kdjax_resnet(ctx, cfg, stem=stem)
        v = to_variables(m, model, ctx, xj.shape)
        xj = jnp.asarray(xj, ctx.jdtype)
        m.eval()
        with torch.no_grad():
            want = m(ctx.t(xt))
        out.append(compare(f"resnet {name}: forward eval", ctx, jax.jit(model.apply)(v, xj), want, tol))
        m.train()
        with torch.no_grad():
            want = m(ctx.t(xt))  # batch statistics; updates running_mean / running_var
        got, new = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(v, xj)
        out.append(compare(f"resnet {name}: forward train", ctx, got, want, tol))
        stats = {k: w for k, w in torch_state(m).items() if "running" in k}
        out.append(compare(f"resnet {name}: running stats after 1 train forward", ctx,
                           as_torch({"batch_stats": new["batch_stats"]}), stats, tol))
    return out


def _res_kd_inputs(ctx: Ctx):
    """Teacher (random BatchNorm statistics, eval) logits, a student pair, the data."""
    x, x_t, y = image_data()
    teacher = torch_resnet(ctx, RES_TEACHER, seed=3)
    randomize_batchnorm(teacher, seed=6)
    teacher.eval()
    with torch.no_grad():
        t_logits = teacher(ctx.t(x_t))
    student_t = torch_resnet(ctx, RES_STUDENT, seed=7)
    student = kdjax_resnet(ctx, RES_STUDENT)
    v = to_variables(student_t, student, ctx, x.shape)
    t_model = kdjax_resnet(ctx, RES_TEACHER)  # kdjax's teacher logits, cached as a kdjax run would
    tj = jax.jit(t_model.apply)(to_variables(teacher, t_model, ctx, x.shape), jnp.asarray(x, ctx.jdtype))
    return x, x_t, y, t_logits, tj, student_t, student, v


def check_resnet_grads(ctx: Ctx) -> list[Result]:
    """Gradient of the KD loss in train mode (batch statistics), every parameter; the
    teacher's eval-mode logits (random running statistics) first."""
    x, x_t, y, t_logits, tj, student_t, student, v = _res_kd_inputs(ctx)
    out = [compare("resnet teacher logits (eval, converted)", ctx, tj, t_logits, TOL[ctx.dtype]["logits"])]
    idx = np.arange(RES_BATCH)
    student_t.train()
    ref.distillation_loss(student_t(ctx.t(x_t[idx])), t_logits[idx], ctx.t(y[idx]), 4.0, 0.6).backward()
    want = {k: p.grad for k, p in student_t.named_parameters()}

    def loss(params):
        logits, _ = kdjax.train.apply_model(student, params, {"batch_stats": v["batch_stats"]},
                                            jnp.asarray(x[idx], ctx.jdtype), train=True)
        return losses.distillation_loss(logits, tj[idx], jnp.asarray(y[idx]), 4.0, 0.6)

    got = as_torch({"params": jax.jit(jax.grad(loss))(v["params"])})
    out.append(compare("resnet grads, KD T=4 a=0.6 (train mode)", ctx, got, want, TOL[ctx.dtype]["grad"]))
    return out


def _kdjax_res_run(ctx, student, v, tx, x, y, tj, sched, T, alpha):
    v = jax.tree_util.tree_map(jnp.copy, v)  # the run donates its state; v is used again
    state = kdjax.state_from_params(v["params"], model_state={"batch_stats": v["batch_stats"]}, tx=tx)
    data = {"x": jnp.asarray(x, ctx.jdtype), "y": jnp.asarray(y), "teacher_logits": tj}
    return kdjax.make_run(student, "kd", tx=tx)(state, data, jnp.asarray(sched), jax.random.PRNGKey(0),
                                                kdjax.make_hyper(T, alpha, ctx.jdtype))


def _res_schedule(steps):
    return np.asarray(kdjax.data.seed_schedule(jax.random.PRNGKey(9), RES_N, RES_BATCH, steps))


def check_resnet_steps(ctx: Ctx) -> list[Result]:
    """One SGD step (momentum, weight decay, Nesterov) and one Adam step: params, batch
    statistics and optimizer state; then 20 SGD steps with a cosine schedule."""
    x, x_t, y, t_logits, tj, _, student, v = _res_kd_inputs(ctx)
    sched = _res_schedule(20)
    out = []
    tol = TOL[ctx.dtype]["adam"]
    for name, tx, make_opt in [
            ("sgd", kdjax.sgd(**{("learning_rate" if k == "lr" else k): w for k, w in RES_SGD.items()}),
             lambda ps: torch.optim.SGD(ps, **RES_SGD)),
            ("adam", kdjax.adam(1e-3, ctx.jdtype), lambda ps: torch.optim.Adam(ps, lr=1e-3))]:
        student_t = torch_resnet(ctx, RES_STUDENT, seed=7)
        opt = make_opt(student_t.parameters())
        ref.train_resnet_kd(student_t, ctx.t(x_t), ctx.t(y), t_logits, ctx.t(sched[:1]), opt,
                            temperature=4.0, alpha=0.6)
        state, _ = _kdjax_res_run(ctx, student, v, tx, x, y, tj, sched[:1], 4.0, 0.6)
        out.append(compare(f"resnet one {name} step: params + running stats", ctx,
                           as_torch(state.variables), torch_state(student_t), tol))
        named = dict(student_t.named_parameters())
        if name == "sgd":
            got = state.opt_state[1].trace  # chain(add_decayed_weights, trace, scale)
            want = {k: opt.state[p]["momentum_buffer"] for k, p in named.items()}
        else:
            got = state.opt_state.inner_state[0].mu
            want = {k: opt.state[p]["exp_avg"] for k, p in named.items()}
        out.append(compare(f"resnet one {name} step: {'momentum buffer' if name == 'sgd' else 'first moment'}",
                           ctx, as_torch({"params": got}), want, tol))
    # 20 steps, SGD + cosine schedule (torch's CosineAnnealingLR stepped every step)
    student_t = torch_resnet(ctx, RES_STUDENT, seed=7)
    opt = torch.optim.SGD(student_t.parameters(), **RES_SGD)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    want_loss = ref.train_resnet_kd(student_t, ctx.t(x_t), ctx.t(y), t_logits, ctx.t(sched), opt,
                                    temperature=4.0, alpha=0.6, scheduler=torch_sched)
    tx = kdjax.sgd(kdjax.cosine_schedule(RES_SGD["lr"], 20), RES_SGD["momentum"], RES_SGD["weight_decay"],
                   RES_SGD["nesterov"])
    state, loss = _kdjax_res_run(ctx, student, v, tx, x, y, tj, sched, 4.0, 0.6)
    run_tol = TOL[ctx.dtype]["grad"] if ctx.dtype == "float32" else TOL["float64"]["run"]
    out.append(compare("resnet 20 sgd+cosine steps: params + running stats", ctx,
                       as_torch(state.variables), torch_state(student_t), run_tol))
    out.append(compare("resnet 20 sgd+cosine steps: loss curve", ctx, loss["loss"], np.asarray(want_loss),
                       TOL[ctx.dtype]["loss"] if ctx.dtype == "float64" else (1e-5, 1e-4)))
    return out


def check_resnet_run(ctx: Ctx) -> list[Result]:
    """A 100-step distillation run, ResNet teacher (cached eval logits) -> smaller ResNet
    student with BatchNorm, SGD (momentum, weight decay, Nesterov) + cosine schedule."""
    x, x_t, y, t_logits, tj, student_t, student, v = _res_kd_inputs(ctx)
    sched = _res_schedule(RES_STEPS)
    opt = torch.optim.SGD(student_t.parameters(), **RES_SGD)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=RES_STEPS)
    want = ref.train_resnet_kd(student_t, ctx.t(x_t), ctx.t(y), t_logits, ctx.t(sched), opt,
                               temperature=3.0, alpha=0.7, scheduler=torch_sched)
    tx = kdjax.sgd(kdjax.cosine_schedule(RES_SGD["lr"], RES_STEPS), RES_SGD["momentum"],
                   RES_SGD["weight_decay"], RES_SGD["nesterov"])
    state, loss = _kdjax_res_run(ctx, student, v, tx, x, y, tj, sched, 3.0, 0.7)
    name = f"{RES_STEPS}-step resnet KD, sgd+cosine"
    if ctx.dtype == "float64":
        tol = TOL["float64"]["run"]
        return [compare(f"{name}: params + running stats", ctx,
                        as_torch(state.variables), torch_state(student_t), tol),
                compare(f"{name}: loss curve", ctx, loss["loss"], np.asarray(want), tol)]
    got_loss, want_loss = np.asarray(loss["loss"]), np.asarray(want)
    k = RUN_EARLY_STEPS_F32
    return [compare(f"{name}: loss, first {k} steps", ctx, got_loss[:k], want_loss[:k], TOL["float32"]["loss"],
                    "before rounding is amplified"),
            compare(f"{name}: loss curve", ctx, got_loss, want_loss, RUN_LOSS_TOL_F32, "float32: loose")]


def check_resnet18_convert(ctx: Ctx) -> list[Result]:
    """A torchvision-layout resnet18 (random BatchNorm statistics) converted: eval logits
    for both stems, and the state_dict round trip (exact)."""
    out = []
    for stem, hw in (("imagenet", 32), ("cifar", 16)):
        torch.manual_seed(11)
        m = ref.ResNet((2, 2, 2, 2), (64, 128, 256, 512), 10, stem).to(ctx.tdtype).to(ctx.torch_device)
        randomize_batchnorm(m, seed=12)
        m.eval()
        x = np.random.default_rng(13).standard_normal((2, hw, hw, 3))
        model = kdjax.resnet18(10, stem, dtype=ctx.jdtype)
        v = to_variables(m, model, ctx, x.shape)
        with torch.no_grad():
            want = m(ctx.t(x.transpose(0, 3, 1, 2).copy()))
        out.append(compare(f"resnet18 ({stem} stem) converted: eval logits", ctx,
                           jax.jit(model.apply)(v, jnp.asarray(x, ctx.jdtype)), want, TOL[ctx.dtype]["logits"]))
        sd = {k: w.cpu().numpy() for k, w in m.state_dict().items()}
        back = convert.variables_to_torch(v, num_batches_tracked=0)
        same = back.keys() == sd.keys() and all(np.array_equal(back[k], sd[k]) for k in sd)
        out.append(Result(f"resnet18 ({stem} stem) state_dict round trip", ctx.dtype, 0.0 if same else float("inf"),
                          0.0 if same else float("inf"), 0.0, 0.0, bool(same), f"{len(sd)} keys, bitwise"))
    return out


def check_lr_schedules(ctx: Ctx) -> list[Result]:
    """kdjax's schedules against torch.optim.lr_scheduler, step for step (per step and per epoch)."""
    out = []
    cases = [("cosine T_max=50 eta_min=1e-4", kdjax.cosine_schedule(0.1, 50, eta_min=1e-4), 1,
              lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50, eta_min=1e-4)),
             ("cosine per epoch (7 steps), T_max=8", kdjax.cosine_schedule(0.1, 8, every=7), 7,
              lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8)),
             ("multistep [10, 30] gamma 0.1", kdjax.multistep_schedule(0.1, [10, 30]), 1,
              lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [10, 30], 0.1)),
             ("multistep per epoch (7 steps) [2, 5] gamma 0.2", kdjax.multistep_schedule(0.1, [2, 5], 0.2, every=7),
              7, lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5], 0.2))]
    for name, schedule, every, make in cases:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        sch, want = make(opt), []
        for t in range(56):
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            if (t + 1) % every == 0:
                sch.step()
        got = np.asarray([schedule(jnp.asarray(t)) for t in range(56)], np.float64)
        out.append(compare(f"lr schedule: {name}", ctx, got, np.asarray(want), TOL[ctx.dtype]["adam"]
                           if ctx.dtype == "float32" else F64))
    return out


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
    # Keras's LogitsDistillation on float64 inputs differs from the same formula by ~1e-7
    # relative (measured; its KLDivergence alone is exact), so float64 rows get float32's tolerance
    out += rows("keras", keras_rows, TOL["float32"]["loss"],
                "float32 tolerance: Keras rounds inside LogitsDistillation" if ctx.dtype == "float64" else "")
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


# ----------------------------------------------------------------------------- GPT-2

LM_VOCAB, LM_LEN, LM_N, LM_BATCH, LM_STEPS = 61, 10, 24, 8, 100
LM_STUDENT, LM_TEACHER = (2, 16, 4), (2, 32, 4)  # layers, d_model, heads


def lm_data(seed: int = 31):
    """Token windows, next-token labels and a right-padding mask (lengths 4..LM_LEN)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, LM_VOCAB, (LM_N, LM_LEN))
    y = rng.integers(0, LM_VOCAB, (LM_N, LM_LEN))
    mask = np.arange(LM_LEN)[None] < rng.integers(4, LM_LEN + 1, LM_N)[:, None]
    return x.astype(np.int32), y.astype(np.int32), mask


def _lm_pair(ctx: Ctx, shape, seed: int):
    torch.manual_seed(seed)
    module = ref.GPT(LM_VOCAB, *shape, LM_LEN + 2).to(ctx.tdtype).to(ctx.torch_device)
    model = kdjax.TransformerLM(LM_VOCAB, *shape, LM_LEN + 2, dtype=ctx.jdtype)
    like = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, LM_LEN), jnp.int32))
    v = jax.tree_util.tree_map(jnp.asarray, convert.torch_to_variables(module.state_dict(), like))
    return module, model, v


def check_transformer(ctx: Ctx) -> list[Result]:
    """TransformerLM (GPT-2) against our PyTorch GPT: forward with and without a padding
    mask, the masked token-level KD loss and its gradients, one Adam step, and a
    100-step token-level distillation run from a larger GPT's cached logits."""
    x, y, mask = lm_data()
    tol = TOL[ctx.dtype]
    student_t, student, v = _lm_pair(ctx, LM_STUDENT, seed=1)
    teacher_t, teacher, tv = _lm_pair(ctx, LM_TEACHER, seed=2)
    X, M = ctx.t(x), ctx.t(mask).bool()
    with torch.no_grad():
        want_plain, want_masked, t_logits = student_t(X), student_t(X, M), teacher_t(X)
    apply = jax.jit(lambda v, x, m=None: student.apply(v, x, mask=m))
    out = [compare("gpt forward", ctx, apply(v, jnp.asarray(x)), want_plain, tol["logits"]),
           compare("gpt forward, padding mask", ctx, apply(v, jnp.asarray(x), jnp.asarray(mask)), want_masked,
                   tol["logits"])]
    tj = jax.jit(teacher.apply)(tv, jnp.asarray(x))
    out.append(compare("gpt teacher logits (converted)", ctx, tj, t_logits, tol["logits"]))

    T, alpha, idx = 2.0, 0.6, np.arange(LM_BATCH)
    loss_t = ref.masked_distillation_loss(student_t(X[idx]), t_logits[idx], ctx.t(y[idx]), M[idx], T, alpha)
    loss_t.backward()

    def loss(params):
        logits = student.apply({"params": params}, jnp.asarray(x[idx]))
        return losses.distillation_loss(logits, tj[idx], jnp.asarray(y[idx]), T, alpha,
                                        where=jnp.asarray(mask[idx]))

    val, grads = jax.jit(jax.value_and_grad(loss))(v["params"])
    out.append(compare(f"gpt masked token KD loss T={T} a={alpha}", ctx, val, loss_t.detach(), tol["loss"]))
    out.append(compare("gpt grads, every parameter", ctx, as_torch({"params": grads}),
                       {k: p.grad for k, p in student_t.named_parameters()}, tol["grad"]))

    data = {"x": jnp.asarray(x), "y": jnp.asarray(y), "where": jnp.asarray(mask), "teacher_logits": tj}
    sched = np.asarray(kdjax.data.seed_schedule(jax.random.PRNGKey(4), LM_N, LM_BATCH, LM_STEPS))
    run = kdjax.make_run(student, "kd", tx=kdjax.adam(1e-3, ctx.jdtype))
    hyper = kdjax.make_hyper(T, alpha, ctx.jdtype)
    student_t, _, v = _lm_pair(ctx, LM_STUDENT, seed=1)
    opt = torch.optim.Adam(student_t.parameters(), lr=1e-3)
    state = kdjax.state_from_params(v["params"], tx=kdjax.adam(1e-3, ctx.jdtype))
    got_loss, want_loss = [], []
    for k in range(LM_STEPS):  # one step per call: one compiled program gives every step's state
        want_loss += ref.train_lm_kd(student_t, X, ctx.t(y), M, t_logits, ctx.t(sched[k:k + 1]), opt,
                                     temperature=T, alpha=alpha)
        state, m = run(state, data, jnp.asarray(sched[k:k + 1]), jax.random.PRNGKey(0), hyper)
        got_loss.append(float(m["loss"][0]))
        if k == 0:
            # float32: the first Adam step is lr * g / (|g| + eps), which turns the rounding of a
            # gradient near 0 into a difference of up to ~lr; the MLP rows' 2 ulp do not hold here
            step_tol, note = (tol["adam"], "") if ctx.dtype == "float64" else (
                tol["grad"], "float32: Adam's first step amplifies rounding of near-zero gradients")
            out.append(compare("gpt one adam step: params", ctx, as_torch({"params": state.params}),
                               torch_state(student_t), step_tol, note))
    got_loss, want_loss, name = np.asarray(got_loss), np.asarray(want_loss), f"{LM_STEPS}-step gpt token KD"
    if ctx.dtype == "float64":
        out.append(compare(f"{name}: params", ctx, as_torch({"params": state.params}), torch_state(student_t),
                           tol["run"]))
        out.append(compare(f"{name}: loss curve", ctx, got_loss, want_loss, tol["run"]))
    else:
        k = RUN_EARLY_STEPS_F32
        out.append(compare(f"{name}: loss, first {k} steps", ctx, got_loss[:k], want_loss[:k], tol["loss"],
                           "before rounding is amplified"))
        out.append(compare(f"{name}: loss curve", ctx, got_loss, want_loss, RUN_LOSS_TOL_F32, "float32: loose"))
    return out


def check_gpt2_hf(ctx: Ctx) -> list[Result]:
    """A randomly initialised ``transformers`` GPT2LMHeadModel (small GPT2Config, no
    download) converted by ``torch_to_variables``: logits with and without a padding
    mask (at real tokens), and the ``state_dict`` round trip (tied ``lm_head`` included)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    x, _, mask = lm_data(seed=32)
    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=LM_VOCAB, n_positions=LM_LEN + 2, n_embd=32, n_layer=3, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).to(ctx.tdtype).to(ctx.torch_device).eval()
    model = kdjax.TransformerLM(LM_VOCAB, 3, 32, 4, LM_LEN + 2, dtype=ctx.jdtype)
    like = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, LM_LEN), jnp.int32))
    v = jax.tree_util.tree_map(jnp.asarray, convert.torch_to_variables(hf.state_dict(), like,
                                                                       tied=model.tied_weights))
    with torch.no_grad():
        plain = hf(ctx.t(x)).logits
        masked = hf(ctx.t(x), attention_mask=ctx.t(mask.astype(np.int64))).logits
    tol = {"float64": F64, "float32": (1e-5, 1e-5)}[ctx.dtype]
    apply = jax.jit(lambda v, x, m=None: model.apply(v, x, mask=m))
    got_masked = np.asarray(apply(v, jnp.asarray(x), jnp.asarray(mask)))
    back = convert.variables_to_torch(jax.tree_util.tree_map(np.asarray, v), tied=model.tied_weights)
    sd = {k: a.detach().cpu().numpy() for k, a in hf.state_dict().items()}
    exact = sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    return [compare("transformers GPT2LMHeadModel converted: logits", ctx, apply(v, jnp.asarray(x)), plain, tol),
            compare("transformers GPT2LMHeadModel: logits at real tokens, padding mask", ctx,
                    got_masked[mask], masked.cpu().numpy()[mask], tol),
            Result("transformers GPT2LMHeadModel state_dict round trip", ctx.dtype, 0.0 if exact else np.inf,
                   0.0 if exact else np.inf, 0.0, 0.0, exact)]


CHECKS: dict[str, Callable[[Ctx], list[Result]]] = {
    "forward": check_forward,
    "loss": check_loss,
    "grads": check_grads,
    "adam_step": check_adam_step,
    "runs": check_runs,
    "end_to_end": check_end_to_end,
    "dropout_stats": check_dropout_stats,
    "resnet_forward": check_resnet_forward,
    "resnet_grads": check_resnet_grads,
    "resnet_steps": check_resnet_steps,
    "resnet_run": check_resnet_run,
    "resnet18_convert": check_resnet18_convert,
    "lr_schedules": check_lr_schedules,
    "divergences": check_divergences,
    "conventions": check_conventions,
    "conventions_packages": check_conventions_packages,
    "fused": check_fused,
    "transformer": check_transformer,
    "gpt2_hf": check_gpt2_hf,
}


def run_check(name: str, ctx: Ctx) -> list[Result]:
    with precision(ctx):
        return CHECKS[name](ctx)
