"""Sparse losses: KD against a teacher's top-k log-probabilities, per position like ``soft_kl``.

* ``topk_logprobs(teacher_logits, k)``: ``(values, indices)``, the ``k`` largest
  log-probabilities (temperature 1) and their token ids, ``[..., k]``.
* ``topk_kl(student_logits, values, indices, temperature, missing=...)``: the per-position
  KL of the student from the sparse teacher, as DistillKit's ``sparse_kl_div_inner``
  (``distillkit/lossfuncs/kl.py``, with ``get_target_logprobs`` of ``lossfuncs/common.py``).
* ``topk_distillation_loss``: ``alpha T^2 mean(topk_kl) + (1 - alpha) mean(CE)``.

The teacher's mass outside its top k (``missing``): ``"zero"`` renormalises the k
log-probabilities (at temperature T) to sum to 1, and the student's mass outside them does
not count; ``"symmetric_uniform"`` keeps the teacher's leftover mass as a (k+1)-th outcome,
"every other token", matched against the student's leftover mass. At ``k = vocab`` both
equal the dense ``soft_kl`` (tested), "symmetric_uniform" only at T = 1: away from it,
DistillKit's formula raises the leftover ``1 - sum(p)`` to the power 1/T, which turns the
float32 rounding left at ``k = vocab`` (~1e-7) into ~1e-3 (kept, for parity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError, check_count
from kdjax.losses.dense import _hard_ce, check_alpha, check_labels, check_temperature, check_where, masked_mean

__all__ = ["MISSING", "topk_logprobs", "topk_kl", "topk_distillation_loss"]

MISSING = ("zero", "symmetric_uniform")
_LOGPROB_SLACK = 1e-5  # how far above 0 a stored "log-probability" may round


def _traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def topk_logprobs(teacher_logits, k: int):
    """The ``k`` largest teacher log-probabilities per position and their token ids.

    Args:
        teacher_logits: ``[..., vocab]`` floating point, finite (checked when concrete;
            under ``jit`` a NaN or infinite logit gives NaN values at its position).
        k: ``1 <= k <= vocab``.

    Returns:
        ``(values, indices)``: ``log_softmax(teacher_logits)`` (in at least float32) at its
        ``k`` largest entries, largest first, and their ids (int32), both ``[..., k]``.

    Raises:
        InputError / InputTypeError: ``k`` out of range; non-finite concrete logits.
    """
    check_count("k", k)
    if k > teacher_logits.shape[-1]:
        raise InputError(f"k: expected at most the vocabulary ({teacher_logits.shape[-1]}), got {k}")
    if not _traced(teacher_logits) and not np.isfinite(np.asarray(teacher_logits)).all():
        raise InputError("teacher_logits: expected finite logits, got NaN or infinite ones")
    wide = jnp.promote_types(teacher_logits.dtype, jnp.float32)
    values, indices = jax.lax.top_k(jax.nn.log_softmax(teacher_logits.astype(wide), axis=-1), k)
    return values, indices.astype(jnp.int32)


def _log1mexp(x):
    # log(1 - exp(x)) for x < 0, stably on both sides of -1 (DistillKit's log1mexp)
    return jnp.where(x > -1.0, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(jnp.minimum(x, -1.0))))


def _log_missing(logprobs, eps):
    return _log1mexp(jnp.minimum(jax.nn.logsumexp(logprobs, axis=-1), -eps))


def _target_logprobs(values, temperature, missing):
    """DistillKit's ``get_target_logprobs`` for log-probability inputs generated at T = 1."""
    a = 1.0 / temperature
    scaled = a * values
    alpha_lse = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    if missing == "zero":
        return scaled - alpha_lse
    leftover = jnp.clip(1.0 - jnp.exp(jax.nn.logsumexp(values, axis=-1, keepdims=True)), 0.0, 1.0)
    # log(exp(alpha_lse) + leftover ** a), in log space: at a small T both terms underflow
    return scaled - jnp.logaddexp(alpha_lse, a * jnp.log(leftover))


def topk_kl(student_logits, values, indices, temperature=1.0, *, missing: str = "zero", eps: float = 1e-6):
    r"""Per-position KL of the student from the sparse teacher, as DistillKit's
    ``sparse_kl_div_inner`` (log-probability targets generated at temperature 1):

    .. math:: \sum_{i \in \mathrm{top}k} p_i (\log p_i - \log q_i) \;[+\; p_m (\log p_m - \log q_m)]

    with :math:`q = \mathrm{softmax}(s / T)` over the whole vocabulary gathered at the k ids,
    :math:`p` the teacher's k log-probabilities at temperature T (renormalised over the k
    for ``missing="zero"``; for ``"symmetric_uniform"`` with the leftover mass
    :math:`p_m = 1 - \sum p_i` as one more outcome, against the student's
    :math:`q_m = 1 - \sum q_i`, counted where :math:`p_m > \epsilon`). Not multiplied by
    :math:`T^2`. The teacher side carries no gradient.

    Args:
        student_logits: ``[..., V]`` floating point.
        values: ``[..., k]`` the teacher's log-probabilities at temperature 1 (``topk_logprobs``
            or ``read_topk_cache``): finite, ``<= 0``, their probabilities summing to at most 1.
        indices: ``[..., k]`` integer, their distinct token ids in ``[0, V)``.
        temperature: finite, ``> 0``.
        missing: ``"zero"`` or ``"symmetric_uniform"`` (the module docstring).
        eps: in ``(0, 1)``: the leftover mass counted by ``"symmetric_uniform"``.

    Returns:
        ``[...]``, the KL per position, in ``student_logits``' dtype.

    Raises:
        InputError / InputTypeError: shapes, dtypes, ``missing``; and, for concrete arrays
            and numbers only, ``temperature``, ``eps``, ids out of ``[0, V)`` or repeated at a
            position, values NaN, infinite, positive or whose probabilities sum past 1.

    Under ``jit`` (traced ``values``/``indices``/``temperature``) the value checks cannot
    run and nothing is checked on the device: an id ``>= V`` or ``< -V`` gives NaN, a
    negative id ``>= -V`` counts from the end of the vocabulary (NumPy's rule), a NaN or
    infinite value gives NaN, and positive or repeated values give a finite but meaningless
    number. Check arrays where they enter (``read_topk_cache`` checks every shard), or call
    once outside ``jit``.
    """
    if missing not in MISSING:
        raise InputError(f"missing: expected one of {MISSING}, got {missing!r}")
    for name, x in (("student_logits", student_logits), ("values", values), ("indices", indices)):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")) or len(x.shape) < 1:
            raise InputTypeError(f"{name}: expected an array [..., {'V' if name == 'student_logits' else 'k'}], "
                                 f"got {type(x).__name__} {getattr(x, 'shape', '')}")
    if not jnp.issubdtype(student_logits.dtype, jnp.floating):
        raise InputTypeError(f"student_logits: expected floating point, got {student_logits.dtype}")
    if values.shape != indices.shape or values.shape[:-1] != student_logits.shape[:-1]:
        raise InputError(f"values / indices: expected [..., k] with the student's positions "
                         f"{tuple(student_logits.shape[:-1])}, got {tuple(values.shape)} and {tuple(indices.shape)}")
    vocab = student_logits.shape[-1]
    if not 1 <= values.shape[-1] <= vocab:
        raise InputError(f"values / indices: expected k in [1, {vocab}] (the student's vocabulary), got "
                         f"k = {values.shape[-1]}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise InputTypeError(f"indices: expected integer token ids, got {indices.dtype}")
    if not jnp.issubdtype(values.dtype, jnp.floating):
        raise InputTypeError(f"values: expected floating point log-probabilities, got {values.dtype}")
    check_temperature(temperature)
    if not _traced(eps):
        try:
            e = float(np.asarray(eps))
        except (TypeError, ValueError):
            raise InputTypeError(f"eps: expected a number in (0, 1), got {eps!r}") from None
        if not 0.0 < e < 1.0:
            raise InputError(f"eps: expected a number in (0, 1), got {e}")
    if not _traced(indices):
        _check_topk_ids(indices, vocab)
    if not _traced(values):
        _check_topk_logprobs(values)
    wide = jnp.promote_types(student_logits.dtype, jnp.float32)  # DistillKit: float32 for half-precision logits
    s = student_logits.astype(wide) / temperature
    student = jnp.take_along_axis(s, indices, axis=-1) - jax.nn.logsumexp(s, axis=-1, keepdims=True)
    target = jax.lax.stop_gradient(_target_logprobs(values.astype(wide), temperature, missing))
    p = jnp.exp(target)
    kl = jnp.sum(p * (target - student), axis=-1)
    if missing == "symmetric_uniform":
        log_t, log_s = _log_missing(target, eps), _log_missing(student, eps)
        p_m = jnp.exp(log_t)
        kl = kl + jnp.where(p_m > eps, p_m * (log_t - log_s), 0.0)
    return kl.astype(student_logits.dtype)


def _check_topk_ids(indices, vocab: int, where: str = "") -> None:
    """Refuse concrete top-k ids outside ``[0, vocab)`` or repeated at a position."""
    ids = np.asarray(indices)
    if not ids.size:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise InputError(f"{where}indices: expected token ids in [0, {vocab}), got ids in [{lo}, {hi}]")
    ordered = np.sort(ids, axis=-1)
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise InputError(f"{where}indices: expected k distinct token ids per position, got a position with a "
                         f"repeated id")


def _check_topk_logprobs(values, where: str = "") -> None:
    """Refuse concrete top-k "log-probabilities" that are not: NaN or infinite, positive,
    or whose probabilities sum past 1 (beyond the rounding of their dtype)."""
    v = np.asarray(values)
    if not v.size:
        return
    if v.dtype.itemsize < 4:  # float16 / bfloat16: summed in float32
        v = v.astype(np.float32)
    if not np.isfinite(v).all():
        raise InputError(f"{where}values: expected finite log-probabilities, got {int((~np.isfinite(v)).sum())} "
                         f"NaN or infinite")
    if v.max() > _LOGPROB_SLACK:
        raise InputError(f"{where}values: expected log-probabilities (<= 0), got a maximum of {float(v.max()):g} "
                         f"(logits rather than log_softmax?)")
    p = np.exp(v)
    total = p.sum(axis=-1)
    # each value rounded in its dtype moves the sum by up to eps * sum(p * |log p|)
    eps = max(float(jnp.finfo(np.asarray(values).dtype).eps), float(np.finfo(np.float32).eps))
    slack = _LOGPROB_SLACK + eps * -np.einsum("...k,...k->...", p, v)
    if (total > 1 + slack).any():
        raise InputError(f"{where}values: expected the log-probabilities of k tokens (probabilities summing to at "
                         f"most 1), got a position whose probabilities sum to {float(total.max()):.6g} "
                         f"(shifted logits rather than log_softmax?)")


def topk_distillation_loss(student_logits, values, indices, labels, temperature=2.0, alpha=0.5, *, where=None,
                           missing: str = "zero"):
    """``alpha T^2 mean(topk_kl) + (1 - alpha) mean(CE)`` over every position, or those
    ``where`` selects (``distillation_loss`` with the sparse teacher).

    Args:
        student_logits: ``[..., V]`` floating point.
        values, indices: ``[..., k]``, as ``topk_kl`` takes them.
        labels: integer ``[...]`` in ``[0, V)`` where ``where`` holds.
        temperature: finite, ``> 0``.
        alpha: in ``[0, 1]``.
        where: None or bool ``[...]``.
        missing: ``"zero"`` or ``"symmetric_uniform"``.

    Returns:
        The scalar loss.

    Raises:
        InputError / InputTypeError: as ``topk_kl`` (value checks on concrete arrays only;
            under ``jit`` see ``topk_kl``), and for ``alpha``, ``labels``, ``where``.
    """
    check_alpha(alpha)
    check_where(where, student_logits.shape[:-1])
    check_labels(labels, student_logits.shape, where)
    soft = masked_mean(topk_kl(student_logits, values, indices, temperature, missing=missing), where)
    hard = masked_mean(_hard_ce(student_logits, labels), where)
    return alpha * temperature ** 2 * soft + (1 - alpha) * hard
