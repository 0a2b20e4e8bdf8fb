"""kdjax.fitting: ``paired_students`` trains standard and distilled students as one program,
each half equal to its own ``fit_members`` (the standard students bitwise), and its errors."""

import jax
import numpy as np
import pytest

import kdjax


def test_paired_students_split_into_standard_and_distilled(seed_data):
    """paired_students: members :n equal a plain cross-entropy fit (bitwise), members n:
    equal a distillation fit, pair i sharing seed i and teacher i."""
    from kdjax.fitting import RunConfig, fit_members, paired_students

    cfg = RunConfig(steps=12, batch_size=32)
    student, seeds = kdjax.StudentMLP(16, 5), [3, 8]
    logits = np.random.default_rng(0).normal(size=(2, 500, 5)).astype(np.float32) * 3
    pairs = paired_students(seeds, logits, 4.0, 0.6)
    assert pairs["seeds"].tolist() == [3, 8, 3, 8] and pairs["teacher_logits"].shape == (4, 500, 5)
    np.testing.assert_array_equal(np.asarray(pairs["hyper"].alpha), np.float32([0, 0, 0.6, 0.6]))
    both, both_loss = fit_members(student, "kd", seed_data, cfg, **pairs)
    ce, ce_loss = fit_members(student, "ce", seed_data, cfg, seeds)
    kd, kd_loss = fit_members(student, "kd", seed_data, cfg, seeds, teacher_logits=logits,
                              hyper=kdjax.make_hyper([4.0, 4.0], [0.6, 0.6]))
    np.testing.assert_array_equal(both_loss[:2], ce_loss)
    np.testing.assert_allclose(both_loss[2:], kd_loss, rtol=1e-6)
    for a, b, c in zip(*(jax.tree_util.tree_leaves(s.params) for s in (both, ce, kd))):
        np.testing.assert_array_equal(np.asarray(a)[:2], np.asarray(b))
        np.testing.assert_allclose(np.asarray(a)[2:], np.asarray(c), rtol=1e-5, atol=1e-7)
    # one teacher for all: shared, not duplicated
    assert paired_students(seeds, logits[0], 3.0, 0.7)["teacher_logits"].shape == (500, 5)
    with pytest.raises(ValueError, match="one teacher per seed"):
        paired_students([1, 2, 3], logits, 3.0, 0.7)
    with pytest.raises(ValueError, match="alpha"):
        paired_students(seeds, logits, 3.0, 1.5)
