"""kdjax.hinton: Hinton et al.'s omitted-class experiment (the mechanism, not the headline)
and the prior-matched bias. (Validation splits and ``without_class`` are tested in
tests/test_data.py, T/alpha tuned without the test set in tests/test_workflows.py; the
``digits`` fixture is conftest.py's.)"""

import numpy as np
import pytest

from kdjax import hinton
from kdjax.fitting import RunConfig
from kdjax.models import StudentMLP, TeacherMLP

pytest.importorskip("sklearn")

SEEDS = [0, 1, 2]


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
