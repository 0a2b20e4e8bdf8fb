"""kdjax.sweep: each member of a sweep equal to its own run (a schedule per member, one shared
schedule, and a sweep of one member bitwise the plain run), members started where single
states start, members run in groups equal to one vmap, and ``pick_members_per_group``. The
``setup`` fixture is conftest.py's, shared with tests/test_step.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import data as kdata
from kdjax import sweep
from conftest import STEPS, assert_trees_close


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


def test_members_start_where_single_states_start(setup):
    keys = sweep.member_keys([4, 9])
    states = sweep.init_members(setup["student"], keys["init"], 50, learning_rate=3e-3)
    for i in range(2):
        one = kdjax.create_train_state(setup["student"], keys["init"][i], 50, learning_rate=3e-3)
        member = jax.tree_util.tree_map(lambda a, i=i: a[i], states)
        for a, b in zip(jax.tree_util.tree_leaves(member), jax.tree_util.tree_leaves(one)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(states.opt_state.hyperparams["learning_rate"][1]) == pytest.approx(3e-3)


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


@pytest.mark.parametrize("objective", ["ce", "kd"])
@pytest.mark.parametrize("members_per_group", [None, 1])
def test_a_hyper_not_one_value_per_member_is_one_line(setup, objective, members_per_group):
    """Every objective's hyper is batched on the member axis (no special case for "ce"): a
    scalar or wrongly sized field is one InputError naming it, before anything runs."""
    from kdjax.errors import InputError

    s = setup
    keys = sweep.member_keys([0, 1])
    states = sweep.init_members(s["student"], keys["init"], 50)
    run = sweep.make_sweep_run(s["student"], objective, shared_schedule=True, members_per_group=members_per_group)
    d = dict(s["d"], teacher_logits=s["tlogits"])
    for hyper, shape in ((kdjax.make_hyper(2.0, 0.5), "()"), (sweep.sweep_hyper([1.0] * 3, [0.5] * 3), "(3,)")):
        with pytest.raises(InputError) as e:
            run(jax.tree_util.tree_map(jnp.copy, states), d, s["schedule"][:2], keys["dropout"], hyper)
        assert "\n" not in str(e.value) and f"got shape {shape}" in str(e.value) and "hyper.temperature" in str(e.value)
