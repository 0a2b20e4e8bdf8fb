import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax


def init(model, input_dim=50, seed=0):
    return kdjax.create_train_state(model, jax.random.PRNGKey(seed), input_dim).params


def test_seed_parameter_counts():
    assert kdjax.param_count(init(kdjax.TeacherMLP(256, 5))) == 112_389
    assert kdjax.param_count(init(kdjax.StudentMLP(64, 5))) == 3_589


def test_layer_names_and_shapes_match_the_seed():
    t = init(kdjax.TeacherMLP(256, 5))
    assert sorted(t) == ["fc1", "fc2", "fc3", "fc4"]
    assert t["fc3"]["kernel"].shape == (256, 128) and t["fc4"]["bias"].shape == (5,)
    s = init(kdjax.StudentMLP(64, 5))
    assert sorted(s) == ["fc1", "fc2"] and s["fc1"]["kernel"].shape == (50, 64)


def test_init_is_torch_uniform():
    """Weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)): bounds hold and are nearly reached."""
    params = init(kdjax.TeacherMLP(256, 5), input_dim=50)
    for layer, fan_in in [("fc1", 50), ("fc2", 256), ("fc3", 256), ("fc4", 128)]:
        bound = 1 / math.sqrt(fan_in)
        for leaf in ("kernel", "bias"):
            w = np.asarray(params[layer][leaf])
            assert np.abs(w).max() <= bound
        w = np.asarray(params[layer]["kernel"])
        assert np.abs(w).max() > 0.95 * bound  # not a narrower init
        # uniform: variance bound^2 / 3
        np.testing.assert_allclose(w.var(), bound**2 / 3, rtol=0.1)
        assert np.any(np.asarray(params[layer]["bias"]) != 0)  # biases are not zero-init


@pytest.mark.parametrize("model", [kdjax.TeacherMLP(32, 3), kdjax.StudentMLP(8, 3),
                                   kdjax.MLP((16, 12, 8), 4)])
def test_host_init_has_flax_init_tree(model):
    """init_params builds exactly the tree model.init builds (names, shapes, dtypes)."""
    host = kdjax.models.init_params(model, 0, 7)
    flax_params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 7)))["params"]
    assert jax.tree_util.tree_structure(host) == jax.tree_util.tree_structure(flax_params)
    for a, b in zip(jax.tree_util.tree_leaves(host), jax.tree_util.tree_leaves(flax_params)):
        assert isinstance(a, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype
    # and it runs through the model
    assert model.apply({"params": host}, jnp.ones((2, 7))).shape[-1] in (3, 4)


def test_host_init_keys():
    """Same key -> same params; a JAX key, its raw words and a typed key agree; keys differ."""
    m = kdjax.StudentMLP(8, 3)
    leaves = lambda k: jax.tree_util.tree_leaves(kdjax.models.init_params(m, k, 5))
    legacy = jax.random.PRNGKey(3)
    for a, b in zip(leaves(legacy), leaves(np.asarray(legacy))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(leaves(legacy), leaves(jax.random.wrap_key_data(legacy))):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(leaves(legacy)[1], leaves(jax.random.PRNGKey(4))[1])
    np.testing.assert_array_equal(leaves(7)[1], leaves(7)[1])


def test_host_init_rejects_bad_input():
    with pytest.raises(ValueError, match="input_dim"):
        kdjax.models.init_params(kdjax.StudentMLP(8, 3), 0, 0)

    class Other(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="head")(x)

    with pytest.raises(TypeError, match="kdjax model"):
        kdjax.models.init_params(Other(), 0, 3)


def test_dropout_only_in_train_mode():
    model = kdjax.TeacherMLP(64, 3)
    params = init(model, 10)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 10))
    a = model.apply({"params": params}, x)
    b = model.apply({"params": params}, x, train=False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    d = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not np.allclose(np.asarray(c), np.asarray(a))
    assert not np.allclose(np.asarray(c), np.asarray(d))
    with pytest.raises(Exception):  # train=True without a dropout key
        model.apply({"params": params}, x, train=True)


def test_student_has_no_dropout():
    model = kdjax.StudentMLP(16, 3)
    params = init(model, 10)
    x = jnp.ones((4, 10))
    np.testing.assert_array_equal(
        np.asarray(model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})),
        np.asarray(model.apply({"params": params}, x)))


def test_model_input_errors():
    model = kdjax.StudentMLP(16, 3)
    params = init(model, 10)
    with pytest.raises(ValueError, match=r"\[batch, features\].*\(10,\)"):
        model.apply({"params": params}, jnp.ones((10,)))
    with pytest.raises(TypeError, match="floating.*int32"):
        model.apply({"params": params}, jnp.ones((2, 10), jnp.int32))
