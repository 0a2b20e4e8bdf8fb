"""Contrastive representation distillation (Tian et al., 2020), as mdistiller's
``distillers/CRD.py``: embedding heads, a memory bank of every training example's
embeddings (student's and teacher's) and the NCE loss against ``negatives`` examples of
other classes. The bank is model state (``init_memory``), updated by ``crd_loss`` purely.

Given the same negatives, ``crd_loss`` equals ``CRDLoss.forward`` there (value, gradient and
the updated bank: ``parity/checks/features.py``). Negatives are drawn from the step's key
as mdistiller's ``CIFAR100InstanceSample(mode="exact")`` draws them: uniformly among the
examples of other classes, without replacement when there are at least ``negatives`` of
them, with replacement otherwise (``sample_negatives``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError
from kdjax.models.mlp import torch_linear_init

__all__ = ["Embed", "init_memory", "class_index", "sample_negatives", "crd_loss", "contrast_loss"]


class Embed(nn.Module):
    """mdistiller's ``Embed``: flatten, ``Linear`` (with bias), divide by the L2 norm."""

    features: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        init = torch_linear_init(x.shape[-1])
        x = nn.Dense(self.features, kernel_init=init, bias_init=init, dtype=self.dtype, param_dtype=self.dtype,
                     name="linear")(x)
        return x / jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))


def init_memory(rng, num_data: int, dim: int, dtype=jnp.float32) -> dict:
    """The bank's initial state, as ``ContrastMemory.__init__``.

    Args:
      rng: a JAX key (typed or raw words) or an int seed.
      num_data, dim: the training examples (rows) and the embedding width.
      dtype: the bank's dtype.

    Returns:
      ``{"memory_s", "memory_t": [num_data, dim] uniform in ±1/sqrt(dim / 3), "z": [2]}``,
      the normalisers ``z`` unset (-1).
    """
    stdv = 1.0 / math.sqrt(dim / 3)
    a, b = jax.random.split(jnp.asarray(rng) if not isinstance(rng, int) else jax.random.PRNGKey(rng))
    draw = lambda k: jax.random.uniform(k, (num_data, dim), dtype, -stdv, stdv)
    return {"memory_s": draw(a), "memory_t": draw(b), "z": -jnp.ones((2,), dtype)}


def class_index(labels) -> dict:
    """What ``sample_negatives`` needs of the training labels (kept in the bank's state).

    Args:
      labels: every training example's class (any shape; flattened).

    Returns:
      NumPy int32 arrays: the examples sorted by class (``order``), each class's first position
      there (``start``) and size (``count``), and every example's class (``labels``).

    Raises:
      InputError: no labels, or a negative one.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int32)
    if labels.size == 0 or labels.min() < 0:
        raise InputError(f"crd: expected non-negative class labels for the memory bank, got {labels.size} labels")
    count = np.bincount(labels).astype(np.int32)
    return {"order": np.argsort(labels, kind="stable").astype(np.int32), "start": (np.cumsum(count) - count).astype(np.int32),
            "count": count, "labels": labels}


def sample_negatives(key, labels, index: dict, negatives: int):
    """Negative examples for each row of a batch (mdistiller's "exact" mode; see the module doc).

    Args:
      key: the draw's JAX key.
      labels: ``[batch]`` the batch's classes.
      index: ``class_index`` of the training labels.
      negatives: how many per row (a Python int).

    Returns:
      ``[batch, negatives]`` example indices, row b's drawn from the examples whose class
      differs from ``labels[b]``.
    """
    order, start, count, label_of = (index[k] for k in ("order", "start", "count", "labels"))
    n = order.shape[0]
    other = n - count[labels]  # [batch] how many negatives each row has
    k_with, k_without = jax.random.split(key)
    # with replacement: a uniform position among the other classes' sorted positions
    u = jax.random.uniform(k_with, (labels.shape[0], negatives))
    pos = jnp.minimum(jnp.floor(u * other[:, None]).astype(jnp.int32), other[:, None] - 1)
    pos = jnp.where(pos >= start[labels][:, None], pos + count[labels][:, None], pos)
    drawn = order[pos]
    if negatives >= n:  # no class has that many negatives
        return drawn
    # without replacement: the examples of the `negatives` smallest uniform keys, other classes only
    keys = jax.random.uniform(k_without, (labels.shape[0], n))
    keys = jnp.where(label_of[None, :] == labels[:, None], jnp.inf, keys)
    _, without = jax.lax.top_k(-keys, negatives)
    return jnp.where((other >= negatives)[:, None], without.astype(drawn.dtype), drawn)


def contrast_loss(x, num_data: int, eps: float = 1e-7):
    """mdistiller's ``ContrastLoss``: with :math:`P_n = 1/N`,
    :math:`-\\big(\\sum_b \\log\\frac{x_{b0}}{x_{b0} + mP_n + \\epsilon}
    + \\sum_{b, j \\ge 1} \\log\\frac{mP_n}{x_{bj} + mP_n + \\epsilon}\\big) / \\mathrm{batch}`.

    Args:
      x: ``[batch, 1 + m]`` scores, the positive first.
      num_data: :math:`N`, the training examples.
      eps: :math:`\\epsilon`.

    Returns:
      A scalar.
    """
    m = x.shape[1] - 1
    pn = 1.0 / float(num_data)
    log_d1 = jnp.log(x[:, 0] / (x[:, 0] + m * pn + eps))
    log_d0 = jnp.log((m * pn) / (x[:, 1:] + m * pn + eps))
    return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / x.shape[0]


def _unit_rows(v):
    return v / jnp.sqrt(jnp.sum(v * v, axis=1, keepdims=True))


def crd_loss(f_s, f_t, rows, contrast, memory: dict, *, temperature: float = 0.07, momentum: float = 0.5):
    """mdistiller's ``CRDLoss`` on embedded features.

    The student's embedding is scored against the teacher's memory and the teacher's
    against the student's, each ``exp(<w, v> / temperature) / Z`` with ``Z`` set on first
    use to the mean score times ``num_data`` (then fixed); the loss is the sum of the two
    ``contrast_loss``\\ es. The bank rows of the batch move to ``momentum * old + (1 -
    momentum) * new``, renormalised.

    Args:
      f_s, f_t: ``[batch, dim]`` student and teacher embeddings (``Embed`` outputs).
      rows: ``[batch]`` the examples' indices in the training set (their bank rows).
      contrast: ``[batch, 1 + K]`` bank rows to score, the positive (``rows``) first.
      memory: ``{"memory_s", "memory_t": [num_data, dim], "z": [2]}``.
      temperature, momentum: the scores' temperature and the bank's momentum (mdistiller's).

    Returns:
      ``(loss, new_memory)``.

    Raises:
      InputError: embeddings that are not ``[batch, dim]`` alike.
    """
    if f_s.ndim != 2 or f_t.ndim != 2 or f_s.shape != f_t.shape:
        raise InputError(f"crd: expected equal [batch, dim] embeddings, got {f_s.shape} and {f_t.shape}")
    num_data = memory["memory_s"].shape[0]
    mem_s, mem_t = jax.lax.stop_gradient(memory["memory_s"]), jax.lax.stop_gradient(memory["memory_t"])
    w_s, w_t = mem_s[contrast], mem_t[contrast]  # [batch, 1 + K, dim]
    out_t = jnp.exp(jnp.einsum("bkd,bd->bk", w_s, f_t) / temperature)  # the teacher against the student bank
    out_s = jnp.exp(jnp.einsum("bkd,bd->bk", w_t, f_s) / temperature)
    z = memory["z"]
    z_s = jnp.where(z[0] < 0, jax.lax.stop_gradient(jnp.mean(out_s)) * num_data, z[0])
    z_t = jnp.where(z[1] < 0, jax.lax.stop_gradient(jnp.mean(out_t)) * num_data, z[1])
    loss = contrast_loss(out_s / z_s, num_data) + contrast_loss(out_t / z_t, num_data)

    def moved(mem, v):
        pos = mem[rows] * momentum + jax.lax.stop_gradient(v) * (1 - momentum)
        return mem.at[rows].set(_unit_rows(pos))

    new = {"memory_s": moved(mem_s, f_s), "memory_t": moved(mem_t, f_t), "z": jnp.stack([z_s, z_t])}
    return loss, new
