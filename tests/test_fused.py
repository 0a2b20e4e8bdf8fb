"""kdjax.fused.linear_distillation_loss: the naive loss's value and gradients, in chunks,
under jit and vmap, without a [tokens, vocab] array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.errors import InputError, InputTypeError
from kdjax.fused import linear_distillation_loss
from kdjax.losses import distillation_loss

B, L, D, DT, V = 2, 7, 8, 6, 33


def inputs(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    f = lambda *shape, s=1.0: jnp.asarray(rng.normal(size=shape) * s, dtype)
    y = rng.integers(0, V, (B, L))
    where = rng.random((B, L)) < 0.7
    return dict(h=f(B, L, D), w=f(D, V, s=0.3), b=f(V), th=f(B, L, DT), tw=f(DT, V), tb=f(V),
                y=jnp.asarray(np.where(where, y, -100)), where=jnp.asarray(where))


def naive(x, h, w, b, teacher, where, divergence, T=2.0, alpha=0.6, beta=0.3):
    s = h @ w if b is None else h @ w + b[None, None, :]
    return distillation_loss(s, teacher, x["y"], T, alpha, where=where, divergence=divergence, beta=beta)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden"])
@pytest.mark.parametrize("masked,bias,chunk", [(True, True, 4), (False, False, 5), (True, False, 100)])
def test_value_and_gradients_equal_the_naive_loss_float64(divergence, teacher_kind, masked, bias, chunk):
    with jax.enable_x64(True):
        x = inputs()
        t_logits = x["th"] @ x["tw"] + x["tb"][None, None, :]
        where = x["where"] if masked else None
        y = x["y"] if masked else jnp.abs(x["y"]) % V
        x = dict(x, y=y)
        teacher = (dict(teacher_logits=t_logits) if teacher_kind == "logits"
                   else dict(teacher_hidden=x["th"], teacher_kernel=x["tw"], teacher_bias=x["tb"]))

        def fused(h, w, b):
            return linear_distillation_loss(h, w, y, student_bias=b, temperature=2.0, alpha=0.6, where=where,
                                            divergence=divergence, beta=0.3, chunk_size=chunk, **teacher)

        b = x["b"] if bias else None
        want, g_want = jax.value_and_grad(lambda h, w, b: naive(x, h, w, b, t_logits, where, divergence),
                                          (0, 1, 2) if bias else (0, 1))(x["h"], x["w"], b)
        got, g_got = jax.jit(jax.value_and_grad(fused, (0, 1, 2) if bias else (0, 1)))(x["h"], x["w"], b)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-12, atol=1e-12)
        for a, c in zip(g_got, g_want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(float(fused(x["h"], x["w"], b)), float(want), rtol=1e-12)  # no-grad path


@pytest.mark.parametrize("missing", ["zero", "symmetric_uniform"])
@pytest.mark.parametrize("masked,chunk", [(True, 4), (False, 5)])
def test_cached_topk_teacher_equals_the_naive_topk_loss_float64(missing, masked, chunk):
    """teacher_topk=(values, indices): value and gradients of kdjax.offline's
    topk_distillation_loss on the student's full logits, to float64 rounding."""
    from kdjax.offline import topk_distillation_loss, topk_logprobs

    with jax.enable_x64(True):
        x = inputs(1)
        values, indices = topk_logprobs(x["th"] @ x["tw"], 5)
        where = x["where"] if masked else None
        y = x["y"] if masked else jnp.abs(x["y"]) % V

        def fused(h, w, b, T):
            return linear_distillation_loss(h, w, y, student_bias=b, teacher_topk=(values, indices), temperature=T,
                                            alpha=0.6, where=where, missing=missing, chunk_size=chunk)

        def plain(h, w, b, T):
            return topk_distillation_loss(h @ w + b[None, None, :], values, indices, y, T, 0.6, where=where,
                                          missing=missing)

        args = (x["h"], x["w"], x["b"], jnp.asarray(2.0))
        want, g_want = jax.value_and_grad(plain, (0, 1, 2, 3))(*args)
        got, g_got = jax.jit(jax.value_and_grad(fused, (0, 1, 2, 3)))(*args)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-12)
        for a, c in zip(g_got, g_want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk", [2, 5])  # strided and contiguous chunks (14 tokens)
def test_gradients_of_temperature_alpha_beta_equal_the_naive_loss_float64(divergence, chunk):
    """Learning T, alpha or beta needs their gradients: autodiff of the naive loss's."""
    with jax.enable_x64(True):
        x = inputs(4)
        t_logits = x["th"] @ x["tw"]

        def fused(T, a, b):
            return linear_distillation_loss(x["h"], x["w"], x["y"], teacher_logits=t_logits, temperature=T, alpha=a,
                                            beta=b, where=x["where"], divergence=divergence, chunk_size=chunk)

        hyper = (jnp.float64(1.7), jnp.float64(0.35), jnp.float64(0.3))
        want = jax.grad(lambda T, a, b: distillation_loss(x["h"] @ x["w"], t_logits, x["y"], T, a, where=x["where"],
                                                          divergence=divergence, beta=b), (0, 1, 2))(*hyper)
        got = jax.jit(jax.grad(fused, (0, 1, 2)))(*hyper)
        for name, g, w in zip(("temperature", "alpha", "beta"), got, want):
            np.testing.assert_allclose(float(g), float(w), rtol=1e-11, atol=1e-13, err_msg=name)
        if divergence != "jsd":
            assert float(want[2]) == 0.0
        assert all(abs(float(w)) > 1e-3 for w in want[:2 if divergence != "jsd" else 3])  # not trivially 0


def test_vmap_over_temperatures_and_float32():
    x = inputs(1, np.float32)
    t_logits = x["th"] @ x["tw"]

    def f(T):
        return linear_distillation_loss(x["h"], x["w"], x["y"], teacher_logits=t_logits, temperature=T, alpha=0.5,
                                        where=x["where"], chunk_size=4)

    temps = jnp.array([0.5, 2.0, 8.0])
    got = jax.vmap(jax.value_and_grad(f))(temps)
    for i, T in enumerate(temps):
        want = jax.value_and_grad(lambda T: naive(x, x["h"], x["w"], None, t_logits, x["where"], "kl", T, 0.5))(T)
        np.testing.assert_allclose(float(got[0][i]), float(want[0]), rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda h: linear_distillation_loss(h, x["w"], x["y"], teacher_logits=t_logits, temperature=2.0,
                                                   alpha=0.5, where=x["where"], chunk_size=3))(x["h"])
    g0 = jax.grad(lambda h: naive(x, h, x["w"], None, t_logits, x["where"], "kl", 2.0, 0.5))(x["h"])
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-4, atol=1e-6)


def test_no_tokens_by_vocab_array():
    """The compiled value-and-gradient program's temporaries are a fraction of one
    [tokens, vocab] float32 array; the naive program's are several of them."""
    n, d, v, chunk = 1024, 32, 4096, 64
    rng = np.random.default_rng(2)
    h, w = jnp.asarray(rng.normal(size=(n, d)), jnp.float32), jnp.asarray(rng.normal(size=(d, v)) * 0.1, jnp.float32)
    th, tw = jnp.asarray(rng.normal(size=(n, d)), jnp.float32), jnp.asarray(rng.normal(size=(d, v)) * 0.1, jnp.float32)
    y = jnp.asarray(rng.integers(0, v, n))
    fused = jax.jit(jax.value_and_grad(lambda h, w: linear_distillation_loss(
        h, w, y, teacher_hidden=th, teacher_kernel=tw, temperature=2.0, alpha=0.5, chunk_size=chunk), (0, 1)))
    plain = jax.jit(jax.value_and_grad(lambda h, w: distillation_loss(h @ w, th @ tw, y, 2.0, 0.5), (0, 1)))
    one_array = n * v * 4
    fused_temp = fused.lower(h, w).compile().memory_analysis().temp_size_in_bytes
    naive_temp = plain.lower(h, w).compile().memory_analysis().temp_size_in_bytes
    assert fused_temp < one_array, (fused_temp, one_array)
    assert naive_temp > 3 * one_array and naive_temp > 8 * fused_temp, (naive_temp, fused_temp)


@pytest.mark.parametrize("n", [2048, 2047])  # strided chunks; contiguous chunks (no divisor near 128)
def test_teacher_logits_are_never_copied(n):
    """With teacher_logits= the chunks are slices of the caller's array: no padded or
    transposed [tokens, vocab] copy, so temporaries stay >= 8x below the naive loss's."""
    d, v, chunk = 64, 8192, 128
    rng = np.random.default_rng(3)
    h, w = jnp.asarray(rng.normal(size=(n, d)), jnp.float32), jnp.asarray(rng.normal(size=(d, v)) * 0.1, jnp.float32)
    t = jnp.asarray(rng.normal(size=(n, v)), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, n))
    fused = jax.jit(jax.value_and_grad(lambda h, w, t: linear_distillation_loss(
        h, w, y, teacher_logits=t, temperature=2.0, alpha=0.5, chunk_size=chunk), (0, 1)))
    plain = jax.jit(jax.value_and_grad(lambda h, w, t: distillation_loss(h @ w, t, y, 2.0, 0.5), (0, 1)))
    fused_temp = fused.lower(h, w, t).compile().memory_analysis().temp_size_in_bytes
    naive_temp = plain.lower(h, w, t).compile().memory_analysis().temp_size_in_bytes
    assert fused_temp < n * v * 4 / 2, (fused_temp, n * v * 4)
    assert naive_temp >= 8 * fused_temp, (naive_temp, fused_temp)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(chunk_size=0), InputError, ["chunk_size", "int >= 1", "0"]),
    (dict(chunk_size=-3), InputError, ["chunk_size", "-3"]),
    (dict(teacher_hidden="both"), InputError, ["teacher", "got teacher_logits, teacher_hidden, teacher_kernel"]),
    (dict(teacher_logits=None), InputError, ["teacher", "got none"]),
    (dict(teacher_logits=None, teacher_topk=(jnp.zeros((B, L, 3)), jnp.zeros((B, L, 3)))), InputError,
     ["teacher_topk", "integer indices", f"({B}, {L}, 'k')"]),
    (dict(teacher_logits=None, teacher_topk=(jnp.zeros((B, L, 3)), jnp.zeros((B, L, 3), jnp.int32)), missing="tail"),
     InputError, ["missing", "'tail'"]),
    (dict(teacher_logits=jnp.zeros((B, L, V + 1))), InputError, ["teacher_logits", f"({B}, {L}, {V})"]),
    (dict(labels=jnp.zeros((B, L + 1), jnp.int32)), InputError, ["labels", f"({B}, {L})"]),
    (dict(labels=jnp.zeros((B, L))), InputTypeError, ["labels", "integer"]),
    (dict(labels=jnp.full((B, L), V)), InputError, ["labels", f"[0, {V})", f"[{V}, {V}]"]),
    (dict(labels=jnp.full((B, L), -1)), InputError, ["labels", f"[0, {V})", "[-1, -1]"]),
    (dict(labels=jnp.full((B, L), -100), where=jnp.ones((B, L), bool).at[0, 0].set(False)), InputError,
     ["labels", "[-100, -100]"]),
    (dict(where=jnp.ones((B, L), jnp.int32)), InputTypeError, ["where", "bool"]),
    (dict(kernel=jnp.zeros((D + 1, V))), InputError, ["student_kernel", f"[{D}, vocab]"]),
    (dict(beta=2.0, divergence="jsd"), InputError, ["beta", "[0, 1]"]),
    (dict(temperature=0.0), InputError, ["temperature", "> 0"]),
])
def test_bad_input(kwargs, exc, words):
    x = inputs(3, np.float32)
    args = dict(teacher_logits=jnp.zeros((B, L, V)), temperature=2.0, alpha=0.5)
    kernel = kwargs.pop("kernel", x["w"])
    labels = kwargs.pop("labels", jnp.abs(x["y"]) % V)
    if kwargs.get("teacher_hidden") == "both":
        kwargs.update(teacher_hidden=x["th"], teacher_kernel=x["tw"])
    args.update(kwargs)
    with pytest.raises(exc) as e:
        linear_distillation_loss(x["h"], kernel, labels, **args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
