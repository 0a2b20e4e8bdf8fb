"""Whole training runs on a ``Dataset``: one model, or many seeds/hyperparameters at once.

These are the workflows the CLI runs, as library functions returning arrays and
plain dicts. Each run is a compiled ``lax.scan`` fed in chunks so a progress
callback can fire between chunks (no per-step host round trip).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import sweep
from kdjax.data import Dataset, epoch_schedule, seed_schedule
from kdjax.train import Hyper, create_train_state, make_run, predict_logits

__all__ = ["RunConfig", "fit", "fit_members", "teacher_logits_for"]

Progress = Callable[[int, int], None]  # (steps done, steps total)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How long and how to batch.

    ``steps``: the seed's "epochs" — one random minibatch (without replacement) per
    step. ``epochs``: real shuffled passes (overrides ``steps`` when set).
    """

    steps: int = 100
    epochs: int | None = None
    batch_size: int = 64
    learning_rate: float = 1e-3

    def __post_init__(self):
        if self.epochs is None and self.steps < 1:
            raise ValueError(f"steps: expected a positive int, got {self.steps}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs: expected a positive int, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {self.batch_size}")
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate: expected a finite number > 0, got {self.learning_rate}")

    def schedule(self, key, num_samples: int):
        if self.epochs is not None:
            return epoch_schedule(key, num_samples, self.batch_size, self.epochs)
        return seed_schedule(key, num_samples, self.batch_size, self.steps)


@functools.lru_cache(maxsize=None)
def _run(model, objective, members: bool):
    # One compiled program per (model, objective), reused by every later fit.
    return sweep.make_sweep_run(model, objective) if members else make_run(model, objective)


def _chunks(total: int, pieces: int = 20) -> list[tuple[int, int]]:
    size = max(1, -(-total // pieces))
    return [(a, min(a + size, total)) for a in range(0, total, size)]


def _device_data(ds: Dataset, teacher_logits=None) -> dict:
    d = {"x": jnp.asarray(ds.x_train), "y": jnp.asarray(ds.y_train)}
    if teacher_logits is not None:
        d["teacher_logits"] = teacher_logits
    return d


def teacher_logits_for(teacher, teacher_params, ds: Dataset):
    """The eval-mode teacher's logits on every training example (computed once)."""
    return predict_logits(teacher, teacher_params, jnp.asarray(ds.x_train))


def fit(model, objective: str, ds: Dataset, cfg: RunConfig, seed: int, *,
        hyper: Hyper | None = None, teacher_logits=None, state=None,
        progress: Progress | None = None):
    """Train one model; returns ``(state, losses [steps] as NumPy)``.

    Keys come from ``seed`` exactly as in ``fit_members``, so member i of a sweep
    equals ``fit`` with ``seeds[i]``. Pass ``state`` to continue from it.
    """
    keys = {k: v[0] for k, v in sweep.member_keys([seed]).items()}
    schedule = cfg.schedule(keys["schedule"], len(ds.y_train))
    if state is None:
        state = create_train_state(model, keys["init"], ds.input_dim,
                                   learning_rate=cfg.learning_rate)
    data = _device_data(ds, teacher_logits)
    run, losses = _run(model, objective, False), []
    args = (hyper,) if objective == "kd" else ()
    for a, b in _chunks(len(schedule)):
        state, m = run(state, data, schedule[a:b], keys["dropout"], *args)
        losses.append(m["loss"])
        if progress is not None:
            progress(b, len(schedule))
    return state, np.asarray(jnp.concatenate(losses))


def fit_members(model, objective: str, ds: Dataset, cfg: RunConfig, seeds: Sequence[int], *,
                hyper: Hyper | None = None, teacher_logits=None,
                progress: Progress | None = None):
    """Train N models at once (one vmapped program), one per seed (and per hyper entry).

    ``hyper`` fields, when given, are ``[N]`` arrays aligned with ``seeds``.
    Returns ``(batched state, losses [N, steps] as NumPy)``.
    """
    keys = sweep.member_keys(seeds)
    schedules = jax.vmap(functools.partial(cfg.schedule, num_samples=len(ds.y_train)))(keys["schedule"])
    states = sweep.init_members(model, keys["init"], ds.input_dim, cfg.learning_rate)
    data = _device_data(ds, teacher_logits)
    run, losses = _run(model, objective, True), []
    args = (hyper,) if objective == "kd" else (None,)
    for a, b in _chunks(schedules.shape[1]):
        states, m = run(states, data, schedules[:, a:b], keys["dropout"], *args)
        losses.append(m["loss"])
        if progress is not None:
            progress(b, schedules.shape[1])
    return states, np.asarray(jnp.concatenate(losses, axis=1))
