"""Timing of the hot distillation step: kdjax against the PyTorch reference.

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
import numpy as np
import torch

import kdjax
from kdjax import sweep
from parity import reference as ref

SWEEP_T = (1.0, 2.0, 4.0, 8.0)
SWEEP_ALPHA = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)
IMPLS = ("torch_eager", "torch_eager_cached", "torch_compile", "torch_compile_func", "torch_func_sweep",
         "kdjax_step", "kdjax_fused", "kdjax_sweep")
GPU_IMPLS = ("torch_compile_func_graphs", "torch_func_sweep_graphs")  # CUDA graphs: on a GPU only
SWEEP_ROWS = ("torch_func_sweep", "kdjax_sweep")  # timed per student-step
TEACHER_ONLINE = ("torch_eager", "torch_compile", "kdjax_step")


@dataclasses.dataclass(frozen=True)
class Preset:
    """MLPs: ``teacher``/``student`` are layer widths, input first. ResNets (``image``
    set, NHWC): they are ``(stage_sizes, widths)`` of a CIFAR-stem ``ResNet``."""

    name: str
    teacher: tuple
    student: tuple
    batch: int
    num_samples: int
    steps: int          # steps per timed repetition
    sweep_steps: int    # steps per repetition for the 24-student sweep
    seed_models: bool = False  # the seed's TeacherMLP/StudentMLP (teacher has dropout)
    image: tuple[int, int, int] | None = None
    num_classes: int = 10
    impls: tuple[str, ...] = IMPLS

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.image if self.image else (self.teacher[0],)

    @property
    def classes(self) -> int:
        return self.num_classes if self.image else self.teacher[-1]

    def jax_models(self):
        if self.image:
            return tuple(kdjax.ResNet(*cfg, self.num_classes, "cifar") for cfg in (self.teacher, self.student))
        if self.seed_models:
            return (kdjax.TeacherMLP(self.teacher[1], self.teacher[-1]),
                    kdjax.StudentMLP(self.student[1], self.student[-1]))
        return (kdjax.MLP(self.teacher[1:-1], self.teacher[-1]),
                kdjax.MLP(self.student[1:-1], self.student[-1]))

    def torch_models(self):
        if self.image:
            return tuple(ref.ResNet(*cfg, self.num_classes, "cifar", self.image[-1])
                         for cfg in (self.teacher, self.student))
        if self.seed_models:
            return (ref.TeacherMLP(self.teacher[0], self.teacher[1], self.teacher[-1]),
                    ref.StudentMLP(self.student[0], self.student[1], self.student[-1]))
        return (ref.MLP(self.teacher[0], self.teacher[1:-1], self.teacher[-1]),
                ref.MLP(self.student[0], self.student[1:-1], self.student[-1]))

    def flops(self, teacher_online: bool) -> float:
        """Matmul and convolution FLOPs of one distillation step."""
        teacher, student = (forward_flops(m, (self.batch, *self.input_shape)) for m in self.jax_models())
        s_total, s_first = student
        return 3 * s_total - s_first + (teacher[0] if teacher_online else 0)


def forward_flops(model, shape) -> tuple[float, float]:
    """``(all, first layer)`` forward FLOPs of the model's dense layers and convolutions
    (every module with a ``kernel`` param: 2 x outputs x fan-in), from the shapes Flax
    sees (``jax.eval_shape``: nothing runs)."""
    import flax.linen as nn

    counts = []

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        params = context.module.variables.get("params", {})
        if context.method_name == "__call__" and "kernel" in params:
            counts.append(2 * np.prod(out.shape) * np.prod(params["kernel"].shape[:-1]))
        return out

    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    with nn.intercept_methods(count):
        jax.eval_shape(model.apply, variables, x)
    return float(sum(counts)), float(counts[0])


PRESETS = {
    "seed": Preset("seed", (50, 256, 256, 128, 5), (50, 64, 5), 64, 500, 500, 500, True),
    # (a sweep repetition runs as many steps per member as a fused one: a run's fixed costs
    # are then shared alike, and "per student-step" compares like with like)
    "hinton": Preset("hinton", (784, 1200, 1200, 10), (784, 800, 800, 10), 128, 2048, 20, 20),
    # compute-bound: one wide hidden layer, large batch; matmuls dominate Adam and softmax
    "wide": Preset("wide", (1024, 4096, 128), (1024, 2048, 128), 2048, 8192, 3, 3),
    # a CIFAR-stem ResNet-18-shaped teacher (half width) -> a 4-block ResNet student, CIFAR images
    "cifar": Preset("cifar", ((2, 2, 2, 2), (32, 64, 128, 256)), ((1, 1, 1, 1), (16, 32, 64, 128)), 128,
                    1024, 3, 1, image=(32, 32, 3),
                    impls=("torch_eager", "torch_eager_cached", "torch_compile", "kdjax_step", "kdjax_fused")),
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
        self.x = rng.standard_normal((p.num_samples, *p.input_shape)).astype(np.float32)
        self.y = rng.integers(0, p.classes, p.num_samples).astype(np.int32)
        # torch's layout: NCHW images
        self.x_torch = np.ascontiguousarray(self.x.transpose(0, 3, 1, 2)) if p.image else self.x
        self.schedule = np.asarray(kdjax.data.seed_schedule(jax.random.PRNGKey(0), p.num_samples,
                                                             p.batch, p.steps))
        self.tdev = torch.device(torch_device)
        torch.manual_seed(0)
        self.t_teacher, self.t_student = (m.to(self.tdev) for m in p.torch_models())
        self.t_teacher.eval()
        # both sides start from the same weights
        example = jax.ShapeDtypeStruct((1, *p.input_shape), jnp.float32)
        teacher, student = p.jax_models()
        self.teacher_state = self._state(self.t_teacher, teacher, example)
        self.student_vars = self._variables(self.t_student, student, example)

    @staticmethod
    def _variables(module, model, example) -> tuple:
        v = dict(kdjax.convert.torch_to_variables(module.state_dict(), jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                                                                 example)))
        return v.pop("params"), v

    def _state(self, module, model, example, tx=None):
        params, model_state = self._variables(module, model, example)
        return kdjax.state_from_params(params, model_state=model_state, tx=tx)

    def student_state(self, members: int | None = None):
        """A fresh kdjax state at the reference student's weights (``members`` copies)."""
        params, model_state = self.student_vars
        if members:
            params, model_state = jax.tree_util.tree_map(lambda a: np.stack([a] * members), (params, model_state))
        return kdjax.state_from_params(params, model_state=model_state, members=bool(members))

    def cached_data(self, teacher) -> dict:
        """The dataset on device with the teacher's logits computed once (the fused path)."""
        x, y = jnp.asarray(self.x), jnp.asarray(self.y)
        return {"x": x, "y": y, "teacher_logits": kdjax.predict_logits(teacher, self.teacher_state, x,
                                                                       batch_size=1024)}

    def teacher_logits_torch(self) -> torch.Tensor:
        """The reference teacher's eval logits for every example, once (cached-teacher rows)."""
        with torch.no_grad():
            x = torch.from_numpy(self.x_torch).to(self.tdev)
            return torch.cat([self.t_teacher(x[i:i + 1024]) for i in range(0, len(x), 1024)])


class TorchEager(Impl):
    """The reference's distillation step: teacher forward (eval) unless ``cached``, student
    forward, loss, backward, ``Adam.step()``. ``cached``: the teacher's logits computed
    once up front (what kdjax's fused run does), Adam with ``fused=True`` where the
    installed torch supports it."""

    name = "torch_eager"

    def __init__(self, p: Preset, inp: Inputs, compiled: bool = False, cached: bool = False,
                 use_compile: bool = True):
        self.p, self.inp, self.compiled, self.cached = p, inp, compiled and use_compile, cached
        self.name = "torch_compile" if compiled else "torch_eager_cached" if cached else "torch_eager"

    def setup(self):
        inp, dev = self.inp, self.inp.tdev
        self.student = self.p.torch_models()[1].to(dev)
        self.student.load_state_dict(inp.t_student.state_dict())
        self.student.train()
        try:
            self.opt = torch.optim.Adam(self.student.parameters(), lr=1e-3, fused=self.cached or None)
        except (RuntimeError, TypeError):  # no fused Adam for this device/torch
            self.opt = torch.optim.Adam(self.student.parameters(), lr=1e-3)
        x, y = torch.from_numpy(inp.x_torch).to(dev), torch.from_numpy(inp.y).long().to(dev)
        t_all = inp.teacher_logits_torch() if self.cached else None
        idx = torch.from_numpy(inp.schedule.copy()).long().to(dev)
        self.batches = [(x[i], y[i], None if t_all is None else t_all[i]) for i in idx]
        teacher, student, opt = inp.t_teacher, self.student, self.opt

        def step(xb, yb, tb):
            opt.zero_grad(set_to_none=True)
            if tb is None:
                with torch.no_grad():
                    tb = teacher(xb)
            loss = ref.distillation_loss(student(xb), tb, yb, 3.0, 0.7)
            loss.backward()
            opt.step()
            return loss.detach()

        self.step = torch.compile(step, dynamic=False) if self.compiled else step
        t0 = time.perf_counter()
        for b in self.batches[:3]:  # warm-up (and compilation)
            self.step(*b)
        sync_torch(dev)
        return time.perf_counter() - t0 if self.compiled else None

    def run(self):
        t0 = time.perf_counter()
        for b in self.batches:
            self.step(*b)
        sync_torch(self.inp.tdev)
        return time.perf_counter() - t0, len(self.batches)


def reference_steps(p: Preset, inp: Inputs, batches, temperature: float, alpha: float) -> dict:
    """The reference student (nn.Module, ``torch.optim.Adam``) after ``batches``
    ``(x, y, teacher_logits)``: its parameters by name."""
    student = p.torch_models()[1].to(inp.tdev)
    student.load_state_dict(inp.t_student.state_dict())
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for xb, yb, tb in batches:
        opt.zero_grad()
        ref.distillation_loss(student(xb), tb, yb, temperature, alpha).backward()
        opt.step()
    return {k: v.detach() for k, v in student.named_parameters()}


def adam_update(p, g, m, v, step, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.Adam's update (the single-tensor path's formula), written out:
    ``p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``; ``step`` a float tensor."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    return p - (lr / bc1) * m / (v.sqrt() / bc2.sqrt() + eps), m, v


class TorchFunc(Impl):
    """The fastest single-run PyTorch we know for these MLPs: ``torch.compile(fullgraph=
    True)`` of a *functional* step (``torch.func.grad_and_value`` over
    ``torch.func.functional_call``, Adam written out), teacher logits cached. With
    ``members`` (the sweep row) the 24 students of ``SWEEP_T x SWEEP_ALPHA`` are stacked
    (``torch.func.stack_module_state``) and stepped by one compiled ``torch.vmap`` of
    it: the torch counterpart of kdjax's vmapped sweep. ``mode`` is passed to
    ``torch.compile`` (``"reduce-overhead"``: CUDA graphs on a GPU)."""

    def __init__(self, p: Preset, inp: Inputs, sweep_members: bool = False, mode: str | None = None,
                 temperature: float = 3.0, alpha: float = 0.7, compiled: bool = True):
        self.p, self.inp, self.sweep_members, self.mode, self.compiled = p, inp, sweep_members, mode, compiled
        self.temperature, self.alpha = temperature, alpha
        self.name = ("torch_func_sweep" if sweep_members else "torch_compile_func") + (
            "_graphs" if mode == "reduce-overhead" else "")

    def setup(self):
        from torch.func import functional_call, grad_and_value, stack_module_state

        inp, dev = self.inp, self.inp.tdev
        student = self.p.torch_models()[1].to(dev)
        student.load_state_dict(inp.t_student.state_dict())
        x, y = torch.from_numpy(inp.x_torch).to(dev), torch.from_numpy(inp.y).long().to(dev)
        t_all = inp.teacher_logits_torch()
        steps = self.p.sweep_steps if self.sweep_members else self.p.steps
        idx = torch.from_numpy(inp.schedule[:steps].copy()).long().to(dev)
        self.batches = [(x[i], y[i], t_all[i]) for i in idx]

        def loss_fn(params, xb, yb, tb, temperature, alpha):
            return ref.distillation_loss(functional_call(student, params, (xb,)), tb, yb, temperature, alpha)

        grad_fn = grad_and_value(loss_fn)
        if self.sweep_members:
            temps, alphas, _ = sweep.grid(SWEEP_T, SWEEP_ALPHA, [0])
            self.members = len(temps)
            params, _ = stack_module_state([student] * self.members)
            self.hyper = tuple(torch.tensor(a, dtype=torch.float32, device=dev) for a in (temps, alphas))
            grad_fn = torch.vmap(grad_fn, in_dims=(0, None, None, None, 0, 0))
        else:
            self.members = 1
            params = {k: v.detach().clone() for k, v in student.named_parameters()}
            self.hyper = (self.temperature, self.alpha)

        def step(params, m, v, count, xb, yb, tb, temperature, alpha):
            grads, loss = grad_fn(params, xb, yb, tb, temperature, alpha)
            count = count + 1
            new = {k: adam_update(params[k], grads[k], m[k], v[k], count) for k in params}
            return ({k: u[0] for k, u in new.items()}, {k: u[1] for k, u in new.items()},
                    {k: u[2] for k, u in new.items()}, count, loss)

        # static shapes: the presets share this code object, and torch's automatic dynamic
        # shapes (after the first shape change) fail inside vmap (kl_div's batchmean)
        self.step = torch.compile(step, fullgraph=True, dynamic=False, mode=self.mode) if self.compiled else step
        self.state = (params, {k: torch.zeros_like(a) for k, a in params.items()},
                      {k: torch.zeros_like(a) for k, a in params.items()},
                      torch.zeros((), dtype=torch.float32, device=dev))
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in self.batches[:3]:  # warm-up (and compilation)
                *self.state, _ = self.step(*self.state, *b, *self.hyper)
        sync_torch(dev)
        compile_s = time.perf_counter() - t0
        self.check_against_reference()
        return compile_s

    def check_against_reference(self, tol: float = 1e-5):
        """After the 3 warm-up steps, every member's weights must equal the reference's
        (nn.Module, ``torch.optim.Adam``) after the same 3 steps at its T and alpha: mean
        absolute difference per tensor <= ``tol`` (lr / 100). Not the maximum: Adam's
        first steps move a weight by ~lr times the *sign* of its gradient, so a gradient
        that cancels to ~0 may round to either sign (compiled reductions reorder sums) and
        move that one weight by up to 2 lr. A wrong T, alpha or Adam moves most weights."""
        temps, alphas = (np.atleast_1d(np.asarray(h.cpu() if torch.is_tensor(h) else h)) for h in self.hyper)
        for i in sorted({0, len(temps) - 1}):
            want = reference_steps(self.p, self.inp, self.batches[:3], float(temps[i]), float(alphas[i]))
            for k, w in want.items():
                got = self.state[0][k][i] if self.sweep_members else self.state[0][k]
                diff = (got - w).abs()
                if not diff.mean().item() <= tol:
                    raise RuntimeError(f"{self.name}: member {i} {k} differs from the reference after 3 steps "
                                       f"(mean abs {diff.mean().item():.2e}, max {diff.max().item():.2e})")

    def run(self):
        state, step, hyper = self.state, self.step, self.hyper
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in self.batches:
                *state, _ = step(*state, *b, *hyper)
        sync_torch(self.inp.tdev)
        self.state = state
        return time.perf_counter() - t0, self.members * len(self.batches)


class KdjaxStep(Impl):
    """A Python loop over kdjax's jitted step; the teacher runs online (as in torch)."""

    name = "kdjax_step"

    def setup(self):
        teacher, student = self.p.jax_models()
        self.fn = kdjax.make_train_step(student, "kd", teacher=teacher)
        self.tparams = self.inp.teacher_state
        self.state = self.inp.student_state()
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
        self.state = self.inp.student_state()
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
    """24 students (T x alpha grid) as one fused program; time per student-step. How the
    members run (one vmap, groups, or in sequence: ``members_per_group``) is chosen by
    ``sweep.pick_members_per_group`` on these inputs first; its timings are reported."""

    name = "kdjax_sweep"

    def setup(self):
        teacher, student = self.p.jax_models()
        self.data = self.inp.cached_data(teacher)
        # a temperature x alpha grid at one seed: same init and minibatches for every member
        temps, alphas, seeds = sweep.grid(SWEEP_T, SWEEP_ALPHA, [0])
        keys = sweep.member_keys(seeds)
        self.states = sweep.init_members(student, keys["init"], jnp.zeros((1, *self.p.input_shape)))
        self.schedules = kdjax.data.seed_schedule(keys["schedule"][0], self.p.num_samples,
                                                  self.p.batch, self.p.sweep_steps)
        self.rngs, self.hyper = keys["dropout"], sweep.sweep_hyper(temps, alphas)
        self.members = len(temps)
        args = (self.states, self.data, self.schedules, self.rngs, self.hyper)
        self.group, times = sweep.pick_members_per_group(student, "kd", *args, repeats=1, shared_schedule=True)
        per_student = 1e6 / (self.members * self.p.sweep_steps)
        self.details = {"members_per_group": self.group,
                        "pick_us_per_student_step": {str(g): t * per_student for g, t in times.items()}}
        run = sweep.make_sweep_run(student, "kd", shared_schedule=True, members_per_group=self.group)
        t0 = time.perf_counter()
        self.fn = run.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        self.run()
        return compile_s

    def run(self):
        t0 = time.perf_counter()
        self.states, m = self.fn(self.states, self.data, self.schedules, self.rngs, self.hyper)
        jax.block_until_ready((self.states, m))
        return time.perf_counter() - t0, self.members * self.schedules.shape[0]


def make_impls(p: Preset, inp: Inputs, which=IMPLS, eager_torch: bool = False) -> list[Impl]:
    """The rows to time. ``eager_torch``: the torch.compile rows run their step uncompiled
    (smoke tests: the code paths and checks, not those rows' speed)."""
    c = not eager_torch
    table = {"torch_eager": lambda: TorchEager(p, inp),
             "torch_eager_cached": lambda: TorchEager(p, inp, cached=True),
             "torch_compile": lambda: TorchEager(p, inp, compiled=True, use_compile=c),
             "torch_compile_func": lambda: TorchFunc(p, inp, compiled=c),
             "torch_func_sweep": lambda: TorchFunc(p, inp, sweep_members=True, compiled=c),
             "torch_compile_func_graphs": lambda: TorchFunc(p, inp, mode="reduce-overhead", compiled=c),
             "torch_func_sweep_graphs": lambda: TorchFunc(p, inp, sweep_members=True, mode="reduce-overhead",
                                                          compiled=c),
             "kdjax_step": lambda: KdjaxStep(p, inp),
             "kdjax_fused": lambda: KdjaxFused(p, inp),
             "kdjax_sweep": lambda: KdjaxSweep(p, inp)}
    return [table[name]() for name in which if name in p.impls or name in GPU_IMPLS and not p.image]


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
    """The strongest PyTorch peer of each kdjax row, from median µs per (student-)step:
    for a single run the fastest torch single-run row; for a sweep the fastest of the
    torch sweep rows *and* the best single run (24 sequential single runs are a sweep
    too). Returns ``({"single": row, "sweep": row}, {kdjax row: ratio})``, ratio > 1
    meaning kdjax is faster."""
    single = {n: m for n, m in med.items() if n.startswith("torch") and not _is_sweep(n)}
    swept = {n: m for n, m in med.items() if n.startswith("torch") and _is_sweep(n)}
    best = {"single": min(single, key=single.get) if single else None}
    if single or swept:
        both = swept | ({best["single"]: single[best["single"]]} if single else {})
        best["sweep"] = min(both, key=both.get)
    else:
        best["sweep"] = None
    ratios = {}
    for name, m in med.items():
        peer = best["sweep" if _is_sweep(name) else "single"]
        if not name.startswith("torch") and peer is not None:
            ratios[name] = med[peer] / m
    return best, ratios


def _is_sweep(name: str) -> bool:
    return name.startswith(SWEEP_ROWS)
