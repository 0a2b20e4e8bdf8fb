"""Training runs on a ``Dataset``: one model (``fit``) or N at once (``fit_members``, one vmapped
program), as a compiled ``lax.scan`` fed in chunks (callbacks run between chunks, never per step),
resumable; ``RunConfig`` says how long and with which optimizer (torch-equal Adam or SGD),
``Programs`` holds the compiled programs (the caller's; no global cache). Results are NumPy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import parallel, sweep as sweeps
from kdjax.data import Dataset, epoch_schedule, random_batch_schedule
from kdjax.errors import InputError, check_count
from kdjax.features.taps import capture
from kdjax.objectives import Teacher, as_variables
from kdjax.train import (Hyper, adam, cosine_schedule, create_train_state, evaluate, init_variables, make_hyper,
                         make_run, predict_logits, sgd, state_from_params)

__all__ = ["RunConfig", "Programs", "fit", "fit_members", "initial_members", "time_group_sizes", "paired_students",
           "teacher_logits_for", "teacher_features_for", "evaluate_on", "OnChunk", "OnLosses"]

OnChunk = Callable[[str, int, int, object], None]  # (phase, steps done, total, states) after every chunk
# (phase, the chunk's first step, its losses [members, steps] as a device array: no host copy made)
OnLosses = Callable[[str, int, jax.Array], None]
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How long, how to batch, and the optimizer.

    ``steps``: the reference script's "epochs", one random minibatch (without replacement) per step.
    ``epochs``: real shuffled passes (overrides ``steps`` when set). ``optimizer``: ``"adam"``
    (the reference script's) or ``"sgd"`` (``momentum``, ``weight_decay``, ``nesterov``, as KD papers train
    ResNets); ``lr_schedule``: ``"constant"`` or ``"cosine"`` (annealed to 0 over the run).
    """

    steps: int = 100
    epochs: int | None = None
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    lr_schedule: str = "constant"

    def __post_init__(self):
        if self.epochs is None:
            check_count("steps", self.steps)
        else:
            check_count("epochs", self.epochs)
        check_count("batch_size", self.batch_size)
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InputError(f"learning_rate: expected a finite number > 0, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.optimizer == "sgd":
            sgd(self.learning_rate, self.momentum, self.weight_decay, self.nesterov)  # validates

    def schedule(self, key, num_samples: int):
        """The run's minibatch indices, ``[total_steps, batch_size]`` int32 (NumPy).

        Args: key: a JAX key; num_samples: the training rows n. Raises: InputError: ``batch_size`` > n.
        """
        if self.epochs is not None:
            return epoch_schedule(key, num_samples, self.batch_size, self.epochs)
        return random_batch_schedule(key, num_samples, self.batch_size, self.steps)

    def total_steps(self, num_samples: int) -> int:
        """The run's number of steps. Args: num_samples: the training rows."""
        return self.steps if self.epochs is None else (num_samples // self.batch_size) * self.epochs

    def tx(self, num_samples: int):
        """The optimizer; None: kdjax's default (``adam(learning_rate)``, state built on the host).

        Args: num_samples: the training rows (a cosine schedule's length depends on them).
        """
        return _make_tx(self._tx_key(num_samples))

    def _tx_key(self, num_samples: int) -> tuple:
        opt = (self.momentum, self.weight_decay, self.nesterov) if self.optimizer == "sgd" else ()
        total = self.total_steps(num_samples) if self.lr_schedule == "cosine" else None
        return (self.optimizer, self.learning_rate, opt, total)

    def describe(self) -> str:
        if self.epochs is not None:
            text = f"{self.epochs} epochs (shuffled passes) of batch {self.batch_size}"
        else:
            text = f"{self.steps} steps (one random minibatch of {self.batch_size} each)"
        if self.optimizer == "sgd":
            text += (f"; SGD lr {self.learning_rate:g}, momentum {self.momentum:g}"
                     f"{' (Nesterov)' if self.nesterov else ''}, weight decay {self.weight_decay:g}")
        else:
            text += f"; Adam lr {self.learning_rate:g}"
        return text + (", cosine schedule" if self.lr_schedule == "cosine" else "")


def _make_tx(key: tuple):
    optimizer, lr, opt, total = key
    if total is not None:
        lr = cosine_schedule(lr, total)
    elif optimizer == "adam":
        return None
    return sgd(lr, *opt) if optimizer == "sgd" else adam(lr)


class Programs:
    """The compiled training programs of workflow calls, held by the caller: pass one ``Programs()``
    as ``programs=`` to several calls (``fit``, ``fit_members``, ``kdjax.workflows.distill``, ...) on
    the same models and shapes and each program compiles once; without it a call compiles its own."""

    def __init__(self):
        self._runs: dict = {}

    def __len__(self) -> int:
        return len(self._runs)

    def run(self, model, objective, tx_key: tuple, *, members: bool = False, shared_schedule: bool = False,
            member_teacher_logits: bool = False, mesh=None, members_per_group=None):
        """The jitted run for this configuration (``make_run`` or ``make_sweep_run``), kept.

        Args: model, objective: the student and its objective; tx_key: ``RunConfig._tx_key``'s;
          members: ``make_sweep_run``, whose keywords the others are (``mesh`` also ``make_run``'s).
        Returns: ``run(state, data, schedule, rng, ...) -> (state, metrics)``.
        """
        key = (model, objective, tx_key, members, shared_schedule, member_teacher_logits, mesh, members_per_group)
        if key not in self._runs:
            tx = _make_tx(tx_key)
            self._runs[key] = (sweeps.make_sweep_run(model, objective, tx=tx, shared_schedule=shared_schedule,
                                                     member_teacher_logits=member_teacher_logits, mesh=mesh,
                                                     members_per_group=members_per_group)
                               if members else make_run(model, objective, tx=tx, mesh=mesh))
        return self._runs[key]


def _chunks(total: int, size: int | None) -> list[tuple[int, int]]:
    """``(start, end)`` of each compiled call: ``size`` steps each, or about 20 equal chunks (a divisor
    of ``total`` giving 5 to 40, as a shorter last chunk is one more compile; else ``ceil(total / 20)``)."""
    if not size:
        fits = [d for d in range(max(1, total // 40), total // 5 + 1) if total % d == 0 and 5 <= total // d <= 40]
        size = min(fits, key=lambda d: abs(total // d - 20)) if fits else max(1, -(-total // 20))
    return [(a, min(a + size, total)) for a in range(0, total, size)]


def _on_device(a):
    # jax.device_put copies host data as is; jnp.asarray would compile a program per new shape
    return a if isinstance(a, jax.Array) else jax.device_put(np.asarray(a))


def _device_data(ds: Dataset, teacher_logits=None, teacher_features=None, index: bool = False,
                 extra=None) -> dict:
    d = {"x": _on_device(ds.x_train), "y": _on_device(ds.y_train)}
    for key, value in (extra or {}).items():
        if key in ("x", "y", "teacher_logits", "teacher_features", "index"):
            raise InputError(f"extra_data: {key!r} is kdjax's own entry; expected other names")
        d[key] = _on_device(value)
    if teacher_logits is not None:
        d["teacher_logits"] = _on_device(teacher_logits)
    if teacher_features is not None:
        d["teacher_features"] = {k: _on_device(v) for k, v in teacher_features.items()}
    if index:  # each example's row (CRD's memory bank)
        d["index"] = _on_device(np.arange(len(ds.y_train), dtype=np.int32))
    return d


def _example(model, ds: Dataset) -> jax.ShapeDtypeStruct:
    if np.issubdtype(ds.x_train.dtype, np.integer):  # token ids
        return jax.ShapeDtypeStruct((1, *ds.input_shape), ds.x_train.dtype)
    return jax.ShapeDtypeStruct((1, *ds.input_shape), getattr(model, "dtype", jnp.float32))


def teacher_logits_for(teacher, teacher_state, ds: Dataset, members: bool = False):
    """The eval-mode teacher's logits on every training example (computed once).

    Args:
      teacher: the module; teacher_state: its ``TrainState`` (or a params tree for a stateless
        model); ds: the dataset; members: ``teacher_state`` is batched (one teacher per member).
    Returns: ``[n, classes]`` (``[N, n, classes]`` with ``members``), on device.
    """
    return predict_logits(teacher, teacher_state, _on_device(ds.x_train), members=members)


def teacher_features_for(teacher, teacher_state, taps, ds: Dataset, members: bool = False) -> dict:
    """The eval-mode teacher's taps on every training example (computed once; ``features.capture``).

    Args: teacher, teacher_state, ds, members: as ``teacher_logits_for``; taps: the tap names.
    Returns: ``{tap: [n, ...]}`` (``[N, n, ...]`` with ``members``). Raises: InputError: an unknown tap.
    """
    return _teacher_features(teacher, tuple(taps), teacher_state.variables, _on_device(ds.x_train), bool(members))


@functools.partial(jax.jit, static_argnames=("teacher", "taps", "members"))
def _teacher_features(teacher, taps, variables, x, members):
    one = lambda v: capture(teacher, v, x, list(taps))[1]
    return jax.vmap(one)(variables) if members else one(variables)


def evaluate_on(model, state, x, y, members: bool = False) -> dict:
    """``{"loss": mean CE, "accuracy"}`` in eval mode (``train.evaluate``), NumPy; ``[N]`` each with ``members``.

    Args: model, state: the module and its ``TrainState``; x, y: inputs, labels; members: batched.
    """
    out = evaluate(model, state, _on_device(x), _on_device(y), members=members)
    return {k: parallel.to_host(v) for k, v in out.items()}


def fit(model, objective, ds: Dataset, cfg: RunConfig, seed: int, *,
        hyper: Hyper | None = None, teacher_logits=None, state=None,
        chunk: int | None = None, on_chunk: Callable[[int, int, object], None] | None = None, mesh=None,
        programs: Programs | None = None):
    """Train one model: member i of ``fit_members`` is ``fit`` with ``seeds[i]`` (the same keys).

    Args:
      model, objective: the student and its objective (``kdjax.objectives.as_objective``'s forms).
      ds, cfg, seed: the data, the ``RunConfig``, the seed of init, minibatches and dropout.
      hyper, teacher_logits: the objective's ``Hyper``; the teacher's, cached, ``[n, classes]``.
      state: continue from it; chunk: steps per compiled call (default: about 20 calls).
      on_chunk: ``on_chunk(done, total, state)``; mesh: its ``"data"`` axis splits minibatches.
      programs: a ``Programs`` to reuse (default: compiled for this call alone).
    Returns: ``(state, losses [steps] as NumPy)``.
    """
    keys = {k: v[0] for k, v in sweeps.member_keys([seed]).items()}
    schedule = cfg.schedule(keys["schedule"], len(ds.y_train))
    if state is None:
        state = create_train_state(model, keys["init"], _example(model, ds), learning_rate=cfg.learning_rate,
                                   tx=cfg.tx(len(ds.y_train)))
    data = _device_data(ds, teacher_logits)
    programs = Programs() if programs is None else programs  # not `or`: an empty Programs is falsy
    run = programs.run(model, objective, cfg._tx_key(len(ds.y_train)),
                       mesh=None if mesh is None else parallel.data_only(mesh))
    losses = []
    for a, b in _chunks(len(schedule), chunk):
        state, m = run(state, data, schedule[a:b], keys["dropout"], hyper)
        losses.append(m["loss"])
        if on_chunk is not None:
            on_chunk(b, len(schedule), state)
    return state, np.concatenate([parallel.to_host(x) for x in losses])


def initial_members(model, ds: Dataset, cfg: RunConfig, seeds, *, objective=None, teacher=None, teacher_state=None,
                    per_seed_teacher: bool = False, mesh=None):
    """The batched initial ``TrainState`` ``fit_members`` starts from (one member per seed).

    Args:
      model, ds, cfg, seeds: as ``fit_members``; mesh: create it sharded there (no ``init`` hook).
      objective: with an ``init`` hook (feature connectors, CRD's heads and bank) each member gets
        its own parts, from its init key, shaped from ``teacher`` and ``teacher_state`` (one
        teacher, or one per seed, batched, with ``per_seed_teacher``)."""
    keys = sweeps.member_keys(np.asarray(seeds))
    tx = cfg.tx(len(ds.y_train))
    init = getattr(objective, "init", None)
    if init is None:
        return sweeps.init_members(model, keys["init"], _example(model, ds), cfg.learning_rate, tx=tx, mesh=mesh)
    params, model_state = init_variables(model, keys["init"], _example(model, ds), members=True)
    example = jax.ShapeDtypeStruct((2, *_example(model, ds).shape[1:]), _example(model, ds).dtype)
    members = []
    for i, k in enumerate(keys["init"]):
        # member i on the host: indexing device arrays would compile a program per leaf shape
        t_state = jax.tree_util.tree_map(lambda a: parallel.to_host(a)[i], teacher_state) if per_seed_teacher \
            else teacher_state
        one = jax.tree_util.tree_map(lambda a: a[i], (params, model_state))
        # the connectors' key: the member's init words, folded (the student's own init is unchanged)
        members.append(init(np.asarray(k) ^ np.uint32(0x9E3779B9), model, *one,
                            teacher=Teacher(teacher, as_variables(t_state)), example=example, labels=ds.y_train))
    params, model_state = jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(x) for x in a]), *members)
    return state_from_params(params, model_state=model_state, learning_rate=cfg.learning_rate, tx=tx, members=True)


def _member_inputs(ds: Dataset, cfg: RunConfig, seeds, teacher_logits):
    """``(keys, schedules, shared schedule?, one teacher per member?)`` of ``fit_members``."""
    keys = sweeps.member_keys(seeds)
    n = len(ds.y_train)
    if len(set(seeds.tolist())) == 1:  # one schedule shared by every member
        schedules = cfg.schedule(keys["schedule"][0], n)
    else:
        schedules = np.stack([cfg.schedule(k, n) for k in keys["schedule"]])
    # one teacher's logits have one axis more than the labels; one teacher per member, two more
    per_member_teacher = teacher_logits is not None and np.ndim(teacher_logits) == np.ndim(ds.y_train) + 2
    return keys, schedules, schedules.ndim == 2, per_member_teacher


def fit_members(model, objective, ds: Dataset, cfg: RunConfig, seeds: Sequence[int], *,
                hyper: Hyper | None = None, teacher_logits=None,
                chunk: int | None = None, on_chunk: Callable[[int, int, object], None] | None = None,
                start=None, on_checkpoint=None, mesh=None, members_per_group: int | None = None,
                programs: Programs | None = None, on_losses: Callable[[int, jax.Array], None] | None = None,
                teacher_features=None, init_states=None, extra_data=None, teacher_variables=None,
                member_teachers: bool = False):
    """Train N models at once (one vmapped program), one per seed (and per hyper entry).

    Members with equal seeds share init and minibatches; keys depend only on the seeds, dropout keys
    on the step: a resumed run ends bitwise as an uninterrupted one (same ``members_per_group``).

    Args:
      model, objective, ds, cfg, chunk, programs: as ``fit``.
      seeds: ``[N]`` (all equal: one schedule shared by all members); hyper: ``[N]`` fields.
      teacher_logits: one teacher's ``[n, classes]`` (an LM's ``[n, length, vocab]``) or one per member, ``[N, ...]``.
      start: ``(states, losses_so_far)``: continue a run of the same config from step
        ``losses_so_far.shape[1]`` (a chunk boundary, with the same ``chunk``).
      on_checkpoint, on_losses, on_chunk: after every chunk, in order: ``(done, states, losses so
        far)``, ``(first step, the chunk's losses [N, k] on device)``, ``(done, total, states)``.
      mesh: splits the members over its ``"members"`` axis, their minibatches over ``"data"``.
      members_per_group: as ``sweep.make_sweep_run`` (None: one vmap of all; ``time_group_sizes`` picks by timing).
      teacher_features, init_states: for an objective with taps: ``teacher_features_for``'s (laid
        out like ``teacher_logits``) and ``initial_members``' with the objective.
      extra_data: more per-example arrays (rows aligned with ``ds``'s; e.g. a cached top-k).
      teacher_variables: an online teacher's (on-policy methods); one per member with ``member_teachers``.
    Returns: ``(batched state, losses [N, steps] as NumPy)``.
    Raises: InputError: ``start`` off a chunk boundary; an ``extra_data`` name kdjax uses itself.
    """
    seeds = np.asarray(seeds)
    keys, schedules, shared, per_member_teacher = _member_inputs(ds, cfg, seeds, teacher_logits)
    if teacher_variables is not None:
        per_member_teacher = bool(member_teachers)
    n = len(ds.y_train)
    programs = Programs() if programs is None else programs  # not `or`: an empty Programs is falsy
    run = programs.run(model, objective, cfg._tx_key(n), members=True, shared_schedule=shared,
                       member_teacher_logits=per_member_teacher, mesh=mesh, members_per_group=members_per_group)
    index = getattr(objective, "needs_index", False)
    data = _device_data(ds, teacher_logits, teacher_features, index, extra_data)
    args = (hyper,) if teacher_variables is None else (hyper, teacher_variables)
    if start is None:
        states = init_states if init_states is not None else initial_members(model, ds, cfg, seeds, mesh=mesh)
        losses, done = [], 0
    else:
        states, so_far = start
        losses, done = [np.asarray(so_far)], int(np.shape(so_far)[1])
        if mesh is not None:  # placed as the run leaves them, even when no step is left to run
            states = parallel.put(states, parallel.model_shardings(states, mesh, members=True))
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
            losses = [np.concatenate([parallel.to_host(x) for x in losses], axis=1)]
            on_checkpoint(b, states, losses[0])
        if on_losses is not None:
            on_losses(a, m["loss"])
        if on_chunk is not None:
            on_chunk(b, total, states)
    return states, np.concatenate([parallel.to_host(x) for x in losses], axis=1)


def time_group_sizes(model, objective, ds: Dataset, cfg: RunConfig, seeds: Sequence[int], *,
                     hyper: Hyper | None = None, teacher_logits=None, chunk: int | None = None):
    """``sweep.pick_members_per_group`` on the first chunk of the run ``fit_members`` would do.

    Args: model, objective, ds, cfg, seeds, hyper, teacher_logits, chunk: as ``fit_members``.
    Returns: ``(members_per_group, {candidate: median seconds})``.
    """
    seeds = np.asarray(seeds)
    keys, schedules, shared, per_member_teacher = _member_inputs(ds, cfg, seeds, teacher_logits)
    a, b = _chunks(schedules.shape[-2], chunk)[0]
    first = schedules[a:b] if shared else schedules[:, a:b]
    return sweeps.pick_members_per_group(
        model, objective, initial_members(model, ds, cfg, seeds), _device_data(ds, teacher_logits), first,
        keys["dropout"], hyper, tx=cfg.tx(len(ds.y_train)), shared_schedule=shared,
        member_teacher_logits=per_member_teacher)


def paired_students(seeds, teacher_logits, temperature: float, alpha: float, *,
                    per_seed: bool | None = None) -> dict:
    """``fit_members`` keyword arguments (``seeds``, ``hyper``, ``teacher_logits``) training standard
    (members 0..n-1: alpha = 0 makes ``distillation_loss`` exactly the CE, bitwise; see
    tests/test_step.py) and distilled students (n..2n-1) as one vmapped program; i and n + i share
    seed i, hence init, minibatches and a per-seed teacher. Split results with ``[:n]``, ``[n:]``.

    Args:
      seeds: the n seeds; temperature, alpha: the distilled members'.
      teacher_logits: per seed ``[n, examples, classes]``, or one teacher's, shared; per_seed: which
        (default: 3-D logits are per seed; pass it for sequence models, whose are 3-D too).
    Raises: InputError: per-seed logits for another number of seeds.
    """
    seeds, logits = np.asarray(seeds), parallel.to_host(teacher_logits)
    n = len(seeds)
    if per_seed if per_seed is not None else logits.ndim == 3:
        if logits.shape[0] != n:
            raise InputError(f"teacher_logits: expected one teacher per seed ({n}), got {logits.shape[0]}")
        logits = np.concatenate([logits, logits])
    return {"seeds": np.concatenate([seeds, seeds]),
            "hyper": make_hyper(np.full(2 * n, temperature), np.repeat([0.0, alpha], n)),
            "teacher_logits": logits}
