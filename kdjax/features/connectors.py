"""Connectors: small trainable modules that map a student's feature to the teacher's shape.

* ``ConvConnector``: mdistiller's ``ConvReg`` (``mdistiller/distillers/_common.py``), the
  FitNet/OFD regressor for NHWC maps: a convolution with bias (1x1 for equal sizes; 3x3
  stride 2 when the student's map is twice the teacher's; a ``1 + s - t`` kernel when it
  is larger), BatchNorm, optionally ReLU (FitNet's, mdistiller's default).
* ``LinearConnector``: DistillKit's hidden-state projection, a bias-free ``Linear`` on the
  last axis (token features ``[batch, length, width]``, embeddings ``[batch, width]``).

Both initialise as PyTorch's ``Conv2d``/``Linear`` (uniform in ``±1/sqrt(fan_in)``) and take
``train`` like any kdjax model; ``connector_for`` picks one from the two shapes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdjax.errors import InputError
from kdjax.models.mlp import torch_linear_init
from kdjax.models.resnet import BatchNorm, conv2d

__all__ = ["ConvConnector", "LinearConnector", "connector_for"]


class ConvConnector(nn.Module):
    """mdistiller's ``ConvReg(s_shape, t_shape, use_relu)`` on NHWC maps: conv -> BatchNorm
    (-> ReLU). Params ``conv`` (``kernel`` HWIO, ``bias``) and ``bn``."""

    channels: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    relu: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        pad = ((self.padding, self.padding),) * 2
        x = _ConvBias(self.channels, self.kernel, self.stride, pad, self.dtype, name="conv")(x)
        x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
        return nn.relu(x) if self.relu else x


class _ConvBias(nn.Module):
    """PyTorch's ``Conv2d`` with bias (params ``kernel`` HWIO, ``bias``), through kdjax's
    ``conv2d`` (whose gradients stay fast inside fused runs on CPU)."""

    features: int
    kernel: int
    stride: int
    pads: tuple
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = torch_linear_init(x.shape[-1] * self.kernel * self.kernel)
        kernel = self.param("kernel", init, (self.kernel, self.kernel, x.shape[-1], self.features), self.dtype)
        bias = self.param("bias", init, (self.features,), self.dtype)
        y = conv2d(jnp.asarray(x, self.dtype), kernel, self.stride, self.pads)
        return y + bias.reshape(1, 1, 1, -1)


class LinearConnector(nn.Module):
    """A bias-free ``Linear`` from the student's width to the teacher's (last axis)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.features, use_bias=False, kernel_init=torch_linear_init(x.shape[-1]),
                        dtype=self.dtype, param_dtype=self.dtype, name="linear")(x)


def connector_for(student_shape, teacher_shape, *, relu: bool = True, dtype=jnp.float32) -> nn.Module:
    """The connector mapping features of ``student_shape`` to ``teacher_shape`` (batch first).

    Args:
      student_shape, teacher_shape: the two features' shapes.
      relu: a ``ConvConnector``'s final ReLU (FitNet's, mdistiller's default).
      dtype: the connector's dtype.

    Returns:
      Rank 4 (NHWC maps): a ``ConvConnector`` chosen as mdistiller's ``ConvReg`` chooses. Other
      ranks: a ``LinearConnector`` on the last axis.

    Raises:
      InputError: batches that differ; a student map smaller than the teacher's (which
        ``ConvReg`` upsamples with a transposed convolution); other ranks whose axes but the
        last differ.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s[:1] != t[:1]:
        raise InputError(f"connector: expected student and teacher features of the same batch, got {s} and {t}")
    if len(s) == 4 and len(t) == 4:
        (sh, sw), (th, tw) = s[1:3], t[1:3]
        if (sh, sw) == (th, tw):
            return ConvConnector(t[3], 1, relu=relu, dtype=dtype)
        if sh == 2 * th and sw == 2 * tw:
            return ConvConnector(t[3], 3, 2, 1, relu=relu, dtype=dtype)
        if sh >= th and sw >= tw and sh - th == sw - tw:
            return ConvConnector(t[3], 1 + sh - th, relu=relu, dtype=dtype)
        raise InputError(f"connector: expected a student map at least as large as the teacher's (mdistiller's "
                         f"ConvReg without its transposed convolution), got {sh}x{sw} for the teacher's {th}x{tw}")
    if len(s) != len(t) or s[:-1] != t[:-1]:
        raise InputError(f"connector: expected features that differ only in their last axis (a Linear maps it), "
                         f"got student {s} and teacher {t}")
    return LinearConnector(t[-1], dtype=dtype)


def check_mapped(name: str, mapped, teacher) -> None:
    """Check that a connector's output has the teacher feature's shape.

    Args:
      name: the term's name, for the message; mapped, teacher: the two features.

    Raises:
      InputError: the shapes differ.
    """
    if jnp.shape(mapped) != jnp.shape(teacher):
        raise InputError(f"{name}: the connector maps the student's feature to {jnp.shape(mapped)}, expected the "
                         f"teacher's {jnp.shape(teacher)}")

