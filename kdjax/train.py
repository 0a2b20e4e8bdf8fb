"""Train state, the pure train step, fused (``lax.scan``) runs and evaluation.

The whole training story in one place:

* ``TrainState`` holds only arrays (step, params, optimizer state), so it can be
  donated, vmapped and checkpointed; the model and optimizer are bound into the
  step with ``functools.partial`` (changing them is a new program, by design).
* ``train_step(state, batch, rng, hyper, teacher_params)`` is one optimizer step for
  one of two objectives: ``"ce"`` (cross-entropy; the teacher and the standard
  student) or ``"kd"`` (``distillation_loss`` against a frozen teacher).
* ``run_steps`` scans that step over a precomputed ``[steps, batch]`` index schedule
  with the whole dataset on device: one compiled program per run (or per chunk).
* Hyperparameters are traced: temperature and alpha live in ``Hyper``, the learning
  rate in the optimizer state (``optax.inject_hyperparams``). New values reuse the
  compiled program.

Dropout keys are ``fold_in(rng, state.step)``: a run is a function of its base key and
the step count only, so chunked, looped, fused and resumed runs agree exactly.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.errors import InputError, InputTypeError
from kdjax.losses import check_alpha, check_temperature, distillation_loss, hard_ce
from kdjax.models import init_params

__all__ = ["TrainState", "Hyper", "make_hyper", "adam", "create_train_state",
           "train_step", "make_train_step", "run_steps", "make_run", "predict_logits",
           "evaluate", "set_learning_rate", "state_from_params", "OBJECTIVES", "SHORT_RUN_COMPILE"]

OBJECTIVES = ("ce", "kd")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; arrays only."""

    step: jax.Array
    params: Any
    opt_state: optax.OptState


@flax.struct.dataclass
class Hyper:
    """Distillation hyperparameters as arrays (scalars, or ``[n]`` inside a vmapped sweep).

    Build with ``make_hyper``, which validates and fixes the dtype, so every call with
    new values hits the same compiled program.
    """

    temperature: jax.Array
    alpha: jax.Array


def make_hyper(temperature=3.0, alpha=0.7, dtype=jnp.float32) -> Hyper:
    """Validated ``Hyper``: temperature finite and > 0, alpha in [0, 1] (each element)."""
    for t in np.ravel(np.asarray(temperature, dtype=np.float64)):
        check_temperature(t)
    for a in np.ravel(np.asarray(alpha, dtype=np.float64)):
        check_alpha(a)
    # cast on the host and copy (device_put): no device program is compiled for it
    np_dtype = np.dtype(dtype)
    return Hyper(jax.device_put(np.asarray(temperature, np_dtype)), jax.device_put(np.asarray(alpha, np_dtype)))


def adam(learning_rate=1e-3, dtype=jnp.float32) -> optax.GradientTransformation:
    """The seed's optimizer, ``torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-8)``.

    The learning rate is injected into the optimizer state (a traced array), so
    changing it does not recompile; the betas and eps are static constants.
    """
    factory = optax.inject_hyperparams(optax.adam, static_args=("b1", "b2", "eps", "eps_root"),
                                       hyperparam_dtype=dtype)
    return factory(learning_rate=learning_rate)


def create_train_state(model, rng, input_dim: int, *, learning_rate=1e-3,
                       tx: optax.GradientTransformation | None = None) -> TrainState:
    """Initialise ``model`` for ``[batch, input_dim]`` inputs and its optimizer state.

    Params come from ``kdjax.models.init_params`` (PyTorch's ``nn.Linear`` init, drawn
    on the host from ``rng``: a JAX key, raw key words or an int). ``tx`` defaults to
    ``adam(learning_rate)`` in the model's dtype.
    """
    return state_from_params(init_params(model, rng, input_dim), learning_rate=learning_rate, tx=tx)


def state_from_params(params, *, learning_rate=1e-3, tx=None, members: bool = False) -> TrainState:
    """A fresh ``TrainState`` (step 0, new optimizer state) around existing params,
    e.g. weights converted from PyTorch with ``kdjax.convert.torch_to_flax``.

    With ``members=True`` every leaf of ``params`` has a leading member axis, and so
    does every leaf of the returned state (the input of a vmapped sweep run).
    """
    lr = float(learning_rate)
    if not (np.isfinite(lr) and lr > 0):
        raise InputError(f"learning_rate: expected a finite number > 0, got {learning_rate}")
    if tx is None:
        return _fresh_adam_state(params, lr, bool(members))
    return _new_state(params, lr, tx, bool(members))


# Compiling without LLVM optimisation: ~3x faster to compile on CPU, for programs
# that run once and take microseconds.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# For training runs of a few hundred steps or fewer: LLVM -O1 compiles ~25% faster on
# CPU than the default -O2 (the seed-sized teacher: 0.7 s vs 0.9 s) at about the same
# step time, since the matmuls are library calls either way.
SHORT_RUN_COMPILE = {"xla_backend_optimization_level": 1}


def _new_state_one(params, learning_rate: float, tx) -> TrainState:
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    tx = adam(learning_rate, dtype) if tx is None else tx
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# One small program builds the optimizer state, instead of a compiled op per leaf.
@functools.partial(jax.jit, static_argnums=(1, 2, 3), compiler_options=FAST_COMPILE)
def _new_state(params, learning_rate: float, tx, members: bool) -> TrainState:
    new = functools.partial(_new_state_one, learning_rate=learning_rate, tx=tx)
    return jax.vmap(new)(params) if members else new(params)


def _fresh_adam_state(params, learning_rate: float, members: bool) -> TrainState:
    # kdjax's adam starts with every leaf zero but the learning rate: build that on the
    # host (no program to compile per model shape); tests check it equals _new_state
    one = functools.partial(_new_state_one, learning_rate=learning_rate, tx=None)
    shapes = jax.eval_shape(jax.vmap(one) if members else one, params)
    state = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    lr = state.opt_state.hyperparams["learning_rate"]
    lr[...] = learning_rate
    return jax.device_put(state.replace(params=params))


def set_learning_rate(state: TrainState, learning_rate) -> TrainState:
    """Same state with a new learning rate (for states built with ``kdjax.adam``)."""
    hp = state.opt_state.hyperparams
    new = dict(hp, learning_rate=jnp.asarray(learning_rate, hp["learning_rate"].dtype))
    return state.replace(opt_state=state.opt_state._replace(hyperparams=new))


def _loss_fn(params, batch, rng, hyper, teacher_params, *, model, objective, teacher):
    logits = model.apply({"params": params}, batch["x"], train=True, rngs={"dropout": rng})
    if objective == "ce":
        return jnp.mean(hard_ce(logits, batch["y"]))
    if "teacher_logits" in batch:
        t_logits = batch["teacher_logits"]
    else:
        t_logits = teacher.apply({"params": teacher_params}, batch["x"], train=False)
    return distillation_loss(logits, t_logits, batch["y"], hyper.temperature, hyper.alpha)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
               hyper: Hyper | None = None, teacher_params=None, *, model, tx,
               objective: str = "kd", teacher=None):
    """One optimizer step. Pure: returns ``(new_state, {"loss": loss})``.

    Args:
      state: the ``TrainState`` to update.
      batch: ``{"x": [B, D], "y": [B]}`` plus, for ``objective="kd"``, either
        ``"teacher_logits": [B, C]`` (cached) or nothing, in which case the teacher
        runs online (eval mode) from ``teacher_params``.
      rng: base key; dropout uses ``fold_in(rng, state.step)``.
      hyper: temperature and alpha (``objective="kd"`` only).
      teacher_params: the frozen teacher's params (online distillation only).
      model, tx, objective, teacher: bound with ``functools.partial``.
    """
    if objective not in OBJECTIVES:
        raise InputError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    if objective == "kd":
        if hyper is None:
            raise InputError("hyper: objective 'kd' needs a Hyper (see kdjax.make_hyper), got None")
        if "teacher_logits" not in batch and (teacher is None or teacher_params is None):
            raise InputError("objective 'kd': expected batch['teacher_logits'] or both a bound "
                             "teacher and teacher_params, got neither")
    key = jax.random.fold_in(rng, state.step)
    loss_fn = functools.partial(_loss_fn, model=model, objective=objective, teacher=teacher)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key, hyper, teacher_params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), {"loss": loss}


def make_train_step(model, objective: str = "kd", *, tx=None, teacher=None, jit: bool = True):
    """Bind ``model``/``tx``/``objective``/``teacher`` into ``train_step``; jit with donation.

    With ``jit=False`` the pure, unjitted step is returned (to scan, vmap or wrap).
    The jitted step donates ``state``: do not reuse the state you passed in.
    """
    if objective not in OBJECTIVES:
        raise InputError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    tx = adam() if tx is None else tx
    step = functools.partial(train_step, model=model, tx=tx, objective=objective, teacher=teacher)
    return jax.jit(step, donate_argnums=0) if jit else step


def run_steps(state: TrainState, data: Mapping[str, jax.Array], schedule: jax.Array,
              rng: jax.Array, hyper: Hyper | None = None, teacher_params=None, *, step):
    """Many steps as one ``lax.scan``: batch k is ``data[schedule[k]]``.

    Args:
      data: full arrays on device, ``{"x", "y"}`` and optionally ``"teacher_logits"``
        (cached teacher outputs for every example).
      schedule: ``[steps, batch]`` int indices (``kdjax.data.seed_schedule`` or
        ``epoch_schedule``).
      step: an unjitted step from ``make_train_step(..., jit=False)``.

    Returns:
      ``(final_state, {"loss": [steps]})``.

    Shapes and dtypes are checked here, at trace time (free at run time). Index
    *values* cannot be checked inside the compiled scan (``jnp.take`` does not raise
    on an out-of-range index; it returns NaN features and garbage labels): the runs
    from ``make_run`` and ``kdjax.sweep.make_sweep_run`` check them on the host.
    """
    _check_run_inputs(data, schedule)

    def body(state, idx):
        batch = {name: jnp.take(arr, idx, axis=0) for name, arr in data.items()}
        return step(state, batch, rng, hyper, teacher_params)

    return jax.lax.scan(body, state, schedule)


def _check_run_inputs(data, schedule) -> None:
    if "x" not in data or "y" not in data:
        raise InputError(f"data: expected keys 'x' and 'y' (optionally 'teacher_logits'), got {sorted(data)}")
    n = data["x"].shape[0]
    for name, arr in data.items():
        if arr.shape[0] != n:
            raise InputError(f"data['{name}']: expected {n} rows (as data['x']), got shape {arr.shape}")
    if not jnp.issubdtype(data["y"].dtype, jnp.integer):
        raise InputTypeError(f"data['y']: expected integer class labels, got dtype {data['y'].dtype}")
    if schedule.ndim != 2 or not jnp.issubdtype(schedule.dtype, jnp.integer):
        raise InputError(f"schedule: expected integer indices of shape [steps, batch], got "
                         f"{schedule.dtype}{list(schedule.shape)}")
    if schedule.shape[0] == 0 or schedule.shape[1] == 0:
        raise InputError(f"schedule: expected at least one step of a non-empty batch, got shape {schedule.shape}")


def make_run(model, objective: str = "kd", *, tx=None, teacher=None, compiler_options=None):
    """A jitted, state-donating ``run_steps`` for this model and objective.

    Call as ``run(state, data, schedule, rng, hyper, teacher_params)``. The program is
    compiled once per (shapes, dtypes); feed it fixed-size chunks of the schedule to
    drive a progress bar without recompiling. A concrete schedule with an index outside
    ``[0, len(data["x"]))`` raises ``InputError`` before anything runs.
    ``compiler_options`` go to ``jax.jit`` (e.g. ``SHORT_RUN_COMPILE``).
    """
    step = make_train_step(model, objective, tx=tx, teacher=teacher, jit=False)
    run = functools.partial(run_steps, step=step)
    return CheckedRun(jax.jit(run, donate_argnums=0, compiler_options=compiler_options))


class CheckedRun:
    """A jitted ``run(state, data, schedule, ...)`` with a host-side bounds check of a
    concrete ``schedule`` (a traced one is passed through). Every other attribute
    (``lower``, ``trace``, ...) is the jitted function's."""

    def __init__(self, run):
        self.jitted = run
        functools.update_wrapper(self, run)

    def __call__(self, state, data, schedule, *args, **kwargs):
        if not isinstance(schedule, jax.core.Tracer) and np.size(schedule):
            idx, n = np.asarray(schedule), np.shape(data["x"])[0]
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= n:
                raise InputError(f"schedule: expected indices in [0, {n}) (the rows of data['x']), "
                                 f"got values from {lo} to {hi}")
        return self.jitted(state, data, schedule, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.jitted, name)


def _logits(model, params, x):
    return model.apply({"params": params}, x, train=False)


def _metrics(model, params, x, y):
    logits = _logits(model, params, x)
    return {"loss": jnp.mean(hard_ce(logits, y)),
            "accuracy": jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))}


def _over_members(fn, model, members: bool, n_shared: int):
    # members: params batched on axis 0, the data arguments shared
    fn = functools.partial(fn, model)
    return jax.vmap(fn, in_axes=(0,) + (None,) * n_shared) if members else fn


# Evaluation runs a handful of times per model: compile it fast (see FAST_COMPILE).
@functools.partial(jax.jit, static_argnums=0, static_argnames="members", compiler_options=FAST_COMPILE)
def predict_logits(model, params, x, members: bool = False):
    """Eval-mode logits (no dropout) of ``model`` on ``x``: the teacher-logit cache.

    With ``members=True``, ``params`` is batched (one model per member) and the result
    is ``[N, n, classes]``.
    """
    return _over_members(_logits, model, members, 1)(params, x)


@functools.partial(jax.jit, static_argnums=0, static_argnames="members", compiler_options=FAST_COMPILE)
def evaluate(model, params, x, y, members: bool = False):
    """``{"loss": mean CE, "accuracy": fraction correct}`` of ``model`` (eval mode) on (x, y).

    With ``members=True``, ``params`` is batched and each metric is ``[N]``.
    """
    return _over_members(_metrics, model, members, 2)(params, x, y)
