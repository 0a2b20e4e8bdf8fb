"""The train state and its initialisation.

``TrainState(step, params, model_state, opt_state)`` holds only arrays, so it can be
donated, vmapped and checkpointed. ``model_state`` is every non-parameter variable
collection of the model (``{"batch_stats": ...}`` for BatchNorm; ``{}`` for the reference script's
MLPs). ``Hyper`` holds the distillation hyperparameters as traced arrays.

A model with an initialisation of its own (kdjax's models draw PyTorch's, on the host)
implements the hook ``kdjax_init(rng, example, *, members) -> (params, model_state)``;
every other model is initialised with ``model.init``.
"""

from __future__ import annotations

import inspect
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import parallel
from kdjax.errors import InputError, InputTypeError
from kdjax.losses import check_alpha, check_beta, check_temperature
from kdjax.objectives import raw_key
from kdjax.train.optimizers import _check_lr, adam

__all__ = ["TrainState", "Hyper", "make_hyper", "init_variables", "create_train_state", "state_from_params",
           "set_learning_rate"]


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

    @property
    def variables(self) -> dict:
        """``{"params": params, **model_state}``: what ``model.apply`` takes."""
        return {"params": self.params, **self.model_state}


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
    """A validated ``Hyper``, cast on the host (no program is compiled for it).

    Args:
      temperature: a scalar or array, each element finite and > 0.
      alpha: a scalar or array, each element in [0, 1].
      dtype: the fields' dtype.
      beta: None, or a scalar or array, each element finite and >= 0.

    Returns:
      ``Hyper(temperature, alpha, beta)`` as device arrays (``beta`` None when not given).

    Raises:
      InputError: an element out of its range.
    """
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


def _split_variables(variables) -> tuple[Any, dict]:
    variables = dict(flax.core.unfreeze(variables))
    return variables.pop("params", {}), variables


def init_variables(model, rng, example_input, *, members: bool = False):
    """``(params, model_state)`` of ``model`` for inputs like ``example_input``.

    A model that implements ``kdjax_init(rng, example, *, members)`` initialises itself
    (kdjax's models draw PyTorch's init on the host: nothing to compile); every other
    model runs its own ``model.init`` (compiled once per model and shape), with
    ``train=False``.

    Args:
      model: any linen module called as ``model(x, train=bool)``.
      rng: a JAX key, raw ``uint32[2]`` key words or an int; with ``members``, ``[N, 2]`` raw keys.
      example_input: an example batch ``[batch, ...]`` (an array or a ``jax.ShapeDtypeStruct``:
        only its shape and dtype matter).
      members: give every leaf a leading member axis, one member per key.

    Returns:
      ``(params, model_state)``: ``model_state`` the non-parameter collections (``{}`` if none).

    Raises:
      InputTypeError: a model that is not a linen module called with ``train=``.
      InputError: an empty example batch, or (``members``) keys that are not ``[N, 2]``.
    """
    _check_model(model, "model")
    struct = _example_struct(example_input)
    hook = getattr(model, "kdjax_init", None)
    if hook is not None:
        return hook(rng, struct, members=members)
    if members:
        keys = np.asarray(rng)
        if keys.ndim != 2 or len(keys) == 0:
            raise InputError(f"init_keys: expected [N, 2] raw keys (N >= 1), got shape {keys.shape}")
        return _init_members(model, keys, struct.shape, np.dtype(struct.dtype))
    return _init_one(model, raw_key(rng), struct.shape, np.dtype(struct.dtype))


def _model_init(model, key, shape, dtype):
    return _split_variables(model.init({"params": key}, jnp.zeros(shape, dtype), train=False))


# jitted with the model static: JAX's own cache compiles each (model, shape) once
_init_one = jax.jit(_model_init, static_argnums=(0, 2, 3))
_init_members = jax.jit(lambda model, keys, shape, dtype: jax.vmap(
    lambda k: _model_init(model, k, shape, dtype))(keys), static_argnums=(0, 2, 3))


def create_train_state(model, rng, example_input=None, *, tx: optax.GradientTransformation | None = None,
                       learning_rate=1e-3, input_dim: int | None = None, mesh=None, rules=None) -> TrainState:
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

    With a ``mesh`` (``kdjax.parallel.make_mesh``) the state is created sharded by
    ``rules`` (``kdjax.parallel.state_specs``): ``model.init`` and the optimizer's init
    run as one program whose ``out_shardings`` are the rule's (shapes from
    ``jax.eval_shape``), so no device and no host ever holds the whole model, and the
    values equal the unsharded init's. A model with a host-side init (kdjax's MLPs
    and ResNets: PyTorch's draws) is drawn on the host, then placed shard by shard.
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
    if mesh is not None and getattr(model, "kdjax_init", None) is None:
        return _create_sharded(model, rng, example_input, tx, learning_rate, mesh, rules)
    params, model_state = init_variables(model, rng, example_input)
    state = state_from_params(params, model_state=model_state, learning_rate=learning_rate, tx=tx)
    return state if mesh is None else parallel.put(state, parallel.model_shardings(state, mesh, rules))


def _create_sharded(model, rng, example_input, tx, learning_rate, mesh, rules, members: bool = False) -> TrainState:
    """``create_train_state`` (``members``: ``sweep.init_members``) as one program whose
    ``out_shardings`` are the rules' (equal to the unsharded init: JAX's partitionable
    random bits do not depend on the sharding)."""
    _check_model(model, "model")
    _check_lr(learning_rate)
    struct = _example_struct(example_input)
    shape, dtype = struct.shape, np.dtype(struct.dtype)

    def build(key):
        one = lambda k: _model_init(model, k, shape, dtype)
        params, model_state = jax.vmap(one)(key) if members else one(key)
        opt = adam(float(learning_rate), jax.tree_util.tree_leaves(params)[0].dtype) if tx is None else tx
        lead = key.shape[:1] if members else ()
        return TrainState(jnp.zeros(lead, jnp.int32), params, model_state,
                          (jax.vmap(opt.init) if members else opt.init)(params))

    key = np.asarray(rng) if members else raw_key(rng)
    out = parallel.model_shardings(jax.eval_shape(build, key), mesh, rules, members=members)
    return jax.jit(build, out_shardings=out)(parallel.put(key, parallel.replicated(mesh)))


def state_from_params(params, *, model_state=None, learning_rate=1e-3, tx=None,
                      members: bool = False) -> TrainState:
    """A fresh ``TrainState`` (step 0, new optimizer state) around existing params, e.g.
    weights converted from PyTorch with ``kdjax.convert.torch_to_variables``.

    Args:
      params: the params tree.
      model_state: the model's non-parameter collections (e.g. ``{"batch_stats": ...}``);
        None for none.
      learning_rate: for the default optimizer, ``adam(learning_rate)`` (its state built on
        the host).
      tx: the optimizer, or None for that default.
      members: every leaf of ``params`` has a leading member axis, and so will every leaf of
        the state (the input of a vmapped sweep run).

    Returns:
      The ``TrainState``, on device.

    Raises:
      InputError: a learning rate that is not a finite number > 0 (nor a schedule).
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


def set_learning_rate(state: TrainState, learning_rate) -> TrainState:
    """Same state with a new learning rate (for states built with ``kdjax.adam``).

    Args:
      state: a ``TrainState`` whose optimizer injects its learning rate (``adam``'s).
      learning_rate: the new rate (``[N]``, one per member, for a batched state).

    Returns:
      A new ``TrainState``; nothing is recompiled.
    """
    hp = state.opt_state.hyperparams
    new = dict(hp, learning_rate=jnp.asarray(learning_rate, hp["learning_rate"].dtype))
    return state.replace(opt_state=state.opt_state._replace(hyperparams=new))
