"""TRL's options of the generalised-JSD distillation loss, as keyword options of one function.

* ``scale_logits(logits, logit_scale, final_logit_softcapping)``: Cohere-style
  ``logit_scale`` then Gemma-style soft-capping, what TRL 1.16's ``DistillationTrainer``
  applies to each model's logits inside its divergence (``trl/kernels/chunked_logprob.py``
  ``_torch_transform``, read from each model's config).
* ``gkd_loss(student_logits, teacher_logits, *, where, beta, temperature, reduction,
  num_items_in_batch, logit_scale, final_logit_softcapping)``: the generalised JSD
  (``kdjax.losses.jsd``) reduced as TRL reduces it: ``trl/experimental/gkd/gkd_trainer.py``
  ``GKDTrainer.generalized_jsd_loss(reduction="batchmean" | "sum" | "mean",
  num_items_in_batch=)`` and ``trl/trainer/distillation_trainer.py``
  ``_chunked_divergence_loss`` (the masked sum over the valid tokens divided by their count, or
  by ``num_items_in_batch`` when given: gradient accumulation's global token count).

Both TRL functions mix ``M = beta P + (1 - beta) Q`` (P the teacher, Q the student), with
``beta = 0`` the forward KL(P‖Q) and ``beta = 1`` the reverse KL(Q‖P), as ``jsd``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from kdjax.errors import InputError, InputTypeError
from kdjax.losses.dense import (_check_pair, _concrete_scalar, check_beta, check_temperature, check_where, jsd)

__all__ = ["REDUCTIONS", "scale_logits", "gkd_loss"]

REDUCTIONS = ("batchmean", "sum", "mean")


def _number(name: str, value, *, positive: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "dtype"):
        raise InputTypeError(f"{name}: expected a number, got {type(value).__name__}")
    v = _concrete_scalar(name, value)
    if v is not None and not (math.isfinite(v) and (v > 0 or not positive)):
        raise InputError(f"{name}: expected a finite number{' > 0' if positive else ''}, got {v}")


def scale_logits(logits, logit_scale=1.0, final_logit_softcapping=None):
    r"""Logits as TRL's ``DistillationTrainer`` feeds them to its divergence
    (``trl/kernels/chunked_logprob.py`` ``_torch_transform``, before the temperature):

    .. math:: z' = a z, \quad\text{then}\quad z'' = c \tanh(z' / c) \text{ if } c \text{ is set}

    Args:
      logits: ``[..., vocab]`` floating.
      logit_scale: ``a``, a finite number (a model config's ``logit_scale``; 1: unscaled).
      final_logit_softcapping: ``c``: None (no cap) or a finite number > 0 (Gemma's config).

    Returns:
      The transformed logits, same shape and dtype.

    Raises:
      InputError / InputTypeError: ``logit_scale`` or ``final_logit_softcapping`` not a
        number, not finite, or a cap <= 0 (when concrete).
    """
    _number("logit_scale", logit_scale, positive=False)
    if final_logit_softcapping is not None:
        _number("final_logit_softcapping", final_logit_softcapping, positive=True)
    if not (isinstance(logit_scale, (int, float)) and logit_scale == 1.0):
        logits = logits * logit_scale
    if final_logit_softcapping is not None:
        logits = final_logit_softcapping * jnp.tanh(logits / final_logit_softcapping)
    return logits


def _per_side(name: str, value):
    """A number (or None) for both models, or a ``(student, teacher)`` pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise InputError(f"{name}: expected one value or a (student, teacher) pair, got {len(value)} values")
        return tuple(value)
    return value, value


def gkd_loss(student_logits, teacher_logits, *, where=None, beta=0.5, temperature=1.0, reduction="batchmean",
             num_items_in_batch=None, logit_scale=1.0, final_logit_softcapping=None):
    r"""The generalised JSD between teacher and student, reduced as TRL reduces it.

    .. math:: D_n = \beta\,\mathrm{KL}(P_n \| M_n) + (1 - \beta)\,\mathrm{KL}(Q_n \| M_n),
              \quad M = \beta P + (1 - \beta) Q,

    with :math:`P = \mathrm{softmax}(g_t(t) / T)`, :math:`Q = \mathrm{softmax}(g_s(s) / T)`,
    :math:`g` = ``scale_logits`` with each side's ``logit_scale`` and
    ``final_logit_softcapping``; ``beta = 0`` is KL(P‖Q), ``beta = 1`` KL(Q‖P) (``jsd``). Over
    the positions ``where`` selects (:math:`N` of them; all without ``where``):

    * ``num_items_in_batch`` given: :math:`\sum_n D_n / \mathrm{num\_items\_in\_batch}` (it
      overrides ``reduction``, as in both TRL functions);
    * ``"batchmean"``: :math:`\sum_n D_n / \max(N, 1)` with ``where``; without it
      :math:`\sum_n D_n / \mathrm{batch}` (TRL divides by ``jsd.size(0)``, the leading axis);
    * ``"sum"``: :math:`\sum_n D_n`;
    * ``"mean"``: :math:`\sum_n D_n / (N \cdot \mathrm{vocab})` (TRL's ``jsd.mean()`` over the
      ``[N, vocab]`` elements; 0 where TRL gives NaN for :math:`N = 0`).

    ``where=labels != -100`` gives ``GKDTrainer.generalized_jsd_loss(s, t, labels, beta, T,
    reduction, num_items_in_batch)``; ``where=completion_mask`` with the logit options gives
    ``DistillationTrainer``'s ``_chunked_divergence_loss``. No :math:`T^2`.

    Args:
      student_logits: ``[..., vocab]`` floating.
      teacher_logits: the same shape, finite (checked when concrete); no gradient.
      where: None or bool ``[...]``.
      beta: in [0, 1].
      temperature: finite, > 0.
      reduction: one of ``REDUCTIONS``.
      num_items_in_batch: None or a finite number > 0 (may be traced).
      logit_scale: a number, or a ``(student, teacher)`` pair.
      final_logit_softcapping: None, a number > 0, or a ``(student, teacher)`` pair of those.

    Returns:
      A scalar.

    Raises:
      InputError / InputTypeError: shapes, ``where``, ``reduction``, and (when concrete)
        ``beta``, ``temperature``, ``num_items_in_batch``, the logit options out of range.
    """
    if reduction not in REDUCTIONS:
        raise InputError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    _check_pair(student_logits, teacher_logits)
    check_where(where, student_logits.shape[:-1])
    check_beta(beta)
    check_temperature(temperature)
    if num_items_in_batch is not None:
        _number("num_items_in_batch", num_items_in_batch, positive=True)
    (s_scale, t_scale), (s_cap, t_cap) = _per_side("logit_scale", logit_scale), _per_side(
        "final_logit_softcapping", final_logit_softcapping)
    s = scale_logits(student_logits, s_scale, s_cap)
    t = scale_logits(teacher_logits, t_scale, t_cap)
    per_position = jsd(s, t, temperature, beta)
    total = jnp.sum(per_position if where is None else jnp.where(where, per_position, 0.0))
    if num_items_in_batch is not None:
        return total / jnp.asarray(num_items_in_batch, total.dtype)
    if reduction == "sum":
        return total
    count = per_position.size if where is None else jnp.sum(where)
    if reduction == "mean":
        return total / (jnp.maximum(count, 1) * student_logits.shape[-1]).astype(total.dtype)
    if where is None:
        return total / max(per_position.shape[0] if per_position.ndim else 1, 1)
    return total / jnp.maximum(count, 1).astype(total.dtype)
