"""One corpus in two tokenizations, for distilling across tokenizers (``paired_text``).

Each document is encoded by both tokenizers (its end-of-text token appended on each side)
and the documents are joined into one stream per side, with character offsets in one shared
coordinate system (each end-of-text token is one character past its document). The
student's stream is cut into packed windows as ``kdjax.data.text`` cuts it; for each student
training window the teacher gets its own tokens of the same text and the byte-offset
alignment of the two sides' targets, so a ``kdjax.crosstok.ULD`` step compares predictions of
the same text. Bits per byte make the two tokenizations comparable in evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from kdjax.crosstok.align import alignment_indices
from kdjax.data import Dataset, TEXT_MODULES, decode_text, text_documents
from kdjax.data.corpus import _first, _windows
from kdjax.errors import InputError, InputTypeError, check_count
from kdjax.tokenizer import eos_id

__all__ = ["PairedText", "paired_text"]


@dataclasses.dataclass(frozen=True)
class PairedText:
    """What ``paired_text`` returns.

    Attributes:
      student: the student's packed windows (``x``/``y`` ``[windows, length]``), as ``kdjax.data.text``.
      teacher: the teacher's own packed windows of the same corpus, of the same length (its evaluation).
      extra: per student training window, ``teacher_x``/``teacher_y`` ``[windows, L_t]`` (the teacher's
        tokens of the window's text and their next tokens, zero-padded) and ``alignment_indices``'
        arrays over the two sides' targets: ``kdjax.fitting.fit_members``' ``extra_data``.
      tokens_per_byte: ``{"student": ..., "teacher": ...}``: target tokens per UTF-8 byte of the
        validation windows (bits per byte = bits per token × tokens per byte).
    """

    student: Dataset
    teacher: Dataset
    extra: dict
    tokens_per_byte: dict


def _byte_lengths(tokenizer):
    """Bytes per token id of a byte-level BPE with no normaliser (each character of its token
    strings stands for one byte; an added token is its UTF-8 text), else None."""
    cfg = json.loads(tokenizer.to_str())
    if (cfg.get("decoder") or {}).get("type") != "ByteLevel" or cfg.get("normalizer"):
        return None
    table = np.zeros(int(tokenizer.get_vocab_size()), np.int64)
    for token, i in tokenizer.get_vocab(with_added_tokens=False).items():
        table[i] = len(token)
    for i, added in tokenizer.get_added_tokens_decoder().items():
        table[i] = len(added.content.encode("utf-8"))
    return table


def _stream(tokenizer, docs: list[str]):
    """``(ids, starts, ends)`` of the documents encoded one after another, each followed by EOS;
    UTF-8 byte offsets in the documents joined with one byte for each EOS. A byte-level BPE's
    offsets are counted from its tokens' bytes (a token may end inside a character); another
    tokenizer's character offsets are converted (its tokens hold whole characters)."""
    eos, ids, starts, ends, base = eos_id(tokenizer), [], [], [], 0
    lengths = _byte_lengths(tokenizer)
    for text, enc in zip(docs, tokenizer.encode_batch(docs)):
        raw = text.encode("utf-8")
        tok = np.asarray(enc.ids, np.int64)
        if lengths is not None and int(lengths[tok].sum()) == len(raw):
            end = np.cumsum(lengths[tok])
            begin = end - lengths[tok]
        else:  # characters -> bytes
            cp = np.frombuffer(text.encode("utf-32-le"), np.uint32)
            prefix = np.concatenate([[0], np.cumsum(1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000))])
            off = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
            begin, end = prefix[off[:, 0]], prefix[off[:, 1]]
        ids.append(np.append(tok, eos))
        starts.append(np.append(begin, len(raw)) + base)
        ends.append(np.append(end, len(raw) + 1) + base)
        base += len(raw) + 1
    cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return cat(ids), cat(starts), cat(ends)


def _tokens_per_byte(ids: np.ndarray, ends: np.ndarray, eos: int, length: int) -> float:
    """Targets per byte over the packed windows: window w's targets cover the bytes from the end
    of its first input to the end of its last target (each EOS there counts one byte less)."""
    n = (len(ends) - 1) // length
    covered = ends[n * length] - ends[0] - int(np.sum(ids[1:n * length + 1] == eos))
    return n * length / max(int(covered), 1)


def _teacher_windows(s_starts, s_ends, t_starts, t_ends, length: int):
    """Per student window (its ``length + 1`` tokens' text): the teacher's tokens fully inside it."""
    n = (len(s_starts) - 1) // length
    first, last = s_starts[np.arange(n) * length], s_ends[np.arange(n) * length + length]
    a = np.searchsorted(t_starts, first, side="left")
    b = np.searchsorted(t_ends, last, side="right")
    return [(int(i), int(j)) for i, j in zip(a, b)], n


def _group_ends(offsets, index, member) -> np.ndarray:
    """``[n, G]``: the end byte of each group's last position."""
    last = np.take_along_axis(index, np.maximum(member.sum(-1) - 1, 0)[..., None], axis=-1)[..., 0]
    return np.take_along_axis(offsets[..., 1], last, axis=1)


def paired_text(length: int, path: str | os.PathLike | None = None, *, student_tokenizer, teacher_tokenizer,
                max_bytes: int | None = None, max_teacher_length: int | None = None,
                modules=TEXT_MODULES) -> PairedText:
    """The corpus of ``kdjax.data.text`` tokenised by a student's and a teacher's tokenizer.

    Student window ``w`` holds stream tokens ``[w·L, (w+1)·L]`` (inputs and next tokens, as
    ``kdjax.data.text``); the teacher's window is its tokens lying wholly inside that text,
    ``teacher_x`` all but the last and ``teacher_y`` all but the first (``m`` positions, the
    rest padding). The targets of both sides are aligned by their end offsets
    (``kdjax.crosstok.alignment_indices``, no EOS skipped: a window ends anywhere), so a group
    is a stretch of text both sides predict whole; a window's first group is dropped where the
    two sides' first inputs end at other characters (its targets would start apart).

    Args:
      length: student tokens per window (``--context``).
      path, modules: the corpus, as ``kdjax.data.text`` (a ``.txt`` file, or the standard library's source).
      student_tokenizer, teacher_tokenizer: ``tokenizers.Tokenizer``s, each with an end-of-text token.
      max_bytes: a training-byte cap, as ``kdjax.data.text``.
      max_teacher_length: the teacher's most positions (its ``max_position_embeddings``); None: unchecked.

    Returns:
      A ``PairedText``.

    Raises:
      InputError: a corpus too short for one window, a tokenizer without an end-of-text token,
        or a window whose teacher tokens exceed ``max_teacher_length``.
    """
    check_count("length", length)
    tokenizers = {"student": student_tokenizer, "teacher": teacher_tokenizer}
    for side, tok in tokenizers.items():
        if not hasattr(tok, "encode_batch"):
            raise InputTypeError(f"{side}_tokenizer: expected a tokenizers.Tokenizer (kdjax.tokenizer.load_tokenizer), "
                                 f"got {type(tok).__name__}")
        try:
            eos_id(tok)
        except InputError as e:
            raise InputError(f"{side}_tokenizer: {e}") from None
    for name, value in (("max_bytes", max_bytes), ("max_teacher_length", max_teacher_length)):
        if value is not None:
            check_count(name, value)
    if max_teacher_length is not None and length > max_teacher_length:
        raise InputError(f"length: the teacher evaluates on windows of {length} of its tokens, more than its "
                         f"max_position_embeddings ({max_teacher_length}); expected a smaller length")
    if path is not None and os.fspath(path).endswith(".npz"):
        raise InputError(f"{path}: holds token ids already; expected a .txt corpus to tokenize twice")
    name, train, val, _ = text_documents(path, modules=modules, utf8=True)
    if max_bytes is not None:
        train, val = _first(train, max_bytes), _first(val, max(length + 1, max_bytes // 10))
    train, val = ([decode_text(d, name) for d in docs] for docs in (train, val))
    sides = {side: {split: _stream(tok, docs) for split, docs in (("train", train), ("validation", val))}
             for side, tok in tokenizers.items()}
    windows = {side: [_windows(sides[side][split][0], length, name, f"{side} {split}")
                      for split in ("train", "validation")] for side in sides}
    per_byte = {side: _tokens_per_byte(sides[side]["validation"][0], sides[side]["validation"][2], eos_id(tok), length)
                for side, tok in tokenizers.items()}
    s_ids, s_starts, s_ends = sides["student"]["train"]
    t_ids, t_starts, t_ends = sides["teacher"]["train"]
    spans, n = _teacher_windows(s_starts, s_ends, t_starts, t_ends, length)
    width = max(1, max(b - a - 1 for a, b in spans))
    if max_teacher_length is not None and width > max_teacher_length:
        fits = max(1, int(length * max_teacher_length / width))  # a guide: the length scaled to the widest span
        raise InputError(f"context: the teacher's tokenization of a {length}-token window takes up to {width} "
                         f"positions, more than its max_position_embeddings ({max_teacher_length}); expected a "
                         f"smaller context (about {fits} student tokens) or a student tokenizer "
                         f"of shorter tokens (a smaller vocabulary)")
    teacher_x, teacher_y = np.zeros((n, width), np.int32), np.zeros((n, width), np.int32)
    s_off, t_off = np.zeros((n, length, 2), np.int64), np.zeros((n, width, 2), np.int64)
    t_where = np.zeros((n, width), bool)
    for w, (a, b) in enumerate(spans):
        m = max(b - a - 1, 0)
        teacher_x[w, :m], teacher_y[w, :m] = t_ids[a:a + m], t_ids[a + 1:a + 1 + m]
        t_off[w, :m, 0], t_off[w, :m, 1], t_where[w, :m] = t_starts[a + 1:b], t_ends[a + 1:b], True
        ys = slice(w * length + 1, (w + 1) * length + 1)
        s_off[w, :, 0], s_off[w, :, 1] = s_starts[ys], s_ends[ys]
    alignment = alignment_indices(s_off, t_off, np.ones((n, length), bool), t_where,
                                  skip_student_eos=False, skip_teacher_eos=False)
    # a group compares the same bytes when both sides end it at one byte (the last group may be a
    # leftover that does not) and begin it at one: the first begins after each side's first input
    ends = {side: _group_ends(off, alignment[f"{side}_index"], alignment[f"{side}_member"])
            for side, off in (("student", s_off), ("teacher", t_off))}
    alignment["group_valid"] &= ends["student"] == ends["teacher"]
    first_t = np.array([t_ends[a] if b > a else -1 for a, b in spans])
    alignment["group_valid"][:, 0] &= s_ends[np.arange(n) * length] == first_t
    (sx, sy), (svx, svy) = windows["student"]
    (tx, ty), (tvx, tvy) = windows["teacher"]
    sizes = {side: int(tok.get_vocab_size()) for side, tok in tokenizers.items()}
    return PairedText(Dataset(f"{name}, {sizes['student']}-token tokenizer", sx, sy, svx, svy, sizes["student"]),
                      Dataset(f"{name}, the teacher's {sizes['teacher']}-token tokenizer", tx, ty, tvx, tvy,
                              sizes["teacher"]),
                      {"teacher_x": teacher_x, "teacher_y": teacher_y, **alignment}, per_byte)
