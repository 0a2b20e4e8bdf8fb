"""Checkpoints: a pytree of arrays plus a JSON-able metadata dict, in one directory.

Format ``kdjax-checkpoint v2``: a directory of ``arrays/``, written by Orbax (which flax depends
on: each process writes its own devices' shards; a restore reads them onto any mesh), and
``kdjax.json``: the metadata, every array's shape and dtype, the sha256 of every file. Guarantees:

* atomic: everything is written under ``<path>.tmp``, ``kdjax.json`` last, then renamed into
  place: a crash leaves the old checkpoint or the new one, never half of one; a failed write
  (a full disk too) removes ``<path>.tmp`` and raises one ``OSError`` line;
* verified on read: a missing, truncated or altered file fails its checksum and raises
  ``InputError`` naming the checkpoint;
* exact: arrays come back bit for bit, in the structure of a ``target``, placed like it.

Checkpoints of format v1 (one msgpack file, kdjax before version 3) are still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import jax
import numpy as np
from flax import serialization

from kdjax import parallel
from kdjax.errors import InputError

__all__ = ["save", "load", "save_rotating", "load_latest", "RotatingSaver", "atomic_write_bytes",
           "atomic_write_text"]

FORMAT = "kdjax-checkpoint v2"
MANIFEST = "kdjax.json"
ARRAYS = "arrays"
MAGIC = b"kdjax-checkpoint v1 "  # the header of a v1 file


def temp_file(directory: str, prefix: str = ".tmp-") -> tuple[int, str]:
    """A new file in ``directory`` (name ``prefix`` + random), its mode following the umask as
    ``open``'s would (``tempfile.mkstemp``'s 0600 would hide a renamed result from others).

    Args: directory: where; prefix: the name's start.
    Returns: ``(fd, path)``. Raises: FileExistsError: no free name in 100 tries.
    """
    for _ in range(100):
        name = os.path.join(directory, prefix + next(tempfile._get_candidate_names()))
        try:
            return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename).

    Args: path: the file (its directory is created if missing); data: the bytes.
    Raises: OSError: the write failed; ``path`` is as it was and no temporary file is left.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = temp_file(directory)
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
    """``atomic_write_bytes(path, text.encode())``. Args: path: the file; text: the str (UTF-8)."""
    atomic_write_bytes(path, text.encode())


def save(path: str | os.PathLike, tree, meta: dict | None = None) -> None:
    """Save a pytree of arrays and metadata as the directory ``path`` (replaced if it exists).

    Sharded arrays are written shard by shard, each process its own (every process must call
    ``save``); no process gathers a whole array.

    Args:
      path: the checkpoint directory; tree: e.g. params or a whole ``TrainState``; meta: JSON-able.
    Raises:
      OSError: one line, "checkpoint: could not write <path>: <reason>" (``errno`` kept),
        when a write fails (a full disk included, which Orbax raises as a ``ValueError``);
        ``<path>.tmp`` is removed and the checkpoint at ``path`` is left as it was.
    """
    _save(os.fspath(path), tree, meta, keep_previous=False)


def save_rotating(path: str | os.PathLike, tree, meta: dict | None = None) -> None:
    """``save``, keeping the previous checkpoint as ``<path>.prev``: a crash at any point leaves
    a complete checkpoint (the new one, or the previous one as ``path`` or ``path.prev``).

    Args: as ``save``. Raises: OSError: as ``save``.
    """
    _save(os.fspath(path), tree, meta, keep_previous=True)


class RotatingSaver:
    """``save_rotating`` to one path, in the background: ``saver(tree, meta)`` returns once the
    arrays are copied off the devices (``jax.device_get``), and a thread writes them while training
    goes on. A call first waits for the previous write; ``wait()`` waits for the last one and
    re-raises its error. On many processes every write is synchronous (all write their shards)."""

    def __init__(self, path: str | os.PathLike):
        self.path, self._thread, self._error = os.fspath(path), None, None

    def __call__(self, tree, meta: dict | None = None) -> None:
        self.wait()
        if jax.process_count() > 1:
            return save_rotating(self.path, tree, meta)
        host = jax.device_get(tree)  # a copy: the caller may donate its arrays next

        def write():
            try:
                save_rotating(self.path, host, meta)
            except BaseException as e:  # re-raised by wait(), in the caller's thread
                self._error = e

        import threading

        self._thread = threading.Thread(target=write, name=f"kdjax-checkpoint {self.path}", daemon=True)
        self._thread.start()

    def wait(self, raise_error: bool = True) -> None:
        """Wait for the last write. Args: raise_error: re-raise its error, else drop it. Raises: that error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def _save(path: str, tree, meta, keep_previous: bool) -> None:
    import orbax.checkpoint as ocp

    primary = jax.process_index() == 0
    tmp = path + ".tmp"  # the same name on every process
    state = serialization.to_state_dict(tree)
    try:
        if primary:
            _remove(tmp)
            os.makedirs(tmp)
        _barrier("kdjax-checkpoint-start")
        with ocp.StandardCheckpointer() as writer:  # leaving the block waits for every write
            writer.save(os.path.abspath(os.path.join(tmp, ARRAYS)), state)
        if primary:
            arrays = jax.tree_util.tree_map(lambda x: [list(np.shape(x)), np.dtype(x.dtype).name], state)
            manifest = {"format": FORMAT, "meta": meta or {}, "arrays": arrays, "files": _digests(tmp)}
            atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, sort_keys=True))
            _fsync_dir(tmp)
    except InputError:
        raise
    except (OSError, ValueError) as e:  # a full disk: Orbax raises it as a ValueError
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)  # no half checkpoint left; the previous one untouched
        raise _write_error(path, e) from e
    if primary:
        try:
            if keep_previous and os.path.exists(path):
                _remove(path + ".prev")
                os.replace(path, path + ".prev")
            old = path + ".old"
            if os.path.exists(path):  # (save: the checkpoint being replaced)
                _remove(old)
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                if os.path.exists(old) and not os.path.exists(path):
                    os.replace(old, path)  # the previous checkpoint back in place
                raise
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
            _remove(old)
        except OSError as e:
            raise _write_error(path, e) from e
    _barrier("kdjax-checkpoint-done")


def _write_error(path: str, error: BaseException) -> OSError:
    """One ``OSError`` line for a failed write: the OS's reason (in the chain when Orbax wraps it), errno kept."""
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen and not (isinstance(cause, OSError) and cause.errno):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno:
        reason, number = cause.strerror or os.strerror(cause.errno), cause.errno
    else:
        reason, number = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}", None
    out = OSError(f"checkpoint: could not write {path}: {reason}")
    out.errno = number
    return out


def load(path: str | os.PathLike, target=None):
    """Load a checkpoint (format v2 or v1).

    Args:
      path: the checkpoint.
      target: None (nested dicts of NumPy arrays), a pytree of the saved structure (e.g. a
        fresh ``TrainState``, possibly sharded: each array placed as the target's, read shard by
        shard; shapes and dtypes checked first; a dict may name only some entries, the others
        come back as NumPy), or a function ``meta -> target`` called before any array is read.
    Returns: ``(tree, meta)``.
    Raises: InputError: a damaged checkpoint, or one that does not match ``target``.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return _read_v1(path, _verified_v1(path), target)
    return _read(path, _manifest(path), target)


def load_latest(path: str | os.PathLike, target=None):
    """Load ``path``, or ``path.prev`` if ``path`` is missing or damaged.

    Args: path: the checkpoint; target: as ``load``'s.
    Returns: ``(tree, meta, used_path, problem)``, ``problem`` a damaged ``path``'s error or None.
    Raises:
      FileNotFoundError: neither exists. InputError: neither is usable (errors of ``target``,
        and a checkpoint that does not match it, are raised as they are, not taken for damage).
    """
    path = os.fspath(path)
    problem = None
    for candidate in (path, path + ".prev"):
        if not os.path.exists(candidate):
            continue
        try:
            verified = _verified_v1(candidate) if os.path.isfile(candidate) else _manifest(candidate)
        except InputError as e:
            problem = problem or str(e)
            continue
        read = _read_v1 if os.path.isfile(candidate) else _read
        return (*read(candidate, verified, target), candidate, problem)
    if problem:
        raise InputError(problem)
    raise FileNotFoundError(path)


def _read(path: str, manifest: dict, target):
    meta = manifest["meta"]
    target = target(meta) if callable(target) else target
    return _restore(path, manifest["arrays"], target), meta


def _manifest(path: str) -> dict:
    damaged = f"{path}: checkpoint is truncated or corrupted"
    if not os.path.isdir(path):
        raise InputError(f"{path}: expected a kdjax checkpoint, got no such file or directory")
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{damaged} (no {MANIFEST}: not a kdjax checkpoint, or an unfinished one)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{damaged} ({MANIFEST}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path}: expected a {FORMAT!r} checkpoint, got format "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r}")
    found = _digests(path)
    for name, digest in manifest["files"].items():
        if found.get(name) != digest:
            why = "missing" if name not in found else "checksum mismatch"
            raise InputError(f"{damaged} ({ARRAYS}/{name}: {why})")
    return manifest


def _restore(path: str, arrays: dict, target):
    import orbax.checkpoint as ocp

    like = _like(path, arrays, _empty, target)
    parallel.barrier("kdjax-checkpoint-restore")  # the reader's first step is a collective
    with ocp.StandardCheckpointer() as reader:
        tree = reader.restore(os.path.abspath(os.path.join(path, ARRAYS)), jax.tree_util.tree_map(_abstract, like))
    return _into(target, tree)


def _like(path: str, saved, as_saved, target):
    """What to restore: the target's arrays (checked against the saved shapes and dtypes),
    and ``as_saved(spec)`` for every saved entry a dict target leaves out."""
    if target is None:
        return jax.tree_util.tree_map(as_saved, saved, is_leaf=_is_spec)
    like = serialization.to_state_dict(target)
    if isinstance(target, dict) and isinstance(saved, dict):
        like = {**{k: jax.tree_util.tree_map(as_saved, v, is_leaf=_is_spec) for k, v in saved.items()
                   if k not in target}, **like}
    _check_matches(path, saved, like)
    return like


def _into(target, tree):
    """``tree`` (a restored state dict) in ``target``'s structure and placement (what a dict leaves out, as is)."""
    if target is None:
        return tree
    place = lambda t, x: jax.device_put(x, t.sharding) if isinstance(t, jax.Array) else x  # (v1: host arrays)
    if isinstance(target, dict) and isinstance(tree, dict):
        part = serialization.from_state_dict(target, {k: tree[k] for k in target})
        return {**tree, **jax.tree_util.tree_map(place, target, part)}
    return jax.tree_util.tree_map(place, target, serialization.from_state_dict(target, tree))


def _empty(spec) -> np.ndarray:
    return np.empty(spec[0], jax.numpy.dtype(spec[1]))  # (jax's dtype names: bfloat16 too)


def _abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return np.empty(np.shape(x), np.asarray(x).dtype)


def _is_spec(s) -> bool:
    return isinstance(s, list) and len(s) == 2 and isinstance(s[1], str)


def _check_matches(path: str, arrays: dict, like) -> None:
    """One line naming the first array whose name, shape or dtype differs."""
    saved = {jax.tree_util.keystr(k): (tuple(s[0]), s[1])
             for k, s in jax.tree_util.tree_leaves_with_path(arrays, is_leaf=_is_spec)}
    wanted = {jax.tree_util.keystr(k): (tuple(np.shape(x)), np.dtype(x.dtype).name)
              for k, x in jax.tree_util.tree_leaves_with_path(like)}
    keys = sorted(set(saved) | set(wanted), key=lambda k: ("['params']" not in k, k))  # parameters first
    for key in keys:
        if key not in saved or key not in wanted:
            where = "the model" if key not in saved else "the checkpoint"
            raise InputError(f"{path}: checkpoint does not match the model: {key} is only in {where} "
                             f"({len(saved)} arrays saved, {len(wanted)} expected)")
    for key in keys:
        if saved[key] != wanted[key]:
            (ss, sd), (ws, wd) = saved[key], wanted[key]
            raise InputError(f"{path}: checkpoint does not match the model: {key} is {sd}{list(ss)} there, "
                             f"expected {wd}{list(ws)}")


def _digests(root: str) -> dict:
    out = {}
    arrays = os.path.join(root, ARRAYS)
    for directory, _, files in os.walk(arrays):
        for name in files:
            full = os.path.join(directory, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, arrays)] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def _verified_v1(path: str) -> tuple:
    """``(tree, meta)`` of a kdjax-checkpoint v1 file (one msgpack file with a checksummed header)."""
    with open(path, "rb") as f:
        raw = f.read()
    header, _, payload = raw.partition(b"\n")
    if not header.startswith(MAGIC):
        raise InputError(f"{path}: expected a kdjax checkpoint (a directory with {MANIFEST}, or a "
                         f"{MAGIC.decode().strip()!r} file), got something else")
    if hashlib.sha256(payload).hexdigest().encode() != header[len(MAGIC):]:
        raise InputError(f"{path}: checkpoint is truncated or corrupted (checksum mismatch)")
    blob = serialization.msgpack_restore(payload)
    return blob["tree"], json.loads(blob["meta"])


def _read_v1(path: str, verified: tuple, target):
    tree, meta = verified
    target = target(meta) if callable(target) else target
    if target is not None:
        spec = lambda x: [list(np.shape(x)), np.asarray(x).dtype.name]
        _like(path, jax.tree_util.tree_map(spec, tree), _empty, target)  # checks shapes and dtypes
        tree = _into(target, tree)
    return tree, meta


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(name: str) -> None:  # a device collective (parallel.barrier here deadlocked a save)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
