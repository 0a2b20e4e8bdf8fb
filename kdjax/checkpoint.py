"""Checkpoints: a pytree of arrays plus a JSON-able metadata dict, in one file.

Format (``flax.serialization`` msgpack, chosen over orbax for a single small file
with no background threads or directory layout): a header line
``kdjax-checkpoint v1 <sha256 of payload>\\n`` then the msgpack payload. Writes go to
a temporary file in the same directory, are fsynced, then ``os.replace``d into place,
so a crash leaves either the old file or the new one, never half of one. A truncated
or altered file fails the checksum and raises ``ValueError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import jax
import numpy as np
from flax import serialization

from kdjax import parallel
from kdjax.errors import InputError

__all__ = ["save", "load", "save_rotating", "load_latest", "atomic_write_bytes", "atomic_write_text"]

MAGIC = b"kdjax-checkpoint v1 "


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save(path: str | os.PathLike, tree, meta: dict | None = None) -> None:
    """Save a pytree of arrays (e.g. params or a whole ``TrainState``) and ``meta``.

    Sharded arrays are gathered to whole NumPy arrays (on many processes every process
    must call ``save``; process 0 writes the file), so a checkpoint restores on any
    number of devices.
    """
    host = jax.tree_util.tree_map(parallel.to_host, serialization.to_state_dict(tree))
    if jax.process_index() != 0:
        return
    payload = serialization.msgpack_serialize({"tree": host, "meta": json.dumps(meta or {})})
    digest = hashlib.sha256(payload).hexdigest().encode()
    atomic_write_bytes(path, MAGIC + digest + b"\n" + payload)


def load(path: str | os.PathLike, target=None):
    """Load ``(tree, meta)``. With ``target`` (a pytree of the same structure, e.g. a
    freshly initialised ``TrainState``) the tree is restored into that structure and
    its shapes are checked; otherwise nested dicts of NumPy arrays are returned."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InputError(f"{path}: expected a readable kdjax checkpoint, got {e.strerror}") from e
    header, _, payload = raw.partition(b"\n")
    if not header.startswith(MAGIC):
        raise InputError(f"{path}: expected a kdjax checkpoint (header {MAGIC.decode().strip()!r}), "
                         f"got something else")
    if hashlib.sha256(payload).hexdigest().encode() != header[len(MAGIC):]:
        raise InputError(f"{path}: checkpoint is truncated or corrupted (checksum mismatch)")
    blob = serialization.msgpack_restore(payload)
    tree, meta = blob["tree"], json.loads(blob["meta"])
    if target is not None:
        want = jax.tree_util.tree_map(np.shape, serialization.to_state_dict(target))
        got = jax.tree_util.tree_map(np.shape, tree)
        if want != got:
            raise InputError(f"{path}: checkpoint does not match the model: expected "
                             f"shapes {want}, got {got}")
        tree = serialization.from_state_dict(target, tree)
    return tree, meta


def save_rotating(path: str | os.PathLike, tree, meta: dict | None = None) -> None:
    """``save``, keeping the previous checkpoint as ``<path>.prev``.

    A crash at any point leaves at least one complete checkpoint: the new one, or the
    previous one (as ``path`` or ``path.prev``).
    """
    path = os.fspath(path)
    if os.path.exists(path) and jax.process_index() == 0:
        os.replace(path, path + ".prev")
    save(path, tree, meta)


def load_latest(path: str | os.PathLike, target=None):
    """Load ``path``, or ``path.prev`` if ``path`` is missing or corrupted.

    Returns ``(tree, meta, used_path, problem)`` where ``problem`` is the error message
    of a corrupted ``path`` (None if it was fine); raises ``FileNotFoundError`` if
    neither exists and ``ValueError`` if neither is usable.
    """
    path = os.fspath(path)
    problem = None
    for candidate in (path, path + ".prev"):
        if not os.path.exists(candidate):
            continue
        try:
            tree, meta = load(candidate, target)
            return tree, meta, candidate, problem
        except ValueError as e:
            problem = problem or str(e)
    if problem:
        raise InputError(problem)
    raise FileNotFoundError(path)
