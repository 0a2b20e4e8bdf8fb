"""The pure train step and fused (``lax.scan``) runs.

* ``train_step(state, batch, rng, hyper, teacher_params)`` is one optimizer step of an
  objective (``kdjax.objectives``: any object with ``loss(student, params, model_state,
  batch, *, rng, hyper, teacher)``; ``"ce"``, ``"kd"`` and a callable ``loss(logits, batch,
  teacher_logits, hyper)`` are shorthands). The step calls only that protocol: it knows no
  method. A model is any ``flax.linen`` module called as ``apply(variables, x, train=bool,
  rngs={"dropout": key})``; in training ``model_state`` is updated.
* ``run_steps`` scans that step over a precomputed ``[steps, batch]`` index schedule with
  the whole data set on device: one compiled program per run (or per chunk).
* ``make_train_step`` / ``make_run`` bind the model, optimizer and objective with
  ``functools.partial`` and jit with donation (changing them is a new program, by design).

Dropout keys are ``fold_in(rng, state.step)``: a run is a function of its base key and
the step count only, so chunked, looped, fused and resumed runs agree exactly.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import parallel
from kdjax.errors import InputError, InputTypeError
from kdjax.objectives import OBJECTIVES, Teacher, apply_model, as_objective, as_variables
from kdjax.train.optimizers import adam
from kdjax.train.state import Hyper, TrainState, _check_model

__all__ = ["OBJECTIVES", "apply_model", "train_step", "make_train_step", "run_steps", "make_run"]

def _loss_fn(params, model_state, batch, rng, hyper, teacher, *, model, objective):
    return objective.loss(model, params, model_state, batch, rng=rng, hyper=hyper, teacher=teacher)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
               hyper: Hyper | None = None, teacher_params=None, *, model, tx,
               objective="kd", teacher=None):
    """One optimizer step of ``objective``. Pure.

    Args:
      state: the ``TrainState`` to update (its ``model_state`` is updated too).
      batch: the minibatch the objective reads (``{"x": [B, ...], "y": [B]}`` for the
        built-ins, plus cached teacher outputs such as ``"teacher_logits"``).
      rng: base key; the objective gets ``fold_in(rng, state.step)``.
      hyper: the objective's hyperparameters (a ``Hyper`` for ``"kd"``; any pytree of
        arrays, traced; None when it has none).
      teacher_params: the frozen teacher's variables, params or ``TrainState`` (a teacher
        with BatchNorm needs its ``model_state``): the objective gets
        ``Teacher(teacher, variables)``; None without an online teacher.
      model, tx, objective, teacher: bound with ``functools.partial`` (``make_train_step``).
        ``objective``: an object of the protocol (``kdjax.objectives``), ``"ce"``,
        ``"kd"`` or a callable ``loss(logits, batch, teacher_logits, hyper) -> scalar``.
        ``teacher``: the teacher module; default the objective's own ``teacher``
        attribute, when it names one (an on-policy objective does).

    Returns:
      ``(new_state, {"loss": loss})``, plus ``"terms"``: the objective's metrics, when it
      returns any (e.g. each weighted part of a feature objective's loss).

    Raises:
      InputError: what the objective's ``check`` hook refuses (trace time).
    """
    objective = as_objective(objective)
    teacher = getattr(objective, "teacher", None) if teacher is None else teacher  # an objective may name its own
    teacher = None if teacher is None or teacher_params is None else Teacher(teacher, as_variables(teacher_params))
    check = getattr(objective, "check", None)
    if check is not None:
        check(batch, hyper=hyper, teacher=teacher)
    if getattr(objective, "needs_step", False):
        batch = {**batch, "step": state.step}
    key = jax.random.fold_in(rng, state.step)
    loss_fn = functools.partial(_loss_fn, model=model, objective=objective)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (model_state, terms)), grads = grad_fn(state.params, state.model_state, batch, key, hyper, teacher)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "terms": terms} if terms else {"loss": loss}
    return TrainState(state.step + 1, params, model_state, opt_state), metrics


def make_train_step(model, objective="kd", *, tx=None, teacher=None, jit: bool = True, mesh=None,
                    rules=None, donate: bool = True):
    """Bind ``model``/``tx``/``objective``/``teacher`` into ``train_step``; jit with donation.

    Args:
      model: the student, any linen module called as ``model(x, train=bool)``.
      objective: an object of the protocol (``kdjax.objectives``), ``"ce"``, ``"kd"`` or a
        callable ``loss(logits, batch, teacher_logits, hyper)``.
      tx: the optimizer the state was built with; default ``adam()``.
      teacher: the online teacher's module (its variables come with each call), or None.
      jit: False returns the pure, unjitted step (to scan, vmap or wrap).
      mesh: (``kdjax.parallel.make_mesh``) make the step data-parallel over its ``"data"``
        and ``"fsdp"`` axes, for batches fed from the host (data too large for the devices):
        each process passes *its own* rows of the global batch (NumPy or jax arrays; one
        process: all of them), placed with ``jax.make_array_from_process_local_data``; the
        key and hyperparameters are replicated; the returned state keeps its sharding.
      rules: with a mesh, how the state and the teacher's params are sharded over ``"fsdp"``
        (``kdjax.parallel.param_specs``; replicated when ``fsdp=1``).
      donate: the jitted step donates ``state`` (its buffers are reused for the result): do
        not reuse the state you passed in, or pass False.

    Returns:
      ``step(state, batch, rng, hyper=None, teacher_params=None) -> (state, metrics)``.

    Raises:
      InputError: an ``objective`` that is not one.
      InputTypeError: a model or teacher that is not a linen module called with ``train=``.
    """
    as_objective(objective)  # refuses what is not an objective, before anything is traced
    _check_model(model, "model")
    if teacher is not None:
        _check_model(teacher, "teacher")
    tx = adam() if tx is None else tx
    step = functools.partial(train_step, model=model, tx=tx, objective=objective, teacher=teacher)
    if not jit:
        return step
    donated = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donated)
    rules = parallel.check_rules(rules, mesh)
    sharded = functools.partial(_on_mesh, fn=step, mesh=mesh, rules=rules)
    return MeshStep(jax.jit(sharded, donate_argnums=donated), mesh, rules)


def _on_mesh(*args, fn, mesh, rules, **kwargs):
    """``fn(*args, **kwargs)`` (a step or a run) with the new state where the placement put the
    old one (sharded by ``rules`` over ``"fsdp"``) and the metrics replicated."""
    state, metrics = fn(*args, **kwargs)
    state = parallel.constrain(state, parallel.model_shardings(state, mesh, rules))
    return state, parallel.constrain(metrics, parallel.replicated(mesh))


def _is_model(x) -> bool:
    """A state or a teacher's params, variables or ``TrainState`` (not a ``Hyper``, key or None)."""
    return isinstance(x, Mapping) or hasattr(x, "params")


def _shardings(mesh, rules, args) -> list:
    """The shardings of a step's or run's arguments: a state and a teacher's params, variables
    or ``TrainState`` by ``rules`` (checked against them first), the rest (a ``Hyper``, a key,
    None) replicated."""
    parallel.check_rules(rules, mesh, *[getattr(x, "params", x) for x in args if _is_model(x)])
    rep = parallel.replicated(mesh)
    return [parallel.model_shardings(x, mesh, rules) if _is_model(x) else rep for x in args]


def _layout(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((x.shape, x.dtype) if isinstance(x, (jax.Array, np.ndarray)) else (np.shape(x), type(x))
                          for x in leaves)


class MeshStep:
    """A jitted step on a mesh: places the host-fed batch (each process's rows) over
    ``"data"`` and ``"fsdp"``, the state and teacher by the sharding rules, the rest
    replicated, then calls it. The shardings (and the rules' check) are worked out once
    per layout of the arguments. Other attributes are the jitted function's."""

    def __init__(self, jitted, mesh, rules=()):
        self.jitted, self.mesh, self.rules = jitted, mesh, rules
        self._placements = {}  # argument layouts -> their shardings
        functools.update_wrapper(self, jitted)

    def __call__(self, state, batch, rng, *rest):
        rows = parallel.data_sharding(self.mesh)

        def place(x):
            if isinstance(x, jax.Array) and x.sharding == rows:
                return x
            parallel.check_divides(np.shape(x)[0] * jax.process_count(), self.mesh, parallel.BATCH, "batch rows")
            return jax.make_array_from_process_local_data(rows, np.asarray(x))

        batch = {k: place(v) for k, v in batch.items()}
        args = (state, rng, *rest)
        key = tuple(_layout(x) for x in args)
        if key not in self._placements:
            self._placements[key] = _shardings(self.mesh, self.rules, args)
        placements = self._placements[key]
        state, rng, *rest = [parallel.put(x, s) for x, s in zip(args, placements)]
        return self.jitted(state, batch, rng, *rest)

    def __getattr__(self, name):
        return getattr(self.jitted, name)


def run_steps(state: TrainState, data: Mapping[str, jax.Array], schedule: jax.Array,
              rng: jax.Array, hyper: Hyper | None = None, teacher_params=None, *, step,
              batch_sharding=None, state_sharding=None):
    """Many steps as one ``lax.scan``: batch k is ``data[schedule[k]]``.

    Args:
      data: full arrays on device, ``{"x", "y"}`` and optionally ``"teacher_logits"``
        (cached teacher outputs for every example); ``x`` of any rank ``[n, ...]``.
      schedule: ``[steps, batch]`` int indices (``kdjax.data.random_batch_schedule`` or
        ``epoch_schedule``).
      step: an unjitted step from ``make_train_step(..., jit=False)``.
      batch_sharding: a sharding every gathered minibatch is constrained to (a mesh's
        ``"data"`` and ``"fsdp"`` axes: ``make_run(..., mesh=)`` sets it).
      state_sharding: a function of the state giving the shardings every step's new
        state is constrained to (``make_run(..., mesh=)``: the sharding rules).

    Returns:
      ``(final_state, {"loss": [steps]})``.

    Shapes and dtypes are checked here, at trace time (free at run time). Index
    *values* cannot be checked inside the compiled scan (``jnp.take`` does not raise
    on an out-of-range index; it returns NaN features and garbage labels): the runs
    from ``make_run`` and ``kdjax.sweep.make_sweep_run`` check them on the host.
    """
    _check_run_inputs(data, schedule)

    def body(state, idx):
        batch = jax.tree_util.tree_map(lambda arr: jnp.take(arr, idx, axis=0), data)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        state, metrics = step(state, batch, rng, hyper, teacher_params)
        if state_sharding is not None:
            state = parallel.constrain(state, state_sharding(state))
        return state, metrics

    return jax.lax.scan(body, state, schedule)


def _rows(data) -> int:
    """The examples in ``data``: the rows of ``data["x"]``, else of its first array."""
    leaves = [data["x"]] if "x" in data else jax.tree_util.tree_leaves(data)
    return np.shape(leaves[0])[0] if leaves and np.ndim(leaves[0]) else 0


def _check_run_inputs(data, schedule) -> None:
    if not jax.tree_util.tree_leaves(data):
        raise InputError(f"data: expected per-example arrays (e.g. 'x' and 'y'), got {data!r}")
    n = _rows(data)
    for path, arr in jax.tree_util.tree_leaves_with_path(data):
        if arr.ndim == 0 or arr.shape[0] != n:
            raise InputError(f"data{jax.tree_util.keystr(path)}: expected {n} rows (as data['x']), got shape "
                             f"{arr.shape}")
    if "y" in data and not jnp.issubdtype(data["y"].dtype, jnp.integer):
        raise InputTypeError(f"data['y']: expected integer class labels, got dtype {data['y'].dtype}")
    if schedule.ndim != 2 or not jnp.issubdtype(schedule.dtype, jnp.integer):
        raise InputError(f"schedule: expected integer indices of shape [steps, batch], got "
                         f"{schedule.dtype}{list(schedule.shape)}")
    if schedule.shape[0] == 0 or schedule.shape[1] == 0:
        raise InputError(f"schedule: expected at least one step of a non-empty batch, got shape {schedule.shape}")


def make_run(model, objective="kd", *, tx=None, teacher=None, mesh=None, rules=None, donate: bool = True):
    """A jitted, state-donating ``run_steps`` for this model and objective.

    Call as ``run(state, data, schedule, rng, hyper, teacher_params)``. The program is
    compiled once per (shapes, dtypes); feed it fixed-size chunks of the schedule to
    drive a progress bar without recompiling. A concrete schedule with an index outside
    ``[0, len(data["x"]))`` raises ``InputError`` before anything runs.

    Args:
      model, objective, tx, teacher: as ``make_train_step``.
      mesh: (``kdjax.parallel.make_mesh``) split every minibatch over its ``"data"`` and
        ``"fsdp"`` axes (the batch size must divide evenly; checked before compiling); the
        data set is replicated and XLA's partitioner gathers parameters and reduces gradients
        (and BatchNorm's batch statistics) over the devices. Inputs are placed for the
        caller; the returned state keeps its sharding.
      rules: with a mesh, how the state and the teacher's params are sharded over ``"fsdp"``
        (``kdjax.parallel.param_specs``; replicated when ``fsdp=1``).
      donate: the state's buffers are donated (reused for the result): pass the returned
        state to the next call; passing a donated one again raises ``InputError``. False
        keeps the caller's state intact (one more copy of it in memory).

    Returns:
      ``run(...) -> (state, metrics)``, ``metrics["loss"]`` ``[steps]`` (a ``CheckedRun``).

    Raises:
      InputError, InputTypeError: as ``make_train_step``.
    """
    step = make_train_step(model, objective, tx=tx, teacher=teacher, jit=False)
    donated = (0,) if donate else ()
    if mesh is None:
        return CheckedRun(jax.jit(functools.partial(run_steps, step=step), donate_argnums=donated))
    rules = parallel.check_rules(rules, mesh)
    run = functools.partial(run_steps, step=step, batch_sharding=parallel.data_sharding(mesh),
                            state_sharding=functools.partial(parallel.model_shardings, mesh=mesh, rules=rules))
    jitted = jax.jit(functools.partial(_on_mesh, fn=run, mesh=mesh, rules=rules), donate_argnums=donated)
    return CheckedRun(jitted, place=functools.partial(_place_run, mesh, rules))


def _place_run(mesh, rules, state, data, schedule, args, kwargs):
    parallel.check_divides(np.shape(schedule)[-1], mesh, parallel.BATCH, "batch size")
    values = (state, *args, *kwargs.values())
    state, *values = [parallel.put(x, p) for x, p in zip(values, _shardings(mesh, rules, values))]
    return (state, parallel.put(data, parallel.replicated(mesh)),
            parallel.put(schedule, parallel.schedule_sharding(mesh)), tuple(values[:len(args)]),
            dict(zip(kwargs, values[len(args):])))


class CheckedRun:
    """A jitted ``run(state, data, schedule, ...)`` with a host-side bounds check of a
    concrete ``schedule`` (a traced one is passed through) and, on a mesh, the placement
    of its inputs (``place``). Every other attribute (``lower``, ``trace``, ...) is the
    jitted function's."""

    def __init__(self, run, place=None):
        self.jitted, self.place = run, place
        functools.update_wrapper(self, run)

    def __call__(self, state, data, schedule, *args, **kwargs):
        if any(isinstance(a, jax.Array) and a.is_deleted() for a in jax.tree_util.tree_leaves(state)):
            raise InputError("state: its arrays were donated to an earlier call, which reused them for its result; "
                             "pass the state that call returned, a copy made before it "
                             "(jax.tree_util.tree_map(jnp.copy, state)), or build the run with donate=False")
        if not isinstance(schedule, jax.core.Tracer) and np.size(schedule):
            idx, n = np.asarray(schedule), _rows(data)
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= n:
                raise InputError(f"schedule: expected indices in [0, {n}) (the rows of the data), "
                                 f"got values from {lo} to {hi}")
        if self.place is not None:
            state, data, schedule, args, kwargs = self.place(state, data, schedule, args, kwargs)
        return self.jitted(state, data, schedule, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.jitted, name)
