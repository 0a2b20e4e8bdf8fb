"""Checks of a teacher's top-k inputs (ids and log-probabilities), shared by the sparse losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError

_LOGPROB_SLACK = 1e-5  # how far above 0 a stored "log-probability" may round


def _traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_topk(student_logits, values, indices) -> None:
    """Check a teacher's top-k inputs against the student's logits.

    Args:
      student_logits: ``[..., V]`` floating point.
      values: ``[..., k]`` the teacher's log-probabilities, ``1 <= k <= V``.
      indices: ``[..., k]`` their integer token ids.

    Raises:
      InputTypeError: a non-array or a wrong dtype.
      InputError: shapes that do not match, a k outside ``[1, V]``; and, when concrete, ids
        out of ``[0, V)`` or repeated at a position, values that are not log-probabilities
        (NaN or infinite, positive, or whose probabilities sum past 1).
    """
    for name, x in (("student_logits", student_logits), ("values", values), ("indices", indices)):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")) or len(x.shape) < 1:
            raise InputTypeError(f"{name}: expected an array [..., {'V' if name == 'student_logits' else 'k'}], "
                                 f"got {type(x).__name__} {getattr(x, 'shape', '')}")
    if not jnp.issubdtype(student_logits.dtype, jnp.floating):
        raise InputTypeError(f"student_logits: expected floating point, got {student_logits.dtype}")
    if values.shape != indices.shape or values.shape[:-1] != student_logits.shape[:-1]:
        raise InputError(f"values / indices: expected [..., k] with the student's positions "
                         f"{tuple(student_logits.shape[:-1])}, got {tuple(values.shape)} and {tuple(indices.shape)}")
    vocab = student_logits.shape[-1]
    if not 1 <= values.shape[-1] <= vocab:
        raise InputError(f"values / indices: expected k in [1, {vocab}] (the student's vocabulary), got "
                         f"k = {values.shape[-1]}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise InputTypeError(f"indices: expected integer token ids, got {indices.dtype}")
    if not jnp.issubdtype(values.dtype, jnp.floating):
        raise InputTypeError(f"values: expected floating point log-probabilities, got {values.dtype}")
    if not _traced(indices):
        _check_topk_ids(indices, vocab)
    if not _traced(values):
        _check_topk_logprobs(values)


def _check_topk_ids(indices, vocab: int, where: str = "") -> None:
    """Refuse concrete top-k ids outside ``[0, vocab)`` or repeated at a position."""
    ids = np.asarray(indices)
    if not ids.size:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise InputError(f"{where}indices: expected token ids in [0, {vocab}), got ids in [{lo}, {hi}]")
    ordered = np.sort(ids, axis=-1)
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise InputError(f"{where}indices: expected k distinct token ids per position, got a position with a "
                         f"repeated id")


def _check_topk_logprobs(values, where: str = "") -> None:
    """Refuse concrete top-k "log-probabilities" that are not: NaN or infinite, positive,
    or whose probabilities sum past 1 (beyond the rounding of their dtype)."""
    v = np.asarray(values)
    if not v.size:
        return
    if v.dtype.itemsize < 4:  # float16 / bfloat16: summed in float32
        v = v.astype(np.float32)
    if not np.isfinite(v).all():
        raise InputError(f"{where}values: expected finite log-probabilities, got {int((~np.isfinite(v)).sum())} "
                         f"NaN or infinite")
    if v.max() > _LOGPROB_SLACK:
        raise InputError(f"{where}values: expected log-probabilities (<= 0), got a maximum of {float(v.max()):g} "
                         f"(logits rather than log_softmax?)")
    p = np.exp(v)
    total = p.sum(axis=-1)
    # each value rounded in its dtype moves the sum by up to eps * sum(p * |log p|)
    eps = max(float(jnp.finfo(np.asarray(values).dtype).eps), float(np.finfo(np.float32).eps))
    slack = _LOGPROB_SLACK + eps * -np.einsum("...k,...k->...", p, v)
    if (total > 1 + slack).any():
        raise InputError(f"{where}values: expected the log-probabilities of k tokens (probabilities summing to at "
                         f"most 1), got a position whose probabilities sum to {float(total.max()):.6g} "
                         f"(shifted logits rather than log_softmax?)")
