"""Timing of the hot distillation step: kdjax against the PyTorch reference (the MLP and
ResNet presets; their shapes and inputs in ``presets.py``, the rows in ``rows_torch.py`` and
``rows_kdjax.py``).

Protocol (DESIGN.md): same process, same shapes, interleaved repetitions, warm-up and
compilation excluded from step time and reported separately, every timed region ends
on a device sync (``block_until_ready`` / ``torch.cuda.synchronize``), medians with
min/max. FLOPs count matmuls and convolutions only (forward 2·B·in·out per dense
layer, 2·outputs·kh·kw·C_in per convolution; backward twice the forward except the
first layer's unneeded input gradient).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import torch

from benchmarks.presets import (GPU_IMPLS, IMPLS, PEERS, SWEEP_ROWS, TEACHER_ONLINE, Impl, Inputs, Preset,
                                sync_torch)
from benchmarks.rows_kdjax import KdjaxFused, KdjaxStep, KdjaxSweep
from benchmarks.rows_keras import KerasDistiller
from benchmarks.rows_torch import TorchEager, TorchFunc


def make_impls(p: Preset, inp: Inputs, which=IMPLS, eager_torch: bool = False) -> list[Impl]:
    """The rows to time. ``eager_torch``: the torch.compile rows run their step uncompiled
    (smoke tests: the code paths and checks, not those rows' speed)."""
    c = not eager_torch
    table = {"torch_eager": lambda: TorchEager(p, inp),
             "torch_eager_cached": lambda: TorchEager(p, inp, cached=True),
             "torch_eager_cached_channels_last": lambda: TorchEager(p, inp, cached=True, channels_last=True),
             "torch_compile": lambda: TorchEager(p, inp, compiled=True, use_compile=c),
             "torch_compile_func": lambda: TorchFunc(p, inp, compiled=c),
             "torch_func_sweep": lambda: TorchFunc(p, inp, sweep_members=True, compiled=c),
             "torch_compile_func_graphs": lambda: TorchFunc(p, inp, mode="reduce-overhead", compiled=c),
             "torch_func_sweep_graphs": lambda: TorchFunc(p, inp, sweep_members=True, mode="reduce-overhead",
                                                          compiled=c),
             "keras_distiller": lambda: KerasDistiller(p, inp),
             "keras_distiller_spe": lambda: KerasDistiller(p, inp, steps_per_execution=True),
             "kdjax_step": lambda: KdjaxStep(p, inp),
             "kdjax_fused": lambda: KdjaxFused(p, inp),
             "kdjax_sweep": lambda: KdjaxSweep(p, inp)}
    names = [n for n in p.impls if n in which] + [n for n in GPU_IMPLS if n in which and not p.image]
    return [table[name]() for name in names]  # in the preset's order


def matmul_peak(torch_device: str, n: int, repeats: int = 10) -> dict:
    """The machine's float32 matmul peak: best GFLOP/s over ``repeats`` n x n matmuls,
    for JAX and for torch (their BLAS differ); the larger is the machine's peak."""

    def best(run, sync):
        run(); sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(); sync()
            times.append(time.perf_counter() - t0)
        return 2 * n**3 / min(times) / 1e9, 2 * n**3 / statistics.median(times) / 1e9

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    out_j = []
    jax_best, jax_med = best(lambda: out_j.append(f(a)), lambda: jax.block_until_ready(out_j.pop()))
    dev = torch.device(torch_device)
    b = torch.randn(n, n, device=dev)
    torch_best, torch_med = best(lambda: b @ b, lambda: sync_torch(dev))
    return {"n": n, "jax": jax_best, "torch": torch_best, "jax_median": jax_med,
            "torch_median": torch_med}


def bench_preset(p: Preset, repeats: int, torch_device: str, peak_gflops: float,
                 on_progress: Callable[[str], None] = lambda s: None, which=IMPLS, eager_torch: bool = False) -> dict:
    torch.compiler.reset()  # each preset compiles its own torch programs (dynamo's recompile limit is global)
    inp = Inputs(p, torch_device)
    impls, results, compile_s = make_impls(p, inp, which, eager_torch), {}, {}
    live = []
    for impl in impls:
        on_progress(f"{p.name}: compiling {impl.name}")
        try:
            compile_s[impl.name] = impl.setup()
            live.append(impl)
        except Exception as e:  # reported as a row (e.g. torch.compile without a compiler)
            results[impl.name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            traceback.print_exc(limit=1)
    samples: dict[str, list[float]] = {impl.name: [] for impl in live}
    for r in range(repeats):  # interleaved repetitions
        for impl in list(live):
            on_progress(f"{p.name}: repeat {r + 1}/{repeats} {impl.name}")
            try:
                seconds, steps = impl.run()
            except Exception as e:  # reported as a failed row; the other rows go on
                results[impl.name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                traceback.print_exc(limit=1)
                live.remove(impl)
                continue
            samples[impl.name].append(seconds / steps * 1e6)
    for impl in live:
        us = samples[impl.name]
        med = statistics.median(us)
        flops = p.flops(teacher_online=impl.name in TEACHER_ONLINE)
        gflops = flops / (med * 1e-6) / 1e9
        results[impl.name] = {
            "us_per_step": {"median": med, "min": min(us), "max": max(us)},
            "steps_per_s": 1e6 / med, "flops_per_step": flops, "gflops": gflops,
            "frac_peak": gflops / peak_gflops, "compile_s": compile_s[impl.name],
            "repeats": len(us), "per_student_step": _is_sweep(impl.name),
        } | getattr(impl, "details", {})
    med = {name: r["us_per_step"]["median"] for name, r in results.items() if "us_per_step" in r}
    base = med.get("torch_eager")
    speedup = {name: base / m for name, m in med.items() if base and name != "torch_eager"}
    best, vs_best = best_torch(med)
    return {"shapes": dataclasses.asdict(p), "results": results, "speedup_vs_torch_eager": speedup,
            "best_torch": best, "speedup_vs_best_torch": vs_best}


def best_torch(med: dict) -> tuple[dict, dict]:
    """The strongest peer (PyTorch or Keras) of each kdjax row, from median µs per
    (student-)step: for a single run the fastest peer single-run row; for a sweep the
    fastest of the peer sweep rows *and* the best single run (24 sequential single runs
    are a sweep too). Returns ``({"single": row, "sweep": row}, {kdjax row: ratio})``,
    ratio > 1 meaning kdjax is faster."""
    single = {n: m for n, m in med.items() if n.startswith(PEERS) and not _is_sweep(n)}
    swept = {n: m for n, m in med.items() if n.startswith(PEERS) and _is_sweep(n)}
    best = {"single": min(single, key=single.get) if single else None}
    if single or swept:
        both = swept | ({best["single"]: single[best["single"]]} if single else {})
        best["sweep"] = min(both, key=both.get)
    else:
        best["sweep"] = None
    ratios = {}
    for name, m in med.items():
        peer = best["sweep" if _is_sweep(name) else "single"]
        if not name.startswith(PEERS) and peer is not None:
            ratios[name] = med[peer] / m
    return best, ratios


def _is_sweep(name: str) -> bool:
    return name.startswith(SWEEP_ROWS)
