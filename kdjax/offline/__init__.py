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

import dataclasses
import hashlib
import io
import json
import math
import numbers
import os
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError, check_count
from kdjax.losses import MISSING, topk_distillation_loss, topk_kl, topk_logprobs
from kdjax.losses.sparse import _check_topk_ids, _check_topk_logprobs
from kdjax.objectives import TopKKD

__all__ = ["MISSING", "topk_logprobs", "topk_kl", "topk_distillation_loss", "TopKKD", "fingerprint",
           "write_topk_cache", "read_topk_cache", "write_generations", "read_generations", "check_cache_tokenizer"]

# ----------------------------------------------------------------------------- the cache on disk

FORMAT = "kdjax-topk/2"  # 2: the manifest carries its own checksum (version 1 did not: refused, rebuild)
GENERATIONS_FORMAT = "kdjax-generations/2"
_CHECKSUM = "manifest_sha256"
_REBUILD = {"kdjax-topk": "rebuild the cache (kdjax teacher-logits --overwrite, or write_topk_cache into a new "
                          "directory)",
            "kdjax-generations": "rebuild it (write_generations into a new directory)"}


def fingerprint(model, variables) -> str:
    """sha256 of a model's configuration and every variable's bytes: which teacher a cache
    was built with."""
    h = hashlib.sha256(repr(model).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        a = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_rows(name: str, tokens) -> np.ndarray:
    """``tokens`` as a NumPy array, refused unless integer ``[rows, length]`` with at least
    one row and one position (a cache of nothing is never written)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise InputError(f"{name}: expected integer [rows, length], got {tokens.dtype}{list(tokens.shape)}")
    if 0 in tokens.shape:
        raise InputError(f"{name}: expected at least one row of at least one token, got shape {list(tokens.shape)}")
    return tokens


def _shard_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _write_shards(directory, want: dict, rows: int, shard_rows: int, compute, extra) -> dict:
    """Write ``compute(start, stop) -> {name: array}`` for every shard of ``rows`` rows to
    ``directory`` (``shard-NNNNN.npz``, each atomic), the manifest ``want | extra() |
    {"shards": [...]}`` after each; resume from the valid shards of a manifest with the same
    ``want`` (anything else is refused, naming what differs)."""
    from kdjax.checkpoint import atomic_write_bytes

    manifest_path = os.path.join(directory, "manifest.json")
    shards = []
    if os.path.exists(manifest_path):
        old = _read_manifest(directory, want["format"])
        if {key: old.get(key) for key in want} != want:
            diff = ", ".join(key for key in want if old.get(key) != want[key])
            raise InputError(f"{directory}: holds a cache built with another {diff}; use a new directory")
        shards = []
        for sh in old["shards"]:  # the valid prefix: a later shard is never kept past a bad one
            if not _shard_ok(directory, sh):
                break
            shards.append(sh)
    for start in range(len(shards) * shard_rows, rows, shard_rows):
        stop = min(start + shard_rows, rows)
        data = _shard_bytes(compute(start, stop))
        name = f"shard-{len(shards):05d}.npz"
        atomic_write_bytes(os.path.join(directory, name), data)
        shards.append({"file": name, "rows": stop - start, "sha256": _sha(data)})
        _write_manifest(directory, want | extra() | {"shards": shards})
    return _read_manifest(directory, want["format"])


def _read_shards(directory, fmt: str, rerun: str):
    """``({name: concatenated array}, manifest)`` of a finished cache, every shard verified:
    its checksum, its arrays' names, shapes and dtypes, and (top-k) their values."""
    m = _read_manifest(directory, fmt)
    done = sum(sh["rows"] for sh in m["shards"])
    if done != m["rows"]:
        raise InputError(f"{directory}: the cache is unfinished ({done} of {m['rows']} rows); run {rerun} again to "
                         f"complete it")
    parts = {}
    for sh in m["shards"]:
        path = os.path.join(directory, sh["file"])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InputError(f"{path}: missing shard of the cache ({type(e).__name__})") from None
        if _sha(data) != sh["sha256"]:
            raise InputError(f"{path}: truncated or corrupted (checksum mismatch); rebuild it with {rerun}")
        expect = _shard_arrays(m, sh["rows"])
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {name: z[name] for name in expect}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise InputError(f"{path}: expected an .npz shard holding {', '.join(expect)}, got one that does not "
                             f"load ({type(e).__name__})") from None
        for name, (shape, dtype) in expect.items():
            a = arrays[name]
            if a.shape != shape or a.dtype != np.dtype(dtype):
                raise InputError(f"{path}: {name}: expected {dtype}{list(shape)}, got {a.dtype}{list(a.shape)}")
            parts.setdefault(name, []).append(a)
        if fmt == FORMAT:
            _check_topk_ids(arrays["indices"], m["vocab"], f"{path}: ")
            _check_topk_logprobs(arrays["values"], f"{path}: ")
    return {name: np.concatenate(p) for name, p in parts.items()}, m


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
    vocab = int(jax.eval_shape(teacher.apply, variables, jax.ShapeDtypeStruct((1, tokens.shape[1]), jnp.int32))
                .shape[-1])
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


def _optional_int(name: str, value):
    """``value`` as a JSON int (NumPy ints included), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name}: expected None or an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _check_directory(directory: str) -> None:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InputError(f"directory: expected a folder for the cache, got the existing file {directory}")


def _check_metadata(metadata) -> dict:
    """``metadata`` as the JSON object it reads back as; refused unless a JSON-able dict."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InputTypeError(f"metadata: expected a dict, got {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as e:
        raise InputTypeError(f"metadata: expected JSON values (str, numbers, lists, dicts), got {e}") from None


def _canonical(manifest: dict) -> bytes:
    """The bytes a manifest's checksum covers: its JSON without the checksum, keys sorted."""
    body = {key: value for key, value in manifest.items() if key != _CHECKSUM}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _write_manifest(directory, manifest: dict) -> None:
    """Write ``manifest`` (any old checksum dropped) with its own checksum, atomically."""
    from kdjax.checkpoint import atomic_write_text

    body = {key: value for key, value in manifest.items() if key != _CHECKSUM}
    atomic_write_text(os.path.join(directory, "manifest.json"),
                      json.dumps(body | {_CHECKSUM: _sha(_canonical(body))}, indent=1))


def _read_manifest(directory, fmt: str = FORMAT) -> dict:
    """The manifest of the ``fmt`` cache in ``directory``: its checksum verified, then every
    key, type and shard path checked (each shard a file inside ``directory``)."""
    path = os.path.join(directory, "manifest.json")
    rebuild = _REBUILD[fmt.split("/")[0]]
    if os.path.lexists(path) and not _inside(directory, "manifest.json"):
        raise InputError(f"{path}: expected a file inside the cache directory, got a link to "
                         f"{os.path.realpath(path)}; nothing is read from there")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{directory}: expected a cache with a readable manifest.json ({type(e).__name__})") \
            from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: expected a JSON object, got {_short(manifest)}")
    got = manifest.get("format")
    if isinstance(got, str) and got != fmt and got.split("/")[0] == fmt.split("/")[0]:
        raise InputError(f"{path}: a {got} cache (an older kdjax, its manifest unsigned), expected {fmt}; {rebuild}")
    if got != fmt:
        raise InputError(f"{directory}: expected a {fmt} cache, got format {got!r}")
    if _CHECKSUM not in manifest:
        raise InputError(f"{path}: expected its checksum {_CHECKSUM!r}, got none; {rebuild}")
    if manifest[_CHECKSUM] != _sha(_canonical(manifest)):
        raise InputError(f"{path}: its checksum does not match its contents (edited or damaged); {rebuild}")
    _check_manifest(path, directory, manifest)
    return manifest


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


_COUNT = (_is_count, "an int >= 1")
_SHA256 = (lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None, "a sha256 (64 hex digits)")
_OBJECT = (lambda v: isinstance(v, dict), "a JSON object")
_LIST = (lambda v: isinstance(v, list), "a list")
_FIELDS = {  # what each format's manifest holds: key -> (check, what is expected)
    FORMAT: {"k": _COUNT, "rows": _COUNT, "length": _COUNT, "shard_rows": _COUNT, "vocab": _COUNT,
             "values_dtype": (lambda v: v in ("float32", "float16"), "'float32' or 'float16'"),
             "teacher": _SHA256, "tokens": _SHA256, "bytes_per_token": _COUNT, "metadata": _OBJECT,
             "shards": _LIST},
    GENERATIONS_FORMAT: {"rows": _COUNT, "prompt_length": _COUNT, "max_new_tokens": _COUNT, "shard_rows": _COUNT,
                         "batch_size": _COUNT, "teacher": _SHA256, "prompts": _SHA256, "sampling": _OBJECT,
                         "metadata": _OBJECT, "shards": _LIST},
}
_SHARD_FIELDS = {"file": (lambda v: isinstance(v, str), "a file name"), "rows": _COUNT, "sha256": _SHA256}


def _check_fields(where: str, obj: dict, fields: dict) -> None:
    for key, (ok, expected) in fields.items():
        if key not in obj:
            raise InputError(f"{where}: expected the key {key!r}, got none (keys: {', '.join(sorted(obj))})")
        if not ok(obj[key]):
            raise InputError(f"{where}: {key}: expected {expected}, got {_short(obj[key])}")


def _inside(directory, name: str) -> bool:
    """Whether ``directory/name``, links resolved, is a path strictly inside ``directory``."""
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(root, name))
    try:
        return target != root and os.path.commonpath([root, target]) == root
    except ValueError:  # another drive
        return False


def _check_manifest(path: str, directory, m: dict) -> None:
    """Refuse a manifest (checksum already verified) whose keys, types or shards do not
    describe a cache of its format inside ``directory``."""
    _check_fields(path, m, _FIELDS[m["format"]])
    if m["format"] == FORMAT:
        if m["k"] > m["vocab"]:
            raise InputError(f"{path}: k: expected at most the vocabulary ({m['vocab']}), got {m['k']}")
        want = m["k"] * (np.dtype(m["values_dtype"]).itemsize + 4)
        if m["bytes_per_token"] != want:
            raise InputError(f"{path}: bytes_per_token: expected {want} (k and values_dtype), got "
                             f"{m['bytes_per_token']}")
    done = 0
    for i, sh in enumerate(m["shards"]):
        where = f"{path}: shards[{i}]"
        if not isinstance(sh, dict):
            raise InputError(f"{where}: expected a JSON object (file, rows, sha256), got {_short(sh)}")
        _check_fields(where, sh, _SHARD_FIELDS)
        if not _inside(directory, sh["file"]):
            raise InputError(f"{where}: file: expected a file inside the cache directory, got {sh['file']!r} "
                             f"(resolving to {os.path.realpath(os.path.join(directory, sh['file']))}); nothing is "
                             f"read from there")
        name = f"shard-{i:05d}.npz"
        if sh["file"] != name:
            raise InputError(f"{where}: file: expected {name!r}, got {sh['file']!r}")
        last = i == len(m["shards"]) - 1
        if sh["rows"] > m["shard_rows"] or (not last and sh["rows"] != m["shard_rows"]):
            raise InputError(f"{where}: rows: expected shard_rows = {m['shard_rows']} (at most, in the last shard), "
                             f"got {sh['rows']}")
        done += sh["rows"]
    if done > m["rows"]:
        raise InputError(f"{path}: shards: expected at most rows = {m['rows']} rows in all, got {done}")


def _shard_arrays(m: dict, rows: int) -> dict:
    """``{name: (shape, dtype)}`` of a shard of ``rows`` rows of the cache ``m``."""
    if m["format"] == FORMAT:
        shape = (rows, m["length"], m["k"])
        return {"values": (shape, m["values_dtype"]), "indices": (shape, "int32")}
    shape = (rows, m["prompt_length"] + m["max_new_tokens"])
    return {"tokens": (shape, "int32"), "mask": (shape, "bool")}


def _shard_ok(directory, shard) -> bool:
    try:
        with open(os.path.join(directory, shard["file"]), "rb") as f:
            return _sha(f.read()) == shard["sha256"]
    except OSError:
        return False


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


# ----------------------------------------------------------------------------- teacher generations (SeqKD)


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
    vocab = int(jax.eval_shape(teacher.apply, variables, jax.ShapeDtypeStruct((1, prompts.shape[1]), jnp.int32))
                .shape[-1])
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
