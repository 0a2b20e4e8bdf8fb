"""kdjax.train.evaluation: ``evaluate`` and ``predict_logits`` over stacked members
(``members=True``) equal to each member's own. The ``setup`` fixture is conftest.py's."""

import jax
import numpy as np

import kdjax
from kdjax import sweep


def test_member_evaluation_equals_single(setup):
    s = setup
    keys = sweep.member_keys([0, 1, 2])
    params = sweep.init_members(s["student"], keys["init"], 50).params
    x, y = s["d"]["x"][:100], s["d"]["y"][:100]
    many = kdjax.evaluate(s["student"], params, x, y, members=True)
    logits = kdjax.predict_logits(s["student"], params, x, members=True)
    assert logits.shape == (3, 100, 5) and many["accuracy"].shape == (3,)
    for i in range(3):
        p = jax.tree_util.tree_map(lambda a, i=i: a[i], params)
        one = kdjax.evaluate(s["student"], p, x, y)
        np.testing.assert_allclose(np.asarray(many["loss"][i]), np.asarray(one["loss"]), rtol=1e-6)
        assert float(many["accuracy"][i]) == float(one["accuracy"])
        np.testing.assert_allclose(np.asarray(logits[i]), np.asarray(kdjax.predict_logits(s["student"], p, x)),
                                   rtol=1e-6, atol=1e-6)
