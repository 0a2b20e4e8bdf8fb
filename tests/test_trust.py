"""The library's answers to a user's mistakes: a donated state reused, numbers of the wrong
type, a single-seed interval, a test label outside the training classes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import data as kdata
from kdjax import parallel
from kdjax.errors import InputError, InputTypeError
from kdjax.app.reporting import fmt_ci
from kdjax.stats import mean_ci


@pytest.fixture(scope="module")
def run_setup(seed_data):
    d = {"x": jnp.asarray(seed_data.x_train), "y": jnp.asarray(seed_data.y_train)}
    schedule = kdata.seed_schedule(jax.random.PRNGKey(1), 500, 16, 3)
    model = kdjax.StudentMLP(8, 5)
    return model, d, schedule


def test_reusing_a_donated_state_says_so(run_setup):
    model, d, schedule = run_setup
    run = kdjax.make_run(model, "ce")
    state = kdjax.create_train_state(model, jax.random.PRNGKey(0), 50)
    new_state, _ = run(state, d, schedule, jax.random.PRNGKey(0))
    with pytest.raises(InputError, match="donated to an earlier call.*donate=False"):
        run(state, d, schedule, jax.random.PRNGKey(0))
    run(new_state, d, schedule, jax.random.PRNGKey(0))  # the returned state is the one to pass


def test_donate_false_keeps_the_callers_state(run_setup):
    model, d, schedule = run_setup
    state = kdjax.create_train_state(model, jax.random.PRNGKey(0), 50)
    kept = kdjax.make_run(model, "ce", donate=False)
    a, _ = kept(state, d, schedule, jax.random.PRNGKey(0))
    b, _ = kept(state, d, schedule, jax.random.PRNGKey(0))  # state still alive, same result
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(state))
    np.testing.assert_array_equal(np.asarray(a.params["fc1"]["kernel"]), np.asarray(b.params["fc1"]["kernel"]))
    step = kdjax.make_train_step(model, "ce", donate=False)
    batch = {k: v[:16] for k, v in d.items()}
    step(state, batch, jax.random.PRNGKey(0))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(state))


@pytest.mark.parametrize("call,exc,words", [
    (lambda: parallel.make_mesh(members=1.5), InputTypeError, ["members", "int >= 1", "1.5", "float"]),
    (lambda: parallel.make_mesh(members=True), InputTypeError, ["members", "bool"]),
    (lambda: parallel.make_mesh(members=1, data="2"), InputTypeError, ["data", "'2'", "str"]),
    (lambda: parallel.make_mesh(members=0), InputError, ["members: expected an int >= 1, got 0"]),
    (lambda: kdjax.fitting.RunConfig(steps=2.5), InputTypeError, ["steps", "2.5", "float"]),
    (lambda: kdjax.fitting.RunConfig(batch_size="64"), InputTypeError, ["batch_size", "str"]),
    (lambda: kdjax.fused.linear_distillation_loss(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.zeros(2, jnp.int32),
                                                  teacher_logits=jnp.ones((2, 4)), temperature=1.0, alpha=0.5,
                                                  chunk_size=2.0), InputTypeError, ["chunk_size", "2.0", "float"]),
])
def test_numbers_of_the_wrong_type_name_the_type(call, exc, words):
    with pytest.raises(exc) as e:
        call()
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_one_value_has_no_interval():
    m, h = mean_ci([0.9])
    assert m == 0.9 and math.isnan(h)
    assert fmt_ci((m, h)) == "0.9000 (n = 1, no interval)" and "±" not in fmt_ci((m, h))
    assert fmt_ci(mean_ci([0.5, 0.7]), signed=True).startswith("+0.6000 ± ")


def test_class_count_comes_from_the_training_labels(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), np.arange(40) % 10
    y_test = np.r_[np.arange(9), 12]  # one bad test label
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:10], y_test=y_test)
    with pytest.raises(InputError, match=r"test \(10 classes\): expected labels < 10, got maximum label 12"):
        kdata.load_npz(path)
    assert kdata.load_npz(path, num_classes=13).num_classes == 13
    np.savez(path, x_train=x, y_train=y, x_test=x[:10], y_test=np.arange(10))
    assert kdata.load_npz(path).num_classes == 10
    with pytest.raises(InputTypeError, match=r"num_classes: expected an int >= 2, got 1.5 \(float\)"):
        kdata.load_npz(path, num_classes=1.5)
