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

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError
from kdjax.losses import (DIVERGENCES, check_alpha, check_beta, check_temperature, check_where, jsd, reverse_kl,
                          soft_kl)

__all__ = ["linear_distillation_loss"]


def _per_token(student_logits, teacher_logits, labels, temperature, beta, divergence):
    """``(divergence, cross-entropy)`` per token, ``[c]`` each (no validation: hot path)."""
    if divergence == "kl":
        div = soft_kl(student_logits, teacher_logits, temperature)
    elif divergence == "reverse_kl":
        div = reverse_kl(student_logits, teacher_logits, temperature)
    else:
        div = jsd(student_logits, teacher_logits, temperature, beta)
    log_q = jax.nn.log_softmax(student_logits, axis=-1)
    ce = -jnp.sum(jax.nn.one_hot(labels, student_logits.shape[-1], dtype=log_q.dtype) * log_q, axis=-1)
    return div, ce


def _chunk_sums(h, kernel, bias, teacher, t_layer, labels, where, hyper, config):
    """Masked sums of the divergence and the cross-entropy over one chunk of tokens;
    ``teacher`` is the chunk's logits, or its hidden states for ``t_layer = (kernel, bias)``."""
    divergence, teacher_is_hidden = config
    temperature, _, beta = hyper
    logits = h @ kernel
    if bias is not None:
        logits = logits + bias[None, :]
    if teacher_is_hidden:
        t_kernel, t_bias = t_layer
        t_logits = teacher @ t_kernel
        if t_bias is not None:
            t_logits = t_logits + t_bias[None, :]
    else:
        t_logits = teacher
    div, ce = _per_token(logits, jax.lax.stop_gradient(t_logits), labels, temperature, beta, divergence)
    return jnp.sum(jnp.where(where, div, 0.0)), jnp.sum(jnp.where(where, ce, 0.0))


def _total(div_sum, ce_sum, count, hyper):
    temperature, alpha, _ = hyper
    norm = jnp.maximum(count, 1).astype(div_sum.dtype)
    return alpha * temperature**2 * div_sum / norm + (1 - alpha) * ce_sum / norm


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _fused(h, kernel, bias, teacher, t_layer, labels, where, hyper, config):
    """h/teacher/labels/where chunked: ``[chunks, c, ...]``; returns the scalar loss."""
    def body(sums, chunk):
        h_c, t_c, y_c, w_c = chunk
        d, c = _chunk_sums(h_c, kernel, bias, t_c, t_layer, y_c, w_c, hyper, config)
        return (sums[0] + d, sums[1] + c), None

    zero = jnp.zeros((), h.dtype)
    (div_sum, ce_sum), _ = jax.lax.scan(body, (zero, zero), (h, teacher, labels, where))
    return _total(div_sum, ce_sum, jnp.sum(where), hyper)


def _fused_fwd(h, kernel, bias, teacher, t_layer, labels, where, hyper, config):
    temperature, alpha, _ = hyper
    norm = jnp.maximum(jnp.sum(where), 1).astype(h.dtype)
    weights = (alpha * temperature**2 / norm, (1 - alpha) / norm)  # d loss / d (div_sum, ce_sum)

    def body(carry, chunk):
        sums, g_kernel, g_bias = carry
        h_c, t_c, y_c, w_c = chunk
        (d, c), vjp = jax.vjp(lambda a, k, b: _chunk_sums(a, k, b, t_c, t_layer, y_c, w_c, hyper, config),
                              h_c, kernel, bias)
        g_h, g_k, g_b = vjp(tuple(jnp.asarray(w, d.dtype) for w in weights))
        g_bias = None if bias is None else g_bias + g_b
        return ((sums[0] + d, sums[1] + c), g_kernel + g_k, g_bias), g_h

    zero = jnp.zeros((), h.dtype)
    init = ((zero, zero), jnp.zeros_like(kernel), None if bias is None else jnp.zeros_like(bias))
    ((div_sum, ce_sum), g_kernel, g_bias), g_h = jax.lax.scan(body, init, (h, teacher, labels, where))
    value = _total(div_sum, ce_sum, jnp.sum(where), hyper)
    return value, (g_h, g_kernel, g_bias)


def _fused_bwd(config, residuals, cotangent):
    g_h, g_kernel, g_bias = residuals
    scale = lambda g: None if g is None else cotangent * g
    return scale(g_h), scale(g_kernel), scale(g_bias), None, None, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _check_float(name, x, ndim=None):
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputTypeError(f"{name}: expected a floating-point array, got {getattr(x, 'dtype', type(x).__name__)}")
    if ndim is not None and x.ndim != ndim:
        raise InputError(f"{name}: expected {ndim}-D, got shape {tuple(x.shape)}")


def _chunked(x, chunk: int, chunks: int, pad_value=0):
    """``[N, ...]`` -> ``[chunks, chunk, ...]``, padded; chunk j holds tokens j, j + chunks, ...
    (strided, so rows sharded over a mesh's "data" axis stay split within each chunk)."""
    pad = chunk * chunks - x.shape[0]
    if pad:
        x = jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), pad_value, x.dtype)])
    return x.reshape(chunk, chunks, *x.shape[1:]).swapaxes(0, 1)


def linear_distillation_loss(student_hidden, student_kernel, labels, *, student_bias=None, teacher_logits=None,
                             teacher_hidden=None, teacher_kernel=None, teacher_bias=None, temperature, alpha,
                             where=None, divergence="kl", beta=0.5, chunk_size=256):
    r"""``distillation_loss(student_hidden @ student_kernel + student_bias, teacher logits,
    labels, temperature, alpha, where=where, divergence=divergence, beta=beta)``, value and
    gradients, without a ``[tokens, vocab]`` array for the student.

    .. math::
        L = \alpha\, T^2\, \overline{D(h W + b, t)} + (1 - \alpha)\, \overline{\mathrm{CE}(h W + b, y)}

    (means over the tokens ``where`` selects, or all). The teacher is either its logits
    ``[..., vocab]`` or, with no ``[tokens, vocab]`` array at all, its hidden states and
    output layer (``teacher_hidden @ teacher_kernel + teacher_bias``); it carries no
    gradient. Differentiable in ``student_hidden``, ``student_kernel`` and
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
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise InputError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    if (teacher_logits is None) == (teacher_hidden is None and teacher_kernel is None):
        raise InputError("teacher: expected either teacher_logits or teacher_hidden with teacher_kernel, got "
                         + ("both" if teacher_logits is not None else "neither"))
    if divergence not in DIVERGENCES:
        raise InputError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
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
    if not hasattr(labels, "dtype") or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise InputTypeError(f"labels: expected integer class indices, got {getattr(labels, 'dtype', type(labels))}")
    if tuple(labels.shape) != positions:
        raise InputError(f"labels: expected shape {positions} (the hidden states without the hidden axis), "
                         f"got {tuple(labels.shape)}")
    check_where(where, positions)
    n = math.prod(positions)
    if n == 0:
        raise InputError(f"student_hidden: expected at least one token, got shape {tuple(student_hidden.shape)}")
    if teacher_logits is not None:
        _check_float("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != positions + (vocab,):
            raise InputError(f"teacher_logits: expected shape {positions + (vocab,)}, got {tuple(teacher_logits.shape)}")
        teacher_is_hidden = False
    else:
        if teacher_hidden is None or teacher_kernel is None:
            raise InputError("teacher: expected teacher_hidden and teacher_kernel together, got one of them")
        _check_float("teacher_hidden", teacher_hidden)
        _check_float("teacher_kernel", teacher_kernel, 2)
        if tuple(teacher_hidden.shape[:-1]) != positions or teacher_kernel.shape != (teacher_hidden.shape[-1], vocab):
            raise InputError(f"teacher_hidden / teacher_kernel: expected {positions + ('hidden',)} and "
                             f"[hidden, {vocab}], got {tuple(teacher_hidden.shape)} and {tuple(teacher_kernel.shape)}")
        teacher_is_hidden = True

    chunk = min(int(chunk_size), n)
    chunks = -(-n // chunk)
    flat = lambda x: x.reshape(n, *x.shape[len(positions):])
    h = _chunked(flat(student_hidden), chunk, chunks)
    y = _chunked(flat(labels), chunk, chunks)
    w = _chunked(jnp.ones((n,), bool) if where is None else flat(where), chunk, chunks, False)
    teacher = _chunked(flat(teacher_hidden if teacher_is_hidden else teacher_logits), chunk, chunks)
    t_layer = (teacher_kernel, teacher_bias) if teacher_is_hidden else None
    dtype = student_hidden.dtype
    hyper = tuple(jnp.asarray(v, dtype) for v in (temperature, alpha, beta))
    return _fused(h, student_kernel, student_bias, teacher, t_layer, y, w, hyper, (divergence, teacher_is_hidden))
