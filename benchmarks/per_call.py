"""What a training step costs when Python calls it, against the same step inside the fused
scan and a bare jitted call of the same arguments (the floor of any call from Python).

    python -m benchmarks.per_call [--preset seed|hinton] [--steps 300] [--repeats 5]

Rows (µs per step, medians of interleaved repetitions, the student distilling from cached
teacher logits everywhere so that every row does the same work):

* ``step_jit``: ``make_train_step``'s jitted step in a Python loop over device batches;
* ``step_compiled``: the same step compiled ahead of time (``.lower().compile()``), called;
* ``step_teacher_online``: ``make_train_step(..., teacher=)``, the teacher's forward inside;
* ``fused``: ``make_run`` (all steps in one ``lax.scan``), per step;
* ``floor``: a jitted function of the same arguments, the state donated and returned as the
  step does, and no computation;
* ``run_one_step``: ``make_run`` fed one schedule row per call (the gather on device, inside
  the program: the data set never leaves the device);
* ``loop_take_batch``: a user's loop as the docs write it: ``kdjax.data.take_batch`` of a
  schedule row, then ``step_jit``;
* ``slice_batches``: what a caller's ``{k: v[idx]}`` per step costs on its own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def measure(preset: str, steps: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kdjax
    from benchmarks.presets import PRESETS

    p = PRESETS[preset]
    teacher, student = p.jax_models()
    rng = np.random.default_rng(0)
    n = p.num_samples
    x = jnp.asarray(rng.standard_normal((n, p.teacher[0])), jnp.float32)
    y = jnp.asarray(rng.integers(0, p.student[-1], n))
    t_state = kdjax.create_train_state(teacher, jax.random.PRNGKey(1), x[:1])
    t_logits = kdjax.predict_logits(teacher, t_state, x)
    sched = kdjax.data.random_batch_schedule(jax.random.PRNGKey(2), n, p.batch, steps)
    data = {"x": x, "y": y, "teacher_logits": t_logits}
    batches = [{k: v[jnp.asarray(i)] for k, v in data.items()} for i in sched]
    online = [{"x": b["x"], "y": b["y"]} for b in batches]
    key, hyper = jax.random.PRNGKey(0), kdjax.make_hyper(3.0, 0.7)
    fresh = lambda: kdjax.create_train_state(student, jax.random.PRNGKey(3), x[:1])

    step = kdjax.make_train_step(student, "kd")
    compiled = step.lower(fresh(), batches[0], key, hyper).compile()
    step_t = kdjax.make_train_step(student, "kd", teacher=teacher)
    run = kdjax.make_run(student, "kd")
    floor = jax.jit(lambda s, b, r, h: (s, s.step), donate_argnums=0)  # the step's signature, no work
    sched_d = jnp.asarray(sched)

    def loop(fn, bs, extra=()):
        s = fresh()
        jax.block_until_ready(s)
        t0 = time.perf_counter()
        for b in bs:
            s, _ = fn(s, b, key, hyper, *extra)
        jax.block_until_ready(s)
        return (time.perf_counter() - t0) / len(bs)

    def fused():
        s = fresh()
        jax.block_until_ready(s)
        t0 = time.perf_counter()
        s, _ = run(s, data, sched_d, key, hyper)
        jax.block_until_ready(s)
        return (time.perf_counter() - t0) / steps

    def bare():
        s = fresh()
        jax.block_until_ready(s)
        t0 = time.perf_counter()
        for b in batches:
            s, _ = floor(s, b, key, hyper)
        jax.block_until_ready(s)
        return (time.perf_counter() - t0) / steps

    def run_rows():
        s = fresh()
        jax.block_until_ready(s)
        t0 = time.perf_counter()
        for k in range(steps):
            s, _ = run(s, data, sched[k:k + 1], key, hyper)
        jax.block_until_ready(s)
        return (time.perf_counter() - t0) / steps

    def loop_take():
        s = fresh()
        jax.block_until_ready(s)
        t0 = time.perf_counter()
        for i in sched:
            s, _ = step(s, kdjax.data.take_batch(data, i), key, hyper)
        jax.block_until_ready(s)
        return (time.perf_counter() - t0) / steps

    def slicing():
        t0 = time.perf_counter()
        for i in sched:
            out = {k: v[jnp.asarray(i)] for k, v in data.items()}
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / steps

    rows = {"step_jit": lambda: loop(step, batches), "step_compiled": lambda: loop(compiled, batches),
            "step_teacher_online": lambda: loop(step_t, online, (t_state,)), "fused": fused, "floor": bare,
            "run_one_step": run_rows, "loop_take_batch": loop_take, "slice_batches": slicing}
    for fn in rows.values():  # compile and warm up
        fn()
    times = {k: [] for k in rows}
    for _ in range(repeats):
        for k, fn in rows.items():
            times[k].append(1e6 * fn())
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.per_call", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["seed", "hinton"], choices=["seed", "hinton", "wide"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    from kdjax.app import xla

    xla.apply()
    for preset in args.preset:
        r = measure(preset, args.steps, args.repeats)
        print(f"preset {preset}: µs per step, medians of {args.repeats} (min-max)")
        for k, v in r.items():
            print(f"  {k:20s} {v['median']:10.1f}   ({v['min']:.1f}-{v['max']:.1f})")
        goal = r["fused"]["median"] + r["floor"]["median"]
        print(f"  goal (fused + floor) {goal:10.1f}; step_jit / goal = {r['step_jit']['median'] / goal:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
