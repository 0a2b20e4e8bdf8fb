"""``python -m benchmarks.topk_cache``: a language-model train step that reads the teacher's
cached top-k log-probabilities (``kdjax.offline.TopKKD`` on the student's logits, and
``kdjax.fused.FusedLM`` on its hidden states) against the same step with the teacher run
online (``"kd"`` on logits, and ``FusedLM``): XLA's compiled
temporary memory and argument memory (``memory_analysis()``: the teacher's parameters are
arguments of the online steps only), the median step time, and what the cache costs on
disk per token against dense float32 logits.

The models are ``kdjax.models.Llama``: a teacher of 4 layers, hidden 512, and a student
of 1 layer, hidden 128, tied heads over a 32K vocabulary, Adam, 4 x 256 tokens per step.

    python -m benchmarks.topk_cache [--vocab 32768] [--tokens 4 256] [--k 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def measure(vocab: int, batch: int, length: int, k: int, repeats: int, teacher_layers: int = 4,
            teacher_hidden: int = 512) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kdjax
    from kdjax import offline
    from kdjax.fused import FusedLM
    from kdjax.models import Llama

    teacher = Llama(vocab_size=vocab, hidden_size=teacher_hidden, intermediate_size=2 * teacher_hidden,
                    num_layers=teacher_layers, num_heads=8, num_kv_heads=2, tie_word_embeddings=True)
    student = Llama(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=2,
                    num_kv_heads=1, tie_word_embeddings=True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, length + 1)), jnp.int32)
    plain = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
    t_state = kdjax.create_train_state(teacher, 0, plain["x"][:1])
    values, indices = jax.jit(lambda v, x: offline.topk_logprobs(teacher.apply(v, x), k))(t_state.variables,
                                                                                          plain["x"])
    cached = plain | {"teacher_topk_values": values, "teacher_topk_indices": indices}
    hyper = kdjax.make_hyper(2.0, 0.5)
    rows = {"online_logits": ("kd", plain, teacher, (t_state,)),
            "online_fused": (FusedLM(chunk_size=256), plain, teacher, (t_state,)),
            f"topk_cache_k{k}": (offline.TopKKD(), cached, None, ()),
            f"topk_cache_fused_k{k}": (FusedLM(chunk_size=256), cached, None, ())}
    out, first, states, steps = {}, {}, {}, {}
    for name, (objective, batch_, t, extra) in rows.items():
        state = kdjax.create_train_state(student, 1, plain["x"][:1])
        step = kdjax.make_train_step(student, objective, teacher=t)
        steps[name] = compiled = step.lower(state, batch_, jax.random.PRNGKey(0), hyper, *extra).compile()
        mem = compiled.memory_analysis()
        states[name], m = compiled(state, batch_, jax.random.PRNGKey(0), hyper, *extra)  # warm-up
        jax.block_until_ready(states[name])
        first[name] = float(m["loss"])
        out[name] = {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes)}
    times = {name: [] for name in rows}
    for _ in range(repeats):  # interleaved: the machine's drift hits every row alike
        for name, (_, batch_, _, extra) in rows.items():
            t0 = time.perf_counter()
            states[name], _ = steps[name](states[name], batch_, jax.random.PRNGKey(0), hyper, *extra)
            jax.block_until_ready(states[name])
            times[name].append(time.perf_counter() - t0)
    for name in rows:
        out[name] |= {"ms": 1e3 * statistics.median(times[name]), "first_loss": first[name]}
    online = out["online_logits"]
    for name in rows:
        out[name]["time_vs_online_logits"] = out[name]["ms"] / online["ms"]
    out["bytes_per_token"] = {"topk_float32": k * 8, "topk_float16": k * 6, "dense_float32_logits": 4 * vocab}
    out["teacher_parameters"] = int(sum(np.size(a) for a in jax.tree_util.tree_leaves(t_state.params)))
    out["first_loss_gap_topk_vs_dense"] = abs(first[f"topk_cache_k{k}"] - first["online_logits"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.topk_cache", description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tokens", type=int, nargs=2, default=[4, 256], metavar=("BATCH", "LENGTH"))
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--teacher", type=int, nargs=2, default=[4, 512], metavar=("LAYERS", "HIDDEN"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    from kdjax.app import xla

    xla.apply()
    r = measure(args.vocab, *args.tokens, args.k, args.repeats, *args.teacher)
    print(f"vocab {args.vocab}, {args.tokens[0]} x {args.tokens[1]} tokens per step, teacher "
          f"{r['teacher_parameters'] / 1e6:.1f}M parameters; medians of {args.repeats} interleaved steps")
    print(f"{'step':>20} {'temp MB':>9} {'arguments MB':>13} {'ms':>8} {'time vs online':>15}")
    for name, row in r.items():
        if isinstance(row, dict) and "ms" in row:
            print(f"{name:>20} {row['temp_bytes'] / 2**20:>9.1f} {row['argument_bytes'] / 2**20:>13.1f} "
                  f"{row['ms']:>8.1f} {row['time_vs_online_logits']:>14.2f}x")
    b = r["bytes_per_token"]
    print(f"cache: {b['topk_float32']} bytes per token (float32 values), {b['topk_float16']} (float16), against "
          f"{b['dense_float32_logits']} for dense float32 logits ({b['dense_float32_logits'] / b['topk_float32']:.0f}x)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
