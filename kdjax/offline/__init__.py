"""Offline teacher signals on disk: a teacher's top-k log-probabilities per token instead of
its full distribution (what DistillKit and MaxText store to train many students from one
teacher run), and its completions of a prompt set. I/O only: the sparse losses are
``kdjax.losses.topk_kl``/``topk_distillation_loss`` (also importable from here, as before) and
the objective ``kdjax.objectives.TopKKD``.

* ``write_topk_cache`` / ``read_topk_cache``: the teacher's top-k on a token set, computed
  once and stored on disk in shards with a manifest (atomic, checksummed, resumable),
  read back for any number of student runs.
* ``write_generations`` / ``read_generations``: the teacher's completions of a prompt set
  (sequence-level KD), stored the same way.
* ``check_cache_tokenizer``: whether a cache was built with a given tokenizer (by content).

A cache's ``manifest.json`` carries its own sha256 (over its canonical JSON) and every
shard's; each read verifies both, checks every key, type and shard path (inside the cache,
links resolved) and each shard's arrays before any number is used.
"""


from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError, check_count
from kdjax.losses import MISSING, topk_distillation_loss, topk_kl, topk_logprobs
from kdjax.objectives import TopKKD
from kdjax.offline.store import (  # noqa: F401  (the private names: importable from here, as before)
    _CHECKSUM, FORMAT, GENERATIONS_FORMAT, _canonical, _check_directory, _check_metadata, _check_rows, _read_manifest,
    _read_shards, _sha, _shard_bytes, _teacher_vocab, _write_manifest, _write_shards, fingerprint)

__all__ = ["MISSING", "topk_logprobs", "topk_kl", "topk_distillation_loss", "TopKKD", "fingerprint",
           "write_topk_cache", "read_topk_cache", "write_generations", "read_generations", "check_cache_tokenizer",
           "write_uld_cache", "read_uld_cache"]


def write_topk_cache(directory, teacher, variables, tokens, k: int, *, batch_size: int = 32,
                     shard_rows: int = 1024, values_dtype=np.float32, metadata: dict | None = None) -> dict:
    """Compute the eval-mode teacher's ``topk_logprobs`` on ``tokens`` and store them.

    Writes ``directory``: ``shard-NNNNN.npz`` files (``values`` ``[rows, length, k]`` in
    ``values_dtype``, ``indices`` int32) and ``manifest.json`` (k, vocabulary, shapes, the
    teacher's ``fingerprint``, the tokens' sha256, ``bytes_per_token`` =
    ``k * (itemsize(values_dtype) + 4)``, the caller's JSON ``metadata`` and each shard's
    sha256), the manifest signed with its own checksum. Every file is written atomically and
    the manifest after each shard, so a killed build resumes where it stopped (same teacher,
    tokens, k and metadata; anything else is refused). Pass the tokenizer's
    ``tokenizer_sha256`` in ``metadata`` so that readers can ``check_cache_tokenizer``.

    Args:
        directory: the cache folder (created; a finished or partial cache of the same
            build in it is resumed).
        teacher: a linen module called as ``teacher.apply(variables, tokens)`` -> logits
            ``[batch, length, vocab]``.
        variables: the teacher's variables.
        tokens: integer ``[rows, length]``, ids in ``[0, vocab)``, at least one row.
        k: how many log-probabilities to keep per position, ``1 <= k <= vocab``.
        batch_size: rows per teacher call (>= 1).
        shard_rows: rows per shard file (>= 1).
        values_dtype: float32 or float16.
        metadata: a JSON object stored in the manifest (and covered by its checksum).

    Returns:
        The manifest (a dict).

    Raises:
        InputError / InputTypeError: any argument above out of range or of the wrong type,
            checked before anything is written; the teacher's logits not finite on some
            rows (nothing is written for those rows, or after them: a cache never holds
            NaN); a cache of another build in ``directory``.
    """
    check_count("k", k)
    check_count("batch_size", batch_size)
    check_count("shard_rows", shard_rows)
    tokens = _check_rows("tokens", tokens)
    if values_dtype not in (np.float32, np.float16, "float32", "float16"):
        raise InputError(f"values_dtype: expected float32 or float16, got {values_dtype!r}")
    directory = os.fspath(directory)
    _check_directory(directory)
    metadata = _check_metadata(metadata)
    vocab = _teacher_vocab(teacher, variables, tokens.shape[1])
    if k > vocab:
        raise InputError(f"k: expected at most the teacher's vocabulary ({vocab}), got {k}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab:
        raise InputError(f"tokens: expected ids in [0, {vocab}) (the teacher's vocabulary), got ids in [{lo}, {hi}]")
    want = {"format": FORMAT, "k": int(k), "rows": int(tokens.shape[0]), "length": int(tokens.shape[1]),
            "shard_rows": int(shard_rows), "values_dtype": np.dtype(values_dtype).name,
            "teacher": fingerprint(teacher, variables), "tokens": _sha(np.ascontiguousarray(tokens).tobytes()),
            "bytes_per_token": int(k) * (np.dtype(values_dtype).itemsize + 4), "metadata": metadata}

    @jax.jit
    def predict(v, x):
        logits = teacher.apply(v, x)
        return *topk_logprobs(logits, k), jnp.all(jnp.isfinite(logits))

    def compute(start, stop):
        rows = tokens[start:stop]
        parts = [predict(variables, jnp.asarray(rows[i:i + batch_size], jnp.int32))
                 for i in range(0, len(rows), batch_size)]
        if not all(bool(finite) for _, _, finite in parts):
            raise InputError(f"teacher: expected finite logits, got NaN or infinite ones on token rows [{start}, "
                             f"{stop}); nothing is written from there on (a cache never holds NaN)")
        with np.errstate(over="ignore"):  # float16 out of range: refused just below
            values = np.concatenate([np.asarray(v) for v, _, _ in parts]).astype(values_dtype)
        if not np.isfinite(values).all():
            raise InputError(f"values_dtype: expected a dtype that holds the teacher's log-probabilities, got "
                             f"{np.dtype(values_dtype).name}, below whose range they fall on token rows [{start}, "
                             f"{stop}); use float32")
        return {"values": values, "indices": np.concatenate([np.asarray(i) for _, i, _ in parts]).astype(np.int32)}

    return _write_shards(directory, want, tokens.shape[0], shard_rows, compute, lambda: {"vocab": vocab})




def read_topk_cache(directory, *, tokens=None, teacher=None, variables=None):
    """Read a finished top-k cache, every byte of it verified before any number is returned.

    The manifest's own checksum, then its keys, types and shard paths (each a file inside
    ``directory``, links resolved), then each shard's checksum, arrays (names, shapes,
    dtypes) and values (ids in ``[0, vocab)``, distinct per position; log-probabilities
    finite, ``<= 0``, summing to at most 1). Given ``tokens`` (and ``teacher`` with its
    ``variables``), a cache built for other tokens (another teacher) is refused: never a
    student trained on the wrong teacher's numbers.

    Args:
        directory: the cache folder (``write_topk_cache``, ``kdjax teacher-logits``).
        tokens: optional, the ``[rows, length]`` tokens it must have been built for.
        teacher, variables: optional, the teacher it must have been built with.

    Returns:
        ``(values [rows, length, k], indices [rows, length, k], manifest)``.

    Raises:
        InputError: anything above that does not hold, in one line naming the file;
            an unfinished cache; a cache of an older kdjax (unsigned: rebuild it).
    """
    directory = os.fspath(directory)
    m = _read_manifest(directory)
    if tokens is not None and (np.shape(tokens) != (m["rows"], m["length"])
                               or _sha(np.ascontiguousarray(np.asarray(tokens)).tobytes()) != m["tokens"]):
        raise InputError(f"{directory}: built for other tokens (another data set, tokenizer or length)")
    if teacher is not None and fingerprint(teacher, variables) != m["teacher"]:
        raise InputError(f"{directory}: built with another teacher")
    arrays, m = _read_shards(directory, FORMAT, "write_topk_cache")
    return arrays["values"], arrays["indices"], m


def check_cache_tokenizer(manifest: dict, tokenizer) -> None:
    """Refuse a cache built with another tokenizer, compared by content, not by size.

    The cache records the sha256 of its tokenizer's canonical JSON (``tokenizer.to_str()``,
    the ``tokenizers`` library's own serialisation: equal however the file is formatted) as
    ``metadata["tokenizer_sha256"]`` (``kdjax teacher-logits`` does; a library caller passes
    it in ``write_topk_cache``'s ``metadata``). Two tokenizers of the same size with other
    merges, vocabularies or special tokens differ here.

    Args:
        manifest: a cache's manifest, as ``read_topk_cache`` / ``read_generations`` return it
            (checksum verified there).
        tokenizer: a ``tokenizers.Tokenizer``, or a path to a ``tokenizer.json`` (or its folder).

    Raises:
        InputError: the manifest records no tokenizer, or another one (both hashes named).
        InputTypeError: ``manifest`` is not a dict or ``tokenizer`` not a tokenizer.
    """
    if not isinstance(manifest, dict):
        raise InputTypeError(f"manifest: expected a cache's manifest (a dict, read_topk_cache's third result), got "
                             f"{type(manifest).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)):
        from kdjax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    if not callable(getattr(tokenizer, "to_str", None)):
        raise InputTypeError(f"tokenizer: expected a tokenizers.Tokenizer or a path to a tokenizer.json, got "
                             f"{type(tokenizer).__name__}")
    want = (manifest.get("metadata") or {}).get("tokenizer_sha256")
    if want is None:
        raise InputError("manifest: expected a cache that records its tokenizer (metadata tokenizer_sha256), got "
                         "none; rebuild it with kdjax teacher-logits --overwrite")
    got = _sha(tokenizer.to_str().encode("utf-8"))
    if got != want:
        raise InputError(f"tokenizer: expected the cache's tokenizer (content sha256 {want}), got another (content "
                         f"sha256 {got})")


# teacher generations (SeqKD): kdjax/offline/generations.py, importable from here as before
from kdjax.offline.generations import read_generations, write_generations  # noqa: E402

# a teacher of another tokenizer, for ULD: kdjax/offline/uld.py, importable from here
from kdjax.offline.uld import read_uld_cache, write_uld_cache  # noqa: E402
