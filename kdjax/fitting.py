"""Training runs on a ``Dataset``: one model or N at once, fed in compiled chunks.

* ``RunConfig``: how long, how to batch, the optimizer (torch-equal Adam or SGD).
* ``fit`` / ``fit_members``: train one model, or N at once (one vmapped program), as a
  compiled ``lax.scan`` fed in chunks (a callback runs between chunks, never per step),
  resumable from a chunk boundary.
* ``Programs``: the compiled programs, owned by the caller (no global cache).
* ``paired_students``, ``teacher_logits_for``, ``evaluate_on``: the pieces the
  workflows (``kdjax.workflows``) compose.

Results are plain NumPy arrays and dicts.
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
from kdjax.data import Dataset, epoch_schedule, seed_schedule
from kdjax.errors import InputError, check_count
from kdjax.features.taps import capture
from kdjax.objectives import Teacher, as_variables
from kdjax.train import (Hyper, adam, cosine_schedule, create_train_state, evaluate, init_variables, make_hyper,
                         make_run, predict_logits, sgd, state_from_params)

__all__ = ["RunConfig", "Programs", "fit", "fit_members", "initial_members", "time_group_sizes", "paired_students",
           "teacher_logits_for", "teacher_features_for", "evaluate_on", "OnChunk", "OnLosses"]

# on_chunk(phase, steps done, steps total, states): called after every compiled chunk
OnChunk = Callable[[str, int, int, object], None]
# on_losses(phase, first step of the chunk, the chunk's losses [members, steps] as a device
# array): the per-step training losses, also between chunks (never a host copy of its own)
OnLosses = Callable[[str, int, jax.Array], None]
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How long, how to batch, and the optimizer.

    ``steps``: the seed's "epochs" — one random minibatch (without replacement) per
    step. ``epochs``: real shuffled passes (overrides ``steps`` when set).
    ``optimizer``: ``"adam"`` (the seed's) or ``"sgd"`` (``momentum``,
    ``weight_decay``, ``nesterov``, as KD papers train ResNets); ``lr_schedule``:
    ``"constant"`` or ``"cosine"`` (annealed to 0 over the run, per step).
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
        if self.epochs is not None:
            return epoch_schedule(key, num_samples, self.batch_size, self.epochs)
        return seed_schedule(key, num_samples, self.batch_size, self.steps)

    def total_steps(self, num_samples: int) -> int:
        return self.steps if self.epochs is None else (num_samples // self.batch_size) * self.epochs

    def tx(self, num_samples: int):
        """The optimizer for a run over ``num_samples`` examples; None means kdjax's
        default (``adam(learning_rate)``, whose state is built on the host)."""
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
    """The compiled training programs of workflow calls, held by the caller.

    Every workflow function (``fit``, ``fit_members``, ``kdjax.workflows.distill``, ...)
    takes ``programs=``: pass one ``Programs()`` to several calls on the same models and
    shapes (a CLI command, the demo) and each program compiles once; leave it out and a
    call compiles its own, dropped when it returns. Nothing is kept anywhere else.
    """

    def __init__(self):
        self._runs: dict = {}

    def __len__(self) -> int:
        return len(self._runs)

    def run(self, model, objective, tx_key: tuple, *, members: bool = False, shared_schedule: bool = False,
            member_teacher_logits: bool = False, mesh=None, members_per_group=None):
        """The jitted run for this configuration (``make_run`` or ``make_sweep_run``)."""
        key = (model, objective, tx_key, members, shared_schedule, member_teacher_logits, mesh, members_per_group)
        if key not in self._runs:
            tx = _make_tx(tx_key)
            self._runs[key] = (sweeps.make_sweep_run(model, objective, tx=tx, shared_schedule=shared_schedule,
                                                     member_teacher_logits=member_teacher_logits, mesh=mesh,
                                                     members_per_group=members_per_group)
                               if members else make_run(model, objective, tx=tx, mesh=mesh))
        return self._runs[key]


def _chunks(total: int, size: int | None) -> list[tuple[int, int]]:
    """``(start, end)`` of each compiled call: ``size`` steps each (the last one shorter when
    ``size`` does not divide ``total``), or by default about 20 equal chunks for a progress
    bar: a divisor of ``total`` that gives 5 to 40 chunks, the count nearest 20, since a
    shorter last chunk is another program to compile (else ``ceil(total / 20)`` steps)."""
    if not size:
        fits = [d for d in range(max(1, total // 40), total // 5 + 1) if total % d == 0 and 5 <= total // d <= 40]
        size = min(fits, key=lambda d: abs(total // d - 20)) if fits else max(1, -(-total // 20))
    return [(a, min(a + size, total)) for a in range(0, total, size)]


def _on_device(a):
    # jax.device_put copies host data as is; jnp.asarray would compile a small program
    # per new shape on the way (JAX 0.10)
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

    ``teacher_state`` is a ``TrainState`` (or a params tree for a stateless model).
    With ``members=True`` it is batched (one teacher per member) and the result is
    ``[N, n, classes]``.
    """
    return predict_logits(teacher, teacher_state, _on_device(ds.x_train), members=members)


def teacher_features_for(teacher, teacher_state, taps, ds: Dataset, members: bool = False) -> dict:
    """``{tap: values on every training example}`` of the eval-mode teacher (computed once;
    ``kdjax.features.capture``). With ``members=True`` one teacher per member: ``[N, n, ...]``."""
    params, model_state = teacher_state.params, teacher_state.model_state
    return _teacher_features(teacher, tuple(taps), params, model_state, _on_device(ds.x_train), bool(members))


@functools.partial(jax.jit, static_argnames=("teacher", "taps", "members"))
def _teacher_features(teacher, taps, params, model_state, x, members):
    def one(p, s):
        return capture(teacher, {"params": p, **s}, x, list(taps))[1]
    return jax.vmap(one)(params, model_state) if members else one(params, model_state)


def evaluate_on(model, state, x, y, members: bool = False) -> dict:
    """``{"loss", "accuracy"}`` as NumPy (``[N]`` arrays when ``members``)."""
    out = evaluate(model, state, _on_device(x), _on_device(y), members=members)
    return {k: parallel.to_host(v) for k, v in out.items()}


def fit(model, objective, ds: Dataset, cfg: RunConfig, seed: int, *,
        hyper: Hyper | None = None, teacher_logits=None, state=None,
        chunk: int | None = None, on_chunk: Callable[[int, int, object], None] | None = None, mesh=None,
        programs: Programs | None = None):
    """Train one model; returns ``(state, losses [steps] as NumPy)``.

    Keys come from ``seed`` exactly as in ``fit_members``, so member i of a sweep
    equals ``fit`` with ``seeds[i]``. Pass ``state`` to continue from it. A ``mesh``
    (its ``"data"`` axis) splits every minibatch over devices.
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
    args, losses = (hyper,) if objective != "ce" else (), []
    for a, b in _chunks(len(schedule), chunk):
        state, m = run(state, data, schedule[a:b], keys["dropout"], *args)
        losses.append(m["loss"])
        if on_chunk is not None:
            on_chunk(b, len(schedule), state)
    return state, np.concatenate([parallel.to_host(x) for x in losses])


def initial_members(model, ds: Dataset, cfg: RunConfig, seeds, *, objective=None, teacher=None, teacher_state=None,
                    per_seed_teacher: bool = False, mesh=None):
    """The batched initial state ``fit_members`` starts from (one member per seed); with a
    ``mesh``, created sharded on it (``sweep.init_members(..., mesh=)``).

    With an ``objective`` that has an ``init`` hook (the protocol's: a feature objective's
    connectors, CRD's heads and bank), each member also gets its own parts, shaped from
    ``teacher`` (``teacher_state``: one teacher, or one per seed with ``per_seed_teacher``)
    and drawn from the member's init key."""
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
    # one teacher's logits have one more axis than the labels ([n, classes], or [n, length,
    # vocab] for a language model); one teacher per member, two more
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

    ``hyper`` fields, when given, are ``[N]`` arrays aligned with ``seeds``;
    ``teacher_logits`` is ``[n, classes]`` (one teacher) or ``[N, n, classes]`` (one per
    member; for a language model ``[n, length, vocab]`` or ``[N, n, length, vocab]``).
    Members with equal seeds share init and minibatches (a paired design); when all
    seeds are equal, one schedule is shared by all members. ``members_per_group``: as in
    ``sweep.make_sweep_run`` (None: one vmap of all; ``time_group_sizes`` below
    chooses by timing).

    Resuming: ``start=(states, losses_so_far)`` continues a run of the same config
    from step ``losses_so_far.shape[1]`` (a chunk boundary, with the same ``chunk``);
    ``on_checkpoint(done, states, losses_so_far)`` is called after every chunk, then
    ``on_losses(first step, the chunk's losses [N, k])`` (a device array), then
    ``on_chunk(done, total, states)``. Keys
    depend only on the seeds and dropout keys on the step count, so a resumed run
    ends bitwise where an uninterrupted one does (with the same ``members_per_group``).
    A ``mesh`` splits the members over its ``"members"`` axis and their minibatches
    over ``"data"`` (``make_sweep_run``). Returns ``(batched state, losses [N, steps]
    as NumPy)``.

    ``teacher_features`` (``teacher_features_for``, laid out like ``teacher_logits``) and
    ``init_states`` (``initial_members`` with the objective: the students with their
    trainable parts), for an objective with taps (a feature objective).
    ``extra_data``: more per-example arrays every member's minibatches carry (rows aligned
    with ``ds``'s training rows; e.g. a teacher's cached top-k).
    ``teacher_variables``: an online teacher's, for an objective that runs it in the step
    (an on-policy method); one per member, batched, with ``member_teachers``.
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
    """``sweep.pick_members_per_group`` on the first chunk of the run ``fit_members``
    would do with these arguments: ``(members_per_group, {candidate: median seconds})``."""
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
    """``fit_members`` keyword arguments (``seeds``, ``hyper``, ``teacher_logits``) that
    train standard and distilled students as one vmapped program.

    With n seeds: members 0..n-1 are standard students, because alpha = 0 makes
    ``distillation_loss`` exactly the hard-label cross-entropy (bitwise; see
    tests/test_train.py); members n..2n-1 distill at ``temperature`` and ``alpha``.
    Members i and n + i share seed i, hence init and minibatches, and teacher i when
    ``teacher_logits`` is per seed (``[n, examples, classes]``); a single teacher's
    ``[examples, classes]`` is shared by all. Split results with ``[:n]`` and ``[n:]``.
    ``per_seed`` says which it is (default: 3-D logits are per seed; pass it for
    sequence models, whose single teacher's logits are 3-D too).
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
