"""Hinton et al.'s omitted-class experiment (the mechanism, not the headline), the
prior-matched bias, validation splits, and T/alpha tuned without the test set."""

import dataclasses

import numpy as np
import pytest

from kdjax import data, hinton, workflows
from kdjax.errors import InputError, InputTypeError
from kdjax.fitting import RunConfig
from kdjax.models import StudentMLP, TeacherMLP

pytest.importorskip("sklearn")

SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def digits():
    return data.digits()


@pytest.fixture(scope="module")
def omitted(digits):
    cfg = RunConfig(epochs=5, batch_size=64, learning_rate=1e-2)
    return hinton.omit_class(TeacherMLP(64, 10), StudentMLP(32, 10), digits, cfg, SEEDS, omit=3,
                                  temperature=20.0, alpha=0.9)


def test_distilled_student_learns_the_class_it_never_saw(omitted):
    acc = omitted.accuracy["before"]
    assert np.all(acc["standard"]["omitted"] == 0)  # no label 3 in its data: it never predicts a 3
    assert np.all(acc["teacher"]["omitted"] > 0.8)  # the teacher knows the class
    # soft targets on the other digits alone teach it: far above 0 for every seed
    assert np.min(acc["distilled"]["omitted"]) > 0.3, acc["distilled"]["omitted"]
    gain = omitted.paired_gain["before"]["omitted"]
    assert gain[0] - gain[1] > 0.3  # the CI's lower end


def test_omit_class_numbers_agree_with_distill_and_counts(omitted, digits):
    r, n = omitted.result, len(digits.y_test)
    for m in ("standard", "distilled"):  # the same correct counts (distill's accuracy is float32)
        np.testing.assert_array_equal(np.round(omitted.accuracy["before"][m]["overall"] * n),
                                      np.round(r.accuracy["test"][m] * n))
    c = omitted.test_counts
    assert c["omitted"] == int(np.sum(digits.y_test == 3)) and c["overall"] == len(digits.y_test)
    assert c["teacher"] + c["validation"] == len(digits.y_train)
    errors = omitted.errors["after"]["distilled"]["omitted"]
    np.testing.assert_allclose(1 - errors / c["omitted"], omitted.accuracy["after"]["distilled"]["omitted"])
    # the bias was matched on validation inputs: it moves the omitted class up for the standard students
    assert np.all(omitted.bias["standard"] > 0)


def test_match_prior_bias_hits_the_prior():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 5)) * 3
    z[:, 2] -= 10  # a class the model never predicts
    for prior in (0.0, 0.1, 0.37, 1.0):
        b = hinton.match_prior_bias(z, 2, prior)
        shifted = z.copy()
        shifted[:, 2] += b
        assert np.sum(np.argmax(shifted, axis=1) == 2) == round(prior * 200)


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


def test_tuning_never_looks_at_the_test_set(digits):
    """The same choice and validation table with the test labels scrambled; the final run
    is ``distill`` at the chosen cell."""
    cfg = RunConfig(epochs=2, batch_size=64)
    teacher, student = TeacherMLP(32, 10), StudentMLP(8, 10)
    kw = dict(temperatures=[1.0, 4.0], alphas=[0.5, 1.0])
    a = workflows.tuned_distill(teacher, student, digits, cfg, [0, 1], **kw)
    scrambled = dataclasses.replace(digits, y_test=np.random.default_rng(0).permutation(digits.y_test))
    b = workflows.tuned_distill(teacher, student, scrambled, cfg, [0, 1], **kw)
    np.testing.assert_array_equal(a.validation, b.validation)
    assert a.best == b.best
    i, j = np.unravel_index(np.argmax(a.validation.mean(axis=2)), (2, 2))
    assert a.best == (kw["temperatures"][i], kw["alphas"][j])
    ref = workflows.distill(teacher, student, digits, cfg, [0, 1], temperature=a.best[0], alpha=a.best[1])
    for k in ("standard", "distilled", "teacher"):
        np.testing.assert_array_equal(a.result.accuracy["test"][k], ref.accuracy["test"][k])


def test_omit_class_with_a_loaded_teacher(digits):
    """One given teacher for every seed: its accuracy is reported once, and equals evaluate's."""
    import jax

    import kdjax

    teacher = TeacherMLP(16, 10)
    state = kdjax.create_train_state(teacher, jax.random.PRNGKey(0), input_dim=64)
    r = hinton.omit_class(teacher, StudentMLP(8, 10), digits, RunConfig(steps=3), [0, 1], teacher_state=state)
    overall = r.accuracy["before"]["teacher"]["overall"]
    assert overall.shape == (1,)
    want = kdjax.evaluate(teacher, state, digits.x_test, digits.y_test)["accuracy"]
    assert round(float(overall[0]) * len(digits.y_test)) == round(float(want) * len(digits.y_test))
