"""Real tokenizers for the language-model path, through the ``tokenizers`` library (the
``hf`` extra; never a download): a local ``tokenizer.json`` (``load_tokenizer``), or a
byte-level BPE trained offline on the user's text (``train_bpe``). ``kdjax.data.text(...,
tokenizer=)`` tokenises a corpus with one; ``check_vocabulary`` refuses a tokenizer and
models that do not share a vocabulary; ``content_sha256`` and ``same_tokenizer`` compare
tokenizers by content (their canonical JSON), not by vocabulary size.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable

from kdjax.errors import InputError, InputTypeError

__all__ = ["EOS", "train_bpe", "load_tokenizer", "check_vocabulary", "eos_id", "content_sha256", "same_tokenizer"]

EOS = "<|endoftext|>"
EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<|im_end|>")  # what eos_id looks for, in this order


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise InputError("tokenizer: needs the tokenizers package (pip install 'kdjax[hf]')") from None
    return tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | os.PathLike | None = None, *,
              split_words: bool = True):
    """Train a byte-level BPE, ``EOS`` its token 0 and every byte in its alphabet (any text
    encodes). Deterministic for the same texts.

    Args:
      texts: the training text.
      vocab_size: the most tokens (fewer if the text has fewer merges); at least 257.
      path: where to write it as ``tokenizer.json``, or None.
      split_words: GPT-2's pre-split into words first (the default); False: merges may cross
        spaces and punctuation, so tokens straddle words (another segmentation of the same text).

    Returns:
      The ``tokenizers.Tokenizer``.

    Raises:
      InputError: ``vocab_size`` not an int of at least 257.
    """
    tk = _tokenizers()
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise InputError(f"vocab_size: expected an int >= 257 (the 256 bytes and {EOS}), got {vocab_size!r}")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=bool(split_words))
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if path is not None:
        tok.save(os.fspath(path))
    return tok


def load_tokenizer(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json`` (or a folder holding one).

    Args:
      path: the file, or a folder with a ``tokenizer.json``.

    Returns:
      The ``tokenizers.Tokenizer``.

    Raises:
      InputError: a missing or unreadable file, one that is not a tokenizer's JSON, or a
        tokenizer with an empty vocabulary (one line, whatever the ``tokenizers`` library
        raised, its Rust panics included).
      InputTypeError: ``path`` is not a path.
    """
    tk = _tokenizers()
    try:
        path = os.fspath(path)
    except TypeError:
        raise InputTypeError(f"tokenizer: expected a path to a tokenizer.json, got {type(path).__name__}") from None
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    try:
        tok = tk.Tokenizer.from_file(path)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # tokenizers raises Exception, or a PanicException (a BaseException) from Rust
        raise InputError(f"{path}: expected a tokenizer.json file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]})") from None
    if tok.get_vocab_size() < 1:
        raise InputError(f"{path}: expected a tokenizer with a vocabulary, got one of 0 tokens")
    return tok


def _as_tokenizer(name: str, tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    if not hasattr(tokenizer, "to_str"):
        raise InputTypeError(f"{name}: expected a tokenizers.Tokenizer or a path to a tokenizer.json, got "
                             f"{type(tokenizer).__name__}")
    return tokenizer


def content_sha256(tokenizer) -> str:
    """The sha256 (hex) of a tokenizer's canonical JSON, ``tokenizer.to_str()``: equal for
    the same tokenizer however its file is formatted (indentation, key order), different
    for another vocabulary, merges, normaliser or special tokens even of the same size.
    The canonical JSON is the ``tokenizers`` library's own: compare hashes made with the
    same library version.

    Args:
      tokenizer: a ``tokenizers.Tokenizer``, or a path to a ``tokenizer.json`` (or its folder).

    Returns:
      64 hex digits.

    Raises:
      InputError / InputTypeError: as ``load_tokenizer``; an object that is not a tokenizer.
    """
    return hashlib.sha256(_as_tokenizer("tokenizer", tokenizer).to_str().encode("utf-8")).hexdigest()


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers have the same content.

    Args:
      a, b: ``tokenizers.Tokenizer`` objects or paths.

    Returns:
      ``content_sha256(a) == content_sha256(b)``.
    """
    return content_sha256(_as_tokenizer("a", a)) == content_sha256(_as_tokenizer("b", b))


def eos_id(tokenizer) -> int:
    """The end-of-text token, appended after every document.

    Args:
      tokenizer: a ``tokenizers.Tokenizer``.

    Returns:
      The id of the first of ``EOS_NAMES`` it has (``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``
      (Llama 3), ``<|im_end|>``).

    Raises:
      InputError: it has none of them.
    """
    for name in EOS_NAMES:
        i = tokenizer.token_to_id(name)
        if i is not None:
            return int(i)
    raise InputError(f"tokenizer: expected an end-of-text token (one of {', '.join(EOS_NAMES)}), found none")


def check_vocabulary(tokenizer, *models) -> int:
    """The tokenizer's vocabulary size, after checking every model's ``vocab_size``.

    Args:
      tokenizer: a ``tokenizers.Tokenizer``.
      *models: models with a ``vocab_size``: they must share one, at least the tokenizer's (an
        embedding may be padded beyond it, as Qwen's is).

    Returns:
      The tokenizer's vocabulary size, an int.

    Raises:
      InputTypeError: ``tokenizer`` is not a ``tokenizers.Tokenizer``.
      InputError: the models' sizes differ or one is below the tokenizer's.
    """
    if not hasattr(tokenizer, "get_vocab_size"):
        raise InputTypeError(f"tokenizer: expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    size = int(tokenizer.get_vocab_size())
    sizes = {type(m).__name__ + f"#{i}": int(m.vocab_size) for i, m in enumerate(models)}
    if len(set(sizes.values())) > 1:
        raise InputError(f"vocabulary: expected teacher and student to share one, got vocab sizes {sorted(sizes.values())}")
    small = [v for v in sizes.values() if v < size]
    if small:
        raise InputError(f"vocabulary: the tokenizer has {size} tokens, the model's embedding only {small[0]}")
    return size
