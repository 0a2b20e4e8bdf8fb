"""ResNets in torchvision's layout (BasicBlock), channels-last, with PyTorch's BatchNorm.

Module names follow torchvision's ``state_dict`` (``conv1, bn1, layer{i}.{j}.conv1/bn1/conv2/bn2,
layer{i}.{j}.downsample.0/.1, fc``) so ``kdjax.convert`` maps weights by name. Inputs are NHWC
(PyTorch's NCHW: ``x.transpose(0, 2, 3, 1)``); a global average pool precedes ``fc``.

Where Flax's defaults are not PyTorch's, matched here: ``BatchNorm`` normalises a training
batch with its *biased* variance but updates ``running_var`` with the *unbiased* one, the new
batch weighted by ``momentum=0.1`` (Flax: 0.99 on the old value, biased throughout); padding
is explicit (PyTorch's ``padding=1`` is not ``"SAME"`` at stride 2).

Init is torchvision's (convolutions kaiming-normal, fan_out, untruncated; BatchNorm 1 and 0;
``fc`` as ``nn.Linear``): ``model.init`` draws it with ``jax.random``, ``init_variables``
with NumPy on the host (no program to compile: a jitted init compiles slowly on CPU).

The convolutions' gradients are written out (``conv2d``) as canonical NHWC/HWIO convolutions:
XLA:CPU runs autodiff's transposed ones slowly inside ``lax.scan`` (jax-ml/jax#12868;
docs/library.md). The kernel's gradient is summed over chunks of ``WEIGHT_GRAD_IMAGES`` images
(or ``WEIGHT_GRAD_CHUNKS`` chunks), which rounds differently from one convolution. ``conv2d`` and
``batch_norm_train`` are ``custom_vjp``s: reverse-mode differentiation only (no ``jax.jvp``).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from kdjax.errors import InputError, InputTypeError
from kdjax.models.mlp import host_generator, torch_linear_init

__all__ = ["BatchNorm", "batch_norm_train", "Conv", "conv2d", "BasicBlock", "ResNet", "resnet18", "init_variables",
           "STEMS"]

STEMS = ("cifar", "imagenet")

# torch's kaiming_normal_(w, mode="fan_out", nonlinearity="relu"): N(0, 2 / (out_channels * kh * kw))
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # untruncated


class BatchNorm(nn.Module):
    r"""PyTorch's ``nn.BatchNorm2d`` (or ``1d``) over the last axis.

    Training (``train=True``): :math:`y = (x - \mu_B) / \sqrt{\sigma^2_B + \epsilon}
    \cdot w + b` with the batch mean and *biased* variance over every axis but the
    last, and the running statistics updated as
    :math:`r_\mu \leftarrow (1 - m) r_\mu + m \mu_B`,
    :math:`r_{\sigma^2} \leftarrow (1 - m) r_{\sigma^2} + m \sigma^2_B \frac{n}{n - 1}`
    (``m = momentum``, ``n`` values per channel). Evaluation: the running statistics.
    Params ``scale`` (PyTorch ``weight``) and ``bias``; ``batch_stats`` ``mean``
    (``running_mean``) and ``var`` (``running_var``). Initialisation does not update
    the statistics. Training differentiates by ``batch_norm_train`` (reverse-mode only).
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), self.dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), self.dtype))
        if train:
            n = x.size // c
            if n < 2:
                raise InputError(f"BatchNorm: expected more than 1 value per channel in training "
                                 f"(as PyTorch), got input shape {x.shape}")
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / (n - 1))
            return y
        return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon)


def _per_channel(v, x):
    """A ``[channels]`` vector shaped to broadcast against ``x`` (channels last)."""
    return v.reshape((1,) * (x.ndim - 1) + (-1,))


def _normalize(x, mean, var, scale, bias, epsilon):
    inv = jax.lax.rsqrt(var + epsilon) * scale
    return (x - _per_channel(mean, x)) * _per_channel(inv, x) + _per_channel(bias, x)


def _batch_norm_plain(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - _per_channel(mean, x)), axes)
    return _normalize(x, mean, var, scale, bias, epsilon), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon: float):
    r"""BatchNorm of ``x`` on its batch statistics (every axis but the last).

    Args:
      x: ``[..., channels]``; scale, bias: ``[channels]``; epsilon: added to the variance.
    Returns:
      ``(y, mean, var)``: :math:`y = (x - \mu_B)/\sigma \cdot w + b`, the *biased* variance
      :math:`\sigma^2_B`, :math:`\sigma = \sqrt{\sigma^2_B + \epsilon}`.

    Its gradient is the closed form (as PyTorch's batch-norm backward) instead of autodiff's
    chain; with :math:`\hat x = (x - \mu_B)/\sigma`, averages over a channel's ``n`` values,

    .. math::
        \partial x = \frac{w}{\sigma}\big(g - \overline{g} - \hat x\,\overline{g \hat x}\big)
        + \frac{g_\mu}{n} + \frac{2 g_{\sigma^2}}{n}(x - \mu_B),\quad
        \partial w = \textstyle\sum g \hat x,\quad \partial b = \sum g

    (:math:`g_\mu, g_{\sigma^2}`: the statistics' cotangents). Reverse-mode only (``custom_vjp``).
    """
    return _batch_norm_plain(x, scale, bias, epsilon)


def _batch_norm_fwd(x, scale, bias, epsilon):
    y, mean, var = _batch_norm_plain(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, var)


def _batch_norm_bwd(epsilon, residuals, cotangents):
    x, scale, mean, var = residuals
    g, g_mean, g_var = cotangents
    axes, n = tuple(range(x.ndim - 1)), x.size // x.shape[-1]
    inv = jax.lax.rsqrt(var + epsilon)
    centred = x - _per_channel(mean, x)
    sum_g, sum_gc = jnp.sum(g, axes), jnp.sum(g * centred, axes)
    dx = _per_channel(scale * inv, x) * (g - _per_channel(sum_g / n, x)
                                         - centred * _per_channel(inv * inv * sum_gc / n, x))
    dx = dx + _per_channel(g_mean / n, x) + centred * _per_channel(2 * g_var / n, x)
    return dx, sum_gc * inv, sum_g


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


_DN = ("NHWC", "HWIO", "NHWC")
# images per weight-gradient convolution on CPU (see _canonical_grads), and at most this many
# convolutions per gradient (larger chunks for larger batches: the program stays small)
WEIGHT_GRAD_IMAGES, WEIGHT_GRAD_CHUNKS = 16, 8


def _conv_fwd_only(x, kernel, stride, pads):
    return lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, stride: int, pads):
    r"""``lax.conv_general_dilated`` whose gradients are canonical convolutions on CPU (module docstring).

    Args:
      x: NHWC; kernel: HWIO, square; stride: an int; pads: ``((lo, hi), (lo, hi))``.
    Returns:
      The NHWC output; its gradients:

    .. math::
        \partial x = \mathrm{conv}(\mathrm{dilate}_s(\partial y), \mathrm{flip}(K)^{\top_{IO}}),\quad
        \partial K = \mathrm{conv}(x^{\top_{NC}}, \mathrm{dilate}_s(\partial y)^{\top_{NC}})^{\top}
    """
    return _conv_fwd_only(x, kernel, stride, pads)


def _conv_vjp_fwd(x, kernel, stride, pads):
    return _conv_fwd_only(x, kernel, stride, pads), (x, kernel)


def _canonical_grads(x, kernel, dy, stride, pads):
    k, s = kernel.shape[0], stride
    # dx: dy dilated by the stride, against the flipped kernel with in/out channels swapped
    flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
    dx_pads = []
    for d, (lo, _) in enumerate(pads):
        dilated = (dy.shape[1 + d] - 1) * s + 1
        dx_pads.append((k - 1 - lo, x.shape[1 + d] - dilated + lo))
    dx = lax.conv_general_dilated(dy, flipped, (1, 1), dx_pads, lhs_dilation=(s, s), dimension_numbers=_DN)
    # dkernel: batch and channels swapped, dy (dilated by the stride) as the kernel; summed over chunks of
    # images: XLA:CPU runs a convolution with a kernel as large as the image faster on few images (docs/benchmarks.md)
    dk_pads = [(lo, k + (dy.shape[1 + d] - 1) * s - x.shape[1 + d] - lo) for d, (lo, _) in enumerate(pads)]
    dk, size = None, max(WEIGHT_GRAD_IMAGES, -(-x.shape[0] // WEIGHT_GRAD_CHUNKS))
    for a in range(0, x.shape[0], size):
        xs, dys = x[a:a + size], dy[a:a + size]
        part = lax.conv_general_dilated(jnp.transpose(xs, (3, 1, 2, 0)), jnp.transpose(dys, (1, 2, 0, 3)), (1, 1),
                                        dk_pads, rhs_dilation=(s, s), dimension_numbers=_DN)
        dk = part if dk is None else dk + part
    return dx, jnp.transpose(dk, (1, 2, 0, 3))


def _autodiff_grads(x, kernel, dy, stride, pads):
    return jax.vjp(lambda a, b: _conv_fwd_only(a, b, stride, pads), x, kernel)[1](dy)


def _conv_vjp_bwd(stride, pads, residuals, dy):
    x, kernel = residuals
    # CPU: the canonical form; elsewhere (cuDNN et al.) autodiff's, as measured nowhere slower
    static = dict(stride=stride, pads=pads)
    return lax.platform_dependent(x, kernel, dy, cpu=functools.partial(_canonical_grads, **static),
                                  default=functools.partial(_autodiff_grads, **static))


conv2d.defvjp(_conv_vjp_fwd, _conv_vjp_bwd)


def _padding(kernel_size: int):
    """PyTorch's symmetric ``padding=kernel_size // 2`` (torchvision's 1x1, 3x3 and 7x7)."""
    p = kernel_size // 2
    return ((p, p), (p, p))


class Conv(nn.Module):
    """A bias-free square convolution (``nn.Conv``'s ``kernel`` param, HWIO), PyTorch's
    symmetric padding, computed by ``conv2d``."""

    features: int
    kernel_size: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", _conv_init, (k, k, x.shape[-1], self.features), self.dtype)
        return conv2d(jnp.asarray(x, self.dtype), kernel, self.stride, _padding(k))


def _conv(features: int, kernel_size: int, stride: int, name: str, dtype) -> Conv:
    return Conv(features, kernel_size, stride, dtype, name=name)


class _Downsample(nn.Module):
    """torchvision's ``downsample = Sequential(conv1x1, BatchNorm2d)``: names ``0``, ``1``."""

    features: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = _conv(self.features, 1, self.stride, "0", self.dtype)(x)
        return BatchNorm(dtype=self.dtype, name="1")(x, train)


class BasicBlock(nn.Module):
    """conv3x3(stride) -> bn -> relu -> conv3x3 -> bn, plus the shortcut, -> relu."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = _conv(self.features, 3, self.stride, "conv1", self.dtype)(x)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
        y = _conv(self.features, 3, 1, "conv2", self.dtype)(y)
        y = BatchNorm(dtype=self.dtype, name="bn2")(y, train)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _Downsample(self.features, self.stride, self.dtype, name="downsample")(x, train)
        return nn.relu(y + x)


class _Stage(nn.Module):
    """torchvision's ``layer{i}``: a Sequential of blocks named ``0``, ``1``, ..."""

    features: int
    num_blocks: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        for j in range(self.num_blocks):
            x = BasicBlock(self.features, self.stride if j == 0 else 1, self.dtype, name=str(j))(x, train)
        return x


class ResNet(nn.Module):
    """A BasicBlock ResNet: stem, ``len(stage_sizes)`` stages, global average pool, ``fc``.

    Args:
      stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` (ResNet-18).
      widths: channels per stage; the stem has ``widths[0]``. Stage i > 0 halves the
        spatial size (stride 2 in its first block).
      num_classes: outputs of ``fc``.
      stem: ``"imagenet"`` (7x7/2 conv, BatchNorm, ReLU, 3x3/2 max pool: torchvision's)
        or ``"cifar"`` (3x3/1 conv, BatchNorm, ReLU, no pool: the usual CIFAR variant).

    Called as ``apply(variables, x, train=bool)`` on NHWC ``x``; ``train=True`` uses
    batch statistics and needs ``mutable=["batch_stats"]`` (the train step does that).
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    num_classes: int = 10
    stem: str = "cifar"
    dtype: Any = jnp.float32

    def kdjax_init(self, rng, example, *, members: bool = False):
        """The init hook of ``kdjax.train``. Args: rng, example, members: as ``init_variables``'s (Returns too)."""
        return init_variables(self, rng, example, members=members)

    @nn.compact
    def __call__(self, x, train: bool = False):
        self._check_config()
        self._check_input(x)
        d = self.dtype
        k, stride = (7, 2) if self.stem == "imagenet" else (3, 1)
        x = _conv(self.widths[0], k, stride, "conv1", d)(x)
        x = nn.relu(BatchNorm(dtype=d, name="bn1")(x, train))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
            x = _Stage(w, n, 1 if i == 0 else 2, d, name=f"layer{i + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        init = torch_linear_init(x.shape[-1])
        return nn.Dense(self.num_classes, kernel_init=init, bias_init=init, dtype=d, param_dtype=d,
                        name="fc")(x)

    def _check_config(self):
        if self.stem not in STEMS:
            raise InputError(f"ResNet stem: expected one of {STEMS}, got {self.stem!r}")
        sizes, widths = tuple(self.stage_sizes), tuple(self.widths)
        if not sizes or len(sizes) != len(widths):
            raise InputError(f"ResNet: expected as many stage_sizes as widths (at least one), got "
                             f"stage_sizes {sizes} and widths {widths}")
        if min(sizes) < 1 or min(widths) < 1:
            raise InputError(f"ResNet: expected positive stage_sizes and widths, got {sizes} and {widths}")

    def _check_input(self, x):
        if x.ndim != 4:
            raise InputError(f"ResNet: expected NHWC images [batch, height, width, channels], got shape "
                             f"{x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise InputTypeError(f"ResNet: expected floating-point images, got dtype {x.dtype}")
        nchw = "; it looks like NCHW (PyTorch's layout): pass x.transpose(0, 2, 3, 1)"
        if self.has_variable("params", "conv1"):  # applying existing params: channels must agree
            channels = self.variables["params"]["conv1"]["kernel"].shape[2]
            if x.shape[-1] != channels:
                hint = nchw if x.shape[1] == channels else ""
                raise InputError(f"ResNet: expected NHWC images with {channels} channels (the params' "
                                 f"conv1), got shape {x.shape}{hint}")
        elif x.shape[1] in (1, 3) and x.shape[-1] > 4:
            raise InputError(f"ResNet: expected NHWC images [batch, height, width, channels], got shape "
                             f"{x.shape}{nchw}")


def resnet18(num_classes: int = 1000, stem: str = "imagenet", dtype=jnp.float32) -> ResNet:
    """torchvision's ``resnet18`` layout. Returns: the ``ResNet`` (11,689,512 parameters with 1000 classes).

    Args: num_classes, stem, dtype: as ``ResNet``'s fields (``stem`` ``"imagenet"`` by default here)."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, stem, dtype)


def init_variables(model: ResNet, key, example, *, members: bool = False) -> tuple[dict, dict]:
    """Variables drawn on the host with torchvision's init (``model.init``'s distributions).

    Args:
      model: the ``ResNet``; example: NHWC inputs (an array or ``jax.ShapeDtypeStruct``).
      key: a JAX key, raw ``uint32`` words or an int; with ``members`` a sequence of them.
      members: give every leaf a leading member axis.
    Returns:
      ``(params, {"batch_stats": ...})`` of NumPy arrays.
    Raises:
      InputError: ``members`` with no keys.
    """
    shapes = jax.eval_shape(model.init, jax.ShapeDtypeStruct((2,), jnp.uint32),
                            jax.ShapeDtypeStruct(tuple(example.shape), example.dtype))
    fc_fan_in = shapes["params"]["fc"]["kernel"].shape[0]

    def draw(gen, path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        collection, module, name = names[0], names[-2], names[-1]
        shape, dtype = leaf.shape, leaf.dtype
        if collection == "batch_stats":
            return (np.ones if name == "var" else np.zeros)(shape, dtype)
        if name == "kernel" and len(shape) == 4:  # kaiming normal, fan_out
            return gen.normal(0.0, np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])), shape).astype(dtype)
        if module == "fc":  # nn.Linear: U(+-1/sqrt(fan_in)) for weight and bias
            return gen.uniform(-1.0 / np.sqrt(fc_fan_in), 1.0 / np.sqrt(fc_fan_in), shape).astype(dtype)
        return (np.ones if name == "scale" else np.zeros)(shape, dtype)  # BatchNorm weight, bias

    def one(k):
        gen = host_generator(k)
        return jax.tree_util.tree_map_with_path(lambda path, leaf: draw(gen, path, leaf), dict(shapes))

    if members:
        drawn = [one(k) for k in key]
        if not drawn:
            raise InputError("init_keys: expected at least one key, got none")
        variables = jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *drawn)
    else:
        variables = one(key)
    return variables.pop("params"), variables
