"""The ``lm`` preset: the distillation loss of a language model's output layer alone.

Forward + backward (value and gradients of the hidden states and the student's output
kernel) of ``distillation_loss(hidden @ kernel, teacher_hidden @ teacher_kernel, labels,
T=2, alpha=0.5)`` over ``tokens x hidden x vocab``, three ways, same inputs, medians of
interleaved repetitions:

* ``jax_naive``: the whole ``[tokens, vocab]`` logits (kdjax's ``distillation_loss``);
* ``kdjax_fused``: ``kdjax.fused.linear_distillation_loss``, ``chunk_size`` tokens at a time;
* ``jax_naive_logits`` / ``kdjax_fused_logits``: the same two with the teacher given as its
  ``[tokens, vocab]`` logits (a cached teacher), an argument of the program;
* ``torch_naive``: the same loss in PyTorch on the whole logits (``parity/reference.py``).

Peak memory: XLA's compiled ``memory_analysis()`` (arguments + outputs + temporaries)
for the JAX rows; ``torch.cuda.max_memory_allocated`` for torch on a GPU (on a CPU
torch reports none).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from kdjax.fused import linear_distillation_loss
from kdjax.losses import distillation_loss
from parity import reference as ref

SHAPES = {"cpu": (4096, 512, 32768), "gpu": (8192, 4096, 128256)}


def bench_lm(tokens: int, hidden: int, vocab: int, *, dtype: str = "float32", repeats: int = 3,
             chunk_size: int = 256, torch_device: str = "cpu", on_progress=lambda s: None) -> dict:
    rng = np.random.default_rng(0)
    np_dtype = np.float32
    h = rng.standard_normal((tokens, hidden)).astype(np_dtype)
    w = (rng.standard_normal((hidden, vocab)) / np.sqrt(hidden)).astype(np_dtype)
    th = rng.standard_normal((tokens, hidden)).astype(np_dtype)
    tw = (rng.standard_normal((hidden, vocab)) / np.sqrt(hidden)).astype(np_dtype)
    y = rng.integers(0, vocab, tokens)
    jd = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    J = lambda a: jnp.asarray(a, jd)
    jh, jw, jth, jtw, jy = J(h), J(w), J(th), J(tw), jnp.asarray(y)

    naive = jax.jit(jax.value_and_grad(
        lambda h_, w_: distillation_loss(h_ @ w_, jth @ jtw, jy, 2.0, 0.5), (0, 1)))
    fused = jax.jit(jax.value_and_grad(
        lambda h_, w_: linear_distillation_loss(h_, w_, jy, teacher_hidden=jth, teacher_kernel=jtw,
                                                temperature=2.0, alpha=0.5, chunk_size=chunk_size), (0, 1)))
    naive_logits = jax.jit(jax.value_and_grad(
        lambda h_, w_, t_: distillation_loss(h_ @ w_, t_, jy, 2.0, 0.5), (0, 1)))
    fused_logits = jax.jit(jax.value_and_grad(
        lambda h_, w_, t_: linear_distillation_loss(h_, w_, jy, teacher_logits=t_, temperature=2.0, alpha=0.5,
                                                    chunk_size=chunk_size), (0, 1)))
    jt = jax.block_until_ready(jth @ jtw)
    rows, runs = {}, {}
    for name, fn, args in (("jax_naive", naive, (jh, jw)), ("kdjax_fused", fused, (jh, jw)),
                           ("jax_naive_logits", naive_logits, (jh, jw, jt)),
                           ("kdjax_fused_logits", fused_logits, (jh, jw, jt))):
        on_progress(f"lm: compiling {name}")
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        mem = compiled.memory_analysis()
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        rows[name] = {"compile_s": time.perf_counter() - t0, "peak_bytes": int(peak),
                      "temp_bytes": int(mem.temp_size_in_bytes)}
        runs[name] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))

    dev = torch.device(torch_device)
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    T = lambda a: torch.from_numpy(a).to(dev, tdtype)
    t_h, t_w, t_th, t_tw, t_y = T(h), T(w), T(th), T(tw), torch.from_numpy(y).to(dev)
    t_h.requires_grad_(), t_w.requires_grad_()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def torch_step():
        t_h.grad = t_w.grad = None
        with torch.no_grad():
            teacher = t_th @ t_tw
        loss = ref.distillation_loss((t_h @ t_w).float(), teacher.float(), t_y, 2.0, 0.5)
        loss.backward()
        sync()

    runs["torch_naive"] = torch_step
    rows["torch_naive"] = {"compile_s": None, "peak_bytes": None, "temp_bytes": None}
    samples = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up
        on_progress(f"lm: warm-up {name}")
        if name == "torch_naive" and dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run()
        if name == "torch_naive" and dev.type == "cuda":
            rows[name]["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    for r in range(repeats):
        for name, run in runs.items():
            on_progress(f"lm: repeat {r + 1}/{repeats} {name}")
            t0 = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - t0)
    flops = 2 * tokens * hidden * vocab * 4  # student fwd + 2 grads + teacher fwd
    for name, s in samples.items():
        med = statistics.median(s)
        rows[name].update(ms={"median": 1e3 * med, "min": 1e3 * min(s), "max": 1e3 * max(s)},
                          gflops=flops / med / 1e9, repeats=len(s))
    base = rows["jax_naive"]
    ratios = {"fused_memory_vs_naive": base["peak_bytes"] / rows["kdjax_fused"]["peak_bytes"],
              "fused_temp_vs_naive": base["temp_bytes"] / rows["kdjax_fused"]["temp_bytes"],
              "fused_time_vs_naive": rows["kdjax_fused"]["ms"]["median"] / base["ms"]["median"],
              "fused_time_vs_torch": rows["kdjax_fused"]["ms"]["median"] / rows["torch_naive"]["ms"]["median"],
              "fused_logits_temp_vs_naive_logits": rows["jax_naive_logits"]["temp_bytes"]
              / rows["kdjax_fused_logits"]["temp_bytes"],
              "fused_logits_time_vs_naive_logits": rows["kdjax_fused_logits"]["ms"]["median"]
              / rows["jax_naive_logits"]["ms"]["median"]}
    return {"shape": {"tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": dtype, "chunk_size": chunk_size},
            "results": rows, "ratios": ratios}
