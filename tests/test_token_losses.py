"""Token-level losses: masks over [..., classes], the divergence family, DKD, against
float64 NumPy/SciPy formulas; properties with hypothesis; errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import log_softmax, logsumexp, softmax

from kdjax import losses
from kdjax.errors import InputError, InputTypeError
from kdjax.losses import distillation_loss, dkd, jsd, reverse_kl, soft_kl

B, L, C = 3, 5, 7


def numpy_kl(p_log, q_log):
    return np.sum(np.where(np.exp(p_log) > 0, np.exp(p_log) * (p_log - q_log), 0.0), -1)


def numpy_divergence(s, t, T, name, beta=0.5):
    """Independent float64 formulas: P = softmax(t/T) teacher, Q = softmax(s/T) student."""
    lp, lq = log_softmax(t / T, -1), log_softmax(s / T, -1)
    if name == "kl" or (name == "jsd" and beta == 0):
        return numpy_kl(lp, lq)
    if name == "reverse_kl" or (name == "jsd" and beta == 1):
        return numpy_kl(lq, lp)
    m = beta * np.exp(lp) + (1 - beta) * np.exp(lq)
    return beta * numpy_kl(lp, np.log(m)) + (1 - beta) * numpy_kl(lq, np.log(m))


def inputs(seed=0, scale=3.0, shape=(B, L, C)):
    rng = np.random.default_rng(seed)
    s, t = rng.standard_normal(shape) * scale, rng.standard_normal(shape) * scale
    y = rng.integers(0, shape[-1], shape[:-1])
    where = rng.random(shape[:-1]) < 0.6
    where.flat[0] = True
    y = np.where(where, y, -100)  # masked positions hold padding labels
    return s, t, y, where


@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                             ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (3.0, 0.7), (0.5, 1.0), (20.0, 0.0)])
def test_masked_3d_loss_matches_numpy_float64(divergence, beta, T, alpha):
    s, t, y, where = inputs()
    div = numpy_divergence(s, t, T, divergence, beta)[where].mean()
    ce = -np.take_along_axis(log_softmax(s, -1), np.where(where, y, 0)[..., None], -1)[..., 0][where].mean()
    want = alpha * T**2 * div + (1 - alpha) * ce
    with jax.enable_x64(True):
        got = distillation_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), T, alpha,
                                where=jnp.asarray(where), divergence=divergence, beta=beta)
    np.testing.assert_allclose(float(got), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn,name", [(soft_kl, "kl"), (reverse_kl, "reverse_kl")])
def test_per_position_divergences_any_rank(fn, name):
    s, t, _, _ = inputs(1)
    with jax.enable_x64(True):
        for shape in ((B * L, C), (B, L, C), (1, B, L, C), (C,)):
            got = np.asarray(fn(jnp.asarray(s.reshape(*shape[:-1], -1) if len(shape) > 1 else s[0, 0]),
                                jnp.asarray(t.reshape(*shape[:-1], -1) if len(shape) > 1 else t[0, 0]), 2.0))
            want = numpy_divergence(s, t, 2.0, name).reshape(shape[:-1]) if len(shape) > 1 else \
                numpy_divergence(s[0, 0], t[0, 0], 2.0, name)
            assert got.shape == shape[:-1]
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_no_where_equals_all_true_and_2d_is_the_seeds_loss():
    s, t, _, _ = inputs(2)
    y = np.random.default_rng(2).integers(0, C, (B, L))
    args = (jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y), 3.0, 0.7)
    a = distillation_loss(*args)
    b = distillation_loss(*args, where=jnp.ones((B, L), bool))
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    # 3-D without where = the 2-D (seed's batchmean) loss of the flattened positions
    flat = distillation_loss(args[0].reshape(-1, C), args[1].reshape(-1, C), args[2].reshape(-1), 3.0, 0.7)
    np.testing.assert_allclose(float(a), float(flat), rtol=1e-6)


def test_empty_mask_gives_zero_and_finite_gradients():
    s, t, y, _ = inputs(3)
    none = jnp.zeros((B, L), bool)
    for div in ("kl", "reverse_kl", "jsd"):
        val, g = jax.value_and_grad(distillation_loss)(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                                      jnp.asarray(np.abs(y) % C), 2.0, 0.5, where=none,
                                                      divergence=div)
        assert float(val) == 0.0 and np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("scale,T", list(itertools.product([1e4], [0.05, 1.0, 100.0])))
def test_finite_at_extreme_logits_and_temperatures(scale, T):
    s, t, y, where = inputs(4, scale)
    y = np.abs(y) % C
    s32, t32, yj = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y)
    for div in ("kl", "reverse_kl", "jsd"):
        val, g = jax.value_and_grad(distillation_loss)(s32, t32, yj, T, 0.5, where=jnp.asarray(where), divergence=div)
        assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g))), div
    val, g = jax.value_and_grad(lambda s: jnp.mean(dkd(s, t32, yj, T, 1.0, 8.0)))(s32)
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))


def mdistiller_dkd(s, t, y, alpha, beta, T):
    """mdistiller/distillers/DKD.py's dkd_loss, in NumPy float64 (its -1000 masking trick too)."""
    gt = np.eye(s.shape[-1], dtype=bool)[y]
    ps, pt = softmax(s / T, 1), softmax(t / T, 1)
    cat = lambda p: np.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)
    ps2, pt2 = cat(ps), cat(pt)
    tckd = (pt2 * (np.log(pt2) - np.log(ps2))).sum() * T**2 / len(y)
    pt_part2 = softmax(t / T - 1000.0 * gt, 1)
    log_ps_part2 = log_softmax(s / T - 1000.0 * gt, 1)
    nckd = np.sum(np.where(pt_part2 > 0, pt_part2 * (np.log(np.where(pt_part2 > 0, pt_part2, 1)) - log_ps_part2), 0))
    return alpha * tckd + beta * nckd * T**2 / len(y)


@pytest.mark.parametrize("T,alpha,beta", [(4.0, 1.0, 8.0), (1.0, 0.5, 2.0), (2.0, 1.0, 0.0)])
def test_dkd_mean_is_mdistillers_dkd_loss(T, alpha, beta):
    rng = np.random.default_rng(5)
    s, t = rng.standard_normal((16, 10)) * 3, rng.standard_normal((16, 10)) * 3
    y = rng.integers(0, 10, 16)
    with jax.enable_x64(True):
        got = jnp.mean(dkd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), T, alpha, beta))
    np.testing.assert_allclose(float(got), mdistiller_dkd(s, t, y, alpha, beta, T), rtol=1e-10)


def test_jsd_traced_beta_selects_the_same_branch():
    s, t, _, _ = inputs(6)
    s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    f = jax.jit(lambda b: jsd(s, t, 2.0, b))
    for beta in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(np.asarray(f(beta)), np.asarray(jsd(s, t, 2.0, beta)), rtol=2e-5, atol=1e-6)


# ----------------------------------------------------------------------------- properties

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
logit_arrays = arrays(np.float32, (4, C), elements=st.floats(-30, 30, width=32))
_jsd = jax.jit(jsd)
_rkl = jax.jit(reverse_kl)
_loss = jax.jit(distillation_loss, static_argnames="divergence")


@SETTINGS
@given(logit_arrays, logit_arrays, st.floats(0.1, 20.0))
def test_jsd_symmetric_at_half_and_at_most_log2(s, t, T):
    a, b = np.asarray(_jsd(s, t, T, 0.5)), np.asarray(_jsd(t, s, T, 0.5))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert np.all(a <= np.log(2) + 1e-6) and np.all(a >= -1e-6)


@SETTINGS
@given(logit_arrays, logit_arrays, st.floats(0.1, 20.0))
def test_reverse_kl_nonnegative(s, t, T):
    assert np.all(np.asarray(_rkl(s, t, T)) >= -1e-5)


@SETTINGS
@given(logit_arrays, st.floats(0.1, 20.0), st.floats(0.0, 1.0))
def test_divergences_zero_for_equal_inputs(s, T, beta):
    for value in (soft_kl(s, s, T), reverse_kl(s, s, T), _jsd(s, s, T, beta)):
        np.testing.assert_allclose(np.asarray(value), 0.0, atol=1e-5)


@SETTINGS
@given(logit_arrays, logit_arrays, arrays(np.float32, (4, C), elements=st.floats(-1e3, 1e3, width=32)),
       st.sampled_from(losses.DIVERGENCES))
def test_masked_positions_change_nothing(s, t, noise, divergence):
    where = np.array([True, False, True, False])
    y = np.array([1, -100, 2, 7777], np.int32)  # garbage labels where masked
    s2, t2 = s.copy(), t.copy()
    s2[~where], t2[~where] = noise[~where], -noise[~where]
    a = _loss(s, t, y, 2.0, 0.6, where=where, divergence=divergence)
    b = _loss(s2, t2, y, 2.0, 0.6, where=where, divergence=divergence)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(where=jnp.ones((B, L + 1), bool)), InputError, ["where", f"({B}, {L})", f"({B}, {L + 1})"]),
    (dict(where=jnp.ones((B, L), jnp.float32)), InputTypeError, ["where", "bool", "float32"]),
    (dict(divergence="jsd", beta=1.5), InputError, ["beta", "[0, 1]", "1.5"]),
    (dict(divergence="jsd", beta=-0.1), InputError, ["beta", "-0.1"]),
    (dict(divergence="tvd"), InputError, ["divergence", "tvd", "kl"]),
    (dict(labels=jnp.zeros((B, L + 1), jnp.int32)), InputError, ["labels", f"({B}, {L})", f"({B}, {L + 1})"]),
    (dict(labels=jnp.full((B, L), C, jnp.int32)), InputError, ["labels", f"[0, {C})"]),
])
def test_bad_token_inputs(kwargs, exc, words):
    s = jnp.zeros((B, L, C))
    args = {"labels": jnp.zeros((B, L), jnp.int32), **kwargs}
    labels = args.pop("labels")
    with pytest.raises(exc) as e:
        distillation_loss(s, s, labels, 2.0, 0.5, **args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    with pytest.raises(InputError, match="at least 2 classes"):
        dkd(jnp.zeros((3, 1)), jnp.zeros((3, 1)), jnp.zeros(3, jnp.int32))
    with pytest.raises(InputError, match="beta"):
        dkd(jnp.zeros((3, 4)), jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32), beta=-1.0)


def test_dkd_and_hard_ce_take_where_with_ignore_index_labels():
    """Padding labels (-100) are accepted where ``where`` is false: those positions give 0,
    the valid ones what the unmasked call gives on the valid rows alone."""
    with jax.enable_x64(True):
        s, t, y, mask = inputs(7)  # y: -100 where mask is false
        y_pad = jnp.asarray(y)
        s, t, m = jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask)
        got_dkd = dkd(s, t, y_pad, 4.0, 1.0, 8.0, where=m)
        got_ce = losses.hard_ce(s, y_pad, where=m)
        np.testing.assert_array_equal(np.asarray(got_dkd)[~mask], 0.0)
        np.testing.assert_array_equal(np.asarray(got_ce)[~mask], 0.0)
        rows = jnp.asarray(np.argwhere(mask).T)
        valid = lambda a: a[tuple(rows)]
        np.testing.assert_allclose(np.asarray(got_dkd)[mask], dkd(valid(s), valid(t), valid(jnp.asarray(y)), 4.0, 1.0,
                                                                  8.0), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(np.asarray(got_ce)[mask], losses.hard_ce(valid(s), valid(jnp.asarray(y))),
                                   rtol=1e-14, atol=1e-15)
        grad = jax.grad(lambda a: losses.masked_mean(dkd(a, t, y_pad, 4.0, 1.0, 8.0, where=m), m))(s)
        assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[~mask] == 0)
        with pytest.raises(InputError, match=r"labels: expected values in \[0, 7\), got values in \[-100"):
            dkd(s, t, y_pad, 4.0)  # no where: padding labels are refused, never silently 0
        with pytest.raises(InputError, match=r"labels: expected values in \[0, 7\)"):
            losses.hard_ce(s, y_pad)
