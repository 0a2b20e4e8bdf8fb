"""kdjax: knowledge distillation written the JAX way.

The loss is in ``kdjax.losses``, the objective protocol every method implements (and the
built-in objectives) in ``kdjax.objectives``, the models in ``kdjax.models``, the train state, train
step, fused runs, optimizers and evaluation in ``kdjax.train``, data and schedules in
``kdjax.data``, vmapped sweeps in ``kdjax.sweep``, PyTorch weight conversion in
``kdjax.convert``, checkpoints in ``kdjax.checkpoint``, and the exceptions raised for
user mistakes in ``kdjax.errors``. Training runs on a data set are in ``kdjax.fitting``,
whole workflows with resume in ``kdjax.workflows`` (Hinton's omitted-class experiment in
``kdjax.hinton``), tokenizers for the language models in ``kdjax.tokenizer``, cached top-k
teachers in ``kdjax.offline``, generation with a key/value cache in ``kdjax.generation``
(``kdjax.generate``) and on-policy distillation (GKD, reverse KL) in ``kdjax.onpolicy``.
The ``kdjax`` command lives in ``kdjax.app``, which this package does not import.
"""

from kdjax import (checkpoint, convert, data, errors, features, fitting, fused, generation, losses, models, objectives,
                   offline, onpolicy, parallel, stats, sweep, tokenizer, train, workflows)
from kdjax.generation import generate
from kdjax.losses import distillation_loss, hard_ce, soft_kl
from kdjax.objectives import apply_model
from kdjax.models import MLP, BatchNorm, ResNet, StudentMLP, TeacherMLP, TransformerLM, param_count, resnet18
from kdjax.train import (
    Hyper,
    TrainState,
    adam,
    cosine_schedule,
    create_train_state,
    evaluate,
    make_hyper,
    make_run,
    make_train_step,
    multistep_schedule,
    predict_logits,
    run_steps,
    set_learning_rate,
    sgd,
    state_from_params,
    train_step,
)

__version__ = "0.2.0"

__all__ = [
    "checkpoint", "convert", "data", "errors", "features", "fitting", "fused", "generation", "losses", "models",
    "objectives", "offline", "onpolicy", "parallel", "stats", "sweep", "tokenizer", "train", "workflows", "generate",
    "distillation_loss", "hard_ce", "soft_kl", "apply_model",
    "MLP", "BatchNorm", "ResNet", "StudentMLP", "TeacherMLP", "TransformerLM", "param_count", "resnet18",
    "Hyper", "TrainState", "adam", "cosine_schedule", "create_train_state", "evaluate", "make_hyper",
    "make_run", "make_train_step", "multistep_schedule", "predict_logits", "run_steps",
    "set_learning_rate", "sgd", "state_from_params", "train_step",
]
