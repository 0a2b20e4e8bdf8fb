"""What gets compiled, and when: no stray programs, compiling ahead, compiler options."""

import contextlib
import threading

import jax
import numpy as np
import pytest

import kdjax
from kdjax import demo, experiments, sweep, train
from kdjax.experiments import RunConfig, compile_members, fit_members, paired_students

_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")


@contextlib.contextmanager
def compiles():
    """Record ``(thread name, program)`` for every program compiled (or loaded from a
    persistent cache) inside the block."""
    seen = []

    def listener(event, duration, **kw):
        if event in _EVENTS:
            seen.append((threading.current_thread().name, kw.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("members", [False, True])
def test_host_built_adam_state_equals_optax_init(members):
    """state_from_params builds kdjax's adam state on the host (nothing compiled); it must
    equal the state optax's own init builds (train._new_state), leaf for leaf."""
    model = kdjax.TeacherMLP(24, 3)
    params = kdjax.models.init_params(model, 5, 7)
    if members:
        params = jax.tree_util.tree_map(lambda a: np.stack([a, 2 * a, -a]), params)
    with compiles() as seen:
        state = kdjax.state_from_params(params, learning_rate=3e-3, members=members)
    assert seen == []
    want = train._new_state(params, 3e-3, None, members)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lr = np.asarray(state.opt_state.hyperparams["learning_rate"])
    assert lr.shape == ((3,) if members else ()) and np.all(lr == np.float32(3e-3))


def test_a_run_compiles_only_its_training_program(seed_data):
    """Moving data, keys, hyperparameters and initial states to the device compiles
    nothing (no per-shape helper programs): a fit is one program per chunk length."""
    cfg = RunConfig(steps=6, batch_size=16)
    logits = np.zeros((2, len(seed_data.y_train), 5), np.float32)
    with compiles() as seen:
        fit_members(kdjax.StudentMLP(11, 5), "kd", seed_data, cfg, chunk=3,
                    **paired_students([0, 1], logits, 2.0, 0.5))
    assert [name for _, name in seen] == ["jit(run_steps)"]


def test_compiled_ahead_on_a_thread_then_run_compiles_nothing(seed_data):
    """compile_members on a background thread with placeholder teacher logits and hyper
    values; the real fit_members then finds every program (both chunk lengths) compiled."""
    cfg = RunConfig(steps=7, batch_size=16)  # chunks of 3, 3, 1: two programs
    student, seeds = kdjax.StudentMLP(13, 5), [4, 5]
    placeholder = paired_students(seeds, np.zeros((2, len(seed_data.y_train), 5), np.float32), 1.0, 0.0)
    with compiles() as seen:
        t = threading.Thread(target=compile_members, args=(student, "kd", seed_data, cfg),
                             kwargs=dict(chunk=3, compiler_options=train.SHORT_RUN_COMPILE, **placeholder))
        t.start()
        t.join()
    assert sorted(name for _, name in seen) == ["jit(run_steps)"] * 2
    logits = np.random.default_rng(0).normal(size=(2, len(seed_data.y_train), 5)).astype(np.float32)
    with compiles() as seen:
        _, losses = fit_members(student, "kd", seed_data, cfg, chunk=3, compiler_options=train.SHORT_RUN_COMPILE,
                                **paired_students(seeds, logits, 3.0, 0.7))
    assert seen == [] and losses.shape == (4, 7)


def test_short_run_compile_options_reach_xla_and_keep_the_numbers(seed_data):
    """SHORT_RUN_COMPILE (LLVM -O1) is a separate program with the same results."""
    cfg = RunConfig(steps=10, batch_size=32)
    teacher = kdjax.TeacherMLP(32, 5)  # dropout on: the RNG stream must not change either
    a, la = fit_members(teacher, "ce", seed_data, cfg, [1, 2])
    b, lb = fit_members(teacher, "ce", seed_data, cfg, [1, 2], compiler_options=train.SHORT_RUN_COMPILE)
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    assert experiments._run(teacher, "ce", True) is not experiments._run(
        teacher, "ce", True, compiler_options=train.SHORT_RUN_COMPILE)
    with pytest.raises(Exception, match="no_such_option"):
        fit_members(teacher, "ce", seed_data, cfg, [1, 2], compiler_options={"no_such_option": 1})


class _Quiet:
    """A Reporter that prints nothing (the demo sections call these)."""

    def section(self, *a): pass
    def line(self, *a): pass
    def table(self, *a): pass

    @contextlib.contextmanager
    def progress(self, *a):
        yield lambda done: None


@pytest.mark.parametrize("workers", [1, 3])
def test_demo_compile_ahead_leaves_nothing_for_the_sections(workers):
    """demo.CompileAhead compiles exactly the programs sections 3-6 run: run after it,
    the sections compile nothing. (A placeholder with the wrong shape, dtype or compile
    option would show up here as a compile on the main thread.)"""
    if jax.default_backend() != "cpu":
        pytest.skip("CompileAhead runs on the CPU backend only")
    seeds = [7, 8, 9] if workers == 1 else [4, 5, 6, 7]  # member counts no other test uses
    with compiles() as ahead:
        with demo.CompileAhead({3, 4, 5, 6}, seeds, digits_epochs=2, workers=workers):
            pass  # leaving waits for the background jobs
    assert ahead and all(thread.startswith("kdjax-compile") for thread, _ in ahead)
    with compiles() as seen:
        demo.seed_comparison(_Quiet(), seeds)
        demo.hyperparameters(_Quiet(), seeds)
        demo.digits_heldout(_Quiet(), seeds, epochs=2)
    assert seen == []


def test_compile_ahead_reports_a_failed_job_and_cancels_on_error(monkeypatch):
    monkeypatch.setattr(demo.jax, "default_backend", lambda: "cpu")  # the jobs run on CPU only
    monkeypatch.setattr(demo, "_compile_demo5_students", lambda seeds: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        with demo.CompileAhead({5}, [1, 2]):
            pass
    # a section fails while the first job still runs: the second job never starts
    ran, gate = [], threading.Event()
    monkeypatch.setattr(demo, "_compile_seed_teachers", lambda seeds: (gate.wait(10), ran.append("seed")))
    monkeypatch.setattr(demo, "_compile_seed_students", lambda seeds: ran.append("students"))
    with pytest.raises(KeyError):
        with demo.CompileAhead({3}, [1, 2], workers=1) as ahead:
            raise KeyError("a section failed")
    gate.set()
    ahead._pool.shutdown(wait=True)
    assert ran == ["seed"]


def test_compile_ahead_only_on_cpu(monkeypatch):
    monkeypatch.setattr(demo.jax, "default_backend", lambda: "gpu")
    with demo.CompileAhead({3, 4, 5, 6}, [1, 2]) as ahead:
        assert ahead._jobs == []


def test_member_keys_make_no_device_program():
    with compiles() as seen:
        keys = sweep.member_keys([1, 2, 3])
        kdjax.make_hyper([1.0, 2.0, 3.0], [0.1, 0.2, 0.3])
    assert seen == [] and keys["dropout"].shape == (3, 2)
