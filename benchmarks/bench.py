"""Timing of the hot distillation step: kdjax against the PyTorch reference.

Protocol (DESIGN.md): same process, same shapes, interleaved repetitions, warm-up and
compilation excluded from step time and reported separately, every timed region ends
on a device sync (``block_until_ready`` / ``torch.cuda.synchronize``), medians with
min/max. FLOPs are counted from the layer widths (matmuls only: forward 2·B·in·out per
layer, backward twice that except the first layer's unneeded input gradient).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

import kdjax
from kdjax import sweep
from parity import reference as ref

SWEEP_T = (1.0, 2.0, 4.0, 8.0)
SWEEP_ALPHA = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)
IMPLS = ("torch_eager", "torch_compile", "kdjax_step", "kdjax_fused", "kdjax_sweep")


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    teacher: tuple[int, ...]  # widths, input first
    student: tuple[int, ...]
    batch: int
    num_samples: int
    steps: int          # steps per timed repetition
    sweep_steps: int    # steps per repetition for the 24-student sweep
    seed_models: bool = False  # the seed's TeacherMLP/StudentMLP (teacher has dropout)

    def jax_models(self):
        if self.seed_models:
            return (kdjax.TeacherMLP(self.teacher[1], self.teacher[-1]),
                    kdjax.StudentMLP(self.student[1], self.student[-1]))
        return (kdjax.MLP(self.teacher[1:-1], self.teacher[-1]),
                kdjax.MLP(self.student[1:-1], self.student[-1]))

    def torch_models(self):
        if self.seed_models:
            return (ref.TeacherMLP(self.teacher[0], self.teacher[1], self.teacher[-1]),
                    ref.StudentMLP(self.student[0], self.student[1], self.student[-1]))
        return (ref.MLP(self.teacher[0], self.teacher[1:-1], self.teacher[-1]),
                ref.MLP(self.student[0], self.student[1:-1], self.student[-1]))

    def flops(self, teacher_online: bool) -> float:
        """Matmul FLOPs of one distillation step."""
        mm = lambda w: sum(2 * self.batch * a * b for a, b in zip(w[:-1], w[1:]))
        student = 3 * mm(self.student) - 2 * self.batch * self.student[0] * self.student[1]
        return student + (mm(self.teacher) if teacher_online else 0)


PRESETS = {
    "seed": Preset("seed", (50, 256, 256, 128, 5), (50, 64, 5), 64, 500, 500, 500, True),
    "hinton": Preset("hinton", (784, 1200, 1200, 10), (784, 800, 800, 10), 128, 2048, 20, 4),
    # compute-bound: one wide hidden layer, large batch; matmuls dominate Adam and softmax
    "wide": Preset("wide", (1024, 4096, 128), (1024, 2048, 128), 2048, 8192, 6, 1),
}


def sync_torch(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Impl:
    """``setup()`` prepares and compiles (returns compile seconds or None); ``run()`` times
    one repetition and returns (seconds, student-steps done)."""

    name = ""

    def __init__(self, p: Preset, inp: "Inputs"):
        self.p, self.inp = p, inp

    def setup(self) -> float | None: ...

    def run(self) -> tuple[float, int]: ...


class Inputs:
    """Shared data for one preset: the same arrays go to every implementation."""

    def __init__(self, p: Preset, torch_device: str):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((p.num_samples, p.teacher[0])).astype(np.float32)
        self.y = rng.integers(0, p.teacher[-1], p.num_samples).astype(np.int32)
        self.schedule = np.asarray(kdjax.data.seed_schedule(jax.random.PRNGKey(0), p.num_samples,
                                                             p.batch, p.steps))
        self.tdev = torch.device(torch_device)
        torch.manual_seed(0)
        self.t_teacher, self.t_student = (m.to(self.tdev) for m in p.torch_models())
        self.t_teacher.eval()
        # both sides start from the same weights
        self.teacher_params = kdjax.convert.torch_to_flax(self.t_teacher.state_dict())
        self.student_params = kdjax.convert.torch_to_flax(self.t_student.state_dict())

    def cached_data(self, teacher) -> dict:
        """The dataset on device with the teacher's logits computed once (the fused path)."""
        x, y = jnp.asarray(self.x), jnp.asarray(self.y)
        return {"x": x, "y": y, "teacher_logits": kdjax.predict_logits(teacher, self.teacher_params, x)}


class TorchEager(Impl):
    name = "torch_eager"

    def __init__(self, p: Preset, inp: Inputs, compiled: bool = False):
        self.p, self.inp, self.compiled = p, inp, compiled
        if compiled:
            self.name = "torch_compile"

    def setup(self):
        inp, dev = self.inp, self.inp.tdev
        self.student = self.p.torch_models()[1].to(dev)
        self.student.load_state_dict(inp.t_student.state_dict())
        self.opt = torch.optim.Adam(self.student.parameters(), lr=1e-3)
        x, y = torch.from_numpy(inp.x).to(dev), torch.from_numpy(inp.y).long().to(dev)
        self.batches = [(x[i], y[i]) for i in torch.from_numpy(inp.schedule.copy()).long().to(dev)]
        teacher, student, opt = inp.t_teacher, self.student, self.opt

        def step(xb, yb):
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                t_logits = teacher(xb)
            loss = ref.distillation_loss(student(xb), t_logits, yb, 3.0, 0.7)
            loss.backward()
            opt.step()
            return loss.detach()

        self.step = torch.compile(step) if self.compiled else step
        t0 = time.perf_counter()
        for xb, yb in self.batches[:3]:  # warm-up (and compilation)
            self.step(xb, yb)
        sync_torch(dev)
        return time.perf_counter() - t0 if self.compiled else None

    def run(self):
        t0 = time.perf_counter()
        for xb, yb in self.batches:
            self.step(xb, yb)
        sync_torch(self.inp.tdev)
        return time.perf_counter() - t0, len(self.batches)


class KdjaxStep(Impl):
    """A Python loop over kdjax's jitted step; the teacher runs online (as in torch)."""

    name = "kdjax_step"

    def setup(self):
        teacher, student = self.p.jax_models()
        self.fn = kdjax.make_train_step(student, "kd", teacher=teacher)
        self.tparams = jax.device_put(self.inp.teacher_params)
        self.state = kdjax.state_from_params(self.inp.student_params)
        x, y = jnp.asarray(self.inp.x), jnp.asarray(self.inp.y)
        self.batches = [{"x": x[i], "y": y[i]} for i in jnp.asarray(self.inp.schedule)]
        self.rng, self.hyper = jax.random.PRNGKey(0), kdjax.make_hyper(3.0, 0.7)
        t0 = time.perf_counter()
        self.fn = self.fn.lower(self.state, self.batches[0], self.rng, self.hyper,
                                self.tparams).compile()
        compile_s = time.perf_counter() - t0
        for b in self.batches[:3]:
            self.state, m = self.fn(self.state, b, self.rng, self.hyper, self.tparams)
        jax.block_until_ready(self.state)
        return compile_s

    def run(self):
        state, fn, rng, hyper, tp = self.state, self.fn, self.rng, self.hyper, self.tparams
        t0 = time.perf_counter()
        for b in self.batches:
            state, _ = fn(state, b, rng, hyper, tp)
        jax.block_until_ready(state)
        self.state = state
        return time.perf_counter() - t0, len(self.batches)


class KdjaxFused(Impl):
    """kdjax's fused run: all steps in one lax.scan, teacher logits cached once."""

    name = "kdjax_fused"

    def setup(self):
        teacher, student = self.p.jax_models()
        self.data = self.inp.cached_data(teacher)
        self.state = kdjax.state_from_params(self.inp.student_params)
        self.schedule = jnp.asarray(self.inp.schedule)
        self.rng, self.hyper = jax.random.PRNGKey(0), kdjax.make_hyper(3.0, 0.7)
        run = kdjax.make_run(student, "kd")
        t0 = time.perf_counter()
        self.fn = run.lower(self.state, self.data, self.schedule, self.rng, self.hyper).compile()
        compile_s = time.perf_counter() - t0
        self.run()  # warm-up
        return compile_s

    def run(self):
        t0 = time.perf_counter()
        self.state, m = self.fn(self.state, self.data, self.schedule, self.rng, self.hyper)
        jax.block_until_ready((self.state, m))
        return time.perf_counter() - t0, self.schedule.shape[0]


class KdjaxSweep(Impl):
    """24 students (T x alpha grid) as one vmapped fused program; time per student-step."""

    name = "kdjax_sweep"

    def setup(self):
        teacher, student = self.p.jax_models()
        self.data = self.inp.cached_data(teacher)
        # a temperature x alpha grid at one seed: same init and minibatches for every member
        temps, alphas, seeds = sweep.grid(SWEEP_T, SWEEP_ALPHA, [0])
        keys = sweep.member_keys(seeds)
        self.states = sweep.init_members(student, keys["init"], self.p.student[0])
        self.schedules = kdjax.data.seed_schedule(keys["schedule"][0], self.p.num_samples,
                                                  self.p.batch, self.p.sweep_steps)
        self.rngs, self.hyper = keys["dropout"], sweep.sweep_hyper(temps, alphas)
        self.members = len(temps)
        run = sweep.make_sweep_run(student, "kd", shared_schedule=True)
        t0 = time.perf_counter()
        self.fn = run.lower(self.states, self.data, self.schedules, self.rngs, self.hyper).compile()
        compile_s = time.perf_counter() - t0
        self.run()
        return compile_s

    def run(self):
        t0 = time.perf_counter()
        self.states, m = self.fn(self.states, self.data, self.schedules, self.rngs, self.hyper)
        jax.block_until_ready((self.states, m))
        return time.perf_counter() - t0, self.members * self.schedules.shape[0]


def make_impls(p: Preset, inp: Inputs, which=IMPLS) -> list[Impl]:
    table = {"torch_eager": lambda: TorchEager(p, inp),
             "torch_compile": lambda: TorchEager(p, inp, compiled=True),
             "kdjax_step": lambda: KdjaxStep(p, inp),
             "kdjax_fused": lambda: KdjaxFused(p, inp),
             "kdjax_sweep": lambda: KdjaxSweep(p, inp)}
    return [table[name]() for name in which]


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
                 on_progress: Callable[[str], None] = lambda s: None, which=IMPLS) -> dict:
    inp = Inputs(p, torch_device)
    impls, results, compile_s = make_impls(p, inp, which), {}, {}
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
        for impl in live:
            on_progress(f"{p.name}: repeat {r + 1}/{repeats} {impl.name}")
            seconds, steps = impl.run()
            samples[impl.name].append(seconds / steps * 1e6)
    for impl in live:
        us = samples[impl.name]
        med = statistics.median(us)
        flops = p.flops(teacher_online=impl.name in ("torch_eager", "torch_compile", "kdjax_step"))
        gflops = flops / (med * 1e-6) / 1e9
        results[impl.name] = {
            "us_per_step": {"median": med, "min": min(us), "max": max(us)},
            "steps_per_s": 1e6 / med, "flops_per_step": flops, "gflops": gflops,
            "frac_peak": gflops / peak_gflops, "compile_s": compile_s[impl.name],
            "repeats": len(us), "per_student_step": impl.name == "kdjax_sweep",
        }
    base = results.get("torch_eager", {}).get("us_per_step", {}).get("median")
    speedup = {name: base / r["us_per_step"]["median"] for name, r in results.items()
               if base and name != "torch_eager" and "us_per_step" in r}
    return {"shapes": dataclasses.asdict(p), "results": results, "speedup_vs_torch_eager": speedup}
