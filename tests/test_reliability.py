"""Validation at the boundaries, determinism, crash-safe checkpoints and exact resume."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import checkpoint, data, fitting
from kdjax.errors import InputError

# ----------------------------------------------------------------------------- validation


def test_model_input_width_mismatch():
    model = kdjax.TeacherMLP(16, 3)
    params = kdjax.create_train_state(model, jax.random.PRNGKey(0), 12).params
    with pytest.raises(ValueError, match=r"expected inputs with 12 features .* got 9"):
        model.apply({"params": params}, jnp.ones((4, 9)))


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(input_dim=0), ValueError, ["input_dim", "positive", "0"]),
    (dict(input_dim=3.5), ValueError, ["input_dim", "3.5"]),
    (dict(input_dim=4, learning_rate=-1.0), ValueError, ["learning_rate", "-1.0"]),
    (dict(input_dim=4, learning_rate=float("nan")), ValueError, ["learning_rate", "nan"]),
])
def test_create_train_state_errors(kwargs, exc, words):
    with pytest.raises(exc) as e:
        kdjax.create_train_state(kdjax.StudentMLP(4, 2), jax.random.PRNGKey(0), **kwargs)
    for w in words:
        assert w in str(e.value)


def test_run_entry_checks_shapes_at_trace_time():
    model = kdjax.StudentMLP(4, 2)
    run = kdjax.make_run(model, "ce")
    st = lambda: kdjax.create_train_state(model, jax.random.PRNGKey(0), 3)
    x, y = jnp.ones((10, 3)), jnp.zeros(10, jnp.int32)
    sched = data.seed_schedule(jax.random.PRNGKey(0), 10, 4, 2)
    with pytest.raises(ValueError, match=r"data\['y'\]: expected 10 rows"):
        run(st(), {"x": x, "y": y[:9]}, sched, jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match=r"integer class labels, got dtype float32"):
        run(st(), {"x": x, "y": y.astype(jnp.float32)}, sched, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"schedule: expected integer indices .* got float32"):
        run(st(), {"x": x, "y": y}, sched.astype(np.float32), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"keys 'x' and 'y'"):
        run(st(), {"x": x}, sched, jax.random.PRNGKey(0))


@pytest.mark.parametrize("x,y,words", [
    (np.ones((5, 2)), np.array([0, 1, 0, 1]), ["as many labels as examples (5)", "got 4"]),
    (np.ones(5), np.zeros(5, int), ["[n, features]", "(5,)"]),
    (np.ones((5, 2)), np.zeros((5, 1), int), ["labels of shape [n]", "(5, 1)"]),
    (np.full((5, 2), np.inf), np.zeros(5, int), ["finite", "10 NaN/inf"]),
    (np.ones((5, 2)), np.array([0, 1, -2, 0, 1]), ["labels >= 0", "-2"]),
    (np.ones((5, 2)), np.array([0.5, 1, 2, 0, 1]), ["integer class labels", "float64"]),
    (np.ones((0, 2)), np.zeros(0, int), ["at least one example", "0"]),
    (np.array([["a", "b"]] * 5), np.zeros(5, int), ["numeric features", "<U1"]),
])
def test_dataset_validation(x, y, words):
    with pytest.raises((ValueError, TypeError)) as e:
        data.validate_arrays(x, y, "mine")
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert str(e.value).startswith("mine:")


def test_labels_beyond_num_classes_and_schedule_bounds():
    with pytest.raises(ValueError, match=r"labels < 3, got maximum label 3"):
        data.validate_arrays(np.ones((4, 2)), np.array([0, 1, 2, 3]), "d", num_classes=3)
    with pytest.raises(ValueError, match=r"batch_size: expected 1 <= batch_size <= 10 .* got 0"):
        data.seed_schedule(jax.random.PRNGKey(0), 10, 0, 3)
    with pytest.raises(ValueError, match=r"steps: expected a positive count, got 0"):
        data.seed_schedule(jax.random.PRNGKey(0), 10, 2, 0)


@pytest.mark.parametrize("kwargs,words", [
    (dict(steps=0), ["steps", "0"]), (dict(batch_size=0), ["batch_size", "0"]),
    (dict(learning_rate=0.0), ["learning_rate", "0.0"]), (dict(epochs=0), ["epochs", "0"]),
])
def test_run_config_validation(kwargs, words):
    with pytest.raises(ValueError) as e:
        fitting.RunConfig(**kwargs)
    for w in words:
        assert w in str(e.value)


# ----------------------------------------------------------------------------- determinism

DETERMINISM_SCRIPT = r"""
import hashlib, jax, numpy as np, kdjax
from kdjax import data, fitting
ds = data.synthetic(200, 10, 3, seed=1, test_samples=10)
cfg = fitting.RunConfig(steps=40, batch_size=16)
t = kdjax.TeacherMLP(32, 3)
ts, tl = fitting.fit_members(t, "ce", ds, cfg, [0, 1])  # dropout on
logits = fitting.teacher_logits_for(t, ts.params, ds, members=True)
h = kdjax.make_hyper(np.array([2.0, 4.0]), np.array([0.5, 0.9]))
ss, sl = fitting.fit_members(kdjax.StudentMLP(8, 3), "kd", ds, cfg, [0, 1], hyper=h, teacher_logits=logits)
d = hashlib.sha256()
for leaf in jax.tree_util.tree_leaves((ts, ss)) + [tl, sl]:
    d.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
print(d.hexdigest())
"""


def test_same_seed_bitwise_identical_in_one_process_and_across_processes():
    ns: dict = {}
    exec(DETERMINISM_SCRIPT.replace("print(d.hexdigest())", "out = d.hexdigest()"), ns)
    first = ns["out"]
    exec(DETERMINISM_SCRIPT.replace("print(d.hexdigest())", "out = d.hexdigest()"), ns)
    assert ns["out"] == first
    runs = [subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT], capture_output=True, text=True,
                           check=True).stdout.strip() for _ in range(2)]
    assert runs[0] == runs[1] == first


# ----------------------------------------------------------------------------- checkpoints


def _state():
    return kdjax.create_train_state(kdjax.StudentMLP(4, 2), jax.random.PRNGKey(0), 3)


def test_checkpoint_round_trip(tmp_path):
    st = _state()
    checkpoint.save(tmp_path / "a.ckpt", st, {"step": 7})
    back, meta = checkpoint.load(tmp_path / "a.ckpt", target=_state())
    assert meta == {"step": 7} and isinstance(back, kdjax.TrainState)
    for a, b in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype
    checkpoint.save(tmp_path / "a.ckpt", st, {"step": 8})  # replaced in place
    assert checkpoint.load(tmp_path / "a.ckpt")[1] == {"step": 8}
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]  # no temporary or old directories left
    assert sorted(os.listdir(tmp_path / "a.ckpt")) == ["arrays", "kdjax.json"]


def _damage(path, how):
    arrays = sorted(p for p in (path / "arrays").rglob("*") if p.is_file() and p.stat().st_size > 64)
    victim = max(arrays, key=lambda p: p.stat().st_size)  # the largest array file
    raw = victim.read_bytes()
    if how == "truncate":
        victim.write_bytes(raw[: len(raw) // 2])
    elif how == "flip":
        victim.write_bytes(raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:])
    elif how == "missing file":
        victim.unlink()
    elif how == "garbage manifest":
        (path / "kdjax.json").write_bytes(b"hello")
    elif how == "unfinished":  # killed before its manifest was written
        (path / "kdjax.json").unlink()


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing file", "garbage manifest", "unfinished"])
def test_damaged_checkpoint_names_the_file_and_prev_still_works(tmp_path, damage):
    path = tmp_path / "run.ckpt"
    checkpoint.save_rotating(path, {"w": np.arange(1000.0)}, {"n": 1})
    checkpoint.save_rotating(path, {"w": np.arange(1000.0) * 2}, {"n": 2})
    _damage(path, damage)
    with pytest.raises(InputError) as e:
        checkpoint.load(path)
    assert str(e.value).startswith(f"{path}: checkpoint is truncated or corrupted") and "\n" not in str(e.value)
    tree, meta, used, problem = checkpoint.load_latest(path)
    assert used == str(path) + ".prev" and meta == {"n": 1} and str(path) in problem
    np.testing.assert_array_equal(tree["w"], np.arange(1000.0))


def test_a_crash_mid_save_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Killed after the arrays were written but before the rename: the half-written
    <path>.tmp is ignored by load_latest and cleared by the next save."""
    path = tmp_path / "run.ckpt"
    checkpoint.save_rotating(path, {"w": np.arange(10.0)}, {"n": 1})

    def crash(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_fsync_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_rotating(path, {"w": np.arange(10.0) * 2}, {"n": 2})
    monkeypatch.undo()
    assert (tmp_path / "run.ckpt.tmp").exists()
    assert checkpoint.load_latest(path)[1] == {"n": 1}
    checkpoint.save_rotating(path, {"w": np.arange(10.0) * 3}, {"n": 3})
    assert sorted(os.listdir(tmp_path)) == ["run.ckpt", "run.ckpt.prev"]


def test_background_saves_return_after_the_copy_off_the_device(tmp_path, monkeypatch):
    """RotatingSaver: the call returns while the write is still running (held here on an
    event); the next call waits for it; a failed write is raised by the next wait."""
    import threading

    release, real = threading.Event(), checkpoint.save_rotating
    monkeypatch.setattr(checkpoint, "save_rotating", lambda *a: (release.wait(5), real(*a)))
    saver = checkpoint.RotatingSaver(tmp_path / "run.ckpt")
    x = jnp.arange(6.0)
    saver({"w": x}, {"n": 1})
    x.delete()  # the caller donates its arrays to the next step: the host copy is written
    assert not (tmp_path / "run.ckpt").exists()  # still writing
    release.set()
    saver({"w": np.ones(3)}, {"n": 2})  # waits for the first, then writes in the background
    saver.wait()
    assert checkpoint.load(tmp_path / "run.ckpt")[1] == {"n": 2}
    np.testing.assert_array_equal(checkpoint.load(tmp_path / "run.ckpt.prev")[0]["w"], np.arange(6.0))
    monkeypatch.setattr(checkpoint, "save_rotating", lambda *a: 1 / 0)
    saver({"w": np.ones(3)})
    with pytest.raises(ZeroDivisionError):
        saver.wait()


def test_version_1_checkpoints_still_load(tmp_path):
    """A kdjax <= 2 checkpoint (one msgpack file behind a checksummed header) reads as before."""
    import hashlib

    from flax import serialization

    st = _state()
    host = jax.tree_util.tree_map(np.asarray, serialization.to_state_dict(st))
    payload = serialization.msgpack_serialize({"tree": host, "meta": json.dumps({"v": 1})})
    (tmp_path / "old.ckpt").write_bytes(b"kdjax-checkpoint v1 " + hashlib.sha256(payload).hexdigest().encode()
                                        + b"\n" + payload)
    back, meta = checkpoint.load(tmp_path / "old.ckpt", target=_state())
    assert meta == {"v": 1}
    for a, b in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (tmp_path / "bad.ckpt").write_bytes(b"hello")
    with pytest.raises(InputError, match="bad.ckpt: expected a kdjax checkpoint"):
        checkpoint.load(tmp_path / "bad.ckpt")


def test_checkpoint_of_another_model_names_the_first_difference(tmp_path):
    checkpoint.save(tmp_path / "a.ckpt", _state())
    other = kdjax.create_train_state(kdjax.StudentMLP(5, 2), jax.random.PRNGKey(0), 3)
    with pytest.raises(InputError) as e:
        checkpoint.load(tmp_path / "a.ckpt", target=other)
    assert str(e.value) == (f"{tmp_path / 'a.ckpt'}: checkpoint does not match the model: "
                            "['params']['fc1']['bias'] is float32[4] there, "
                            "expected float32[5]")
    deeper = kdjax.create_train_state(kdjax.TeacherMLP(4, 2), jax.random.PRNGKey(0), 3)
    with pytest.raises(InputError, match="checkpoint does not match the model: .* is only in the model"):
        checkpoint.load(tmp_path / "a.ckpt", target=deeper)


@pytest.mark.parametrize("version", [1, 2])
def test_a_target_of_some_entries_chosen_by_the_metadata(tmp_path, version):
    """A dict target may name some entries (the rest come back as NumPy), and may be a
    function of the metadata, called before any array is read; what it raises, and a
    checkpoint that does not match it, are raised, not taken for damage (no fallback to
    ``.prev``)."""
    from flax import serialization

    path, st, losses = tmp_path / "run.ckpt", _state(), np.arange(6.0).reshape(2, 3)
    for n in (1, 2):
        if version == 2:
            checkpoint.save_rotating(path, {"states": st, "losses": losses * n}, {"n": n})
        else:  # a kdjax <= 2 file
            import hashlib

            host = jax.tree_util.tree_map(np.asarray, serialization.to_state_dict({"states": st, "losses": losses * n}))
            payload = serialization.msgpack_serialize({"tree": host, "meta": json.dumps({"n": n})})
            if path.exists():
                os.replace(path, str(path) + ".prev")
            path.write_bytes(b"kdjax-checkpoint v1 " + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    seen = []
    tree, meta, used, problem = checkpoint.load_latest(path, lambda meta: seen.append(meta) or {"states": _state()})
    assert seen == [{"n": 2}] and meta == {"n": 2} and used == str(path) and problem is None
    assert isinstance(tree["states"], kdjax.TrainState) and isinstance(tree["losses"], np.ndarray)
    np.testing.assert_array_equal(tree["losses"], losses * 2)
    for a, b in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(tree["states"])):
        assert isinstance(b, jax.Array)  # placed like the target's arrays
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def refuse(meta):
        raise InputError(f"not this one: {meta}")

    with pytest.raises(InputError, match=r"^not this one: \{'n': 2\}$"):
        checkpoint.load_latest(path, refuse)
    other = {"states": kdjax.create_train_state(kdjax.StudentMLP(5, 2), jax.random.PRNGKey(0), 3)}
    with pytest.raises(InputError, match="checkpoint does not match the model: .* is float32\\[4\\] there"):
        checkpoint.load_latest(path, other)


def test_a_resume_on_a_mesh_restores_the_states_into_place(tmp_path, seed_data, monkeypatch):
    """``distill(..., mesh=, checkpoints=resume)`` restores each phase's states straight
    into states created on the mesh (Orbax reads the shards onto their devices; nothing
    passes through a whole host copy), and ends where the first run ended."""
    from kdjax import parallel, workflows

    mesh = parallel.make_mesh()
    run = lambda resume: workflows.distill(
        kdjax.TeacherMLP(32, 5), kdjax.StudentMLP(8, 5), seed_data, fitting.RunConfig(steps=6, batch_size=32), [0],
        mesh=mesh, checkpoints=workflows.Checkpoints(str(tmp_path), every=3, resume=resume))
    first = run(False)
    real, targets = checkpoint.load_latest, []

    def spy(path, target=None):
        return real(path, lambda meta: targets.append(target(meta)) or targets[-1])

    monkeypatch.setattr(checkpoint, "load_latest", spy)
    again = run(True)
    assert len(targets) == 2  # the teachers' and the students' phases
    for t in targets:
        for leaf in jax.tree_util.tree_leaves(t["states"]):
            assert isinstance(leaf.sharding, jax.sharding.NamedSharding) and leaf.sharding.mesh == mesh, leaf.sharding
    for a, b in zip(jax.tree_util.tree_leaves(first.students), jax.tree_util.tree_leaves(again.students)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- kill and resume

ARGS = ["distill", "--steps", "2000", "--seeds", "2", "--checkpoint-every", "40", "--no-plots", "--quiet"]


def _kdjax(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "kdjax", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _leaves(path):
    tree, _ = checkpoint.load(path)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _full_then_killed(args, tmp_path, phase, steps=2000):
    """Run ``args`` to the end in ``full``; run it again in ``part`` and SIGKILL it as soon
    as the ``phase`` checkpoint exists (mid-run: ``steps`` steps, a checkpoint every 40)."""
    env = dict(os.environ, KDJAX_CACHE_DIR=str(tmp_path / "cache"))
    full, part = tmp_path / "full", tmp_path / "part"
    p = _kdjax(args + ["--out", str(full)], env)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    p = _kdjax(args + ["--out", str(part)], env)
    ckpt = part / "checkpoints" / f"{phase}.ckpt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)  # a real kill, mid-training
    p.wait()
    assert p.returncode == -signal.SIGKILL
    _, meta, _, _ = checkpoint.load_latest(ckpt)
    assert 0 < meta["done"] < steps, "the kill did not land mid-run"
    assert not (part / "results.json").exists()
    return env, full, part


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    env, full, part = _full_then_killed(ARGS, tmp_path, "teachers")

    p = _kdjax(ARGS + ["--out", str(part), "--resume"], env)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "teachers: resuming at step" in out
    for name in ("teacher.ckpt", "student_standard.ckpt", "student_distilled.ckpt"):
        for a, b in zip(_leaves(full / name), _leaves(part / name)):
            np.testing.assert_array_equal(a, b)  # bitwise

    # a corrupted latest checkpoint: resume warns, uses the previous one, same result
    want = _leaves(full / "student_distilled.ckpt")
    os.remove(full / "results.json")
    bad = full / "checkpoints" / "students.ckpt"
    _damage(bad, "truncate")
    p = _kdjax(ARGS + ["--out", str(full), "--resume"], env)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert f"warning: {bad}: checkpoint is truncated or corrupted" in out
    for a, b in zip(want, _leaves(full / "student_distilled.ckpt")):
        np.testing.assert_array_equal(a, b)


FITNET_ARGS = ["distill", "--dataset", "digits", "--method", "fitnet", "--steps", "2000", "--seeds", "2",
               "--checkpoint-every", "40", "--no-plots", "--quiet"]


def test_fitnet_sigkill_then_resume_is_bitwise_identical(tmp_path):
    # killed mid-way through the FitNet students: their connectors are checkpointed and resumed with them
    env, full, part = _full_then_killed(FITNET_ARGS, tmp_path, "distilled")
    p = _kdjax(FITNET_ARGS + ["--out", str(part), "--resume"], env)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "distilled: resuming at step" in out
    phase, _ = checkpoint.load(part / "checkpoints" / "distilled.ckpt")
    assert "connectors" in phase["states"]["params"]  # the connector is part of the run's state
    exported, _ = checkpoint.load(part / "student_distilled.ckpt")
    assert "connectors" not in exported["params"]  # and not of the exported student
    for name in ("checkpoints/distilled.ckpt", "student_distilled.ckpt", "student_standard.ckpt"):
        for a, b in zip(_leaves(full / name), _leaves(part / name)):
            np.testing.assert_array_equal(a, b)  # bitwise


GKD_ARGS = ["distill", "--dataset", "text", "--method", "gkd", "--seeds", "2", "--steps", "400", "--teacher-steps",
            "20", "--context", "8", "--teacher-dim", "16", "--student-dim", "8", "--text-bytes", "5000", "--vocab-size",
            "260", "--batch-size", "8", "--checkpoint-every", "10", "--no-plots", "--quiet"]


def test_gkd_sigkill_then_resume_is_bitwise_identical(tmp_path):
    """An on-policy run (GKD: the student samples inside every step, lmbda 0.5) killed
    mid-way through its distilled phase resumes to the bits of an uninterrupted run: the
    draws depend only on the seed and the step count."""
    env, full, part = _full_then_killed(GKD_ARGS, tmp_path, "distilled", steps=400)
    p = _kdjax(GKD_ARGS + ["--out", str(part), "--resume"], env)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "distilled: resuming at step" in out
    for name in ("checkpoints/distilled.ckpt", "student_distilled.ckpt", "student_standard.ckpt"):
        for a, b in zip(_leaves(full / name), _leaves(part / name)):
            np.testing.assert_array_equal(a, b)  # bitwise
    results = [json.loads((d / "results.json").read_text()) for d in (full, part)]
    assert results[0]["test_loss"] == results[1]["test_loss"]


SWEEP_ARGS = ["sweep", "--steps", "2000", "--seeds", "2", "--temperatures", "1", "4", "--alphas", "0.5",
              "0.9", "--checkpoint-every", "40", "--no-plots", "--quiet"]


def test_sweep_sigkill_then_resume_is_bitwise_identical(tmp_path):
    # killed once the teacher is done and the grid is mid-run
    env, full, part = _full_then_killed(SWEEP_ARGS, tmp_path, "students")
    ckpt = part / "checkpoints" / "students.ckpt"

    p = _kdjax(SWEEP_ARGS + ["--out", str(part), "--resume"], env)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "teachers: resuming at step 2000" in out and "students: resuming at step" in out
    for a, b in zip(_leaves(full / "checkpoints" / "students.ckpt"), _leaves(ckpt)):
        np.testing.assert_array_equal(a, b)  # bitwise
    results = [json.loads((d / "results.json").read_text()) for d in (full, part)]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]


def test_resume_with_other_config_is_refused(tmp_path):
    env = dict(os.environ, KDJAX_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "o"
    p = _kdjax(["distill", "--steps", "40", "--seeds", "1", "--out", str(out), "--no-plots"], env)
    assert p.wait(timeout=300) == 0
    os.remove(out / "results.json")
    p = _kdjax(["distill", "--steps", "40", "--seeds", "1", "--alpha", "0.2", "--out", str(out),
                "--resume"], env)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "other settings (--alpha: 0.7 in the checkpoint, 0.2 now)" in err  # the flag, both values

    # a sweep over another grid is refused too
    out = tmp_path / "s"
    sw = ["sweep", "--steps", "40", "--seeds", "1", "--temperatures", "2", "--out", str(out)]
    p = _kdjax(sw + ["--alphas", "0.5", "--no-plots"], env)
    assert p.wait(timeout=300) == 0
    os.remove(out / "results.json")
    p = _kdjax(sw + ["--alphas", "0.7", "--resume"], env)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "other settings (--alphas: [0.5] in the checkpoint, [0.7] now)" in err
