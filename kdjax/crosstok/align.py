"""Byte-offset alignment of two tokenizations of the same text (TRL's extended ULD):
``align_by_byte_offsets`` groups positions where both sides end at the same offset;
``alignment_indices`` turns a batch of them into the index arrays ``uld_loss_aligned`` reads
(``check_alignment`` checks them).
Host-side NumPy: run it once on the data, not in the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError

__all__ = ["align_by_byte_offsets", "alignment_indices", "check_alignment", "ALIGNMENT"]

# the arrays alignment_indices returns (uld_loss_aligned reads them)
ALIGNMENT = ("student_index", "teacher_index", "student_member", "teacher_member", "group_valid")


def align_by_byte_offsets(s_offsets, t_offsets):
    """Groups of positions where two tokenizations of the same text split at the same byte.

    Walks both ``(start, end)`` byte-offset lists, advancing the side whose current token ends
    earlier; a group closes when both sides end at the same byte (TRL's
    ``ULDLoss._align_by_byte_offsets``). What is left of either side when one runs out forms a
    last group (possibly empty on one side).

    Args:
      s_offsets, t_offsets: sequences of ``(start, end)`` byte offsets, one per token.

    Returns:
      ``(student_groups, teacher_groups)``: equal-length lists of lists of positions.
    """
    s_groups, t_groups = [], []
    s_start = t_start = s = t = 0
    n_s, n_t = len(s_offsets), len(t_offsets)
    while s < n_s and t < n_t:
        s_end, t_end = s_offsets[s][1], t_offsets[t][1]
        s += s_end <= t_end
        t += t_end <= s_end
        if s_end == t_end:
            s_groups.append(list(range(s_start, s)))
            t_groups.append(list(range(t_start, t)))
            s_start, t_start = s, t
    if s < n_s or t < n_t:
        s_groups.append(list(range(s_start, n_s)))
        t_groups.append(list(range(t_start, n_t)))
    return s_groups, t_groups


def alignment_indices(student_offsets, teacher_offsets, student_where, teacher_where, *, groups=None,
                      members=None, skip_student_eos=True, skip_teacher_eos=True):
    """Host-side (NumPy) index arrays for ``uld_loss_aligned``, one row per batch item.

    Each row's scored positions are its masked positions in order (the last dropped when
    skipping that side's EOS); their byte offsets are aligned with ``align_by_byte_offsets``
    and the pairs with positions on both sides kept (TRL drops the others).

    Args:
      student_offsets: ``[B, L_s, 2]`` int byte offsets of the student's tokens (one text per row).
      teacher_offsets: ``[B, L_t, 2]`` the teacher's, in the same byte coordinates.
      student_where, teacher_where: ``[B, L]`` bool masks.
      groups: the number of group slots ``G`` (default: the most any row needs).
      members: the most positions per group ``M`` (default: the most any group has).
      skip_student_eos, skip_teacher_eos: as in ``uld_loss``.

    Returns:
      A dict of NumPy arrays: ``student_index``/``teacher_index`` ``[B, G, M]`` positions,
      ``student_member``/``teacher_member`` ``[B, G, M]`` bool (slot used), ``group_valid``
      ``[B, G]`` bool. Slot 0 of a group is its first position (the merged distribution's base).

    Raises:
      InputError: shapes that disagree, or ``groups``/``members`` too small for the data.
    """
    so, to = np.asarray(student_offsets), np.asarray(teacher_offsets)
    sw, tw = np.asarray(student_where, bool), np.asarray(teacher_where, bool)
    if so.ndim != 3 or so.shape[-1] != 2 or to.ndim != 3 or to.shape[-1] != 2:
        raise InputError(f"offsets: expected [batch, length, 2], got {list(so.shape)} and {list(to.shape)}")
    if sw.shape != so.shape[:2] or tw.shape != to.shape[:2] or so.shape[0] != to.shape[0]:
        raise InputError(f"where: expected {list(so.shape[:2])} and {list(to.shape[:2])}, got {list(sw.shape)} "
                         f"and {list(tw.shape)}")
    rows = []
    for i in range(so.shape[0]):
        ps, pt = np.flatnonzero(sw[i]), np.flatnonzero(tw[i])
        ps, pt = ps[:max(len(ps) - int(skip_student_eos), 0)], pt[:max(len(pt) - int(skip_teacher_eos), 0)]
        if len(ps) == 0 or len(pt) == 0:
            rows.append([])
            continue
        sg, tg = align_by_byte_offsets(so[i, ps].tolist(), to[i, pt].tolist())
        rows.append([([int(ps[j]) for j in a], [int(pt[j]) for j in c]) for a, c in zip(sg, tg) if a and c])
    need_g = max([len(r) for r in rows] + [1])
    need_m = max([max(len(a), len(c)) for r in rows for a, c in r] + [1])
    g = need_g if groups is None else groups
    m = need_m if members is None else members
    if g < need_g or m < need_m:
        raise InputError(f"groups/members: the data need at least {need_g} groups of {need_m} positions, "
                         f"got {g} and {m}")
    out = {k: np.zeros((so.shape[0], g, m), np.int32) for k in ("student_index", "teacher_index")}
    out.update({k: np.zeros((so.shape[0], g, m), bool) for k in ("student_member", "teacher_member")})
    out["group_valid"] = np.zeros((so.shape[0], g), bool)
    for i, r in enumerate(rows):
        for j, (a, c) in enumerate(r):
            out["student_index"][i, j, :len(a)], out["student_member"][i, j, :len(a)] = a, True
            out["teacher_index"][i, j, :len(c)], out["teacher_member"][i, j, :len(c)] = c, True
            out["group_valid"][i, j] = True
    return out


def check_alignment(alignment, s_shape, t_shape, s_tokens, t_tokens) -> None:
    """Shapes, dtypes and (for concrete arrays) index and token ranges of ``alignment_indices``' dict.

    Args:
      alignment: the dict to check.
      s_shape, t_shape: the student's and the teacher's ``[batch, length, vocab]`` logits shapes;
        one of them None when that side is not there (a cached teacher; a teacher alone).
      s_tokens, t_tokens: each side's ``[batch, length]`` token ids (None with its shape).

    Raises:
      InputError: a shape, batch size, index or token id out of place.
      InputTypeError: an array of the wrong dtype.
    """
    b = (s_shape or t_shape)[0]
    if s_shape is not None and t_shape is not None and t_shape[0] != b:
        raise InputError(f"teacher_logits: expected batch size {b} (the student's), got {t_shape[0]}")
    shape = tuple(jnp.shape(alignment["student_index"]))
    if len(shape) != 3 or shape[0] != b:
        raise InputError(f"alignment: expected student_index of shape [batch {b}, groups, members], got {list(shape)}")
    for key, want, kind in (("teacher_index", shape, jnp.integer), ("student_member", shape, jnp.bool_),
                            ("teacher_member", shape, jnp.bool_), ("group_valid", shape[:2], jnp.bool_),
                            ("student_index", shape, jnp.integer)):
        got, dtype = tuple(jnp.shape(alignment[key])), jnp.result_type(alignment[key])
        if got != want:
            raise InputError(f"alignment: expected {key} of shape {list(want)}, got {list(got)}")
        if not jnp.issubdtype(dtype, kind):
            raise InputTypeError(f"alignment: expected {key} of {'int' if kind is jnp.integer else 'bool'} dtype, "
                                 f"got {dtype}")
    for key, shape_, tokens, side in (("student_index", s_shape, s_tokens, "student"),
                                      ("teacher_index", t_shape, t_tokens, "teacher")):
        if shape_ is None:
            continue
        length, vocab = shape_[1], shape_[2]
        if not any(isinstance(a, jax.core.Tracer) for a in (alignment[key], tokens)):  # concrete: check ranges
            index, tok = np.asarray(alignment[key]), np.asarray(tokens)
            if index.size and (index.min() < 0 or index.max() >= length):
                raise InputError(f"alignment: expected {key} in [0, {length}) (the {side}'s positions), got "
                                 f"[{index.min()}, {index.max()}]")
            if tok.size and (tok.min() < 0 or tok.max() >= vocab):
                raise InputError(f"{side}_tokens: expected ids in [0, {vocab}) (the {side}'s vocabulary), got "
                                 f"[{tok.min()}, {tok.max()}]")
