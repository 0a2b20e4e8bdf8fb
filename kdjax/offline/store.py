"""The disk format of kdjax's offline caches (``kdjax.offline``): shards with a checksummed
manifest, written atomically and resumably, and every byte verified on reading.
"""

from __future__ import annotations

import hashlib
import io
import json
import numbers
import os
import re
import zipfile

import jax
import numpy as np

from kdjax.checkpoint import atomic_write_bytes, atomic_write_text
from kdjax.errors import InputError, InputTypeError
from kdjax.losses.sparse import _check_topk_ids, _check_topk_logprobs

# ----------------------------------------------------------------------------- the cache on disk

FORMAT = "kdjax-topk/2"  # 2: the manifest carries its own checksum (version 1 did not: refused, rebuild)
GENERATIONS_FORMAT = "kdjax-generations/2"
ULD_FORMAT = "kdjax-uld/1"  # a teacher's sorted probabilities per aligned group (kdjax.offline.uld)
_CHECKSUM = "manifest_sha256"
_REBUILD = {"kdjax-topk": "rebuild the cache (kdjax teacher-logits --overwrite, or write_topk_cache into a new "
                          "directory)",
            "kdjax-generations": "rebuild it (write_generations into a new directory)",
            "kdjax-uld": "rebuild the cache (kdjax teacher-logits --method uld --overwrite, or write_uld_cache into a "
                         "new directory)"}


def fingerprint(model, variables) -> str:
    """sha256 of a model's configuration and every variable's bytes: which teacher a cache
    was built with.

    Args:
      model: the teacher module (its fields are hashed); variables: its variables.

    Returns:
      The hex digest.
    """
    h = hashlib.sha256(repr(model).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        a = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _teacher_vocab(teacher, variables, length: int) -> int:
    """The vocabulary of the teacher's logits on ``[1, length]`` tokens (shapes only: nothing runs)."""
    return int(jax.eval_shape(teacher.apply, variables, jax.ShapeDtypeStruct((1, length), np.int32)).shape[-1])


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
    manifest_path = os.path.join(directory, "manifest.json")
    shards = []
    if os.path.exists(manifest_path):
        old = _read_manifest(directory, want["format"])
        if {key: old.get(key) for key in want} != want:
            diff = ", ".join(key for key in want if old.get(key) != want[key])
            raise InputError(f"{directory}: holds a cache built with another {diff}; use a new directory")
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
        if fmt == ULD_FORMAT:
            _check_sorted_probs(arrays["values"], arrays["mass"], f"{path}: ")
    return {name: np.concatenate(p) for name, p in parts.items()}, m



def _check_sorted_probs(values, mass, where: str) -> None:
    """A ULD cache's numbers: probabilities in [0, 1], descending per group; masses in [0, 1]."""
    v = values.astype(np.float32)
    if not (np.isfinite(v).all() and np.isfinite(mass).all()):
        raise InputError(f"{where}expected finite probabilities, got NaN or infinite ones")
    if v.min(initial=0.0) < 0 or v.max(initial=0.0) > 1 or mass.min(initial=0.0) < 0 or mass.max(initial=0.0) > 1:
        raise InputError(f"{where}expected probabilities and masses in [0, 1], got values in [{v.min()}, {v.max()}] "
                         f"and masses in [{mass.min()}, {mass.max()}]")
    if np.any(np.diff(v, axis=-1) > 0):
        raise InputError(f"{where}expected each group's probabilities in descending order, got some out of order")


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


_COUNT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1")
_SHA256 = (lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None, "a sha256 (64 hex digits)")
_OBJECT = (lambda v: isinstance(v, dict), "a JSON object")
_LIST = (lambda v: isinstance(v, list), "a list")
_FIELDS = {  # what each format's manifest holds: key -> (check, what is expected)
    FORMAT: {"k": _COUNT, "rows": _COUNT, "length": _COUNT, "shard_rows": _COUNT, "vocab": _COUNT,
             "values_dtype": (lambda v: v in ("float32", "float16"), "'float32' or 'float16'"),
             "teacher": _SHA256, "tokens": _SHA256, "bytes_per_token": _COUNT, "metadata": _OBJECT,
             "shards": _LIST},
    ULD_FORMAT: {"k": _COUNT, "rows": _COUNT, "groups": _COUNT, "shard_rows": _COUNT, "vocab": _COUNT,
                 "values_dtype": (lambda v: v in ("float32", "float16"), "'float32' or 'float16'"),
                 "temperature": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e30,
                                 "a number > 0"),
                 "merge": (lambda v: v in ("observed", "bayesian"), "'observed' or 'bayesian'"),
                 "teacher": _SHA256, "tokens": _SHA256, "bytes_per_group": _COUNT, "metadata": _OBJECT,
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
    if m["format"] in (FORMAT, ULD_FORMAT):
        if m["k"] > m["vocab"]:
            raise InputError(f"{path}: k: expected at most the vocabulary ({m['vocab']}), got {m['k']}")
        key, want = (("bytes_per_token", m["k"] * (np.dtype(m["values_dtype"]).itemsize + 4)) if m["format"] == FORMAT
                     else ("bytes_per_group", m["k"] * np.dtype(m["values_dtype"]).itemsize + 4))
        if m[key] != want:
            raise InputError(f"{path}: {key}: expected {want} (k and values_dtype), got {m[key]}")
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
    if m["format"] == ULD_FORMAT:
        return {"values": ((rows, m["groups"], m["k"]), m["values_dtype"]), "mass": ((rows, m["groups"]), "float32")}
    shape = (rows, m["prompt_length"] + m["max_new_tokens"])
    return {"tokens": (shape, "int32"), "mask": (shape, "bool")}


def _shard_ok(directory, shard) -> bool:
    try:
        with open(os.path.join(directory, shard["file"]), "rb") as f:
            return _sha(f.read()) == shard["sha256"]
    except OSError:
        return False
