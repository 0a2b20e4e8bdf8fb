"""Parameter sharding: the ``PartitionSpec`` of every array of a model by rule
(``param_specs``, ``state_specs``; the rule is in ``kdjax.parallel``'s docstring), and the
``NamedSharding``s that place them. Every name is importable from ``kdjax.parallel``.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax.errors import InputError, InputTypeError
from kdjax.parallel import AXES


def _name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _axis_names(axes) -> tuple:
    """A spec entry's mesh axes (None, a name or a tuple of names) as a tuple."""
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _rule_spec(rule, path: str, shape: tuple, mesh: Mesh) -> tuple:
    pattern, spec = rule
    spec = tuple(spec)
    if len(spec) != len(shape):
        raise InputError(f"rule {pattern!r}: expected one entry per dimension of {path} {list(shape)}, got {spec}")
    for dim, (n, axes) in enumerate(zip(shape, spec)):
        size = math.prod(mesh.shape[a] for a in _axis_names(axes))
        if n % size:
            raise InputError(f"rule {pattern!r}: {path} {list(shape)} cannot be split over {axes!r} ({size} "
                             f"devices): dimension {dim} has size {n}")
    return spec


def _default_spec(shape: tuple, mesh: Mesh) -> tuple:
    f = mesh.shape["fsdp"]
    spec = [None] * len(shape)
    dims = [i for i, n in enumerate(shape) if f > 1 and n >= f and n % f == 0]
    if dims:
        spec[max(dims, key=lambda i: (shape[i], -i))] = "fsdp"
    return tuple(spec)


def check_rules(rules, mesh: Mesh | None = None, *trees) -> tuple:
    """``rules`` as a tuple of ``(pattern, spec)``, each checked: a compilable regular
    expression, a spec of mesh axis names (or tuples of them) and None, and, when
    ``trees`` (variables or params) are given, a pattern that names at least one array
    in them.

    Args:
      rules: None, a dict or a sequence of ``(pattern, spec)`` pairs; mesh: not read (kept for
        callers); trees: variables or params the patterns must name.

    Returns:
      The checked rules, a tuple.

    Raises:
      InputTypeError: an entry that is not a ``(pattern, spec)`` pair.
      InputError: a bad regular expression, an unknown axis, or a pattern that names nothing.
    """
    if rules is None:
        return ()
    if isinstance(rules, dict):
        rules = list(rules.items())
    out = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise InputTypeError(f"rules: expected (pattern, spec) pairs, got {rule!r}")
        pattern, spec = rule
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"rule {pattern!r}: expected a regular expression, got one that fails: {e}") from None
        spec = tuple(spec)
        for axes in spec:
            bad = [a for a in _axis_names(axes) if a not in AXES[1:]]
            if bad:
                raise InputError(f"rule {pattern!r}: expected mesh axes 'fsdp', 'data' or None per dimension, "
                                 f"got {bad[0]!r}")
        out.append((pattern, spec))
    if trees and out:
        paths = [p for tree in trees for p, _ in _leaf_paths(_collections(tree))]
        for pattern, _ in out:
            if not any(re.search(pattern, p) for p in paths):
                raise InputError(f"rule {pattern!r}: names no parameter (paths look like {paths[0]!r})")
    return tuple(out)


def _collections(tree):
    """A variables dict as ``{collection: tree}``; a bare params tree as ``{"params": tree}``."""
    if isinstance(tree, dict) and "params" in tree:
        return tree
    return {"params": tree}


def _leaf_paths(collections):
    # path inside each collection, the collection's name dropped
    for col, tree in collections.items():
        for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            yield "/".join(_name(k) for k in keys), leaf


def _spec(path, shape, mesh, rules, lead) -> P:
    body = tuple(shape[lead:])
    spec = next((_rule_spec(r, path, body, mesh) for r in rules if re.search(r[0], path)), None)
    if spec is None:
        spec = _default_spec(body, mesh)
    return P(*(("members",) * lead + spec))


def param_specs(tree, mesh: Mesh, rules=None, *, members: bool = False):
    """The ``PartitionSpec`` of every leaf of ``tree`` (params, or a variables dict with
    ``"params"`` and e.g. ``"batch_stats"``) by the module's rule (see the module
    docstring). With ``members``, axis 0 is a sweep's member axis (over ``"members"``).

    Args:
      tree: params or variables; mesh: the mesh; rules: as ``check_rules``; members: axis 0 is
        a member axis.

    Returns:
      A tree of ``PartitionSpec``s shaped like ``tree``.

    Raises:
      InputError: a bad rule, or one that does not fit an array it names.
    """
    rules = check_rules(rules, mesh)
    lead = int(bool(members))

    def one(keys, leaf):
        names = [_name(k) for k in keys]
        if isinstance(tree, dict) and "params" in tree:
            names = names[1:]
        return _spec("/".join(names), np.shape(leaf), mesh, rules, lead)

    return jax.tree_util.tree_map_with_path(one, tree)


def state_specs(state, mesh: Mesh, rules=None, *, members: bool = False):
    """``PartitionSpec``s of a ``TrainState``: params and model state by ``param_specs``,
    every optimizer-state array as the parameter it belongs to (the same path at the end
    of its own, the same shape), the step counter replicated.

    Args:
      state: a ``TrainState``; mesh, rules, members: as ``param_specs``.

    Returns:
      The ``TrainState`` of ``PartitionSpec``s.
    """
    rules = check_rules(rules, mesh)
    lead = int(bool(members))
    params = param_specs(state.params, mesh, rules, members=members)
    by_path = {tuple(_name(k) for k in keys): (np.shape(leaf), spec) for (keys, leaf), spec in zip(
        jax.tree_util.tree_flatten_with_path(state.params)[0], jax.tree_util.tree_leaves(params))}
    model_state = {c: param_specs({"params": t}, mesh, rules, members=members)["params"]
                   for c, t in state.model_state.items()}

    def opt(keys, leaf):
        names, shape = tuple(_name(k) for k in keys), np.shape(leaf)
        for i in range(len(names)):
            hit = by_path.get(names[i:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return _spec("/".join(names), shape, mesh, rules, lead) if len(shape) > lead else P(*("members",) * lead)

    opt_state = jax.tree_util.tree_map_with_path(opt, state.opt_state)
    return state.replace(step=P(*("members",) * lead), params=params, model_state=model_state, opt_state=opt_state)


def model_shardings(tree, mesh: Mesh, rules=None, *, members: bool = False):
    """``NamedSharding``s of a model's arrays: a ``TrainState`` by ``state_specs``, a params or
    variables tree by ``param_specs``.

    Args:
      tree: a ``TrainState``, params or variables; mesh, rules, members: as ``param_specs``.

    Returns:
      A tree of ``NamedSharding``s shaped like ``tree``.
    """
    specs = state_specs if hasattr(tree, "opt_state") else param_specs
    return shardings(specs(tree, mesh, rules, members=members), mesh)


def shardings(specs, mesh: Mesh):
    """``NamedSharding``s of a tree of ``PartitionSpec``s.

    Args:
      specs: a tree of ``PartitionSpec``s; mesh: the mesh.

    Returns:
      A tree of ``NamedSharding``s.
    """
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda s: isinstance(s, P))


def constrain(tree, specs):
    """``jax.lax.with_sharding_constraint`` of ``tree`` to a tree of ``NamedSharding``s (inside a
    traced function: keeps a run's carried state where the placement put it).

    Args:
      tree: traced arrays; specs: a tree of ``NamedSharding``s shaped like ``tree``.

    Returns:
      ``tree``, constrained.
    """
    return jax.lax.with_sharding_constraint(tree, specs)


def describe_sharding(tree, mesh: Mesh | None = None, rules=None) -> str:
    """One line: how many arrays of ``tree`` are split, and the bytes one device holds of
    the whole: from the placed arrays, or, with a ``mesh``, from ``param_specs`` on their
    shapes (arrays or ``jax.ShapeDtypeStruct``s; nothing is placed).

    Args:
      tree: placed arrays, or shapes with a ``mesh``; mesh: None or a mesh; rules: as
        ``param_specs``.

    Returns:
      The line.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    if mesh is None:
        split = sum(not x.sharding.is_fully_replicated for x in leaves)
        per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    else:
        specs = jax.tree_util.tree_leaves(param_specs(tree, mesh, rules), is_leaf=lambda s: isinstance(s, P))
        parts = [math.prod(mesh.shape[a] for axes in spec for a in _axis_names(axes)) for spec in specs]
        split = sum(n > 1 for n in parts)
        per_device = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize // n for x, n in zip(leaves, parts))
    return (f"{split} of {len(leaves)} arrays split, {_mb(per_device)} of {_mb(total)} "
            f"per device ({per_device / max(total, 1):.0%})")


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"
