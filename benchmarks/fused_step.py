"""``python -m benchmarks.fused_step``: the language-model train step with the fused
vocabulary loss (``kdjax.fused.FusedLM``: hidden states + head, in chunks) against the same
step on logits (``"kd"``), teacher online, at several vocabulary sizes: XLA's compiled
temporary memory (``memory_analysis()``, what the step allocates besides its inputs and
outputs) and the median step time.

The models are ``kdjax.models.Llama`` with a small body and a large head (a Qwen-sized
vocabulary on a few layers, where the ``[tokens, vocab]`` arrays dominate): teacher
hidden 256 (2 layers), student hidden 128 (1 layer), tied heads, Adam.

    python -m benchmarks.fused_step [--vocab 32768 131072 151936] [--tokens 4 256] [--chunk 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def measure(vocab: int, batch: int, length: int, chunk: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kdjax
    from kdjax.fused import FusedLM
    from kdjax.models import Llama

    teacher = Llama(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                    num_kv_heads=2, tie_word_embeddings=True)
    student = Llama(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=2,
                    num_kv_heads=1, tie_word_embeddings=True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, length + 1)), jnp.int32)
    batch_ = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
    t_state = kdjax.create_train_state(teacher, 0, batch_["x"][:1])
    hyper = kdjax.make_hyper(2.0, 0.5)
    out = {}
    for name, objective in (("logits", "kd"), ("fused", FusedLM(chunk_size=chunk))):
        state = kdjax.create_train_state(student, 1, batch_["x"][:1])
        step = kdjax.make_train_step(student, objective, teacher=teacher)
        compiled = step.lower(state, batch_, jax.random.PRNGKey(0), hyper, t_state).compile()
        mem = compiled.memory_analysis()
        state, m = compiled(state, batch_, jax.random.PRNGKey(0), hyper, t_state)  # warm-up
        jax.block_until_ready(state)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            state, m = compiled(state, batch_, jax.random.PRNGKey(0), hyper, t_state)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        out[name] = {"temp_bytes": int(mem.temp_size_in_bytes), "ms": 1e3 * statistics.median(times),
                     "first_loss": float(m["loss"])}
    out["temp_ratio"] = out["logits"]["temp_bytes"] / out["fused"]["temp_bytes"]
    out["time_ratio"] = out["fused"]["ms"] / out["logits"]["ms"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fused_step", description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072, 151936])
    ap.add_argument("--tokens", type=int, nargs=2, default=[4, 256], metavar=("BATCH", "LENGTH"))
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    from kdjax.app import xla

    xla.apply()
    rows = {v: measure(v, *args.tokens, args.chunk, args.repeats) for v in args.vocab}
    print(f"{'vocab':>8} {'logits temp MB':>15} {'fused temp MB':>14} {'less memory':>12} {'logits ms':>10} "
          f"{'fused ms':>9} {'time ratio':>11}")
    for v, r in rows.items():
        print(f"{v:>8} {r['logits']['temp_bytes'] / 2**20:>15.0f} {r['fused']['temp_bytes'] / 2**20:>14.0f} "
              f"{r['temp_ratio']:>11.1f}x {r['logits']['ms']:>10.0f} {r['fused']['ms']:>9.0f} {r['time_ratio']:>10.2f}x")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({str(k): v for k, v in rows.items()}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
