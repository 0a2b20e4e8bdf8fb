"""The ``llama`` preset: one token-level distillation step of Llama-family language models.

Teacher: Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 query / 2 key-value heads, SwiGLU
4864, vocab 151936, tied head; random weights: no download). Student: the same family at 4
layers, hidden 512, 8 / 2 heads, SwiGLU 2048, same vocabulary. Every step runs the teacher
(eval) and the student (train) on ``batch x length`` random tokens; the loss is
``alpha T^2 KL + (1 - alpha) CE`` over every position (T = 2, alpha = 0.5), then one Adam
step (lr 1e-3; torch: ``AdamW(weight_decay=0, fused=True)``, the same update). On a CPU
the tokens per step are few (2 x 64); on a GPU 8 x 1024.

Rows (same process, same weights, same batches, interleaved repetitions, medians):

* ``torch_eager``: ``transformers``' ``Qwen2ForCausalLM`` (SDPA attention), the loss on the
  logits; ``torch_compile``: ``torch.compile`` of that whole step;
* ``kdjax_step`` / ``kdjax_fused``: ``kdjax.models.Llama`` with ``kdjax.fused.FusedLM`` (no
  ``[tokens, vocab]`` array; teacher through its hidden states and head), a Python loop
  over the jitted step / one ``lax.scan``;
* ``tunix``: google-tunix's ``DistillationTrainer`` + ``LogitStrategy`` on its own ``Qwen2``,
  the same weights, in its own venv: a worker process driven one repetition at a time, so its
  repetitions interleave with the other rows' (``benchmarks/tunix_row.py``); reported skipped
  with its reason where that venv is missing.

Before timing, every row's first two losses must equal ``kdjax_step``'s to a relative 1e-4.
The JSON also has each JAX row's compiled temporary memory and its peak (``peak_bytes``: XLA's
arguments + outputs - donated + temporaries of kdjax's one program; for tunix the larger of its two
programs' peaks, each with what stays live beside it). FLOPs: matmuls only.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import kdjax
from benchmarks.gpt2 import KdjaxFused, KdjaxStep
from benchmarks.presets import Impl, sync_torch, time_checked_rows
from kdjax.fused import FusedLM
from kdjax.models import Llama
from parity import reference as ref

TEMPERATURE, ALPHA = 2.0, 0.5


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    teacher: tuple = (24, 896, 14, 2, 4864)  # layers, hidden, heads, kv heads, intermediate
    student: tuple = (4, 512, 8, 2, 2048)
    vocab: int = 151936
    batch: int = 2
    length: int = 64
    steps: int = 2

    def forward_flops(self, cfg) -> float:
        layers, d, h, kv, inter = cfg
        hd = d // h
        per_token = layers * (2 * d * (h + 2 * kv) * hd + 2 * h * hd * d + 3 * 2 * d * inter
                              + 4 * self.length * h * hd) + 2 * d * self.vocab
        return float(per_token * self.batch * self.length)

    def flops(self) -> float:
        return 3 * self.forward_flops(self.student) + self.forward_flops(self.teacher)

    @property
    def tokens(self) -> int:
        return self.batch * self.length


SHAPES = {"cpu": LlamaShape(), "gpu": LlamaShape(batch=8, length=1024, steps=10)}


def hf_qwen2(cfg, s: LlamaShape):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    layers, d, h, kv, inter = cfg
    config = Qwen2Config(vocab_size=s.vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=h, num_key_value_heads=kv, max_position_embeddings=max(2048, s.length),
                         tie_word_embeddings=True, initializer_range=0.1)
    return Qwen2ForCausalLM(config), config


class Inputs:
    def __init__(self, s: LlamaShape, torch_device: str):
        rng = np.random.default_rng(0)
        n = s.batch * s.steps
        tokens = rng.integers(0, s.vocab, (n, s.length + 1)).astype(np.int32)
        self.x, self.y = tokens[:, :-1], tokens[:, 1:]
        self.schedule = np.arange(n, dtype=np.int32).reshape(s.steps, s.batch)
        self.tdev = torch.device(torch_device)
        torch.manual_seed(0)
        (self.t_teacher, tcfg), (self.t_student, scfg) = (hf_qwen2(c, s) for c in (s.teacher, s.student))
        self.t_teacher.to(self.tdev).eval()
        self.teacher, self.student = (Llama.from_hf_config(c) for c in (tcfg, scfg))
        example = jax.ShapeDtypeStruct((1, s.length), jnp.int32)
        self.variables = []
        for module, model in ((self.t_teacher, self.teacher), (self.t_student, self.student)):
            like = jax.eval_shape(model.init, jax.random.PRNGKey(0), example)
            sd = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            self.variables.append(jax.device_put(kdjax.convert.torch_to_variables(sd, like, tied=model.tied_weights)))

    def teacher_params(self):
        return self.variables[0]["params"]

    def student_state(self):
        return kdjax.state_from_params(jax.tree_util.tree_map(jnp.array, self.variables[1]["params"]))


class TorchRow(Impl):
    def __init__(self, s: LlamaShape, inp: Inputs, compiled: bool, use_compile: bool = True):
        self.s, self.inp, self.compiled = s, inp, compiled and use_compile
        self.name = "torch_compile" if compiled else "torch_eager"

    def setup(self):
        inp, dev, s = self.inp, self.inp.tdev, self.s
        self.student = hf_qwen2(s.student, s)[0].to(dev)
        self.student.load_state_dict(inp.t_student.state_dict())
        self.student.train()
        try:
            opt = torch.optim.AdamW(self.student.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(self.student.parameters(), lr=1e-3, weight_decay=0.0)
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
        losses = [float(self.step(*b)) for b in self.batches[:2]]
        sync_torch(dev)
        return (time.perf_counter() - t0 if self.compiled else None), losses

    def run(self):
        t0 = time.perf_counter()
        for b in self.batches:
            self.step(*b)
        sync_torch(self.inp.tdev)
        return time.perf_counter() - t0, len(self.batches)


IMPLS = ("torch_eager", "torch_compile", "kdjax_step", "kdjax_fused", "tunix")


def bench_llama(s: LlamaShape, *, repeats: int = 3, torch_device: str = "cpu", peak_gflops: float | None = None,
                which=IMPLS, eager_torch: bool = False, chunk: int = 256, on_progress=lambda msg: None) -> dict:
    """Time the rows in ``which``; raises if a row's first two losses differ from kdjax_step's."""
    if s.steps < 2:
        raise ValueError(f"llama preset: expected at least 2 steps per repetition (the loss check), got {s.steps}")
    torch.compiler.reset()
    on_progress("llama: building the models")
    inp = Inputs(s, torch_device)
    fused = FusedLM(chunk_size=chunk)
    table = {"torch_eager": lambda: TorchRow(s, inp, compiled=False),
             "torch_compile": lambda: TorchRow(s, inp, compiled=True, use_compile=not eager_torch),
             "kdjax_step": lambda: KdjaxStep(s, inp, fused), "kdjax_fused": lambda: KdjaxFused(s, inp, fused)}
    rows = [table[n]() for n in IMPLS if n in which and n in table]
    if not any(r.name == "kdjax_step" for r in rows):
        rows.insert(0, KdjaxStep(s, inp, fused))
    peers = []
    if "tunix" in which:  # the JAX-native peer, in its own venv (skipped with its reason where absent)
        from benchmarks.tunix_row import TunixRow

        peers.append(TunixRow(s, inp, temperature=TEMPERATURE, alpha=ALPHA))
    results, med, best, speedup = time_checked_rows("llama", rows, which, repeats, on_progress, peers=peers)
    if "tunix" in med:
        for n, m in med.items():
            if n.startswith("kdjax"):
                results[n]["speedup_vs_tunix"] = med["tunix"] / m
    flops = s.flops()
    for name, r in results.items():
        if "ms_per_step" not in r:
            continue
        r.update(tokens_per_s=s.tokens / med[name], gflops=flops / med[name] / 1e9,
                 frac_peak=flops / med[name] / 1e9 / peak_gflops if peak_gflops else None)
    return {"shape": dataclasses.asdict(s), "flops_per_step": flops, "tokens_per_step": s.tokens, "results": results,
            "best_torch": best, "speedup_vs_best_torch": speedup}
