"""The kdjax rows: a jitted step called from Python, a fused run (one ``lax.scan``), a vmapped
sweep."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import kdjax
from kdjax import sweep
from benchmarks.presets import (Impl, SWEEP_ALPHA, SWEEP_T)


class KdjaxStep(Impl):
    """A Python loop over kdjax's jitted step; the teacher runs online (as in torch)."""

    name = "kdjax_step"

    def setup(self):
        teacher, student = self.p.jax_models()
        self.fn = kdjax.make_train_step(student, "kd", teacher=teacher)
        self.tparams = self.inp.teacher_state
        self.state = self.inp.student_state()
        x, y = jnp.asarray(self.inp.x), jnp.asarray(self.inp.y)
        self.batches = [{"x": x[i], "y": y[i]} for i in jnp.asarray(self.inp.schedule)]
        self.rng, self.hyper = jax.random.PRNGKey(0), kdjax.make_hyper(3.0, 0.7)
        t0 = time.perf_counter()
        self.fn = self.fn.lower(self.state, self.batches[0], self.rng, self.hyper,
                                self.tparams).compile()
        compile_s = time.perf_counter() - t0
        for b in self.batches[:3]:
            self.state, m = self.fn(self.state, b, self.rng, self.hyper, self.tparams)
        jax.block_until_ready(self.state)
        return compile_s

    def run(self):
        state, fn, rng, hyper, tp = self.state, self.fn, self.rng, self.hyper, self.tparams
        t0 = time.perf_counter()
        for b in self.batches:
            state, _ = fn(state, b, rng, hyper, tp)
        jax.block_until_ready(state)
        self.state = state
        return time.perf_counter() - t0, len(self.batches)


class KdjaxFused(Impl):
    """kdjax's fused run: all steps in one lax.scan, teacher logits cached once."""

    name = "kdjax_fused"

    def setup(self):
        teacher, student = self.p.jax_models()
        self.data = self.inp.cached_data(teacher)
        self.state = self.inp.student_state()
        self.schedule = jnp.asarray(self.inp.schedule)
        self.rng, self.hyper = jax.random.PRNGKey(0), kdjax.make_hyper(3.0, 0.7)
        run = kdjax.make_run(student, "kd")
        t0 = time.perf_counter()
        self.fn = run.lower(self.state, self.data, self.schedule, self.rng, self.hyper).compile()
        compile_s = time.perf_counter() - t0
        self.run()  # warm-up
        return compile_s

    def run(self):
        t0 = time.perf_counter()
        self.state, m = self.fn(self.state, self.data, self.schedule, self.rng, self.hyper)
        jax.block_until_ready((self.state, m))
        return time.perf_counter() - t0, self.schedule.shape[0]


class KdjaxSweep(Impl):
    """24 students (T x alpha grid) as one fused program; time per student-step. How the
    members run (one vmap, groups, or in sequence: ``members_per_group``) is chosen by
    ``sweep.pick_members_per_group`` on these inputs first; its timings are reported."""

    name = "kdjax_sweep"

    def setup(self):
        teacher, student = self.p.jax_models()
        self.data = self.inp.cached_data(teacher)
        # a temperature x alpha grid at one seed: same init and minibatches for every member
        temps, alphas, seeds = sweep.grid(SWEEP_T, SWEEP_ALPHA, [0])
        keys = sweep.member_keys(seeds)
        self.states = sweep.init_members(student, keys["init"], jnp.zeros((1, *self.p.input_shape)))
        self.schedules = kdjax.data.random_batch_schedule(keys["schedule"][0], self.p.num_samples,
                                                  self.p.batch, self.p.sweep_steps)
        self.rngs, self.hyper = keys["dropout"], sweep.sweep_hyper(temps, alphas)
        self.members = len(temps)
        args = (self.states, self.data, self.schedules, self.rngs, self.hyper)
        self.group, times = sweep.pick_members_per_group(student, "kd", *args, repeats=1, shared_schedule=True)
        per_student = 1e6 / (self.members * self.p.sweep_steps)
        self.details = {"members_per_group": self.group,
                        "pick_us_per_student_step": {str(g): t * per_student for g, t in times.items()}}
        run = sweep.make_sweep_run(student, "kd", shared_schedule=True, members_per_group=self.group)
        t0 = time.perf_counter()
        self.fn = run.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        self.run()
        return compile_s

    def run(self):
        t0 = time.perf_counter()
        self.states, m = self.fn(self.states, self.data, self.schedules, self.rngs, self.hyper)
        jax.block_until_ready((self.states, m))
        return time.perf_counter() - t0, self.members * self.schedules.shape[0]
