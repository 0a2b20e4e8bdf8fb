"""Text corpora for the language-model demos: ``text`` (byte windows of a corpus) and
``text_documents`` (its documents), by default from the running Python's standard library;
``decode_text`` for a document's bytes. Every name is importable from ``kdjax.data``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from kdjax.data import Dataset
from kdjax.errors import InputError, check_count


# The default text corpus: these modules of the running Python's standard library, in this
# order (top-level ``<name>.py`` files; a name missing from some Python version is skipped).
TEXT_MODULES = ("abc", "argparse", "ast", "base64", "bisect", "calendar", "colorsys", "contextlib", "copy",
                "csv", "dataclasses", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "heapq",
                "hmac", "inspect", "keyword", "linecache", "numbers", "operator", "optparse", "pprint", "queue",
                "random", "reprlib", "sched", "secrets", "shlex", "shutil", "statistics", "string", "textwrap",
                "threading", "timeit", "token", "tokenize", "traceback", "types", "typing", "uuid", "warnings",
                "weakref")


def _windows(tokens: np.ndarray, length: int, name: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of ``length + 1`` tokens: inputs ``[:-1]``, next-token labels ``[1:]``;
    ``InputError`` (naming the corpus ``name`` and its ``what`` split) for less than one window."""
    n = (len(tokens) - 1) // length
    if n < 1:
        raise InputError(f"text {name}: expected at least {length + 1} {what} tokens (one window), got {len(tokens)}")
    x = tokens[: n * length].reshape(n, length)
    y = tokens[1: n * length + 1].reshape(n, length)
    return x.astype(np.int32), y.astype(np.int32)


def text(length: int = 64, path: str | os.PathLike | None = None, *, modules=TEXT_MODULES,
         validation_every: int = 10, max_bytes: int | None = None, tokenizer=None) -> Dataset:
    """Language-model data, no download: byte-level (vocabulary 256), or tokenised.

    By default the corpus is the Python standard library's own source: the files
    ``<stdlib>/<name>.py`` for ``name`` in ``modules`` (``TEXT_MODULES``, ~1.4 MB on
    Python 3.11; the files differ slightly between Python versions, so the numbers do
    too). Every ``validation_every``-th file (in that order) is validation, the rest
    train: a split by file, never inside one. ``path`` replaces it with the user's
    corpus: a ``.txt`` file (its last 10% of bytes are validation) or an ``.npz`` with
    1-D int arrays ``train`` and ``validation`` (any vocabulary: ``max + 1``).
    ``max_bytes`` keeps only the first that many training bytes (and a tenth as many of
    validation). With a ``tokenizer`` (a ``tokenizers.Tokenizer``, ``kdjax.tokenizer``),
    each file (or split) is decoded as UTF-8 and encoded, its end-of-text token appended,
    and the vocabulary is the tokenizer's: the corpus must then be valid UTF-8 (an
    ``InputError`` names the file and the offset of the first invalid byte; nothing is
    replaced by U+FFFD), a ``.txt`` is split at a character boundary and a ``max_bytes``
    cut inside a character drops that partial character. Byte-level (no tokenizer), any
    bytes are tokens, as they are. Each split is cut into non-overlapping windows
    of the concatenated tokens (packed, no padding): ``x`` int32 ``[windows, length]``,
    ``y`` the next tokens (``x`` shifted by one). The returned ``Dataset`` keeps them as
    ``x_train``/``y_train``, ``x_test``/``y_test`` (the validation split),
    ``num_classes`` the vocabulary size.

    Args:
      length: tokens per window; path, modules, validation_every: the corpus (see
        ``text_documents``); max_bytes: a training-byte cap; tokenizer: None (bytes) or one.

    Returns:
      A ``Dataset`` of ``[windows, length]`` int32 windows.

    Raises:
      InputError: a missing, empty or malformed corpus, or (tokenised) one that is not UTF-8.
    """
    check_count("length", length)
    if tokenizer is not None and path is not None and os.fspath(path).endswith(".npz"):
        raise InputError(f"{path}: holds token ids already; expected a .txt corpus to use a tokenizer with")
    name, train, val, vocab = text_documents(path, modules=modules, validation_every=validation_every,
                                             utf8=tokenizer is not None)
    if max_bytes is not None:
        train, val = _first(train, max_bytes), _first(val, max(length + 1, max_bytes // 10))
    if tokenizer is None:
        train, val = (np.concatenate(d) if d else np.zeros(0, np.uint8) for d in (train, val))
    else:
        from kdjax.tokenizer import eos_id

        eos, vocab = eos_id(tokenizer), int(tokenizer.get_vocab_size())
        encode = lambda docs: np.concatenate([np.zeros(0, np.int64)] + [
            np.asarray(e.ids + [eos], np.int64)
            for e in tokenizer.encode_batch([decode_text(d, name) for d in docs])])
        train, val = encode(train), encode(val)
        name += f", {vocab}-token tokenizer"
    (xt, yt), (xv, yv) = _windows(train, length, name, "training"), _windows(val, length, name, "validation")
    return Dataset(name, xt, yt, xv, yv, int(vocab))


def text_documents(path: str | os.PathLike | None = None, *, modules=TEXT_MODULES, validation_every: int = 10,
                   utf8: bool = False):
    """``(name, train documents, validation documents, vocabulary)`` of ``text``'s corpus,
    before tokenisation: lists of byte arrays (of token arrays for an ``.npz``).

    Args:
      path: None (the standard library's source), a ``.txt`` or an ``.npz`` corpus.
      modules, validation_every: as ``text``.
      utf8: the documents are text to decode (for a tokenizer): every file must be valid
        UTF-8, and a ``.txt`` is split into train and validation at a character boundary.
        Without it the bytes are taken as they are (byte-level models).

    Raises:
      InputError: a missing, empty or malformed corpus; with ``utf8``, a file that is not
        UTF-8, naming it and the byte offset of its first invalid byte.
    """
    if path is None:
        import sysconfig

        root = sysconfig.get_paths()["stdlib"]
        files = [os.path.join(root, f"{m}.py") for m in modules]
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise InputError(f"text: none of the {len(modules)} modules was found under {root}")
        chunks = [np.frombuffer(open(f, "rb").read(), np.uint8) for f in files]
        if utf8:
            for f, c in zip(files, chunks):
                _check_utf8(c, f)
        val = [c for i, c in enumerate(chunks) if i % validation_every == validation_every - 1]
        train = [c for i, c in enumerate(chunks) if i % validation_every != validation_every - 1]
        return (f"text (Python {sys.version_info.major}.{sys.version_info.minor} stdlib, {len(files)} files)", train,
                val, 256)
    train, val, vocab = _user_corpus(os.fspath(path), utf8)
    return os.path.basename(os.fspath(path)), [train], [val], vocab


def _check_utf8(data, source: str) -> None:
    """``InputError`` naming ``source`` and the offset of the first byte that is not UTF-8."""
    raw = bytes(data)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{source}: expected UTF-8 text, got the byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                         f"({e.reason}); convert the file to UTF-8, or train byte-level without a tokenizer") from None


def decode_text(document, source: str = "text") -> str:
    """A document of UTF-8 bytes as ``str``, strictly (never a U+FFFD in place of a bad byte).

    A character cut at the document's end (``max_bytes``, ``_first``) is dropped: only its
    first bytes are there. Any other invalid byte is refused.

    Args:
      document: bytes, or a uint8 array (``text_documents``' documents).
      source: the file or corpus named in the error.

    Returns:
      The text.

    Raises:
      InputError: naming ``source`` and the offset of the first invalid byte.
    """
    raw = bytes(document)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.end == len(raw) and e.reason == "unexpected end of data":
            return raw[:e.start].decode("utf-8")
        raise InputError(f"{source}: expected UTF-8 text, got the byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                         f"({e.reason}); convert the file to UTF-8, or train byte-level without a tokenizer") from None


def _first(docs, n: int) -> list:
    """The documents cut to their first ``n`` elements in total."""
    out = []
    for d in docs:
        if n <= 0:
            break
        out.append(d[:n])
        n -= len(out[-1])
    return out


def _user_corpus(path: str, utf8: bool = False):
    if not os.path.isfile(path):
        raise InputError(f"{path}: expected an existing .txt or .npz file, got no such file")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            if not {"train", "validation"} <= set(f.files):
                raise InputError(f"{path}: expected 1-D token arrays 'train' and 'validation', found "
                                 f"{', '.join(f.files) or 'none'}")
            train, val = f["train"], f["validation"]
        for what, arr in (("train", train), ("validation", val)):
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise InputError(f"{path}: expected {what} as 1-D integer token ids, got {arr.dtype} {arr.shape}")
            if len(arr) and arr.min() < 0:
                raise InputError(f"{path}: expected token ids >= 0 in {what}, got {arr.min()}")
        vocab = int(max(train.max(initial=0), val.max(initial=0))) + 1
        return train.astype(np.int64), val.astype(np.int64), vocab
    data = np.frombuffer(open(path, "rb").read(), np.uint8)
    if len(data) == 0:
        raise InputError(f"{path}: expected a non-empty text corpus, got an empty file")
    cut = len(data) - len(data) // 10
    if utf8:
        _check_utf8(data, path)
        while 0 < cut < len(data) and 0x80 <= data[cut] < 0xC0:  # not inside a character
            cut -= 1
    return data[:cut], data[cut:], 256
