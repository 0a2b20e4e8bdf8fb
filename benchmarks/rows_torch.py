"""The PyTorch rows: eager (teacher online or cached), ``torch.compile`` of the step and of a
functional step, ``torch.func`` ensembles for sweeps, CUDA graphs on a GPU; each checked
against ``nn.Module`` + ``torch.optim.Adam``."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from kdjax import sweep
from parity import reference as ref
from benchmarks.presets import (Impl, Inputs, Preset, SWEEP_ALPHA, SWEEP_T, sync_torch)


class TorchEager(Impl):
    """The reference's distillation step: teacher forward (eval) unless ``cached``, student
    forward, loss, backward, ``Adam.step()``. ``cached``: the teacher's logits computed
    once up front (what kdjax's fused run does), Adam with ``fused=True`` where the
    installed torch supports it. ``channels_last``: model and images in PyTorch's
    channels-last memory format (NHWC), the layout oneDNN's convolutions are fastest in on
    CPU (the same numbers up to rounding)."""

    name = "torch_eager"

    def __init__(self, p: Preset, inp: Inputs, compiled: bool = False, cached: bool = False,
                 use_compile: bool = True, channels_last: bool = False):
        self.p, self.inp, self.compiled, self.cached = p, inp, compiled and use_compile, cached
        self.channels_last = channels_last
        self.name = ("torch_compile" if compiled else "torch_eager_cached" if cached else "torch_eager") + (
            "_channels_last" if channels_last else "")

    def setup(self):
        inp, dev = self.inp, self.inp.tdev
        self.student = self.p.torch_models()[1].to(dev)
        self.student.load_state_dict(inp.t_student.state_dict())
        self.student.train()
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.channels_last:
            if not self.p.image:
                raise ValueError(f"{self.name}: channels-last is a layout of images; preset {self.p.name} has none")
            self.student.to(memory_format=layout)
            teacher = copy.deepcopy(inp.t_teacher).to(memory_format=layout)
        else:
            teacher = inp.t_teacher
        try:
            self.opt = torch.optim.Adam(self.student.parameters(), lr=1e-3, fused=self.cached or None)
        except (RuntimeError, TypeError):  # no fused Adam for this device/torch
            self.opt = torch.optim.Adam(self.student.parameters(), lr=1e-3)
        x, y = torch.from_numpy(inp.x_torch).to(dev), torch.from_numpy(inp.y).long().to(dev)
        t_all = inp.teacher_logits_torch() if self.cached else None
        idx = torch.from_numpy(inp.schedule.copy()).long().to(dev)
        self.batches = [(x[i].contiguous(memory_format=layout), y[i], None if t_all is None else t_all[i])
                        for i in idx]
        student, opt = self.student, self.opt
        if self.channels_last:  # the same model: eval-mode logits equal the standard layout's
            self._check_layout(self.batches[0][0])

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

    def _check_layout(self, xb, tol: float = 1e-4):
        with torch.no_grad():
            want = copy.deepcopy(self.inp.t_student).eval()(xb.contiguous())
            got = self.student.eval()(xb)
        self.student.train()
        err = float((got - want).abs().max() / want.abs().max())
        if err > tol:
            raise RuntimeError(f"{self.name}: logits differ from the standard layout's by {err:.1e} (relative)")

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
