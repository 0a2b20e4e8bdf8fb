"""kdjax.data: minibatch schedules (``seed_schedule``, ``epoch_schedule``), ``take_batch``,
stratified validation splits, a class taken out of the transfer set (``without_class``), and
their errors. (``kdjax.data.text`` is tests/test_corpus.py's.)"""

import dataclasses

import jax
import numpy as np
import pytest

from kdjax import data, workflows
from kdjax import data as kdata
from kdjax.errors import InputError, InputTypeError
from kdjax.fitting import RunConfig
from kdjax.models import StudentMLP, TeacherMLP


def test_schedules():
    rng = jax.random.PRNGKey(0)
    s = np.asarray(kdata.seed_schedule(rng, 100, 32, 50))
    assert s.shape == (50, 32) and s.dtype == np.int32
    assert all(len(set(row)) == 32 for row in s)  # without replacement within a step
    assert s.min() >= 0 and s.max() < 100
    assert len({tuple(r) for r in s}) == 50  # steps differ
    e = np.asarray(kdata.epoch_schedule(rng, 100, 32, 4))
    assert e.shape == (12, 32)
    for k in range(4):  # each epoch visits distinct examples
        assert len(set(e[3 * k: 3 * k + 3].ravel())) == 96
    np.testing.assert_array_equal(s, np.asarray(kdata.seed_schedule(rng, 100, 32, 50)))
    with pytest.raises(ValueError, match="batch_size"):
        kdata.seed_schedule(rng, 10, 32, 5)


def test_random_batch_schedule_is_the_old_seed_schedule():
    """Issue 37: the schedule has a name that says what it is; the old one keeps working."""
    assert kdata.random_batch_schedule is kdata.seed_schedule
    assert {"random_batch_schedule", "seed_schedule"} <= set(kdata.__all__)
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(kdata.random_batch_schedule(key, 40, 8, 5), kdata.seed_schedule(key, 40, 8, 5))


def test_take_batch_is_indexing_in_one_program():
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    d = {"x": jnp.asarray(rng.normal(size=(20, 3))), "y": jnp.arange(20)}
    idx = np.array([3, 0, 19, 7])
    got = data.take_batch(d, idx)
    np.testing.assert_array_equal(np.asarray(got["x"]), np.asarray(d["x"])[idx])
    np.testing.assert_array_equal(np.asarray(got["y"]), idx)
    with pytest.raises(InputError, match=r"indices: expected values in \[0, 20\), got values from 3 to 20"):
        data.take_batch(d, np.array([3, 20]))
    with pytest.raises(InputError, match="equal numbers of rows"):
        data.take_batch({"x": d["x"], "y": d["y"][:5]}, idx)


def test_validation_split_is_stratified_and_disjoint(digits):
    v = data.validation_split(digits, 0.2, seed=0)
    assert len(v.y_train) + len(v.y_test) == len(digits.y_train)
    np.testing.assert_array_equal(v.x_test, data.validation_split(digits, 0.2, seed=0).x_test)  # deterministic
    for c in range(10):
        share = np.mean(v.y_test == c) / np.mean(digits.y_train == c)
        assert 0.9 < share < 1.1
    # the two parts are the training rows, each used once (a multiset of rows with labels)
    rows = lambda x, y: np.unique(np.column_stack([x, y]), axis=0, return_counts=True)
    both = rows(np.concatenate([v.x_train, v.x_test]), np.concatenate([v.y_train, v.y_test]))
    for got, want in zip(both, rows(digits.x_train, digits.y_train)):
        np.testing.assert_array_equal(got, want)


def test_omit_and_split_errors(digits):
    with pytest.raises(InputError, match="expected a label in 0..9.*got 10"):
        data.without_class(digits, 10)
    with pytest.raises(InputError, match="got -1"):
        data.without_class(digits, -1)
    with pytest.raises(InputTypeError, match="expected an int label"):
        data.without_class(digits, 3.0)
    only_threes = dataclasses.replace(digits, x_train=digits.x_train[digits.y_train == 3],
                                      y_train=digits.y_train[digits.y_train == 3])
    with pytest.raises(InputError, match="transfer set would be empty"):
        data.without_class(only_threes, 3)
    no_threes = data.without_class(digits, 3)
    with pytest.raises(InputError, match="no training example of class 3"):
        data.without_class(no_threes, 3)
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(InputError, match="validation fraction"):
            data.validation_split(digits, bad)
    with pytest.raises(InputError, match="transfer: expected examples of shape"):
        workflows.distill(TeacherMLP(8, 10), StudentMLP(4, 10), digits, RunConfig(steps=2), [0],
                            transfer=data.synthetic(100, 10, 10))
