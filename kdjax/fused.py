"""The distillation loss of a linear output layer, without ever holding ``[tokens, vocab]``.

With a 32k-128k vocabulary, a language model's logits for every token — the student's,
the teacher's, their softmaxes and the logits' gradient — are the largest arrays of a
training step. ``linear_distillation_loss`` takes the hidden states and the output
layer's kernel instead, walks the tokens in chunks (``lax.scan``) and computes each
chunk's logits, loss terms and gradients in one pass (a ``custom_vjp``: the gradients
of the hidden states, kernel and bias are formed chunk by chunk in the forward pass and
scaled by the cotangent in the backward one), so at most ``[chunk_size, vocab]`` is
live. Value and gradients are those of ``distillation_loss(hidden @ kernel + bias,
teacher_logits, labels, ...)``; only the order of the sums differs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from kdjax.errors import InputError, InputTypeError, check_count
from kdjax.losses import (DIVERGENCES, MISSING, _hard_ce, check_alpha, check_beta, check_finite, check_labels,
                          check_temperature, check_where, divergence_per_position, topk_kl)

__all__ = ["linear_distillation_loss", "FusedLM"]


def _chunk_sums(h, kernel, bias, teacher, t_layer, labels, where, hyper, config):
    """Masked sums of the divergence and the cross-entropy over one chunk of tokens;
    ``teacher`` is the chunk's logits, or its hidden states for ``t_layer = (kernel, bias)``."""
    divergence, kind, _ = config
    temperature, _, beta = hyper
    logits = h @ kernel
    if bias is not None:
        logits = logits + bias[None, :]
    if kind == "topk":  # (values, indices): the sparse KL, ``divergence`` its missing-mass rule
        div = topk_kl(logits, *teacher, temperature, missing=divergence)
    else:
        t_logits = teacher
        if kind == "hidden":
            t_kernel, t_bias = t_layer
            t_logits = teacher @ t_kernel
            if t_bias is not None:
                t_logits = t_logits + t_bias[None, :]
        div = divergence_per_position(logits, jax.lax.stop_gradient(t_logits), temperature, divergence, beta)
    ce = _hard_ce(logits, labels)
    return jnp.sum(jnp.where(where, div, 0.0)), jnp.sum(jnp.where(where, ce, 0.0))


def _total(div_sum, ce_sum, count, hyper):
    temperature, alpha, _ = hyper
    norm = jnp.maximum(count, 1).astype(div_sum.dtype)
    return alpha * temperature**2 * div_sum / norm + (1 - alpha) * ce_sum / norm


def _layout(n: int, chunk_size: int) -> tuple[int, bool]:
    """``(chunk, strided)``: the largest divisor of ``n`` in ``[chunk_size / 2, chunk_size]``
    gives strided chunks (below); a token count without one, contiguous chunks."""
    if n <= chunk_size:
        return n, True
    for chunk in range(chunk_size, (chunk_size + 1) // 2 - 1, -1):
        if n % chunk == 0:
            return chunk, True
    return chunk_size, False


def _chunk(arrays, i, chunk, strided):
    """Chunk ``i`` of each ``[n, ...]`` array, never a padded or transposed copy of it.

    Strided (``chunk`` divides ``n``): rows ``i, i + n/chunk, i + 2 n/chunk, ...``, a slice
    of the free ``[chunk, n/chunk, ...]`` view, so that rows sharded over a mesh's "data"
    axis stay split within every chunk. Contiguous: rows ``[start, start + chunk)`` with
    ``start = min(i * chunk, n - chunk)``; the last chunk may overlap the one before it,
    and ``fresh`` marks the rows not counted yet.
    """
    leaves, tree = jax.tree_util.tree_flatten(arrays)  # the teacher may be a (values, indices) pair
    n = leaves[0].shape[0]
    if strided:
        views = [a.reshape(chunk, n // chunk, *a.shape[1:]) for a in leaves]
        parts = [jax.lax.dynamic_index_in_dim(v, i, axis=1, keepdims=False) for v in views]
        return jax.tree_util.tree_unflatten(tree, parts), True
    start = jnp.minimum(i * chunk, n - chunk)
    fresh = start + jnp.arange(chunk) >= i * chunk
    return jax.tree_util.tree_unflatten(tree, [jax.lax.dynamic_slice_in_dim(a, start, chunk) for a in leaves]), fresh


def _scan_chunks(body, init, h, teacher, labels, where, layout):
    chunk, strided = layout
    chunks = -(-h.shape[0] // chunk)

    def step(carry, i):
        (h_c, t_c, y_c, w_c), fresh = _chunk((h, teacher, labels, where), i, chunk, strided)
        return body(carry, (h_c, t_c, y_c, w_c & fresh))

    return jax.lax.scan(step, init, jnp.arange(chunks))


def _unchunk(rows, n, strided):
    """``[chunks, chunk, ...]`` per-chunk rows back to ``[n, ...]`` in token order."""
    if strided:
        return rows.swapaxes(0, 1).reshape(n, *rows.shape[2:])
    chunks, chunk = rows.shape[:2]  # the last chunk's first rows repeat the one before it
    return jnp.concatenate([rows[:-1].reshape(-1, *rows.shape[2:]), rows[-1][chunks * chunk - n:]])


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _fused(h, kernel, bias, teacher, t_layer, labels, where, hyper, config):
    """h/teacher/labels/where: ``[tokens, ...]``; returns the scalar loss."""
    def body(sums, chunk):
        h_c, t_c, y_c, w_c = chunk
        d, c = _chunk_sums(h_c, kernel, bias, t_c, t_layer, y_c, w_c, hyper, config)
        return (sums[0] + d, sums[1] + c), None

    zero = jnp.zeros((), h.dtype)
    (div_sum, ce_sum), _ = _scan_chunks(body, (zero, zero), h, teacher, labels, where, config[2])
    return _total(div_sum, ce_sum, jnp.sum(where), hyper)


def _fused_fwd(h, kernel, bias, teacher, t_layer, labels, where, hyper, config):
    temperature, alpha, _ = hyper
    count = jnp.sum(where)
    norm = jnp.maximum(count, 1).astype(h.dtype)
    weights = (alpha * temperature**2 / norm, (1 - alpha) / norm)  # d loss / d (div_sum, ce_sum)

    def body(carry, chunk):
        sums, g_kernel, g_bias, g_hyper = carry
        h_c, t_c, y_c, w_c = chunk
        (d, c), vjp = jax.vjp(lambda a, k, b, hy: _chunk_sums(a, k, b, t_c, t_layer, y_c, w_c, hy, config),
                              h_c, kernel, bias, hyper)
        g_h, g_k, g_b, g_hy = vjp(tuple(jnp.asarray(w, d.dtype) for w in weights))
        g_bias = None if bias is None else g_bias + g_b
        g_hyper = jax.tree_util.tree_map(jnp.add, g_hyper, g_hy)
        return ((sums[0] + d, sums[1] + c), g_kernel + g_k, g_bias, g_hyper), g_h

    zero = jnp.zeros((), h.dtype)
    init = ((zero, zero), jnp.zeros_like(kernel), None if bias is None else jnp.zeros_like(bias),
            jax.tree_util.tree_map(jnp.zeros_like, hyper))
    ((div_sum, ce_sum), g_kernel, g_bias, g_hyper), g_h = _scan_chunks(
        body, init, h, teacher, labels, where, config[2])
    # temperature, alpha and beta also enter through the weights of the two sums
    value, total_vjp = jax.vjp(lambda hy: _total(div_sum, ce_sum, count, hy), hyper)
    g_hyper = jax.tree_util.tree_map(jnp.add, g_hyper, total_vjp(jnp.ones_like(value))[0])
    return value, (_unchunk(g_h, h.shape[0], config[2][1]), g_kernel, g_bias, g_hyper)


def _fused_bwd(config, residuals, cotangent):
    scale = lambda g: None if g is None else cotangent * g
    g_h, g_kernel, g_bias, g_hyper = residuals
    return (scale(g_h), scale(g_kernel), scale(g_bias), None, None, None, None,
            jax.tree_util.tree_map(scale, g_hyper))


_fused.defvjp(_fused_fwd, _fused_bwd)


def _check_float(name, x, ndim=None):
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputTypeError(f"{name}: expected a floating-point array, got {getattr(x, 'dtype', type(x).__name__)}")
    if ndim is not None and x.ndim != ndim:
        raise InputError(f"{name}: expected {ndim}-D, got shape {tuple(x.shape)}")


def linear_distillation_loss(student_hidden, student_kernel, labels, *, student_bias=None, teacher_logits=None,
                             teacher_hidden=None, teacher_kernel=None, teacher_bias=None, teacher_topk=None,
                             temperature, alpha, where=None, divergence="kl", beta=0.5, missing="zero",
                             chunk_size=256):
    r"""``distillation_loss(student_hidden @ student_kernel + student_bias, teacher logits,
    labels, temperature, alpha, where=where, divergence=divergence, beta=beta)``, value and
    gradients, without a ``[tokens, vocab]`` array for the student.

    .. math::
        L = \alpha\, T^2\, \overline{D(h W + b, t)} + (1 - \alpha)\, \overline{\mathrm{CE}(h W + b, y)}

    (means over the tokens ``where`` selects, or all). The teacher is either its logits
    ``[..., vocab]`` or, with no ``[tokens, vocab]`` array at all, its hidden states and
    output layer (``teacher_hidden @ teacher_kernel + teacher_bias``), or its cached top-k
    ``teacher_topk = (values, indices)`` (``kdjax.losses.topk_logprobs``; D is then
    ``kdjax.losses.topk_kl`` with ``missing``); it carries no gradient. Differentiable in ``student_hidden``, ``student_kernel`` and
    ``student_bias``. Works under ``jit``, ``vmap`` and with tokens sharded over a mesh.

    Args:
      student_hidden: ``[..., hidden]`` (e.g. ``[batch, length, hidden]``).
      student_kernel: ``[hidden, vocab]``; ``student_bias``: optional ``[vocab]``.
      labels: ``[...]`` integer targets (anything where ``where`` is false).
      teacher_logits: ``[..., vocab]``; or teacher_hidden ``[..., teacher_hidden]`` with
        teacher_kernel ``[teacher_hidden, vocab]`` (and optional teacher_bias ``[vocab]``).
      temperature, alpha, where, divergence, beta: as ``kdjax.losses.distillation_loss``.
      chunk_size: tokens per chunk (memory is O(chunk_size x vocab)).

    >>> import jax.numpy as jnp
    >>> from kdjax.losses import distillation_loss
    >>> h, w, t = jnp.ones((2, 3, 4)), jnp.ones((4, 5)) / 10, jnp.zeros((2, 3, 5))
    >>> y = jnp.zeros((2, 3), jnp.int32)
    >>> fused = linear_distillation_loss(h, w, y, teacher_logits=t, temperature=2.0, alpha=0.5, chunk_size=4)
    >>> bool(jnp.allclose(fused, distillation_loss(h @ w, t, y, 2.0, 0.5)))
    True
    """
    check_count("chunk_size", chunk_size)
    given = [name for name, v in (("teacher_logits", teacher_logits), ("teacher_hidden", teacher_hidden),
                                  ("teacher_topk", teacher_topk)) if v is not None]
    if len(given) != 1 or (teacher_kernel is not None and given != ["teacher_hidden"]):
        got = given + ["teacher_kernel"] * (teacher_kernel is not None)
        raise InputError(f"teacher: expected one of teacher_logits, teacher_hidden with teacher_kernel, or "
                         f"teacher_topk, got {', '.join(got) or 'none'}")
    if divergence not in DIVERGENCES:
        raise InputError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    if missing not in MISSING:
        raise InputError(f"missing: expected one of {MISSING}, got {missing!r}")
    check_temperature(temperature)
    check_alpha(alpha)
    check_beta(beta)
    _check_float("student_hidden", student_hidden)
    _check_float("student_kernel", student_kernel, 2)
    if student_hidden.ndim < 1 or student_hidden.shape[-1] != student_kernel.shape[0]:
        raise InputError(f"student_kernel: expected [{student_hidden.shape[-1]}, vocab] for hidden states "
                         f"{tuple(student_hidden.shape)}, got {tuple(student_kernel.shape)}")
    positions, vocab = tuple(student_hidden.shape[:-1]), student_kernel.shape[1]
    if student_bias is not None and tuple(student_bias.shape) != (vocab,):
        raise InputError(f"student_bias: expected shape ({vocab},), got {tuple(student_bias.shape)}")
    if not hasattr(labels, "dtype"):
        raise InputTypeError(f"labels: expected an integer array, got {type(labels).__name__}")
    check_where(where, positions)
    check_labels(labels, positions + (vocab,), where)
    n = math.prod(positions)
    if n == 0:
        raise InputError(f"student_hidden: expected at least one token, got shape {tuple(student_hidden.shape)}")
    flat = lambda x: x.reshape(n, *x.shape[len(positions):])
    t_layer = None
    if teacher_logits is not None:
        _check_float("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != positions + (vocab,):
            raise InputError(f"teacher_logits: expected shape {positions + (vocab,)}, got "
                             f"{tuple(teacher_logits.shape)}")
        check_finite("teacher_logits", teacher_logits)  # concrete only: one +inf would zero its KL
        kind, teacher = "logits", flat(teacher_logits)
    elif teacher_topk is not None:
        values, indices = teacher_topk
        _check_float("teacher_topk values", values)
        if not jnp.issubdtype(indices.dtype, jnp.integer) or values.shape != indices.shape \
                or tuple(values.shape[:-1]) != positions:
            raise InputError(f"teacher_topk: expected values and integer indices of shape {positions + ('k',)}, got "
                             f"{values.dtype}{list(values.shape)} and {indices.dtype}{list(indices.shape)}")
        kind, teacher, divergence = "topk", (flat(values), flat(indices)), missing
    else:
        if teacher_hidden is None or teacher_kernel is None:
            raise InputError("teacher: expected teacher_hidden and teacher_kernel together, got one of them")
        _check_float("teacher_hidden", teacher_hidden)
        _check_float("teacher_kernel", teacher_kernel, 2)
        if tuple(teacher_hidden.shape[:-1]) != positions or teacher_kernel.shape != (teacher_hidden.shape[-1], vocab):
            raise InputError(f"teacher_hidden / teacher_kernel: expected {positions + ('hidden',)} and "
                             f"[hidden, {vocab}], got {tuple(teacher_hidden.shape)} and {tuple(teacher_kernel.shape)}")
        kind, teacher, t_layer = "hidden", flat(teacher_hidden), (teacher_kernel, teacher_bias)

    mask = jnp.ones((n,), bool) if where is None else flat(where)
    dtype = student_hidden.dtype
    hyper = tuple(jnp.asarray(v, dtype) for v in (temperature, alpha, beta))
    return _fused(flat(student_hidden), student_kernel, student_bias, teacher, t_layer, flat(labels), mask, hyper,
                  (divergence, kind, _layout(n, int(chunk_size))))


@dataclasses.dataclass(frozen=True)
class FusedLM:
    """A train-step objective for language models that never builds ``[tokens, vocab]``
    logits: ``make_train_step(student, FusedLM(), teacher=teacher)`` (or ``make_run``).

    The student returns its final hidden states (``apply(..., hidden_states=True)``) and
    names its head (``output_layer(params) -> (kernel, bias)``; kdjax's ``TransformerLM``
    and ``Llama`` do); the loss is ``linear_distillation_loss`` with ``hyper.temperature``
    and ``hyper.alpha`` (a ``Hyper``, as ``"kd"``), over ``batch["where"]`` when given,
    against the online teacher's hidden states and head (again no ``[tokens, vocab]``
    array), ``batch["teacher_logits"]`` when cached, or the cached top-k
    ``batch["teacher_topk_values"]``/``["teacher_topk_indices"]`` (``kdjax.offline``: the
    sparse KL with ``missing``, as ``kdjax.objectives.TopKKD``). ``divergence``/``beta``: as
    ``distillation_loss``; ``chunk_size``: tokens per chunk.
    """

    divergence: str = "kl"
    beta: float = 0.5
    chunk_size: int = 256
    missing: str = "zero"

    def check(self, batch, *, hyper, teacher):
        """Trace-time validation (see kdjax.objectives, the protocol).

        Args:
          batch: the minibatch; hyper: the ``Hyper``; teacher: None or a ``Teacher``.

        Raises:
          InputError: ``hyper`` is None, or there is neither a teacher nor cached teacher logits
            (full or top-k) in ``batch``.
        """
        if hyper is None:
            raise InputError("hyper: FusedLM needs a Hyper (kdjax.make_hyper), got None")
        if "teacher_logits" not in batch and "teacher_topk_values" not in batch and teacher is None:
            raise InputError("objective FusedLM: expected batch['teacher_logits'] (or ['teacher_topk_values'/"
                             "'teacher_topk_indices']) or both a bound teacher and teacher_params, got neither")

    def loss(self, student, params, model_state, batch, *, rng, hyper, teacher):
        """``linear_distillation_loss`` of the student's hidden states (see kdjax.objectives, the protocol).

        Args:
          student, params, model_state: the student (with ``output_layer``) and its variables.
          batch: ``"x"``, ``"y"``, optionally ``"where"`` and cached ``"teacher_logits"`` or
            ``"teacher_topk_values"``/``"teacher_topk_indices"``.
          rng: the dropout key; hyper: ``temperature`` and ``alpha``; teacher: None or a
            ``Teacher`` (used when nothing is cached).

        Returns:
          ``(loss, (model_state, {}))``.

        Raises:
          InputError: a student or teacher without ``output_layer``; as ``linear_distillation_loss``.
        """
        for who, m in (("model", student), ("teacher", None if teacher is None else teacher.model)):
            if m is not None and not hasattr(m, "output_layer"):
                raise InputError(f"{who}: FusedLM needs a model with output_layer(params) and "
                                 f"apply(..., hidden_states=True) (kdjax's TransformerLM and Llama), got "
                                 f"{type(m).__name__}")
        variables = {"params": params, **model_state}
        h = student.apply(variables, batch["x"], train=True, rngs={"dropout": rng}, hidden_states=True)
        kernel, bias = student.output_layer(params)
        kw = dict(student_bias=bias, temperature=hyper.temperature, alpha=hyper.alpha, where=batch.get("where"),
                  divergence=self.divergence, beta=self.beta, chunk_size=self.chunk_size)
        if "teacher_logits" in batch:
            loss = linear_distillation_loss(h, kernel, batch["y"], teacher_logits=batch["teacher_logits"], **kw)
        elif "teacher_topk_values" in batch:
            topk = (batch["teacher_topk_values"], batch["teacher_topk_indices"])
            loss = linear_distillation_loss(h, kernel, batch["y"], teacher_topk=topk, missing=self.missing, **kw)
        else:
            t_vars = teacher.variables
            th = jax.lax.stop_gradient(teacher.model.apply(t_vars, batch["x"], hidden_states=True))
            tk, tb = jax.tree_util.tree_map(jax.lax.stop_gradient, teacher.model.output_layer(t_vars["params"]))
            loss = linear_distillation_loss(h, kernel, batch["y"], teacher_hidden=th, teacher_kernel=tk,
                                            teacher_bias=tb, **kw)
        return loss, (model_state, {})
