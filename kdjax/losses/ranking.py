"""Ranking losses against a teacher's top-k: the student is asked to order the teacher's k
tokens as the teacher does, not to match their probabilities. DistillKit's
``sparse_hinge_loss`` (``distillkit/lossfuncs/hingeloss.py``) and
``sparse_logistic_ranking_loss`` (``distillkit/lossfuncs/logistic_ranking.py``).

Both are over ordered pairs ``(i, j)`` of the k ids where the teacher prefers ``i``
(:math:`p_i > p_j + \\epsilon`, both :math:`> \\epsilon`), and both are normalised by the
number of such pairs over the positions ``where`` selects (not per position): a scalar.
Neither takes a temperature (DistillKit's do not).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses.dense import check_where
from kdjax.losses.topk_checks import check_topk

__all__ = ["topk_hinge", "topk_logistic_ranking"]


def _pairs(student_logits, values, indices, where, eps):
    """(the teacher's probabilities [..., k], the preferred pairs [..., k, k] as 0/1 with
    the masked positions zeroed)."""
    check_topk(student_logits, values, indices)
    check_where(where, student_logits.shape[:-1])
    wide = jnp.promote_types(student_logits.dtype, jnp.float32)
    p = jnp.exp(values.astype(wide))
    supported = p > eps
    pairs = (p[..., :, None] > p[..., None, :] + eps) & supported[..., :, None] & supported[..., None, :]
    if where is not None:
        pairs = pairs & where[..., None, None]
    return jax.lax.stop_gradient(p), pairs.astype(wide)


def topk_hinge(student_logits, values, indices, *, margin=None, where=None, eps: float = 1e-8):
    r"""DistillKit's ``sparse_hinge_loss``: for each pair the teacher prefers,

    .. math:: \max(0,\; m_{ij} - (q_i - q_j)), \quad q = \mathrm{softmax}(s),\;
       m_{ij} = p_i - p_j \text{ (or the fixed } \texttt{margin}\text{)},

    summed over the pairs and positions and divided by their count (``+ eps``).

    Args:
        student_logits: ``[..., V]`` floating point.
        values: ``[..., k]`` the teacher's log-probabilities (as ``topk_kl`` takes them).
        indices: ``[..., k]`` their distinct token ids in ``[0, V)``.
        margin: None (the teacher's probability gaps) or a number.
        where: None or bool ``[...]``: the positions that count.
        eps: a probability at or below it is not supported; the gap a preference needs.

    Returns:
        The scalar loss, in at least float32.

    Raises:
        InputError / InputTypeError: as ``topk_kl``; ``where`` of another shape.
    """
    p, pairs = _pairs(student_logits, values, indices, where, eps)
    q = jnp.take_along_axis(jax.nn.softmax(student_logits.astype(p.dtype), axis=-1), indices, axis=-1)
    gap = p[..., :, None] - p[..., None, :] if margin is None else margin
    terms = jax.nn.relu(gap - (q[..., :, None] - q[..., None, :]))
    return jnp.sum(terms * pairs) / (jnp.sum(pairs) + eps)


def topk_logistic_ranking(student_logits, values, indices, *, where=None, eps: float = 1e-9):
    r"""DistillKit's ``sparse_logistic_ranking_loss``: for each pair the teacher prefers,

    .. math:: \log(1 + e^{-(s_i - s_j)})

    on the student's logits ``s`` at the two ids, summed over the pairs and positions and
    divided by their count (``+ eps``).

    Args:
        student_logits: ``[..., V]`` floating point.
        values: ``[..., k]`` the teacher's log-probabilities (as ``topk_kl`` takes them).
        indices: ``[..., k]`` their distinct token ids in ``[0, V)``.
        where: None or bool ``[...]``: the positions that count.
        eps: a probability at or below it is not supported; the gap a preference needs.

    Returns:
        The scalar loss, in at least float32.

    Raises:
        InputError / InputTypeError: as ``topk_kl``; ``where`` of another shape.
    """
    _, pairs = _pairs(student_logits, values, indices, where, eps)
    s = jnp.take_along_axis(student_logits.astype(pairs.dtype), indices, axis=-1)
    terms = jax.nn.softplus(-(s[..., :, None] - s[..., None, :]))
    return jnp.sum(terms * pairs) / (jnp.sum(pairs) + eps)
