"""A teacher's completions of a prompt set on disk (sequence-level KD): ``write_generations`` /
``read_generations``, in the shards and checksummed manifest of ``kdjax.offline.store``.
"""

from __future__ import annotations

import math
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError, check_count
from kdjax.offline.store import (GENERATIONS_FORMAT, _check_directory, _check_metadata, _check_rows, _optional_int,
                                 _read_manifest, _read_shards, _sha, _teacher_vocab, _write_shards, fingerprint)

def write_generations(directory, teacher, variables, prompts, max_new_tokens: int, *, prompt_mask=None, rng=None,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      eos_id: int | None = None, pad_id: int | None = None, batch_size: int = 32,
                      shard_rows: int = 1024, metadata: dict | None = None) -> dict:
    """The teacher's completions of ``prompts`` ``[rows, P]`` (left-padded, ``prompt_mask``),
    generated once (``kdjax.generate``: greedy when ``rng`` is None, else sampled with
    ``temperature``/``top_k``/``top_p``, rows ``[r, r + batch_size)`` with key
    ``fold_in(rng, r)``) and stored as ``write_topk_cache`` stores (shards of ``tokens``
    ``[rows, P + max_new_tokens]`` int32 and ``mask`` bool, a manifest with checksums, the
    teacher's fingerprint, the prompts' sha256 and every option; atomic, resumable, another
    teacher, prompts or option refused). Sequence-level KD (Kim & Rush) trains on them
    (``kdjax.onpolicy.sequence_data``).

    Args:
        directory: the cache folder; teacher, variables: the model and its variables.
        prompts, prompt_mask, max_new_tokens, rng, temperature, top_k, top_p, eos_id, pad_id:
            as ``kdjax.generate``.
        batch_size: rows per generation call; shard_rows: rows per shard (a multiple of it).
        metadata: JSON values stored in the manifest.

    Returns:
        The manifest (a dict, signed on disk with its own checksum).

    Raises:
        InputError / InputTypeError: before anything is written, prompts that are not
            integer ``[rows >= 1, P >= 1]`` ids of the teacher's vocabulary, a
            ``prompt_mask`` of another shape, an ``rng`` that is not a key, a temperature
            that is not finite and ``>= 0``, options or ``metadata`` that are not JSON
            values, counts below 1; a cache of another build in ``directory``.
    """
    from kdjax.generation import rollout

    check_count("max_new_tokens", max_new_tokens)
    check_count("batch_size", batch_size)
    check_count("shard_rows", shard_rows)
    prompts = _check_rows("prompts", prompts)
    mask = np.ones(prompts.shape, bool) if prompt_mask is None else np.asarray(prompt_mask)
    if mask.shape != prompts.shape:
        raise InputError(f"prompt_mask: expected bool {list(prompts.shape)} (the prompts' shape), got "
                         f"{mask.dtype}{list(mask.shape)}")
    mask = mask.astype(bool)
    vocab = _teacher_vocab(teacher, variables, prompts.shape[1])
    lo, hi = int(prompts.min()), int(prompts.max())
    if lo < 0 or hi >= vocab:
        raise InputError(f"prompts: expected ids in [0, {vocab}) (the teacher's vocabulary), got ids in [{lo}, {hi}]")
    typed = jnp.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key)
    if rng is not None and not typed and not (getattr(rng, "dtype", None) == np.uint32 and np.shape(rng) == (2,)):
        raise InputTypeError(f"rng: expected None (greedy) or a jax.random key, got {type(rng).__name__}")
    key_words = None if rng is None else np.asarray(jax.random.key_data(rng) if typed else rng).tolist()
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise InputTypeError(f"temperature: expected a number >= 0, got {temperature!r} ({type(temperature).__name__})")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature: expected a finite number >= 0, got {temperature}")
    top_k, eos_id, pad_id = (_optional_int(name, v) for name, v in (("top_k", top_k), ("eos_id", eos_id),
                                                                    ("pad_id", pad_id)))
    want = {"format": GENERATIONS_FORMAT, "rows": int(prompts.shape[0]), "prompt_length": int(prompts.shape[1]),
            "max_new_tokens": int(max_new_tokens), "shard_rows": int(shard_rows), "batch_size": int(batch_size),
            "teacher": fingerprint(teacher, variables),
            "prompts": _sha(np.ascontiguousarray(prompts.astype(np.int64)).tobytes() + mask.tobytes()),
            "sampling": {"rng": key_words, "temperature": float(temperature), "top_k": top_k,
                         "top_p": None if top_p is None else float(top_p), "eos_id": eos_id, "pad_id": pad_id},
            "metadata": _check_metadata(metadata)}
    _check_directory(os.fspath(directory))

    def compute(start, stop):
        tokens, masks = [], []
        for r in range(start, stop, batch_size):
            e = min(r + batch_size, stop)
            g = rollout(teacher, variables, jnp.asarray(prompts[r:e], jnp.int32), max_new_tokens,
                         rng=None if rng is None else jax.random.fold_in(rng, r), temperature=temperature,
                         top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id, prompt_mask=jnp.asarray(mask[r:e]))
            tokens.append(np.asarray(g.tokens, np.int32))
            masks.append(np.asarray(g.mask))
        return {"tokens": np.concatenate(tokens), "mask": np.concatenate(masks)}

    if shard_rows % batch_size:
        raise InputError(f"shard_rows: expected a multiple of batch_size ({batch_size}) so that every row's key is "
                         f"fixed, got {shard_rows}")
    return _write_shards(os.fspath(directory), want, prompts.shape[0], shard_rows, compute, dict)


def read_generations(directory, *, prompts=None, prompt_mask=None, teacher=None, variables=None):
    """Read a finished generations cache, verified as ``read_topk_cache`` verifies.

    Args:
        directory: the cache folder (``write_generations``).
        prompts, prompt_mask: optional, the prompts it must have been built for.
        teacher, variables: optional, the teacher it must have been built with.

    Returns:
        ``(tokens [rows, P + N] int32, mask [rows, P + N] bool, manifest)``.

    Raises:
        InputError: a manifest or shard that does not verify, other prompts, another
            teacher, an unfinished cache, one line each.
    """
    directory = os.fspath(directory)
    m = _read_manifest(directory, GENERATIONS_FORMAT)
    if prompts is not None:
        p = _check_rows("prompts", prompts)
        mask = np.ones(p.shape, bool) if prompt_mask is None else np.asarray(prompt_mask, bool)
        if _sha(np.ascontiguousarray(p.astype(np.int64)).tobytes() + mask.tobytes()) != m["prompts"]:
            raise InputError(f"{directory}: built for other prompts")
    if teacher is not None and fingerprint(teacher, variables) != m["teacher"]:
        raise InputError(f"{directory}: built with another teacher")
    arrays, m = _read_shards(directory, GENERATIONS_FORMAT, "write_generations")
    return arrays["tokens"], arrays["mask"], m
