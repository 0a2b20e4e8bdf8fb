"""Sharded parameters (the mesh's "fsdp" axis) on forced CPU devices, in subprocesses:
runs equal one device in float64, every device holds its share, sharding rules and their
mistakes, sharded checkpoints restored onto another mesh, and two processes killed and
resumed bit for bit."""

import os

import jax
import numpy as np
import pytest

from kdjax import checkpoint
from test_parallel import _finish, _free_port, _two_process_cli, script_results


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return script_results("fsdp", tmp_path_factory.mktemp("fsdp"))


# float64, fsdp=4 x data=2 against one device: the partitioner reorders sums (per-device
# partial matmuls, then an all-reduce); measured after 3-4 steps: 3e-17 (MLP), 2e-16 (ResNet
# with BatchNorm), 3e-15 and 5e-15 (Llama, teacher online, logits and FusedLM). Bound: 1e-13.
FSDP_BOUND = 1e-13


@pytest.mark.parametrize("name", ["mlp", "resnet_batchnorm", "llama_teacher_online", "llama_fused_lm"])
def test_sharded_parameters_train_like_one_device(fsdp, name):
    r = fsdp[name]
    assert fsdp["devices"] == 8
    assert r["init"] == 0.0, r  # sharded init (model.init under out_shardings, or placed) = unsharded init
    assert r["state"] <= FSDP_BOUND and r["loss"] <= FSDP_BOUND, r
    # every device holds a quarter of the largest parameter and of its Adam moments
    assert r["held"] == 0.25 and r["held_opt"] == 0.25, r
    if r["teacher_held"] is not None:
        assert r["teacher_held"] == 0.25, r


def test_on_policy_and_streaming_steps_with_sharded_parameters(fsdp):
    for name in ("on_policy", "streaming", "on_policy_sweep"):
        r = fsdp[name]
        assert r["state"] <= FSDP_BOUND, (name, r)
        assert r["held"] == (0.125 if name == "on_policy_sweep" else 0.25), (name, r)  # sweep: 1/2 members x 1/4
    r = fsdp["on_policy_sweep"]  # the members' states created sharded (sweep.init_members(..., mesh=))
    assert r["init"] == 0.0 and r["init_held"] == 0.125, r


def test_sweep_members_each_sharded_over_fsdp(fsdp):
    r = fsdp["sweep"]
    assert r["state"] <= FSDP_BOUND, r
    assert r["spec"] == "P('members', None, None, 'fsdp')" and r["held"] == 0.125, r  # 1/2 members x 1/4


def test_sharded_checkpoint_restores_onto_another_mesh(fsdp):
    r = fsdp["restore_on_fsdp_2"]  # written from fsdp=4, read into a target on fsdp=2
    assert r["state"] == 0.0 and r["held"] == 0.5 and r["devices"] == 2, r


def test_sharding_rules_apply_to_parameters_and_their_optimizer_state(fsdp):
    specs = fsdp["rules"]
    assert len(specs) == 6, specs  # params, mu, nu of the two ruled arrays
    for path, spec in specs.items():
        assert spec == ("P(None, 'fsdp')" if "embed_tokens" in path else "P('fsdp', None)"), (path, spec)


def test_sharding_rule_mistakes_are_one_line_each(fsdp):
    e = fsdp["errors"]
    assert e["rule names nothing"].startswith("rule 'no_such_layer': names no parameter")
    assert e["rule does not divide"] == ("rule 'q_proj/kernel': model/layers/0/self_attn/q_proj/kernel [16, 16] "
                                         "cannot be split over 'fsdp' (3 devices): dimension 1 has size 16")
    assert "expected mesh axes 'fsdp', 'data' or None per dimension, got 'tp'" in e["rule axis unknown"]
    assert "expected one entry per dimension of model/layers/0/self_attn/q_proj/kernel [16, 16]" in e["rule rank"]
    assert all("\n" not in m for m in e.values())


def test_two_processes_killed_and_resumed_end_bit_for_bit(tmp_path):
    """Two processes (2 CPU devices each; members=2 x fsdp=2, each member's parameters split
    over its process's two devices, every process writing its own shards) are killed with
    SIGKILL once the students' checkpoint exists, and resumed: the results equal an
    uninterrupted two-process run bit for bit."""
    import signal
    import time

    args = ["distill", "--steps", "300", "--seeds", "2", "--checkpoint-every", "20", "--batch-size", "32",
            "--mesh", "members=2,fsdp=2", "--no-plots", "--quiet"]
    outs = _finish(_two_process_cli(args + ["--out", str(tmp_path / "full")], _free_port()))
    assert "running on mesh members=2 x data=1 x fsdp=2 over 4 cpu device(s) on 2 processes" in outs[0][0]
    procs = _two_process_cli(args + ["--out", str(tmp_path / "part")], _free_port())
    ckpt, deadline = tmp_path / "part" / "checkpoints" / "students.ckpt", time.time() + 240
    while not ckpt.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.005)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert ckpt.exists(), [p.stderr.read()[-3000:] for p in procs]
    _, meta, _, _ = checkpoint.load_latest(ckpt)
    assert 0 < meta["done"] < 300 and not (tmp_path / "part" / "results.json").exists()
    outs = _finish(_two_process_cli(args + ["--out", str(tmp_path / "part"), "--resume"], _free_port()))
    assert "students: resuming at step" in outs[0][0]
    for name in ("teacher.ckpt", "student_standard.ckpt", "student_distilled.ckpt"):
        full, _ = checkpoint.load(tmp_path / "full" / name)
        part, _ = checkpoint.load(tmp_path / "part" / name)
        for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(part)):
            np.testing.assert_array_equal(a, b)
