"""The ``features`` preset: one feature-distillation step on CIFAR shapes.

Teacher and student are the ``cifar`` preset's ResNets (a CIFAR-stem ResNet-18 shape at half
width -> a four-block student; 32x32x3 images, batch 64). Every step runs the teacher
(eval) and the student (train) and minimises mdistiller's terms together: CE + KD (T 4,
weight 1) + 100 x FitNet's hint on ``layer3`` through a ``ConvReg`` connector (1x1 conv,
BatchNorm, ReLU; trained with the student) + 1000 x attention transfer on every stage;
SGD (lr 0.05, momentum 0.9, weight decay 5e-4), as mdistiller trains.

Rows (same process, same weights, same batches, interleaved repetitions, medians):

* ``torch_eager``: what torchdistill and mdistiller do: forward hooks on the teacher's and
  the student's stages collect the features, the loss, backward, ``SGD.step()``;
* ``torch_compile``: ``torch.compile`` of that whole step (hooks inside);
* ``torch_eager_channels_last``, ``torch_compile_channels_last``: the same with models and
  images in channels-last memory (NHWC; oneDNN's fast convolution layout on CPU);
* ``kdjax_step``: a Python loop over ``kdjax.make_train_step(student, objective, teacher=)``;
* ``kdjax_fused``: ``kdjax.make_run``: the same steps as one ``lax.scan``.

Before timing, every row's first two losses must equal ``kdjax_step``'s to a relative 1e-4.
"""

from __future__ import annotations

import copy
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

import kdjax
from benchmarks.presets import PRESETS, Impl, Inputs, sync_torch, time_checked_rows
from kdjax import features
from parity import feature_reference as fref

BATCH, STEPS, NUM = 64, 3, 512
T, KD_W, HINT_W, AT_W = 4.0, 1.0, 100.0, 1000.0
HINT_LAYER = "layer3"
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
IMPLS = ("torch_eager", "torch_compile", "torch_eager_channels_last", "torch_compile_channels_last", "kdjax_step",
         "kdjax_fused")


def preset(steps: int = STEPS):
    import dataclasses

    return dataclasses.replace(PRESETS["cifar"], name="features", batch=BATCH, num_samples=NUM, steps=steps)


def objective(stages: int):
    return features.objective(ce=1.0, kd=KD_W, temperature=T, terms=[
        ("hint", HINT_LAYER, HINT_LAYER, HINT_W), *[("at", f"layer{i}", f"layer{i}", AT_W) for i in range(1, stages + 1)]])


class _Shared:
    """The cifar preset's inputs plus a ConvReg connector in both frameworks (same weights)."""

    def __init__(self, steps: int, torch_device: str, p=None):
        self.p = p or preset(steps)
        self.inp = Inputs(self.p, torch_device)
        self.stages = len(self.p.teacher[0])
        s_ch, t_ch = self.p.student[1][2], self.p.teacher[1][2]
        torch.manual_seed(1)
        self.conv_reg = fref.ConvReg(s_ch, t_ch).to(self.inp.tdev)
        c = {k: v.detach().cpu().numpy() for k, v in self.conv_reg.state_dict().items()}
        self.connector = ({"conv": {"kernel": c["conv.weight"].transpose(2, 3, 1, 0), "bias": c["conv.bias"]},
                           "bn": {"scale": c["bn.weight"], "bias": c["bn.bias"]}},
                          {"batch_stats": {"bn": {"mean": c["bn.running_mean"], "var": c["bn.running_var"]}}})
        # the channels-last rows' teacher: a copy made before any row hooks the original
        self.teacher_cl = copy.deepcopy(self.inp.t_teacher).to(memory_format=torch.channels_last)
        self.obj = objective(self.stages)
        self.tx = kdjax.sgd(SGD["lr"], SGD["momentum"], SGD["weight_decay"])

    def state(self):
        params, model_state = self.inp.student_vars
        key = self.obj.terms[0].key
        params = {**params, "connectors": {key: self.connector[0]}}
        model_state = {**model_state, "connectors": {key: self.connector[1]}}
        return kdjax.state_from_params(jax.tree_util.tree_map(np.array, params),
                                       model_state=jax.tree_util.tree_map(np.array, model_state), tx=self.tx)


class TorchHooks(Impl):
    def __init__(self, sh: _Shared, compiled: bool, use_compile: bool = True, channels_last: bool = False):
        self.sh, self.compiled, self.channels_last = sh, compiled and use_compile, channels_last
        self.name = ("torch_compile" if compiled else "torch_eager") + ("_channels_last" if channels_last else "")

    def setup(self):
        sh, inp, dev = self.sh, self.sh.inp, self.sh.inp.tdev
        self.student = sh.p.torch_models()[1].to(dev)
        self.student.load_state_dict(inp.t_student.state_dict())
        conv_reg = fref.ConvReg(sh.p.student[1][2], sh.p.teacher[1][2]).to(dev)
        conv_reg.load_state_dict(sh.conv_reg.state_dict())
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        teacher = sh.teacher_cl if self.channels_last else inp.t_teacher
        self.student.to(memory_format=layout), conv_reg.to(memory_format=layout)
        self.student.train(), conv_reg.train()
        opt = torch.optim.SGD(list(self.student.parameters()) + list(conv_reg.parameters()), **SGD)
        feats = {"s": {}, "t": {}}
        layers = [f"layer{i}" for i in range(1, sh.stages + 1)]
        for who, model in (("s", self.student), ("t", teacher)):
            for name in layers:
                getattr(model, name).register_forward_hook(
                    lambda mod, args, out, who=who, name=name: feats[who].__setitem__(name, out))
        x, y = torch.from_numpy(inp.x_torch).to(dev), torch.from_numpy(inp.y).long().to(dev)
        self.batches = [(x[i].contiguous(memory_format=layout), y[i])
                        for i in torch.from_numpy(inp.schedule.copy()).long().to(dev)]
        student = self.student

        def step(xb, yb):
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                t_logits = teacher(xb)
            logits = student(xb)
            fs, ft = feats["s"], feats["t"]
            loss = (F.cross_entropy(logits, yb)
                    + KD_W * T * T * F.kl_div(F.log_softmax(logits / T, 1), F.softmax(t_logits / T, 1),
                                              reduction="batchmean")
                    + HINT_W * F.mse_loss(conv_reg(fs[HINT_LAYER]), ft[HINT_LAYER])
                    + AT_W * sum(fref.at(fs[k], ft[k]) for k in layers))
            loss.backward()
            opt.step()
            return loss.detach()

        self.step = torch.compile(step, dynamic=False) if self.compiled else step
        t0 = time.perf_counter()
        losses = [float(self.step(*b)) for b in self.batches[:2]]
        sync_torch(dev)
        return (time.perf_counter() - t0 if self.compiled else None), losses

    def run(self):
        t0 = time.perf_counter()
        for b in self.batches:
            self.step(*b)
        sync_torch(self.sh.inp.tdev)
        return time.perf_counter() - t0, len(self.batches)


class KdjaxStep(Impl):
    name = "kdjax_step"

    def __init__(self, sh: _Shared):
        self.sh = sh

    def setup(self):
        sh = self.sh
        teacher, student = sh.p.jax_models()
        step = kdjax.make_train_step(student, sh.obj, tx=sh.tx, teacher=teacher)
        self.state, self.tstate = sh.state(), sh.inp.teacher_state
        x, y = jnp.asarray(sh.inp.x), jnp.asarray(sh.inp.y)
        self.batches = [{"x": x[i], "y": y[i]} for i in sh.inp.schedule]
        self.rng = jax.random.PRNGKey(0)
        t0 = time.perf_counter()
        self.fn = step.lower(self.state, self.batches[0], self.rng, None, self.tstate).compile()
        compile_s = time.perf_counter() - t0
        losses = []
        for b in self.batches[:2]:
            self.state, m = self.fn(self.state, b, self.rng, None, self.tstate)
            losses.append(float(m["loss"]))
        return compile_s, losses

    def run(self):
        state, fn, rng, ts = self.state, self.fn, self.rng, self.tstate
        t0 = time.perf_counter()
        for b in self.batches:
            state, _ = fn(state, b, rng, None, ts)
        jax.block_until_ready(state)
        self.state = state
        return time.perf_counter() - t0, len(self.batches)


class KdjaxFused(Impl):
    name = "kdjax_fused"

    def __init__(self, sh: _Shared):
        self.sh = sh

    def setup(self):
        sh = self.sh
        teacher, student = sh.p.jax_models()
        self.state, self.tstate = sh.state(), sh.inp.teacher_state
        self.data = {"x": jnp.asarray(sh.inp.x), "y": jnp.asarray(sh.inp.y)}
        self.schedule, self.rng = jnp.asarray(sh.inp.schedule), jax.random.PRNGKey(0)
        run = kdjax.make_run(student, sh.obj, tx=sh.tx, teacher=teacher)
        t0 = time.perf_counter()
        self.fn = run.lower(self.state, self.data, self.schedule, self.rng, None, self.tstate).compile()
        compile_s = time.perf_counter() - t0
        self.state, m = self.fn(self.state, self.data, self.schedule, self.rng, None, self.tstate)
        return compile_s, [float(v) for v in m["loss"][:2]]

    def run(self):
        t0 = time.perf_counter()
        self.state, m = self.fn(self.state, self.data, self.schedule, self.rng, None, self.tstate)
        jax.block_until_ready((self.state, m))
        return time.perf_counter() - t0, self.schedule.shape[0]


def bench_features(*, steps: int = STEPS, repeats: int = 3, torch_device: str = "cpu", which=IMPLS,
                   eager_torch: bool = False, on_progress=lambda msg: None, p=None) -> dict:
    """Time the rows in ``which``; raises if a row's first two losses differ from kdjax_step's.
    ``p``: other shapes (a ``Preset`` with ResNets of at least three stages; tests)."""
    if steps < 2:
        raise ValueError(f"features preset: expected at least 2 steps per repetition (the loss check), got {steps}")
    torch.compiler.reset()
    on_progress("features: building the models")
    sh = _Shared(steps, torch_device, p)
    table = {"torch_eager": lambda: TorchHooks(sh, compiled=False),
             "torch_compile": lambda: TorchHooks(sh, compiled=True, use_compile=not eager_torch),
             "torch_eager_channels_last": lambda: TorchHooks(sh, compiled=False, channels_last=True),
             "torch_compile_channels_last": lambda: TorchHooks(sh, compiled=True, use_compile=not eager_torch,
                                                               channels_last=True),
             "kdjax_step": lambda: KdjaxStep(sh), "kdjax_fused": lambda: KdjaxFused(sh)}
    rows = [table[n]() for n in IMPLS if n in which]
    if not any(r.name == "kdjax_step" for r in rows):
        rows.insert(0, KdjaxStep(sh))
    results, _, best, speedup = time_checked_rows("features", rows, which, repeats, on_progress)
    p = sh.p
    return {"shape": {"teacher": p.teacher, "student": p.student, "batch": p.batch, "image": p.image,
                      "steps": steps, "objective": sh.obj.describe()},
            "results": results, "best_peer": best, "speedup_vs_best_peer": speedup}
