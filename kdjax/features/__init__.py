"""Feature distillation: intermediate representations of any Flax model, the losses that
match them, trained connectors, and objectives that compose them.

* ``taps``: ``capture(model, variables, x, paths)`` returns named intermediate values
  (``"layer3"``, ``"fc:input"``, ``"transformer.h.0.attn:attention_probs"``).
* ``losses``: ``hint`` (FitNets), ``attention_transfer``, ``similarity_preserving``, ``rkd``,
  ``pkt`` (mdistiller's), ``mse``/``mae``/``cosine_similarity`` (Keras 3's
  ``FeatureDistillation``), ``pooled_cosine`` (tunix's feature pooling).
* ``connectors``: ``ConvConnector`` (mdistiller's ``ConvReg``), ``LinearConnector``.
* ``crd``: contrastive representation distillation with its memory bank.
* ``objectives``: ``objective(ce=, kd=, terms=[...])``, what ``make_train_step`` and
  ``make_run`` take as their objective.
"""

from kdjax.features.connectors import ConvConnector, LinearConnector, connector_for
from kdjax.features.losses import (attention_transfer, cosine_similarity, hint, mae, mse, pkt, pool_to_shape,
                                   pooled_cosine, rkd, similarity_preserving)
from kdjax.features.objectives import (CONNECTORS, LOSSES, Objective, Term, init_connectors, objective,
                                      student_variables)
from kdjax.features.taps import available_taps, capture, module_paths

__all__ = ["capture", "module_paths", "available_taps", "hint", "attention_transfer", "similarity_preserving", "rkd",
           "pkt", "mse", "mae", "cosine_similarity", "pool_to_shape", "pooled_cosine", "ConvConnector",
           "LinearConnector", "connector_for", "Objective", "Term", "objective", "LOSSES", "CONNECTORS",
           "init_connectors", "student_variables"]
