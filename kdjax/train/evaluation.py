"""Evaluation in eval mode (no dropout, BatchNorm running statistics): logits, loss and
accuracy, for one model or a batch of members, optionally a bounded number of rows at a time."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError
from kdjax.losses import hard_ce
from kdjax.objectives import apply_model, as_variables

__all__ = ["predict_logits", "evaluate"]


def _in_batches(fn, x, batch_size: int | None):
    """``fn(x)`` evaluated ``batch_size`` rows at a time (``lax.map``), concatenated."""
    n = x.shape[0]
    if batch_size is None or batch_size >= n:
        return fn(x)
    k = n // batch_size
    head = jax.lax.map(fn, x[:k * batch_size].reshape(k, batch_size, *x.shape[1:]))
    head = head.reshape(k * batch_size, *head.shape[2:])
    return head if k * batch_size == n else jnp.concatenate([head, fn(x[k * batch_size:])])


@functools.partial(jax.jit, static_argnames=("model", "members", "batch_size"))
def _predict(model, params, model_state, x, members, batch_size):
    def logits(p, s):
        return _in_batches(lambda xb: apply_model(model, p, s, xb, train=False)[0], x, batch_size)

    return jax.vmap(logits)(params, model_state) if members else logits(params, model_state)


def _check_batch_size(batch_size):
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise InputError(f"batch_size: expected a positive int or None, got {batch_size!r}")


def predict_logits(model, params, x, members: bool = False, *, batch_size: int | None = None):
    """Eval-mode logits (no dropout, BatchNorm running statistics) of ``model`` on ``x``.

    Args:
      model: the linen module.
      params: a params tree, a variables dict or a ``TrainState`` (a model with BatchNorm
        needs the state: its ``model_state``).
      x: the inputs ``[n, ...]``.
      members: ``params`` is batched, one model per member.
      batch_size: bounds memory: ``x`` is evaluated that many rows at a time (None: all).

    Returns:
      ``[n, ..., classes]`` logits (``[N, n, ..., classes]`` with ``members``).

    Raises:
      InputError: a ``batch_size`` that is not a positive int or None; a BatchNorm model
        without its ``model_state``.
    """
    _check_batch_size(batch_size)
    params, model_state = _variables_of(params)
    return _predict(model, params, model_state, x, bool(members), batch_size)


@functools.partial(jax.jit, static_argnames=("model", "members", "batch_size"))
def _evaluate(model, params, model_state, x, y, members, batch_size):
    logits = _predict(model, params, model_state, x, members, batch_size)

    def metrics(lg):
        return {"loss": jnp.mean(hard_ce(lg, y)),
                "accuracy": jnp.mean((jnp.argmax(lg, -1) == y).astype(jnp.float32))}

    return jax.vmap(metrics)(logits) if members else metrics(logits)


def evaluate(model, params, x, y, members: bool = False, *, batch_size: int | None = None):
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on (x, y).

    Args:
      model, params, x, members, batch_size: as ``predict_logits``.
      y: the integer labels.

    Returns:
      ``{"loss": mean CE, "accuracy": fraction correct}``, scalars (``[N]`` with ``members``).

    Raises:
      InputError: as ``predict_logits``; labels of another shape than the logits' positions.
      InputTypeError: labels that are not integers.
    """
    _check_batch_size(batch_size)
    params, model_state = _variables_of(params)
    return _evaluate(model, params, model_state, x, y, bool(members), batch_size)


def _variables_of(tree):
    """``(params, model_state)`` of a ``TrainState``, a variables dict or a params tree."""
    variables = dict(as_variables(tree))
    return variables.pop("params"), variables
