"""Device scaling: kdjax's fused run (data-parallel) and sweep (member-parallel) on 1..N devices.

    python -m benchmarks.scaling [--devices 1 2 4 8] [--preset hinton cifar] [--json FILE]

Weak scaling, medians of interleaved repetitions: on k devices the data-parallel fused
run trains one student on a global batch of k x the preset's batch (mesh data=k), and
the member-parallel sweep trains k x ``--members-per-device`` students (mesh members=k).
Efficiency is the per-device throughput (examples, or student-steps, per second per
device) on k devices over that on one; "total" is the whole mesh's throughput over one
device's. On CPU the devices are forced host devices
(``--xla_force_host_platform_device_count``) that share the machine's cores, so the
efficiency cannot exceed cores / k: there the table measures correctness and overhead,
not speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--preset", nargs="+", default=["hinton", "cifar"], choices=["seed", "hinton", "wide", "cifar"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--members-per-device", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "gpu", "tpu"], default=None)
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    if min(args.devices) < 1 or args.steps < 1 or args.repeats < 1:
        print("scaling: error: --devices, --steps and --repeats must be positive", file=sys.stderr)
        return 2
    if args.device:
        os.environ["JAX_PLATFORMS"] = {"gpu": "cuda", "cpu": "cpu", "tpu": "tpu"}[args.device]
    if args.device in (None, "cpu"):  # before JAX starts: enough host devices
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={max(args.devices)}").strip()

    import jax
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    import kdjax
    from benchmarks.presets import PRESETS
    from kdjax import data, parallel, sweep

    devices = jax.devices()
    if max(args.devices) > len(devices):
        print(f"scaling: error: --devices asks for {max(args.devices)}, {len(devices)} available", file=sys.stderr)
        return 2
    jax.config.update("jax_default_matmul_precision", "highest")
    out = {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "jax": jax.__version__,
           "cpu_count": os.cpu_count(), "presets": {}}
    console = Console(width=130)
    for name in args.preset:
        p = dataclasses.replace(PRESETS[name], steps=args.steps)
        teacher, student = p.jax_models()
        rng = np.random.default_rng(0)
        n = p.batch * max(args.devices) * 2
        x = rng.standard_normal((n, *p.input_shape)).astype(np.float32)
        y = rng.integers(0, p.classes, n).astype(np.int32)
        logits = rng.standard_normal((n, p.classes)).astype(np.float32)
        d = {"x": x, "y": y, "teacher_logits": logits}
        hyper = kdjax.make_hyper(3.0, 0.7)
        runs = {}
        for k in args.devices:
            data_mesh = parallel.make_mesh(1, k, devices=devices[:k])
            sched = data.random_batch_schedule(jax.random.PRNGKey(k), n, p.batch * k, args.steps)
            fused = kdjax.make_run(student, "kd", mesh=data_mesh)
            members = args.members_per_device * k
            T, A, S = sweep.grid(np.linspace(1, 8, members), [0.7], [0])
            keys = sweep.member_keys(S)
            member_sched = data.random_batch_schedule(jax.random.PRNGKey(0), n, p.batch, args.steps)
            swept = sweep.make_sweep_run(student, "kd", shared_schedule=True,
                                         mesh=parallel.make_mesh(k, 1, devices=devices[:k]))
            def run_fused(fused=fused, sched=sched):
                return fused(kdjax.create_train_state(student, 0, x[:1]), d, sched, jax.random.PRNGKey(1), hyper)

            def run_sweep(swept=swept, keys=keys, hyper=sweep.sweep_hyper(T, A)):
                states = sweep.init_members(student, keys["init"], x[:1])
                return swept(states, d, member_sched, keys["dropout"], hyper)

            runs[("fused", k)] = (run_fused, p.batch * k * args.steps)
            runs[("sweep", k)] = (run_sweep, members * args.steps)
        times = {key: [] for key in runs}
        for key, (fn, _) in runs.items():  # warm-up and compile
            jax.block_until_ready(fn())
        for _ in range(args.repeats):  # interleaved
            for key, (fn, _) in runs.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[key].append(time.perf_counter() - t0)
        rows = {}
        for (kind, k), (fn, work) in runs.items():
            med = statistics.median(times[(kind, k)])
            rows[f"{kind}/{k}"] = {"kind": kind, "devices": k, "median_s": med, "per_device_per_s": work / med / k}
        for r in rows.values():
            base = rows[f"{r['kind']}/{min(args.devices)}"]["per_device_per_s"]
            r["efficiency"] = r["per_device_per_s"] / base
            r["total_vs_one"] = r["efficiency"] * r["devices"] / min(args.devices)
        out["presets"][name] = rows
        t = Table(title=f"{name}: weak scaling on {devices[0].platform} ({os.cpu_count()} cores); "
                        f"fused: batch {p.batch} per device; sweep: {args.members_per_device} students per device")
        for col in ("run", "devices", "s per repetition", "per device per s", "efficiency", "total"):
            t.add_column(col, justify="left" if col == "run" else "right")
        for r in rows.values():
            unit = "examples" if r["kind"] == "fused" else "student-steps"
            t.add_row(r["kind"], str(r["devices"]), f"{r['median_s']:.3f}", f"{r['per_device_per_s']:.0f} {unit}",
                      f"{r['efficiency']:.2f}", f"{r['total_vs_one']:.2f}x")
        console.print(t)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
