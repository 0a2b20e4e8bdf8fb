"""The ``on_policy`` preset: one on-policy distillation step of Llama-family language models —
the student samples completions of a batch of prompts, the teacher scores them, the
student takes one Adam step on TRL's generalized JSD (GKD with lmbda 1: always on-policy).

* ``torch_eager``: ``transformers``' ``Qwen2ForCausalLM`` for both, the student's
  ``generate(do_sample=True)`` (its default dynamic cache), the teacher's forward under
  ``no_grad``, the JSD over the completion tokens (``parity/onpolicy_reference.py``, TRL's
  formula), backward and ``AdamW(weight_decay=0, fused=True)``. No ``torch.compile`` row:
  compiling ``generate`` needs a static cache and per-shape recompiles, which is not what
  TRL's ``GKDTrainer`` does.
* ``kdjax_step``: ``kdjax.onpolicy.make_on_policy_step`` (sampling with a key/value cache,
  the teacher, the loss and the update in one jitted, donated step).

Same weights (through ``save_pretrained`` / ``kdjax.convert.load_hf``). Before timing, the
loss of one step on fixed completions (lmbda 0, so no sampling) must agree to a relative
1e-4 between the two: the scoring and the loss are the same computation. Sampled tokens
differ between frameworks (different random streams), so the timed steps do the same
amount of work, not the same draws. Medians of interleaved repetitions.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class OnPolicyShape:
    teacher: tuple = (4, 256, 8, 2, 1024)  # layers, hidden, heads, kv heads, intermediate
    student: tuple = (2, 128, 4, 2, 512)
    vocab: int = 32768
    batch: int = 8
    prompt: int = 32
    new: int = 32


SHAPES = {"cpu": OnPolicyShape(), "gpu": OnPolicyShape(teacher=(24, 896, 14, 2, 4864), student=(4, 512, 8, 2, 2048),
                                                       vocab=151936, batch=32, prompt=256, new=256)}
BETA, SAMPLING_TEMPERATURE = 0.5, 0.9


def _config(transformers, cfg, s: OnPolicyShape):
    layers, d, h, kv, inter = cfg
    return transformers.Qwen2Config(vocab_size=s.vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                                    num_attention_heads=h, num_key_value_heads=kv, tie_word_embeddings=True,
                                    max_position_embeddings=s.prompt + s.new, initializer_range=0.05)


def bench_on_policy(s: OnPolicyShape, repeats: int = 3, torch_device: str = "cpu", on_progress=lambda m: None) -> dict:
    import transformers

    import kdjax
    from kdjax import convert, onpolicy
    from parity import onpolicy_reference as ref

    torch.manual_seed(0)
    models = {}
    for who, cfg in (("teacher", s.teacher), ("student", s.student)):
        hf = transformers.AutoModelForCausalLM.from_config(_config(transformers, cfg, s)).to(torch_device)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            models[who] = (hf, *convert.load_hf(d))
    (t_hf, teacher, t_vars), (s_hf, student, s_vars) = models["teacher"], models["student"]
    t_hf.eval()
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, s.vocab, (s.batch, s.prompt))
    completions = rng.integers(1, s.vocab, (s.batch, s.new))
    optimizer = torch.optim.AdamW(s_hf.parameters(), lr=1e-3, weight_decay=0.0, fused=True)

    def torch_loss(sequences):
        logits = s_hf(input_ids=sequences).logits[:, s.prompt - 1:-1]
        with torch.no_grad():
            t_logits = t_hf(input_ids=sequences).logits[:, s.prompt - 1:-1]
        return ref.generalized_jsd(logits, t_logits, sequences[:, s.prompt:], BETA)

    def torch_step(sample: bool):
        p = torch.from_numpy(prompts).to(torch_device)
        if sample:
            s_hf.eval()
            with torch.no_grad():
                sequences = s_hf.generate(input_ids=p, attention_mask=torch.ones_like(p), do_sample=True, top_k=0,
                                          temperature=SAMPLING_TEMPERATURE, max_new_tokens=s.new,
                                          min_new_tokens=s.new, pad_token_id=0)
            s_hf.train()
        else:
            sequences = torch.cat([p, torch.from_numpy(completions).to(torch_device)], dim=1)
        optimizer.zero_grad(set_to_none=True)
        loss = torch_loss(sequences)
        loss.backward()
        optimizer.step()
        if torch_device != "cpu":
            torch.cuda.synchronize()
        return float(loss)

    batch = {"prompts": jnp.asarray(prompts, jnp.int32), "prompt_mask": jnp.ones((s.batch, s.prompt), bool),
             "completions": jnp.asarray(completions, jnp.int32), "completion_mask": jnp.ones((s.batch, s.new), bool)}
    t_state = kdjax.state_from_params(t_vars["params"])
    on_progress("on_policy: checking the loss on fixed completions")
    check = onpolicy.make_on_policy_step(student, teacher, "gkd", lmbda=0.0, beta=BETA, max_new_tokens=s.new,
                                         donate=False)
    _, m = check(kdjax.state_from_params(s_vars["params"], tx=kdjax.adam()), batch, jax.random.PRNGKey(0), t_state)
    want = torch_step(sample=False)
    got = float(m["loss"])
    if abs(got - want) > 1e-4 * abs(want):
        raise RuntimeError(f"on_policy: kdjax's loss {got} differs from the PyTorch step's {want}")
    step = onpolicy.make_on_policy_step(student, teacher, "gkd", lmbda=1.0, beta=BETA, max_new_tokens=s.new,
                                        temperature=SAMPLING_TEMPERATURE)
    state = kdjax.state_from_params(s_vars["params"], tx=kdjax.adam())
    on_progress("on_policy: compiling kdjax's step")
    t0 = time.perf_counter()
    state, _ = step(state, batch, jax.random.PRNGKey(1), t_state)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    torch_step(sample=True)  # warm-up
    times = {"torch_eager": [], "kdjax_step": []}
    for r in range(repeats):
        on_progress(f"on_policy: repetition {r + 1}/{repeats}")
        t0 = time.perf_counter()
        torch_step(sample=True)
        times["torch_eager"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        state, m = step(state, batch, jax.random.PRNGKey(1), t_state)
        jax.block_until_ready(state)
        times["kdjax_step"].append(time.perf_counter() - t0)
    results = {k: {"ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v),
                   "completion_tokens_per_s": s.batch * s.new / statistics.median(v)} for k, v in times.items()}
    results["kdjax_step"]["compile_s"] = compile_s
    return {"shape": dataclasses.asdict(s), "loss_check": {"kdjax": got, "torch": want}, "results": results,
            "best_torch": "torch_eager",
            "speedup_vs_best_torch": {"kdjax_step": results["torch_eager"]["ms"] / results["kdjax_step"]["ms"]}}
