"""The feature-distillation losses, student first; the teacher side carries no gradient.

NHWC feature maps ``[batch, height, width, channels]`` or ``[batch, ...]`` embeddings. Each
equals a named reference function (cited per function): mdistiller's
(``mdistiller/distillers/*.py``; each is invariant to the order in which features are
flattened, so NHWC here gives the value of NCHW there), Keras 3's ``FeatureDistillation``
losses and tunix's feature pooling. ``parity/checks/features.py`` checks value and gradient
in float64.

The element-wise losses (``hint``, ``mse``, ``mae``, ``cosine_similarity``,
``pooled_cosine``) take ``where``: a bool mask of the features' leading axes (``[batch,
length]`` for token features ``[batch, length, width]``); the loss is then the mean over the
selected positions of the per-position value (a mean over the last axis for the squared and
absolute errors), as DistillKit's hidden-state losses take the attention mask
(``distillkit/lossfuncs/hidden_state.py``, ``compute_hs_loss``: ``mse`` is its ``"mse"``,
``pooled_cosine`` of equal shapes its ``"cosine"``); 0 when it selects nothing. Without
``where`` each computes exactly what it did before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError
from kdjax.losses.dense import masked_mean

__all__ = ["hint", "attention_transfer", "similarity_preserving", "rkd", "pkt", "mse", "mae", "cosine_similarity",
           "pool_to_shape", "pooled_cosine"]


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


def _token_mask(name: str, where, s):
    """Refuse a ``where`` that is not a bool mask of ``s``' leading axes ``s.shape[:-1]``."""
    if not hasattr(where, "dtype") or where.dtype != jnp.bool_:
        raise InputTypeError(f"{name}: expected where as a bool mask, got "
                             f"{getattr(where, 'dtype', type(where).__name__)}")
    if s.ndim < 2 or tuple(where.shape) != tuple(s.shape[:-1]):
        raise InputError(f"{name}: expected where of the features' leading shape {tuple(s.shape[:-1])} (features "
                         f"[batch, length, width], mask [batch, length]), got {tuple(where.shape)}")
    return where


def _l2_normalize(v, axis=-1, eps=1e-12):
    # torch.nn.functional.normalize: v / max(||v||, eps). The max is taken before the square
    # root so that a zero vector (RKD's i = j differences) has torch's gradient, not 0 * inf.
    return v / jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=axis, keepdims=True), eps * eps))


def hint(s, t, *, where=None):
    r"""FitNets' hint loss (Romero et al., 2015): :math:`\mathrm{mean}((s - t)^2)` over every
    element, as ``F.mse_loss`` in mdistiller's ``distillers/FitNet.py`` (the student's
    feature already mapped to the teacher's shape by a connector).

    Args:
      s, t: student and teacher features of one shape.
      where: None, or a bool mask ``s.shape[:-1]``: then
        :math:`\sum_{n \in m} \mathrm{mean}_d (s_{nd} - t_{nd})^2 / |m|` (the module docstring).

    Returns:
      A scalar.

    Raises:
      InputError / InputTypeError: shapes that differ; ``where`` not bool or not of the
        features' leading shape.
    """
    s, t = _pair("hint", s, t, same_shape=True, min_rank=1)
    if where is not None:
        return masked_mean(jnp.mean((s - t) ** 2, axis=-1), _token_mask("hint", where, s))
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

    Args:
      s, t: student and teacher NHWC maps ``[batch, height, width, channels]`` (channels may differ).
      p: the power of the activations.

    Returns:
      A scalar.

    Raises:
      InputError / InputTypeError: maps that are not floating NHWC, or of different batches.
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
    flattened ``[batch, features]`` maps, :math:`\sum (G_t - G_s)^2 / \mathrm{batch}^2`.

    Args:
      s, t: student and teacher features ``[batch, ...]`` (their sizes may differ).

    Returns:
      A scalar.

    Raises:
      InputError / InputTypeError: features that are not floating of rank >= 2, or of different batches.
    """
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
    ones, plus ``angle_weight`` × smooth-L1 between the cosines of every triplet's angle.

    Args:
      s, t: student and teacher features ``[batch, ...]`` (their sizes may differ).
      distance_weight, angle_weight: the two terms' weights (mdistiller's defaults).
      squared: use squared distances; eps: the distances' floor (before the square root).

    Returns:
      A scalar.

    Raises:
      InputError / InputTypeError: as ``similarity_preserving``.
    """
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
    :math:`\mathrm{mean}\, P \log((P + \epsilon) / (Q + \epsilon))` over every pair.

    Args:
      s, t: student and teacher embeddings ``[batch, features]`` (the widths may differ).
      eps: :math:`\epsilon`, also added to the norms.

    Returns:
      A scalar.

    Raises:
      InputError / InputTypeError: embeddings that are not floating ``[batch, features]``, or
        of different batches.
    """
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



# ----------------------------------------------------------------------------- Keras 3, tunix

def mse(s, t, *, where=None):
    r"""Keras 3 ``FeatureDistillation(loss="mse")``: ``mean(mean_squared_error(t, s))``, i.e.
    :math:`\mathrm{mean}((s - t)^2)` over every element (``keras/src/distillation/
    distillation_loss.py``; equal shapes, no connector there).

    Args:
      s, t: student and teacher features of one shape.
      where: None, or a bool mask ``s.shape[:-1]``: then
        :math:`\sum_{n \in m} \mathrm{mean}_d (s_{nd} - t_{nd})^2 / |m|`, DistillKit's
        ``compute_hs_loss("mse", ...)`` (``distillkit/lossfuncs/hidden_state.py``) for one layer.

    Returns:
      A scalar.

    Raises:
      InputError / InputTypeError: as ``hint``.
    """
    s, t = _pair("mse", s, t, same_shape=True, min_rank=1)
    if where is not None:
        return masked_mean(jnp.mean((t - s) ** 2, axis=-1), _token_mask("mse", where, s))
    return jnp.mean((t - s) ** 2)


def mae(s, t, *, where=None):
    r"""Keras 3 ``FeatureDistillation(loss="mae")``: :math:`\mathrm{mean}|s - t|`.

    Args:
      s, t: student and teacher features of one shape.
      where: None, or a bool mask ``s.shape[:-1]``: then the mean over the selected positions
        of :math:`\mathrm{mean}_d |s_{nd} - t_{nd}|`.

    Returns:
      A scalar.

    Raises:
      InputError / InputTypeError: as ``hint``.
    """
    s, t = _pair("mae", s, t, same_shape=True, min_rank=1)
    if where is not None:
        return masked_mean(jnp.mean(jnp.abs(t - s), axis=-1), _token_mask("mae", where, s))
    return jnp.mean(jnp.abs(t - s))


def _keras_normalize(v, eps=1e-7):
    # keras.ops.normalize(order=2): v * min(rsqrt(sum v^2), 1 / epsilon), epsilon = 1e-7
    return v * jnp.minimum(jax.lax.rsqrt(jnp.sum(v * v, axis=-1, keepdims=True)), 1.0 / eps)


def cosine_similarity(s, t, *, where=None):
    r"""Keras 3 ``FeatureDistillation(loss="cosine_similarity")``: the mean over every
    position of :math:`-\langle \hat t, \hat s\rangle` along the last axis (channels of an
    NHWC map, the width of an embedding), :math:`\hat v = v \min(1/\|v\|, 10^7)` as
    ``keras.losses.cosine_similarity``. Minimised at -1.

    Args:
      s, t: student and teacher features of one shape.
      where: None, or a bool mask ``s.shape[:-1]``: the mean over the selected positions only.

    Returns:
      A scalar.

    Raises:
      InputError / InputTypeError: as ``hint``.
    """
    s, t = _pair("cosine_similarity", s, t, same_shape=True, min_rank=1)
    per_position = -jnp.sum(_keras_normalize(t) * _keras_normalize(s), axis=-1)
    if where is not None:
        return masked_mean(per_position, _token_mask("cosine_similarity", where, s))
    return jnp.mean(per_position)


def pool_to_shape(x, shape):
    """tunix's ``reduce_array_to_target_shape`` (``tunix/distillation/feature_extraction/
    pooling.py``, VALID padding): average pooling over every axis whose size differs, with
    stride ``n // m`` and window ``n - (m - 1) * stride`` (``n`` in, ``m`` out).

    Args:
      x: the array to pool.
      shape: the target shape: the same rank, each size in ``[1, x's]``.

    Returns:
      ``x`` pooled to ``shape`` (``x`` itself when the shapes are equal).

    Raises:
      InputError: a target shape of another rank or with a size outside ``[1, x's]``.
    """
    shape = tuple(int(d) for d in shape)
    if tuple(x.shape) == shape:
        return x
    if x.ndim != len(shape) or any(not 1 <= m <= n for n, m in zip(x.shape, shape)):
        raise InputError(f"pool_to_shape: expected a target shape of the same rank with 1 <= each size <= the "
                         f"input's, got {shape} for an input of shape {tuple(x.shape)}")
    strides = tuple(1 if n == m else n // m for n, m in zip(x.shape, shape))
    windows = tuple(1 if n == m else n - (m - 1) * st for n, m, st in zip(x.shape, shape, strides))
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, windows, strides, "VALID")
    return summed / float(np.prod(windows))


def pooled_cosine(s, t, axis=-1, *, where=None):
    r"""tunix's ``FeaturePoolingStrategy`` feature loss (``tunix/distillation/strategies/
    feature_pooling.py``): the teacher's features average-pooled to the student's shape
    (``pool_to_shape``), then :math:`\mathrm{mean}(1 - \cos(s, t))` along ``axis``
    (``optax.cosine_distance``, no epsilon).

    Args:
      s, t: student features and teacher features at least as large on every axis.
      axis: the axis of the cosine.
      where: None, or a bool mask ``s.shape[:-1]`` (then ``axis`` must be the last):
        :math:`\sum_{n \in m} (1 - \cos(s_n, t_n)) / |m|`, DistillKit's
        ``compute_hs_loss("cosine", ...)`` (``distillkit/lossfuncs/hidden_state.py``; its
        ``F.cosine_similarity`` clamps the norms' product at 1e-8, which only zero vectors meet).

    Returns:
      A scalar.

    Raises:
      InputError / InputTypeError: shapes ``pool_to_shape`` refuses; ``where`` as ``hint``,
        or with another ``axis``.
    """
    s, t = _pair("pooled_cosine", s, t, min_rank=1)
    if where is not None and axis not in (-1, s.ndim - 1):
        raise InputError(f"pooled_cosine: expected axis=-1 with where (a mask of the other axes), got axis={axis}")
    t = pool_to_shape(t, s.shape)
    dot = jnp.sum(s * t, axis=axis)
    norm = lambda v: jnp.sqrt(jnp.sum(v * v, axis=axis))
    if where is not None:
        return masked_mean(1.0 - dot / (norm(s) * norm(t)), _token_mask("pooled_cosine", where, s))
    return jnp.mean(1.0 - dot / (norm(s) * norm(t)))
