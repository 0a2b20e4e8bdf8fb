"""Offline teacher signals: a teacher's top-k log-probabilities per token instead of its full
distribution (what DistillKit and MaxText store to train many students from one teacher run).

* ``topk_logprobs(teacher_logits, k)``: ``(values, indices)``, the ``k`` largest
  log-probabilities (temperature 1) and their token ids, ``[..., k]``.
* ``topk_kl(student_logits, values, indices, temperature, missing=...)``: the per-position
  KL of the student from the sparse teacher, as DistillKit's ``sparse_kl_div_inner``
  (``distillkit/lossfuncs/kl.py``, with ``get_target_logprobs`` of ``lossfuncs/common.py``).
* ``topk_distillation_loss``: ``alpha T^2 mean(topk_kl) + (1 - alpha) mean(CE)``; and
  ``TopKKD``, the train-step objective that reads ``batch["teacher_topk_values"]`` /
  ``["teacher_topk_indices"]``.

The teacher's mass outside its top k (``missing``): ``"zero"`` renormalises the k
log-probabilities (at temperature T) to sum to 1, and the student's mass outside them does
not count; ``"symmetric_uniform"`` keeps the teacher's leftover mass as a (k+1)-th outcome,
"every other token", matched against the student's leftover mass. At ``k = vocab`` both
equal the dense ``soft_kl`` (tested), "symmetric_uniform" only at T = 1: away from it,
DistillKit's formula raises the leftover ``1 - sum(p)`` to the power 1/T, which turns the
float32 rounding left at ``k = vocab`` (~1e-7) into ~1e-3 (kept, for parity).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kdjax.errors import InputError, InputTypeError, check_count
from kdjax.losses import check_alpha, check_labels, check_temperature, check_where, _hard_ce, masked_mean

__all__ = ["MISSING", "topk_logprobs", "topk_kl", "topk_distillation_loss", "TopKKD"]

MISSING = ("zero", "symmetric_uniform")


def topk_logprobs(teacher_logits, k: int):
    """``(values, indices)``: the ``k`` largest ``log_softmax(teacher_logits)`` per position
    (in at least float32) and their ids (int32), ``[..., k]``, largest first."""
    check_count("k", k)
    if k > teacher_logits.shape[-1]:
        raise InputError(f"k: expected at most the vocabulary ({teacher_logits.shape[-1]}), got {k}")
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
    return scaled - jnp.log(jnp.exp(alpha_lse) + leftover ** a)


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
    """
    if missing not in MISSING:
        raise InputError(f"missing: expected one of {MISSING}, got {missing!r}")
    if not jnp.issubdtype(student_logits.dtype, jnp.floating):
        raise InputTypeError(f"student_logits: expected floating point, got {student_logits.dtype}")
    if values.shape != indices.shape or values.shape[:-1] != student_logits.shape[:-1]:
        raise InputError(f"values / indices: expected [..., k] with the student's positions "
                         f"{tuple(student_logits.shape[:-1])}, got {tuple(values.shape)} and {tuple(indices.shape)}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise InputTypeError(f"indices: expected integer token ids, got {indices.dtype}")
    check_temperature(temperature)
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


def topk_distillation_loss(student_logits, values, indices, labels, temperature=2.0, alpha=0.5, *, where=None,
                           missing: str = "zero"):
    """``alpha T^2 mean(topk_kl) + (1 - alpha) mean(CE)`` over every position, or those
    ``where`` selects (``distillation_loss`` with the sparse teacher)."""
    check_alpha(alpha)
    check_where(where, student_logits.shape[:-1])
    check_labels(labels, student_logits.shape, where)
    soft = masked_mean(topk_kl(student_logits, values, indices, temperature, missing=missing), where)
    hard = masked_mean(_hard_ce(student_logits, labels), where)
    return alpha * temperature ** 2 * soft + (1 - alpha) * hard


@dataclasses.dataclass(frozen=True)
class TopKKD:
    """A train-step objective on cached top-k teacher log-probabilities:
    ``make_train_step(student, TopKKD())`` / ``make_run`` with ``batch["teacher_topk_values"]``
    and ``batch["teacher_topk_indices"]`` (``topk_logprobs`` of the teacher, computed once)
    and a ``Hyper`` (temperature, alpha); ``where`` masks as everywhere. (A callable
    objective of ``kdjax.train``: ``loss(logits, batch, teacher_logits, hyper)``.)"""

    missing: str = "zero"

    def __post_init__(self):
        if self.missing not in MISSING:
            raise InputError(f"missing: expected one of {MISSING}, got {self.missing!r}")

    def __call__(self, logits, batch, teacher_logits, hyper):
        if hyper is None:
            raise InputError("hyper: TopKKD needs a Hyper (kdjax.make_hyper), got None")
        for key in ("teacher_topk_values", "teacher_topk_indices"):
            if key not in batch:
                raise InputError(f"TopKKD: expected batch[{key!r}] (kdjax.offline.topk_logprobs of the teacher), "
                                 f"got keys {sorted(batch)}")
        return topk_distillation_loss(logits, batch["teacher_topk_values"], batch["teacher_topk_indices"], batch["y"],
                                      hyper.temperature, hyper.alpha, where=batch.get("where"), missing=self.missing)
