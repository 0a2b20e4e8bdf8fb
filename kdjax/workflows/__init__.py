"""Whole workflows on a ``Dataset``, with crash-safe checkpoints and exact resume.

* ``distill``: teachers (one per seed, or one loaded) -> standard and distilled students
  (paired seeds, one program) -> evaluation -> statistics.
* ``distill_offline``: the same students from a teacher's cached top-k log-probabilities
  (``kdjax.offline``): no teacher in the program.
* ``run_sweep``: one teacher, then a student per (temperature, alpha, seed) member.
* ``tuned_distill``: T and alpha chosen on a validation split, then ``distill``.

Each phase checkpoints under ``Checkpoints`` and resumes bit for bit; compiled programs
live in a ``kdjax.fitting.Programs`` the caller may pass (and keep) for later calls.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence

import jax
import numpy as np

from kdjax import checkpoint, parallel
from kdjax.data import Dataset
from kdjax.errors import InputError, InputTypeError
from kdjax.fused import FusedLM
from kdjax.objectives import TopKKD, as_variables, own_variables
from kdjax.fitting import (OnChunk, OnLosses, Programs, RunConfig, evaluate_on, fit_members, initial_members,
                           paired_students, teacher_features_for, teacher_logits_for)
from kdjax.stats import mean_ci
from kdjax.train import TrainState, make_hyper

__all__ = ["Checkpoints", "distill", "distill_offline", "DistillResult",
           "run_sweep", "SweepResult", "tuned_distill", "TunedResult"]


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
           on_chunk: OnChunk | None, log: Callable[[str], None], programs: Programs, chunk=None, mesh=None,
           on_losses: OnLosses | None = None, **kw):
    """``fit_members`` as a named phase: checkpointed and resumable under ``checkpoints``."""
    start = None
    if mesh is not None and len(seeds) % mesh.shape["members"]:
        mesh = parallel.data_only(mesh)  # e.g. a sweep's single teacher
    if checkpoints is not None:
        path = os.path.join(checkpoints.directory, f"{name}.ckpt")
        identity = checkpoints.identity or {}
        chunk = checkpoints.every
        if checkpoints.resume:
            def target(meta):  # the settings first; then the states straight into place (on a mesh: shard by shard)
                _check_resumable(path, meta, name, _model_text(model), identity)
                init = kw.get("init_states")
                return {"states": initial_members(model, ds, cfg, seeds, mesh=mesh) if init is None else init}

            try:
                tree, meta, used, problem = checkpoint.load_latest(path, target)
            except FileNotFoundError:
                tree = None
            if tree is not None:
                if problem:
                    log(f"warning: {problem}; resuming from {used}")
                start = (tree["states"], np.asarray(tree["losses"]))
                log(f"{name}: resuming at step {start[1].shape[1]} from {used}")

        written = {"config": identity, "phase": name, "model": _model_text(model)}
        saver = checkpoint.RotatingSaver(path)  # writes in the background while the next chunk runs
        save = lambda done, states, losses: saver({"states": states, "losses": losses}, written | {"done": done})
    else:
        saver = save = None

    progress = None if on_chunk is None else (lambda done, total, states: on_chunk(name, done, total, states))
    losses_of = None if on_losses is None else (lambda first, losses: on_losses(name, first, losses))
    try:
        result = fit_members(model, objective, ds, cfg, seeds, chunk=chunk, start=start, on_checkpoint=save,
                             on_chunk=progress, mesh=mesh, programs=programs, on_losses=losses_of, **kw)
    except BaseException:
        if saver is not None:
            saver.wait(raise_error=False)  # the error in flight is the one to report
        raise
    if saver is not None:
        saver.wait()
    return result


def _model_text(model) -> str:
    """``TeacherMLP(hidden_dim=256, num_classes=5, ...)``: a module's configuration, one line."""
    fields = [f for f in dataclasses.fields(model) if f.name not in ("parent", "name")]
    value = lambda v: getattr(v, "__name__", v)
    return f"{type(model).__name__}({', '.join(f'{f.name}={value(getattr(model, f.name))!r}' for f in fields)})"


def _check_resumable(where: str, meta: dict, phase: str, model: str, identity: dict) -> None:
    """One line when a checkpoint belongs to another phase, model or configuration."""
    if meta.get("phase") != phase or meta.get("model", model) != model:
        raise InputError(f"resume: {where} holds the {meta.get('phase')!r} phase of {meta.get('model')}, expected "
                         f"the {phase!r} phase of {model}; use a new --out")
    old = meta.get("config") or {}
    if old != identity:
        unset = "(not set)"
        diffs = [f"{k}: {old.get(k, unset)!r} in the checkpoint, {identity.get(k, unset)!r} now"
                 for k in sorted(set(old) | set(identity), key=str) if old.get(k, unset) != identity.get(k, unset)]
        raise InputError(f"resume: {where} was written with other settings ({'; '.join(diffs)}); "
                         f"use the same ones or a new --out")


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
    distilled_states: object = None

    @property
    def standard(self):
        return _take(self.students, slice(None, len(self.seeds)))

    @property
    def distilled(self):
        return _take(self.students, slice(len(self.seeds), None))

    def teacher_member(self, i: int = 0):
        """Teacher i (the loaded teacher when there is one).

        Args:
          i: the seed's index.

        Returns:
          The teacher's ``TrainState``.
        """
        return self.teacher if self.teacher_losses is None else _take(self.teacher, i)


def distill(teacher, student, ds: Dataset, cfg: RunConfig, seeds: Sequence[int], *,
            temperature: float = 3.0, alpha: float = 0.7, teacher_state=None,
            splits: Sequence[str] = ("test",), checkpoints: Checkpoints | None = None,
            chunk: int | None = None, on_chunk: OnChunk | None = None,
            log: Callable[[str], None] = lambda line: None, mesh=None,
            transfer: Dataset | None = None, teacher_cfg: RunConfig | None = None,
            programs: Programs | None = None, on_losses: OnLosses | None = None,
            objective=None, extra_data: dict | None = None, teacher_data: Dataset | None = None) -> DistillResult:
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
    compiled chunks (progress bars, logging), after ``on_losses(phase, first step, losses
    [members, steps])`` (the chunk's training losses, a device array: metrics logs);
    ``log`` receives resume messages. A
    ``mesh`` (``kdjax.parallel``) splits each phase's members over ``"members"`` and
    minibatches over ``"data"``; a phase whose members it cannot split evenly uses its
    ``"data"`` axis only. ``programs`` (``kdjax.fitting.Programs``) keeps the compiled
    programs for later calls.

    With an ``objective`` (any object of the protocol, ``kdjax.objectives``: a feature
    objective, DKD, GKD, your own) step 2 is two phases: ``"standard"`` (cross-entropy) and
    ``"distilled"`` (the objective with ``hyper=None``: it holds its own weights;
    ``temperature`` and ``alpha`` are unused). The teacher's logits are cached once in eval
    mode, and its ``teacher_taps`` (an attribute the objective may have) too, unless the
    objective says ``teacher_online = True`` (on-policy methods: the teacher runs in the
    step, one per seed or the loaded one); parts the objective's ``init`` hook adds
    (connectors) train with the students; ``extra_data`` (per training row, e.g. a teacher's own
    tokenization, ``kdjax.crosstok.paired_text``) rides in its minibatches. ``teacher_data``:
    the teacher's own tokenization of ``ds``'s splits, which its evaluation reads (a teacher
    with another tokenizer; default ``ds``). The result's ``students`` then hold the students'
    own variables only (no optimizer state; ``distilled_states`` has the full states).

    Args:
      teacher, student: the models (``flax.linen`` modules).
      ds: the data set; cfg: steps, batch size, optimizer; seeds: one pair of students per seed.
      temperature, alpha: the distilled students' KD hyperparameters.
      teacher_state, teacher_cfg, transfer, splits, checkpoints, chunk, on_chunk, on_losses, log,
        mesh, programs, objective, extra_data, teacher_data: as above.

    Returns:
      A ``DistillResult``: states, losses, accuracy per split, statistics and gains.

    Raises:
      InputError: an invalid input, or a checkpoint that belongs to another run.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("seeds: expected at least one seed, got none")
    make_hyper(temperature, alpha)  # validates before anything trains
    if teacher_data is not None and teacher_state is None:
        raise InputError("teacher_data: expected a loaded teacher_state (a teacher trained here reads ds's tokens)")
    if teacher_data is not None and not isinstance(teacher_data, Dataset):
        raise InputTypeError(f"teacher_data: expected a kdjax.data.Dataset, got {type(teacher_data).__name__}")
    if teacher_data is not None and teacher_data.num_classes > getattr(teacher, "vocab_size", teacher_data.num_classes):
        raise InputError(f"teacher_data: expected the teacher's own tokens (at most its {teacher.vocab_size}-token "
                         f"vocabulary), got {teacher_data.num_classes} classes")
    if extra_data is not None and not isinstance(extra_data, dict):
        raise InputTypeError(f"extra_data: expected a dict of per-row arrays, got {type(extra_data).__name__}")
    phase = functools.partial(_phase, checkpoints=checkpoints, on_chunk=on_chunk, log=log, chunk=chunk,
                              mesh=mesh, programs=Programs() if programs is None else programs, on_losses=on_losses)
    transfer = ds if transfer is None else transfer
    if transfer.input_shape != ds.input_shape or transfer.num_classes != ds.num_classes:
        raise InputError(f"transfer: expected examples of shape {ds.input_shape} in {ds.num_classes} classes "
                         f"(as {ds.name}), got {transfer.input_shape} in {transfer.num_classes}")
    on_policy = getattr(objective, "teacher_online", False)  # the teacher runs in the step: no cached logits
    if teacher_state is None:
        t_states, t_losses = phase("teachers", teacher, "ce", ds, teacher_cfg or cfg, seeds)
        logits = None if on_policy else teacher_logits_for(teacher, t_states, transfer, members=True)
    else:
        t_states, t_losses = teacher_state, None
        logits = None if on_policy else teacher_logits_for(teacher, teacher_state, transfer)
    if objective is not None:
        s_states, s_losses, full = _objective_students(phase, objective, teacher, t_states, student, transfer, cfg,
                                                       seeds, logits, per_seed=teacher_state is None,
                                                       extra_data=extra_data)
    elif extra_data is not None:
        raise InputError("extra_data: expected an objective that reads it, got the built-in KD")
    else:
        pairs = paired_students(seeds, logits, temperature, alpha, per_seed=teacher_state is None)
        s_states, s_losses = phase("students", student, "kd", transfer, cfg, pairs.pop("seeds"), **pairs)
        full = None
    t_ds = ds if teacher_data is None else teacher_data
    teacher_row = lambda split: evaluate_on(teacher, t_states, *_split(t_ds, split), members=teacher_state is None)
    return _result(student, ds, seeds, s_states, s_losses, splits, teacher_row, t_states, t_losses, full)


def _objective_students(phase, objective, teacher, t_states, student, transfer, cfg, seeds, logits, *, per_seed,
                        extra_data=None):
    """Standard students (CE) and the objective's, paired by seed: ``(student-only states of
    both halves, losses [2n, steps], the objective's full states)``."""
    std, std_losses = phase("standard", student, "ce", transfer, cfg, seeds)
    if getattr(objective, "teacher_online", False):
        kw = {"teacher_variables": as_variables(t_states), "member_teachers": per_seed}
    else:
        taps = getattr(objective, "teacher_taps", ())
        kw = {"teacher_logits": logits,
              "teacher_features": teacher_features_for(teacher, t_states, taps, transfer, members=per_seed)
              if taps else None}
    if hasattr(objective, "init"):
        kw["init_states"] = initial_members(student, transfer, cfg, seeds, objective=objective, teacher=teacher,
                                            teacher_state=t_states, per_seed_teacher=per_seed)
    dist, dist_losses = phase("distilled", student, objective, transfer, cfg, seeds, extra_data=extra_data, **kw)
    host = lambda tree: jax.tree_util.tree_map(parallel.to_host, tree)
    own = lambda st: TrainState(host(st.step), *own_variables(host(st.params), host(st.model_state)), None)
    both = jax.tree_util.tree_map(lambda a, b: np.concatenate([a, b]), own(std), own(dist))
    return both, np.concatenate([std_losses, dist_losses]), dist


def distill_offline(student, ds: Dataset, cfg: RunConfig, seeds: Sequence[int], values=None, indices=None, *,
                    temperature: float = 3.0, alpha: float = 0.7, missing: str = "zero", loss: str = "kl",
                    fused: bool = True, objective=None, extra_data: dict | None = None,
                    teacher_eval: dict | None = None, splits: Sequence[str] = ("test",),
                    checkpoints: Checkpoints | None = None, chunk: int | None = None,
                    on_chunk: OnChunk | None = None, log: Callable[[str], None] = lambda line: None, mesh=None,
                    programs: Programs | None = None, on_losses: OnLosses | None = None) -> DistillResult:
    """``distill``'s students from a teacher's cached top-k (``kdjax.offline``), no teacher run.

    ``values`` / ``indices`` ``[*ds.y_train.shape, k]`` are the teacher's top-k
    log-probabilities on ``ds``'s training rows (``read_topk_cache``). Phase
    ``"students"``: per seed a standard student (alpha = 0: exactly cross-entropy) and a
    distilled one trained at ``temperature``, ``alpha`` on ``kdjax.losses.topk_distillation_loss``
    with ``missing`` and ``loss`` (``alpha T^2 KL_topk + (1 - alpha) CE`` for ``"kl"``), same
    init and minibatches, one vmapped program. With ``fused``, ``loss="kl"`` and a student
    that names its output layer (kdjax's ``TransformerLM``, ``Llama``) the loss is
    ``kdjax.fused.FusedLM`` (no ``[tokens, vocab]`` array; equal to
    ``kdjax.objectives.TopKKD`` to float rounding), else ``TopKKD``. ``teacher_eval`` (``{split: {"accuracy": a, "loss": l}}``, e.g. stored in
    the cache when it was built) becomes the teacher's row; without it there is none.
    Checkpoints, resume, mesh and callbacks as in ``distill``; the result's ``teacher`` is
    None. With an ``objective`` that reads its teacher from ``extra_data`` instead (e.g.
    ``kdjax.crosstok.ULD`` on a ULD cache, ``batch["teacher_sorted"]``), no ``values`` and
    ``indices``: phases ``"standard"`` (cross-entropy) and ``"distilled"`` (the objective,
    ``hyper=None``), paired by seed.

    Args:
      student, ds, cfg, seeds: as in ``distill``.
      values, indices: the teacher's top-k log-probabilities and token ids.
      temperature, alpha, missing, loss, fused, teacher_eval: as above (``loss``: one of
        ``kdjax.losses.SPARSE_LOSSES``); the rest as in ``distill``.
      objective, extra_data: an objective of the protocol and the per-row arrays it reads
        (instead of ``values``/``indices``).

    Returns:
      A ``DistillResult`` (``teacher`` None).

    Raises:
      InputError: no seeds, or an invalid input.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("seeds: expected at least one seed, got none")
    n = len(seeds)
    phase = functools.partial(_phase, checkpoints=checkpoints, on_chunk=on_chunk, log=log, chunk=chunk,
                              mesh=mesh, programs=Programs() if programs is None else programs, on_losses=on_losses)
    rows = teacher_eval or {}  # the teacher's row, when the cache stored it
    teacher_row = lambda split: None if rows.get(split) is None else {
        k: np.asarray(rows[split][k], np.float64) for k in ("accuracy", "loss")}
    given = values is not None or indices is not None
    if (objective is None) != (extra_data is None) or (objective is not None and given):
        raise InputError("distill_offline: expected values and indices (a top-k cache), or an objective with the "
                         "extra_data it reads, not both")
    if objective is not None:
        std, std_losses = phase("standard", student, "ce", ds, cfg, seeds)
        dist, dist_losses = phase("distilled", student, objective, ds, cfg, seeds, extra_data=extra_data)
        states = jax.tree_util.tree_map(lambda a, b: np.concatenate([parallel.to_host(a), parallel.to_host(b)]),
                                        std, dist)
        return _result(student, ds, seeds, states, np.concatenate([std_losses, dist_losses]), splits, teacher_row)
    hyper = make_hyper(np.full(2 * n, temperature, np.float64), np.repeat([0.0, alpha], n))  # validates
    values, indices = np.asarray(values), np.asarray(indices)
    want = tuple(np.shape(ds.y_train))
    if values.shape != indices.shape or values.shape[:-1] != want:
        raise InputError(f"values / indices: expected the teacher's top-k on every training row, "
                         f"[{', '.join(map(str, want))}, k], got {list(values.shape)} and {list(indices.shape)}")
    example = jax.ShapeDtypeStruct((1, *ds.input_shape), ds.x_train.dtype)
    width = jax.eval_shape(lambda e: student.apply(student.init(jax.random.PRNGKey(0), e), e), example).shape[-1]
    if indices.size and (indices.min() < 0 or indices.max() >= width):
        raise InputError(f"indices: expected token ids in [0, {width}) (the student's vocabulary), got ids from "
                         f"{int(indices.min())} to {int(indices.max())}")
    objective = (FusedLM(missing=missing) if fused and loss == "kl" and hasattr(student, "output_layer")
                 else TopKKD(missing, loss))
    states, losses = phase("students", student, objective, ds, cfg, seeds + seeds, hyper=hyper,
                           extra_data={"teacher_topk_values": values, "teacher_topk_indices": indices})
    return _result(student, ds, seeds, states, losses, splits, teacher_row)


def _result(student, ds, seeds, states, losses, splits, teacher_row, teacher=None, teacher_losses=None,
            distilled_states=None) -> DistillResult:
    """The ``DistillResult`` of students ``states`` (the standard ones, then the distilled) and
    ``losses``, evaluated on ``splits``; ``teacher_row(split)``: the teacher's ``{"accuracy",
    "loss"}`` there, or None (no teacher row)."""
    n = len(seeds)
    accuracy, eval_loss = {}, {}
    for split in splits:
        ev = evaluate_on(student, states, *_split(ds, split), members=True)
        row = teacher_row(split)
        accuracy[split], eval_loss[split] = (({} if row is None else {"teacher": np.atleast_1d(row[k])})
                                             | {"standard": ev[k][:n], "distilled": ev[k][n:]}
                                             for k in ("accuracy", "loss"))
    stats = {sp: {k: mean_ci(v) for k, v in acc.items()} for sp, acc in accuracy.items()}
    gain = {sp: mean_ci(acc["distilled"] - acc["standard"]) for sp, acc in accuracy.items()}
    return DistillResult(seeds, teacher, teacher_losses, states, {"standard": losses[:n], "distilled": losses[n:]},
                         accuracy, stats, gain, eval_loss, distilled_states)


# the sweeps (kdjax/workflows/tuning.py), importable from here as before
from kdjax.workflows.tuning import SweepResult, TunedResult, run_sweep, tuned_distill  # noqa: E402
