"""python -m benchmarks [--preset seed|hinton|wide|cifar|features|lm|gpt2|llama|on_policy|all ...] [--device cpu|gpu|tpu]
                       [--precision highest|tensorfloat32] [--steps N] [--repeats N] [--json FILE]"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --precision -> (jax_default_matmul_precision, torch.set_float32_matmul_precision). JAX's
# own default on recent GPUs is TF32 while torch's is full float32: timing each at its
# default would compare different arithmetic, so both sides are set alike.
PRECISIONS = {"highest": ("highest", "highest"), "tensorfloat32": ("tensorfloat32", "high")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description="kdjax vs PyTorch step timing")
    ap.add_argument("--preset", nargs="+", choices=["seed", "hinton", "wide", "cifar", "features", "lm", "gpt2", "llama", "on_policy",
                                                      "all"],
                    default=["all"], help="one or more presets (default: all)")
    ap.add_argument("--lm-shape", type=int, nargs=3, default=None, metavar=("TOKENS", "HIDDEN", "VOCAB"),
                    help="the lm preset's shape (default 4096 512 32768 on CPU, 8192 4096 128256 on GPU)")
    ap.add_argument("--lm-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--gpt2-shape", type=int, nargs=2, default=None, metavar=("BATCH", "LENGTH"),
                    help="the gpt2 preset's tokens per step (default 4 128 on CPU, 8 1024 on GPU)")
    ap.add_argument("--gpt2-model", type=int, nargs=5, default=None,
                    metavar=("TEACHER_LAYERS", "STUDENT_LAYERS", "D_MODEL", "HEADS", "VOCAB"),
                    help="the gpt2 preset's models (default 12 6 768 12 50257: GPT-2 small -> DistilGPT2)")
    ap.add_argument("--device", choices=["cpu", "gpu", "tpu"], default=None)
    ap.add_argument("--precision", choices=list(PRECISIONS), default="highest",
                    help="float32 matmul precision, set alike for JAX and torch (default: highest, "
                         "true float32; on CPUs both are the same)")
    ap.add_argument("--steps", type=int, default=None, help="steps per repetition (default: per preset)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--impl", nargs="*", default=None,
                    help="time only these (torch_eager, torch_eager_cached, torch_compile, torch_compile_func, "
                         "torch_func_sweep, keras_distiller, keras_distiller_spe, kdjax_step, kdjax_fused, "
                         "kdjax_sweep; tunix (llama preset; its own venv); for the image presets also torch_eager_cached_channels_last (cifar), "
                         "torch_eager_channels_last, torch_compile_channels_last (features); on a GPU also "
                         "torch_compile_func_graphs, torch_func_sweep_graphs)")
    ap.add_argument("--eager-torch", action="store_true",
                    help="run the torch.compile rows uncompiled (smoke tests: code paths, not speed)")
    ap.add_argument("--xla-defaults", choices=["kdjax", "jax"], default=None,
                    help="kdjax: the entry points' XLA options (XLA:CPU's Eigen convolutions; kdjax.app.xla); "
                         "jax: JAX's own defaults (default: kdjax unless KDJAX_XLA_DEFAULTS=off)")
    ap.add_argument("--compare-xla", action="store_true",
                    help="also time the JAX rows under the other --xla-defaults (a second process: XLA reads "
                         "its options once) and print both")
    ap.add_argument("--tiny", action="store_true",
                    help="every preset at tiny shapes (benchmarks/tiny.py): the accelerator script's CPU dry run "
                         "and its test; code paths and loss checks, not speed")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1 or (args.steps is not None and args.steps < 1):
        print("benchmarks: error: --steps and --repeats must be positive", file=sys.stderr)
        return 2
    if args.device:
        os.environ["JAX_PLATFORMS"] = {"gpu": "cuda", "cpu": "cpu", "tpu": "tpu"}[args.device]
    from kdjax.app import xla

    users_flags = os.environ.get("XLA_FLAGS")
    if args.xla_defaults is not None:  # explicit: overrides KDJAX_XLA_DEFAULTS
        os.environ["KDJAX_XLA_DEFAULTS"] = "off" if args.xla_defaults == "jax" else "on"
    added = xla.apply()  # before JAX's backend starts
    args.xla_defaults = "kdjax" if added else "jax"
    args.users_flags = users_flags

    import jax
    import torch
    from rich.console import Console
    from rich.table import Table

    jax.config.update("jax_default_matmul_precision", PRECISIONS[args.precision][0])
    torch.set_float32_matmul_precision(PRECISIONS[args.precision][1])

    from benchmarks import tiny
    from benchmarks.bench import bench_preset, matmul_peak
    from benchmarks.presets import GPU_IMPLS, IMAGE_IMPLS, IMPLS, PRESETS

    gpu = args.device == "gpu"
    which = tuple(args.impl) if args.impl else IMPLS + IMAGE_IMPLS + ("tunix",) + (GPU_IMPLS if gpu else ())
    known = IMPLS + IMAGE_IMPLS + GPU_IMPLS + ("tunix",)  # tunix: the llama preset's JAX peer (its own venv)
    if set(which) - set(known):
        print(f"benchmarks: error: --impl expected some of {', '.join(known)}, got "
              f"{', '.join(sorted(set(which) - set(known)))}", file=sys.stderr)
        return 2

    console = Console(width=max(130, Console().width))
    torch_device = "cuda" if args.device == "gpu" else "cpu"
    dev = jax.devices()[0]
    names = (list(PRESETS) + ["features", "lm", "gpt2", "llama", "on_policy"] if "all" in args.preset
             else list(dict.fromkeys(args.preset)))
    out = {
        "device": f"{dev.platform}:{dev.device_kind}" + (f" ({cpu_model()})" if dev.platform == "cpu" else ""),
        "backend": jax.default_backend(), "torch_device": torch_device,
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": __import__("jaxlib").__version__, "torch": torch.__version__,
                     "flax": __import__("flax").__version__, "optax": __import__("optax").__version__},
        "precision": {"option": args.precision, "jax": PRECISIONS[args.precision][0],
                      "torch": torch.get_float32_matmul_precision()},
        "threads": {"cpu_count": os.cpu_count(), "torch_num_threads": torch.get_num_threads(),
                    "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "xla_defaults": args.xla_defaults,
                    "flags_added": added},
        "presets": {}, "tiny": args.tiny,
    }
    start = time.perf_counter()
    with console.status("measuring matmul peak") as status:
        peak = matmul_peak(torch_device, n=256 if args.tiny else 2048 if dev.platform == "cpu" else 8192)
        out["peak"] = peak
        out["peak_gflops"] = max(peak["jax"], peak["torch"])
        for name in names:
            if name == "lm":
                from benchmarks.lm import SHAPES, bench_lm

                shape = args.lm_shape or (tiny.LM_SHAPE if args.tiny else SHAPES["gpu" if dev.platform == "gpu" else "cpu"])
                out["lm"] = bench_lm(*shape, dtype=args.lm_dtype, repeats=min(args.repeats, 3),
                                     torch_device=torch_device, on_progress=status.update)
                continue
            if name == "features":
                from benchmarks.features import STEPS, bench_features

                out["features"] = bench_features(steps=max(2, args.steps or STEPS), repeats=min(args.repeats, 3),
                                                 torch_device=torch_device, which=which, eager_torch=args.eager_torch,
                                                 on_progress=status.update, p=tiny.features() if args.tiny else None)
                continue
            if name == "llama":
                from benchmarks.llama import SHAPES as LLAMA_SHAPES, bench_llama

                ls = tiny.llama() if args.tiny else LLAMA_SHAPES["gpu" if dev.platform == "gpu" else "cpu"]
                if args.steps:
                    ls = dataclasses.replace(ls, steps=max(2, args.steps))
                out["llama"] = bench_llama(ls, repeats=min(args.repeats, 3), torch_device=torch_device,
                                           peak_gflops=out["peak_gflops"], which=which, eager_torch=args.eager_torch,
                                           on_progress=status.update)
                continue
            if name == "on_policy":
                from benchmarks.on_policy import SHAPES as OP_SHAPES, bench_on_policy

                out["on_policy"] = bench_on_policy(tiny.on_policy() if args.tiny
                                                   else OP_SHAPES["gpu" if dev.platform == "gpu" else "cpu"],
                                                   repeats=args.repeats, torch_device=torch_device,
                                                   on_progress=status.update)
                continue
            if name == "gpt2":
                from benchmarks.gpt2 import SHAPES as GPT2_SHAPES, bench_gpt2

                g = tiny.gpt2() if args.tiny else GPT2_SHAPES["gpu" if dev.platform == "gpu" else "cpu"]
                if args.gpt2_shape:
                    g = dataclasses.replace(g, batch=args.gpt2_shape[0], length=args.gpt2_shape[1])
                if args.gpt2_model:
                    g = dataclasses.replace(g, **dict(zip(("teacher_layers", "student_layers", "d_model", "heads",
                                                           "vocab"), args.gpt2_model)))
                if args.steps:
                    g = dataclasses.replace(g, steps=max(2, args.steps))
                out["gpt2"] = bench_gpt2(g, repeats=min(args.repeats, 3), torch_device=torch_device,
                                         peak_gflops=out["peak_gflops"], which=which, eager_torch=args.eager_torch,
                                         on_progress=status.update)
                continue
            p = tiny.presets()[name] if args.tiny else PRESETS[name]
            if args.steps:
                p = dataclasses.replace(p, steps=args.steps, sweep_steps=max(1, min(p.sweep_steps, args.steps)))
            out["presets"][name] = bench_preset(p, args.repeats, torch_device, out["peak_gflops"],
                                                on_progress=status.update, which=which,
                                                eager_torch=args.eager_torch)
    out["wall_s"] = time.perf_counter() - start

    console.print(f"device {out['device']}; torch on {torch_device}; {out['versions']}; "
                  f"threads {out['threads']}; float32 matmul precision {out['precision']}")
    console.print(f"matmul peak (float32, {peak['n']}^3, best of 10): JAX {peak['jax']:.1f} GFLOP/s, "
                  f"torch {peak['torch']:.1f} GFLOP/s -> peak {out['peak_gflops']:.1f}")
    for name, res in out["presets"].items():
        t = Table(title=f"preset {name}: teacher {res['shapes']['teacher']}, student "
                        f"{res['shapes']['student']}, batch {res['shapes']['batch']}")
        image = bool(res["shapes"].get("image"))
        if image:  # the CPU reference is torch's default layout; channels-last beside it
            res["torch_nchw"], res["speedup_vs_torch_nchw"] = nchw_reference(
                {n: r["us_per_step"]["median"] for n, r in res["results"].items() if "us_per_step" in r})
        for col in ("impl", "µs/step med", "min", "max", "steps/s", "GFLOP/s", "% peak",
                    "compile s", "× torch NCHW (CPU ref)" if image else "× torch_eager", "× best peer"):
            t.add_column(col, justify="left" if col == "impl" else "right")
        for impl, r in res["results"].items():
            if "error" in r:
                t.add_row(impl, "[red]failed[/]", "", "", "", "", "", "", r["error"][:60])
                continue
            us = r["us_per_step"]
            how = {"-": "", None: "; one vmap", 1: "; in sequence"}.get(r.get("members_per_group", "-"),
                                                                        f"; groups of {r.get('members_per_group')}")
            t.add_row(impl + (f" (per student{how})" if r["per_student_step"] else ""),
                      f"{us['median']:.1f}", f"{us['min']:.1f}", f"{us['max']:.1f}",
                      f"{r['steps_per_s']:.0f}", f"{r['gflops']:.2f}", f"{100 * r['frac_peak']:.1f}",
                      "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}",
                      (f"{res['speedup_vs_torch_nchw'][impl]:.2f}" if impl in res["speedup_vs_torch_nchw"]
                       else "(ref)" if impl == res["torch_nchw"] else "") if image
                      else f"{res['speedup_vs_torch_eager'].get(impl, 1.0):.2f}",
                      f"{res['speedup_vs_best_torch'][impl]:.2f}" if impl in res["speedup_vs_best_torch"]
                      else " ".join(f"(best {k})" for k, v in res["best_torch"].items() if v == impl))
        console.print(t)
        b = res["best_torch"]
        console.print(f"strongest peer: {b['single']} for a single run, {b['sweep']} for a sweep "
                      f"(per student-step)")
    if "lm" in out:
        lm = out["lm"]
        t = Table(title=f"preset lm: distillation loss of the output layer, forward + backward, "
                        f"{lm['shape']['tokens']} tokens x {lm['shape']['hidden']} hidden x {lm['shape']['vocab']} "
                        f"vocab, {lm['shape']['dtype']}")
        for col in ("impl", "ms med", "min", "max", "GFLOP/s", "peak memory MB", "compile s"):
            t.add_column(col, justify="left" if col == "impl" else "right")
        for impl, r in lm["results"].items():
            t.add_row(impl, f"{r['ms']['median']:.1f}", f"{r['ms']['min']:.1f}", f"{r['ms']['max']:.1f}",
                      f"{r['gflops']:.1f}", "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}",
                      "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}")
        console.print(t)
        ra = lm["ratios"]
        console.print(f"fused vs naive JAX: {ra['fused_memory_vs_naive']:.1f}x less peak memory "
                      f"({ra['fused_temp_vs_naive']:.1f}x less temporary), {ra['fused_time_vs_naive']:.2f}x the time; "
                      f"{ra['fused_time_vs_torch']:.2f}x torch_naive's time; teacher as logits: "
                      f"{ra['fused_logits_temp_vs_naive_logits']:.1f}x less temporary memory, "
                      f"{ra['fused_logits_time_vs_naive_logits']:.2f}x the time")
    if "features" in out:
        f = out["features"]
        sh = f["shape"]
        t = Table(title=f"preset features: ResNet teacher {sh['teacher']} -> student {sh['student']}, batch "
                        f"{sh['batch']}, {sh['image']} images, teacher online; {sh['objective']}")
        f["torch_nchw"], f["speedup_vs_torch_nchw"] = nchw_reference(
            {n: r["ms_per_step"]["median"] for n, r in f["results"].items()})
        for col in ("impl", "ms/step med", "min", "max", "compile s", "× torch NCHW (CPU ref)", "× best peer"):
            t.add_column(col, justify="left" if col == "impl" else "right")
        for impl, r in f["results"].items():
            ms = r["ms_per_step"]
            t.add_row(impl, f"{ms['median']:.1f}", f"{ms['min']:.1f}", f"{ms['max']:.1f}",
                      "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
                      f"{f['speedup_vs_torch_nchw'][impl]:.2f}" if impl in f["speedup_vs_torch_nchw"]
                      else "(ref)" if impl == f["torch_nchw"] else "",
                      f"{f['speedup_vs_best_peer'][impl]:.2f}" if impl in f["speedup_vs_best_peer"]
                      else "(best)" if impl == f["best_peer"] else "")
        console.print(t)
    if "gpt2" in out:
        g = out["gpt2"]
        sh = g["shape"]
        t = Table(title=f"preset gpt2: teacher {sh['teacher_layers']} layers -> student {sh['student_layers']} "
                        f"layers, d_model {sh['d_model']}, {sh['heads']} heads, vocab {sh['vocab']}, "
                        f"{sh['batch']} x {sh['length']} tokens per step, teacher online")
        for col in ("impl", "ms/step med", "min", "max", "tokens/s", "GFLOP/s", "% peak", "compile s",
                    "× best torch"):
            t.add_column(col, justify="left" if col == "impl" else "right")
        for impl, r in g["results"].items():
            ms = r["ms_per_step"]
            t.add_row(impl, f"{ms['median']:.0f}", f"{ms['min']:.0f}", f"{ms['max']:.0f}",
                      f"{r['tokens_per_s']:.0f}", f"{r['gflops']:.1f}", f"{100 * r['frac_peak']:.1f}",
                      "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
                      f"{g['speedup_vs_best_torch'][impl]:.2f}" if impl in g["speedup_vs_best_torch"]
                      else "(best)" if impl == g["best_torch"] else "")
        console.print(t)
    if "llama" in out:
        mb = lambda b: "-" if b is None else f"{b / 2**20:.0f}"
        g = out["llama"]
        sh = g["shape"]
        t = Table(title=f"preset llama: teacher {sh['teacher']} -> student {sh['student']} (layers, hidden, heads, kv "
                        f"heads, SwiGLU), vocab {sh['vocab']}, {sh['batch']} x {sh['length']} tokens per step, "
                        f"teacher online")
        for col in ("impl", "ms/step med", "min", "max", "tokens/s", "GFLOP/s", "% peak", "temp MB", "peak MB",
                    "compile s", "× best torch", "× tunix", "peak RSS MB"):
            t.add_column(col, justify="left" if col == "impl" else "right")
        for impl, r in g["results"].items():
            if "ms_per_step" not in r:  # tunix: skipped (its venv is missing) or failed, with the reason
                why = r.get("skipped") or r.get("error", "")
                t.add_row(impl, "[yellow]skipped[/]" if "skipped" in r else "[red]failed[/]", "", "", "", "", "", "", "",
                          "", "", "", why[:120])
                continue
            if impl == "tunix":
                ms = r["ms_per_step"]
                t.add_row(impl, f"{ms['median']:.0f}", f"{ms['min']:.0f}", f"{ms['max']:.0f}",
                          f"{r['tokens_per_s']:.0f}", f"{r['gflops']:.1f}", f"{100 * r['frac_peak']:.1f}",
                          mb(r.get("temp_bytes")), mb(r.get("peak_bytes")),
                          f"{r['compile_s']:.1f}", "", "(ref)", f"{r['peak_rss_bytes'] / 2**20:.0f}")
                continue
            ms = r["ms_per_step"]
            t.add_row(impl, f"{ms['median']:.0f}", f"{ms['min']:.0f}", f"{ms['max']:.0f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['gflops']:.1f}", f"{100 * r['frac_peak']:.1f}", mb(r.get("temp_bytes")),
                      mb(r.get("peak_bytes")), "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
                      f"{g['speedup_vs_best_torch'][impl]:.2f}" if impl in g["speedup_vs_best_torch"]
                      else "(best)" if impl == g["best_torch"] else "",
                      f"{r['speedup_vs_tunix']:.2f}" if "speedup_vs_tunix" in r else "", "")
        console.print(t)
    if "on_policy" in out:
        g = out["on_policy"]
        sh = g["shape"]
        t = Table(title=f"preset on_policy: teacher {tuple(sh['teacher'])} -> student {tuple(sh['student'])}, vocab "
                        f"{sh['vocab']}; {sh['batch']} prompts of {sh['prompt']} tokens + {sh['new']} sampled; GKD "
                        f"(lmbda 1): sample, teacher scores, JSD, Adam; loss checked on fixed completions")
        for col in ("impl", "ms/step med", "min", "max", "completion tokens/s", "× best torch"):
            t.add_column(col, justify="left" if col == "impl" else "right")
        for impl, r in g["results"].items():
            t.add_row(impl, f"{r['ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['max_ms']:.1f}",
                      f"{r['completion_tokens_per_s']:.0f}",
                      f"{g['speedup_vs_best_torch'][impl]:.2f}" if impl in g["speedup_vs_best_torch"] else "(best)")
        console.print(t)
    if args.compare_xla:
        out["xla_comparison"] = compare_xla(args, argv, out, console)
    console.print(f"total {out['wall_s']:.0f} s")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def nchw_reference(med: dict) -> tuple[str | None, dict]:
    """The image presets' CPU reference: the fastest PyTorch single-run row in torch's default
    (NCHW) layout, and ``{kdjax row: its median / the row's median}`` (> 1: kdjax faster).
    The channels-last rows stay in the table beside it (and in ``best_torch``)."""
    nchw = {n: m for n, m in med.items()
            if n.startswith("torch") and "channels_last" not in n and "sweep" not in n}
    ref = min(nchw, key=nchw.get) if nchw else None
    return ref, {n: med[ref] / m for n, m in med.items() if ref and n.startswith("kdjax") and "sweep" not in n}


def jax_rows(out: dict) -> dict:
    """``{(preset, row): median µs per step}`` of the rows XLA compiles (kdjax's and plain JAX's)."""
    rows = {}
    for name, res in out["presets"].items():
        for impl, r in res["results"].items():
            if impl.startswith("kdjax") and "us_per_step" in r:
                rows[(name, impl)] = r["us_per_step"]["median"]
    for impl, r in out.get("gpt2", {}).get("results", {}).items():
        if impl.startswith("kdjax"):
            rows[("gpt2", impl)] = 1e3 * r["ms_per_step"]["median"]
    for impl, r in out.get("lm", {}).get("results", {}).items():
        if impl.startswith(("kdjax", "jax")):
            rows[("lm", impl)] = 1e3 * r["ms"]["median"]
    return rows


def compare_xla(args, argv, out: dict, console) -> dict:
    """The JAX rows again in a child process under the other ``--xla-defaults``; a table of both."""
    import subprocess
    import tempfile

    from rich.table import Table

    other = "jax" if args.xla_defaults == "kdjax" else "kdjax"
    with tempfile.TemporaryDirectory() as tmp:
        same = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--compare-xla"]
        # repeated options: argparse keeps the last one
        cmd = [sys.executable, "-m", "benchmarks", *same, "--xla-defaults", other, "--json", f"{tmp}/o.json"]
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "KDJAX_XLA_DEFAULTS")}
        if args.users_flags is not None:  # the user's own flags, without the ones this run added
            env["XLA_FLAGS"] = args.users_flags
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            console.print(f"[red]--compare-xla: the child run failed:[/] {done.stderr.strip().splitlines()[-1:]}")
            return {"error": done.stderr[-2000:]}
        with open(f"{tmp}/o.json") as fh:
            theirs = json.load(fh)
    mine, their_rows = jax_rows(out), jax_rows(theirs)
    t = Table(title=f"XLA options: --xla-defaults {args.xla_defaults} (this run, XLA_FLAGS="
                    f"{out['threads']['XLA_FLAGS']!r}) vs {other} (a second process, XLA_FLAGS="
                    f"{theirs['threads']['XLA_FLAGS']!r}); µs per step, medians")
    for col in ("preset", "row", args.xla_defaults, other, f"{args.xla_defaults} / {other}"):
        t.add_column(col, justify="left" if col in ("preset", "row") else "right")
    rows = {}
    for key in mine:
        if key in their_rows:
            rows[f"{key[0]}/{key[1]}"] = {args.xla_defaults: mine[key], other: their_rows[key]}
            t.add_row(key[0], key[1], f"{mine[key]:.1f}", f"{their_rows[key]:.1f}", f"{mine[key] / their_rows[key]:.2f}")
    console.print(t)
    return {"this": args.xla_defaults, "other": other, "other_flags": theirs["threads"]["XLA_FLAGS"], "rows": rows}


if __name__ == "__main__":
    sys.exit(main())
