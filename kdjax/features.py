"""Feature distillation: intermediate representations of any Flax model, and the losses that
match them.

* ``capture(model, variables, x, paths)`` runs a linen module and returns the outputs of
  the submodules named by ``paths`` (dotted module names as in the variables tree:
  ``"layer3"``, ``"layer3.0"``, ``"fc1"``), without touching the model's code.
* The losses take NHWC feature maps ``[batch, height, width, channels]`` or ``[batch, ...]``
  embeddings, student first; the teacher side carries no gradient. Each equals the function
  of the same method in mdistiller (``mdistiller/distillers/*.py``, cited per function),
  whatever the layout: each is invariant to the order in which features are flattened,
  so NHWC here gives the value of NCHW there (``parity/checks/features.py`` checks value and
  gradient in float64).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from kdjax.errors import InputError, InputTypeError

__all__ = ["capture", "module_paths", "hint", "attention_transfer", "similarity_preserving", "rkd", "pkt"]


# ----------------------------------------------------------------------------- taps

def module_paths(variables) -> list[str]:
    """The dotted names of every module that owns a variable (``"layer1.0.conv1"``, ...)."""
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


def capture(model, variables, x, paths, *, train: bool = False, rngs=None):
    """``(output, {path: feature})``: ``model.apply(variables, x, train=train)`` and the
    outputs of the submodules ``paths`` (dotted names as in the variables tree).

    In train mode the model's non-parameter collections (BatchNorm statistics) are updated
    exactly as without taps, and ``output`` is ``(logits, new_model_state)``; in eval mode
    it is the logits. A module called several times gives its last output.

    Raises:
      InputError: a path that names no module of ``variables`` (the available ones listed).
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise InputError("paths: expected at least one module name, got none")
    available = module_paths(variables)
    unknown = [p for p in paths if p not in available]
    if unknown:
        raise InputError(f"paths: expected module names of the model's variables, got {unknown}; available: "
                         f"{', '.join(available)}")
    wanted = {tuple(p.split(".")) for p in paths}

    def tap(module, method_name):
        return method_name == "__call__" and tuple(module.path) in wanted

    collections = [c for c in flax.core.unfreeze(variables) if c != "params"]
    mutable = (collections if train else []) + ["intermediates"]
    logits, state = model.apply(variables, x, train=train, rngs=rngs, capture_intermediates=tap, mutable=mutable)
    state = dict(flax.core.unfreeze(state))
    inter = state.pop("intermediates", {})
    features = {}
    for p in paths:
        node = inter
        for name in p.split("."):
            node = node[name]
        features[p] = node["__call__"][-1]
    return ((logits, state) if train else logits), features


# ----------------------------------------------------------------------------- losses

def _pair(name: str, s, t, *, same_shape: bool = False, min_rank: int = 2):
    for who, a in (("student", s), ("teacher", t)):
        if not hasattr(a, "dtype") or not jnp.issubdtype(a.dtype, jnp.floating):
            raise InputTypeError(f"{name}: expected floating-point {who} features, got "
                                 f"{getattr(a, 'dtype', type(a).__name__)}")
        if a.ndim < min_rank:
            raise InputError(f"{name}: expected {who} features of rank >= {min_rank} ([batch, ...]), got shape "
                             f"{tuple(a.shape)}")
    if s.shape[0] != t.shape[0]:
        raise InputError(f"{name}: expected the same batch for student and teacher, got {s.shape[0]} and "
                         f"{t.shape[0]}")
    if same_shape and s.shape != t.shape:
        raise InputError(f"{name}: expected the teacher's shape {tuple(t.shape)} for the student (a connector maps "
                         f"one to the other), got {tuple(s.shape)}")
    return s, jax.lax.stop_gradient(t)


def _l2_normalize(v, axis=-1, eps=1e-12):
    # torch.nn.functional.normalize: v / max(||v||, eps). The max is taken before the square
    # root so that a zero vector (RKD's i = j differences) has torch's gradient, not 0 * inf.
    return v / jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=axis, keepdims=True), eps * eps))


def hint(s, t):
    r"""FitNets' hint loss (Romero et al., 2015): :math:`\mathrm{mean}((s - t)^2)` over every
    element, as ``F.mse_loss`` in mdistiller's ``distillers/FitNet.py`` (the student's
    feature already mapped to the teacher's shape by a connector)."""
    s, t = _pair("hint", s, t, same_shape=True, min_rank=1)
    return jnp.mean((s - t) ** 2)


def _adaptive_avg_pool(x, size: int):
    """``F.adaptive_avg_pool2d(x, (size, size))`` on NHWC: output cell i averages rows
    ``floor(i H / size)`` to ``ceil((i + 1) H / size)`` (and the same for columns)."""
    def pool_axis(x, axis):
        n = x.shape[axis]
        cells = [jnp.mean(jax.lax.slice_in_dim(x, (i * n) // size, -(-((i + 1) * n) // size), axis=axis), axis=axis,
                          keepdims=True) for i in range(size)]
        return jnp.concatenate(cells, axis=axis)
    return pool_axis(pool_axis(x, 1), 2)


def _attention_map(f, p):
    """``normalize(mean_c f^p)`` per example, flattened ``[batch, H*W]``."""
    return _l2_normalize(jnp.mean(f ** p, axis=-1).reshape(f.shape[0], -1))


def attention_transfer(s, t, p=2):
    r"""Attention transfer (Zagoruyko & Komodakis, 2017), as mdistiller's
    ``single_stage_at_loss`` (``distillers/AT.py``) on NHWC maps:

    .. math:: \mathrm{mean}\big((a(s) - a(t))^2\big),\quad a(f) = \frac{\mathrm{vec}(\mathrm{mean}_c f^p)}
              {\|\mathrm{vec}(\mathrm{mean}_c f^p)\|}

    over ``[batch, H*W]``, the larger map first average-pooled (adaptively, as
    ``F.adaptive_avg_pool2d``) to the smaller one's height (square maps, as there).
    """
    s, t = _pair("attention_transfer", s, t, min_rank=4)
    if s.ndim != 4 or t.ndim != 4:
        raise InputError(f"attention_transfer: expected NHWC maps [batch, height, width, channels], got "
                         f"{tuple(s.shape)} and {tuple(t.shape)}")
    if s.shape[1] > t.shape[1]:
        s = _adaptive_avg_pool(s, t.shape[1])
    elif s.shape[1] < t.shape[1]:
        t = _adaptive_avg_pool(t, s.shape[1])
    return jnp.mean((_attention_map(s, p) - _attention_map(t, p)) ** 2)


def similarity_preserving(s, t):
    r"""Similarity-preserving KD (Tung & Mori, 2019), as mdistiller's ``similarity_loss``
    (``distillers/SP.py``): with :math:`G = \mathrm{normalize}_\mathrm{rows}(F F^\top)` of the
    flattened ``[batch, features]`` maps, :math:`\sum (G_t - G_s)^2 / \mathrm{batch}^2`."""
    s, t = _pair("similarity_preserving", s, t)
    b = s.shape[0]
    gram = lambda f: _l2_normalize(f.reshape(b, -1) @ f.reshape(b, -1).T)
    return jnp.sum((gram(t) - gram(s)) ** 2) / (b * b)


def _pairwise_distances(e, squared: bool, eps: float):
    sq = jnp.sum(e * e, axis=1)
    d = jnp.maximum(sq[:, None] + sq[None, :] - 2 * e @ e.T, eps)
    d = d if squared else jnp.sqrt(d)
    return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def _smooth_l1(a, b):
    diff = jnp.abs(a - b)
    return jnp.mean(jnp.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5))


def rkd(s, t, distance_weight=25.0, angle_weight=50.0, *, squared: bool = False, eps: float = 1e-12):
    r"""Relational KD (Park et al., 2019), as mdistiller's ``rkd_loss`` (``distillers/RKD.py``)
    on flattened ``[batch, features]`` embeddings: ``distance_weight`` × smooth-L1 between the
    pairwise distances of student and teacher, each divided by its mean over the positive
    ones, plus ``angle_weight`` × smooth-L1 between the cosines of every triplet's angle."""
    s, t = _pair("rkd", s, t)
    s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)

    def distances(e):
        d = _pairwise_distances(e, squared, eps)
        return d / (jnp.sum(jnp.where(d > 0, d, 0.0)) / jnp.sum(d > 0))

    def angles(e):
        diff = _l2_normalize(e[None, :, :] - e[:, None, :], axis=2)
        return jnp.einsum("ijd,ikd->ijk", diff, diff).reshape(-1)

    return distance_weight * _smooth_l1(distances(s), distances(t)) + angle_weight * _smooth_l1(angles(s), angles(t))


def pkt(s, t, eps: float = 1e-7):
    r"""Probabilistic knowledge transfer (Passalis & Tefas, 2018), as mdistiller's ``pkt_loss``
    (``distillers/PKT.py``) on ``[batch, features]`` embeddings: cosine similarities scaled to
    [0, 1] and normalised per row into distributions P (teacher) and Q (student), then
    :math:`\mathrm{mean}\, P \log((P + \epsilon) / (Q + \epsilon))` over every pair."""
    s, t = _pair("pkt", s, t)
    if s.ndim != 2 or t.ndim != 2:
        raise InputError(f"pkt: expected [batch, features] embeddings, got {tuple(s.shape)} and {tuple(t.shape)}")

    def probabilities(f):
        f = f / (jnp.sqrt(jnp.sum(f * f, axis=1, keepdims=True)) + eps)
        f = jnp.where(jnp.isnan(f), 0.0, f)
        sim = (f @ f.T + 1.0) / 2.0
        return sim / jnp.sum(sim, axis=1, keepdims=True)

    p, q = probabilities(t), probabilities(s)
    return jnp.mean(p * jnp.log((p + eps) / (q + eps)))

