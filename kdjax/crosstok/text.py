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
import os

import numpy as np

from kdjax.crosstok.align import alignment_indices
from kdjax.data import Dataset, TEXT_MODULES, decode_text, text_documents
from kdjax.data.corpus import _first
from kdjax.errors import InputError, check_count
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


def _stream(tokenizer, docs: list[str], base_chars: int = 0):
    """``(ids, starts, ends)`` of the documents encoded one after another, each followed by EOS."""
    eos, ids, starts, ends, base = eos_id(tokenizer), [], [], [], base_chars
    for text, enc in zip(docs, tokenizer.encode_batch(docs)):
        off = np.asarray(enc.offsets, np.int64).reshape(-1, 2) + base
        ids.append(np.asarray(enc.ids + [eos], np.int64))
        starts.append(np.append(off[:, 0], base + len(text)))
        ends.append(np.append(off[:, 1], base + len(text) + 1))
        base += len(text) + 1
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return cat(ids), cat(starts), cat(ends)


def _byte_prefix(docs: list[str]) -> np.ndarray:
    """``prefix[c]``: UTF-8 bytes before character ``c`` of the joined documents (EOS: 0 bytes)."""
    widths = []
    for text in docs:
        cp = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        widths += [1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000), np.zeros(1, np.int64)]
    return np.concatenate([np.zeros(1, np.int64)] + [w.astype(np.int64) for w in widths]).cumsum()


def _windows(ids: np.ndarray, length: int, name: str, what: str):
    n = (len(ids) - 1) // length
    if n < 1:
        raise InputError(f"text {name}: expected at least {length + 1} {what} tokens (one window), got {len(ids)}")
    return ids[:n * length].reshape(n, length).astype(np.int32), ids[1:n * length + 1].reshape(n, length).astype(
        np.int32)


def _tokens_per_byte(ends: np.ndarray, prefix: np.ndarray, length: int) -> float:
    """Targets per byte over the packed windows: window w's targets cover the characters from
    the end of its first input to the end of its last target."""
    n = (len(ends) - 1) // length
    covered = prefix[ends[n * length]] - prefix[ends[0]]
    return n * length / max(int(covered), 1)


def _teacher_windows(s_starts, s_ends, t_ids, t_starts, t_ends, length: int):
    """Per student window (its ``length + 1`` tokens' text): the teacher's tokens fully inside it."""
    n = (len(s_starts) - 1) // length
    first, last = s_starts[np.arange(n) * length], s_ends[np.arange(n) * length + length]
    a = np.searchsorted(t_starts, first, side="left")
    b = np.searchsorted(t_ends, last, side="right")
    return [(int(i), int(j)) for i, j in zip(a, b)], n


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
    if path is not None and os.fspath(path).endswith(".npz"):
        raise InputError(f"{path}: holds token ids already; expected a .txt corpus to tokenize twice")
    name, train, val, _ = text_documents(path, modules=modules, utf8=True)
    if max_bytes is not None:
        train, val = _first(train, max_bytes), _first(val, max(length + 1, max_bytes // 10))
    train, val = ([decode_text(d, name) for d in docs] for docs in (train, val))
    sides = {}
    for side, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        sides[side] = {split: _stream(tok, docs) for split, docs in (("train", train), ("validation", val))}
    windows = {side: [_windows(sides[side][split][0], length, name, f"{side} {split}")
                      for split in ("train", "validation")] for side in sides}
    prefix = _byte_prefix(val)
    per_byte = {side: _tokens_per_byte(sides[side]["validation"][2], prefix, length) for side in sides}
    s_ids, s_starts, s_ends = sides["student"]["train"]
    t_ids, t_starts, t_ends = sides["teacher"]["train"]
    spans, n = _teacher_windows(s_starts, s_ends, t_ids, t_starts, t_ends, length)
    width = max(1, max(b - a - 1 for a, b in spans))
    if max_teacher_length is not None and width > max_teacher_length:
        raise InputError(f"context: the teacher's tokenization of a {length}-token window takes up to {width} "
                         f"positions, more than its max_position_embeddings ({max_teacher_length}); expected a "
                         f"smaller context")
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
    # the first group's text begins after each side's first input token: where those end apart,
    # the two sides' first targets start at other characters and the group compares other text
    first_s = s_ends[np.arange(n) * length]
    first_t = np.array([t_ends[a] if b > a else -1 for a, b in spans])
    alignment["group_valid"][:, 0] &= first_s == first_t
    (sx, sy), (svx, svy) = windows["student"]
    (tx, ty), (tvx, tvy) = windows["teacher"]
    sizes = {side: int(tok.get_vocab_size()) for side, tok in (("student", student_tokenizer),
                                                               ("teacher", teacher_tokenizer))}
    return PairedText(Dataset(f"{name}, {sizes['student']}-token tokenizer", sx, sy, svx, svy, sizes["student"]),
                      Dataset(f"{name}, the teacher's {sizes['teacher']}-token tokenizer", tx, ty, tvx, tvy,
                              sizes["teacher"]),
                      {"teacher_x": teacher_x, "teacher_y": teacher_y, **alignment}, per_byte)
