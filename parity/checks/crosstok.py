"""Cross-tokenizer distillation: ``kdjax.crosstok`` against the installed TRL's ``ULDLoss``
(``trl/experimental/gold/gold_trainer.py``), value and student gradient.

Tokenizer pairs are trained offline with ``kdjax.tokenizer.train_bpe`` on the same text
(different vocabulary sizes, hence different merges); each row of a batch is one text, its
tokens the answer span after a masked prompt, right-padded. Rows: positional alignment
(TRL's ``use_extended_uld=False``) with random vocabularies and lengths, temperatures, EOS on
one side only, padding and an empty row; byte-offset alignment with probability merging
(``use_extended_uld=True``) on the tokenizer pairs, EOS on the teacher side only, with TRL's
"observed" and "bayesian" merge strategies.
"""

from __future__ import annotations

import functools
import os
import types

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import crosstok
from parity.checks.common import Ctx, F64, TOL, Result, compare

IGNORE = -100
TEXTS = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs!",
         "sphinx of black quartz, judge my vow", "how vexingly quick daft zebras jump"]


def _trl_uld(**overrides):
    """The installed TRL's ``ULDLoss`` with ``GOLDConfig``'s defaults and ``overrides``."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gold.gold_trainer import ULDLoss
    cfg = dict(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
               uld_teacher_temperature=1.0, uld_skip_student_eos=True, uld_skip_teacher_eos=True,
               use_extended_uld=False, uld_token_merge_strategy="observed", beta=0.5)
    tokenizers = overrides.pop("tokenizers", (None, None))
    cfg.update(overrides)
    return ULDLoss(types.SimpleNamespace(**cfg), *tokenizers)


def _hybrid(ref):
    """kdjax's ``Hybrid`` of TRL's ULDLoss's settings and vocabulary mapping; None when not hybrid."""
    if not ref.use_hybrid_loss:
        return None
    return crosstok.hybrid_from_vocabs(ref.student_tokenizer.get_vocab(), ref.teacher_tokenizer.get_vocab(),
                                       beta=ref.beta, matched_weight=ref.hybrid_matched_weight,
                                       unmatched_weight=ref.hybrid_unmatched_weight)


def _labels(spans, length):
    """Labels ``[B, length]``: 1 on each row's ``[start, stop)``, IGNORE elsewhere."""
    y = np.full((len(spans), length), IGNORE)
    for i, (a, b) in enumerate(spans):
        y[i, a:b] = 1
    return y


# (name, student vocab, teacher vocab, student spans, teacher spans, TRL overrides)
POSITIONAL = [
    ("V_s < V_t, defaults", 11, 17, [(1, 6), (0, 3), (2, 7)], [(2, 9), (3, 8), (0, 2)], {}),
    ("V_s > V_t, temperatures 0.7 / 2", 23, 9, [(0, 7), (1, 4), (3, 5)], [(1, 5), (0, 9), (4, 8)],
     {"uld_student_temperature": 0.7, "uld_teacher_temperature": 2.0}),
    ("EOS on the teacher only (student's kept)", 13, 13, [(2, 5), (0, 7), (1, 2)], [(0, 6), (2, 4), (5, 9)],
     {"uld_skip_student_eos": False}),
    ("EOS on the student only, padding, an empty row", 19, 7, [(0, 2), (1, 7), (0, 1)], [(3, 9), (0, 5), (2, 6)],
     {"uld_skip_teacher_eos": False}),
]


def _row(name, ctx, got, want, tol, note=""):
    """``compare``'s row, its note with the normwise relative error of each quantity
    (max abs error / max |reference|): a gradient entry that is exactly 0 in the reference and
    1e-20 here makes the elementwise figure meaningless."""
    norm = []
    for k in got:
        a, b = np.asarray(got[k], np.float64), want[k].detach().cpu().numpy().astype(np.float64)
        norm.append(f"{k} {np.abs(a - b).max() / max(np.abs(b).max(), 1e-300):.1e}")
    return compare(name, ctx, got, want, tol, note=", ".join(([note] if note else []) + norm))


@functools.lru_cache(maxsize=None)
def _positional_cases(dtype: str, device: str) -> list:
    """The positional rows' inputs with TRL's loss and student gradient, once per dtype and device
    (TRL's side is the same every run; kdjax's is computed afresh, e.g. under a mutant)."""
    ctx, cases = Ctx(dtype, device), []
    rng = np.random.default_rng(40)
    B, Ls, Lt = 3, 7, 9
    for name, vs, vt, ss, tsp, over in POSITIONAL:
        s, t = rng.standard_normal((B, Ls, vs)) * 3, rng.standard_normal((B, Lt, vt)) * 3
        ys, yt = _labels(ss, Ls), _labels(tsp, Lt)
        ref = _trl_uld(**over)
        xs = ctx.t(s).requires_grad_()
        ids_s, ids_t = rng.integers(0, vs, (B, Ls)), rng.integers(0, vt, (B, Lt))
        loss = ref(xs, ctx.t(t), ctx.t(ys), ctx.t(yt), ctx.t(ids_s), ctx.t(ids_t))
        loss.backward()
        cases.append((name, s, t, ys, yt, ref, {"loss": loss.detach(), "grad": xs.grad}))
    return cases


def _positional_rows(ctx: Ctx, tol) -> list[Result]:
    out = []

    @functools.partial(jax.jit, static_argnames=("ts", "tt", "es", "et"))
    def value_and_grad(s, t, sw, tw, ts, tt, es, et):
        f = lambda a: crosstok.uld_loss(a, t, student_where=sw, teacher_where=tw, student_temperature=ts,
                                        teacher_temperature=tt, skip_student_eos=es, skip_teacher_eos=et)
        return jax.value_and_grad(f)(s)

    @functools.partial(jax.jit, static_argnames=("ts", "tt", "merge"))
    def cached_value_and_grad(s, t, ids_s, ids_t, alignment, ts, tt, merge):
        # the teacher's side as a ULD cache stores it (all V_t sorted probabilities per group)
        shift = (lambda z: jnp.roll(z, 1, axis=1)) if merge == "bayesian" else (lambda z: z)
        cache = crosstok.teacher_sorted_groups(shift(t), ids_t, alignment, temperature=tt, merge=merge)
        f = lambda a: crosstok.uld_loss_cached(shift(a), cache, student_tokens=ids_s, alignment=alignment,
                                               student_temperature=ts, merge=merge)
        return jax.value_and_grad(f)(s)

    for name, s, t, ys, yt, ref, want in _positional_cases(ctx.dtype, ctx.torch_device):
        val, grad = value_and_grad(jnp.asarray(s, ctx.jdtype), jnp.asarray(t, ctx.jdtype), jnp.asarray(ys != IGNORE),
                                   jnp.asarray(yt != IGNORE), ref.student_temperature, ref.teacher_temperature,
                                   ref.skip_student_eos, ref.skip_teacher_eos)
        out.append(_row(f"ULD positional: {name}", ctx, {"loss": val, "grad": grad}, want, tol))
    return out


@functools.lru_cache(maxsize=None)
def tokenizer_pair(vs: int, vt: int, other: bool = False):
    """Two byte-level BPEs trained offline of ``vs`` and ``vt`` tokens: on the same text, or with
    ``other`` the teacher's on other text too (other merges: vocabularies that share only part)."""
    from kdjax.tokenizer import train_bpe
    corpus = [" ".join(TEXTS)] * 8 + TEXTS
    teacher = ["lorem ipsum dolor sit amet, consectetur adipiscing elit"] * 40 + TEXTS if other else corpus[::-1]
    return train_bpe(corpus, vs), train_bpe(teacher, vt)


def encode_batch(tok, texts, prompt: int, eos: bool):
    """``(ids, labels, offsets)`` ``[B, L]``/``[B, L, 2]``: ``prompt`` masked token(s) of id 1,
    the text's tokens (labels = ids) and, with ``eos``, EOS (id 0) at ``(len, len)`` as TRL's
    ``build_teacher_inputs_from_texts`` places it; right-padded with IGNORE."""
    enc = [tok.encode(x) for x in texts]
    length = prompt + max(len(e.ids) for e in enc) + int(eos)
    ids, y, off = (np.zeros((len(texts), length), np.int64), np.full((len(texts), length), IGNORE),
                   np.zeros((len(texts), length, 2), np.int64))
    for i, (e, x) in enumerate(zip(enc, texts)):
        n = len(e.ids)
        ids[i, :prompt] = 1
        ids[i, prompt:prompt + n], y[i, prompt:prompt + n] = e.ids, e.ids
        off[i, prompt:prompt + n] = e.offsets
        if eos:
            ids[i, prompt + n] = y[i, prompt + n] = 0
            off[i, prompt + n] = (len(x), len(x))
    return ids, y, off


EXTENDED = [  # (name, student vocab, teacher vocab, TRL overrides, student EOS, teacher EOS); hybrid: other merges
    ("BPE 280 vs 330, EOS on the teacher only", 280, 330, {"uld_skip_student_eos": False}, False, True),
    ("BPE 340 vs 270, both EOS, temperatures 1.5 / 0.8", 340, 270,
     {"uld_student_temperature": 1.5, "uld_teacher_temperature": 0.8}, True, True),
    ("hybrid (JSD beta 0.5 on shared tokens, adaptive weights), BPE 280 vs 330", 280, 330,
     {"uld_use_hybrid_loss": True}, False, True),
    ("hybrid, beta 0.2, weights 0.3 / 0.7, temperature 2, BPE 300 vs 260", 300, 260,
     {"uld_use_hybrid_loss": True, "beta": 0.2, "uld_hybrid_matched_weight": 0.3, "uld_hybrid_unmatched_weight": 0.7,
      "uld_student_temperature": 2.0}, True, True),
    ("bayesian merging (the last position's distribution), BPE 280 vs 330, EOS on the teacher only", 280, 330,
     {"uld_token_merge_strategy": "bayesian", "uld_skip_student_eos": False}, False, True),
    ("bayesian merging, hybrid, both EOS, BPE 340 vs 270", 340, 270,
     {"uld_token_merge_strategy": "bayesian", "uld_use_hybrid_loss": True}, True, True),
]


@functools.lru_cache(maxsize=None)
def _extended_cases(dtype: str, device: str) -> list:
    """The byte-offset rows' batches with TRL's loss and student gradient, once per dtype and device."""
    ctx, cases = Ctx(dtype, device), []
    rng = np.random.default_rng(41)
    for name, vs, vt, over, eos_s, eos_t in EXTENDED:
        tok_s, tok_t = tokenizer_pair(vs, vt, "uld_use_hybrid_loss" in over)
        texts = TEXTS[:3]
        ids_s, ys, off_s = encode_batch(tok_s, texts, 2, eos_s)
        ids_t, yt, off_t = encode_batch(tok_t, texts, 1, eos_t)
        B, Ls, Lt = ids_s.shape[0], ids_s.shape[1], ids_t.shape[1]
        s = rng.standard_normal((B, Ls, tok_s.get_vocab_size()))
        t = rng.standard_normal((B, Lt, tok_t.get_vocab_size()))
        # concentrate some mass on the tokens that are there, so merged products are not all tiny
        np.put_along_axis(s, ids_s[..., None], 4.0, axis=-1)
        np.put_along_axis(t, ids_t[..., None], 4.0, axis=-1)
        ref = _trl_uld(use_extended_uld=True, tokenizers=(tok_s, tok_t), **over)
        xs = ctx.t(s).requires_grad_()
        loss = ref(xs, ctx.t(t), ctx.t(ys), ctx.t(yt), ctx.t(ids_s), ctx.t(ids_t),
                   student_byte_offsets=ctx.t(off_s), teacher_byte_offsets=ctx.t(off_t))
        loss.backward()
        cases.append((name, s, t, (ids_s, ys, off_s), (ids_t, yt, off_t), ref,
                      {"loss": loss.detach(), "grad": xs.grad}))
    return cases


def _extended_rows(ctx: Ctx, tol) -> list[Result]:
    out = []

    @functools.partial(jax.jit, static_argnames=("ts", "tt", "hybrid", "merge"))
    def value_and_grad(s, t, ids_s, ids_t, alignment, ts, tt, hybrid, merge):
        # TRL's bayesian strategy reads the logits one position earlier (probs[k] predicts token k):
        # kdjax's positions are the tokens the probabilities are of, so the logits shift by one
        shift = (lambda z: jnp.roll(z, 1, axis=1)) if merge == "bayesian" else (lambda z: z)
        f = lambda a: crosstok.uld_loss_aligned(shift(a), shift(t), student_tokens=ids_s, teacher_tokens=ids_t,
                                                alignment=alignment, student_temperature=ts, teacher_temperature=tt,
                                                hybrid=hybrid, merge=merge)
        return jax.value_and_grad(f)(s)

    @functools.partial(jax.jit, static_argnames=("ts", "tt", "merge"))
    def cached_value_and_grad(s, t, ids_s, ids_t, alignment, ts, tt, merge):
        # the teacher's side as a ULD cache stores it (all V_t sorted probabilities per group)
        shift = (lambda z: jnp.roll(z, 1, axis=1)) if merge == "bayesian" else (lambda z: z)
        cache = crosstok.teacher_sorted_groups(shift(t), ids_t, alignment, temperature=tt, merge=merge)
        f = lambda a: crosstok.uld_loss_cached(shift(a), cache, student_tokens=ids_s, alignment=alignment,
                                               student_temperature=ts, merge=merge)
        return jax.value_and_grad(f)(s)

    for name, s, t, (ids_s, ys, off_s), (ids_t, yt, off_t), ref, want in _extended_cases(ctx.dtype, ctx.torch_device):
        alignment = crosstok.alignment_indices(off_s, off_t, ys != IGNORE, yt != IGNORE,
                                               skip_student_eos=ref.skip_student_eos,
                                               skip_teacher_eos=ref.skip_teacher_eos)
        merged = int((alignment["student_member"].sum(-1) > 1).sum() + (alignment["teacher_member"].sum(-1) > 1).sum())
        val, grad = value_and_grad(jnp.asarray(s, ctx.jdtype), jnp.asarray(t, ctx.jdtype), jnp.asarray(ids_s),
                                   jnp.asarray(ids_t), {k: jnp.asarray(v) for k, v in alignment.items()},
                                   ref.student_temperature, ref.teacher_temperature, _hybrid(ref),
                                   ref.token_merge_strategy)
        note = f"{int(alignment['group_valid'].sum())} groups, {merged} merged"
        out.append(_row(f"ULD byte-offset alignment: {name}", ctx, {"loss": val, "grad": grad}, want, tol,
                        note=note + (f", {len(_hybrid(ref).teacher_ids)} shared" if ref.use_hybrid_loss else "")))
        if not ref.use_hybrid_loss:  # a cache keeps sorted probabilities only: no hybrid form from it
            val, grad = cached_value_and_grad(
                jnp.asarray(s, ctx.jdtype), jnp.asarray(t, ctx.jdtype), jnp.asarray(ids_s), jnp.asarray(ids_t),
                {k: jnp.asarray(v) for k, v in alignment.items()}, ref.student_temperature, ref.teacher_temperature,
                ref.token_merge_strategy)
            out.append(_row(f"ULD byte-offset alignment from a cache of the teacher's sorted groups (k = V_t): "
                            f"{name}", ctx, {"loss": val, "grad": grad}, want, tol, note=note))
    return out


@functools.lru_cache(maxsize=None)
def _positional_hybrid_cases(dtype: str, device: str) -> list:
    """The positional hybrid rows' inputs with TRL's loss and student gradient, once per dtype and device."""
    ctx, cases = Ctx(dtype, device), []
    rng = np.random.default_rng(42)
    tok_s, tok_t = tokenizer_pair(280, 330, True)
    vs, vt = tok_s.get_vocab_size(), tok_t.get_vocab_size()
    for beta in (0.0, 1.0):
        s, t = rng.standard_normal((3, 7, vs)) * 2, rng.standard_normal((3, 9, vt)) * 2
        ys, yt = _labels([(1, 6), (0, 3), (2, 7)], 7), _labels([(2, 9), (3, 8), (0, 2)], 9)
        ref = _trl_uld(uld_use_hybrid_loss=True, beta=beta, tokenizers=(tok_s, tok_t))
        xs = ctx.t(s).requires_grad_()
        ids_s, ids_t = np.zeros((3, 7), np.int64), np.zeros((3, 9), np.int64)  # unused without merging
        loss = ref(xs, ctx.t(t), ctx.t(ys), ctx.t(yt), ctx.t(ids_s), ctx.t(ids_t))
        loss.backward()
        cases.append((f"beta {beta:g}, BPE vocabularies {vs} vs {vt}", s, t, ys, yt, ref,
                      {"loss": loss.detach(), "grad": xs.grad}))
    return cases


def _positional_hybrid_rows(ctx: Ctx, tol) -> list[Result]:
    """Hybrid ULD with positional alignment on a BPE pair's vocabularies (beta 0 and 1: KL both ways)."""
    out = []
    for name, s, t, ys, yt, ref, want in _positional_hybrid_cases(ctx.dtype, ctx.torch_device):
        f = lambda a, t=t: crosstok.uld_loss(a, jnp.asarray(t, ctx.jdtype), student_where=jnp.asarray(ys != IGNORE),
                                             teacher_where=jnp.asarray(yt != IGNORE), hybrid=_hybrid(ref))
        val, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(s, ctx.jdtype))
        out.append(_row(f"ULD positional hybrid: {name}", ctx, {"loss": val, "grad": grad}, want, tol,
                        note=f"{len(_hybrid(ref).teacher_ids)} shared"))
    return out


def check_crosstok(ctx: Ctx) -> list[Result]:
    """ULD (positional and byte-offset alignment) = TRL 1.16's ``ULDLoss``, value and student
    gradient; skipped rows when TRL cannot be imported."""
    tol = F64 if ctx.dtype == "float64" else TOL[ctx.dtype]["grad"]
    try:
        _trl_uld()
    except ImportError as e:
        return [Result("ULD vs TRL ULDLoss", ctx.dtype, 0.0, 0.0, *tol, False, f"trl: {e}", skipped=True)]
    return _positional_rows(ctx, tol) + _positional_hybrid_rows(ctx, tol) + _extended_rows(ctx, tol)
