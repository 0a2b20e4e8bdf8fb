"""Feature distillation against PyTorch: the losses (our PyTorch versions of mdistiller's,
Keras 3's and tunix's; value and student gradient; mdistiller's on NCHW there, NHWC here),
Keras's ``FeatureDistillation`` and flax's pooling as real packages, CRD's loss and memory
bank, and a 20-step FitNet run (hooks and ``ConvReg`` in PyTorch, taps and a connector here)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

import kdjax
from kdjax import features
from parity import feature_reference as fref
from parity.checks.common import TOL, Ctx, Result, compare

# (name, kdjax loss, torch loss, student NHWC shape, teacher NHWC shape, same layout on both sides?)
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
    ("Keras FeatureDistillation mse", features.mse, fref.keras_mse, (6, 4, 4, 8), (6, 4, 4, 8), True),
    ("Keras FeatureDistillation mae", features.mae, fref.keras_mae, (6, 4, 4, 8), (6, 4, 4, 8), True),
    ("Keras FeatureDistillation cosine_similarity", features.cosine_similarity, fref.keras_cosine, (6, 5, 12),
     (6, 5, 12), True),
    ("tunix feature pooling (teacher 7x9x12 pooled to 3x4x12)", features.pooled_cosine, fref.tunix_pooled_cosine,
     (6, 3, 4, 12), (6, 7, 9, 12), True),
]


def check_features(ctx: Ctx) -> list[Result]:
    out = []
    rng = np.random.default_rng(31)
    for name, ours, theirs, s_shape, t_shape, flat in CASES:
        s, t = rng.standard_normal(s_shape), rng.standard_normal(t_shape)
        js, jt = jnp.asarray(s, ctx.jdtype), jnp.asarray(t, ctx.jdtype)
        value, grad = jax.jit(jax.value_and_grad(ours))(js, jt)
        nchw = (lambda a: a) if flat else (lambda a: a.transpose(0, 3, 1, 2))  # flat: one layout for both
        ts = ctx.t(nchw(s)).requires_grad_()
        ref = theirs(ts, ctx.t(nchw(t)))
        ref.backward()
        want_grad = ts.grad.detach().cpu().numpy()
        want_grad = want_grad if flat else want_grad.transpose(0, 2, 3, 1)  # back to NHWC
        tol = TOL[ctx.dtype]["grad"]
        out.append(compare(f"feature loss: {name}", ctx, {"value": value, "grad": grad},
                           {"value": ref.detach().reshape(()), "grad": torch.from_numpy(want_grad)}, tol))
    out += _keras_and_flax_rows(ctx, rng)
    out += check_masked_hidden_states(ctx)
    out += check_crd(ctx)
    out += check_fitnet_run(ctx)
    return out


def _keras_and_flax_rows(ctx: Ctx, rng) -> list[Result]:
    """Keras 3's ``FeatureDistillation(loss=...).compute_loss`` (JAX backend) and the pooling
    tunix calls (``flax.nnx.avg_pool`` = ``flax.linen.avg_pool``), as installed."""
    from parity.checks.tokens import _real_package

    s, t = rng.standard_normal((6, 4, 4, 8)), rng.standard_normal((6, 4, 4, 8))
    js, jt = jnp.asarray(s, ctx.jdtype), jnp.asarray(t, ctx.jdtype)
    tol = TOL[ctx.dtype]["loss"]
    keras, why = _real_package("keras")
    if keras is None:
        out = [Result("keras FeatureDistillation (real package)", ctx.dtype, float("nan"), float("nan"), tol[0],
                      tol[1], False, why, skipped=True)]
    else:
        fd = lambda loss: np.asarray(keras.distillation.FeatureDistillation(loss=loss).compute_loss(jt, js))
        # Keras's loss functions cast to its float32 floatx, so float64 rows get float32's tolerance
        k_tol, note = (TOL["float32"]["loss"], "float32 tolerance: Keras computes in float32") \
            if ctx.dtype == "float64" else (tol, "")
        out = [compare(f"keras FeatureDistillation(loss={name!r}) (real package)", ctx, ours(js, jt), fd(name), k_tol,
                       note)
               for name, ours in (("mse", features.mse), ("mae", features.mae),
                                  ("cosine_similarity", features.cosine_similarity))]
    import flax.linen as nn

    x = jnp.asarray(rng.standard_normal((7, 9, 12)), ctx.jdtype)
    strides, windows = (2, 2, 1), (3, 3, 1)  # tunix's VALID choice for 7 -> 3, 9 -> 4, 12 -> 12
    want = nn.avg_pool(x.reshape(1, 7, 9, 12, 1), windows, strides, "VALID").reshape(3, 4, 12)
    out.append(compare("pool_to_shape = flax.linen.avg_pool (tunix's reduce_array_to_target_shape)", ctx,
                       features.pool_to_shape(x, (3, 4, 12)), np.asarray(want), tol))
    return out


def check_masked_hidden_states(ctx: Ctx) -> list[Result]:
    """Token features with an attention mask against our PyTorch transcription of DistillKit's
    ``compute_hs_loss`` (``parity/distillkit_reference.py``): ``mse(s, t, where=m)`` for its
    ``"mse"``, ``pooled_cosine(s, t, where=m)`` (equal shapes) for its ``"cosine"``, one layer
    and the mean of two, value and student gradients; and without a mask."""
    from parity import distillkit_reference as dk

    rng = np.random.default_rng(43)
    layers = [(rng.standard_normal((3, 7, 10)), rng.standard_normal((3, 7, 10))) for _ in range(2)]
    mask = rng.random((3, 7)) < 0.6
    mask[1] = False
    mask[1, 2] = True
    out = []
    for kind, ours in (("mse", features.mse), ("cosine", features.pooled_cosine)):
        for n_layers in (1, 2):
            for masked in (True, False):
                where = jnp.asarray(mask) if masked else None

                def loss(ss, ts=tuple(jnp.asarray(t, ctx.jdtype) for _, t in layers[:n_layers])):
                    return sum(ours(a, b, where=where) for a, b in zip(ss, ts)) / n_layers

                value, grads = jax.jit(jax.value_and_grad(loss))(tuple(jnp.asarray(s, ctx.jdtype)
                                                                     for s, _ in layers[:n_layers]))
                ts = [ctx.t(s).requires_grad_() for s, _ in layers[:n_layers]]
                ref = dk.hidden_state_loss(kind, [(a, ctx.t(t)) for a, (_, t) in zip(ts, layers)],
                                           torch.from_numpy(mask).to(ts[0].device) if masked else None)
                ref.backward()
                got = {"value": value, **{f"grad{i}": g for i, g in enumerate(grads)}}
                want = {"value": ref.detach().reshape(()), **{f"grad{i}": a.grad for i, a in enumerate(ts)}}
                out.append(compare(f"DistillKit hidden-state {kind}, {n_layers} layer(s), "
                                   f"{'attention mask' if masked else 'no mask'}: "
                                   f"{ours.__name__}(s, t{', where=mask' if masked else ''})", ctx, got, want,
                                   TOL[ctx.dtype]["grad"]))
    return out


def check_crd(ctx: Ctx) -> list[Result]:
    """CRD (mdistiller's ``CRDLoss``) given the same contrast indices: the loss, its gradients
    (both embedding heads and both features), the updated memory bank and the normalisers,
    over two steps (Z set by the first, reused by the second)."""
    from kdjax.features import crd

    rng = np.random.default_rng(41)
    n, b, k, dim, ds, dt = 30, 6, 7, 5, 8, 12
    f_s, f_t = rng.standard_normal((b, ds)), rng.standard_normal((b, dt))
    torch.manual_seed(5)
    embed_s, embed_t = fref.CRDEmbed(ds, dim).to(ctx.tdtype), fref.CRDEmbed(dt, dim).to(ctx.tdtype)
    memory0 = crd.init_memory(jax.random.PRNGKey(2), n, dim, ctx.jdtype)
    t_mem = {"v1": ctx.t(np.asarray(memory0["memory_s"])), "v2": ctx.t(np.asarray(memory0["memory_t"])),
             "z": ctx.t(np.asarray(memory0["z"]))}
    heads = lambda e: {"linear": {"kernel": jnp.asarray(e.linear.weight.detach().numpy().T, ctx.jdtype),
                                  "bias": jnp.asarray(e.linear.bias.detach().numpy(), ctx.jdtype)}}
    params = {"s": heads(embed_s), "t": heads(embed_t)}
    embed = crd.Embed(dim, dtype=ctx.jdtype)

    def ours(params, a, c, memory, rows, contrast):
        return crd.crd_loss(embed.apply({"params": params["s"]}, a), embed.apply({"params": params["t"]}, c), rows,
                            contrast, memory)

    step = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True))
    out, memory = [], memory0
    for i in range(2):
        rows = rng.choice(n, b, replace=False)
        contrast = np.concatenate([rows[:, None], rng.integers(0, n, (b, k))], axis=1)
        (value, memory), (g_params, g_s, g_t) = step(params, jnp.asarray(f_s, ctx.jdtype), jnp.asarray(f_t, ctx.jdtype),
                                                     memory, jnp.asarray(rows), jnp.asarray(contrast))
        for e in (embed_s, embed_t):
            e.zero_grad()
        ts, tt = ctx.t(f_s).requires_grad_(), ctx.t(f_t).requires_grad_()
        ref = fref.crd_loss(embed_s, embed_t, ts, tt, t_mem, torch.as_tensor(rows), torch.as_tensor(contrast))
        ref.backward()
        grads = lambda e: {"kernel": e.linear.weight.grad.T, "bias": e.linear.bias.grad}
        tol = TOL[ctx.dtype]["grad"]
        out.append(compare(f"CRD step {i + 1}: loss and gradients", ctx,
                           {"value": value, "f_s": g_s, "f_t": g_t, "embed_s": g_params["s"]["linear"],
                            "embed_t": g_params["t"]["linear"]},
                           {"value": ref.detach().reshape(()), "f_s": ts.grad, "f_t": tt.grad, "embed_s": grads(embed_s),
                            "embed_t": grads(embed_t)}, tol))
        out.append(compare(f"CRD step {i + 1}: memory bank and Z", ctx,
                           {"memory_s": memory["memory_s"], "memory_t": memory["memory_t"], "z": memory["z"]},
                           {"memory_s": t_mem["v1"], "memory_t": t_mem["v2"], "z": t_mem["z"]}, tol))
    return out


def check_fitnet_run(ctx: Ctx) -> list[Result]:
    """20 SGD steps of FitNet (CE + 100 x hint on layer2 through mdistiller's ConvReg), a
    ResNet teacher (random BatchNorm statistics, eval) and student with BatchNorm in both
    and in the connector: student, connector and every running statistic after the run,
    and the loss curve. PyTorch reads the features with forward hooks; kdjax taps them."""
    from parity.checks import resnet as R

    x, x_t, y = R.image_data()
    teacher_t = R.torch_resnet(ctx, R.RES_TEACHER, seed=3)
    R.randomize_batchnorm(teacher_t, seed=6)
    student_t = R.torch_resnet(ctx, R.RES_STUDENT, seed=7)
    torch.manual_seed(8)
    conv_reg = fref.ConvReg(R.RES_STUDENT["widths"][-1], R.RES_TEACHER["widths"][-1]).to(ctx.tdtype)
    R.randomize_batchnorm(conv_reg, seed=9)
    teacher, student = R.kdjax_resnet(ctx, R.RES_TEACHER), R.kdjax_resnet(ctx, R.RES_STUDENT)
    t_vars = R.to_variables(teacher_t, teacher, ctx, x.shape)
    s_vars = R.to_variables(student_t, student, ctx, x.shape)
    c = {k: v.detach().cpu().numpy() for k, v in conv_reg.state_dict().items()}
    J = lambda a: jnp.asarray(a, ctx.jdtype)
    connector = {"conv": {"kernel": J(c["conv.weight"].transpose(2, 3, 1, 0)), "bias": J(c["conv.bias"])},
                 "bn": {"scale": J(c["bn.weight"]), "bias": J(c["bn.bias"])}}
    c_stats = {"batch_stats": {"bn": {"mean": J(c["bn.running_mean"]), "var": J(c["bn.running_var"])}}}
    obj = features.objective(ce=1.0, terms=[("hint", "layer2", "layer2", 100.0)])
    sgd = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    tx = kdjax.sgd(sgd["lr"], sgd["momentum"], sgd["weight_decay"], sgd["nesterov"])
    state = kdjax.state_from_params({**s_vars["params"], "connectors": {"hint:layer2": connector}},
                                    model_state={"batch_stats": s_vars["batch_stats"],
                                                 "connectors": {"hint:layer2": c_stats}}, tx=tx)
    _, t_feats = features.capture(teacher, t_vars, J(x), ["layer2"])
    sched = R._res_schedule(20)
    data = {"x": J(x), "y": jnp.asarray(y), "teacher_features": t_feats}
    state, m = kdjax.make_run(student, obj, tx=tx)(state, data, jnp.asarray(sched), jax.random.PRNGKey(0))
    opt = torch.optim.SGD(list(student_t.parameters()) + list(conv_reg.parameters()), **sgd)
    want_loss = fref.train_fitnet(student_t, teacher_t, conv_reg, ctx.t(x_t), ctx.t(y), ctx.t(sched), opt,
                                  layer="layer2", weight=100.0)
    params, model_state = features.student_variables(state.params, state.model_state)
    conn = state.params["connectors"]["hint:layer2"]
    conn_stats = state.model_state["connectors"]["hint:layer2"]["batch_stats"]["bn"]
    got_conn = {"conv.weight": np.asarray(conn["conv"]["kernel"]).transpose(3, 2, 0, 1), "conv.bias": conn["conv"]["bias"],
                "bn.weight": conn["bn"]["scale"], "bn.bias": conn["bn"]["bias"], "bn.running_mean": conn_stats["mean"],
                "bn.running_var": conn_stats["var"]}
    want_conn = {k: v for k, v in conv_reg.state_dict().items() if not k.endswith("num_batches_tracked")}
    tol = TOL[ctx.dtype]["grad"] if ctx.dtype == "float32" else TOL["float64"]["run"]
    return [compare("FitNet 20 sgd steps: student params + running stats", ctx,
                    R.as_torch({"params": params, **model_state}), R.torch_state(student_t), tol),
            compare("FitNet 20 sgd steps: connector (ConvReg) params + running stats", ctx,
                    {k: np.asarray(v) for k, v in got_conn.items()}, want_conn, tol),
            compare("FitNet 20 sgd steps: loss curve", ctx, m["loss"], np.asarray(want_loss),
                    TOL[ctx.dtype]["loss"] if ctx.dtype == "float64" else (1e-5, 1e-4))]
