"""The ``gpt2`` preset: one token-level distillation step of GPT-2-shaped language models.

Teacher: GPT-2 small (12 layers, d_model 768, 12 heads, vocab 50257: 124M parameters).
Student: DistilGPT2's shape (6 layers, same width and vocab: 82M). Every step runs the
teacher (eval) and the student (train) on ``batch x length`` random tokens, the loss is
``alpha T^2 KL(teacher || student) + (1 - alpha) CE`` averaged over every position
(T = 2, alpha = 0.5), then one Adam step (lr 1e-3). No dropout on either side (GPT-2
trains with 0.1; it is off so that both sides compute the same numbers, and checked).
The sequence length is reduced on a CPU (4 x 128 tokens per step); on a GPU the shape is
GPT-2's own (8 x 1024).

Rows (same process, same weights, same batches, interleaved repetitions, medians):

* ``torch_eager``: ``transformers``' ``GPT2LMHeadModel`` (its default SDPA attention),
  ``torch.optim.Adam(fused=True)``: what a PyTorch user writes first;
* ``torch_compile``: ``torch.compile`` of that whole step (forward, loss, backward,
  Adam): what a PyTorch user who wants speed writes;
* ``kdjax_step``: a Python loop over ``kdjax.make_train_step(student, "kd", teacher=...)``
  with ``kdjax.TransformerLM``;
* ``kdjax_fused``: ``kdjax.make_run``: the same steps as one ``lax.scan``.

Before timing, every row's first two losses (the second after one Adam step) must equal
``kdjax_step``'s to a relative 1e-4, so a row that computed something else fails. FLOPs
count matmuls only: per token and layer ``2 * 12 d^2`` (attention and MLP projections)
plus ``4 * length * d`` (scores and their product with the values, the full square as
both sides compute it), and ``2 d vocab`` for the tied head; a training step is three
times the student's forward plus the teacher's forward.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import kdjax
from benchmarks.presets import Impl, sync_torch, time_checked_rows
from benchmarks.rows_kdjax import KdjaxStep as _LoopedStep
from parity import reference as ref

TEMPERATURE, ALPHA = 2.0, 0.5
INIT_STD = 0.1  # GPT-2's 0.02 leaves random models' logits near uniform: the KL term would be ~0


@dataclasses.dataclass(frozen=True)
class GPT2Shape:
    teacher_layers: int = 12
    student_layers: int = 6
    d_model: int = 768
    heads: int = 12
    vocab: int = 50257
    batch: int = 4
    length: int = 128
    steps: int = 2  # steps per timed repetition

    def forward_flops(self, layers: int) -> float:
        d, n = self.d_model, self.length
        per_token = layers * (2 * 12 * d * d + 4 * n * d) + 2 * d * self.vocab
        return float(per_token * self.batch * n)

    def flops(self) -> float:
        return 3 * self.forward_flops(self.student_layers) + self.forward_flops(self.teacher_layers)

    @property
    def tokens(self) -> int:
        return self.batch * self.length


SHAPES = {"cpu": GPT2Shape(), "gpu": GPT2Shape(batch=8, length=1024, steps=10)}


def hf_gpt2(layers: int, s: GPT2Shape):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=s.vocab, n_positions=max(1024, s.length), n_embd=s.d_model, n_layer=layers,
                        n_head=s.heads, initializer_range=INIT_STD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=min(50256, s.vocab - 1), eos_token_id=min(50256, s.vocab - 1))
    return GPT2LMHeadModel(config), config


class Inputs:
    """Random tokens, the Hugging Face models, and the same weights as kdjax variables."""

    def __init__(self, s: GPT2Shape, torch_device: str):
        rng = np.random.default_rng(0)
        n = s.batch * s.steps
        tokens = rng.integers(0, s.vocab, (n, s.length + 1)).astype(np.int32)
        self.x, self.y = tokens[:, :-1], tokens[:, 1:]
        self.schedule = np.arange(n, dtype=np.int32).reshape(s.steps, s.batch)
        self.tdev = torch.device(torch_device)
        torch.manual_seed(0)
        (self.t_teacher, tcfg), (self.t_student, scfg) = (hf_gpt2(k, s) for k in (s.teacher_layers,
                                                                                  s.student_layers))
        self.t_teacher.to(self.tdev).eval()
        self.teacher, self.student = (kdjax.TransformerLM.from_gpt2_config(c) for c in (tcfg, scfg))
        example = jnp.zeros((1, s.length), jnp.int32)
        self.variables = []
        for module, model in ((self.t_teacher, self.teacher), (self.t_student, self.student)):
            like = jax.eval_shape(model.init, jax.random.PRNGKey(0), example)
            sd = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            self.variables.append(jax.device_put(kdjax.convert.torch_to_variables(sd, like,
                                                                                  tied=model.tied_weights)))

    def teacher_params(self):
        return self.variables[0]["params"]

    def student_state(self):
        return kdjax.state_from_params(jax.tree_util.tree_map(jnp.array, self.variables[1]["params"]))


class TorchRow(Impl):
    def __init__(self, s: GPT2Shape, inp: Inputs, compiled: bool, use_compile: bool = True):
        self.s, self.inp, self.compiled = s, inp, compiled and use_compile
        self.name = "torch_compile" if compiled else "torch_eager"

    def setup(self):
        inp, dev, s = self.inp, self.inp.tdev, self.s
        self.student = hf_gpt2(s.student_layers, s)[0].to(dev)
        self.student.load_state_dict(inp.t_student.state_dict())
        self.student.train()
        try:
            opt = torch.optim.Adam(self.student.parameters(), lr=1e-3, fused=True)
        except (RuntimeError, TypeError):  # no fused Adam for this device/torch
            opt = torch.optim.Adam(self.student.parameters(), lr=1e-3)
        x, y = (torch.from_numpy(a).long().to(dev) for a in (inp.x, inp.y))
        self.batches = [(x[i], y[i]) for i in torch.from_numpy(inp.schedule).long()]
        teacher, student, v = inp.t_teacher, self.student, s.vocab

        def step(xb, yb):
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                t_logits = teacher(xb).logits
            logits = student(xb).logits
            loss = ref.distillation_loss(logits.reshape(-1, v), t_logits.reshape(-1, v), yb.reshape(-1),
                                         TEMPERATURE, ALPHA)
            loss.backward()
            opt.step()
            return loss.detach()

        self.step = torch.compile(step, dynamic=False) if self.compiled else step
        t0 = time.perf_counter()
        losses = [float(self.step(*b)) for b in self.batches[:2]]  # warm-up (and compilation)
        sync_torch(dev)
        return (time.perf_counter() - t0 if self.compiled else None), losses

    def run(self):
        t0 = time.perf_counter()
        for b in self.batches:
            self.step(*b)
        sync_torch(self.inp.tdev)
        return time.perf_counter() - t0, len(self.batches)


def program_bytes(compiled) -> tuple[int, int]:
    """``(temporaries, peak)`` of a compiled program, from XLA's ``memory_analysis()``; the peak is
    arguments + outputs - aliased (donated) + temporaries: everything live while it runs."""
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes), int(m.argument_size_in_bytes + m.output_size_in_bytes
                                          - m.alias_size_in_bytes + m.temp_size_in_bytes)


class KdjaxStep(_LoopedStep):
    """The MLP presets' looped row (its ``run``), set up for the language models: the jitted
    step with ``objective`` ("kd" on logits, or ``kdjax.fused.FusedLM``), teacher online."""

    def __init__(self, s, inp, objective="kd"):
        super().__init__(s, inp)
        self.objective = objective

    def setup(self):
        inp = self.inp
        step = kdjax.make_train_step(inp.student, self.objective, teacher=inp.teacher)
        self.state, self.tparams = inp.student_state(), inp.teacher_params()
        x, y = jnp.asarray(inp.x), jnp.asarray(inp.y)
        self.batches = [{"x": x[i], "y": y[i]} for i in inp.schedule]
        self.rng, self.hyper = jax.random.PRNGKey(0), kdjax.make_hyper(TEMPERATURE, ALPHA)
        t0 = time.perf_counter()
        self.fn = step.lower(self.state, self.batches[0], self.rng, self.hyper, self.tparams).compile()
        compile_s = time.perf_counter() - t0
        self.temp_bytes, self.peak_bytes = program_bytes(self.fn)
        losses = []
        for b in self.batches[:2]:
            self.state, m = self.fn(self.state, b, self.rng, self.hyper, self.tparams)
            losses.append(float(m["loss"]))
        return compile_s, losses


class KdjaxFused(Impl):
    """The same steps as one ``lax.scan`` (``kdjax.make_run``)."""

    name = "kdjax_fused"

    def __init__(self, s, inp, objective="kd"):
        super().__init__(s, inp)
        self.objective = objective

    def setup(self):
        inp = self.inp
        self.state, self.tparams = inp.student_state(), inp.teacher_params()
        self.data = {"x": jnp.asarray(inp.x), "y": jnp.asarray(inp.y)}
        self.schedule = jnp.asarray(inp.schedule)
        self.rng, self.hyper = jax.random.PRNGKey(0), kdjax.make_hyper(TEMPERATURE, ALPHA)
        run = kdjax.make_run(inp.student, self.objective, teacher=inp.teacher)
        t0 = time.perf_counter()
        self.fn = run.lower(self.state, self.data, self.schedule, self.rng, self.hyper, self.tparams).compile()
        compile_s = time.perf_counter() - t0
        self.temp_bytes, self.peak_bytes = program_bytes(self.fn)
        self.state, m = self.fn(self.state, self.data, self.schedule, self.rng, self.hyper, self.tparams)
        return compile_s, [float(v) for v in m["loss"][:2]]

    def run(self):
        t0 = time.perf_counter()
        self.state, m = self.fn(self.state, self.data, self.schedule, self.rng, self.hyper, self.tparams)
        jax.block_until_ready((self.state, m))
        return time.perf_counter() - t0, self.schedule.shape[0]


IMPLS = ("torch_eager", "torch_compile", "kdjax_step", "kdjax_fused")


def bench_gpt2(s: GPT2Shape, *, repeats: int = 3, torch_device: str = "cpu", peak_gflops: float | None = None,
               which=IMPLS, eager_torch: bool = False, on_progress=lambda msg: None) -> dict:
    """Time the rows in ``which``; raises if a row's first two losses differ from kdjax_step's."""
    if s.steps < 2:
        raise ValueError(f"gpt2 preset: expected at least 2 steps per repetition (the loss check), got {s.steps}")
    torch.compiler.reset()
    on_progress("gpt2: building the models")
    inp = Inputs(s, torch_device)
    table = {"torch_eager": lambda: TorchRow(s, inp, compiled=False),
             "torch_compile": lambda: TorchRow(s, inp, compiled=True, use_compile=not eager_torch),
             "kdjax_step": lambda: KdjaxStep(s, inp), "kdjax_fused": lambda: KdjaxFused(s, inp)}
    rows = [table[name]() for name in IMPLS if name in which]
    if not any(r.name == "kdjax_step" for r in rows):
        rows.insert(0, KdjaxStep(s, inp))  # the loss check's reference, set up but not timed
    results, med, best, speedup = time_checked_rows("gpt2", rows, which, repeats, on_progress)
    flops = s.flops()
    for name, r in results.items():
        r.update(tokens_per_s=s.tokens / med[name], gflops=flops / med[name] / 1e9,
                 frac_peak=flops / med[name] / 1e9 / peak_gflops if peak_gflops else None)
    return {"shape": dataclasses.asdict(s), "flops_per_step": flops, "tokens_per_step": s.tokens,
            "results": results, "best_torch": best, "speedup_vs_best_torch": speedup}
