"""A teacher of another tokenizer on disk, for ULD (``kdjax.crosstok``): per student window,
the teacher's merged probabilities of each byte-aligned group, sorted, the top k kept
(``kdjax.crosstok.teacher_sorted_groups``), with each group's whole merged mass. A student
trained from it (``batch["teacher_sorted"]``, ``kdjax.crosstok.ULD``) needs no teacher; with
``k`` = the teacher's vocabulary its loss is ULD's exactly.
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.crosstok import MERGES, teacher_sorted_groups
from kdjax.crosstok.align import ALIGNMENT, check_alignment
from kdjax.errors import InputError, InputTypeError, check_count
from kdjax.offline.store import (ULD_FORMAT, _check_directory, _check_metadata, _read_manifest, _read_shards,
                                 _teacher_vocab, _write_shards, fingerprint)

__all__ = ["write_uld_cache", "read_uld_cache", "PAIRED_KEYS"]

PAIRED_KEYS = ("teacher_x", "teacher_y") + ALIGNMENT  # what a cache is built for (paired_text's extra)


def _paired(extra) -> dict:
    """``extra``'s arrays of ``PAIRED_KEYS`` as NumPy, refused unless they are all there with
    one row per window."""
    if not isinstance(extra, dict) or any(key not in extra for key in PAIRED_KEYS):
        raise InputError(f"extra: expected kdjax.crosstok.text.paired_text(...).extra (keys {PAIRED_KEYS}), got "
                         f"{sorted(extra) if isinstance(extra, dict) else type(extra).__name__}")
    arrays = {key: np.asarray(extra[key]) for key in PAIRED_KEYS}
    rows = {len(a) if a.ndim else 0 for a in arrays.values()}
    if len(rows) != 1 or 0 in rows:
        raise InputError(f"extra: expected the same number (>= 1) of rows in every array, got "
                         f"{ {key: list(a.shape) for key, a in arrays.items()} }")
    if not np.issubdtype(arrays["teacher_x"].dtype, np.integer) or arrays["teacher_x"].ndim != 2:
        raise InputTypeError(f"extra: teacher_x: expected integer [rows, length], got "
                             f"{arrays['teacher_x'].dtype}{list(arrays['teacher_x'].shape)}")
    return arrays


def paired_sha256(extra) -> str:
    """sha256 over the teacher's tokens and the alignment (names, dtypes, shapes, bytes):
    which windows and groups a cache holds.

    Args:
      extra: ``paired_text(...).extra`` (its ``PAIRED_KEYS`` are hashed).

    Returns:
      The hex digest.

    Raises:
      InputError: ``extra`` without those arrays, or with rows that disagree.
    """
    h = hashlib.sha256()
    for key, a in _paired(extra).items():
        h.update(f"{key}{a.dtype}{list(a.shape)}".encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def write_uld_cache(directory, teacher, variables, extra, k: int | None = None, *, temperature: float = 1.0,
                    merge: str = "observed", batch_size: int = 32, shard_rows: int = 1024, values_dtype=np.float32,
                    metadata: dict | None = None) -> dict:
    """Compute the eval-mode teacher's ``teacher_sorted_groups`` on every window and store them.

    Writes ``directory`` as ``kdjax.offline.write_topk_cache`` does (atomic shards,
    a signed manifest, resumable): ``values`` ``[rows, groups, k]`` (the sorted top k per
    group) and ``mass`` ``[rows, groups]`` float32 (each group's whole merged probability,
    for coverage), the manifest naming ``k``, ``temperature``, ``merge``, the teacher's
    ``fingerprint`` and ``paired_sha256(extra)``.

    Args:
      directory: the cache folder (created; a partial cache of the same build is resumed).
      teacher: a linen module, ``teacher.apply(variables, tokens)`` -> ``[batch, length, V_t]``.
      variables: its variables.
      extra: ``paired_text(...).extra``: ``teacher_x``/``teacher_y`` and the alignment arrays.
      k: probabilities kept per group, ``1 <= k <= V_t``; None: all ``V_t`` (exact).
      temperature: the teacher's softmax temperature, positive.
      merge: ``"observed"`` or ``"bayesian"`` (``uld_loss_aligned``).
      batch_size: windows per teacher call; shard_rows: windows per shard file.
      values_dtype: float32 or float16.
      metadata: a JSON object stored in the manifest.

    Returns:
      The manifest (a dict).

    Raises:
      InputError / InputTypeError: an argument out of range or of the wrong type (checked
        before anything is written); non-finite teacher logits; a cache of another build
        in ``directory``.
    """
    check_count("batch_size", batch_size)
    check_count("shard_rows", shard_rows)
    if merge not in MERGES:
        raise InputError(f"merge: expected one of {MERGES}, got {merge!r}")
    from kdjax.losses import check_temperature

    check_temperature(temperature, "temperature")
    if values_dtype not in (np.float32, np.float16, "float32", "float16"):
        raise InputError(f"values_dtype: expected float32 or float16, got {values_dtype!r}")
    arrays = _paired(extra)
    directory = os.fspath(directory)
    _check_directory(directory)
    metadata = _check_metadata(metadata)
    tx = arrays["teacher_x"]
    vocab = _teacher_vocab(teacher, variables, tx.shape[1])
    k = vocab if k is None else k
    check_count("k", k)
    if k > vocab:
        raise InputError(f"k: expected at most the teacher's vocabulary ({vocab}), got {k}")
    for key in ("teacher_x", "teacher_y"):
        lo, hi = int(arrays[key].min()), int(arrays[key].max())
        if lo < 0 or hi >= vocab:
            raise InputError(f"extra: {key}: expected ids in [0, {vocab}) (the teacher's vocabulary), got [{lo}, {hi}]")
    if arrays["teacher_y"].shape != tx.shape:
        raise InputError(f"extra: teacher_y: expected shape {list(tx.shape)} (teacher_x's), got "
                         f"{list(arrays['teacher_y'].shape)}")
    # concrete here (inside the jitted pass below the ranges could not be checked)
    check_alignment({key: arrays[key] for key in ALIGNMENT}, None, (*tx.shape, vocab), None, arrays["teacher_y"])
    rows, groups = arrays["group_valid"].shape
    itemsize = np.dtype(values_dtype).itemsize
    want = {"format": ULD_FORMAT, "k": int(k), "rows": int(rows), "groups": int(groups),
            "shard_rows": int(shard_rows), "values_dtype": np.dtype(values_dtype).name,
            "temperature": float(temperature), "merge": merge, "teacher": fingerprint(teacher, variables),
            "tokens": paired_sha256(arrays), "bytes_per_group": int(k) * itemsize + 4, "metadata": metadata}

    @jax.jit
    def predict(v, batch):
        logits = teacher.apply(v, batch["teacher_x"])
        full = teacher_sorted_groups(logits, batch["teacher_y"], {key: batch[key] for key in ALIGNMENT},
                                     temperature=temperature, merge=merge)
        return full[..., :k], jnp.sum(full, axis=-1), jnp.all(jnp.isfinite(logits))

    def compute(start, stop):
        parts = [predict(variables, {key: a[i:min(i + batch_size, stop)] for key, a in arrays.items()})
                 for i in range(start, stop, batch_size)]
        if not all(bool(finite) for _, _, finite in parts):
            raise InputError(f"teacher: expected finite logits, got NaN or infinite ones on windows [{start}, "
                             f"{stop}); nothing is written from there on (a cache never holds NaN)")
        values = np.concatenate([np.asarray(v) for v, _, _ in parts]).astype(values_dtype)
        mass = np.minimum(np.concatenate([np.asarray(m) for _, m, _ in parts]).astype(np.float32), 1.0)
        return {"values": np.clip(values, 0, 1), "mass": mass}

    return _write_shards(directory, want, rows, shard_rows, compute, lambda: {"vocab": vocab})


def read_uld_cache(directory, *, extra=None, teacher=None, variables=None, temperature=None, merge=None):
    """Read a finished ULD cache, every byte verified before any number is returned.

    The manifest's checksum, keys and shard paths; each shard's checksum, arrays and values
    (probabilities in [0, 1], descending per group). Given ``extra`` (``paired_text``'s), a
    cache of other windows or groups is refused; given ``teacher`` and ``variables``, one of
    another teacher; given ``temperature`` / ``merge``, one written at others.

    Args:
      directory: the cache folder (``write_uld_cache``, ``kdjax teacher-logits --method uld``).
      extra, teacher, variables, temperature, merge: optional, what it must have been built for.

    Returns:
      ``(values [rows, groups, k], mass [rows, groups], manifest)``.

    Raises:
      InputError: anything above that does not hold, in one line naming the file; an
        unfinished cache.
    """
    directory = os.fspath(directory)
    m = _read_manifest(directory, ULD_FORMAT)
    if extra is not None and paired_sha256(extra) != m["tokens"]:
        raise InputError(f"{directory}: built for other windows (another text, tokenizer, context or teacher "
                         f"tokenizer)")
    if teacher is not None and fingerprint(teacher, variables) != m["teacher"]:
        raise InputError(f"{directory}: built with another teacher")
    for name, given in (("temperature", temperature), ("merge", merge)):
        if given is not None and given != m[name]:
            raise InputError(f"{directory}: written at {name} {m[name]!r}, expected {given!r}")
    arrays, m = _read_shards(directory, ULD_FORMAT, "the same kdjax teacher-logits --method uld command (or "
                                                    "write_uld_cache)")
    return arrays["values"], arrays["mass"], m
