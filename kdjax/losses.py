"""Distillation losses: small pure functions, arrays in, arrays out.

``soft_kl`` and ``hard_ce`` are per-example (unreduced, optax style) so callers can
mask or weight them; ``distillation_loss`` is the seed's scalar objective.

Checks on shapes and dtypes run at trace time. Range checks on ``temperature``,
``alpha`` and the label values run whenever those values are concrete (Python
numbers, NumPy arrays, jax arrays outside ``jit``); traced values cannot be
inspected, so ``kdjax.train`` validates them at its entry points instead.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError

__all__ = ["soft_kl", "hard_ce", "distillation_loss", "check_temperature", "check_alpha"]


def _concrete_scalar(name: str, value):
    """Return ``value`` as a Python float if it is concrete, else None (traced)."""
    if isinstance(value, jax.core.Tracer):
        return None
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise InputError(f"{name}: expected a scalar, got an array of shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputTypeError(f"{name}: expected a real number, got dtype {arr.dtype}")
    return float(arr)


def check_temperature(temperature) -> None:
    """Raise ValueError unless a concrete temperature is finite and > 0."""
    t = _concrete_scalar("temperature", temperature)
    if t is not None and not (math.isfinite(t) and t > 0):
        raise InputError(f"temperature: expected a finite number > 0, got {t}")


def check_alpha(alpha) -> None:
    """Raise ValueError unless a concrete alpha lies in [0, 1]."""
    a = _concrete_scalar("alpha", alpha)
    if a is not None and not (0.0 <= a <= 1.0):  # NaN fails both comparisons
        raise InputError(f"alpha: expected a number in [0, 1], got {a}")


def _check_logits(name: str, logits) -> None:
    if logits.ndim != 2:
        raise InputError(f"{name}: expected shape [batch, num_classes], got shape {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise InputTypeError(f"{name}: expected a floating-point dtype, got {logits.dtype}")
    if logits.shape[0] == 0:
        raise InputError(f"{name}: expected a non-empty batch, got shape {logits.shape}")


def _check_labels(labels, logits_shape) -> None:
    batch, num_classes = logits_shape
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise InputTypeError(f"labels: expected an integer dtype (class indices), got {labels.dtype}")
    if labels.shape != (batch,):
        raise InputError(f"labels: expected shape ({batch},) to match logits {logits_shape}, "
                         f"got shape {labels.shape}")
    if not isinstance(labels, jax.core.Tracer):
        values = np.asarray(labels)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= num_classes:
            raise InputError(f"labels: expected values in [0, {num_classes}), "
                             f"got values in [{lo}, {hi}]")


def soft_kl(student_logits, teacher_logits, temperature=1.0):
    r"""Per-example KL divergence between temperature-softened teacher and student.

    .. math::
        \mathrm{KL}_i = \sum_c p_{ic} (\log p_{ic} - \log q_{ic}), \quad
        p = \mathrm{softmax}(t / T),\; q = \mathrm{softmax}(s / T)

    with :math:`0 \log 0 = 0` (as ``torch.nn.functional.kl_div``). The teacher side
    carries no gradient. Not multiplied by :math:`T^2`; ``distillation_loss`` does that.

    Args:
      student_logits: ``[batch, num_classes]`` floating array.
      teacher_logits: same shape as ``student_logits``.
      temperature: scalar > 0 (Python float or traced scalar).

    Returns:
      ``[batch]`` array of KL values.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[1.0, 2.0, 3.0]])
    >>> float(soft_kl(s, s, 2.0)[0])
    0.0
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise InputError(f"teacher_logits: expected the student's shape {student_logits.shape}, "
                         f"got {teacher_logits.shape}")
    check_temperature(temperature)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    p = jnp.exp(log_p)
    # p == 0 (an underflowed teacher probability) contributes exactly 0, never NaN.
    terms = jnp.where(p > 0, p * (log_p - log_q), 0.0)
    return jnp.sum(terms, axis=-1)


def hard_ce(logits, labels):
    r"""Per-example cross-entropy with integer labels: :math:`-\log\mathrm{softmax}(s)_{y}`.

    Args:
      logits: ``[batch, num_classes]`` floating array.
      labels: ``[batch]`` integer class indices in ``[0, num_classes)``.

    Returns:
      ``[batch]`` array of losses.

    >>> import jax.numpy as jnp
    >>> round(float(hard_ce(jnp.zeros((1, 4)), jnp.array([2]))[0]), 6)  # log 4
    1.386294
    """
    _check_logits("logits", logits)
    _check_labels(labels, logits.shape)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    # A one-hot dot instead of take_along_axis: the same number (one nonzero term), but
    # no gather forward / scatter backward, which are slow inside XLA:CPU loops.
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=log_q.dtype)
    return -jnp.sum(one_hot * log_q, axis=-1)


def distillation_loss(student_logits, teacher_logits, labels, temperature=3.0, alpha=0.7):
    r"""The seed's knowledge-distillation loss (Hinton et al., 2015).

    .. math::
        L = \alpha\, T^2\, \frac{1}{B}\sum_i \mathrm{KL}_i
            + (1 - \alpha)\, \frac{1}{B}\sum_i \mathrm{CE}_i

    i.e. PyTorch's ``kl_div(log_softmax(s/T), softmax(t/T), reduction='batchmean') * T**2``
    weighted by ``alpha``, plus ``(1 - alpha) * cross_entropy(s, y)``. The teacher side
    carries no gradient. ``temperature`` and ``alpha`` may be Python floats or traced
    scalars (a vmapped sweep over them compiles once).

    Args:
      student_logits: ``[batch, num_classes]``.
      teacher_logits: ``[batch, num_classes]``.
      labels: ``[batch]`` integer class indices.
      temperature: softening temperature T > 0.
      alpha: weight of the soft term, in [0, 1].

    Returns:
      A scalar ``jax.Array``.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[2.0, 1.0, 0.1]]); y = jnp.array([0])
    >>> bool(jnp.allclose(distillation_loss(s, s, y, 3.0, 0.0), hard_ce(s, y)[0]))
    True
    """
    check_alpha(alpha)
    soft = jnp.mean(soft_kl(student_logits, teacher_logits, temperature))
    hard = jnp.mean(hard_ce(student_logits, labels))
    return alpha * (soft * temperature**2) + (1 - alpha) * hard
