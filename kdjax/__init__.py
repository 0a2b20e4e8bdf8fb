"""kdjax: knowledge distillation written the JAX way.

The loss is in ``kdjax.losses``, the models in ``kdjax.models``, the train step and
fused runs in ``kdjax.train``, data and schedules in ``kdjax.data``, vmapped sweeps in
``kdjax.sweep``, PyTorch weight conversion in ``kdjax.convert``, whole runs in
``kdjax.experiments``, checkpoints in ``kdjax.checkpoint``, and the exceptions raised
for user mistakes in ``kdjax.errors``.
"""

from kdjax import checkpoint, convert, data, errors, experiments, losses, models, sweep, train
from kdjax.losses import distillation_loss, hard_ce, soft_kl
from kdjax.models import MLP, StudentMLP, TeacherMLP, param_count
from kdjax.train import (
    Hyper,
    TrainState,
    adam,
    create_train_state,
    evaluate,
    make_hyper,
    make_run,
    make_train_step,
    predict_logits,
    run_steps,
    set_learning_rate,
    state_from_params,
    train_step,
)

__version__ = "0.1.0"

__all__ = [
    "checkpoint", "convert", "data", "errors", "experiments", "losses", "models", "sweep", "train",
    "distillation_loss", "hard_ce", "soft_kl",
    "MLP", "StudentMLP", "TeacherMLP", "param_count",
    "Hyper", "TrainState", "adam", "create_train_state", "evaluate", "make_hyper",
    "make_run", "make_train_step", "predict_logits", "run_steps", "set_learning_rate",
    "state_from_params", "train_step",
]
