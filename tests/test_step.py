"""Train step, fused runs, teacher cache, recompilation and sweeps."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import data as kdata
from kdjax import sweep
from conftest import assert_trees_close

STEPS = 30


@pytest.fixture(scope="module")
def setup(seed_data):
    ds = seed_data
    d = {"x": jnp.asarray(ds.x_train), "y": jnp.asarray(ds.y_train)}
    rng = jax.random.PRNGKey(0)
    schedule = kdata.seed_schedule(jax.random.PRNGKey(1), 500, 64, STEPS)
    teacher, student = kdjax.TeacherMLP(128, 5), kdjax.StudentMLP(32, 5)
    tstate = kdjax.create_train_state(teacher, jax.random.PRNGKey(2), 50)
    tstate, _ = kdjax.make_run(teacher, "ce")(tstate, d, schedule, rng)
    tlogits = kdjax.predict_logits(teacher, tstate.params, d["x"])
    return dict(d=d, rng=rng, schedule=schedule, teacher=teacher, student=student,
                tparams=tstate.params, tlogits=tlogits)


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


def test_schedules():
    rng = jax.random.PRNGKey(0)
    s = np.asarray(kdata.seed_schedule(rng, 100, 32, 50))
    assert s.shape == (50, 32) and s.dtype == np.int32
    assert all(len(set(row)) == 32 for row in s)  # without replacement within a step
    assert s.min() >= 0 and s.max() < 100
    assert len({tuple(r) for r in s}) == 50  # steps differ
    e = np.asarray(kdata.epoch_schedule(rng, 100, 32, 4))
    assert e.shape == (12, 32)
    for k in range(4):  # each epoch visits distinct examples
        assert len(set(e[3 * k: 3 * k + 3].ravel())) == 96
    np.testing.assert_array_equal(s, np.asarray(kdata.seed_schedule(rng, 100, 32, 50)))
    with pytest.raises(ValueError, match="batch_size"):
        kdata.seed_schedule(rng, 10, 32, 5)


def test_sweep_members_equal_individual_runs(setup):
    s = setup
    temps, alphas, seeds = sweep.grid([1.0, 4.0], [0.3, 1.0], [0, 1])
    keys = sweep.member_keys(seeds)
    states = sweep.init_members(s["student"], keys["init"], 50)
    scheds = sweep.member_schedules(keys["schedule"], 500, 64, steps=STEPS)
    run = sweep.make_sweep_run(s["student"], "kd")
    d = dict(s["d"], teacher_logits=s["tlogits"])
    final, losses = run(states, d, scheds, keys["dropout"], sweep.sweep_hyper(temps, alphas))
    assert losses["loss"].shape == (8, STEPS)
    single = kdjax.make_run(s["student"], "kd")
    for i in (0, 5):
        st = kdjax.create_train_state(s["student"], keys["init"][i], 50)
        one, one_loss = single(st, d, scheds[i], keys["dropout"][i], kdjax.make_hyper(temps[i], alphas[i]))
        np.testing.assert_allclose(np.asarray(losses["loss"][i]), np.asarray(one_loss["loss"]),
                                   rtol=1e-5, atol=1e-6)
        assert_trees_close(jax.tree_util.tree_map(lambda a: a[i], final.params), one.params,
                           rtol=1e-5, atol=1e-6)
    acc = sweep.evaluate_members(s["student"], final.params, s["d"]["x"], s["d"]["y"])
    assert acc["accuracy"].shape == (8,)
    # a new grid of the same size reuses the compiled program
    t2, a2, _ = sweep.grid([2.0, 8.0], [0.0, 0.5], [0, 1])
    run(sweep.init_members(s["student"], keys["init"], 50), d, scheds, keys["dropout"],
        sweep.sweep_hyper(t2, a2))
    assert run._cache_size() == 1


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


def test_import_kdjax_does_not_import_torch():
    code = "import sys, kdjax, kdjax.convert, kdjax.app.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_shared_schedule_sweep_equals_individual_runs(setup):
    """A temperature x alpha sweep at one seed: one schedule for all members."""
    s = setup
    temps, alphas, seeds = sweep.grid([1.0, 4.0], [0.3, 0.9], [5])
    keys = sweep.member_keys(seeds)
    sched = kdata.seed_schedule(keys["schedule"][0], 500, 64, STEPS)
    run = sweep.make_sweep_run(s["student"], "kd", shared_schedule=True)
    d = dict(s["d"], teacher_logits=s["tlogits"])
    final, losses = run(sweep.init_members(s["student"], keys["init"], 50), d, sched,
                        keys["dropout"], sweep.sweep_hyper(temps, alphas))
    single = kdjax.make_run(s["student"], "kd")
    for i in range(4):
        st = kdjax.create_train_state(s["student"], keys["init"][i], 50)
        one, one_loss = single(st, d, sched, keys["dropout"][i], kdjax.make_hyper(temps[i], alphas[i]))
        np.testing.assert_allclose(np.asarray(losses["loss"][i]), np.asarray(one_loss["loss"]),
                                   rtol=1e-5, atol=1e-6)
    # members differ only by hyperparameters, and those were used
    assert not np.allclose(np.asarray(losses["loss"][0]), np.asarray(losses["loss"][3]))


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


def test_members_start_where_single_states_start(setup):
    keys = sweep.member_keys([4, 9])
    states = sweep.init_members(setup["student"], keys["init"], 50, learning_rate=3e-3)
    for i in range(2):
        one = kdjax.create_train_state(setup["student"], keys["init"][i], 50, learning_rate=3e-3)
        member = jax.tree_util.tree_map(lambda a, i=i: a[i], states)
        for a, b in zip(jax.tree_util.tree_leaves(member), jax.tree_util.tree_leaves(one)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(states.opt_state.hyperparams["learning_rate"][1]) == pytest.approx(3e-3)


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


@pytest.mark.parametrize("layout", ["per_member", "shared_schedule_member_teachers", "ce"])
def test_member_groups_give_the_same_numbers(setup, layout):
    """Members in sequence (1), in groups (3 of 8: a remainder group too) and one vmap
    (None) train the same students: losses and weights agree to float32 rounding, and a wrong
    member would not (the grid's members differ)."""
    s = setup
    shared = layout.startswith("shared")
    temps, alphas, seeds = sweep.grid([1.0, 4.0], [0.3, 1.0], [0] if shared else [0, 1])
    keys = sweep.member_keys(seeds)
    scheds = (kdata.seed_schedule(keys["schedule"][0], 500, 64, 8) if shared
              else sweep.member_schedules(keys["schedule"], 500, 64, steps=8))
    d = dict(s["d"], teacher_logits=s["tlogits"])
    if shared:  # and one teacher per member
        d["teacher_logits"] = jnp.stack([s["tlogits"] * (1 + 0.1 * i) for i in range(len(seeds))])
    objective = "ce" if layout == "ce" else "kd"
    hyper = None if objective == "ce" else sweep.sweep_hyper(temps, alphas)
    out = {}
    groups = (1, 3) if layout == "per_member" else (3,)  # 3 of 8 members: a remainder group too
    for g in (None, *groups):
        run = sweep.make_sweep_run(s["student"], objective, shared_schedule=shared, member_teacher_logits=shared,
                                   members_per_group=g)
        states = sweep.init_members(s["student"], keys["init"], 50)
        out[g] = run(states, d, scheds, keys["dropout"], hyper)
    for g in groups:
        np.testing.assert_allclose(np.asarray(out[g][1]["loss"]), np.asarray(out[None][1]["loss"]),
                                   rtol=1e-5, atol=1e-6)
        assert_trees_close(out[g][0].params, out[None][0].params, rtol=1e-5, atol=1e-6)
        assert int(out[g][0].step[0]) == 8
    if layout != "ce":
        assert not np.allclose(np.asarray(out[3][1]["loss"][0]), np.asarray(out[3][1]["loss"][-1]))


def test_a_sweep_of_one_member_is_the_plain_run_bitwise(setup):
    """One member runs the plain run's program (a vmap over a batch of one is slower on
    XLA:CPU and rounds differently): weights and losses equal ``make_run``'s bitwise."""
    s = setup
    model, keys = s["teacher"], sweep.member_keys(np.array([3]))
    d = dict(s["d"], teacher_logits=s["tlogits"])
    states = sweep.init_members(model, keys["init"], 50)
    one = jax.tree_util.tree_map(lambda a: np.asarray(a)[0], states)
    a, la = sweep.make_sweep_run(model, "kd", shared_schedule=True)(states, d, s["schedule"], keys["dropout"],
                                                                     sweep.sweep_hyper([3.0], [0.5]))
    b, lb = kdjax.make_run(model, "kd")(one, d, s["schedule"], keys["dropout"][0], kdjax.make_hyper(3.0, 0.5))
    np.testing.assert_array_equal(np.asarray(la["loss"])[0], np.asarray(lb["loss"]))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x)[0], np.asarray(y))


def test_pick_members_per_group(setup):
    s = setup
    temps, alphas, seeds = sweep.grid([1.0, 4.0], [0.3, 1.0], [0])
    keys = sweep.member_keys(seeds)
    states = sweep.init_members(s["student"], keys["init"], 50)
    sched = kdata.seed_schedule(keys["schedule"][0], 500, 64, 4)
    d = dict(s["d"], teacher_logits=s["tlogits"])
    best, times = sweep.pick_members_per_group(s["student"], "kd", states, d, sched, keys["dropout"],
                                               sweep.sweep_hyper(temps, alphas), repeats=1, shared_schedule=True)
    assert set(times) == {None, 1, 2} and best in times and times[best] == min(times.values())
    np.asarray(states.params["fc1"]["kernel"])  # not donated: still readable
    with pytest.raises(ValueError, match="members_per_group"):
        sweep.make_sweep_run(s["student"], "kd", members_per_group=0)
