"""Optimizers and learning-rate schedules that equal PyTorch's step for step: ``adam``
(the reference script's ``torch.optim.Adam``), ``sgd`` (``torch.optim.SGD`` as KD papers use it),
``cosine_schedule`` and ``multistep_schedule`` (``torch.optim.lr_scheduler``)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.errors import InputError

__all__ = ["adam", "sgd", "cosine_schedule", "multistep_schedule"]


def _check_lr(learning_rate) -> None:
    if callable(learning_rate):
        return
    lr = float(learning_rate)
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"learning_rate: expected a finite number > 0 or a schedule, got {learning_rate}")


def adam(learning_rate=1e-3, dtype=jnp.float32) -> optax.GradientTransformation:
    """The reference script's optimizer, ``torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-8)``.

    The learning rate is injected into the optimizer state (a traced array), so
    changing it does not recompile; the betas and eps are static constants.

    Args:
      learning_rate: a number > 0, or a schedule of the step count (``cosine_schedule``, ...).
      dtype: the dtype of the injected hyperparameters (the params').

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      InputError: a learning rate that is not a finite number > 0 (nor a schedule).
    """
    _check_lr(learning_rate)
    factory = optax.inject_hyperparams(optax.adam, static_args=("b1", "b2", "eps", "eps_root"),
                                       hyperparam_dtype=dtype)
    return factory(learning_rate=learning_rate)


def sgd(learning_rate=0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
        nesterov: bool = False) -> optax.GradientTransformation:
    r"""``torch.optim.SGD(params, lr, momentum, weight_decay=..., nesterov=...)`` (dampening 0).

    .. math::
        g_t = \nabla_t + \lambda \theta_{t-1},\quad b_t = \mu b_{t-1} + g_t\ (b_1 = g_1),\quad
        \theta_t = \theta_{t-1} - \eta_t\,(g_t + \mu b_t \text{ if Nesterov else } b_t)

    Weight decay applies to every parameter (BatchNorm's too), as with one torch
    param group.

    Args:
      learning_rate: a number > 0 or a schedule of the optimizer step count
        (``cosine_schedule``, ``multistep_schedule``), whose position lives in the optimizer
        state, so a resumed run continues the schedule.
      momentum: :math:`\mu`, in [0, 1) (0: no momentum buffer).
      weight_decay: :math:`\lambda`, finite and >= 0.
      nesterov: Nesterov momentum (needs ``momentum > 0``, as torch).

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      InputError: any argument out of its range.
    """
    _check_lr(learning_rate)
    if not (0.0 <= momentum < 1.0):
        raise InputError(f"momentum: expected a number in [0, 1), got {momentum}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise InputError(f"weight_decay: expected a finite number >= 0, got {weight_decay}")
    if nesterov and momentum == 0:
        raise InputError("nesterov: expected momentum > 0 (as torch.optim.SGD), got momentum 0")
    parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def _check_every(t_max, every):
    if not isinstance(t_max, (int, np.integer)) or t_max < 1:
        raise InputError(f"t_max: expected a positive int, got {t_max!r}")
    if not isinstance(every, (int, np.integer)) or every < 1:
        raise InputError(f"every: expected a positive int, got {every!r}")


def cosine_schedule(learning_rate: float, t_max: int, *, eta_min: float = 0.0,
                    every: int = 1) -> Callable[[jax.Array], jax.Array]:
    r"""``torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)``
    with ``scheduler.step()`` after every ``every`` optimizer steps (1: per step; the
    steps per epoch: per epoch).

    .. math:: \eta_t = \eta_{min} + (\eta - \eta_{min})\,(1 + \cos(\pi e / T_{max})) / 2,
              \quad e = \lfloor t / every \rfloor

    (torch's closed form; valid for ``e <= t_max``, the run torch users configure).

    Args:
      learning_rate: :math:`\eta`, the initial rate, > 0.
      t_max: :math:`T_{max}`, in scheduler steps (a positive int).
      eta_min: the final rate.
      every: optimizer steps per scheduler step (a positive int).

    Returns:
      ``schedule(count) -> learning rate``, for ``adam``/``sgd``'s ``learning_rate``.

    Raises:
      InputError: a learning rate not > 0, or ``t_max``/``every`` not a positive int.
    """
    _check_lr(learning_rate)
    _check_every(t_max, every)

    def schedule(count):
        e = count // every
        return eta_min + (learning_rate - eta_min) * (1 + jnp.cos(math.pi * e / t_max)) / 2

    return schedule


def multistep_schedule(learning_rate: float, milestones: Sequence[int], gamma: float = 0.1, *,
                       every: int = 1) -> Callable[[jax.Array], jax.Array]:
    r"""``torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma)`` with
    ``scheduler.step()`` after every ``every`` optimizer steps:
    :math:`\eta_t = \eta\,\gamma^{|\{m \in milestones : m \le \lfloor t / every \rfloor\}|}`.

    Args:
      learning_rate: :math:`\eta`, the initial rate, > 0.
      milestones: increasing positive ints, in scheduler steps.
      gamma: the factor at each milestone, finite and > 0.
      every: optimizer steps per scheduler step (a positive int).

    Returns:
      ``schedule(count) -> learning rate``.

    Raises:
      InputError: any argument out of its range.
    """
    _check_lr(learning_rate)
    _check_every(1, every)
    ms = list(milestones)
    if any(not isinstance(m, (int, np.integer)) or m < 1 for m in ms) or ms != sorted(ms):
        raise InputError(f"milestones: expected increasing positive ints, got {milestones!r}")
    if not (math.isfinite(gamma) and gamma > 0):
        raise InputError(f"gamma: expected a finite number > 0, got {gamma}")
    bounds = np.asarray(ms, np.int32)

    def schedule(count):
        passed = jnp.sum(count // every >= bounds) if len(bounds) else 0
        return learning_rate * gamma ** passed

    return schedule
