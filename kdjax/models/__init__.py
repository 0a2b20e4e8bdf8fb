"""kdjax's models (flax.linen), named after their PyTorch counterparts for ``kdjax.convert``.

* ``mlp``: the reference script's ``TeacherMLP`` / ``StudentMLP`` and a plain ``MLP``.
* ``resnet``: torchvision-layout ``ResNet`` / ``resnet18``, PyTorch-semantics ``BatchNorm``,
  and ``Conv`` / ``conv2d`` (convolutions whose gradients stay fast inside fused runs on CPU).
* ``transformer``: ``TransformerLM``, GPT-2 with Hugging Face GPT-2's parameter names.
* ``llama``: ``Llama``, the Llama/Qwen2/Qwen3/Mistral decoders with Hugging Face's names
  (``Llama.from_hf_config``; ``kdjax.convert.load_hf`` / ``save_hf`` for checkpoint folders).

Every model is called as ``model.apply(variables, x, train=bool, rngs=...)``.
"""

from kdjax.models.mlp import MLP, MLP_MODELS, StudentMLP, TeacherMLP, init_params, param_count, torch_linear_init
from kdjax.models.resnet import STEMS, BasicBlock, BatchNorm, Conv, ResNet, conv2d, resnet18
from kdjax.models.llama import Llama
from kdjax.models.transformer import Conv1D, TransformerLM, check_tokens

__all__ = ["MLP", "MLP_MODELS", "StudentMLP", "TeacherMLP", "init_params", "param_count",
           "torch_linear_init", "STEMS", "BasicBlock", "BatchNorm", "Conv", "ResNet", "conv2d", "resnet18",
           "Conv1D", "TransformerLM", "check_tokens", "Llama"]
