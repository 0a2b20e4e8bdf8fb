"""Training: state, optimizers, the pure step and fused runs, evaluation.

* ``kdjax.train.state``: ``TrainState``, ``Hyper``/``make_hyper``, ``create_train_state``,
  ``state_from_params``, ``init_variables`` (and the ``kdjax_init`` model hook).
* ``kdjax.train.optimizers``: ``adam``, ``sgd``, ``cosine_schedule``, ``multistep_schedule``.
* ``kdjax.train.step``: ``train_step``, ``make_train_step``, ``run_steps``, ``make_run``.
* ``kdjax.train.evaluation``: ``predict_logits``, ``evaluate``.

Hyperparameters are traced: temperature and alpha live in ``Hyper``, the learning rate
in the optimizer state (``adam``) or a schedule of the step count (``sgd``). New values
reuse the compiled program.
"""

from kdjax.train.evaluation import evaluate, predict_logits
from kdjax.train.optimizers import adam, cosine_schedule, multistep_schedule, sgd
from kdjax.train.state import (Hyper, TrainState, create_train_state, init_variables, make_hyper, set_learning_rate,
                               state_from_params)
from kdjax.train.step import (OBJECTIVES, CheckedRun, apply_model, make_run, make_train_step, run_steps,
                              train_step)

__all__ = ["TrainState", "Hyper", "make_hyper", "adam", "sgd", "cosine_schedule", "multistep_schedule",
           "create_train_state", "state_from_params", "init_variables", "apply_model", "train_step",
           "make_train_step", "run_steps", "make_run", "predict_logits", "evaluate",
           "set_learning_rate", "OBJECTIVES", "CheckedRun"]
