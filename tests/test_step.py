"""kdjax.train.step: the train step and the fused run (``make_train_step``, ``make_run``)
equal to a Python loop of steps (float32, and float64 to a few ulps), in chunks, with a
cached or an online teacher; new temperatures, alphas and learning rates without a
recompile; out-of-range schedules refused before running; the same seed the same numbers;
alpha = 0 the cross-entropy bitwise; the step's errors. The ``setup`` fixture (a trained
teacher, its logits, a student and a schedule) is conftest.py's, shared with
tests/test_sweep.py and tests/test_evaluation.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import data as kdata
from kdjax import sweep
from conftest import STEPS, assert_trees_close


def fresh(model, seed=3):
    return kdjax.create_train_state(model, jax.random.PRNGKey(seed), 50)


def loop(step, state, d, schedule, rng, *args):
    losses = []
    for idx in schedule:
        batch = {k: jnp.take(v, idx, axis=0) for k, v in d.items()}
        state, m = step(state, batch, rng, *args)
        losses.append(m["loss"])
    return state, jnp.stack(losses)


@pytest.mark.parametrize("mode", ["teacher_ce", "student_ce", "student_kd"])
def test_fused_run_equals_python_loop(setup, mode):
    s = setup
    model = s["teacher"] if mode == "teacher_ce" else s["student"]
    objective = "kd" if mode == "student_kd" else "ce"
    d = dict(s["d"], teacher_logits=s["tlogits"]) if objective == "kd" else s["d"]
    args = (kdjax.make_hyper(3.0, 0.7),) if objective == "kd" else ()
    fused, f_loss = kdjax.make_run(model, objective)(fresh(model), d, s["schedule"], s["rng"], *args)
    looped, l_loss = loop(kdjax.make_train_step(model, objective), fresh(model), d,
                          s["schedule"], s["rng"], *args)
    assert int(fused.step) == int(looped.step) == STEPS
    assert_trees_close(fused.params, looped.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(f_loss["loss"]), np.asarray(l_loss), rtol=1e-5, atol=1e-6)


def test_fused_run_equals_python_loop_float64_tight(setup):
    """In float64 the two compiled paths agree to rounding of a few ulps."""
    s = setup
    with jax.enable_x64(True):
        model = kdjax.TeacherMLP(32, 5, dtype=jnp.float64)
        d = {"x": s["d"]["x"].astype(jnp.float64), "y": s["d"]["y"]}
        st = lambda: kdjax.create_train_state(model, jax.random.PRNGKey(3), 50)
        fused, _ = kdjax.make_run(model, "ce")(st(), d, s["schedule"], s["rng"])
        looped, _ = loop(kdjax.make_train_step(model, "ce"), st(), d, s["schedule"], s["rng"])
        assert_trees_close(fused.params, looped.params, rtol=0, atol=1e-13)


def test_chunked_run_equals_one_run(setup):
    s = setup
    d = dict(s["d"], teacher_logits=s["tlogits"])
    run = kdjax.make_run(s["student"], "kd")
    h = kdjax.make_hyper(2.0, 0.5)
    whole, _ = run(fresh(s["student"]), d, s["schedule"], s["rng"], h)
    part = fresh(s["student"])
    for chunk in jnp.split(s["schedule"], 3):
        part, _ = run(part, d, chunk, s["rng"], h)
    assert_trees_close(whole.params, part.params, rtol=1e-6, atol=1e-7)


def test_cached_and_online_teacher_same_trajectory(setup):
    s = setup
    h = kdjax.make_hyper(3.0, 0.7)
    cached, c_loss = kdjax.make_run(s["student"], "kd")(
        fresh(s["student"]), dict(s["d"], teacher_logits=s["tlogits"]), s["schedule"], s["rng"], h)
    online, o_loss = kdjax.make_run(s["student"], "kd", teacher=s["teacher"])(
        fresh(s["student"]), s["d"], s["schedule"], s["rng"], h, s["tparams"])
    np.testing.assert_allclose(np.asarray(c_loss["loss"]), np.asarray(o_loss["loss"]), rtol=1e-5, atol=1e-6)
    assert_trees_close(cached.params, online.params, rtol=1e-5, atol=1e-6)
    # and distillation did something: the cached teacher logits are not ignored
    ce_only, _ = kdjax.make_run(s["student"], "ce")(fresh(s["student"]), s["d"], s["schedule"], s["rng"])
    assert not np.allclose(np.asarray(ce_only.params["fc1"]["kernel"]),
                           np.asarray(cached.params["fc1"]["kernel"]))


def test_new_hyperparameters_do_not_recompile(setup):
    s = setup
    d = dict(s["d"], teacher_logits=s["tlogits"])
    run = kdjax.make_run(s["student"], "kd")
    _, l1 = run(fresh(s["student"]), d, s["schedule"], s["rng"], kdjax.make_hyper(3.0, 0.7))
    assert run._cache_size() == 1
    _, l2 = run(fresh(s["student"]), d, s["schedule"], s["rng"], kdjax.make_hyper(8.0, 0.1))
    state = kdjax.set_learning_rate(fresh(s["student"]), 3e-3)
    _, l3 = run(state, d, s["schedule"], s["rng"], kdjax.make_hyper(1.5, 1.0))
    assert run._cache_size() == 1, "changing temperature/alpha/learning rate recompiled"
    # ...and the new values were really used
    assert not np.allclose(np.asarray(l1["loss"]), np.asarray(l2["loss"]))
    assert not np.allclose(np.asarray(l2["loss"][1:]), np.asarray(l3["loss"][1:]))


@pytest.mark.parametrize("bad", [500, -1])
def test_out_of_range_schedule_is_refused_before_running(setup, bad):
    """jnp.take inside the scan would read NaN features and garbage labels for these."""
    s = setup
    schedule = np.array(s["schedule"])
    schedule[3, 7] = bad
    run = kdjax.make_run(s["student"], "ce")
    state = fresh(s["student"])
    with pytest.raises(ValueError, match=rf"schedule: expected indices in \[0, 500\).*{bad}"):
        run(state, s["d"], schedule, s["rng"])
    assert run._cache_size() == 0  # refused before compiling
    np.asarray(state.params["fc1"]["kernel"])  # and the state was not donated
    states = sweep.init_members(s["student"], sweep.member_keys([0, 1])["init"], 50)
    vrun = sweep.make_sweep_run(s["student"], "ce")
    with pytest.raises(ValueError, match="schedule: expected indices"):
        vrun(states, s["d"], np.stack([s["schedule"], schedule]), sweep.member_keys([0, 1])["dropout"], None)
    # in range, the same call runs
    run(state, s["d"], s["schedule"], s["rng"])


def test_learning_rate_is_used(setup):
    s = setup
    run = kdjax.make_run(s["student"], "ce")
    base = fresh(s["student"])
    p0 = np.asarray(base.params["fc2"]["bias"])
    one = kdjax.set_learning_rate(fresh(s["student"]), 1e-3)
    ten = kdjax.set_learning_rate(fresh(s["student"]), 1e-2)
    a, _ = run(one, s["d"], s["schedule"][:1], s["rng"])
    b, _ = run(ten, s["d"], s["schedule"][:1], s["rng"])
    # Adam's first step moves each weight by ~lr (sign of the gradient)
    np.testing.assert_allclose(np.abs(np.asarray(a.params["fc2"]["bias"]) - p0), 1e-3, rtol=1e-2)
    np.testing.assert_allclose(np.abs(np.asarray(b.params["fc2"]["bias"]) - p0), 1e-2, rtol=1e-2)


def test_training_lowers_the_loss(seed_data):
    ds = seed_data
    d = {"x": jnp.asarray(ds.x_train), "y": jnp.asarray(ds.y_train)}
    model = kdjax.StudentMLP(64, 5)
    state = fresh(model)
    before = kdjax.evaluate(model, state.params, d["x"], d["y"])
    sched = kdata.seed_schedule(jax.random.PRNGKey(0), 500, 64, 200)
    state, losses = kdjax.make_run(model, "ce")(state, d, sched, jax.random.PRNGKey(0))
    after = kdjax.evaluate(model, state.params, d["x"], d["y"])
    assert float(after["loss"]) < float(before["loss"]) - 0.1
    assert float(np.mean(losses["loss"][-20:])) < float(np.mean(losses["loss"][:20]))
    assert float(after["accuracy"]) > 0.3  # memorising random labels beats chance (0.2)


def test_train_step_errors(setup):
    s = setup
    step = kdjax.make_train_step(s["student"], "kd", jit=False)
    batch = {"x": s["d"]["x"][:4], "y": s["d"]["y"][:4]}
    with pytest.raises(ValueError, match="Hyper"):
        step(fresh(s["student"]), dict(batch, teacher_logits=s["tlogits"][:4]), s["rng"], None)
    with pytest.raises(ValueError, match="teacher_logits"):
        step(fresh(s["student"]), batch, s["rng"], kdjax.make_hyper())
    with pytest.raises(ValueError, match="objective"):
        kdjax.make_train_step(s["student"], "mse")
    with pytest.raises(ValueError, match="temperature"):
        kdjax.make_hyper(0.0, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        kdjax.make_hyper(2.0, [0.5, 1.2])


def test_same_seed_same_numbers(setup):
    s = setup
    run = kdjax.make_run(s["teacher"], "ce")
    a, la = run(fresh(s["teacher"]), s["d"], s["schedule"], s["rng"])
    b, lb = run(fresh(s["teacher"]), s["d"], s["schedule"], s["rng"])
    np.testing.assert_array_equal(np.asarray(la["loss"]), np.asarray(lb["loss"]))
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    c, _ = run(fresh(s["teacher"]), s["d"], s["schedule"], jax.random.PRNGKey(99))
    assert not np.array_equal(np.asarray(c.params["fc1"]["kernel"]), np.asarray(a.params["fc1"]["kernel"]))


def test_alpha_zero_distillation_is_cross_entropy_bitwise(setup):
    """alpha = 0 makes the KD objective the hard-label CE exactly (the demo trains its
    standard students this way, in the same program as the distilled ones)."""
    s = setup
    ce, ce_loss = kdjax.make_run(s["student"], "ce")(fresh(s["student"]), s["d"], s["schedule"], s["rng"])
    d = dict(s["d"], teacher_logits=s["tlogits"])
    kd, kd_loss = kdjax.make_run(s["student"], "kd")(fresh(s["student"]), d, s["schedule"], s["rng"],
                                                     kdjax.make_hyper(5.0, 0.0))
    np.testing.assert_array_equal(np.asarray(ce_loss["loss"]), np.asarray(kd_loss["loss"]))
    for a, b in zip(jax.tree_util.tree_leaves(ce), jax.tree_util.tree_leaves(kd)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
