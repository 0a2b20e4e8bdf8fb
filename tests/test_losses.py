"""The loss against an independent float64 NumPy/SciPy evaluation of the seed's formula."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax, softmax, xlogy

from kdjax import distillation_loss, hard_ce, soft_kl


def reference_loss(s, t, y, T, alpha):
    """torch semantics: kl_div(log_softmax(s/T), softmax(t/T), 'batchmean') * T^2, CE mean."""
    p = softmax(t / T, axis=1)
    log_q = log_softmax(s / T, axis=1)
    kl = (xlogy(p, p) - p * log_q).sum() / s.shape[0]
    ce = -log_softmax(s, axis=1)[np.arange(len(y)), y].mean()
    return alpha * kl * T**2 + (1 - alpha) * ce, kl, ce


def make_logits(rng, scale, shape=(16, 7)):
    return rng.standard_normal(shape) * scale, rng.standard_normal(shape) * scale


GRID = list(itertools.product([0.5, 1.0, 3.0, 20.0], [0.0, 0.3, 0.7, 1.0], [1.0, 30.0, 1e3]))


@pytest.mark.parametrize("T,alpha,scale", GRID)
def test_loss_matches_numpy_float64(T, alpha, scale):
    rng = np.random.default_rng(0)
    s, t = make_logits(rng, scale)
    y = rng.integers(0, 7, size=16)
    want, kl, ce = reference_loss(s, t, y, T, alpha)
    with jax.enable_x64(True):
        got = distillation_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), T, alpha)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(float(jnp.mean(soft_kl(jnp.asarray(s), jnp.asarray(t), T))),
                                   kl, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(float(jnp.mean(hard_ce(jnp.asarray(s), jnp.asarray(y)))),
                                   ce, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T,alpha,scale", GRID)
def test_loss_float32_close_and_finite(T, alpha, scale):
    rng = np.random.default_rng(1)
    s, t = make_logits(rng, scale)
    y = rng.integers(0, 7, size=16)
    want, _, _ = reference_loss(s.astype(np.float32).astype(np.float64),
                                t.astype(np.float32).astype(np.float64), y, T, alpha)
    got = distillation_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                            jnp.asarray(y), T, alpha)
    assert got.dtype == jnp.float32 and np.isfinite(float(got))
    np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-5 * max(1.0, scale))


@pytest.mark.parametrize("T,alpha", list(itertools.product([0.5, 1.0, 3.0, 20.0], [0.0, 0.3, 0.7, 1.0])))
def test_grad_matches_closed_form(T, alpha):
    """d/ds = alpha*T*(softmax(s/T) - softmax(t/T))/B + (1-alpha)*(softmax(s) - onehot(y))/B."""
    rng = np.random.default_rng(2)
    s, t = make_logits(rng, 3.0, (8, 5))
    y = rng.integers(0, 5, size=8)
    B = s.shape[0]
    want = (alpha * T * (softmax(s / T, 1) - softmax(t / T, 1)) / B
            + (1 - alpha) * (softmax(s, 1) - np.eye(5)[y]) / B)
    with jax.enable_x64(True):
        grad_s, grad_t = jax.grad(distillation_loss, argnums=(0, 1))(
            jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), T, alpha)
    np.testing.assert_allclose(np.asarray(grad_s), want, atol=1e-13, rtol=1e-11)
    np.testing.assert_array_equal(np.asarray(grad_t), 0.0)  # teacher is stop_gradient


def test_extreme_logits_finite_values_and_grads():
    s = jnp.array([[1e3, -1e3, 0.0], [-1e3, 1e3, 5.0]], jnp.float32)
    t = jnp.array([[-1e3, 1e3, 0.0], [1e3, -1e3, -5.0]], jnp.float32)
    y = jnp.array([1, 0])
    for T in (0.5, 1.0, 4.0, 20.0):
        val, g = jax.value_and_grad(distillation_loss)(s, t, y, T, 0.5)
        assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
        # teacher probabilities underflow to exactly 0 here; those classes contribute 0
        assert float(val) > 100


def test_underflowing_teacher_probability_matches_reference():
    s = np.array([[0.0, 1.0, 2.0]])
    t = np.array([[0.0, 1000.0, -1000.0]])  # softmax(t) has exact zeros
    y = np.array([1])
    want, _, _ = reference_loss(s, t, y, 1.0, 0.7)
    with jax.enable_x64(True):
        got = distillation_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), 1.0, 0.7)
    np.testing.assert_allclose(float(got), want, rtol=1e-12)


def test_traced_temperature_and_alpha():
    s = jnp.array([[1.0, 2.0, 0.5]]); t = jnp.array([[0.3, 0.1, 2.0]]); y = jnp.array([2])
    f = jax.jit(distillation_loss)
    np.testing.assert_allclose(float(f(s, t, y, 2.0, 0.4)),
                               float(distillation_loss(s, t, y, 2.0, 0.4)), rtol=1e-6)
    vals = jax.vmap(distillation_loss, in_axes=(None, None, None, 0, 0))(
        s, t, y, jnp.array([1.0, 2.0]), jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(np.asarray(vals)[0], float(hard_ce(s, y)[0]), rtol=1e-6)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(temperature=0.0), ValueError, ["temperature", "> 0", "0.0"]),
    (dict(temperature=-1.0), ValueError, ["temperature", "-1.0"]),
    (dict(temperature=float("nan")), ValueError, ["temperature", "nan"]),
    (dict(temperature=float("inf")), ValueError, ["temperature", "inf"]),
    (dict(alpha=1.5), ValueError, ["alpha", "[0, 1]", "1.5"]),
    (dict(alpha=-0.1), ValueError, ["alpha", "-0.1"]),
    (dict(alpha=float("nan")), ValueError, ["alpha", "nan"]),
])
def test_bad_hyperparameters(kwargs, exc, words):
    s = jnp.zeros((2, 3)); y = jnp.array([0, 1])
    with pytest.raises(exc) as e:
        distillation_loss(s, s, y, **{"temperature": 3.0, "alpha": 0.7, **kwargs})
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("s,t,y,exc,words", [
    (jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.array([0, 1]), ValueError, ["(2, 3)", "(2, 4)"]),
    (jnp.zeros((3,)), jnp.zeros((3,)), jnp.array([0]), ValueError, ["labels: expected shape ()", "(3,)", "(1,)"]),
    (jnp.zeros(()), jnp.zeros(()), jnp.array(0), ValueError, ["[..., num_classes]", "scalar"]),
    (jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.array([0, 1, 2]), ValueError, ["(2,)", "(3,)"]),
    (jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.array([0.0, 1.0]), TypeError, ["integer", "float32"]),
    (jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.array([0, 3]), ValueError, ["[0, 3)", "[0, 3]"]),
    (jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.array([-1, 0]), ValueError, ["[0, 3)", "-1"]),
    (jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)), jnp.array([0, 1]), TypeError, ["floating", "int32"]),
    (jnp.zeros((0, 3)), jnp.zeros((0, 3)), jnp.zeros((0,), jnp.int32), ValueError, ["non-empty", "(0, 3)"]),
])
def test_bad_inputs_name_expected_and_got(s, t, y, exc, words):
    with pytest.raises(exc) as e:
        distillation_loss(s, t, y)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_alpha_endpoints_are_pure_terms():
    rng = np.random.default_rng(3)
    s, t = (jnp.asarray(a, jnp.float32) for a in make_logits(rng, 2.0, (6, 4)))
    y = jnp.asarray(rng.integers(0, 4, 6))
    assert float(distillation_loss(s, t, y, 3.0, 0.0)) == float(jnp.mean(hard_ce(s, y)))
    np.testing.assert_allclose(float(distillation_loss(s, t, y, 3.0, 1.0)),
                               9.0 * float(jnp.mean(soft_kl(s, t, 3.0))), rtol=1e-6)
