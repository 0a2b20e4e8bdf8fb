"""``python -m benchmarks.generation``: greedy generation tokens/s, ``kdjax.generate``
(prefill + key/value cache + a compiled ``lax.scan`` of decode steps) against
``transformers``' ``generate(do_sample=False)`` (its default dynamic cache, eager PyTorch)
on the same random-init Qwen2-family model (same weights through ``save_pretrained`` /
``kdjax.convert.load_hf``), left-padded prompts. The two outputs are checked equal token
for token before anything is timed; medians of interleaved repetitions.

    python -m benchmarks.generation [--batch 8] [--prompt 32] [--new 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def measure(batch: int, prompt: int, new: int, repeats: int, hidden: int = 256, layers: int = 4,
            vocab: int = 32768) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from kdjax import convert
    from kdjax.generation import generate

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                   max_position_embeddings=prompt + new, tie_word_embeddings=True,
                                   initializer_range=0.1)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, variables = convert.load_hf(d)
    rng = np.random.default_rng(0)
    lengths = rng.integers(prompt // 2, prompt + 1, batch)
    prompts = np.zeros((batch, prompt), np.int64)
    mask = np.arange(prompt)[None] >= (prompt - lengths)[:, None]
    prompts[mask] = rng.integers(1, vocab, int(mask.sum()))
    jp, jm = jnp.asarray(prompts, jnp.int32), jnp.asarray(mask)

    def run_kdjax():
        return np.asarray(jax.block_until_ready(generate(model, variables, jp, new, prompt_mask=jm)))

    def run_torch():
        with torch.no_grad():
            return hf.generate(input_ids=torch.from_numpy(prompts), attention_mask=torch.from_numpy(mask.astype(int)),
                               do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0).numpy()

    t0 = time.perf_counter()
    got = run_kdjax()
    compile_s = time.perf_counter() - t0
    want = run_torch()
    same = float((got == want).mean())
    times = {"kdjax_generate": [], "transformers_generate": []}
    for _ in range(repeats):
        for name, fn in (("kdjax_generate", run_kdjax), ("transformers_generate", run_torch)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    out = {name: {"s": statistics.median(t), "tokens_per_s": batch * new / statistics.median(t)}
           for name, t in times.items()}
    out["kdjax_generate"]["first_call_s"] = compile_s
    out["speedup"] = out["transformers_generate"]["s"] / out["kdjax_generate"]["s"]
    out["tokens_equal"] = same
    out["shape"] = {"batch": batch, "prompt": prompt, "new": new, "hidden": hidden, "layers": layers, "vocab": vocab}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--model", type=int, nargs=3, default=[256, 4, 32768], metavar=("HIDDEN", "LAYERS", "VOCAB"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    from kdjax.app import xla

    xla.apply()
    r = measure(args.batch, args.prompt, args.new, args.repeats, *args.model)
    s = r["shape"]
    print(f"Qwen2-family, hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}; {s['batch']} prompts of "
          f"<= {s['prompt']} tokens (left-padded) + {s['new']} new, greedy; medians of {args.repeats} interleaved runs")
    for name in ("kdjax_generate", "transformers_generate"):
        print(f"{name:>22}: {r[name]['s'] * 1e3:8.1f} ms  {r[name]['tokens_per_s']:8.0f} tokens/s")
    print(f"kdjax is {r['speedup']:.2f}x transformers' speed; first call (compile) {r['kdjax_generate']['first_call_s']:.1f} s;"
          f" tokens equal: {100 * r['tokens_equal']:.1f}%")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
