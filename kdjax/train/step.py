"""The pure train step and fused (``lax.scan``) runs.

* ``train_step(state, batch, rng, hyper, teacher_params)`` is one optimizer step for an
  objective: ``"ce"`` (cross-entropy), ``"kd"`` (``distillation_loss`` against a frozen
  teacher) or a callable ``loss(logits, batch, teacher_logits, hyper)``. A model is any
  ``flax.linen`` module called as ``apply(variables, x, train=bool, rngs={"dropout": key})``;
  in training the step passes ``train=True`` and updates ``model_state``.
* ``run_steps`` scans that step over a precomputed ``[steps, batch]`` index schedule with
  the whole data set on device: one compiled program per run (or per chunk).
* ``make_train_step`` / ``make_run`` bind the model, optimizer and objective with
  ``functools.partial`` and jit with donation (changing them is a new program, by design).

Dropout keys are ``fold_in(rng, state.step)``: a run is a function of its base key and
the step count only, so chunked, looped, fused and resumed runs agree exactly.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import parallel
from kdjax.errors import InputError, InputTypeError
from kdjax.features.objectives import Objective
from kdjax.fused import FusedLM
from kdjax.losses import check_where, distillation_loss, hard_ce, masked_mean
from kdjax.train.optimizers import adam
from kdjax.train.state import Hyper, TrainState, _check_model

__all__ = ["OBJECTIVES", "apply_model", "train_step", "make_train_step", "run_steps", "make_run"]

OBJECTIVES = ("ce", "kd")


def _variables_of(tree) -> tuple[Any, dict]:
    """``(params, model_state)`` of a ``TrainState``, or ``(tree, {})`` for a params tree."""
    if isinstance(tree, TrainState):
        return tree.params, tree.model_state
    return tree, {}


def apply_model(model, params, model_state, x, *, train: bool, rng=None):
    """``(logits, new_model_state)``: ``model.apply`` in train or eval mode.

    In train mode the collections in ``model_state`` are mutable (BatchNorm statistics
    are updated) and ``rng`` seeds dropout. A model that needs a collection the state
    lacks (a BatchNorm model given ``model_state={}``) raises ``InputError``.
    """
    variables = {"params": params, **model_state}
    rngs = None if rng is None else {"dropout": rng}
    try:
        if train and model_state:
            return model.apply(variables, x, train=True, rngs=rngs, mutable=list(model_state))
        return model.apply(variables, x, train=train, rngs=rngs), model_state
    except (flax.errors.ScopeCollectionNotFound, flax.errors.ScopeVariableNotFoundError) as e:
        found = re.search(r'collection "(\w+)"', str(e))
        name = found.group(1) if found else "a non-parameter collection"
        raise InputError(
            f"model_state: {type(model).__name__} needs its '{name}' variables (e.g. BatchNorm "
            f"statistics), got model_state with collections {sorted(model_state)}; build the state "
            f"with kdjax.create_train_state(model, rng, x[:1]), or pass model_state= to "
            f"state_from_params (a TrainState, not bare params, to predict_logits/evaluate)") from None


def _teacher_logits(batch, teacher, teacher_params):
    if "teacher_logits" in batch:
        return batch["teacher_logits"]
    if teacher is None or teacher_params is None:
        return None
    params, model_state = _variables_of(teacher_params)
    return apply_model(teacher, params, model_state, batch["x"], train=False)[0]


def _on_policy(objective) -> bool:
    from kdjax.onpolicy import OnPolicy  # kdjax.onpolicy builds on this module

    return isinstance(objective, OnPolicy)


def _loss_fn(params, model_state, batch, rng, step, hyper, teacher_params, *, model, objective, teacher):
    """``(loss, (new_model_state, metrics))``; metrics are an objective's terms (else {})."""
    if _on_policy(objective):  # its hyper is the teacher's variables
        loss, metrics = objective.loss(params, model_state, batch, rng, hyper, model=model)
        return loss, (model_state, metrics)
    if isinstance(objective, Objective):
        return objective.loss(params, model_state, batch, rng, step, teacher_params, model=model, teacher=teacher)
    if isinstance(objective, FusedLM):
        loss = objective.loss(params, model_state, batch, rng, hyper, teacher_params, model=model, teacher=teacher)
        return loss, (model_state, {})
    logits, new_state = apply_model(model, params, model_state, batch["x"], train=True, rng=rng)
    where = batch.get("where")  # token-level: only these positions count
    if objective == "ce":
        check_where(where, logits.shape[:-1])
        return masked_mean(hard_ce(logits, batch["y"]), where), (new_state, {})
    t_logits = _teacher_logits(batch, teacher, teacher_params)
    if objective == "kd":
        loss = distillation_loss(logits, t_logits, batch["y"], hyper.temperature, hyper.alpha, where=where)
        return loss, (new_state, {})
    loss = objective(logits, batch, t_logits, hyper)
    if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        raise InputError(f"objective: expected the callable to return a float scalar, got "
                         f"{jnp.result_type(loss)}{list(jnp.shape(loss))}")
    return loss, (new_state, {})


def _check_objective(objective) -> None:
    if not (isinstance(objective, (Objective, FusedLM)) or _on_policy(objective) or callable(objective)
            or objective in OBJECTIVES):
        raise InputError(f"objective: expected one of {OBJECTIVES}, a kdjax.features.Objective, a kdjax.fused.FusedLM "
                         f"or a callable "
                         f"loss(logits, batch, teacher_logits, hyper), got {objective!r}")


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
               hyper: Hyper | None = None, teacher_params=None, *, model, tx,
               objective="kd", teacher=None):
    """One optimizer step. Pure: returns ``(new_state, {"loss": loss})``, plus ``"terms"``
    (each weighted part of the loss) for a ``kdjax.features.Objective``.

    Args:
      state: the ``TrainState`` to update (its ``model_state`` is updated too).
      batch: ``{"x": [B, ...], "y": [B]}`` plus, to distil, either
        ``"teacher_logits": [B, C]`` (cached) or nothing, in which case the teacher
        runs online (eval mode) from ``teacher_params``.
      rng: base key; dropout uses ``fold_in(rng, state.step)``.
      hyper: ``Hyper`` for ``objective="kd"``; any pytree of arrays for a callable.
      teacher_params: the frozen teacher's params, or its ``TrainState`` (a teacher
        with BatchNorm needs its ``model_state``); online distillation only.
      model, tx, objective, teacher: bound with ``functools.partial``. ``objective``
        is ``"ce"``, ``"kd"``, ``loss(logits, batch, teacher_logits, hyper) ->
        scalar`` (``teacher_logits`` is None when there is no teacher), or a
        ``kdjax.features.Objective`` (feature terms on tapped intermediate values; the
        teacher's come from ``batch["teacher_features"]`` or the online teacher; ``hyper``
        must be None).
    """
    _check_objective(objective)
    if objective == "kd" or isinstance(objective, FusedLM):
        name = "'kd'" if objective == "kd" else "FusedLM"
        if hyper is None:
            raise InputError(f"hyper: objective {name} needs a Hyper (see kdjax.make_hyper), got None")
        cached = "teacher_logits" in batch or (name == "FusedLM" and "teacher_topk_values" in batch)
        if not cached and (teacher is None or teacher_params is None):
            also = " (or ['teacher_topk_values'/'teacher_topk_indices'])" if name == "FusedLM" else ""
            raise InputError(f"objective {name}: expected batch['teacher_logits']{also} or both a bound "
                             "teacher and teacher_params, got neither")
    if _on_policy(objective) and hyper is None:
        raise InputError("hyper: a kdjax.onpolicy.OnPolicy objective takes the teacher's variables in hyper's place, "
                         "got None")
    if isinstance(objective, Objective) and hyper is not None:
        raise InputError("hyper: a kdjax.features.Objective holds its own weights and temperature; expected "
                         "hyper=None, got a Hyper")
    key = jax.random.fold_in(rng, state.step)
    loss_fn = functools.partial(_loss_fn, model=model, objective=objective, teacher=teacher)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (model_state, terms)), grads = grad_fn(state.params, state.model_state, batch, key, state.step, hyper,
                                                  teacher_params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "terms": terms} if terms else {"loss": loss}
    return TrainState(state.step + 1, params, model_state, opt_state), metrics


def make_train_step(model, objective="kd", *, tx=None, teacher=None, jit: bool = True, mesh=None,
                    rules=None, donate: bool = True):
    """Bind ``model``/``tx``/``objective``/``teacher`` into ``train_step``; jit with donation.

    With ``jit=False`` the pure, unjitted step is returned (to scan, vmap or wrap).
    The jitted step donates ``state`` (its buffers are reused for the result): do not
    reuse the state you passed in, or pass ``donate=False``.
    ``tx`` defaults to ``adam()``; it must be the optimizer the state was built with.

    With a ``mesh`` (``kdjax.parallel.make_mesh``) the step is data-parallel over its
    ``"data"`` and ``"fsdp"`` axes, for batches fed from the host (data too large for
    the devices): each process passes *its own* rows of the global batch (NumPy or jax
    arrays; one process: all of them), which are placed with
    ``jax.make_array_from_process_local_data``. The state and the teacher's params are
    sharded over ``"fsdp"`` by ``rules`` (``kdjax.parallel.param_specs``; replicated
    when ``fsdp=1``), the key and hyperparameters replicated; the returned state keeps
    its sharding.
    """
    _check_objective(objective)
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
    sharded = functools.partial(constrained_step, step=step, mesh=mesh, rules=rules)
    return MeshStep(jax.jit(sharded, donate_argnums=donated), mesh, rules)


def constrained_step(state, *args, step, mesh, rules):
    # the new state where the placement put the old one (sharded over "fsdp")
    state, metrics = step(state, *args)
    state = parallel.constrain(state, parallel.model_shardings(state, mesh, rules))
    return state, parallel.constrain(metrics, parallel.replicated(mesh))


def _is_model(x) -> bool:
    """A teacher's params, variables or ``TrainState`` (not a ``Hyper``, key or None)."""
    return x is not None and not isinstance(x, (Hyper, jax.Array, np.ndarray))


def place_model_args(mesh, rules, args):
    """Place a step's trailing arguments: a ``Hyper``, a key or None replicated; a teacher's
    params, variables or ``TrainState`` sharded by ``rules``."""
    return tuple(parallel.put(x, parallel.model_shardings(x, mesh, rules) if _is_model(x)
                              else parallel.replicated(mesh)) for x in args)


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
        placements = self._placements.get(key)
        if placements is None:
            teachers = [getattr(t, "params", t) for t in rest if _is_model(t)]
            parallel.check_rules(self.rules, self.mesh, state.params, *teachers)
            rep = parallel.replicated(self.mesh)
            placements = [parallel.model_shardings(x, self.mesh, self.rules) if _is_model(x) else rep for x in args]
            self._placements[key] = placements
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
      schedule: ``[steps, batch]`` int indices (``kdjax.data.seed_schedule`` or
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


def _check_run_inputs(data, schedule) -> None:
    if "x" not in data or "y" not in data:
        raise InputError(f"data: expected keys 'x' and 'y' (optionally 'teacher_logits'), got {sorted(data)}")
    n = data["x"].shape[0] if data["x"].ndim else 0
    for path, arr in jax.tree_util.tree_leaves_with_path(data):
        if arr.ndim == 0 or arr.shape[0] != n:
            raise InputError(f"data{jax.tree_util.keystr(path)}: expected {n} rows (as data['x']), got shape "
                             f"{arr.shape}")
    if not jnp.issubdtype(data["y"].dtype, jnp.integer):
        raise InputTypeError(f"data['y']: expected integer class labels, got dtype {data['y'].dtype}")
    if schedule.ndim != 2 or not jnp.issubdtype(schedule.dtype, jnp.integer):
        raise InputError(f"schedule: expected integer indices of shape [steps, batch], got "
                         f"{schedule.dtype}{list(schedule.shape)}")
    if schedule.shape[0] == 0 or schedule.shape[1] == 0:
        raise InputError(f"schedule: expected at least one step of a non-empty batch, got shape {schedule.shape}")


def make_run(model, objective="kd", *, tx=None, teacher=None, mesh=None, rules=None, donate: bool = True):
    """A jitted, state-donating ``run_steps`` for this model and objective.

    Call as ``run(state, data, schedule, rng, hyper, teacher_params)``. The state's
    buffers are donated (reused for the result): pass the returned state to the next
    call; passing a donated one again raises ``InputError``. ``donate=False`` keeps the
    caller's state intact (one more copy of it in memory). The program is
    compiled once per (shapes, dtypes); feed it fixed-size chunks of the schedule to
    drive a progress bar without recompiling. A concrete schedule with an index outside
    ``[0, len(data["x"]))`` raises ``InputError`` before anything runs.

    With a ``mesh`` (``kdjax.parallel.make_mesh``) every minibatch is split over its
    ``"data"`` and ``"fsdp"`` axes (the batch size must divide evenly; checked before
    compiling), the data set is replicated, the state and the teacher's params are
    sharded over ``"fsdp"`` by ``rules`` (``kdjax.parallel.param_specs``; replicated
    when ``fsdp=1``), and XLA's partitioner gathers parameters and reduces gradients
    (and BatchNorm's batch statistics) over the devices. Inputs are placed for the
    caller; the returned state keeps its sharding.
    """
    step = make_train_step(model, objective, tx=tx, teacher=teacher, jit=False)
    donated = (0,) if donate else ()
    if mesh is None:
        return CheckedRun(jax.jit(functools.partial(run_steps, step=step), donate_argnums=donated))
    rules = parallel.check_rules(rules, mesh)
    run = functools.partial(run_steps, step=step, batch_sharding=parallel.data_sharding(mesh),
                            state_sharding=functools.partial(parallel.model_shardings, mesh=mesh, rules=rules))
    jitted = jax.jit(functools.partial(_replicated_metrics, run=run, mesh=mesh), donate_argnums=donated)
    return CheckedRun(jitted, place=functools.partial(_place_run, mesh, rules))


def _replicated_metrics(*args, run, mesh, **kwargs):
    state, metrics = run(*args, **kwargs)
    return state, parallel.constrain(metrics, parallel.replicated(mesh))


def _place_run(mesh, rules, state, data, schedule, args, kwargs):
    parallel.check_divides(np.shape(schedule)[-1], mesh, parallel.BATCH, "batch size")
    rep = parallel.replicated(mesh)
    teachers = [x for x in list(args[1:]) + list(kwargs.values()) if _is_model(x)]
    parallel.check_rules(rules, mesh, state.params, *[getattr(t, "params", t) for t in teachers])
    return (parallel.put(state, parallel.model_shardings(state, mesh, rules)), parallel.put(data, rep),
            parallel.put(schedule, parallel.schedule_sharding(mesh)), place_model_args(mesh, rules, args),
            dict(zip(kwargs, place_model_args(mesh, rules, tuple(kwargs.values())))))


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
            idx, n = np.asarray(schedule), np.shape(data["x"])[0]
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= n:
                raise InputError(f"schedule: expected indices in [0, {n}) (the rows of data['x']), "
                                 f"got values from {lo} to {hi}")
        if self.place is not None:
            state, data, schedule, args, kwargs = self.place(state, data, schedule, args, kwargs)
        return self.jitted(state, data, schedule, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.jitted, name)
