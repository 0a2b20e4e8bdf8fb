"""PyTorch ``state_dict`` <-> Flax params, on NumPy arrays (kdjax never imports torch).

PyTorch ``nn.Linear`` stores ``weight`` as ``[out, in]``; Flax ``nn.Dense`` stores
``kernel`` as ``[in, out]``. The mapping is by name::

    "fc1.weight" [out, in]  <->  params["fc1"]["kernel"] [in, out]   (transposed)
    "fc1.bias"   [out]      <->  params["fc1"]["bias"]   [out]

Pass torch tensors as they are (they are read through ``.detach().cpu().numpy()``,
duck-typed) or as NumPy arrays. The round trip is exact.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from kdjax.errors import InputError

__all__ = ["torch_to_flax", "flax_to_torch"]

_FLAX_NAME = {"weight": "kernel", "bias": "bias"}
_TORCH_NAME = {v: k for k, v in _FLAX_NAME.items()}


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


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
        arr = _to_numpy(value)
        want_ndim = 2 if name == "weight" else 1
        if arr.ndim != want_ndim:
            raise InputError(f"state_dict: {key} expected {want_ndim}-D, got shape {arr.shape}")
        params.setdefault(layer, {})[_FLAX_NAME[name]] = arr.T.copy() if name == "weight" else arr.copy()
    if like is not None:
        _check_against(params, like, "state_dict")
    return params


def flax_to_torch(params: Mapping[str, Mapping[str, Any]], like=None) -> dict:
    """``{"fc1": {"kernel", "bias"}}`` -> ``{"fc1.weight": [out, in], "fc1.bias": [out]}``.

    Returns NumPy arrays; load them with ``{k: torch.from_numpy(v) for k, v in ...}``.
    ``like`` is an optional ``state_dict`` to check keys and shapes against.
    """
    out: dict[str, np.ndarray] = {}
    for layer, leaves in params.items():
        if not isinstance(leaves, Mapping):
            raise InputError(f"params: expected {{layer: {{'kernel', 'bias'}}}}, got {layer!r} "
                             f"-> {type(leaves).__name__}")
        for name, value in leaves.items():
            if name not in _TORCH_NAME:
                raise InputError(f"params: expected leaves 'kernel' or 'bias', got {layer}.{name}")
            arr = _to_numpy(value)
            want_ndim = 2 if name == "kernel" else 1
            if arr.ndim != want_ndim:
                raise InputError(f"params: {layer}.{name} expected {want_ndim}-D, got shape {arr.shape}")
            out[f"{layer}.{_TORCH_NAME[name]}"] = arr.T.copy() if name == "kernel" else arr.copy()
    if like is not None:
        like_tree = torch_to_flax(like)
        _check_against(torch_to_flax(out), like_tree, "params")
    return out
