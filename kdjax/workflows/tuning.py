"""Workflows over many (temperature, alpha) members: ``run_sweep`` (one teacher, every member
one vmapped program) and ``tuned_distill`` (the cell chosen on validation data, then
``distill``). Every name is importable from ``kdjax.workflows``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence

import numpy as np

from kdjax import data, parallel, sweep as sweeps
from kdjax.data import Dataset
from kdjax.errors import InputError
from kdjax.fitting import OnChunk, OnLosses, Programs, RunConfig, evaluate_on, teacher_logits_for, time_group_sizes
from kdjax.stats import mean_ci
from kdjax.train import make_hyper
from kdjax.workflows import Checkpoints, DistillResult, _phase, _split, _take, distill


@dataclasses.dataclass
class SweepResult:
    """What ``run_sweep`` returns: the batched student states, their losses ``[N, steps]``
    and accuracy ``[N]`` on the chosen split, member i at ``(temperatures[i],
    alphas[i], seeds[i])``; the teacher's state and its accuracy."""

    teacher: object
    teacher_accuracy: float
    students: object
    losses: np.ndarray
    accuracy: np.ndarray
    members_per_group: int | None = None
    pick_seconds: dict | None = None


def run_sweep(teacher, student, ds: Dataset, cfg: RunConfig, temperatures, alphas, seeds, *,
              teacher_state=None, teacher_seed: int | None = None, split: str = "test",
              checkpoints: Checkpoints | None = None, on_chunk: OnChunk | None = None,
              log: Callable[[str], None] = lambda line: None, mesh=None,
              members_per_group: int | str | None = None, programs: Programs | None = None,
              on_losses: OnLosses | None = None) -> SweepResult:
    """One teacher (trained at ``teacher_seed``, default the first seed, or
    ``teacher_state``), then every member ``(temperatures[i], alphas[i], seeds[i])`` as
    one vmapped program distilling from it; accuracy on ``split``. Phases and
    checkpoints as in ``distill``. ``members_per_group``: None (one vmap), a group size,
    or ``"auto"`` (``kdjax.fitting.time_group_sizes`` times the candidates on the first chunk;
    the choice and its timings are in the result).

    Args:
      teacher, student, ds, cfg: as in ``distill``.
      temperatures, alphas, seeds: one entry per member, all of one length.
      teacher_state, teacher_seed, split, members_per_group: as above; the rest as in ``distill``.

    Returns:
      A ``SweepResult``.

    Raises:
      InputError: lengths that differ or are zero, or an invalid input.
    """
    hyper = make_hyper(np.asarray(temperatures, np.float64), np.asarray(alphas, np.float64))
    seeds = np.asarray(seeds)
    if not (len(seeds) == np.size(hyper.temperature) == np.size(hyper.alpha)) or len(seeds) == 0:
        raise InputError(f"sweep: expected equal, non-zero numbers of temperatures, alphas and seeds, got "
                         f"{np.size(hyper.temperature)}, {np.size(hyper.alpha)} and {len(seeds)}")
    phase = functools.partial(_phase, checkpoints=checkpoints, on_chunk=on_chunk, log=log, mesh=mesh,
                              programs=Programs() if programs is None else programs, on_losses=on_losses)
    members = teacher_state is None  # a trained teacher is a batch of one
    if members:
        first = int(seeds[0]) if teacher_seed is None else int(teacher_seed)
        teacher_state, _ = phase("teachers", teacher, "ce", ds, cfg, [first])
    logits = parallel.to_host(teacher_logits_for(teacher, teacher_state, ds, members=members))
    logits = logits[0] if members else logits
    picked = None
    if members_per_group == "auto":
        members_per_group, picked = time_group_sizes(
            student, "kd", ds, cfg, seeds, hyper=hyper, teacher_logits=logits,
            chunk=None if checkpoints is None else checkpoints.every)
        log(f"members run {_how(members_per_group)} (timed on the first chunk: "
            + ", ".join(f"{_how(g)} {1e3 * t:.1f} ms" for g, t in picked.items()) + ")")
    states, losses = phase("students", student, "kd", ds, cfg, seeds, hyper=hyper, teacher_logits=logits,
                           members_per_group=members_per_group)
    x, y = _split(ds, split)
    t_acc = float(np.ravel(evaluate_on(teacher, teacher_state, x, y, members=members)["accuracy"])[0])
    return SweepResult(_take(teacher_state, 0) if members else teacher_state, t_acc, states, losses,
                       evaluate_on(student, states, x, y, members=True)["accuracy"], members_per_group, picked)


def _how(members_per_group) -> str:
    return {None: "as one vmap", 1: "in sequence"}.get(members_per_group, f"in groups of {members_per_group}")


@dataclasses.dataclass
class TunedResult:
    """What ``tuned_distill`` returns: validation accuracy ``[temperatures, alphas,
    tuning seeds]`` and its ``(mean, CI half-width)`` per cell, the chosen ``best =
    (temperature, alpha)``, and the ``DistillResult`` of the final run at it."""

    temperatures: list
    alphas: list
    validation: np.ndarray
    validation_mean_ci: list
    best: tuple
    result: DistillResult


def tuned_distill(teacher, student, ds: Dataset, cfg: RunConfig, seeds: Sequence[int], *,
                  temperatures: Sequence[float], alphas: Sequence[float], tuning_seeds: Sequence[int] | None = None,
                  validation_fraction: float = 0.2, teacher_state=None, checkpoints: Checkpoints | None = None,
                  on_chunk: OnChunk | None = None, log: Callable[[str], None] = lambda line: None,
                  mesh=None, programs: Programs | None = None, on_losses: OnLosses | None = None) -> TunedResult:
    """Choose (temperature, alpha) on validation data, then ``distill`` with them.

    A stratified validation split is carved from ``ds``'s training rows; ``run_sweep``
    trains one teacher on the rest and a student per (temperature, alpha, tuning seed)
    distilling from it; the cell with the highest mean validation accuracy wins.
    ``distill`` then runs at that cell on all of ``ds``'s training rows and reports
    test accuracy: the test set plays no part in the choice. ``checkpoints`` as in
    ``distill`` (the tuning sweep's go to its ``tuning/`` subdirectory; its phases reach
    ``on_losses`` as ``"tuning teachers"`` and ``"tuning students"``).

    Args:
      teacher, student, ds, cfg, seeds: as in ``distill``.
      temperatures, alphas: the grid; tuning_seeds: its seeds (default ``seeds``).
      validation_fraction: the share of training rows held out; the rest as in ``distill``.

    Returns:
      A ``TunedResult``.

    Raises:
      InputError: an invalid input.
    """
    tuning_seeds = list(seeds if tuning_seeds is None else tuning_seeds)
    programs = Programs() if programs is None else programs
    tune = data.validation_split(ds, validation_fraction)
    T, A, S = sweeps.grid(temperatures, alphas, tuning_seeds)
    sub = None if checkpoints is None else dataclasses.replace(
        checkpoints, directory=os.path.join(checkpoints.directory, "tuning"))
    sw = run_sweep(teacher, student, tune, cfg, T, A, S, teacher_state=teacher_state, teacher_seed=tuning_seeds[0],
                   split="test", checkpoints=sub, on_chunk=on_chunk, log=log, mesh=mesh, programs=programs,
                   on_losses=None if on_losses is None else (lambda p, a, l: on_losses(f"tuning {p}", a, l)))
    acc = sw.accuracy.reshape(len(temperatures), len(alphas), len(tuning_seeds))
    stats = [[mean_ci(cell) for cell in row] for row in acc]
    i, j = np.unravel_index(np.argmax(acc.mean(axis=2)), acc.shape[:2])
    best = (float(temperatures[i]), float(alphas[j]))
    r = distill(teacher, student, ds, cfg, seeds, temperature=best[0], alpha=best[1], teacher_state=teacher_state,
                checkpoints=checkpoints, on_chunk=on_chunk, log=log, mesh=mesh, programs=programs, on_losses=on_losses)
    return TunedResult(list(map(float, temperatures)), list(map(float, alphas)), acc, stats, best, r)
