"""Datasets and minibatch index schedules.

Datasets are plain NumPy arrays in a frozen dataclass; they are validated here, at
the data boundary, so that bad values never reach a compiled step.

Two schedules, both ``[num_steps, batch_size]`` int32 NumPy index arrays built up front
(from a JAX key) so a whole run can be one ``lax.scan``:

* ``seed_schedule`` — the seed's "epoch": every step draws ``batch_size`` distinct
  indices at random (``randperm(n)[:batch_size]``), independently of other steps.
  kdjax calls these *steps*.
* ``epoch_schedule`` — real epochs: each epoch is a fresh permutation cut into
  ``n // batch_size`` minibatches (the ragged tail is dropped so shapes stay static).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError, check_count

__all__ = ["Dataset", "synthetic", "synthetic_images", "digits", "load_npz", "validate_arrays",
           "validation_split", "without_class", "text", "TEXT_MODULES", "seed_schedule", "epoch_schedule",
           "take_batch", "text_documents", "decode_text"]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train/test arrays: ``x`` float ``[n, features]`` or images ``[n, height, width,
    channels]`` (NHWC; any ``[n, ...]``), ``y`` int32 ``[n]``."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_dim(self) -> int:
        """Features per example (flattened)."""
        return int(np.prod(self.x_train.shape[1:]))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. ``(8, 8, 1)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])


def validate_arrays(x, y, where: str, num_classes: int | None = None):
    """Check one (features, labels) pair; return them as (float32, int32) NumPy arrays.

    Raises ValueError/TypeError naming ``where``, what was expected and what came.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2:
        raise InputError(f"{where}: expected features of shape [n, features] (or images [n, height, "
                         f"width, channels]), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InputTypeError(f"{where}: expected numeric features, got dtype {x.dtype}")
    if y.ndim != 1:
        raise InputError(f"{where}: expected labels of shape [n], got shape {y.shape}")
    if len(x) != len(y):
        raise InputError(f"{where}: expected as many labels as examples ({len(x)}), got {len(y)}")
    if len(x) == 0:
        raise InputError(f"{where}: expected at least one example, got 0")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))):
            raise InputTypeError(f"{where}: expected integer class labels, got dtype {y.dtype}")
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x)))
        raise InputError(f"{where}: expected finite features, got {bad} NaN/inf values")
    if y.min() < 0:
        raise InputError(f"{where}: expected labels >= 0, got minimum label {y.min()}")
    if num_classes is not None and y.max() >= num_classes:
        raise InputError(f"{where}: expected labels < {num_classes}, got maximum label {y.max()}")
    return x.astype(np.float32), y.astype(np.int32)


def _make(name, x_train, y_train, x_test, y_test, num_classes=None) -> Dataset:
    """The class count is ``num_classes`` or the training labels' (``max + 1``), never the
    test labels': a test label outside it is an error, not a silent extra class."""
    x_train, y_train = validate_arrays(x_train, y_train, f"{name} train")
    if num_classes is None:
        num_classes = int(y_train.max()) + 1
    else:
        check_count("num_classes", num_classes, 2)
    x_train, y_train = validate_arrays(x_train, y_train, f"{name} train", num_classes)
    x_test, y_test = validate_arrays(x_test, y_test, f"{name} test ({num_classes} classes)", num_classes)
    if x_test.shape[1:] != x_train.shape[1:]:
        raise InputError(f"{name}: expected test examples of shape {x_train.shape[1:]} "
                         f"(as train), got {x_test.shape[1:]}")
    return Dataset(name, x_train, y_train, x_test, y_test, int(num_classes))


def synthetic(num_samples: int = 500, input_dim: int = 50, num_classes: int = 5,
              seed: int = 42, test_samples: int = 500) -> Dataset:
    """The seed's data: x ~ N(0, 1), labels uniform in [0, num_classes), independent of x.

    The labels carry no signal, so held-out accuracy is chance (1 / num_classes);
    training accuracy measures memorisation, as in the seed.
    """
    rng = np.random.default_rng(seed)
    n = num_samples + test_samples
    x = rng.standard_normal((n, input_dim), dtype=np.float32)
    y = rng.integers(0, num_classes, size=n).astype(np.int32)
    return _make("synthetic", x[:num_samples], y[:num_samples], x[num_samples:],
                 y[num_samples:], num_classes)


def synthetic_images(num_samples: int = 500, shape=(8, 8, 3), num_classes: int = 5,
                     seed: int = 42, test_samples: int = 500) -> Dataset:
    """``synthetic`` with NHWC images: the same draws as ``synthetic(..., input_dim=prod(shape))``,
    reshaped to ``[n, *shape]`` (random labels: training accuracy is memorisation)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"shape: expected (height, width, channels) of positive ints, got {shape}")
    flat = synthetic(num_samples, int(np.prod(shape)), num_classes, seed, test_samples)
    return _make("synthetic images", flat.x_train.reshape(-1, *shape), flat.y_train,
                 flat.x_test.reshape(-1, *shape), flat.y_test, num_classes)


def digits(test_fraction: float = 0.25, seed: int = 0, images: bool = False) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download).

    Stratified train/test split; features scaled to [0, 1] (pixel values are 0..16);
    ``[n, 64]``, or NHWC images ``[n, 8, 8, 1]`` with ``images=True``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install 'kdjax[cli]'") from e
    bunch = load_digits()
    x, y = bunch.data.astype(np.float32) / 16.0, bunch.target.astype(np.int32)
    test = _stratified(y, test_fraction, np.random.default_rng(seed))
    if images:
        x = x.reshape(-1, 8, 8, 1)
    return _make("digits images" if images else "digits", x[~test], y[~test], x[test], y[test], 10)


def _stratified(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask picking round(fraction * count) random rows of every class."""
    pick = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        pick[idx[: int(round(fraction * len(idx)))]] = True
    return pick


def validation_split(ds: Dataset, fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Carve a validation split out of ``ds``'s *training* rows (stratified by class).

    Returns a ``Dataset`` that trains on the remaining rows and whose ``x_test`` /
    ``y_test`` are the validation rows: tune on it (``sweep(..., split="test")``)
    and ``ds``'s own test set is never looked at.
    """
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise InputError(f"validation fraction: expected a number in (0, 1), got {fraction!r}")
    val = _stratified(ds.y_train, fraction, np.random.default_rng(seed))
    if val.all() or not val.any():
        raise InputError(f"validation fraction: {fraction:g} of {len(ds.y_train)} training examples leaves "
                         f"{int((~val).sum())} to train on and {int(val.sum())} to validate; expected both > 0")
    return Dataset(f"{ds.name} (validation split)", ds.x_train[~val], ds.y_train[~val], ds.x_train[val],
                   ds.y_train[val], ds.num_classes)


def without_class(ds: Dataset, label: int) -> Dataset:
    """``ds`` with every *training* example of class ``label`` removed (its test set
    keeps them): Hinton et al.'s transfer set that never shows the student a class."""
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise InputTypeError(f"omitted class: expected an int label, got {type(label).__name__}")
    if not 0 <= label < ds.num_classes:
        raise InputError(f"omitted class: expected a label in 0..{ds.num_classes - 1} ({ds.name} has "
                         f"{ds.num_classes} classes), got {label}")
    keep = ds.y_train != label
    if keep.all():
        raise InputError(f"omitted class: {ds.name} has no training example of class {label} to omit")
    if not keep.any():
        raise InputError(f"omitted class: every training example of {ds.name} is class {label}; "
                         f"the transfer set would be empty")
    return dataclasses.replace(ds, name=f"{ds.name} without class {label}", x_train=ds.x_train[keep],
                               y_train=ds.y_train[keep])


# The default text corpus: these modules of the running Python's standard library, in this
# order (top-level ``<name>.py`` files; a name missing from some Python version is skipped).
TEXT_MODULES = ("abc", "argparse", "ast", "base64", "bisect", "calendar", "colorsys", "contextlib", "copy",
                "csv", "dataclasses", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "heapq",
                "hmac", "inspect", "keyword", "linecache", "numbers", "operator", "optparse", "pprint", "queue",
                "random", "reprlib", "sched", "secrets", "shlex", "shutil", "statistics", "string", "textwrap",
                "threading", "timeit", "token", "tokenize", "traceback", "types", "typing", "uuid", "warnings",
                "weakref")


def _windows(tokens: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of ``length + 1`` tokens: inputs ``[:-1]``, next-token labels ``[1:]``."""
    n = (len(tokens) - 1) // length
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
    for what, arr in (("training", train), ("validation", val)):
        if len(arr) < length + 1:
            raise InputError(f"text {name}: expected at least {length + 1} {what} tokens (one window), got {len(arr)}")
    (xt, yt), (xv, yv) = _windows(train, length), _windows(val, length)
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


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str | os.PathLike, num_classes: int | None = None) -> Dataset:
    """Load a user data set from an ``.npz`` holding ``x_train, y_train, x_test, y_test``.

    The class count is ``num_classes`` or, when None, the training labels' maximum + 1;
    test labels outside it are refused."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: expected an existing .npz file, got no such file")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: expected a readable .npz archive, got a file that is not one")
    try:
        with np.load(path, allow_pickle=False) as f:
            found = list(f.files)
            arrays = {k: f[k] for k in NPZ_KEYS if k in found}
    except Exception as e:  # zipfile.BadZipFile, OSError, pickled object arrays, ...
        raise InputError(f"{path}: expected a readable .npz archive, got {type(e).__name__}: {e}") from e
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise InputError(f"{path}: expected keys {', '.join(NPZ_KEYS)}, missing {', '.join(missing)} "
                         f"(found {', '.join(found) or 'none'})")
    name = os.path.basename(path)
    return _make(name, arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], num_classes)


def _check_schedule_args(num_samples: int, batch_size: int, count: int, what: str):
    if batch_size < 1 or batch_size > num_samples:
        raise InputError(f"batch_size: expected 1 <= batch_size <= {num_samples} (examples), "
                         f"got {batch_size}")
    if count < 1:
        raise InputError(f"{what}: expected a positive count, got {count}")


def _generator(rng) -> np.random.Generator:
    """A NumPy generator seeded from a JAX key (raw ``uint32[2]`` or typed)."""
    if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return np.random.default_rng(np.asarray(rng, dtype=np.uint32).ravel().tolist())


def _take_rows(data, indices):
    return {name: jnp.take(array, indices, axis=0) for name, array in data.items()}


_take_rows_jit = jax.jit(_take_rows)


def take_batch(data: dict, indices) -> dict:
    """``{name: array[indices]}`` for every array of ``data`` (device arrays of equal length),
    as one compiled gather: one dispatch per call, the data set never leaving the device.

    For loops that call a step from Python: ``{k: v[idx] for k, v in data.items()}`` runs
    one indexing op per array, each through ``jnp``'s indexing path, which can cost more
    than a small step (docs/benchmarks.md has the figures). Pass
    ``indices`` as a NumPy row of a schedule (``seed_schedule``, ``epoch_schedule``):
    their bounds are checked on the host (inside the program an out-of-range index could
    not raise); device indices are passed as they are.
    """
    if not data:
        raise InputError("data: expected a dict of arrays, got an empty one")
    rows = {name: np.shape(a)[0] if np.ndim(a) else 0 for name, a in data.items()}
    if len(set(rows.values())) != 1:
        raise InputError(f"data: expected arrays with equal numbers of rows, got {rows}")
    if not isinstance(indices, jax.Array):
        indices = np.asarray(indices)
        if not np.issubdtype(indices.dtype, np.integer):
            raise InputTypeError(f"indices: expected integer row indices, got dtype {indices.dtype}")
        n = next(iter(rows.values()))
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise InputError(f"indices: expected values in [0, {n}), got values from {indices.min()} to "
                             f"{indices.max()}")
    return _take_rows_jit(data, indices)


# Schedules are built with NumPy from the key: they are data, not computation, and
# compiling a vmapped permutation costs about a second on CPU for every new shape.
def seed_schedule(rng, num_samples: int, batch_size: int, steps: int) -> np.ndarray:
    """``[steps, batch_size]`` int32 indices; row k = a random permutation of n, first batch_size."""
    _check_schedule_args(num_samples, batch_size, steps, "steps")
    g = _generator(rng)
    rows = np.stack([g.permutation(num_samples)[:batch_size] for _ in range(steps)])
    return rows.astype(np.int32)


def epoch_schedule(rng, num_samples: int, batch_size: int, epochs: int) -> np.ndarray:
    """``[epochs * (n // batch_size), batch_size]`` int32 indices: shuffled passes over the data."""
    _check_schedule_args(num_samples, batch_size, epochs, "epochs")
    g = _generator(rng)
    per_epoch = num_samples // batch_size
    rows = np.concatenate([g.permutation(num_samples)[: per_epoch * batch_size] for _ in range(epochs)])
    return rows.reshape(epochs * per_epoch, batch_size).astype(np.int32)
