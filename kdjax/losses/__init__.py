"""Distillation losses, per position over ``[..., classes]`` unless named otherwise.

* ``kdjax.losses.dense``: ``soft_kl``, ``reverse_kl``, ``jsd``, ``dkd``, ``hard_ce``,
  ``distillation_loss`` and the input checks every objective shares;
* ``kdjax.losses.sparse``: ``topk_kl``, ``topk_jsd``, ``topk_tvd`` and
  ``topk_distillation_loss`` against a teacher's cached top-k log-probabilities, and
  ``topk_logprobs`` that makes them;
* ``kdjax.losses.ranking``: ``topk_hinge`` and ``topk_logistic_ranking`` (DistillKit's
  ranking losses over the same top-k);
* ``kdjax.losses.options``: ``gkd_loss`` (the generalised JSD with TRL's reductions,
  ``num_items_in_batch`` divisor, ``logit_scale`` and ``final_logit_softcapping``) and
  ``scale_logits``.

Everything is importable from ``kdjax.losses``.
"""

from kdjax.losses.dense import (DIVERGENCES, _concrete_scalar, _hard_ce, check_alpha, check_beta, check_finite,
                                check_labels, check_temperature, check_where, distillation_loss,
                                divergence_per_position, dkd, hard_ce, jsd, masked_mean, reverse_kl, soft_kl)
from kdjax.losses.options import REDUCTIONS, gkd_loss, scale_logits
from kdjax.losses.ranking import topk_hinge, topk_logistic_ranking
from kdjax.losses.sparse import (MISSING, SPARSE_LOSSES, topk_distillation_loss, topk_jsd, topk_kl, topk_logprobs,
                                 topk_tvd)

__all__ = ["soft_kl", "reverse_kl", "jsd", "dkd", "hard_ce", "distillation_loss", "masked_mean",
           "check_temperature", "check_alpha", "check_beta", "check_where", "check_labels", "check_finite",
           "divergence_per_position", "DIVERGENCES", "MISSING", "SPARSE_LOSSES", "topk_logprobs", "topk_kl", "topk_jsd",
           "topk_tvd", "topk_hinge", "topk_logistic_ranking", "topk_distillation_loss", "REDUCTIONS", "gkd_loss",
           "scale_logits"]
