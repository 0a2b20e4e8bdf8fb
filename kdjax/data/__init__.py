"""Datasets and minibatch index schedules.

Datasets are plain NumPy arrays in a frozen dataclass; they are validated here, at
the data boundary, so that bad values never reach a compiled step.

Two schedules, both ``[num_steps, batch_size]`` int32 NumPy index arrays built up front
(from a JAX key) so a whole run can be one ``lax.scan``:

* ``random_batch_schedule`` — the reference script's "epoch": every step draws ``batch_size``
  distinct indices at random (``randperm(n)[:batch_size]``), independently of other steps.
  kdjax calls these *steps*. (``seed_schedule``, its name before version 4, is the same function.)
* ``epoch_schedule`` — real epochs: each epoch is a fresh permutation cut into
  ``n // batch_size`` minibatches (the ragged tail is dropped so shapes stay static).
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError, check_count

__all__ = ["Dataset", "synthetic", "synthetic_images", "digits", "load_npz", "validate_arrays",
           "validation_split", "without_class", "text", "TEXT_MODULES", "random_batch_schedule", "seed_schedule",
           "epoch_schedule", "take_batch", "text_documents", "decode_text"]


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

    Args:
      x: features ``[n, ...]``; y: integer labels ``[n]``.
      where: the name in error messages; num_classes: labels must be below it (None: unchecked).

    Returns:
      ``(x, y)`` as float32 and int32 NumPy arrays.

    Raises:
      InputError: a wrong shape, no example, non-finite features or a label out of range.
      InputTypeError: non-numeric features or non-integer labels.
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
    training accuracy measures memorisation, as in the reference script.

    Args:
      num_samples, test_samples: training and test rows; input_dim: features per row.
      num_classes: label range; seed: NumPy seed of the draws.

    Returns:
      A ``Dataset``.
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
    reshaped to ``[n, *shape]`` (random labels: training accuracy is memorisation).

    Args:
      shape: ``(height, width, channels)``; the rest as ``synthetic``.

    Returns:
      A ``Dataset`` of images.

    Raises:
      InputError: a shape that is not three positive ints.
    """
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

    Args:
      test_fraction: the share of rows held out; seed: the split's seed; images: NHWC images.

    Returns:
      A ``Dataset``.

    Raises:
      ImportError: scikit-learn is not installed.
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

    Args:
      ds: the data set; fraction: in (0, 1); seed: the split's seed.

    Raises:
      InputError: a fraction outside (0, 1), or one that leaves a split empty.
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
    keeps them): Hinton et al.'s transfer set that never shows the student a class.

    Args:
      ds: the data set; label: the class to omit from training.

    Returns:
      A ``Dataset``.

    Raises:
      InputTypeError: a label that is not an int.
      InputError: a label out of range, absent from training, or the only class there.
    """
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

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str | os.PathLike, num_classes: int | None = None) -> Dataset:
    """Load a user data set from an ``.npz`` holding ``x_train, y_train, x_test, y_test``.

    The class count is ``num_classes`` or, when None, the training labels' maximum + 1;
    test labels outside it are refused.

    Args:
      path: the ``.npz`` file; num_classes: the class count (None: from the labels).

    Returns:
      A ``Dataset`` named after the file.

    Raises:
      InputError: a missing or unreadable file, missing keys, or invalid arrays.
    """
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


def _schedule_generator(rng, num_samples: int, batch_size: int, count: int, what: str) -> np.random.Generator:
    """Check a schedule's sizes (``count`` its steps or epochs, named ``what``); a NumPy generator
    seeded from the JAX key ``rng`` (raw ``uint32[2]`` or typed)."""
    if batch_size < 1 or batch_size > num_samples:
        raise InputError(f"batch_size: expected 1 <= batch_size <= {num_samples} (examples), "
                         f"got {batch_size}")
    if count < 1:
        raise InputError(f"{what}: expected a positive count, got {count}")
    if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return np.random.default_rng(np.asarray(rng, dtype=np.uint32).ravel().tolist())


@jax.jit
def _take_rows(data, indices):
    return {name: jnp.take(array, indices, axis=0) for name, array in data.items()}


def take_batch(data: dict, indices) -> dict:
    """``{name: array[indices]}`` for every array of ``data`` (device arrays of equal length),
    as one compiled gather: one dispatch per call, the data set never leaving the device.

    For loops that call a step from Python: ``{k: v[idx] for k, v in data.items()}`` runs
    one indexing op per array, each through ``jnp``'s indexing path, which can cost more
    than a small step (docs/benchmarks.md has the figures). Pass
    ``indices`` as a NumPy row of a schedule (``random_batch_schedule``, ``epoch_schedule``):
    their bounds are checked on the host (inside the program an out-of-range index could
    not raise); device indices are passed as they are.

    Args:
      data: ``{name: array}``, arrays with equal numbers of rows; indices: integer rows.

    Returns:
      ``{name: array[indices]}``.

    Raises:
      InputError: an empty ``data``, unequal row counts, or host indices out of range.
      InputTypeError: non-integer indices.
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
    return _take_rows(data, indices)


# Schedules are built with NumPy from the key: they are data, not computation (no program per
# shape to compile; docs/benchmarks.md, "Initialising on the host", has both costs).
def random_batch_schedule(rng, num_samples: int, batch_size: int, steps: int) -> np.ndarray:
    """``[steps, batch_size]`` int32 indices; row k = a random permutation of n, first batch_size.

    Args:
      rng: a JAX key (typed, or raw ``uint32`` words); num_samples: rows n; batch_size, steps: the shape.

    Returns:
      The schedule, a NumPy int32 array.

    Raises:
      InputError: a batch size outside ``[1, n]`` or a count < 1.
    """
    g = _schedule_generator(rng, num_samples, batch_size, steps, "steps")
    rows = np.stack([g.permutation(num_samples)[:batch_size] for _ in range(steps)])
    return rows.astype(np.int32)


seed_schedule = random_batch_schedule  # its name before version 4 (it collided with --seed)


def epoch_schedule(rng, num_samples: int, batch_size: int, epochs: int) -> np.ndarray:
    """``[epochs * (n // batch_size), batch_size]`` int32 indices: shuffled passes over the data.

    Args:
      rng: as ``random_batch_schedule``; num_samples: rows n; batch_size; epochs: passes.

    Returns:
      The schedule, a NumPy int32 array.

    Raises:
      InputError: a batch size outside ``[1, n]`` or a count < 1.
    """
    g = _schedule_generator(rng, num_samples, batch_size, epochs, "epochs")
    per_epoch = num_samples // batch_size
    rows = np.concatenate([g.permutation(num_samples)[: per_epoch * batch_size] for _ in range(epochs)])
    return rows.reshape(epochs * per_epoch, batch_size).astype(np.int32)


# the text corpora (kdjax/data/corpus.py), importable from here as before
from kdjax.data.corpus import TEXT_MODULES, _first, decode_text, text, text_documents  # noqa: E402,F401
