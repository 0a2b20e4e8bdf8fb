"""kdjax.losses.gkd_loss / scale_logits: TRL's reductions, num_items_in_batch and logit options
against their definitions; the numbers against the installed TRL are parity's
(``python -m parity --only conventions_packages``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses
from kdjax.errors import InputError, InputTypeError

rng = np.random.default_rng(11)
S = jnp.asarray(rng.normal(size=(3, 5, 7)) * 3, jnp.float32)
T = jnp.asarray(rng.normal(size=(3, 5, 7)) * 3, jnp.float32)
WHERE = jnp.asarray(rng.random((3, 5)) < 0.6).at[0, 0].set(True)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_reductions_and_divisor(beta):
    per = losses.jsd(S, T, 2.0, beta)
    total = jnp.sum(jnp.where(WHERE, per, 0.0))
    n = int(WHERE.sum())
    got = lambda **kw: float(losses.gkd_loss(S, T, where=WHERE, beta=beta, temperature=2.0, **kw))
    np.testing.assert_allclose(got(), losses.masked_mean(per, WHERE), rtol=1e-6)  # batchmean
    np.testing.assert_allclose(got(reduction="sum"), total, rtol=1e-6)
    np.testing.assert_allclose(got(reduction="mean"), total / (n * 7), rtol=1e-6)
    np.testing.assert_allclose(got(reduction="mean", num_items_in_batch=4.0), total / 4.0, rtol=1e-6)  # overrides
    np.testing.assert_allclose(losses.gkd_loss(S, T, beta=beta, temperature=2.0), jnp.sum(per) / 3, rtol=1e-6)
    assert float(losses.gkd_loss(S, T, where=jnp.zeros_like(WHERE), reduction="mean")) == 0.0
    nib = jax.jit(lambda k: losses.gkd_loss(S, T, where=WHERE, beta=beta, temperature=2.0, num_items_in_batch=k))
    np.testing.assert_allclose(nib(jnp.float32(5.0)), total / 5.0, rtol=1e-6)  # traced divisor


def test_logit_options_transform_each_side():
    a = losses.scale_logits(S, 0.5, 4.0)
    np.testing.assert_allclose(a, 4.0 * jnp.tanh(0.5 * S / 4.0), rtol=1e-6)
    assert float(jnp.max(jnp.abs(a))) < 4.0
    assert losses.scale_logits(S) is S  # defaults: the logits untouched (bit for bit)
    got = losses.gkd_loss(S, T, where=WHERE, logit_scale=(0.5, 1.5), final_logit_softcapping=(None, 6.0))
    want = losses.masked_mean(losses.jsd(0.5 * S, 6.0 * jnp.tanh(1.5 * T / 6.0)), WHERE)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    both = losses.gkd_loss(S, T, logit_scale=2.0, final_logit_softcapping=5.0)
    np.testing.assert_allclose(both, losses.gkd_loss(S, T, logit_scale=(2.0, 2.0), final_logit_softcapping=(5.0, 5.0)))
    g = jax.grad(lambda x: losses.gkd_loss(x, T, final_logit_softcapping=3.0))(S)
    assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("kwargs, error, words", [
    ({"reduction": "none"}, InputError, r"reduction: expected one of \('batchmean', 'sum', 'mean'\), got 'none'"),
    ({"num_items_in_batch": 0}, InputError, "num_items_in_batch: expected a finite number > 0, got 0.0"),
    ({"num_items_in_batch": "7"}, InputTypeError, "num_items_in_batch: expected a number, got str"),
    ({"final_logit_softcapping": -1.0}, InputError, "final_logit_softcapping: expected a finite number > 0, got -1.0"),
    ({"logit_scale": float("nan")}, InputError, "logit_scale: expected a finite number, got nan"),
    ({"logit_scale": (1.0, 2.0, 3.0)}, InputError, r"logit_scale: expected one value or a \(student, teacher\) pair"),
    ({"beta": 1.5}, InputError, r"beta: expected a number in \[0, 1\], got 1.5"),
    ({"where": jnp.ones((3, 4), bool)}, InputError, r"where: expected shape \(3, 5\)"),
])
def test_errors_name_expected_and_got(kwargs, error, words):
    with pytest.raises(error, match=words):
        losses.gkd_loss(S, T, **kwargs)
