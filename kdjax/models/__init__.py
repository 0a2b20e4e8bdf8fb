"""kdjax's models (flax.linen), named after their PyTorch counterparts for ``kdjax.convert``.

* ``mlp``: the seed's ``TeacherMLP`` / ``StudentMLP`` and a plain ``MLP``.
* ``resnet``: torchvision-layout ``ResNet`` / ``resnet18`` and PyTorch-semantics ``BatchNorm``.

Every model is called as ``model.apply(variables, x, train=bool, rngs=...)``.
"""

from kdjax.models.mlp import MLP, MLP_MODELS, StudentMLP, TeacherMLP, init_params, param_count, torch_linear_init
from kdjax.models.resnet import STEMS, BasicBlock, BatchNorm, ResNet, resnet18

__all__ = ["MLP", "MLP_MODELS", "StudentMLP", "TeacherMLP", "init_params", "param_count",
           "torch_linear_init", "STEMS", "BasicBlock", "BatchNorm", "ResNet", "resnet18"]
