"""Whole training runs on a ``Dataset``: one model, or many seeds/hyperparameters at once.

These are the workflows the CLI runs, as library functions returning arrays and
plain dicts. Each run is a compiled ``lax.scan`` fed in chunks, so a callback can
move a progress bar or evaluate between chunks (no per-step host round trip).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import numpy as np

from kdjax import sweep
from kdjax.data import Dataset, epoch_schedule, seed_schedule
from kdjax.errors import InputError
from kdjax.train import Hyper, create_train_state, evaluate, make_hyper, make_run, predict_logits

__all__ = ["RunConfig", "fit", "fit_members", "compile_members", "paired_students", "teacher_logits_for",
           "evaluate_on", "mean_ci", "t975"]

# on_chunk(steps done, steps total, state): called after every compiled chunk
OnChunk = Callable[[int, int, object], None]


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
            raise InputError(f"steps: expected a positive int, got {self.steps}")
        if self.epochs is not None and self.epochs < 1:
            raise InputError(f"epochs: expected a positive int, got {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"batch_size: expected a positive int, got {self.batch_size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InputError(f"learning_rate: expected a finite number > 0, got {self.learning_rate}")

    def schedule(self, key, num_samples: int):
        if self.epochs is not None:
            return epoch_schedule(key, num_samples, self.batch_size, self.epochs)
        return seed_schedule(key, num_samples, self.batch_size, self.steps)

    def describe(self) -> str:
        if self.epochs is not None:
            return f"{self.epochs} epochs (shuffled passes) of batch {self.batch_size}"
        return f"{self.steps} steps (one random minibatch of {self.batch_size} each)"


def _run(model, objective, members: bool, shared_schedule: bool = False,
         member_teacher_logits: bool = False, compiler_options=None):
    options = tuple(sorted((compiler_options or {}).items()))
    return _cached_run(model, objective, members, shared_schedule, member_teacher_logits, options)


@functools.lru_cache(maxsize=None)
def _cached_run(model, objective, members, shared_schedule, member_teacher_logits, options):
    # One compiled program per configuration, reused by every later fit.
    options = dict(options) or None
    if members:
        return sweep.make_sweep_run(model, objective, shared_schedule=shared_schedule,
                                    member_teacher_logits=member_teacher_logits, compiler_options=options)
    return make_run(model, objective, compiler_options=options)


def _chunks(total: int, size: int | None) -> list[tuple[int, int]]:
    size = size or max(1, -(-total // 20))  # ~20 chunks for a progress bar
    return [(a, min(a + size, total)) for a in range(0, total, size)]


def _on_device(a):
    # jax.device_put copies host data as is; jnp.asarray would compile a small program
    # per new shape on the way (JAX 0.10)
    return a if isinstance(a, jax.Array) else jax.device_put(np.asarray(a))


def _device_data(ds: Dataset, teacher_logits=None) -> dict:
    d = {"x": _on_device(ds.x_train), "y": _on_device(ds.y_train)}
    if teacher_logits is not None:
        d["teacher_logits"] = _on_device(teacher_logits)
    return d


def teacher_logits_for(teacher, teacher_params, ds: Dataset, members: bool = False):
    """The eval-mode teacher's logits on every training example (computed once).

    With ``members=True``, ``teacher_params`` is batched (one teacher per member) and
    the result is ``[N, n, classes]``.
    """
    return predict_logits(teacher, teacher_params, _on_device(ds.x_train), members=members)


def evaluate_on(model, params, x, y, members: bool = False) -> dict:
    """``{"loss", "accuracy"}`` as NumPy (``[N]`` arrays when ``members``)."""
    x, y = _on_device(x), _on_device(y)
    out = evaluate(model, params, x, y, members=members)
    return {k: np.asarray(v) for k, v in out.items()}


def fit(model, objective: str, ds: Dataset, cfg: RunConfig, seed: int, *,
        hyper: Hyper | None = None, teacher_logits=None, state=None,
        chunk: int | None = None, on_chunk: OnChunk | None = None):
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
    for a, b in _chunks(len(schedule), chunk):
        state, m = run(state, data, schedule[a:b], keys["dropout"], *args)
        losses.append(m["loss"])
        if on_chunk is not None:
            on_chunk(b, len(schedule), state)
    return state, np.concatenate([np.asarray(x) for x in losses])


def fit_members(model, objective: str, ds: Dataset, cfg: RunConfig, seeds: Sequence[int], *,
                hyper: Hyper | None = None, teacher_logits=None,
                chunk: int | None = None, on_chunk: OnChunk | None = None,
                start=None, on_checkpoint=None, compiler_options=None):
    """Train N models at once (one vmapped program), one per seed (and per hyper entry).

    ``hyper`` fields, when given, are ``[N]`` arrays aligned with ``seeds``;
    ``teacher_logits`` is ``[n, classes]`` (one teacher) or ``[N, n, classes]`` (one per
    member). Members with equal seeds share init and minibatches (a paired design);
    when all seeds are equal, one schedule is shared by all members.

    Resuming: ``start=(states, losses_so_far)`` continues a run of the same config
    from step ``losses_so_far.shape[1]`` (a chunk boundary, with the same ``chunk``);
    ``on_checkpoint(done, states, losses_so_far)`` is called after every chunk. Keys
    depend only on the seeds and dropout keys on the step count, so a resumed run
    ends bitwise where an uninterrupted one does. ``compiler_options`` go to ``jax.jit``
    (e.g. ``kdjax.train.SHORT_RUN_COMPILE``).
    Returns ``(batched state, losses [N, steps] as NumPy)``.
    """
    run, schedules, keys, data, args = _member_inputs(model, objective, ds, cfg, seeds, hyper, teacher_logits,
                                                      compiler_options)
    shared = schedules.ndim == 2
    if start is None:
        states = sweep.init_members(model, keys["init"], ds.input_dim, cfg.learning_rate)
        losses, done = [], 0
    else:
        states, so_far = start
        losses, done = [np.asarray(so_far)], int(np.shape(so_far)[1])
    total = schedules.shape[-2]
    for a, b in _chunks(total, chunk):
        if b <= done:
            continue
        if a < done:
            raise InputError(f"start: resumed at step {done}, not a chunk boundary of chunk={chunk}")
        part = schedules[a:b] if shared else schedules[:, a:b]
        states, m = run(states, data, part, keys["dropout"], *args)
        losses.append(m["loss"])  # stays on device: no host sync between chunks
        if on_checkpoint is not None:
            losses = [np.concatenate([np.asarray(x) for x in losses], axis=1)]
            on_checkpoint(b, states, losses[0])
        if on_chunk is not None:
            on_chunk(b, total, states)
    return states, np.concatenate([np.asarray(x) for x in losses], axis=1)


def _member_inputs(model, objective, ds, cfg, seeds, hyper, teacher_logits, compiler_options):
    """What a ``fit_members`` run feeds its program: ``(run, schedules, keys, data, args)``."""
    seeds = np.asarray(seeds)
    keys = sweep.member_keys(seeds)
    if len(set(seeds.tolist())) == 1:  # one schedule shared by every member
        schedules = cfg.schedule(keys["schedule"][0], len(ds.y_train))
    else:
        schedules = np.stack([cfg.schedule(k, len(ds.y_train)) for k in keys["schedule"]])
    per_member_teacher = teacher_logits is not None and np.ndim(teacher_logits) == 3
    run = _run(model, objective, True, schedules.ndim == 2, per_member_teacher, compiler_options)
    args = (hyper,) if objective == "kd" else (None,)
    return run, schedules, keys, _device_data(ds, teacher_logits), args


def compile_members(model, objective: str, ds: Dataset, cfg: RunConfig, seeds: Sequence[int], *,
                    hyper: Hyper | None = None, teacher_logits=None, chunk: int | None = None,
                    compiler_options=None) -> None:
    """Compile, without running, the programs ``fit_members`` runs with these arguments
    (one per distinct chunk length). Only shapes and dtypes matter, so ``teacher_logits``
    and ``hyper`` may be placeholders (zeros of the right shape, any valid values).

    Meant for a background thread: XLA compiles with the GIL released, so the next
    run's program compiles while the current run trains, and the later ``fit_members``
    finds it in JAX's in-memory cache (or waits for it if it is still compiling).
    """
    run, schedules, keys, data, args = _member_inputs(model, objective, ds, cfg, seeds, hyper, teacher_logits,
                                                      compiler_options)
    states = sweep.init_members(model, keys["init"], ds.input_dim, cfg.learning_rate)
    total = schedules.shape[-2]
    for size in sorted({b - a for a, b in _chunks(total, chunk)}):
        part = schedules[:size] if schedules.ndim == 2 else schedules[:, :size]
        run.lower(states, data, part, keys["dropout"], *args).compile()


def paired_students(seeds, teacher_logits, temperature: float, alpha: float) -> dict:
    """``fit_members`` keyword arguments (``seeds``, ``hyper``, ``teacher_logits``) that
    train standard and distilled students as one vmapped program.

    With n seeds: members 0..n-1 are standard students, because alpha = 0 makes
    ``distillation_loss`` exactly the hard-label cross-entropy (bitwise; see
    tests/test_train.py); members n..2n-1 distill at ``temperature`` and ``alpha``.
    Members i and n + i share seed i, hence init and minibatches, and teacher i when
    ``teacher_logits`` is per seed (``[n, examples, classes]``); a single teacher's
    ``[examples, classes]`` is shared by all. Split results with ``[:n]`` and ``[n:]``.
    """
    seeds, logits = np.asarray(seeds), np.asarray(teacher_logits)
    n = len(seeds)
    if logits.ndim == 3:
        if logits.shape[0] != n:
            raise InputError(f"teacher_logits: expected one teacher per seed ({n}), got {logits.shape[0]}")
        logits = np.concatenate([logits, logits])
    return {"seeds": np.concatenate([seeds, seeds]),
            "hyper": make_hyper(np.full(2 * n, temperature), np.repeat([0.0, alpha], n)),
            "teacher_logits": logits}


# Student-t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95% intervals).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (95% two-sided)."""
    if df < 1:
        raise InputError(f"df: expected >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion around the normal quantile; error < 1e-4 here
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval (0 for one value)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(t975(v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
