"""Whole workflows on a ``Dataset``: the application layer the CLI and the demo share.

* ``fit`` / ``fit_members``: train one model, or N at once (one vmapped program), as
  a compiled ``lax.scan`` fed in chunks (a callback runs between chunks, never per step).
* ``distill``: teachers (one per seed, or one loaded) -> standard and distilled
  students (paired seeds, one program) -> evaluation -> statistics, with crash-safe
  checkpoints and exact resume.
* ``sweep``: one teacher, then a student per (temperature, alpha, seed) member.

Results are plain NumPy arrays and dicts. Unlike the library modules, this module
may keep process-wide caches (one compiled program per configuration).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from kdjax import checkpoint, data, parallel, sweep as sweeps
from kdjax.data import Dataset, epoch_schedule, seed_schedule
from kdjax.errors import InputError, check_count
from kdjax.train import (Hyper, adam, cosine_schedule, create_train_state, evaluate, make_hyper, make_run,
                         predict_logits, sgd)

__all__ = ["RunConfig", "Checkpoints", "fit", "fit_members", "pick_members_per_group", "paired_students",
           "teacher_logits_for", "evaluate_on", "distill", "DistillResult", "sweep", "SweepResult", "omit_class",
           "OmitClassResult", "match_prior_bias", "tuned_distill", "TunedResult", "mean_ci", "t975"]

# on_chunk(phase, steps done, steps total, states): called after every compiled chunk
OnChunk = Callable[[str, int, int, object], None]
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
        return _tx(self._tx_key(num_samples))

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


@functools.lru_cache(maxsize=None)
def _tx(key: tuple):
    optimizer, lr, opt, total = key
    if total is not None:
        lr = cosine_schedule(lr, total)
    elif optimizer == "adam":
        return None
    return sgd(lr, *opt) if optimizer == "sgd" else adam(lr)


@functools.lru_cache(maxsize=None)
def _cached_run(model, objective, members, shared_schedule, member_teacher_logits, tx_key, mesh=None,
                members_per_group=None):
    # One compiled program per configuration, reused by every later fit.
    tx = _tx(tx_key)
    if members:
        return sweeps.make_sweep_run(model, objective, tx=tx, shared_schedule=shared_schedule,
                                     member_teacher_logits=member_teacher_logits, mesh=mesh,
                                     members_per_group=members_per_group)
    return make_run(model, objective, tx=tx, mesh=mesh)


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


def evaluate_on(model, state, x, y, members: bool = False) -> dict:
    """``{"loss", "accuracy"}`` as NumPy (``[N]`` arrays when ``members``)."""
    out = evaluate(model, state, _on_device(x), _on_device(y), members=members)
    return {k: parallel.to_host(v) for k, v in out.items()}


def fit(model, objective, ds: Dataset, cfg: RunConfig, seed: int, *,
        hyper: Hyper | None = None, teacher_logits=None, state=None,
        chunk: int | None = None, on_chunk: Callable[[int, int, object], None] | None = None, mesh=None):
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
    run = _cached_run(model, objective, False, False, False, cfg._tx_key(len(ds.y_train)),
                      None if mesh is None else parallel.data_only(mesh))
    args, losses = (hyper,) if objective != "ce" else (), []
    for a, b in _chunks(len(schedule), chunk):
        state, m = run(state, data, schedule[a:b], keys["dropout"], *args)
        losses.append(m["loss"])
        if on_chunk is not None:
            on_chunk(b, len(schedule), state)
    return state, np.concatenate([parallel.to_host(x) for x in losses])


def init_members(model, ds: Dataset, cfg: RunConfig, seeds):
    """The batched initial state ``fit_members`` starts from (one member per seed)."""
    keys = sweeps.member_keys(np.asarray(seeds))
    return sweeps.init_members(model, keys["init"], _example(model, ds), cfg.learning_rate,
                               tx=cfg.tx(len(ds.y_train)))


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
                start=None, on_checkpoint=None, mesh=None, members_per_group: int | None = None):
    """Train N models at once (one vmapped program), one per seed (and per hyper entry).

    ``hyper`` fields, when given, are ``[N]`` arrays aligned with ``seeds``;
    ``teacher_logits`` is ``[n, classes]`` (one teacher) or ``[N, n, classes]`` (one per
    member; for a language model ``[n, length, vocab]`` or ``[N, n, length, vocab]``).
    Members with equal seeds share init and minibatches (a paired design); when all
    seeds are equal, one schedule is shared by all members. ``members_per_group``: as in
    ``sweep.make_sweep_run`` (None: one vmap of all; ``pick_members_per_group`` below
    chooses by timing).

    Resuming: ``start=(states, losses_so_far)`` continues a run of the same config
    from step ``losses_so_far.shape[1]`` (a chunk boundary, with the same ``chunk``);
    ``on_checkpoint(done, states, losses_so_far)`` is called after every chunk. Keys
    depend only on the seeds and dropout keys on the step count, so a resumed run
    ends bitwise where an uninterrupted one does (with the same ``members_per_group``).
    A ``mesh`` splits the members over its ``"members"`` axis and their minibatches
    over ``"data"`` (``make_sweep_run``). Returns ``(batched state, losses [N, steps]
    as NumPy)``.
    """
    seeds = np.asarray(seeds)
    keys, schedules, shared, per_member_teacher = _member_inputs(ds, cfg, seeds, teacher_logits)
    n = len(ds.y_train)
    run = _cached_run(model, objective, True, shared, per_member_teacher, cfg._tx_key(n), mesh, members_per_group)
    data, args = _device_data(ds, teacher_logits), (hyper,)
    if start is None:
        states, losses, done = init_members(model, ds, cfg, seeds), [], 0
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
            losses = [np.concatenate([parallel.to_host(x) for x in losses], axis=1)]
            on_checkpoint(b, states, losses[0])
        if on_chunk is not None:
            on_chunk(b, total, states)
    return states, np.concatenate([parallel.to_host(x) for x in losses], axis=1)


def pick_members_per_group(model, objective, ds: Dataset, cfg: RunConfig, seeds: Sequence[int], *,
                           hyper: Hyper | None = None, teacher_logits=None, chunk: int | None = None):
    """``sweep.pick_members_per_group`` on the first chunk of the run ``fit_members``
    would do with these arguments: ``(members_per_group, {candidate: median seconds})``."""
    seeds = np.asarray(seeds)
    keys, schedules, shared, per_member_teacher = _member_inputs(ds, cfg, seeds, teacher_logits)
    a, b = _chunks(schedules.shape[-2], chunk)[0]
    first = schedules[a:b] if shared else schedules[:, a:b]
    return sweeps.pick_members_per_group(
        model, objective, init_members(model, ds, cfg, seeds), _device_data(ds, teacher_logits), first,
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


# ----------------------------------------------------------------------------- workflows

@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """Where a workflow checkpoints each phase (``<directory>/<phase>.ckpt``, every
    ``every`` steps; default ~5% of the run) and whether it resumes from them.
    ``identity`` (JSON-able) is stored with them: resuming under another is refused."""

    directory: str
    every: int | None = None
    resume: bool = False
    identity: dict | None = None


def _phase(name, model, objective, ds, cfg, seeds, *, checkpoints: Checkpoints | None,
           on_chunk: OnChunk | None, log: Callable[[str], None], chunk=None, mesh=None, **kw):
    """``fit_members`` as a named phase: checkpointed and resumable under ``checkpoints``."""
    start, save = None, None
    if checkpoints is not None:
        path = os.path.join(checkpoints.directory, f"{name}.ckpt")
        identity = checkpoints.identity or {}
        chunk = checkpoints.every
        if checkpoints.resume:
            try:
                tree, meta, used, problem = checkpoint.load_latest(path)
            except FileNotFoundError:
                tree = None
            if tree is not None:
                if problem:
                    log(f"warning: {problem}; resuming from {used}")
                _check_resumable(used, meta, name, _model_text(model), identity)
                fresh = init_members(model, ds, cfg, seeds)
                start = (_restore_states(used, fresh, tree), np.asarray(tree["losses"]))
                log(f"{name}: resuming at step {start[1].shape[1]} from {used}")

        def save(done, states, losses):
            checkpoint.save_rotating(path, {"states": states, "losses": losses},
                                     {"config": identity, "phase": name, "model": _model_text(model), "done": done})

    progress = None if on_chunk is None else (lambda done, total, states: on_chunk(name, done, total, states))
    if mesh is not None and len(seeds) % mesh.shape["members"]:
        mesh = parallel.data_only(mesh)  # e.g. a sweep's single teacher
    return fit_members(model, objective, ds, cfg, seeds, chunk=chunk, start=start, on_checkpoint=save,
                       on_chunk=progress, mesh=mesh, **kw)


def _model_text(model) -> str:
    """``TeacherMLP(hidden_dim=256, num_classes=5, ...)``: a module's configuration, one line."""
    fields = [f for f in dataclasses.fields(model) if f.name not in ("parent", "name")]
    value = lambda v: getattr(v, "__name__", v)
    return f"{type(model).__name__}({', '.join(f'{f.name}={value(getattr(model, f.name))!r}' for f in fields)})"


def _check_resumable(used: str, meta: dict, phase: str, model: str, identity: dict) -> None:
    """One line when a checkpoint belongs to another phase, model or configuration."""
    if meta.get("phase") != phase or meta.get("model", model) != model:
        raise InputError(f"resume: {used} holds the {meta.get('phase')!r} phase of {meta.get('model')}, expected "
                         f"the {phase!r} phase of {model}; use a new --out")
    old = meta.get("config") or {}
    if old != identity:
        unset = "(not set)"
        diffs = [f"{k}: {old.get(k, unset)!r} in the checkpoint, {identity.get(k, unset)!r} now"
                 for k in sorted(set(old) | set(identity), key=str) if old.get(k, unset) != identity.get(k, unset)]
        raise InputError(f"resume: {used} was written with other settings ({'; '.join(diffs)}); "
                         f"use the same ones or a new --out")


def _restore_states(used: str, fresh, tree):
    """The saved member states in ``fresh``'s structure, shapes and dtypes, or one line."""
    try:
        states = serialization.from_state_dict(fresh, tree["states"])
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"resume: {used} does not hold states of this model ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    layout = lambda tree: jax.tree_util.tree_map(lambda a: (np.shape(a), str(getattr(a, "dtype", type(a)))), tree)
    want, got = layout(fresh), layout(states)
    if want != got:
        raise InputError(f"resume: {used} holds states of other shapes than this model's; use a new --out")
    return states


def _split(ds: Dataset, split: str):
    if split not in ("train", "test"):
        raise InputError(f"split: expected 'train' or 'test', got {split!r}")
    return getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")


def _take(tree, index):
    """Members ``index`` of a batched tree, as NumPy (indexing device arrays eagerly
    would compile a small program per leaf shape; sharded ones are gathered first)."""
    return jax.tree_util.tree_map(lambda a: parallel.to_host(a)[index], tree)


@dataclasses.dataclass
class DistillResult:
    """What ``distill`` returns. Students are one batched state: members ``:n`` standard,
    ``n:`` distilled (pair i shares seed i). ``accuracy[split][model]`` is ``[n]``
    (the teacher's ``[1]`` when it was loaded); ``mean_ci[split][model]`` and
    ``paired_gain[split]`` (distilled - standard) are ``(mean, 95% CI half-width)``.
    ``eval_loss[split][model]``: the mean cross-entropy (nats; per token for
    sequence models), laid out like ``accuracy``."""

    seeds: list
    teacher: object
    teacher_losses: np.ndarray | None
    students: object
    losses: dict
    accuracy: dict
    mean_ci: dict
    paired_gain: dict
    eval_loss: dict = dataclasses.field(default_factory=dict)

    @property
    def standard(self):
        return _take(self.students, slice(None, len(self.seeds)))

    @property
    def distilled(self):
        return _take(self.students, slice(len(self.seeds), None))

    def teacher_member(self, i: int = 0):
        """Teacher i (the loaded teacher when there is one)."""
        return self.teacher if self.teacher_losses is None else _take(self.teacher, i)


def distill(teacher, student, ds: Dataset, cfg: RunConfig, seeds: Sequence[int], *,
            temperature: float = 3.0, alpha: float = 0.7, teacher_state=None,
            splits: Sequence[str] = ("test",), checkpoints: Checkpoints | None = None,
            chunk: int | None = None, on_chunk: OnChunk | None = None,
            log: Callable[[str], None] = lambda line: None, mesh=None,
            transfer: Dataset | None = None, teacher_cfg: RunConfig | None = None) -> DistillResult:
    """Teacher -> standard and distilled students -> evaluation -> statistics.

    1. Teachers: one per seed, trained with cross-entropy (phase ``"teachers"``), or
       ``teacher_state`` (a loaded ``TrainState``) for every seed; ``teacher_cfg`` (default
       ``cfg``) sets the teachers' length and optimizer.
    2. Students (phase ``"students"``): for each seed a standard student (alpha = 0,
       exactly cross-entropy) and a distilled one (``temperature``, ``alpha``) from the
       same init and minibatches, all 2n as one vmapped program, distilling from the
       eval-mode teacher's cached logits. They train on the training rows of
       ``transfer`` (Hinton et al.'s transfer set; default ``ds``).
    3. Accuracy on each of ``splits`` (``"train"``, ``"test"``), mean ± 95% CI over
       seeds, and the paired gain distilled - standard.

    With ``checkpoints`` each phase is saved every ``checkpoints.every`` steps and
    ``resume`` continues from the latest good checkpoint, ending bitwise where an
    uninterrupted run ends. ``on_chunk(phase, done, total, states)`` runs between
    compiled chunks (progress bars, logging); ``log`` receives resume messages. A
    ``mesh`` (``kdjax.parallel``) splits each phase's members over ``"members"`` and
    minibatches over ``"data"``; a phase whose members it cannot split evenly uses its
    ``"data"`` axis only.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("seeds: expected at least one seed, got none")
    make_hyper(temperature, alpha)  # validates before anything trains
    n = len(seeds)
    phase = functools.partial(_phase, checkpoints=checkpoints, on_chunk=on_chunk, log=log, chunk=chunk,
                              mesh=mesh)
    transfer = ds if transfer is None else transfer
    if transfer.input_shape != ds.input_shape or transfer.num_classes != ds.num_classes:
        raise InputError(f"transfer: expected examples of shape {ds.input_shape} in {ds.num_classes} classes "
                         f"(as {ds.name}), got {transfer.input_shape} in {transfer.num_classes}")
    if teacher_state is None:
        t_states, t_losses = phase("teachers", teacher, "ce", ds, teacher_cfg or cfg, seeds)
        logits = teacher_logits_for(teacher, t_states, transfer, members=True)
    else:
        t_states, t_losses = teacher_state, None
        logits = teacher_logits_for(teacher, teacher_state, transfer)
    pairs = paired_students(seeds, logits, temperature, alpha, per_seed=teacher_state is None)
    s_states, s_losses = phase("students", student, "kd", transfer, cfg, pairs.pop("seeds"), **pairs)
    accuracy, eval_loss = {}, {}
    for split in splits:
        x, y = _split(ds, split)
        t_ev = evaluate_on(teacher, t_states, x, y, members=teacher_state is None)
        s_ev = evaluate_on(student, s_states, x, y, members=True)
        accuracy[split], eval_loss[split] = (
            {"teacher": np.atleast_1d(t_ev[k]), "standard": s_ev[k][:n], "distilled": s_ev[k][n:]}
            for k in ("accuracy", "loss"))
    stats = {sp: {k: mean_ci(v) for k, v in acc.items()} for sp, acc in accuracy.items()}
    gain = {sp: mean_ci(acc["distilled"] - acc["standard"]) for sp, acc in accuracy.items()}
    return DistillResult(seeds, t_states, t_losses, s_states,
                         {"standard": s_losses[:n], "distilled": s_losses[n:]}, accuracy, stats, gain, eval_loss)


@dataclasses.dataclass
class SweepResult:
    """What ``sweep`` returns: the batched student states, their losses ``[N, steps]``
    and accuracy ``[N]`` on the chosen split, member i at ``(temperatures[i],
    alphas[i], seeds[i])``; the teacher's state and its accuracy."""

    teacher: object
    teacher_accuracy: float
    students: object
    losses: np.ndarray
    accuracy: np.ndarray
    members_per_group: int | None = None
    pick_seconds: dict | None = None


def sweep(teacher, student, ds: Dataset, cfg: RunConfig, temperatures, alphas, seeds, *,
          teacher_state=None, teacher_seed: int | None = None, split: str = "test",
          checkpoints: Checkpoints | None = None, on_chunk: OnChunk | None = None,
          log: Callable[[str], None] = lambda line: None, mesh=None,
          members_per_group: int | str | None = None) -> SweepResult:
    """One teacher (trained at ``teacher_seed``, default the first seed, or
    ``teacher_state``), then every member ``(temperatures[i], alphas[i], seeds[i])`` as
    one vmapped program distilling from it; accuracy on ``split``. Phases and
    checkpoints as in ``distill``. ``members_per_group``: None (one vmap), a group size,
    or ``"auto"`` (``pick_members_per_group`` times the candidates on the first chunk;
    the choice and its timings are in the result)."""
    hyper = make_hyper(np.asarray(temperatures, np.float64), np.asarray(alphas, np.float64))
    seeds = np.asarray(seeds)
    if not (len(seeds) == np.size(hyper.temperature) == np.size(hyper.alpha)) or len(seeds) == 0:
        raise InputError(f"sweep: expected equal, non-zero numbers of temperatures, alphas and seeds, got "
                         f"{np.size(hyper.temperature)}, {np.size(hyper.alpha)} and {len(seeds)}")
    phase = functools.partial(_phase, checkpoints=checkpoints, on_chunk=on_chunk, log=log, mesh=mesh)
    members = teacher_state is None  # a trained teacher is a batch of one
    if members:
        first = int(seeds[0]) if teacher_seed is None else int(teacher_seed)
        teacher_state, _ = phase("teachers", teacher, "ce", ds, cfg, [first])
    logits = parallel.to_host(teacher_logits_for(teacher, teacher_state, ds, members=members))
    logits = logits[0] if members else logits
    picked = None
    if members_per_group == "auto":
        members_per_group, picked = pick_members_per_group(
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
                  mesh=None) -> TunedResult:
    """Choose (temperature, alpha) on validation data, then ``distill`` with them.

    A stratified validation split is carved from ``ds``'s training rows; ``sweep``
    trains one teacher on the rest and a student per (temperature, alpha, tuning seed)
    distilling from it; the cell with the highest mean validation accuracy wins.
    ``distill`` then runs at that cell on all of ``ds``'s training rows and reports
    test accuracy: the test set plays no part in the choice. ``checkpoints`` as in
    ``distill`` (the tuning sweep's go to its ``tuning/`` subdirectory).
    """
    tuning_seeds = list(seeds if tuning_seeds is None else tuning_seeds)
    tune = data.validation_split(ds, validation_fraction)
    T, A, S = sweeps.grid(temperatures, alphas, tuning_seeds)
    sub = None if checkpoints is None else dataclasses.replace(
        checkpoints, directory=os.path.join(checkpoints.directory, "tuning"))
    sw = sweep(teacher, student, tune, cfg, T, A, S, teacher_state=teacher_state, teacher_seed=tuning_seeds[0],
               split="test", checkpoints=sub, on_chunk=on_chunk, log=log, mesh=mesh)
    acc = sw.accuracy.reshape(len(temperatures), len(alphas), len(tuning_seeds))
    stats = [[mean_ci(cell) for cell in row] for row in acc]
    i, j = np.unravel_index(np.argmax(acc.mean(axis=2)), acc.shape[:2])
    best = (float(temperatures[i]), float(alphas[j]))
    r = distill(teacher, student, ds, cfg, seeds, temperature=best[0], alpha=best[1], teacher_state=teacher_state,
                checkpoints=checkpoints, on_chunk=on_chunk, log=log, mesh=mesh)
    return TunedResult(list(map(float, temperatures)), list(map(float, alphas)), acc, stats, best, r)


# ----------------------------------------------------------------------------- the omitted class

def match_prior_bias(logits, label: int, prior: float) -> float:
    """The shift ``b`` that, added to class ``label``'s logit, makes a fraction ``prior``
    of the rows of ``logits`` ``[n, classes]`` predict ``label`` (as near as ties allow).

    Row i predicts ``label`` exactly when ``b > margin_i = max_{j != label} z_ij - z_i,label``,
    so ``b`` is the midpoint between the ``q``-th and ``(q+1)``-th smallest margins,
    ``q = round(prior * n)``. Needs no labels: it matches the predictions to a class prior.
    """
    z = np.asarray(logits, np.float64)
    margin = np.sort(np.delete(z, label, axis=1).max(axis=1) - z[:, label])
    q = int(round(prior * len(margin)))
    if q == 0:
        return float(margin[0] - 1.0)
    if q == len(margin):
        return float(margin[-1] + 1.0)
    return float((margin[q - 1] + margin[q]) / 2)


@dataclasses.dataclass
class OmitClassResult:
    """What ``omit_class`` returns. ``accuracy[when][model][on]`` is ``[n]`` over seeds,
    ``when`` in ``("before", "after")`` the bias adjustment, ``model`` in ``("teacher",
    "standard", "distilled")`` (the teacher is never adjusted), ``on`` in ``("omitted",
    "overall")``; ``errors`` the same layout with test-error counts. ``mean_ci`` holds
    ``(mean, 95% CI half-width)`` of each, ``paired_gain[when][on]`` distilled - standard.
    ``bias[model]`` ``[n]``: the shift added to the omitted class's logit, matched to
    ``prior`` on the validation inputs (their labels unused). ``test_counts``: test
    images (``overall``, ``omitted``) and the sizes of the teacher's training rows, the
    transfer set and the validation split."""

    omitted: int
    prior: float
    result: DistillResult
    bias: dict
    accuracy: dict
    errors: dict
    mean_ci: dict
    paired_gain: dict
    test_counts: dict


def omit_class(teacher, student, ds: Dataset, cfg: RunConfig, seeds: Sequence[int], *, omit: int = 3,
               temperature: float = 3.0, alpha: float = 0.7, validation_fraction: float = 0.2,
               teacher_state=None, on_chunk: OnChunk | None = None, mesh=None) -> OmitClassResult:
    """Hinton, Vinyals & Dean (2015), section 3: a student that never sees class ``omit``.

    1. A stratified validation split is carved from ``ds``'s training rows
       (``data.validation_split``); teachers train on the rest, all classes.
    2. Standard and distilled students (paired seeds, as in ``distill``) train on the
       transfer set: the same rows without class ``omit``. The standard student has no
       signal for that class; the distilled one sees it only in the teacher's soft
       targets on the other classes.
    3. The omitted class's logit is shifted by ``b`` per student (the paper raised its
       bias by 3.5, chosen on the test set): here ``b`` makes the fraction of
       validation inputs predicted as ``omit`` equal that class's share of the
       teacher's training labels (``match_prior_bias``). The test set is used only
       to report accuracy, overall and on the omitted class, before and after.
    """
    tune = data.validation_split(ds, validation_fraction)
    train = dataclasses.replace(ds, x_train=tune.x_train, y_train=tune.y_train)
    transfer = data.without_class(train, omit)
    r = distill(teacher, student, train, cfg, seeds, temperature=temperature, alpha=alpha,
                teacher_state=teacher_state, transfer=transfer, on_chunk=on_chunk, mesh=mesh)
    n = len(r.seeds)
    prior = float(np.mean(train.y_train == omit))
    logits = lambda model, states, x, members=True: parallel.to_host(
        predict_logits(model, states, _on_device(x), members=members))
    val, test = logits(student, r.students, tune.x_test), logits(student, r.students, ds.x_test)
    t_test = logits(teacher, r.teacher, ds.x_test, teacher_state is None)
    t_test = t_test if teacher_state is None else t_test[None]  # a loaded teacher: [1, n, classes]
    bias = np.array([match_prior_bias(v, omit, prior) for v in val])
    adjusted = test.copy()
    adjusted[:, :, omit] += bias[:, None].astype(adjusted.dtype)
    is_omit = ds.y_test == omit

    def score(z):
        wrong = np.argmax(z, axis=-1) != ds.y_test
        return ({"omitted": 1 - wrong[:, is_omit].mean(1), "overall": 1 - wrong.mean(1)},
                {"omitted": wrong[:, is_omit].sum(1), "overall": wrong.sum(1)})

    accuracy, errors = {}, {}
    for when, z in (("before", test), ("after", adjusted)):
        (acc, err), (t_acc, t_err) = score(z), score(t_test)
        accuracy[when] = {"teacher": t_acc, **{m: {k: v[sl] for k, v in acc.items()} for m, sl in
                                               (("standard", slice(None, n)), ("distilled", slice(n, None)))}}
        errors[when] = {"teacher": t_err, **{m: {k: v[sl] for k, v in err.items()} for m, sl in
                                             (("standard", slice(None, n)), ("distilled", slice(n, None)))}}
    stats = {w: {m: {k: mean_ci(v) for k, v in d.items()} for m, d in a.items()} for w, a in accuracy.items()}
    gain = {w: {k: mean_ci(a["distilled"][k] - a["standard"][k]) for k in ("omitted", "overall")}
            for w, a in accuracy.items()}
    return OmitClassResult(omit, prior, r, {"standard": bias[:n], "distilled": bias[n:]}, accuracy, errors,
                           stats, gain, {"omitted": int(is_omit.sum()), "overall": len(ds.y_test),
                                         "teacher": len(train.y_train), "transfer": len(transfer.y_train),
                                         "validation": len(tune.y_test)})


# ----------------------------------------------------------------------------- statistics

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
    """Mean and the half-width of its 95% Student-t confidence interval (NaN for one
    value: one sample has no interval, and 0 would read as certainty)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(t975(v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
