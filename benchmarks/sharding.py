"""``python -m benchmarks.sharding``: how large a Llama-family teacher -> student training
step fits a per-device memory budget with the parameters replicated (``--mesh data=8``)
and sharded (``--mesh fsdp=8``), and what sharding costs in step time.

For each teacher width the step (teacher online, ``"kd"`` on the logits, Adam) is
compiled for the mesh from abstract inputs (nothing is allocated) and XLA's
``memory_analysis()`` of the per-device program gives the bytes one device needs:
arguments + outputs - donated (aliased) + temporaries. The largest teacher under the
budget is reported for each mode. Then the smallest size is run for real on both meshes
(interleaved steps, medians) for the step-time cost.

On CPU the devices are forced (``--devices``, default 8: the flag is set before JAX
starts); on a GPU machine the real devices are used.

    python -m benchmarks.sharding [--budget-mb 512] [--hidden 256 512 768 1024 1536 2048]
        [--layers 4] [--vocab 32000] [--tokens 8 128] [--repeats 5] [--devices 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _models(hidden: int, layers: int, vocab: int):
    from kdjax.models import Llama

    def llama(h, n):
        heads = max(2, h // 64)
        return Llama(vocab_size=vocab, hidden_size=h, intermediate_size=(8 * h // 3 + 63) // 64 * 64,
                     num_layers=n, num_heads=heads, num_kv_heads=max(1, heads // 4), tie_word_embeddings=False)

    return llama(hidden, layers), llama(max(64, hidden // 2), max(1, layers // 2))


def _abstract(tree, shardings):
    import jax

    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_step(hidden, layers, vocab, batch, length, mesh):
    """The compiled step for this mesh and its per-device memory (bytes) and parameter count."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kdjax
    from kdjax import parallel

    teacher, student = _models(hidden, layers, vocab)
    example = jax.ShapeDtypeStruct((1, length), jnp.int32)
    shapes = {name: jax.eval_shape(lambda m=m: kdjax.create_train_state(m, 0, example))
              for name, m in (("teacher", teacher), ("student", student))}
    state = _abstract(shapes["student"], parallel.model_shardings(shapes["student"], mesh))
    t_state = _abstract(shapes["teacher"], parallel.model_shardings(shapes["teacher"], mesh))
    rows = parallel.data_sharding(mesh)
    batch_ = {k: jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows) for k in ("x", "y")}
    rep = parallel.replicated(mesh)
    hyper = _abstract(kdjax.make_hyper(2.0, 0.5), jax.tree_util.tree_map(lambda _: rep, kdjax.make_hyper(2.0, 0.5)))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
    step = kdjax.make_train_step(student, "kd", teacher=teacher, mesh=mesh)
    t0 = time.perf_counter()
    compiled = step.jitted.lower(state, batch_, key, hyper, t_state).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    per_device = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                  + m.temp_size_in_bytes)
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree.params)))
    return {"per_device_bytes": int(per_device), "argument_bytes": int(m.argument_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes), "compile_s": seconds,
            "teacher_parameters": count(shapes["teacher"]), "student_parameters": count(shapes["student"])}


def time_steps(hidden, layers, vocab, batch, length, meshes: dict, repeats: int) -> dict:
    """Median ms of real steps on each mesh, interleaved."""
    import jax
    import numpy as np

    import kdjax

    teacher, student = _models(hidden, layers, vocab)
    tokens = np.random.default_rng(0).integers(0, vocab, (batch, length + 1)).astype(np.int32)
    batch_ = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
    hyper, key = kdjax.make_hyper(2.0, 0.5), jax.random.PRNGKey(0)
    runs, times = {}, {name: [] for name in meshes}
    for name, mesh in meshes.items():
        step = kdjax.make_train_step(student, "kd", teacher=teacher, mesh=mesh)
        state = kdjax.create_train_state(student, 1, batch_["x"][:1], mesh=mesh)
        t_state = kdjax.create_train_state(teacher, 0, batch_["x"][:1], mesh=mesh)
        state, _ = step(state, batch_, key, hyper, t_state)  # compile and warm up
        jax.block_until_ready(state)
        runs[name] = [step, state, t_state]
    for _ in range(repeats):
        for name, run in runs.items():
            step, state, t_state = run
            t0 = time.perf_counter()
            run[1], m = step(state, batch_, key, hyper, t_state)
            jax.block_until_ready(run[1])
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sharding", description=__doc__.splitlines()[0])
    ap.add_argument("--budget-mb", type=float, default=512.0)
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 768, 1024, 1536, 2048])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, nargs=2, default=[8, 128], metavar=("BATCH", "LENGTH"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    if "jax" not in sys.modules:  # forced CPU devices (ignored by GPU backends)
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    from kdjax.app import xla

    xla.apply()
    import jax

    from kdjax import parallel

    n = len(jax.devices())
    meshes = {"replicated": parallel.make_mesh(1, n, 1), "fsdp": parallel.make_mesh(1, 1, n)}
    budget = args.budget_mb * 2**20
    rows = []
    for hidden in args.hidden:
        row = {"hidden": hidden}
        for name, mesh in meshes.items():
            row[name] = compile_step(hidden, args.layers, args.vocab, *args.tokens, mesh)
        row["teacher_parameters"] = row["fsdp"]["teacher_parameters"]
        row["student_parameters"] = row["fsdp"]["student_parameters"]
        rows.append(row)
    largest = {name: max((r for r in rows if r[name]["per_device_bytes"] <= budget),
                         key=lambda r: r["hidden"], default=None) for name in meshes}
    ms = time_steps(args.hidden[0], args.layers, args.vocab, *args.tokens, meshes, args.repeats)
    print(f"{n} {jax.devices()[0].platform} devices; Llama teacher ({args.layers} layers) -> student (half the "
          f"width and layers), vocab {args.vocab}, {args.tokens[0]} x {args.tokens[1]} tokens per step, "
          f"teacher online, Adam; per-device memory from memory_analysis()")
    print(f"{'hidden':>7} {'teacher params':>15} {'student params':>15} {'replicated MB':>14} {'fsdp MB':>9} "
          f"{'fsdp/replicated':>16}")
    for r in rows:
        a, b = r["replicated"]["per_device_bytes"], r["fsdp"]["per_device_bytes"]
        print(f"{r['hidden']:>7} {r['teacher_parameters'] / 1e6:>14.1f}M {r['student_parameters'] / 1e6:>14.1f}M "
              f"{a / 2**20:>14.1f} {b / 2**20:>9.1f} {b / a:>15.2f}x")
    for name, r in largest.items():
        print(f"largest teacher within {args.budget_mb:g} MB per device, {name}: "
              + ("none" if r is None else f"hidden {r['hidden']} ({r['teacher_parameters'] / 1e6:.1f}M parameters)"))
    print(f"step time at hidden {args.hidden[0]} (median of {args.repeats}, interleaved): replicated "
          f"{ms['replicated']:.1f} ms, fsdp {ms['fsdp']:.1f} ms ({ms['fsdp'] / ms['replicated']:.2f}x)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"devices": n, "platform": jax.devices()[0].platform, "budget_mb": args.budget_mb,
                       "rows": rows, "largest": {k: None if r is None else r["hidden"] for k, r in largest.items()},
                       "step_ms": ms}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
