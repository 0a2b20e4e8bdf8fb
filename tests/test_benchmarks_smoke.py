"""The benchmark command runs and writes JSON of the documented shape (timings not checked)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def test_benchmarks_smoke(tmp_path):
    out = tmp_path / "bench.json"
    rows = ("torch_eager", "torch_eager_cached", "torch_compile_func", "torch_func_sweep", "keras_distiller",
            "kdjax_step", "kdjax_fused", "kdjax_sweep")
    cmd = [sys.executable, "-m", "benchmarks", "--preset", "seed", "--steps", "3", "--repeats", "1",
           "--impl", *rows, "--eager-torch", "--precision", "tensorfloat32", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    for key in ("device", "backend", "versions", "peak_gflops", "presets"):
        assert key in data
    # both sides were set to the same precision, and the JSON says which
    assert data["precision"] == {"option": "tensorfloat32", "jax": "tensorfloat32", "torch": "high"}
    seed = data["presets"]["seed"]
    for impl in rows:
        r = seed["results"][impl]
        assert "error" not in r, r  # the functional rows equal the reference after their warm-up steps
        assert r["us_per_step"]["min"] <= r["us_per_step"]["median"] <= r["us_per_step"]["max"]
        assert r["gflops"] > 0 and 0 < r["frac_peak"]
    assert set(seed["speedup_vs_torch_eager"]) == set(rows) - {"torch_eager"}
    assert seed["results"]["keras_distiller"]["flops_per_step"] == seed["results"]["kdjax_step"]["flops_per_step"]
    assert seed["results"]["torch_func_sweep"]["per_student_step"] and seed["results"]["kdjax_sweep"]["per_student_step"]
    best = seed["best_torch"]  # the strongest peer, PyTorch or Keras
    assert best["single"] in ("torch_eager", "torch_eager_cached", "torch_compile_func", "keras_distiller")
    assert best["sweep"] in ("torch_func_sweep", best["single"])  # sequential single runs are a sweep too
    assert set(seed["speedup_vs_best_torch"]) == {"kdjax_step", "kdjax_fused", "kdjax_sweep"}


def test_best_torch_peers():
    from benchmarks.bench import best_torch

    med = {"torch_eager": 500.0, "torch_compile_func": 90.0, "torch_func_sweep": 18.0, "kdjax_fused": 15.0,
           "kdjax_sweep": 12.0}
    best, ratios = best_torch(med)
    assert best == {"single": "torch_compile_func", "sweep": "torch_func_sweep"}
    assert ratios == {"kdjax_fused": 6.0, "kdjax_sweep": 1.5}
    # a sweep slower per student than one run: its peer becomes sequential single runs
    best, ratios = best_torch({"torch_compile_func": 90.0, "torch_func_sweep": 100.0, "kdjax_sweep": 45.0})
    assert best["sweep"] == "torch_compile_func" and ratios == {"kdjax_sweep": 2.0}


def test_flops_counts():
    """Matmul/conv FLOPs from Flax's shapes: the MLP formula, and a ResNet by hand."""
    import dataclasses

    from benchmarks.presets import PRESETS, Preset

    p = PRESETS["hinton"]
    mm = lambda w: sum(2 * p.batch * a * b for a, b in zip(w[:-1], w[1:]))
    assert p.flops(True) == 3 * mm(p.student) - 2 * p.batch * 784 * 800 + mm(p.teacher)
    r = dataclasses.replace(PRESETS["cifar"], teacher=((1,), (4,)), student=((1,), (4,)), batch=2,
                            image=(8, 8, 3), num_classes=5)
    # stem 3->4, two block convs 4->4 (3x3 at 8x8), fc 4->5; no downsample
    fwd = 2 * 2 * 64 * 4 * (9 * 3) + 2 * (2 * 2 * 64 * 4 * (9 * 4)) + 2 * 2 * 5 * 4
    assert r.flops(False) == 3 * fwd - 2 * 2 * 64 * 4 * 27
    assert r.flops(True) == 4 * fwd - 2 * 2 * 64 * 4 * 27
    assert isinstance(r, Preset)


def test_benchmarks_bad_impl():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--impl", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--impl expected" in proc.stderr


def test_scaling_smoke(tmp_path):
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--devices", "1", "2", "--preset", "seed", "--steps", "1",
           "--repeats", "1", "--members-per-device", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["presets"]["seed"]
    assert set(rows) == {"fused/1", "fused/2", "sweep/1", "sweep/2"}
    assert rows["fused/1"]["efficiency"] == 1.0 and rows["sweep/2"]["per_device_per_s"] > 0


def test_functional_torch_rows_are_checked_against_the_reference():
    """The functional step (written-out Adam, vmapped members) trains like nn.Module +
    torch.optim.Adam, and the check notices a wrong weight."""
    import dataclasses

    import torch

    from benchmarks.presets import PRESETS, Inputs
    from benchmarks.rows_torch import TorchFunc

    p = dataclasses.replace(PRESETS["seed"], steps=3, sweep_steps=3)
    inp = Inputs(p, "cpu")
    for members in (False, True):
        row = TorchFunc(p, inp, sweep_members=members, compiled=False)
        row.setup()  # 3 steps, then check_against_reference
        with torch.no_grad():
            row.state[0]["fc2.bias"][-1] += 1e-3  # the last member (or the single run)
        with pytest.raises(RuntimeError, match="differs from the reference"):
            row.check_against_reference()


def test_channels_last_torch_row_is_the_same_model():
    """The cifar preset's channels-last torch row (oneDNN's fast layout) runs a tiny ResNet,
    all of the cifar rows are built for it and none for an MLP preset, and its layout check
    notices a model that is not the reference's."""
    import dataclasses

    import torch

    from benchmarks.bench import make_impls
    from benchmarks.presets import IMAGE_IMPLS, IMPLS, PRESETS, Inputs
    from benchmarks.rows_torch import TorchEager

    p = dataclasses.replace(PRESETS["cifar"], teacher=((1,), (4,)), student=((1,), (4,)), batch=4,
                            image=(8, 8, 3), num_classes=5, num_samples=16, steps=2)
    inp = Inputs(p, "cpu")
    assert {r.name for r in make_impls(p, inp, IMPLS + IMAGE_IMPLS, eager_torch=True)} == set(p.impls)
    seed = PRESETS["seed"]
    assert not [r for r in make_impls(seed, Inputs(seed, "cpu"), IMPLS + IMAGE_IMPLS) if "channels" in r.name]
    row = TorchEager(p, inp, cached=True, channels_last=True)
    row.setup()
    assert row.name == "torch_eager_cached_channels_last"
    assert row.batches[0][0].is_contiguous(memory_format=torch.channels_last)
    seconds, steps = row.run()
    assert steps == len(row.batches) and seconds > 0
    with torch.no_grad():
        row.student.fc.bias += 1.0
    with pytest.raises(RuntimeError, match="differ from the standard layout"):
        row._check_layout(row.batches[0][0])


def test_lm_and_gpt2_presets_smoke(tmp_path):
    """Tiny shapes of both language-model presets in one run: the rows, the gpt2 rows'
    loss check, the JSON."""
    out = tmp_path / "lm.json"
    cmd = [sys.executable, "-m", "benchmarks", "--preset", "lm", "gpt2", "--lm-shape", "256", "16", "512",
           "--gpt2-model", "2", "1", "32", "4", "300", "--gpt2-shape", "2", "16", "--steps", "2", "--repeats", "1",
           "--eager-torch", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    lm = data["lm"]
    assert set(lm["results"]) == {"jax_naive", "kdjax_fused", "jax_naive_logits", "kdjax_fused_logits", "torch_naive"}
    assert lm["results"]["kdjax_fused"]["peak_bytes"] > 0 and lm["ratios"]["fused_time_vs_naive"] > 0
    g = data["gpt2"]
    assert set(g["results"]) == {"torch_eager", "torch_compile", "kdjax_step", "kdjax_fused"}
    assert g["tokens_per_step"] == 32 and g["best_torch"] in ("torch_eager", "torch_compile")
    assert set(g["speedup_vs_best_torch"]) == {"kdjax_step", "kdjax_fused"}
    for r in g["results"].values():
        assert r["tokens_per_s"] > 0 and 0 < r["frac_peak"]
        assert len(r["first_losses"]) == 2


def test_gpt2_flops_and_loss_check(monkeypatch):
    """The FLOP formula by hand, and a torch row that trains something else is refused."""
    import benchmarks.gpt2 as g

    s = g.GPT2Shape(teacher_layers=2, student_layers=1, d_model=16, heads=2, vocab=40, batch=2, length=8, steps=2)
    per_token = lambda layers: layers * (24 * 16 * 16 + 4 * 8 * 16) + 2 * 16 * 40
    assert s.flops() == 16 * (3 * per_token(1) + per_token(2))
    real = g.ref.distillation_loss
    monkeypatch.setattr(g.ref, "distillation_loss", lambda s_, t, y, T, a: real(s_, t, y, T + 1.0, a))
    with pytest.raises(RuntimeError, match="torch_eager's first two losses"):
        g.bench_gpt2(s, repeats=1, which=("torch_eager",))


def test_per_call_rows_smoke():
    from benchmarks.per_call import measure

    r = measure("seed", steps=4, repeats=1)
    assert set(r) == {"step_jit", "step_compiled", "step_teacher_online", "fused", "floor", "run_one_step",
                      "loop_take_batch", "slice_batches"}
    assert all(v["median"] > 0 for v in r.values())


def test_features_preset_smoke(monkeypatch):
    """Tiny shapes of the features preset: hooks in PyTorch and kdjax's objective compute the
    same first two losses (checked inside), and a torch row with another weight is refused."""
    import dataclasses

    import benchmarks.features as bf
    from benchmarks.presets import PRESETS

    p = dataclasses.replace(PRESETS["cifar"], name="features", teacher=((1, 1, 1), (8, 8, 16)),
                            student=((1, 1, 1), (4, 4, 8)), image=(8, 8, 3), batch=8, num_samples=32, steps=2)
    r = bf.bench_features(steps=2, repeats=1, eager_torch=True, p=p)
    assert set(r["results"]) == set(bf.IMPLS) and r["best_peer"].startswith(("torch_eager", "torch_compile"))
    assert set(r["speedup_vs_best_peer"]) == {"kdjax_step", "kdjax_fused"}
    assert "hint:layer3" in r["shape"]["objective"] and "at:layer1" in r["shape"]["objective"]
    real = bf.fref.at  # the torch rows' attention transfer only
    monkeypatch.setattr(bf.fref, "at", lambda s, t: 1.1 * real(s, t))
    with pytest.raises(RuntimeError, match="torch_eager's first two losses"):
        bf.bench_features(steps=2, repeats=1, eager_torch=True, p=p, which=("torch_eager",))


def test_keras_row_refuses_another_loss(monkeypatch):
    import dataclasses

    from benchmarks.presets import PRESETS, Inputs
    from benchmarks.rows_keras import KerasDistiller

    p = dataclasses.replace(PRESETS["seed"], steps=2)
    row = KerasDistiller(p, Inputs(p, "cpu"))
    monkeypatch.setattr(KerasDistiller, "_reference_first_loss", lambda self: 1.0)
    with pytest.raises(RuntimeError, match="differs from the PyTorch reference"):
        row.setup()


def test_fused_step_benchmark_smoke(tmp_path):
    out = tmp_path / "fused.json"
    cmd = [sys.executable, "-m", "benchmarks.fused_step", "--vocab", "512", "--tokens", "2", "16", "--chunk", "8",
           "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())["512"]
    assert r["logits"]["temp_bytes"] > 0 and r["fused"]["temp_bytes"] > 0 and r["time_ratio"] > 0
    assert abs(r["logits"]["first_loss"] - r["fused"]["first_loss"]) < 1e-4 * abs(r["logits"]["first_loss"])


def test_topk_cache_benchmark_smoke(tmp_path):
    """The cached top-k steps (on logits and fused) against the online teacher: their first
    losses agree at k = vocab (the top-k loss is then the dense one), and every row reports."""
    out = tmp_path / "topk.json"
    cmd = [sys.executable, "-m", "benchmarks.topk_cache", "--vocab", "64", "--tokens", "2", "16", "--k", "64",
           "--teacher", "1", "32", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    rows = ("online_logits", "online_fused", "topk_cache_k64", "topk_cache_fused_k64")
    assert all(r[k]["temp_bytes"] > 0 and r[k]["ms"] > 0 for k in rows)
    losses = [r[k]["first_loss"] for k in rows]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0]), losses
    assert r["topk_cache_k64"]["argument_bytes"] < r["online_logits"]["argument_bytes"]  # no teacher parameters


def test_generation_benchmark_smoke(tmp_path):
    """kdjax.generate and transformers' greedy generate on the same tiny model: tokens equal
    (checked before timing) and both rows report."""
    out = tmp_path / "gen.json"
    cmd = [sys.executable, "-m", "benchmarks.generation", "--batch", "2", "--prompt", "4", "--new", "3", "--model", "32",
           "1", "64", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["tokens_equal"] == 1.0 and r["kdjax_generate"]["tokens_per_s"] > 0 and r["speedup"] > 0


def test_on_policy_preset_smoke():
    """Tiny shapes of the on_policy preset: the loss on fixed completions agrees between
    transformers + our reference JSD and kdjax's step (checked inside), and both rows report."""
    import benchmarks.on_policy as bo

    s = bo.OnPolicyShape(teacher=(1, 32, 4, 2, 64), student=(1, 16, 2, 1, 32), vocab=64, batch=2, prompt=4, new=3)
    r = bo.bench_on_policy(s, repeats=1)
    assert set(r["results"]) == {"torch_eager", "kdjax_step"} and r["results"]["kdjax_step"]["ms"] > 0
    assert abs(r["loss_check"]["kdjax"] - r["loss_check"]["torch"]) <= 1e-4 * abs(r["loss_check"]["torch"])


def test_llama_preset_smoke():
    """Tiny shapes of the llama preset: transformers' Qwen2 (eager) and kdjax's Llama with
    FusedLM compute the same first two losses (checked inside), and the JSON's rows."""
    import benchmarks.llama as bl

    s = bl.LlamaShape(teacher=(2, 32, 4, 2, 48), student=(1, 16, 2, 1, 32), vocab=300, batch=2, length=8, steps=2)
    r = bl.bench_llama(s, repeats=1, eager_torch=True, chunk=8, which=("torch_eager", "kdjax_step", "kdjax_fused"))
    assert set(r["results"]) == {"torch_eager", "kdjax_step", "kdjax_fused"} and r["best_torch"] == "torch_eager"
    assert r["results"]["kdjax_fused"]["temp_bytes"] > 0 and r["tokens_per_step"] == 16


def test_sharding_benchmark_smoke(tmp_path):
    """The memory table's command on 2 forced devices: sharded parameters need less memory per
    device than replicated ones, by more as the model grows; both step times report."""
    out = tmp_path / "sharding.json"
    cmd = [sys.executable, "-m", "benchmarks.sharding", "--hidden", "64", "256", "--layers", "2", "--vocab", "64",
           "--tokens", "4", "8", "--repeats", "1", "--devices", "2", "--budget-mb", "1", "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["devices"] == 2
    ratios = [row["fsdp"]["per_device_bytes"] / row["replicated"]["per_device_bytes"] for row in r["rows"]]
    assert ratios[1] < ratios[0] < 1, ratios
    assert r["largest"]["fsdp"] is not None and r["step_ms"]["fsdp"] > 0 and r["step_ms"]["replicated"] > 0


def test_step_profile_smoke():
    """The cifar step's parts, JAX and torch, at batch 4: every row reports."""
    cmd = [sys.executable, "-m", "benchmarks.step_profile", "--batch", "4", "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for part in ("forward", "forward + backward", "step", "step in lax.scan", "BatchNorm (all, f+b)", "Adam"):
        assert f"{part} " in proc.stdout, proc.stdout


def test_conv_profile_smoke():
    """Every convolution of the cifar student, JAX against torch in both layouts, at batch 2."""
    cmd = [sys.executable, "-m", "benchmarks.conv_profile", "--batch", "2", "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch CL f+b" in proc.stdout and "layer4.0.conv2" in proc.stdout, proc.stdout
    total = [line for line in proc.stdout.splitlines() if line.startswith("│ total")]
    assert len(total) == 1 and len(total[0].split("│")) == 12, proc.stdout  # 10 columns

