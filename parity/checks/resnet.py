"""ResNets with BatchNorm in both modes, SGD, torchvision's resnet18 layout, lr schedules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

import kdjax
from kdjax import convert, losses
from parity import reference as ref
from parity.checks.common import (Ctx, Result, compare, F64, TOL, RUN_EARLY_STEPS_F32, RUN_LOSS_TOL_F32)



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
    return np.asarray(kdjax.data.random_batch_schedule(jax.random.PRNGKey(9), RES_N, RES_BATCH, steps))


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
