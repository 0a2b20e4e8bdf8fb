"""Sparse losses: KD against a teacher's top-k log-probabilities, per position like ``soft_kl``.

* ``topk_logprobs(teacher_logits, k)``: ``(values, indices)``, the ``k`` largest
  log-probabilities (temperature 1) and their token ids, ``[..., k]``.
* ``topk_kl(student_logits, values, indices, temperature, missing=...)``: the per-position
  KL of the student from the sparse teacher, as DistillKit's ``sparse_kl_div_inner``
  (``distillkit/lossfuncs/kl.py``, with ``get_target_logprobs`` of ``lossfuncs/common.py``).
* ``topk_jsd``, ``topk_tvd``: the Jensen-Shannon divergence and the total variation
  distance likewise, as DistillKit's ``sparse_js_div`` and ``sparse_tvd``; the ranking
  losses ``topk_hinge`` and ``topk_logistic_ranking`` are in ``kdjax.losses.ranking``.
* ``topk_distillation_loss``: ``alpha T^2 mean(topk_<loss>) + (1 - alpha) mean(CE)``.

``renormalize=True`` (``topk_kl``, ``topk_distillation_loss``): tunix's top-k KL
(``LogitStrategy(distill_top_k=k)``), the student's softmax renormalised over the teacher's k
ids, where DistillKit (and the default) gathers the full-vocabulary softmax.

A cache may hold log-probabilities computed at a temperature other than 1
(``generation_temperature``): DistillKit's ``get_target_logprobs`` brings them to T by
raising the probabilities to the power ``T_gen / T`` and renormalising (these functions do
the same).

The teacher's mass outside its top k (``missing``): ``"zero"`` renormalises the k
log-probabilities (at temperature T) to sum to 1, and the student's mass outside them does
not count; ``"symmetric_uniform"`` keeps the teacher's leftover mass as a (k+1)-th outcome,
"every other token", matched against the student's leftover mass. At ``k = vocab`` both
equal the dense ``soft_kl`` (tested), "symmetric_uniform" only at T = 1: away from it,
DistillKit's formula raises the leftover ``1 - sum(p)`` to the power 1/T, which turns the
float32 rounding left at ``k = vocab`` (~1e-7) into ~1e-3 (kept, for parity).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError, check_count
from kdjax.losses.dense import _hard_ce, check_alpha, check_labels, check_temperature, check_where, masked_mean
from kdjax.losses.ranking import topk_hinge, topk_logistic_ranking
from kdjax.losses.topk_checks import _check_topk_ids, _check_topk_logprobs, _traced, check_topk

__all__ = ["MISSING", "SPARSE_LOSSES", "topk_logprobs", "topk_kl", "topk_jsd", "topk_tvd", "topk_distillation_loss"]

MISSING = ("zero", "symmetric_uniform")


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


def _target_logprobs(values, temperature, missing, generation_temperature=1.0):
    """DistillKit's ``get_target_logprobs`` for log-probability inputs generated at
    ``generation_temperature``: ``a log p_i - log Z`` with ``a = T_gen / T``."""
    a = generation_temperature / temperature
    scaled = a * values
    alpha_lse = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    if missing == "zero":
        return scaled - alpha_lse
    leftover = jnp.clip(1.0 - jnp.exp(jax.nn.logsumexp(values, axis=-1, keepdims=True)), 0.0, 1.0)
    # log(exp(alpha_lse) + leftover ** a), in log space: at a small T both terms underflow
    return scaled - jnp.logaddexp(alpha_lse, a * jnp.log(leftover))


def _check_number(name: str, value, lo: float, hi: float) -> None:
    if _traced(value):
        return
    try:
        v = float(np.asarray(value))
    except (TypeError, ValueError):
        raise InputTypeError(f"{name}: expected a number in ({lo:g}, {hi:g}), got {value!r}") from None
    if not lo < v < hi:
        raise InputError(f"{name}: expected a number in ({lo:g}, {hi:g}), got {v}")


def _sparse_logprobs(student_logits, values, indices, temperature, missing, eps, generation_temperature,
                     renormalize=False):
    """Checked inputs -> (the student's log-probabilities at the k ids, the teacher's target
    log-probabilities, no gradient), both at temperature T in at least float32 (DistillKit's
    ``get_logprobs``; with ``renormalize``, the student's softmax over the k ids only)."""
    if missing not in MISSING:
        raise InputError(f"missing: expected one of {MISSING}, got {missing!r}")
    if not isinstance(renormalize, (bool, np.bool_)):
        raise InputTypeError(f"renormalize: expected True or False, got {renormalize!r}")
    if renormalize and missing != "zero":
        raise InputError(f"renormalize=True: expected missing='zero' (the student has no mass outside the k ids to "
                         f"match), got missing={missing!r}")
    check_topk(student_logits, values, indices)
    check_temperature(temperature)
    check_temperature(generation_temperature, "generation_temperature")
    _check_number("eps", eps, 0.0, 1.0)
    wide = jnp.promote_types(student_logits.dtype, jnp.float32)  # DistillKit: float32 for half-precision logits
    s = student_logits.astype(wide) / temperature
    gathered = jnp.take_along_axis(s, indices, axis=-1)
    student = gathered - jax.nn.logsumexp(gathered if renormalize else s, axis=-1, keepdims=True)
    target = _target_logprobs(values.astype(wide), temperature, missing, generation_temperature)
    return student, jax.lax.stop_gradient(target)


def topk_kl(student_logits, values, indices, temperature=1.0, *, missing: str = "zero", eps: float = 1e-6,
            generation_temperature=1.0, renormalize: bool = False):
    r"""Per-position KL of the student from the sparse teacher, as DistillKit's
    ``sparse_kl_div_inner`` (``distillkit/lossfuncs/kl.py``):

    .. math:: \sum_{i \in \mathrm{top}k} p_i (\log p_i - \log q_i) \;[+\; p_m (\log p_m - \log q_m)]

    with :math:`q = \mathrm{softmax}(s / T)` over the whole vocabulary gathered at the k ids,
    :math:`p` the teacher's k log-probabilities brought to temperature T (renormalised over
    the k for ``missing="zero"``; for ``"symmetric_uniform"`` with the leftover mass
    :math:`p_m = 1 - \sum p_i` as one more outcome, against the student's
    :math:`q_m = 1 - \sum q_i`, counted where :math:`p_m > \epsilon`). Not multiplied by
    :math:`T^2`. The teacher side carries no gradient.

    With ``renormalize=True``, tunix's ``LogitStrategy(distill_top_k=k)``
    (``tunix/distillation/strategies/logit.py``): the student's softmax is taken over its logits
    at the k ids alone, :math:`q_i = \exp(s_i / T) / \sum_{j \in \mathrm{top}k} \exp(s_j / T)`,
    so that both sides are distributions over the k ids (``missing="zero"`` only).

    Args:
        student_logits: ``[..., V]`` floating point.
        values: ``[..., k]`` the teacher's log-probabilities at ``generation_temperature``
            (``topk_logprobs`` or ``read_topk_cache``): finite, ``<= 0``, their
            probabilities summing to at most 1.
        indices: ``[..., k]`` integer, their distinct token ids in ``[0, V)``.
        temperature: finite, ``> 0``.
        missing: ``"zero"`` or ``"symmetric_uniform"`` (the module docstring).
        eps: in ``(0, 1)``.
        generation_temperature: the temperature ``values`` were computed at (a cache's
            property; 1 for ``topk_logprobs``).
        renormalize: False (DistillKit's: the student's full-vocabulary softmax) or True
            (tunix's: renormalised over the k ids).

    Returns:
        ``[...]``, per position, in ``student_logits``' dtype.

    Raises:
        InputError / InputTypeError: shapes, dtypes, ``missing``, ``renormalize`` not a bool or
            with ``missing="symmetric_uniform"``; and, for concrete arrays
            and numbers only, ``temperature``, ``eps``, ids out of ``[0, V)`` or repeated at a
            position, values NaN, infinite, positive or whose probabilities sum past 1.

    Under ``jit`` (traced ``values``/``indices``/``temperature``) the value checks cannot
    run and nothing is checked on the device: an id ``>= V`` or ``< -V`` gives NaN, a
    negative id ``>= -V`` counts from the end of the vocabulary (NumPy's rule), a NaN or
    infinite value gives NaN, and positive or repeated values give a finite but meaningless
    number. Check arrays where they enter (``read_topk_cache`` checks every shard), or call
    once outside ``jit``.
    """
    student, target = _sparse_logprobs(student_logits, values, indices, temperature, missing, eps,
                                       generation_temperature, renormalize)
    kl = jnp.sum(jnp.exp(target) * (target - student), axis=-1)
    if missing == "symmetric_uniform":
        log_t, log_s = _log_missing(target, eps), _log_missing(student, eps)
        p_m = jnp.exp(log_t)
        kl = kl + jnp.where(p_m > eps, p_m * (log_t - log_s), 0.0)
    return kl.astype(student_logits.dtype)


def topk_jsd(student_logits, values, indices, temperature=1.0, *, missing: str = "zero", eps: float = 1e-8,
             generation_temperature=1.0):
    r"""Per-position Jensen-Shannon divergence between the sparse teacher and the student, as
    DistillKit's ``sparse_jsd_inner`` (``distillkit/lossfuncs/jsd.py``):

    .. math:: \tfrac12 \big[\sum_i p_i \log \tfrac{p_i}{m_i} + \sum_i q_i \log \tfrac{q_i}{m_i}\big],
       \quad m_i = \tfrac12 (p_i + q_i)

    over the k ids (terms where :math:`p_i` or :math:`q_i \le \epsilon` dropped, :math:`m`
    clamped at :math:`\epsilon`), plus, for ``missing="zero"``, the student's mass outside
    them times :math:`\log 2` (there :math:`p = 0`), or, for ``"symmetric_uniform"``, the
    leftover masses :math:`1 - \sum p_i`, :math:`1 - \sum q_i` (clamped to
    :math:`[\epsilon, 1 - \epsilon]`) as one more outcome. Not multiplied by :math:`T^2`.

    Args:
        student_logits, values, indices, temperature, missing, eps, generation_temperature: as
            ``topk_kl`` (``eps``: the threshold and clamp above).

    Returns and Raises: as ``topk_kl``'s.
    """
    student, target = _sparse_logprobs(student_logits, values, indices, temperature, missing, eps,
                                       generation_temperature)
    p, q = jnp.exp(target), jnp.exp(student)
    log_m = jnp.log(jnp.maximum(0.5 * (p + q), eps))
    kl_pm = jnp.sum(jnp.where(p > eps, p * (target - log_m), 0.0), axis=-1)
    kl_qm = jnp.sum(jnp.where(q > eps, q * (student - log_m), 0.0), axis=-1)
    if missing == "symmetric_uniform":
        log_pm = jnp.log1p(-jnp.clip(p.sum(-1), eps, 1.0 - eps))
        log_qm = jnp.log1p(-jnp.clip(q.sum(-1), eps, 1.0 - eps))
        p_m, q_m = jnp.exp(log_pm), jnp.exp(log_qm)
        log_mm = jnp.log(jnp.maximum(0.5 * (p_m + q_m), eps))
        kl_pm = kl_pm + jnp.where(p_m > eps, p_m * (log_pm - log_mm), 0.0)
        kl_qm = kl_qm + jnp.where(q_m > eps, q_m * (log_qm - log_mm), 0.0)
    else:
        kl_qm = kl_qm + jnp.maximum(1.0 - q.sum(-1), 0.0) * math.log(2.0)
    return (0.5 * (kl_pm + kl_qm)).astype(student_logits.dtype)


def topk_tvd(student_logits, values, indices, temperature=1.0, *, missing: str = "zero", eps: float = 1e-8,
             generation_temperature=1.0):
    r"""Per-position total variation distance between the sparse teacher and the student, as
    DistillKit's ``sparse_tvd_inner`` (``distillkit/lossfuncs/tvd.py``):

    .. math:: \tfrac12 \big[\sum_i |p_i - q_i| + |p_m - q_m|\big]

    over the k ids, with :math:`p_m = 0` for ``missing="zero"`` (the student's mass outside
    the k counts whole) or the leftover masses :math:`1 - \sum p_i`, :math:`1 - \sum q_i`
    (clamped to :math:`[0, 1]`) for ``"symmetric_uniform"``. Not multiplied by :math:`T^2`
    (DistillKit's ``TVDLoss`` does that).

    Args:
        student_logits, values, indices, temperature, missing, generation_temperature: as
            ``topk_kl``.
        eps: checked as ``topk_kl``'s, otherwise unused (DistillKit's signature).

    Returns and Raises: as ``topk_kl``'s.
    """
    student, target = _sparse_logprobs(student_logits, values, indices, temperature, missing, eps,
                                       generation_temperature)
    p, q = jnp.exp(target), jnp.exp(student)
    q_out = jnp.clip(1.0 - q.sum(-1), 0.0, 1.0 if missing == "symmetric_uniform" else None)
    p_out = jnp.clip(1.0 - p.sum(-1), 0.0, 1.0) if missing == "symmetric_uniform" else 0.0
    tvd = 0.5 * (jnp.sum(jnp.abs(p - q), axis=-1) + jnp.abs(p_out - q_out))
    return tvd.astype(student_logits.dtype)


SPARSE_LOSSES = ("kl", "jsd", "tvd", "hinge", "logistic_ranking")


def topk_distillation_loss(student_logits, values, indices, labels, temperature=2.0, alpha=0.5, *, where=None,
                           missing: str = "zero", loss: str = "kl", generation_temperature=1.0,
                           renormalize: bool = False):
    """``alpha T^2 mean(topk_<loss>) + (1 - alpha) mean(CE)`` over every position, or those
    ``where`` selects (``distillation_loss`` with the sparse teacher); for the ranking losses
    ``alpha * topk_hinge / topk_logistic_ranking + (1 - alpha) mean(CE)`` (no temperature).

    Args:
        student_logits: ``[..., V]`` floating point.
        values, indices: ``[..., k]``, as ``topk_kl`` takes them.
        labels: integer ``[...]`` in ``[0, V)`` where ``where`` holds.
        temperature: finite, ``> 0``.
        alpha: in ``[0, 1]``.
        where: None or bool ``[...]``.
        missing: ``"zero"`` or ``"symmetric_uniform"`` (the divergences only).
        loss: one of ``SPARSE_LOSSES``: ``topk_kl``, ``topk_jsd``, ``topk_tvd``,
            ``kdjax.losses.topk_hinge``, ``topk_logistic_ranking``.
        generation_temperature: the temperature ``values`` were computed at.
        renormalize: ``topk_kl``'s (``loss="kl"`` only): True is tunix's
            ``LogitStrategy(T, alpha, distill_top_k=k)`` given the teacher's top-k and real
            labels everywhere (no ``where``).

    Returns:
        The scalar loss.

    Raises:
        InputError / InputTypeError: as ``topk_kl`` (value checks on concrete arrays only;
            under ``jit`` see ``topk_kl``), and for ``alpha``, ``labels``, ``where``, ``loss``,
            ``renormalize`` with another loss than ``"kl"``.
    """
    if loss not in SPARSE_LOSSES:
        raise InputError(f"loss: expected one of {SPARSE_LOSSES}, got {loss!r}")
    if renormalize is not False and loss != "kl":
        raise InputError(f"renormalize: expected False with loss={loss!r} (tunix's renormalised top-k is a KL), "
                         f"got {renormalize!r}")
    check_alpha(alpha)
    check_where(where, student_logits.shape[:-1])
    check_labels(labels, student_logits.shape, where)
    hard = masked_mean(_hard_ce(student_logits, labels), where)
    if loss in ("hinge", "logistic_ranking"):
        rank = topk_hinge if loss == "hinge" else topk_logistic_ranking
        return alpha * rank(student_logits, values, indices, where=where).astype(hard.dtype) + (1 - alpha) * hard
    divergence = {"kl": topk_kl, "jsd": topk_jsd, "tvd": topk_tvd}[loss]
    options = {"renormalize": renormalize} if loss == "kl" else {}
    soft = masked_mean(divergence(student_logits, values, indices, temperature, missing=missing,
                                  generation_temperature=generation_temperature, **options), where)
    return alpha * temperature ** 2 * soft + (1 - alpha) * hard
