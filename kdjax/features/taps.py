"""Taps: the intermediate values of any linen module, by name, without touching its code.

A tap is a string:

* ``"layer3"``, ``"layer3.0.bn1"``, ``"transformer.h.1"``: the output of that submodule's
  ``__call__`` (dotted names as in the variables tree; for kdjax's models the names of
  their PyTorch counterparts);
* ``"fc:input"``: the first positional argument of that submodule's ``__call__`` (the
  pooled features a classifier head receives);
* ``"transformer.h.0.attn:attention_probs"``: a value the module ``sow``\\ s into the
  ``"intermediates"`` collection under that name (kdjax's ``TransformerLM`` sows its
  attention probabilities).
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax

from kdjax.errors import InputError

__all__ = ["capture", "module_paths", "available_taps"]

_OUTPUT, _INPUT = "__call__", "__kdjax_input__"


def module_paths(variables) -> list[str]:
    """The dotted names of every module that owns a variable (``"layer1.0.conv1"``, ...).

    Args:
      variables: a Flax variables dict (every collection is walked).

    Returns:
      The names, sorted.
    """
    found = set()

    def walk(tree, prefix):
        for name, sub in tree.items():
            if isinstance(sub, dict) or hasattr(sub, "items"):
                path = prefix + (str(name),)
                found.add(".".join(path))
                walk(sub, path)

    for collection in flax.core.unfreeze(variables).values():
        if hasattr(collection, "items"):
            walk(collection, ())
    return sorted(found)


def _parse(tap: str) -> tuple[tuple[str, ...], str]:
    if not isinstance(tap, str) or not tap:
        raise InputError(f"paths: expected tap names (strings such as 'layer3' or 'fc:input'), got {tap!r}")
    module, _, what = tap.partition(":")
    where = tuple(module.split(".")) if module else ()
    return where, {"": _OUTPUT, "input": _INPUT}.get(what, what)


def _interceptor(inputs: set):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and tuple(module.path) in inputs and args:
            module.sow("intermediates", _INPUT, args[0])
        return next_fun(*args, **kwargs)
    return intercept


def _apply(model, variables, x, train, rngs, capture, inputs, kwargs):
    collections = [c for c in flax.core.unfreeze(variables) if c != "params"]
    mutable = (collections if train else []) + ["intermediates"]
    with nn.intercept_methods(_interceptor(inputs)):
        out, state = model.apply(variables, x, train=train, rngs=rngs, capture_intermediates=capture,
                                 mutable=mutable, **kwargs)
    state = dict(flax.core.unfreeze(state))
    return out, state, state.pop("intermediates", {})


def available_taps(model, variables, x, *, train: bool = False, **kwargs) -> list[str]:
    """Every tap ``capture`` accepts for this model and input (traced abstractly, nothing
    computed): each called submodule's output and input, and every sown value.

    Args:
      model, variables, x: as ``capture``.
      train: trace in train mode (some values are sown in one mode only).
      **kwargs: more keyword arguments of ``model.apply``.

    Returns:
      The tap names, sorted.
    """
    def names(variables, x):
        return _apply(model, variables, x, train, None, True, _AllPaths(), kwargs)[2]

    found = []

    def walk(tree, prefix):
        for name, sub in tree.items():
            if isinstance(sub, dict):
                walk(sub, prefix + (name,))
            elif name in (_OUTPUT, _INPUT):
                found.append(".".join(prefix) + ("" if name == _OUTPUT else ":input"))
            else:
                found.append(".".join(prefix) + ":" + name)

    walk(jax.eval_shape(names, variables, x), ())
    return sorted(t for t in found if t and not t.startswith(":"))


class _AllPaths(set):
    def __contains__(self, item):
        return True


def capture(model, variables, x, paths, *, train: bool = False, rngs=None, **kwargs):
    """``(output, {tap: value})``: ``model.apply(variables, x, train=train, **kwargs)`` and
    the values of the taps ``paths`` (see the module docstring).

    A module called several times gives its last value.

    Args:
      model: any linen module called as ``model(x, train=bool)``.
      variables: its full variables dict (``{"params": ..., "batch_stats": ...}``).
      x: the input batch.
      paths: a tap name or a sequence of them (see the module docstring).
      train: train mode: the model's non-parameter collections (BatchNorm statistics) are
        updated exactly as without taps.
      rngs: the ``apply`` rngs (dropout), or None.
      **kwargs: more keyword arguments of ``model.apply``.

    Returns:
      ``(output, {tap: value})``: ``output`` the model output, in train mode
      ``(model output, new_model_state)``.

    Raises:
      InputError: no tap, a tap the model does not have (the available ones are listed), or
        one this call does not compute.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise InputError("paths: expected at least one tap name, got none")
    parsed = {p: _parse(p) for p in paths}
    known = set(module_paths(variables))
    if any(what != _OUTPUT or ".".join(where) not in known for where, what in parsed.values()):
        available = available_taps(model, variables, x, train=train, **kwargs)
        unknown = [p for p in paths if p not in available]
        if unknown:
            shown = [t for t in available if not t.endswith(":input")]
            raise InputError(f"paths: expected taps of the model, got {unknown}; available: {', '.join(shown)} "
                             f"(each module also as NAME:input)")
    outputs = {where for where, what in parsed.values() if what == _OUTPUT}
    inputs = {where for where, what in parsed.values() if what == _INPUT}

    def tap(module, method_name):
        return method_name == "__call__" and tuple(module.path) in outputs

    out, state, inter = _apply(model, variables, x, train, rngs, tap, inputs, kwargs)
    values = {}
    for p, (where, what) in parsed.items():
        node = inter
        for name in where:
            node = node.get(name, {})
        if what not in node:
            raise InputError(f"paths: {p!r} was not computed by this call (the module did not run, or its "
                             f"value is only sown in another mode)")
        values[p] = node[what][-1]
    return ((out, state) if train else out), values
