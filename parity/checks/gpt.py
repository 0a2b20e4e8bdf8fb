"""GPT-2: our PyTorch GPT and a random-init transformers GPT2LMHeadModel."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import torch

import kdjax
from kdjax import convert, losses
from parity import reference as ref
from parity.checks.common import (Ctx, Result, compare, F64, TOL, RUN_EARLY_STEPS_F32, RUN_LOSS_TOL_F32)
from parity.checks.resnet import as_torch, torch_state


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
    sched = np.asarray(kdjax.data.random_batch_schedule(jax.random.PRNGKey(4), LM_N, LM_BATCH, LM_STEPS))
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
