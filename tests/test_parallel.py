"""Many devices and hosts: data- and member-parallel runs on forced CPU devices (in
subprocesses: the device count is fixed when JAX starts), a real two-process run, the
CLI's --mesh, and the errors."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from kdjax import checkpoint, parallel
from kdjax.errors import InputError

SCRIPT = str(pathlib.Path(__file__).with_name("parallel_script.py"))
ROOT = str(pathlib.Path(__file__).resolve().parents[1])


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", KDJAX_CACHE_DIR="off",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return {**env, **extra}


def script_results(mode: str, directory) -> dict:
    """``parallel_script.py MODE`` on 8 forced CPU devices: its JSON results."""
    out = directory / "results.json"
    p = subprocess.run([sys.executable, SCRIPT, mode, str(out)], env=_env(8), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    return script_results("single", tmp_path_factory.mktemp("mesh"))


# float64: the data-parallel runs reorder the batch sums (a reduction per device, then an
# all-reduce); measured differences are 3e-17 (MLP) and 2e-16 (ResNet with BatchNorm)
# after 6 steps. float32: the parity tolerances for parameters after steps.
F64_BOUND, F32_BOUND = 1e-14, 1e-5


@pytest.mark.parametrize("name", ["teacher_mlp_dropout", "resnet_batchnorm"])
def test_data_parallel_run_equals_one_device(eight, name):
    assert eight["devices"] == 8
    for dtype, bound in (("float64", F64_BOUND), ("float32", F32_BOUND)):
        r = eight[f"{name}_{dtype}"]
        assert r["state"] <= bound and r["loss"] <= bound * 10, (dtype, r)  # params and batch_stats
        assert r["compiles"] == 1 and r["spec"] == "P()", r  # replicated; a second call reuses the program


def test_streaming_steps_on_a_mesh_equal_one_device(eight):
    r = eight["streaming_float32"]
    assert r["state"] <= F32_BOUND and r["compiles"] == 1


def test_member_parallel_sweep_equals_unsharded_and_lives_where_the_mesh_says(eight):
    r = eight["sweep_float32"]
    assert r["state"] <= F32_BOUND and r["loss"] <= 1e-4, r
    assert r["spec"] == "P('members',)" and r["placement_ok"], r


def test_fused_vocabulary_loss_with_tokens_sharded_over_data(eight):
    r = eight["fused_loss_sharded_tokens"]
    assert r["state"] <= F32_BOUND, r


def test_sharded_checkpoint_restores_on_another_device_count(eight):
    r = eight["restore_on_2_devices"]
    assert r["devices"] == 2 and r["state"] <= F32_BOUND, r


def test_mesh_mistakes_are_clear_errors_before_compiling(eight):
    e = eight["errors"]
    assert "'data' (8) x 'fsdp' (1) = 8, got 60" in e["batch not divisible by data"]
    assert "'members' (4) = 4, got 6" in e["members not divisible"]
    assert "<= 8 devices, got 4 x 4 x 1 = 16" in e["mesh larger than devices"]
    assert "'data' (8) x 'fsdp' (1) = 8, got 60" in e["streaming rows not divisible"]
    assert e["compiles after errors"] == e["compiles before errors"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("variant", ["data", "fsdp"])
def test_two_processes_train_like_one_process(tmp_path, variant):
    """Two processes on 127.0.0.1 with 2 CPU devices each (kdjax.parallel.initialize from
    KDJAX_* variables, gloo collectives) end where one process with 4 devices ends: a
    data-parallel ResNet, and a Llama distilled from a Llama with both models' parameters
    split over fsdp=4 (across the processes; the checkpoint, gathered from both, is read
    back here by one process on one device)."""
    port, procs, extra = _free_port(), [], ([variant] if variant == "fsdp" else [])
    try:
        for i in range(2):
            env = _env(2, KDJAX_COORDINATOR=f"127.0.0.1:{port}", KDJAX_NUM_PROCESSES="2", KDJAX_PROCESS_ID=str(i))
            procs.append(subprocess.Popen([sys.executable, SCRIPT, "multihost", str(tmp_path / "two.ckpt"), *extra],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        ref = subprocess.run([sys.executable, SCRIPT, "reference", str(tmp_path / "one.ckpt"), *extra], env=_env(4),
                             capture_output=True, text=True, timeout=300)
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:  # always stopped, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
    assert ref.returncode == 0, ref.stderr[-2000:]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    two, meta = checkpoint.load(tmp_path / "two.ckpt")
    one, meta_one = checkpoint.load(tmp_path / "one.ckpt")
    held = {"held": 0.25} if variant == "fsdp" else {}
    assert meta == {"processes": 2, "devices": 4, "local_devices": 2, **held}
    assert meta_one == {"processes": 1, "devices": 4, "local_devices": 4, **held}
    for a, b in zip(jax.tree_util.tree_leaves(two), jax.tree_util.tree_leaves(one)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if variant == "fsdp":  # the Hugging Face folder of the sharded student, written by process 0
        from safetensors.numpy import load_file

        hf_two, hf_one = load_file(tmp_path / "two.ckpt.hf" / "model.safetensors"), \
            load_file(tmp_path / "one.ckpt.hf" / "model.safetensors")
        assert sorted(hf_two) == sorted(hf_one) and len(hf_two) > 5
        for name in hf_one:
            np.testing.assert_allclose(hf_two[name], hf_one[name], rtol=1e-5, atol=1e-6)


def _two_process_cli(args, port):
    return [subprocess.Popen([sys.executable, "-m", "kdjax", *args],
                             env=_env(2, KDJAX_COORDINATOR=f"127.0.0.1:{port}", KDJAX_NUM_PROCESSES="2",
                                      KDJAX_PROCESS_ID=str(i), KDJAX_CACHE_DIR="off"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs, timeout=300):
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_cli_mesh(tmp_path):
    env = _env(8)
    p = subprocess.run([sys.executable, "-m", "kdjax", "distill", "--steps", "3", "--seeds", "2",
                        "--batch-size", "16", "--teacher-hidden", "16", "--student-hidden", "8",
                        "--mesh", "members=2,data=2,fsdp=2"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "running on mesh members=2 x data=2 x fsdp=2 over 8 cpu device(s)" in p.stdout
    assert "teacher parameters over fsdp=2 (largest dimension it divides): 7 of 8 arrays split" in p.stdout, p.stdout
    p = subprocess.run([sys.executable, "-m", "kdjax", "distill", "--steps", "3", "--seeds", "3", "--mesh",
                        "members=2"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "'members' (2) = 2, got 3" in p.stderr and len(p.stderr.splitlines()) == 1
    p = subprocess.run([sys.executable, "-m", "kdjax", "distill", "--mesh", "gpus=2"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--mesh: expected data=D,fsdp=F,members=M" in p.stderr
    p = subprocess.run([sys.executable, "-m", "kdjax", "sweep", "--steps", "3", "--members-per-group", "auto"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--members-per-group: groups of members run on one device" in p.stderr


@pytest.mark.parametrize("environ,words", [
    ({"KDJAX_COORDINATOR": "h:1"}, ["missing KDJAX_NUM_PROCESSES, KDJAX_PROCESS_ID"]),
    ({"KDJAX_COORDINATOR": "nohost", "KDJAX_NUM_PROCESSES": "2", "KDJAX_PROCESS_ID": "0"}, ["host:port"]),
    ({"KDJAX_COORDINATOR": "h:1", "KDJAX_NUM_PROCESSES": "2", "KDJAX_PROCESS_ID": "2"}, ["0 <= id < "]),
    ({"KDJAX_COORDINATOR": "h:1", "KDJAX_NUM_PROCESSES": "two", "KDJAX_PROCESS_ID": "0"}, ["integers"]),
])
def test_initialize_refuses_an_incomplete_environment(environ, words):
    with pytest.raises(InputError) as e:
        parallel.initialize(environ)
    for w in words:
        assert w in str(e.value)


def test_initialize_is_a_no_op_for_one_process():
    assert parallel.initialize({}) is False
    assert parallel.initialize({"SLURM_NTASKS": "1"}) is False
    assert parallel.initialize({"KDJAX_COORDINATOR": "h:1", "KDJAX_NUM_PROCESSES": "1",
                                "KDJAX_PROCESS_ID": "0"}) is False


def test_mesh_shapes_and_defaults():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("members", "data", "fsdp") and mesh.devices.size == len(jax.devices())
    with pytest.raises(InputError, match="members x data"):
        parallel.make_mesh(1, len(jax.devices()) + 1)
    with pytest.raises(InputError, match="members: expected an int >= 1"):
        parallel.make_mesh(0)
    assert parallel.default_shape(8, 16, 64) == (8, 1)
    assert parallel.default_shape(8, 2, 64) == (2, 4)
    assert parallel.default_shape(8, 3, 6) == (1, 6)  # data must divide the batch
    assert parallel.default_shape(1, 5, 64) == (1, 1)
