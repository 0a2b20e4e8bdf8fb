"""PyTorch ``state_dict`` <-> Flax variables, on NumPy arrays (kdjax never imports torch).

The mapping is by name (``torch_name`` is the rule): a Flax variable at
``collection/m1/m2/.../leaf`` is the PyTorch entry ``"m1.m2....<name>"``, and the
layout is converted where the two libraries differ::

    params      kernel [in, out]             <-> weight [out, in]            Linear (transposed)
    params      kernel [kh, kw, in, out]     <-> weight [out, in, kh, kw]    Conv2d
    params      kernel [k, in, out]          <-> weight [out, in, k]         Conv1d
    params      scale, bias                  <-> weight, bias                BatchNorm, LayerNorm
    params      embedding [V, D]             <-> weight [V, D]               Embedding
    params      weight [in, out]             <-> weight [in, out]            GPT-2's Conv1D (no transpose)
    batch_stats mean, var                    <-> running_mean, running_var   BatchNorm
                (not kept)                   <-  num_batches_tracked         BatchNorm

``torch_to_variables(state_dict, like)`` converts a whole ``state_dict`` into a
variables tree with exactly the structure, shapes and dtypes of ``like``, and names
every missing, unexpected and mis-shaped key in one ``InputError``;
``variables_to_torch`` is its inverse. ``torch_to_flax`` / ``flax_to_torch`` are
the v1 functions for params of Linear layers only.

**Tied weights.** A ``state_dict`` lists a tied tensor under every name that uses it
(Hugging Face GPT-2: ``lm_head.weight`` is ``transformer.wte.weight``). Such a key is
accepted only for a tie the caller declares, ``tied={"lm_head.weight":
"transformer.wte.weight"}`` (a model with ties says which: ``TransformerLM.tied_weights``),
and only when its values equal its source's; any other key the model has no variable
for is unexpected. ``variables_to_torch(..., tied=...)`` writes the copies back.

**A Linear after a flatten.** PyTorch flattens NCHW activations in (C, H, W) order,
Flax NHWC ones in (H, W, C) order, so such a Linear's input features come in another
order. Names cannot reveal it: pass ``linear_after_flatten={"fc": (C, H, W)}`` to
permute that layer's input rows (kdjax's ResNet pools globally and needs none).

Pass torch tensors as they are (they are read through ``.detach().cpu().numpy()``,
duck-typed) or as NumPy arrays. Round trips are exact. Hugging Face folders
(``load_hf``, ``save_hf``, ``hf_files``) are in ``kdjax.convert.hf``, importable from here.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from kdjax.errors import InputError, InputTypeError

__all__ = ["torch_name", "torch_to_variables", "variables_to_torch", "torch_to_flax", "flax_to_torch", "load_hf", "save_hf",
           "HF_ARCHITECTURES", "hf_files"]

_FLAX_NAME = {"weight": "kernel", "bias": "bias"}
_TORCH_NAME = {v: k for k, v in _FLAX_NAME.items()}


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _linear_leaf(value, weight: bool, what: str) -> np.ndarray:
    """A Linear layer's weight (2-D, transposed) or bias (1-D) as a NumPy copy; ``what`` names it in the error."""
    arr = _to_numpy(value)
    if arr.ndim != (2 if weight else 1):
        raise InputError(f"{what} expected {2 if weight else 1}-D, got shape {arr.shape}")
    return arr.T.copy() if weight else arr.copy()


def _check_against(converted: dict, like, what: str) -> None:
    """Compare the converted tree with a template tree: same keys, same shapes."""
    want = {(layer, name): np.shape(v) for layer, d in like.items() for name, v in d.items()}
    got = {(layer, name): v.shape for layer, d in converted.items() for name, v in d.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        fmt = lambda keys: ", ".join(f"{a}.{b}" for a, b in keys) or "none"
        raise InputError(f"{what}: keys differ from the model's; missing {fmt(missing)}; "
                         f"unexpected {fmt(extra)}")
    for key, shape in want.items():
        if got[key] != tuple(shape):
            raise InputError(f"{what}: {key[0]}.{key[1]} expected shape {tuple(shape)}, "
                             f"got {got[key]}")


def torch_to_flax(state_dict: Mapping[str, Any], like=None) -> dict:
    """``{"fc1.weight": [out, in], ...}`` -> ``{"fc1": {"kernel": [in, out], "bias"}}``.

    Args:
      state_dict: a PyTorch ``state_dict`` (tensors or NumPy arrays).
      like: optional Flax params to check against (keys and shapes must match).

    Raises:
      ValueError: a key that is not ``<layer>.weight`` / ``<layer>.bias``, a weight
        that is not 2-D, a bias that is not 1-D, or a mismatch with ``like``.
    """
    params: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        layer, _, name = key.rpartition(".")
        if not layer or name not in _FLAX_NAME:
            raise InputError(f"state_dict: expected keys '<layer>.weight' or '<layer>.bias', "
                             f"got {key!r}")
        params.setdefault(layer, {})[_FLAX_NAME[name]] = _linear_leaf(value, name == "weight", f"state_dict: {key}")
    if like is not None:
        _check_against(params, like, "state_dict")
    return params


def flax_to_torch(params: Mapping[str, Mapping[str, Any]], like=None) -> dict:
    """``{"fc1": {"kernel", "bias"}}`` -> ``{"fc1.weight": [out, in], "fc1.bias": [out]}``.

    Returns NumPy arrays; load them with ``{k: torch.from_numpy(v) for k, v in ...}``.
    ``like`` is an optional ``state_dict`` to check keys and shapes against.

    Args:
      params: ``{layer: {"kernel", "bias"}}`` of Linear layers; like: None or a ``state_dict``.

    Returns:
      ``{torch name: NumPy array}``.

    Raises:
      InputError: another structure, a wrong rank, or a mismatch with ``like``.
    """
    out: dict[str, np.ndarray] = {}
    for layer, leaves in params.items():
        if not isinstance(leaves, Mapping):
            raise InputError(f"params: expected {{layer: {{'kernel', 'bias'}}}}, got {layer!r} "
                             f"-> {type(leaves).__name__}")
        for name, value in leaves.items():
            if name not in _TORCH_NAME:
                raise InputError(f"params: expected leaves 'kernel' or 'bias', got {layer}.{name}")
            out[f"{layer}.{_TORCH_NAME[name]}"] = _linear_leaf(value, name == "kernel", f"params: {layer}.{name}")
    if like is not None:
        like_tree = torch_to_flax(like)
        _check_against(torch_to_flax(out), like_tree, "params")
    return out


# ----------------------------------------------------------------------------- any model

_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
               ("params", "embedding"): "weight", ("params", "weight"): "weight",
               ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}
# Flax kernel axes -> PyTorch weight axes, by rank (Linear, Conv1d, Conv2d)
_TO_TORCH_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (3, 2, 0, 1)}


def torch_name(collection: str, path) -> str:
    """The name rule: the PyTorch ``state_dict`` key of the Flax variable
    ``variables[collection][path[0]]...[path[-1]]``.

    Module names are joined with dots (kdjax names Sequential children ``"0"``,
    ``"1"``, ... as torch does) and the leaf is renamed by kind (``kernel``/``scale``/
    ``embedding`` -> ``weight``, ``mean``/``var`` -> ``running_mean``/``running_var``).

    >>> torch_name("params", ("layer1", "0", "downsample", "0", "kernel"))
    'layer1.0.downsample.0.weight'
    >>> torch_name("batch_stats", ("bn1", "var"))
    'bn1.running_var'

    Args:
      collection: ``"params"`` or ``"batch_stats"``; path: the module names, then the leaf.

    Returns:
      The ``state_dict`` key.

    Raises:
      InputError: a leaf with no PyTorch name.
    """
    *modules, leaf = path
    if (collection, leaf) not in _LEAF_NAMES:
        raise InputError(f"variables: no PyTorch name for {collection}/{'/'.join(path)} (expected leaves "
                         f"{sorted({f'{c}/{n}' for c, n in _LEAF_NAMES})})")
    return ".".join([*modules, _LEAF_NAMES[(collection, leaf)]])


def _leaves(tree, prefix=()):
    """``{path tuple: leaf}`` of a nested mapping."""
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_leaves(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def _torch_layout(leaf: str, arr: np.ndarray, inverse: bool = False) -> np.ndarray:
    """A Flax kernel in PyTorch's axis order (``inverse``: a PyTorch weight in Flax's); any other leaf as it is."""
    if leaf != "kernel" or arr.ndim not in _TO_TORCH_AXES:
        return arr
    axes = _TO_TORCH_AXES[arr.ndim]
    return arr.transpose(np.argsort(axes) if inverse else axes)


def _flatten_permuted(weight: np.ndarray, chw, name: str, inverse: bool = False) -> np.ndarray:
    """A Linear weight ``[out, C*H*W]`` fed by a (C, H, W) flatten, reordered for an
    (H, W, C) flatten (``inverse``: back)."""
    c, h, w = chw
    if weight.ndim != 2 or weight.shape[1] != c * h * w:
        raise InputError(f"linear_after_flatten: {name} expected a weight [out, {c * h * w}] for (C, H, W) = "
                         f"{tuple(chw)}, got shape {weight.shape}")
    if inverse:
        return weight.reshape(-1, h, w, c).transpose(0, 3, 1, 2).reshape(weight.shape[0], -1)
    return weight.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)


def torch_to_variables(state_dict: Mapping[str, Any], like, *,
                       linear_after_flatten: Mapping[str, tuple[int, int, int]] | None = None,
                       tied: Mapping[str, str] | None = None) -> dict:
    """A PyTorch ``state_dict`` as a Flax variables dict shaped exactly like ``like``.

    Args:
      state_dict: torch tensors or NumPy arrays by PyTorch name.
      like: the target's variables (or ``jax.eval_shape(model.init, key, x)``): its
        structure, shapes and dtypes are the result's (values are cast to its dtypes).
      linear_after_flatten: ``{torch module name: (C, H, W)}`` for Linear layers fed by
        a flatten of NCHW activations (see the module docstring).
      tied: ``{extra name: name it repeats}``, the ties the model declares (e.g.
        ``model.tied_weights``); each extra key, when present, must equal its source.

    Raises:
      InputError: naming every missing, unexpected and mis-shaped key, and every tied
        copy that differs from its source, at once (``num_batches_tracked`` is accepted
        and dropped).
    """
    if not isinstance(state_dict, Mapping):
        raise InputTypeError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    permute = dict(linear_after_flatten or {})
    want = {}  # torch name -> (collection + path, like leaf)
    for path, leaf in _leaves(like).items():
        want[torch_name(path[0], path[1:])] = (path, leaf)
    got = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    tied = dict(tied or {})
    bad_ties = sorted(f"{k} -> {v}" for k, v in tied.items() if v not in want)
    if bad_ties:
        raise InputError(f"tied: expected ties to names the model has, got {', '.join(bad_ties)}")
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want) - set(tied))
    misshaped = [f"{k} is tied to {tied[k]} but differs from it" for k in sorted(set(got) & set(tied))
                 if tied[k] in got and not np.array_equal(_to_numpy(got[k]), _to_numpy(got[tied[k]]))]
    flat = {}
    for name in sorted(set(want) & set(got)):
        path, leaf = want[name]
        arr = _to_numpy(got[name])
        module = name.rpartition(".")[0]
        if module in permute and path[-1] == "kernel":
            arr = _flatten_permuted(arr, permute[module], name)
        arr = _torch_layout(path[-1], arr, inverse=True)
        if arr.shape != tuple(np.shape(leaf)):
            torch_shape = _torch_layout(path[-1], np.empty(np.shape(leaf), np.int8)).shape
            misshaped.append(f"{name} expected shape {torch_shape}, got {tuple(_to_numpy(got[name]).shape)}")
            continue
        flat[path] = np.array(arr, dtype=leaf.dtype)
    if missing or unexpected or misshaped:
        fmt = lambda items: ", ".join(items) or "none"
        raise InputError(f"state_dict does not match the model: missing {fmt(missing)}; unexpected "
                         f"{fmt(unexpected)}; mis-shaped or unequal {fmt(misshaped)}")
    unknown = set(permute) - {n.rpartition(".")[0] for n in want}
    if unknown:
        raise InputError(f"linear_after_flatten: expected names of Linear layers, got {sorted(unknown)}")
    return _nest(flat)


def variables_to_torch(variables, *, num_batches_tracked: int | None = 0,
                       linear_after_flatten: Mapping[str, tuple[int, int, int]] | None = None,
                       tied: Mapping[str, str] | None = None) -> dict:
    """The inverse of ``torch_to_variables``: ``{torch name: NumPy array}``.

    BatchNorm layers also get ``num_batches_tracked`` (an int64 scalar, this value;
    PyTorch reads it only when ``momentum=None``) so that ``load_state_dict`` with
    ``strict=True`` accepts the result; ``None`` leaves it out. ``tied`` maps extra
    names to the name whose array they repeat (``{"lm_head.weight":
    "transformer.wte.weight"}`` for Hugging Face GPT-2). Load with
    ``{k: torch.from_numpy(v) for k, v in ...}``.

    Args:
      variables: a Flax variables dict; num_batches_tracked, tied: as above.
      linear_after_flatten: as ``torch_to_variables``.

    Returns:
      ``{torch name: NumPy array}``.

    Raises:
      InputError: a leaf with no PyTorch name, a bad ``linear_after_flatten`` or ``tied``.
    """
    out: dict[str, np.ndarray] = {}
    for path, leaf in _leaves(variables).items():
        arr = _torch_layout(path[-1], _to_numpy(leaf))
        name = torch_name(path[0], path[1:])
        module = name.rpartition(".")[0]
        if path[-1] == "kernel" and module in (linear_after_flatten or {}):
            arr = _flatten_permuted(arr, linear_after_flatten[module], name, inverse=True)
        out[name] = arr.copy()
        if num_batches_tracked is not None and path[0] == "batch_stats" and path[-1] == "mean":
            out[name.rpartition(".")[0] + ".num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    for name, source in (tied or {}).items():
        if source not in out:
            raise InputError(f"tied: {name} repeats {source}, which the variables do not have")
        out[name] = out[source].copy()
    return out


# the Hugging Face folders (kdjax/convert/hf.py), importable from here as before
from kdjax.convert.hf import HF_ARCHITECTURES, _hf_architecture, hf_files, load_hf, save_hf  # noqa: E402
