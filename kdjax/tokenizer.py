"""Real tokenizers for the language-model path, through the ``tokenizers`` library (the
``hf`` extra; never a download): a local ``tokenizer.json`` (``load_tokenizer``), or a
byte-level BPE trained offline on the user's text (``train_bpe``). ``kdjax.data.text(...,
tokenizer=)`` tokenises a corpus with one; ``check_vocabulary`` refuses a tokenizer and
models that do not share a vocabulary.
"""

from __future__ import annotations

import os
from typing import Iterable

from kdjax.errors import InputError, InputTypeError

__all__ = ["EOS", "train_bpe", "load_tokenizer", "check_vocabulary", "eos_id"]

EOS = "<|endoftext|>"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise InputError("tokenizer: needs the tokenizers package (pip install 'kdjax[hf]')") from None
    return tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | os.PathLike | None = None):
    """A byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` tokens (at most; fewer
    if the text has fewer merges) trained on ``texts``, with ``EOS`` as its token 0 and
    every byte in its alphabet (any text encodes); written to ``path`` as
    ``tokenizer.json`` when given. Deterministic for the same texts."""
    tk = _tokenizers()
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise InputError(f"vocab_size: expected an int >= 257 (the 256 bytes and {EOS}), got {vocab_size!r}")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if path is not None:
        tok.save(os.fspath(path))
    return tok


def load_tokenizer(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json`` (one line if unreadable)."""
    tk = _tokenizers()
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    try:
        return tk.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception type with a long message
        raise InputError(f"{path}: expected a tokenizer.json file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]})") from None


def eos_id(tokenizer) -> int:
    """The id of ``EOS`` (or of ``</s>``), appended after every document."""
    for name in (EOS, "</s>", "<|im_end|>"):
        i = tokenizer.token_to_id(name)
        if i is not None:
            return int(i)
    raise InputError(f"tokenizer: expected an end-of-text token ({EOS!r} or '</s>'), found none")


def check_vocabulary(tokenizer, *models) -> int:
    """The tokenizer's vocabulary size, after checking every model's ``vocab_size``: the
    models must share one, at least the tokenizer's (a model's embedding may be padded
    beyond it, as Qwen's is)."""
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
