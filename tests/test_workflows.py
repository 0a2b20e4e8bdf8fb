"""kdjax.workflows: T and alpha tuned without the test set (``tuned_distill``,
kdjax/workflows/tuning.py), its final run ``distill`` at the chosen cell. The ``digits``
fixture is conftest.py's."""

import dataclasses

import numpy as np
import pytest

from kdjax import workflows
from kdjax.fitting import RunConfig
from kdjax.models import StudentMLP, TeacherMLP

pytest.importorskip("sklearn")


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
