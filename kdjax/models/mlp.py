"""Teacher and student MLPs (flax.linen) with the reference script's architectures.

Inputs are ``[batch, features]``; inputs of higher rank (e.g. ``[batch, 8, 8, 1]``
images) are flattened to ``[batch, -1]`` first, in row-major (NHWC) order, like a
``nn.Flatten`` in front of the PyTorch model (which flattens NCHW: the same order
only when there is one channel).

Layer names match the PyTorch seed (``fc1`` ...), so ``kdjax.convert`` maps a
``state_dict`` by name. Kernels are stored ``[in, out]`` (Flax) where PyTorch
stores ``[out, in]``.

Default init is PyTorch's ``nn.Linear`` init: weight and bias both drawn from
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5) reduces to that
bound), so training from scratch behaves statistically like the reference. Two ways
to get it: Flax's ``model.init(key, x)`` (``jax.random``, traceable), and
``init_params`` (NumPy on the host), which kdjax's own training uses because it
compiles nothing (on CPU, compiling a jitted init's random-number code took longer than
training the reference script's student: docs/benchmarks.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from kdjax.errors import InputError, InputTypeError

__all__ = ["TeacherMLP", "StudentMLP", "MLP", "torch_linear_init", "init_params", "param_count",
           "MLP_MODELS"]


def torch_linear_init(fan_in: int):
    """Initializer for U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as PyTorch's nn.Linear.

    Args:
      fan_in: the layer's number of inputs.

    Returns:
      A Flax initializer ``init(key, shape, dtype=float32)``.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(features: int, fan_in: int, name: str, dtype) -> nn.Dense:
    init = torch_linear_init(fan_in)
    return nn.Dense(features, name=name, kernel_init=init, bias_init=init,
                    dtype=dtype, param_dtype=dtype)


def _check_input(module: nn.Module, x, where: str):
    """Validate at trace time and flatten ``[batch, ...]`` to ``[batch, features]``."""
    if x.ndim < 2:
        raise InputError(f"{where}: expected inputs of shape [batch, features] (or [batch, ...], "
                         f"flattened), got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputTypeError(f"{where}: expected floating-point inputs, got dtype {x.dtype}")
    x = x.reshape(x.shape[0], -1)
    if module.has_variable("params", "fc1"):  # applying existing params: widths must agree
        built = module.variables["params"]["fc1"]["kernel"].shape[0]
        if x.shape[1] != built:
            raise InputError(f"{where}: expected inputs with {built} features (the params were built "
                             f"for {built}), got {x.shape[1]}")
    return x


class _LinearInit:
    """kdjax's MLPs initialise themselves (the ``kdjax_init`` hook of ``kdjax.train``):
    PyTorch's ``nn.Linear`` init, drawn on the host (``init_params``)."""

    def kdjax_init(self, rng, example, *, members: bool = False):
        if len(example.shape) < 2:
            raise InputError(f"example_input: expected [batch, features] (or [batch, ...]) for "
                             f"{type(self).__name__}, got shape {tuple(example.shape)}")
        return init_params(self, rng, int(np.prod(example.shape[1:])), members=members), {}


class TeacherMLP(_LinearInit, nn.Module):
    """fc1 -> relu -> dropout -> fc2 -> relu -> dropout -> fc3 -> relu -> fc4.

    Widths: hidden, hidden, hidden // 2, num_classes. Dropout (rate ``dropout_rate``)
    is active only when called with ``train=True`` and an ``rngs={"dropout": key}``.
    """

    hidden_dim: int = 256
    num_classes: int = 5
    dropout_rate: float = 0.3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _check_input(self, x, "TeacherMLP")
        h, d = self.hidden_dim, self.dtype
        x = nn.relu(_linear(h, x.shape[-1], "fc1", d)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout1")(x)
        x = nn.relu(_linear(h, h, "fc2", d)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout2")(x)
        x = nn.relu(_linear(h // 2, h, "fc3", d)(x))
        return _linear(self.num_classes, h // 2, "fc4", d)(x)


class StudentMLP(_LinearInit, nn.Module):
    """fc1 -> relu -> fc2. ``train`` is accepted (and ignored) for a uniform API."""

    hidden_dim: int = 64
    num_classes: int = 5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no dropout in the student
        x = _check_input(self, x, "StudentMLP")
        x = nn.relu(_linear(self.hidden_dim, x.shape[-1], "fc1", self.dtype)(x))
        return _linear(self.num_classes, self.hidden_dim, "fc2", self.dtype)(x)


class MLP(_LinearInit, nn.Module):
    """A plain ReLU MLP: ``fc1 .. fc{k}`` hidden layers of ``hidden_dims``, then ``fc{k+1}``.

    Dropout (``dropout_rate``, default off) after every hidden layer when ``train=True``.
    E.g. Hinton et al.'s MNIST nets: ``MLP((1200, 1200), 10)`` and ``MLP((800, 800), 10)``.
    """

    hidden_dims: tuple[int, ...] = (800, 800)
    num_classes: int = 10
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _check_input(self, x, "MLP")
        widths = (x.shape[-1], *self.hidden_dims)
        for i, h in enumerate(self.hidden_dims):
            x = nn.relu(_linear(h, widths[i], f"fc{i + 1}", self.dtype)(x))
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"dropout{i + 1}")(x)
        return _linear(self.num_classes, widths[-1], f"fc{len(self.hidden_dims) + 1}", self.dtype)(x)


# The models whose params ``init_params`` draws on the host (``create_train_state`` uses it).
MLP_MODELS = (TeacherMLP, StudentMLP, MLP)


def _param_shapes(model, input_dim: int):
    # abstract evaluation of Flax's init: the params tree (shapes, dtypes) without running it
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    x = jax.ShapeDtypeStruct((1, input_dim), getattr(model, "dtype", jnp.float32))
    return jax.eval_shape(model.init, key, x)["params"]


def init_params(model, key, input_dim: int, *, members: bool = False):
    """Params of a kdjax model for ``[batch, input_dim]`` inputs, drawn on the host.

    Every layer ``fc*`` gets kernel ``[in, out]`` and bias ``[out]`` from
    U(-1/sqrt(in), 1/sqrt(in)) (PyTorch's ``nn.Linear`` init, as ``model.init``) with
    NumPy's generator. Same tree, shapes and dtypes as ``model.init(key, x)["params"]``;
    the draws differ. Nothing is compiled.

    Args:
      model: a kdjax MLP (dense layers ``fc1..fcK``).
      key: a JAX PRNG key, raw ``uint32`` key words or an int; with ``members`` a sequence.
      input_dim: the number of input features.
      members: give every leaf a leading member axis (member i = ``init_params(model,
        key[i], input_dim)``).

    Returns:
      The params as nested dicts of NumPy arrays.

    Raises:
      InputError: ``input_dim`` not a positive int, or no keys with ``members``.
      InputTypeError: ``model`` is not a kdjax MLP.
    """
    if not isinstance(input_dim, (int, np.integer)) or input_dim < 1:
        raise InputError(f"input_dim: expected a positive int, got {input_dim!r}")
    shapes = _param_shapes(model, int(input_dim))
    if not all(n.startswith("fc") and n[2:].isdigit() and set(v) == {"kernel", "bias"}
               for n, v in shapes.items()):
        raise InputTypeError(f"init_params: expected a kdjax model (dense layers fc1..fcK with kernel "
                             f"and bias), got layers {sorted(shapes)}")
    if not members:
        return _draw(shapes, key)
    drawn = [_draw(shapes, k) for k in key]
    if not drawn:
        raise InputError("init_keys: expected at least one key, got none")
    return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *drawn)


def host_generator(key) -> np.random.Generator:
    """NumPy's generator seeded with a JAX key.

    Args:
      key: a JAX key (typed or raw ``uint32`` words) or an int.

    Returns:
      A ``np.random.Generator``; equal keys give equal generators.
    """
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, np.uint64).ravel().tolist())


def _draw(shapes, key) -> dict:
    gen = host_generator(key)
    params = {}
    for name in sorted(shapes, key=lambda n: int(n[2:])):  # fc1, fc2, ... fc10 in order
        layer = shapes[name]
        bound = 1.0 / math.sqrt(layer["kernel"].shape[0])
        params[name] = {k: gen.uniform(-bound, bound, layer[k].shape).astype(layer[k].dtype)
                        for k in ("kernel", "bias")}
    return params


def param_count(params) -> int:
    """Total number of scalars in a params pytree.

    Args:
      params: a pytree of arrays.

    Returns:
      The sum of the leaves' sizes, an int.
    """
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
