"""Distillation losses, per position over ``[..., classes]`` unless named otherwise.

* ``kdjax.losses.dense``: ``soft_kl``, ``reverse_kl``, ``jsd``, ``dkd``, ``hard_ce``,
  ``distillation_loss`` and the input checks every objective shares;
* ``kdjax.losses.sparse``: ``topk_kl`` and ``topk_distillation_loss`` against a teacher's
  cached top-k log-probabilities, and ``topk_logprobs`` that makes them.

Everything is importable from ``kdjax.losses``.
"""

from kdjax.losses.dense import (DIVERGENCES, _concrete_scalar, _hard_ce, check_alpha, check_beta, check_finite,
                                check_labels, check_temperature, check_where, distillation_loss,
                                divergence_per_position, dkd, hard_ce, jsd, masked_mean, reverse_kl, soft_kl)
from kdjax.losses.sparse import MISSING, topk_distillation_loss, topk_kl, topk_logprobs

__all__ = ["soft_kl", "reverse_kl", "jsd", "dkd", "hard_ce", "distillation_loss", "masked_mean",
           "check_temperature", "check_alpha", "check_beta", "check_where", "check_labels", "check_finite",
           "divergence_per_position", "DIVERGENCES", "MISSING", "topk_logprobs", "topk_kl", "topk_distillation_loss"]
