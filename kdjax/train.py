"""Train state, the pure train step, fused (``lax.scan``) runs, optimizers and evaluation.

The whole training story in one place:

* ``TrainState(step, params, model_state, opt_state)`` holds only arrays, so it can be
  donated, vmapped and checkpointed. ``model_state`` is every non-parameter variable
  collection of the model (``{"batch_stats": ...}`` for BatchNorm; ``{}`` for the
  seed's MLPs). The model and optimizer are bound into the step with
  ``functools.partial`` (changing them is a new program, by design).
* A model is any ``flax.linen`` module called as ``apply(variables, x, train=bool,
  rngs={"dropout": key})``. In training the step passes ``train=True`` and updates
  ``model_state``; evaluation passes ``train=False`` and reads it.
* ``train_step(state, batch, rng, hyper, teacher_params)`` is one optimizer step for
  an objective: ``"ce"`` (cross-entropy), ``"kd"`` (``distillation_loss`` against a
  frozen teacher) or a callable ``loss(logits, batch, teacher_logits, hyper)``.
* ``run_steps`` scans that step over a precomputed ``[steps, batch]`` index schedule
  with the whole dataset on device: one compiled program per run (or per chunk).
* Hyperparameters are traced: temperature and alpha live in ``Hyper``, the learning
  rate in the optimizer state (``adam``) or a schedule of the step count (``sgd``).
  New values reuse the compiled program.

Dropout keys are ``fold_in(rng, state.step)``: a run is a function of its base key and
the step count only, so chunked, looped, fused and resumed runs agree exactly.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import parallel
from kdjax.errors import InputError, InputTypeError
from kdjax.losses import (check_alpha, check_beta, check_temperature, check_where, distillation_loss, hard_ce,
                          masked_mean)
from kdjax.models import resnet
from kdjax.models.mlp import MLP_MODELS, init_params

__all__ = ["TrainState", "Hyper", "make_hyper", "adam", "sgd", "cosine_schedule", "multistep_schedule",
           "create_train_state", "state_from_params", "init_variables", "apply_model", "train_step",
           "make_train_step", "run_steps", "make_run", "predict_logits", "evaluate",
           "set_learning_rate", "OBJECTIVES"]

OBJECTIVES = ("ce", "kd")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; arrays only.

    ``model_state``: the model's non-parameter collections (``{"batch_stats": ...}``),
    ``{}`` for a stateless model.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: optax.OptState


@flax.struct.dataclass
class Hyper:
    """Distillation hyperparameters as arrays (scalars, or ``[n]`` inside a vmapped sweep).

    Build with ``make_hyper``, which validates and fixes the dtype, so every call with
    new values hits the same compiled program. ``beta`` (optional) is for objectives
    that take one (``jsd``'s mixture, ``dkd``'s NCKD weight).
    """

    temperature: jax.Array
    alpha: jax.Array
    beta: jax.Array | None = None


def make_hyper(temperature=3.0, alpha=0.7, dtype=jnp.float32, *, beta=None) -> Hyper:
    """Validated ``Hyper``: temperature finite and > 0, alpha in [0, 1], beta (if given)
    >= 0 (each element)."""
    for t in np.ravel(np.asarray(temperature, dtype=np.float64)):
        check_temperature(t)
    for a in np.ravel(np.asarray(alpha, dtype=np.float64)):
        check_alpha(a)
    for b in np.ravel(np.asarray(0.0 if beta is None else beta, dtype=np.float64)):
        check_beta(b, upper=None)
    # cast on the host and copy (device_put): no device program is compiled for it
    np_dtype = np.dtype(dtype)
    put = lambda v: None if v is None else jax.device_put(np.asarray(v, np_dtype))
    return Hyper(put(temperature), put(alpha), put(beta))


# ----------------------------------------------------------------------------- optimizers

def _check_lr(learning_rate) -> None:
    if callable(learning_rate):
        return
    lr = float(learning_rate)
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"learning_rate: expected a finite number > 0 or a schedule, got {learning_rate}")


def adam(learning_rate=1e-3, dtype=jnp.float32) -> optax.GradientTransformation:
    """The seed's optimizer, ``torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-8)``.

    The learning rate is injected into the optimizer state (a traced array), so
    changing it does not recompile; the betas and eps are static constants.
    ``learning_rate`` may also be a schedule (``cosine_schedule``, ...).
    """
    _check_lr(learning_rate)
    factory = optax.inject_hyperparams(optax.adam, static_args=("b1", "b2", "eps", "eps_root"),
                                       hyperparam_dtype=dtype)
    return factory(learning_rate=learning_rate)


def sgd(learning_rate=0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
        nesterov: bool = False) -> optax.GradientTransformation:
    r"""``torch.optim.SGD(params, lr, momentum, weight_decay=..., nesterov=...)`` (dampening 0).

    .. math::
        g_t = \nabla_t + \lambda \theta_{t-1},\quad b_t = \mu b_{t-1} + g_t\ (b_1 = g_1),\quad
        \theta_t = \theta_{t-1} - \eta_t\,(g_t + \mu b_t \text{ if Nesterov else } b_t)

    Weight decay applies to every parameter (BatchNorm's too), as with one torch
    param group. ``learning_rate`` is a number or a schedule of the optimizer step
    count (``cosine_schedule``, ``multistep_schedule``), whose position lives in the
    optimizer state, so a resumed run continues the schedule.
    """
    _check_lr(learning_rate)
    if not (0.0 <= momentum < 1.0):
        raise InputError(f"momentum: expected a number in [0, 1), got {momentum}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise InputError(f"weight_decay: expected a finite number >= 0, got {weight_decay}")
    if nesterov and momentum == 0:
        raise InputError("nesterov: expected momentum > 0 (as torch.optim.SGD), got momentum 0")
    parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def _check_every(t_max, every):
    if not isinstance(t_max, (int, np.integer)) or t_max < 1:
        raise InputError(f"t_max: expected a positive int, got {t_max!r}")
    if not isinstance(every, (int, np.integer)) or every < 1:
        raise InputError(f"every: expected a positive int, got {every!r}")


def cosine_schedule(learning_rate: float, t_max: int, *, eta_min: float = 0.0,
                    every: int = 1) -> Callable[[jax.Array], jax.Array]:
    r"""``torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)``
    with ``scheduler.step()`` after every ``every`` optimizer steps (1: per step; the
    steps per epoch: per epoch).

    .. math:: \eta_t = \eta_{min} + (\eta - \eta_{min})\,(1 + \cos(\pi e / T_{max})) / 2,
              \quad e = \lfloor t / every \rfloor

    (torch's closed form; valid for ``e <= t_max``, the run torch users configure).
    """
    _check_lr(learning_rate)
    _check_every(t_max, every)

    def schedule(count):
        e = count // every
        return eta_min + (learning_rate - eta_min) * (1 + jnp.cos(math.pi * e / t_max)) / 2

    return schedule


def multistep_schedule(learning_rate: float, milestones: Sequence[int], gamma: float = 0.1, *,
                       every: int = 1) -> Callable[[jax.Array], jax.Array]:
    r"""``torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma)`` with
    ``scheduler.step()`` after every ``every`` optimizer steps:
    :math:`\eta_t = \eta\,\gamma^{|\{m \in milestones : m \le \lfloor t / every \rfloor\}|}`.
    """
    _check_lr(learning_rate)
    _check_every(1, every)
    ms = list(milestones)
    if any(not isinstance(m, (int, np.integer)) or m < 1 for m in ms) or ms != sorted(ms):
        raise InputError(f"milestones: expected increasing positive ints, got {milestones!r}")
    if not (math.isfinite(gamma) and gamma > 0):
        raise InputError(f"gamma: expected a finite number > 0, got {gamma}")
    bounds = np.asarray(ms, np.int32)

    def schedule(count):
        passed = jnp.sum(count // every >= bounds) if len(bounds) else 0
        return learning_rate * gamma ** passed

    return schedule


def set_learning_rate(state: TrainState, learning_rate) -> TrainState:
    """Same state with a new learning rate (for states built with ``kdjax.adam``)."""
    hp = state.opt_state.hyperparams
    new = dict(hp, learning_rate=jnp.asarray(learning_rate, hp["learning_rate"].dtype))
    return state.replace(opt_state=state.opt_state._replace(hyperparams=new))


# ----------------------------------------------------------------------------- state

def _check_model(model, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"{where}: expected a flax.linen Module, got {type(model).__name__}")
    params = inspect.signature(type(model).__call__).parameters
    if "train" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise InputTypeError(f"{where}: expected a model called as model(x, train=bool); "
                             f"{type(model).__name__}.__call__ takes ({', '.join(list(params)[1:])})")


def _example_struct(example) -> jax.ShapeDtypeStruct:
    if isinstance(example, jax.ShapeDtypeStruct):
        struct = example
    elif hasattr(example, "shape") and hasattr(example, "dtype"):
        struct = jax.ShapeDtypeStruct(tuple(example.shape), example.dtype)
    else:
        arr = np.asarray(example)
        struct = jax.ShapeDtypeStruct(arr.shape, arr.dtype)
    if len(struct.shape) < 1 or struct.shape[0] < 1:
        raise InputError(f"example_input: expected a batch [batch, ...] with at least one example, "
                         f"got shape {struct.shape}")
    return struct


def _raw_key(rng) -> np.ndarray | jax.Array:
    """A JAX key from a typed key, raw ``uint32[2]`` words or an int (as ``PRNGKey(int)``)."""
    if isinstance(rng, (int, np.integer)):
        return np.array([(int(rng) >> 32) & 0xFFFFFFFF, int(rng) & 0xFFFFFFFF], np.uint32)
    if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return rng


def _split_variables(variables) -> tuple[Any, dict]:
    variables = dict(flax.core.unfreeze(variables))
    return variables.pop("params", {}), variables


def init_variables(model, rng, example_input, *, members: bool = False):
    """``(params, model_state)`` of ``model`` for inputs like ``example_input``.

    kdjax's models draw PyTorch's init on the host (``kdjax.models.init_params``,
    ``kdjax.models.resnet.init_variables``: nothing to compile); every other model runs
    its own ``model.init`` (compiled once per model and shape), with ``train=False``. Only the shape and dtype of ``example_input`` matter (an array or
    a ``jax.ShapeDtypeStruct``). With ``members=True``, ``rng`` is ``[N, 2]`` raw keys
    and every leaf gets a leading member axis.
    """
    _check_model(model, "model")
    struct = _example_struct(example_input)
    if isinstance(model, MLP_MODELS):
        if len(struct.shape) < 2:
            raise InputError(f"example_input: expected [batch, features] (or [batch, ...]) for "
                             f"{type(model).__name__}, got shape {struct.shape}")
        return init_params(model, rng, int(np.prod(struct.shape[1:])), members=members), {}
    if isinstance(model, resnet.ResNet):
        return resnet.init_variables(model, rng, struct, members=members)
    if members:
        keys = np.asarray(rng)
        if keys.ndim != 2 or len(keys) == 0:
            raise InputError(f"init_keys: expected [N, 2] raw keys (N >= 1), got shape {keys.shape}")
        return _init_members(model, keys, struct.shape, np.dtype(struct.dtype))
    return _init_one(model, _raw_key(rng), struct.shape, np.dtype(struct.dtype))


def _model_init(model, key, shape, dtype):
    return _split_variables(model.init({"params": key}, jnp.zeros(shape, dtype), train=False))


# jitted with the model static: JAX's own cache compiles each (model, shape) once
_init_one = jax.jit(_model_init, static_argnums=(0, 2, 3))
_init_members = jax.jit(lambda model, keys, shape, dtype: jax.vmap(
    lambda k: _model_init(model, k, shape, dtype))(keys), static_argnums=(0, 2, 3))


def create_train_state(model, rng, example_input=None, *, tx: optax.GradientTransformation | None = None,
                       learning_rate=1e-3, input_dim: int | None = None) -> TrainState:
    """Initialise ``model`` and its optimizer state.

    Args:
      model: any linen module called as ``model(x, train=bool)``.
      rng: a JAX key, raw ``uint32[2]`` key words or an int.
      example_input: an example batch (array or ``jax.ShapeDtypeStruct``, any rank:
        only its shape and dtype are used), or an int ``input_dim`` for ``[batch,
        input_dim]`` inputs (the v1 call, also accepted as ``input_dim=``).
      tx: the optimizer; default ``adam(learning_rate)`` in the params' dtype.

    kdjax's models get PyTorch's init (see ``init_variables``); other models their
    own ``model.init``. Non-parameter collections (BatchNorm statistics) go to
    ``model_state``.
    """
    if input_dim is not None:
        if example_input is not None:
            raise InputError("create_train_state: expected example_input or input_dim, got both")
        example_input = input_dim
    if example_input is None:
        raise InputError("create_train_state: expected an example_input (an example batch, or an int "
                         "input_dim), got none")
    if isinstance(example_input, (int, np.integer, float)) and not isinstance(example_input, bool):
        if not isinstance(example_input, (int, np.integer)) or example_input < 1:
            raise InputError(f"input_dim: expected a positive int, got {example_input!r}")
        example_input = jax.ShapeDtypeStruct((1, int(example_input)), getattr(model, "dtype", jnp.float32))
    params, model_state = init_variables(model, rng, example_input)
    return state_from_params(params, model_state=model_state, learning_rate=learning_rate, tx=tx)


def state_from_params(params, *, model_state=None, learning_rate=1e-3, tx=None,
                      members: bool = False) -> TrainState:
    """A fresh ``TrainState`` (step 0, new optimizer state) around existing params (and
    the model's non-parameter collections, e.g. ``{"batch_stats": ...}``), e.g. weights
    converted from PyTorch with ``kdjax.convert.torch_to_variables``.

    With ``members=True`` every leaf of ``params`` has a leading member axis, and so
    does every leaf of the returned state (the input of a vmapped sweep run).
    """
    _check_lr(learning_rate)
    model_state = {} if model_state is None else dict(model_state)
    if tx is None:
        opt_state = _host_adam_state(params, float(learning_rate), bool(members))
    else:
        init = jax.vmap(tx.init) if members else tx.init
        opt_state = jax.jit(init)(params)
    lead = np.shape(jax.tree_util.tree_leaves(params)[0])[:1] if members else ()
    state = TrainState(np.zeros(lead, np.int32), params, model_state, opt_state)
    return jax.device_put(state)


def _host_adam_state(params, learning_rate: float, members: bool):
    # kdjax's adam starts with every leaf zero but the learning rate: built on the host,
    # nothing to compile per model shape (tests check it equals optax's own init)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    init = adam(learning_rate, dtype).init
    shapes = jax.eval_shape(jax.vmap(init) if members else init, params)
    opt_state = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    opt_state.hyperparams["learning_rate"][...] = learning_rate
    return opt_state


# ----------------------------------------------------------------------------- the step

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


def _loss_fn(params, model_state, batch, rng, hyper, teacher_params, *, model, objective, teacher):
    logits, new_state = apply_model(model, params, model_state, batch["x"], train=True, rng=rng)
    where = batch.get("where")  # token-level: only these positions count
    if objective == "ce":
        check_where(where, logits.shape[:-1])
        return masked_mean(hard_ce(logits, batch["y"]), where), new_state
    t_logits = _teacher_logits(batch, teacher, teacher_params)
    if objective == "kd":
        loss = distillation_loss(logits, t_logits, batch["y"], hyper.temperature, hyper.alpha, where=where)
        return loss, new_state
    loss = objective(logits, batch, t_logits, hyper)
    if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        raise InputError(f"objective: expected the callable to return a float scalar, got "
                         f"{jnp.result_type(loss)}{list(jnp.shape(loss))}")
    return loss, new_state


def _check_objective(objective) -> None:
    if not (callable(objective) or objective in OBJECTIVES):
        raise InputError(f"objective: expected one of {OBJECTIVES} or a callable "
                         f"loss(logits, batch, teacher_logits, hyper), got {objective!r}")


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
               hyper: Hyper | None = None, teacher_params=None, *, model, tx,
               objective="kd", teacher=None):
    """One optimizer step. Pure: returns ``(new_state, {"loss": loss})``.

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
        is ``"ce"``, ``"kd"`` or ``loss(logits, batch, teacher_logits, hyper) ->
        scalar`` (``teacher_logits`` is None when there is no teacher).
    """
    _check_objective(objective)
    if objective == "kd":
        if hyper is None:
            raise InputError("hyper: objective 'kd' needs a Hyper (see kdjax.make_hyper), got None")
        if "teacher_logits" not in batch and (teacher is None or teacher_params is None):
            raise InputError("objective 'kd': expected batch['teacher_logits'] or both a bound "
                             "teacher and teacher_params, got neither")
    key = jax.random.fold_in(rng, state.step)
    loss_fn = functools.partial(_loss_fn, model=model, objective=objective, teacher=teacher)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, model_state), grads = grad_fn(state.params, state.model_state, batch, key, hyper, teacher_params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, model_state, opt_state), {"loss": loss}


def make_train_step(model, objective="kd", *, tx=None, teacher=None, jit: bool = True, mesh=None,
                    donate: bool = True):
    """Bind ``model``/``tx``/``objective``/``teacher`` into ``train_step``; jit with donation.

    With ``jit=False`` the pure, unjitted step is returned (to scan, vmap or wrap).
    The jitted step donates ``state`` (its buffers are reused for the result): do not
    reuse the state you passed in, or pass ``donate=False``.
    ``tx`` defaults to ``adam()``; it must be the optimizer the state was built with.

    With a ``mesh`` (``kdjax.parallel.make_mesh``) the step is data-parallel over its
    ``"data"`` axis, for batches fed from the host (data too large for the devices):
    each process passes *its own* rows of the global batch (NumPy or jax arrays; one
    process: all of them), which are placed with
    ``jax.make_array_from_process_local_data``; the state, key, hyperparameters and
    teacher are replicated. The returned state is replicated.
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
    return MeshStep(jax.jit(step, donate_argnums=donated, out_shardings=parallel.replicated(mesh)), mesh)


class MeshStep:
    """A jitted step on a mesh: places the host-fed batch (each process's rows) over
    ``"data"`` and the rest replicated, then calls it. Other attributes are the jitted
    function's."""

    def __init__(self, jitted, mesh):
        self.jitted, self.mesh = jitted, mesh
        functools.update_wrapper(self, jitted)

    def __call__(self, state, batch, rng, hyper=None, teacher_params=None):
        rows = parallel.data_sharding(self.mesh)

        def place(x):
            if isinstance(x, jax.Array) and x.sharding == rows:
                return x
            parallel.check_divides(np.shape(x)[0] * jax.process_count(), self.mesh, "data", "batch rows")
            return jax.make_array_from_process_local_data(rows, np.asarray(x))

        batch = {k: place(v) for k, v in batch.items()}
        state, rng, hyper, teacher_params = parallel.put((state, rng, hyper, teacher_params),
                                                         parallel.replicated(self.mesh))
        return self.jitted(state, batch, rng, hyper, teacher_params)

    def __getattr__(self, name):
        return getattr(self.jitted, name)


def run_steps(state: TrainState, data: Mapping[str, jax.Array], schedule: jax.Array,
              rng: jax.Array, hyper: Hyper | None = None, teacher_params=None, *, step,
              batch_sharding=None):
    """Many steps as one ``lax.scan``: batch k is ``data[schedule[k]]``.

    Args:
      data: full arrays on device, ``{"x", "y"}`` and optionally ``"teacher_logits"``
        (cached teacher outputs for every example); ``x`` of any rank ``[n, ...]``.
      schedule: ``[steps, batch]`` int indices (``kdjax.data.seed_schedule`` or
        ``epoch_schedule``).
      step: an unjitted step from ``make_train_step(..., jit=False)``.
      batch_sharding: a sharding every gathered minibatch is constrained to (a mesh's
        ``"data"`` axis: ``make_run(..., mesh=)`` sets it).

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
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return step(state, batch, rng, hyper, teacher_params)

    return jax.lax.scan(body, state, schedule)


def _check_run_inputs(data, schedule) -> None:
    if "x" not in data or "y" not in data:
        raise InputError(f"data: expected keys 'x' and 'y' (optionally 'teacher_logits'), got {sorted(data)}")
    n = data["x"].shape[0] if data["x"].ndim else 0
    for name, arr in data.items():
        if arr.ndim == 0 or arr.shape[0] != n:
            raise InputError(f"data['{name}']: expected {n} rows (as data['x']), got shape {arr.shape}")
    if not jnp.issubdtype(data["y"].dtype, jnp.integer):
        raise InputTypeError(f"data['y']: expected integer class labels, got dtype {data['y'].dtype}")
    if schedule.ndim != 2 or not jnp.issubdtype(schedule.dtype, jnp.integer):
        raise InputError(f"schedule: expected integer indices of shape [steps, batch], got "
                         f"{schedule.dtype}{list(schedule.shape)}")
    if schedule.shape[0] == 0 or schedule.shape[1] == 0:
        raise InputError(f"schedule: expected at least one step of a non-empty batch, got shape {schedule.shape}")


def make_run(model, objective="kd", *, tx=None, teacher=None, mesh=None, donate: bool = True):
    """A jitted, state-donating ``run_steps`` for this model and objective.

    Call as ``run(state, data, schedule, rng, hyper, teacher_params)``. The state's
    buffers are donated (reused for the result): pass the returned state to the next
    call; passing a donated one again raises ``InputError``. ``donate=False`` keeps the
    caller's state intact (one more copy of it in memory). The program is
    compiled once per (shapes, dtypes); feed it fixed-size chunks of the schedule to
    drive a progress bar without recompiling. A concrete schedule with an index outside
    ``[0, len(data["x"]))`` raises ``InputError`` before anything runs.

    With a ``mesh`` (``kdjax.parallel.make_mesh``) every minibatch is split over its
    ``"data"`` axis (the batch size must divide evenly; checked before compiling), the
    data set and the state are replicated, and XLA's partitioner reduces the gradients
    (and BatchNorm's batch statistics) over the devices. Inputs are placed for the
    caller; the returned state is replicated.
    """
    step = make_train_step(model, objective, tx=tx, teacher=teacher, jit=False)
    donated = (0,) if donate else ()
    if mesh is None:
        return CheckedRun(jax.jit(functools.partial(run_steps, step=step), donate_argnums=donated))
    run = functools.partial(run_steps, step=step, batch_sharding=parallel.data_sharding(mesh))
    jitted = jax.jit(run, donate_argnums=donated, out_shardings=parallel.replicated(mesh))
    return CheckedRun(jitted, place=functools.partial(_place_run, mesh))


def _place_run(mesh, state, data, schedule, args, kwargs):
    parallel.check_divides(np.shape(schedule)[-1], mesh, "data", "batch size")
    rep = parallel.replicated(mesh)
    return (parallel.put(state, rep), parallel.put(data, rep),
            parallel.put(schedule, parallel.schedule_sharding(mesh)), parallel.put(args, rep),
            parallel.put(kwargs, rep))


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


# ----------------------------------------------------------------------------- evaluation

def _in_batches(fn, x, batch_size: int | None):
    """``fn(x)`` evaluated ``batch_size`` rows at a time (``lax.map``), concatenated."""
    n = x.shape[0]
    if batch_size is None or batch_size >= n:
        return fn(x)
    k = n // batch_size
    head = jax.lax.map(fn, x[:k * batch_size].reshape(k, batch_size, *x.shape[1:]))
    head = head.reshape(k * batch_size, *head.shape[2:])
    return head if k * batch_size == n else jnp.concatenate([head, fn(x[k * batch_size:])])


@functools.partial(jax.jit, static_argnames=("model", "members", "batch_size"))
def _predict(model, params, model_state, x, members, batch_size):
    def logits(p, s):
        return _in_batches(lambda xb: apply_model(model, p, s, xb, train=False)[0], x, batch_size)

    return jax.vmap(logits)(params, model_state) if members else logits(params, model_state)


def _check_batch_size(batch_size):
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise InputError(f"batch_size: expected a positive int or None, got {batch_size!r}")


def predict_logits(model, params, x, members: bool = False, *, batch_size: int | None = None):
    """Eval-mode logits (no dropout, BatchNorm running statistics) of ``model`` on ``x``.

    ``params`` is a params tree or a ``TrainState`` (a model with BatchNorm needs the
    state: its ``model_state``). With ``members=True`` it is batched (one model per
    member) and the result is ``[N, n, classes]``. ``batch_size`` bounds memory:
    ``x`` is evaluated that many rows at a time.
    """
    _check_batch_size(batch_size)
    params, model_state = _variables_of(params)
    return _predict(model, params, model_state, x, bool(members), batch_size)


@functools.partial(jax.jit, static_argnames=("model", "members", "batch_size"))
def _evaluate(model, params, model_state, x, y, members, batch_size):
    logits = _predict(model, params, model_state, x, members, batch_size)

    def metrics(lg):
        return {"loss": jnp.mean(hard_ce(lg, y)),
                "accuracy": jnp.mean((jnp.argmax(lg, -1) == y).astype(jnp.float32))}

    return jax.vmap(metrics)(logits) if members else metrics(logits)


def evaluate(model, params, x, y, members: bool = False, *, batch_size: int | None = None):
    """``{"loss": mean CE, "accuracy": fraction correct}`` of ``model`` (eval mode) on (x, y).

    ``params``, ``members`` and ``batch_size`` as in ``predict_logits``; with
    ``members=True`` each metric is ``[N]``.
    """
    _check_batch_size(batch_size)
    params, model_state = _variables_of(params)
    return _evaluate(model, params, model_state, x, y, bool(members), batch_size)
