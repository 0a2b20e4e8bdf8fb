"""Cross-tokenizer distillation: Universal Logit Distillation (ULD, Boizard et al., 2024).

A teacher with another tokenizer has another vocabulary, so its distribution cannot be
compared token by token with the student's. ULD compares the *sorted* probabilities instead:
per aligned position ``k``, with ``p`` the student's and ``q`` the teacher's probabilities
(each side at its own temperature), both sorted in descending order and zero-padded to the
larger vocabulary ``V = max(V_s, V_t)``::

    uld_b = (1 / n_b) · Σ_{k < n_b} Σ_{v < V} | sort↓(p_{b,k})_v − sort↓(q_{b,k})_v |
    loss  = mean_b uld_b

Equal to TRL 1.16's ``trl.experimental.gold.ULDLoss`` (``GOLDConfig`` defaults:
``uld_skip_student_eos=True``, ``uld_skip_teacher_eos=True``, temperatures 1, distillation
weight 1, cross-entropy weight 0, "observed" merging):

* **Positional alignment** (``uld_loss``, TRL's ``use_extended_uld=False``): each side's masked
  positions in order, the last one dropped per side when skipping its EOS, truncated to the
  shorter side, ``n_b`` that length; a row with no position left on either side contributes 0
  and still counts in the batch mean. TRL slices ``[first masked, first masked + count)``; for
  a contiguous mask (its answer span) that is the same positions.
* **Byte-offset alignment** (``align_by_byte_offsets``, ``alignment_indices``,
  ``uld_loss_aligned``; TRL's ``use_extended_uld=True``): two tokenizations of the same text
  are grouped where both split at the same byte; a group of positions ``[i, …, i+k]`` becomes
  ``probs[i] · Π_{j=i+1..i+k} max(probs[j, token_j], 1e-8)`` (the first position's distribution
  times the conditional probabilities of the tokens actually there); ``n_b`` is the number of
  groups with positions on both sides.
* **Hybrid** (``Hybrid``, TRL's ``uld_use_hybrid_loss``): JSD on shared tokens, sorted L1 on the rest.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.crosstok.align import ALIGNMENT, align_by_byte_offsets, alignment_indices, check_alignment
from kdjax.errors import InputError, InputTypeError
from kdjax.losses import check_beta, check_temperature

__all__ = ["uld_loss", "uld_loss_aligned", "uld_loss_cached", "teacher_sorted_groups", "align_by_byte_offsets",
           "alignment_indices", "Hybrid", "hybrid_from_vocabs", "ULD", "MERGE_EPS", "MERGES"]

MERGE_EPS = 1e-8  # TRL's clamp of a merged token's conditional probability
MERGES = ("observed", "bayesian")  # TRL's uld_token_merge_strategy


def _check_logits(logits, name: str):
    shape = jnp.shape(logits)
    if len(shape) != 3:
        raise InputError(f"{name}: expected [batch, length, vocab] logits, got shape {list(shape)}")
    if not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
        raise InputTypeError(f"{name}: expected floating logits, got {jnp.result_type(logits)}")
    if shape[-1] < 1 or shape[1] < 1:
        raise InputError(f"{name}: expected a non-empty length and vocabulary, got shape {list(shape)}")


def _check_where(where, shape, name: str):
    if where is None:
        raise InputError(f"{name}: expected a [batch, length] bool mask, got None")
    if jnp.result_type(where) != jnp.bool_:
        raise InputTypeError(f"{name}: expected a bool mask, got {jnp.result_type(where)}")
    if tuple(jnp.shape(where)) != tuple(shape):
        raise InputError(f"{name}: expected shape {list(shape)} (the logits' [batch, length]), "
                         f"got {list(jnp.shape(where))}")


def _sorted_l1(p, q):
    """``Σ_v |sort↓(p)_v − sort↓(q)_v|`` per row, both zero-padded to the larger vocabulary."""
    v = max(p.shape[-1], q.shape[-1])

    def descending(x):
        return jnp.pad(-jnp.sort(-x, axis=-1), [(0, 0)] * (x.ndim - 1) + [(0, v - x.shape[-1])])

    return jnp.sum(jnp.abs(descending(p) - descending(q)), axis=-1)


@dataclasses.dataclass(frozen=True)
class Hybrid:
    """TRL's hybrid ULD (``uld_use_hybrid_loss``): per position ``w_m · Σ_{shared} JSD_β + w_u ·
    sorted-L1 over the other tokens``, the JSD on probabilities clamped at 1e-8 (not renormalised),
    ``w_m = #shared / V_t`` and ``w_u = 1 − w_m`` unless both weights are given.
    ``student_ids[i]``/``teacher_ids[i]``: the same token string in each vocabulary."""

    student_ids: tuple
    teacher_ids: tuple
    beta: float = 0.5
    matched_weight: float | None = None
    unmatched_weight: float | None = None

    def __post_init__(self):
        for name in ("student_ids", "teacher_ids"):
            ids = np.asarray(getattr(self, name))
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or np.any(ids < 0):
                raise InputError(f"hybrid: expected {name} as non-negative int token ids, got {getattr(self, name)!r}")
            if len(np.unique(ids)) != len(ids):
                raise InputError(f"hybrid: expected distinct {name}, got repeated ids")
        if len(self.student_ids) != len(self.teacher_ids) or not self.student_ids:
            raise InputError(f"hybrid: expected as many student as teacher ids (one pair per shared token, at least "
                             f"one), got {len(self.student_ids)} and {len(self.teacher_ids)}")
        check_beta(self.beta, "hybrid beta")
        if (self.matched_weight is None) != (self.unmatched_weight is None):
            raise InputError("hybrid: expected both matched_weight and unmatched_weight, or neither (adaptive)")


def hybrid_from_vocabs(student_vocab, teacher_vocab, **options) -> Hybrid:
    """``Hybrid`` of the token strings two vocabularies (``tokenizer.get_vocab()``) share.

    Args:
      student_vocab, teacher_vocab: ``{token string: id}`` dicts.
      **options: ``Hybrid``'s ``beta``, ``matched_weight``, ``unmatched_weight``.

    Returns:
      A ``Hybrid`` pairing each shared token's student and teacher ids.

    Raises:
      InputError: vocabularies that are not dicts, or that share no token (hybrid ULD would be ULD).
    """
    if not isinstance(student_vocab, dict) or not isinstance(teacher_vocab, dict):
        raise InputError(f"hybrid_from_vocabs: expected two {{token: id}} dicts (tokenizer.get_vocab()), got "
                         f"{type(student_vocab).__name__} and {type(teacher_vocab).__name__}")
    pairs = sorted((t, student_vocab[tok]) for tok, t in teacher_vocab.items() if tok in student_vocab)
    if not pairs:
        raise InputError("hybrid: the two vocabularies share no token, so hybrid ULD would be plain ULD; expected "
                         "vocabularies with tokens in common")
    return Hybrid(tuple(int(p[1]) for p in pairs), tuple(int(p[0]) for p in pairs), **options)


def _position_loss(p, q, hybrid):
    if hybrid is None:
        return _sorted_l1(p, q)
    si, ti = np.asarray(hybrid.student_ids, np.int64), np.asarray(hybrid.teacher_ids, np.int64)
    if len(si) != len(ti) or np.any(si >= p.shape[-1]) or np.any(ti >= q.shape[-1]):
        raise InputError(f"hybrid: expected as many student as teacher ids, within the vocabularies "
                         f"({p.shape[-1]}, {q.shape[-1]}), got {len(si)} and {len(ti)}")
    ls, lt, beta = jnp.log(jnp.maximum(p[..., si], 1e-8)), jnp.log(jnp.maximum(q[..., ti], 1e-8)), hybrid.beta
    if beta == 0:
        jsd = jnp.exp(lt) * (lt - ls)
    elif beta == 1:
        jsd = jnp.exp(ls) * (ls - lt)
    else:
        mix = jnp.logaddexp(ls + np.log1p(-beta), lt + np.log(beta))
        jsd = beta * jnp.exp(lt) * (lt - mix) + (1 - beta) * jnp.exp(ls) * (ls - mix)
    s_un, t_un = np.setdiff1d(np.arange(p.shape[-1]), si), np.setdiff1d(np.arange(q.shape[-1]), ti)
    rest = _sorted_l1(p[..., s_un], q[..., t_un]) if len(s_un) and len(t_un) else 0.0
    w_m = len(ti) / q.shape[-1] if hybrid.matched_weight is None else hybrid.matched_weight
    w_u = 1.0 - w_m if hybrid.matched_weight is None else hybrid.unmatched_weight
    return w_m * jnp.sum(jsd, axis=-1) + w_u * rest


def uld_loss(student_logits, teacher_logits, *, student_where, teacher_where, student_temperature=1.0,
             teacher_temperature=1.0, skip_student_eos=True, skip_teacher_eos=True, hybrid=None):
    """ULD with positional alignment: TRL's ``ULDLoss`` (``use_extended_uld=False``).

    ``loss = mean_b (1/n_b) Σ_{k<n_b} Σ_v |sort↓(softmax(s_{b,π_s(k)}/T_s))_v −
    sort↓(softmax(t_{b,π_t(k)}/T_t))_v|`` with ``π`` each side's masked positions in order,
    ``n_b = min(#s − e_s, #t − e_t)`` (``e`` = 1 when skipping that side's EOS, its last masked
    position), rows with ``n_b ≤ 0`` contributing 0; vocabularies zero-padded to the larger.

    Args:
      student_logits: ``[B, L_s, V_s]`` floats.
      teacher_logits: ``[B, L_t, V_t]`` floats (another length and vocabulary allowed); no
        gradient flows into it.
      student_where: ``[B, L_s]`` bool, the student's scored positions.
      teacher_where: ``[B, L_t]`` bool, the teacher's.
      student_temperature, teacher_temperature: positive; each side's softmax temperature.
      skip_student_eos, skip_teacher_eos: drop each row's last masked position on that side
        (TRL's defaults: both True).
      hybrid: None, or a ``Hybrid``: its per-position loss replaces the sorted L1.

    Returns:
      The float scalar loss.

    Raises:
      InputError: wrong ranks, batch sizes, mask shapes or a non-positive temperature.
      InputTypeError: integer logits or a non-bool mask.
    """
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    b, ls, _ = student_logits.shape
    bt, lt, _ = teacher_logits.shape
    if b != bt:
        raise InputError(f"teacher_logits: expected batch size {b} (the student's), got {bt}")
    _check_where(student_where, (b, ls), "student_where")
    _check_where(teacher_where, (b, lt), "teacher_where")
    check_temperature(student_temperature, "student_temperature")
    check_temperature(teacher_temperature, "teacher_temperature")
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    k = min(ls, lt)
    # each side's masked positions first, in order (a stable sort of the unmasked flag)
    order_s = jnp.argsort(~student_where, axis=1, stable=True)[:, :k]
    order_t = jnp.argsort(~teacher_where, axis=1, stable=True)[:, :k]
    s = jnp.take_along_axis(student_logits, order_s[..., None], axis=1)
    t = jnp.take_along_axis(teacher_logits, order_t[..., None], axis=1)
    p = jax.nn.softmax(s / student_temperature, axis=-1)
    q = jax.nn.softmax(t / teacher_temperature, axis=-1)
    n_s = jnp.sum(student_where, axis=1) - int(bool(skip_student_eos))
    n_t = jnp.sum(teacher_where, axis=1) - int(bool(skip_teacher_eos))
    n = jnp.maximum(jnp.minimum(n_s, n_t), 0)
    valid = jnp.arange(k)[None, :] < n[:, None]
    per = jnp.where(valid, _position_loss(p, q, hybrid), 0.0)
    return jnp.mean(jnp.sum(per, axis=1) / jnp.maximum(n, 1).astype(per.dtype))


def _merge(probs, tokens, index, member, merge: str):
    """Each group's merged distribution: ``"observed"``: ``probs[first] · Π_{later} p_own``;
    ``"bayesian"``: ``probs[last] · Π_{earlier} p_own``, where ``p_own = max(probs[pos,
    tokens[pos]], MERGE_EPS)`` (TRL's ``_merge_probabilities_with_alignment_groups``); the index
    arrays NumPy or jnp."""
    tokens, index, member = jnp.asarray(tokens), jnp.asarray(index), jnp.asarray(member)
    b = index.shape[0]
    own = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]  # [B, L]: each position's own token
    scal = jnp.take_along_axis(own, index.reshape(b, -1), axis=1).reshape(index.shape)  # [B, G, M]
    slot = jnp.arange(index.shape[-1])
    if merge == "bayesian":
        base_slot = jnp.maximum(jnp.sum(member, axis=-1) - 1, 0)
        scalars = member & (slot[None, None, :] < base_slot[..., None])
    else:
        base_slot = jnp.zeros(index.shape[:2], jnp.int32)
        scalars = member & (slot > 0)[None, None, :]
    base_pos = jnp.take_along_axis(index, base_slot[..., None], axis=-1)  # [B, G, 1]
    base = jnp.take_along_axis(probs, base_pos, axis=1)  # [B, G, V]
    factor = jnp.prod(jnp.where(scalars, jnp.maximum(scal, MERGE_EPS), 1.0), axis=-1)
    return base * factor[..., None]


def uld_loss_aligned(student_logits, teacher_logits, *, student_tokens, teacher_tokens, alignment,
                     student_temperature=1.0, teacher_temperature=1.0, hybrid=None, merge="observed"):
    """ULD over byte-offset alignment groups: TRL's ``ULDLoss`` with ``use_extended_uld=True``.

    ``loss = mean_b (1/G_b) Σ_{g<G_b} Σ_v |sort↓(P_{b,g})_v − sort↓(Q_{b,g})_v|`` where a group
    ``[i, …, i+k]`` of one side merges to ``probs[i] · Π_{j>i} max(probs[j, token_j], 1e-8)``
    ("observed") or ``probs[i+k] · Π_{j<i+k} max(probs[j, token_j], 1e-8)`` ("bayesian"),
    and ``G_b`` is row b's number of groups (rows with none contribute 0). Position ``j``'s
    probabilities are those of ``token_j``: for next-token logits, pass the next tokens.

    Args:
      student_logits: ``[B, L_s, V_s]``; teacher_logits: ``[B, L_t, V_t]`` (no gradient).
      student_tokens: ``[B, L_s]`` ints, the student's tokens at its positions (the ids whose
        conditional probability a merge multiplies in); teacher_tokens: ``[B, L_t]``.
      alignment: ``alignment_indices(...)``'s dict (NumPy or jnp arrays).
      student_temperature, teacher_temperature: positive softmax temperatures.
      hybrid: None, or a ``Hybrid`` (as in ``uld_loss``).
      merge: ``"observed"`` (TRL's default) or ``"bayesian"`` (TRL's ``uld_token_merge_strategy``).

    Returns:
      The float scalar loss.

    Raises:
      InputError: shapes that disagree, a non-positive temperature or an unknown ``merge``.
      InputTypeError: integer logits or non-integer tokens.
    """
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    check_temperature(student_temperature, "student_temperature")
    check_temperature(teacher_temperature, "teacher_temperature")
    _check_merge(merge)
    _check_alignment_keys(alignment)
    _check_tokens("student_tokens", student_tokens, student_logits)
    _check_tokens("teacher_tokens", teacher_tokens, teacher_logits)
    check_alignment(alignment, student_logits.shape, teacher_logits.shape, student_tokens, teacher_tokens)
    valid = jnp.asarray(alignment["group_valid"])
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    p = jax.nn.softmax(student_logits / student_temperature, axis=-1)
    q = jax.nn.softmax(teacher_logits / teacher_temperature, axis=-1)
    sp = _merge(p, student_tokens, alignment["student_index"], alignment["student_member"], merge)
    tq = _merge(q, teacher_tokens, alignment["teacher_index"], alignment["teacher_member"], merge)
    return _group_mean(jnp.where(valid, _position_loss(sp, tq, hybrid), 0.0), valid)


def _group_mean(per, valid):
    """``mean_b (1/G_b) Σ_g per[b, g]`` over each row's valid groups (a row with none: 0)."""
    n = jnp.sum(valid, axis=1)
    return jnp.mean(jnp.sum(per, axis=1) / jnp.maximum(n, 1).astype(per.dtype))


def teacher_sorted_groups(teacher_logits, teacher_tokens, alignment, *, temperature=1.0, merge="observed",
                          k=None):
    """The teacher's side of ``uld_loss_aligned``, sorted: what a ULD cache stores.

    ``sort↓(Q_{b,g})[:k]`` with ``Q_{b,g}`` group g's merged probabilities at ``temperature``
    (as ``uld_loss_aligned`` merges them). ``uld_loss_cached`` with all ``V_t`` of them equals
    ``uld_loss_aligned``; with ``k < V_t`` the rest count as 0.

    Args:
      teacher_logits: ``[B, L_t, V_t]`` floats.
      teacher_tokens: ``[B, L_t]`` ints, the teacher's tokens at its positions.
      alignment: ``alignment_indices(...)``'s dict (its teacher arrays are read).
      temperature: the teacher's softmax temperature, positive.
      merge: ``"observed"`` or ``"bayesian"``, as in ``uld_loss_aligned``.
      k: probabilities kept per group, ``1 <= k <= V_t``; None: all.

    Returns:
      ``[B, G, k]`` floats, descending along the last axis.

    Raises:
      InputError: shapes that disagree, a bad ``k``, temperature or ``merge``.
      InputTypeError: integer logits or non-integer tokens.
    """
    _check_logits(teacher_logits, "teacher_logits")
    check_temperature(temperature, "temperature")
    _check_merge(merge)
    v = teacher_logits.shape[-1]
    k = v if k is None else k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= v:
        raise InputError(f"k: expected an int in [1, {v}] (the teacher's vocabulary), got {k!r}")
    _check_tokens("teacher_tokens", teacher_tokens, teacher_logits)
    _check_alignment_keys(alignment)
    check_alignment(alignment, None, teacher_logits.shape, None, teacher_tokens)
    q = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
    tq = _merge(q, teacher_tokens, alignment["teacher_index"], alignment["teacher_member"], merge)
    return jax.lax.top_k(tq, int(k))[0]


def uld_loss_cached(student_logits, teacher_sorted, *, student_tokens, alignment, student_temperature=1.0,
                    merge="observed"):
    """``uld_loss_aligned`` against a teacher's cached ``teacher_sorted_groups``.

    ``loss = mean_b (1/G_b) Σ_{g<G_b} Σ_v |sort↓(P_{b,g})_v − T_{b,g,v}|`` with ``T`` the
    cached top-k, zero-padded to the student's vocabulary (the teacher's mass past its top
    k counts as 0); equal to ``uld_loss_aligned`` when ``k = V_t``. The cache's temperature
    and merge are the teacher's; ``merge`` here must be the one it was written with.

    Args:
      student_logits: ``[B, L_s, V_s]`` floats.
      teacher_sorted: ``[B, G, k]`` floats (no gradient), ``G`` the alignment's groups.
      student_tokens: ``[B, L_s]`` ints, the student's tokens at its positions.
      alignment: ``alignment_indices(...)``'s dict.
      student_temperature: the student's softmax temperature, positive.
      merge: ``"observed"`` or ``"bayesian"``.

    Returns:
      The float scalar loss.

    Raises:
      InputError: shapes that disagree, a non-positive temperature or an unknown ``merge``.
      InputTypeError: integer logits, integer cached values or non-integer tokens.
    """
    _check_logits(student_logits, "student_logits")
    check_temperature(student_temperature, "student_temperature")
    _check_merge(merge)
    _check_tokens("student_tokens", student_tokens, student_logits)
    _check_alignment_keys(alignment)
    check_alignment(alignment, student_logits.shape, None, student_tokens, None)
    want = tuple(jnp.shape(alignment["group_valid"]))
    if not hasattr(teacher_sorted, "shape"):
        raise InputTypeError(f"teacher_sorted: expected a [batch, groups, k] array, got "
                             f"{type(teacher_sorted).__name__}")
    if jnp.ndim(teacher_sorted) != 3 or tuple(jnp.shape(teacher_sorted))[:2] != want:
        raise InputError(f"teacher_sorted: expected [batch, groups, k] with [batch, groups] = {list(want)} (the "
                         f"alignment's), got shape {list(jnp.shape(teacher_sorted))}")
    if not jnp.issubdtype(jnp.result_type(teacher_sorted), jnp.floating):
        raise InputTypeError(f"teacher_sorted: expected floating probabilities, got {jnp.result_type(teacher_sorted)}")
    if jnp.shape(teacher_sorted)[-1] < 1:
        raise InputError("teacher_sorted: expected at least one probability per group (k >= 1), got k = 0")
    ts = None if isinstance(teacher_sorted, jax.core.Tracer) else np.asarray(teacher_sorted, np.float64)
    if ts is not None and not (np.isfinite(ts).all() and ts.min() >= 0 and ts.max() <= 1):  # concrete: checked
        raise InputError(f"teacher_sorted: expected probabilities in [0, 1], got values in [{ts.min()}, {ts.max()}]")
    valid = jnp.asarray(alignment["group_valid"])
    p = jax.nn.softmax(student_logits / student_temperature, axis=-1)
    sp = _merge(p, student_tokens, alignment["student_index"], alignment["student_member"], merge)
    t = jax.lax.stop_gradient(jnp.asarray(teacher_sorted)).astype(sp.dtype)
    return _group_mean(jnp.where(valid, _sorted_l1(sp, t), 0.0), valid)


def _check_merge(merge) -> None:
    if merge not in MERGES:
        raise InputError(f"merge: expected one of {MERGES}, got {merge!r}")


def _check_tokens(name: str, tokens, logits) -> None:
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise InputTypeError(f"{name}: expected integer token ids, got {jnp.result_type(tokens)}")
    if tuple(jnp.shape(tokens)) != tuple(logits.shape[:2]):
        raise InputError(f"{name}: expected shape {list(logits.shape[:2])}, got {list(jnp.shape(tokens))}")


def _check_alignment_keys(alignment) -> None:
    if not isinstance(alignment, dict) or any(k not in alignment for k in ALIGNMENT):
        raise InputError(f"alignment: expected alignment_indices(...)'s dict with keys {ALIGNMENT}, got "
                         f"{sorted(alignment) if isinstance(alignment, dict) else type(alignment).__name__}")


# the objective (kdjax/crosstok/objective.py), importable from here
from kdjax.crosstok.objective import ULD  # noqa: E402


