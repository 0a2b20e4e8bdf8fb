"""``kdjax demo``: the seed's five demos, then held-out distillation on real data.

Each section prints through a ``Reporter`` (see ``kdjax.cli``) and returns a plain
dict for ``results.json``. Sections 3-6 train many models at once: every multi-seed
comparison is one vmapped program, and a teacher/student pair shares its seed (same
init and minibatch order for the standard and the distilled student of a pair).
``CompileAhead`` compiles the later sections' programs on a background thread while
the earlier sections train.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import data
from kdjax.experiments import (RunConfig, compile_members, evaluate_on, fit_members, mean_ci,
                               paired_students, teacher_logits_for)
from kdjax.models import StudentMLP, TeacherMLP, init_params
from kdjax.train import FAST_COMPILE, SHORT_RUN_COMPILE, evaluate, make_hyper, predict_logits

SEED_LOGITS = (2.0, 1.0, 0.5, 0.2)
SEED_TEMPERATURES = (1.0, 2.0, 5.0, 10.0)
SEED_TEACHER_ROWS = ((3.0, 1.5, 0.8, 0.5), (2.0, 1.8, 1.5, 1.0))
DEMO5_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
DEMO5_ALPHAS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)
DIGITS_STUDENT_HIDDEN = 16


def _seed_problem():
    """Demos 3 and 4: the seed's data, schedule and models."""
    return (data.synthetic(500, 50, 5, seed=42, test_samples=500), RunConfig(steps=100, batch_size=64),
            TeacherMLP(256, 5), StudentMLP(64, 5))


def _demo5_problem():
    """Demo 5: the seed's smaller data and models."""
    return (data.synthetic(400, 40, 4, seed=42, test_samples=400), RunConfig(steps=80, batch_size=64),
            TeacherMLP(200, 4), StudentMLP(50, 4))


def _demo5_members(seeds):
    """Both sweeps x seeds as one set of members: ``(configs, member seeds, Hyper)``."""
    configs = [(T, 0.7) for T in DEMO5_TEMPERATURES] + [(3.0, a) for a in DEMO5_ALPHAS]
    temps = np.repeat([c[0] for c in configs], len(seeds))
    alphas = np.repeat([c[1] for c in configs], len(seeds))
    member_seeds = np.tile(seeds, len(configs))  # a seed's students share init and minibatches
    return configs, member_seeds, make_hyper(temps, alphas)


def _digits_problem(epochs, student_hidden):
    """The held-out section: digits, real epochs, a dropout teacher and a small student."""
    return (data.digits(), RunConfig(epochs=epochs, batch_size=64),
            TeacherMLP(256, 10), StudentMLP(student_hidden, 10))


def _member_param_count(batched_params) -> int:
    """Parameters of one member of a batched params tree (from shapes; no device work)."""
    return sum(int(np.prod(a.shape[1:])) for a in jax.tree_util.tree_leaves(batched_params))


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _softened(logits, temperatures):
    """softmax(z / T) and the seed's entropy -sum p log(p + 1e-10): ``[rows, T, C]``, ``[rows, T]``."""
    p = jax.nn.softmax(logits[:, None, :] / temperatures[None, :, None], axis=-1)
    return p, -jnp.sum(p * jnp.log(p + 1e-10), axis=-1)


def _soft_table():
    """Demos 1 and 2 in one small program: every row at every temperature either uses."""
    rows = np.asarray((SEED_LOGITS, *SEED_TEACHER_ROWS), np.float32)
    temps = np.asarray((*SEED_TEMPERATURES, 3.0), np.float32)
    return tuple(np.asarray(a) for a in _softened(rows, temps))


def _fmt(mean_half) -> str:
    m, h = mean_half
    return f"{m:.4f} ± {h:.4f}"


def temperature_effect(rep) -> dict:
    """Demo 1: softmax(z / T) and its entropy -sum p log(p + 1e-10), as in the seed."""
    rep.section("DEMO 1: Temperature effect on softmax")
    probs, entropy = (a[0, :len(SEED_TEMPERATURES)] for a in _soft_table())
    out = {"logits": list(SEED_LOGITS), "temperatures": list(SEED_TEMPERATURES),
           "probs": probs.tolist(), "entropy": entropy.tolist()}
    rows = [[f"{T:g}", ", ".join(f"{v:.4f}" for v in p), f"{h:.4f}"]
            for T, p, h in zip(SEED_TEMPERATURES, probs, entropy)]
    rep.table(f"logits {list(SEED_LOGITS)}", ["T", "probabilities", "entropy"], rows)
    rep.line("Higher temperature -> softer (more uniform) distribution: more of the teacher's "
             "knowledge about the non-argmax classes is visible.")
    return out


def soft_vs_hard(rep) -> dict:
    """Demo 2: one-hot labels vs the teacher's softened distribution at T = 3."""
    rep.section("DEMO 2: Soft vs hard labels")
    soft = _soft_table()[0][1:, -1]  # the teacher rows at T = 3
    hard = np.eye(4)[[0, 0]]
    rows = [[str(list(r)), str(h.tolist()), ", ".join(f"{v:.4f}" for v in s)]
            for r, h, s in zip(SEED_TEACHER_ROWS, hard, soft)]
    rep.table("teacher rows, hard label 0", ["teacher logits", "hard (one-hot)", "soft (T=3)"], rows)
    rep.line("Soft labels encode similarity between classes; hard labels do not.")
    return {"teacher_logits": [list(r) for r in SEED_TEACHER_ROWS],
            "soft_T3": soft.tolist(), "hard": hard.tolist()}


def _log_every_20(rep, name, losses, accs):
    """The seed's progress lines for member 0: minibatch loss and training accuracy."""
    for k, acc in enumerate(accs):
        step = 20 * (k + 1)
        rep.line(f"  {name} step {step:3d}: loss = {losses[step - 1]:.4f}, train acc = {acc:.4f}")


def _train_logged(rep, model, objective, ds, cfg, seeds, label, **kw):
    """fit_members in 20-step chunks, recording every member's training accuracy."""
    accs = []
    with rep.progress(label, cfg.steps) as advance:
        def on_chunk(done, total, states):
            accs.append(evaluate_on(model, states.params, ds.x_train, ds.y_train, members=True)["accuracy"])
            advance(done)
        states, losses = fit_members(model, objective, ds, cfg, seeds, chunk=20, on_chunk=on_chunk,
                                     compiler_options=SHORT_RUN_COMPILE, **kw)
    return states, losses, np.stack(accs, axis=1)  # [N, chunks]


def seed_comparison(rep, seeds) -> dict:
    """Demos 3 and 4 on the seed's data: teacher, standard student, distilled student."""
    ds, cfg, teacher, student = _seed_problem()

    rep.section("DEMO 3: Basic knowledge distillation — the teacher")
    t_states, t_losses, t_accs = _train_logged(rep, teacher, "ce", ds, cfg, seeds, "teacher")
    n_t = _member_param_count(t_states.params)
    rep.line(f"Seed data: {len(ds.y_train)} examples x {ds.input_dim} features, {ds.num_classes} "
             f"random labels; {cfg.describe()}.")
    rep.line(f"Teacher parameters: {n_t:,}")
    _log_every_20(rep, "teacher", t_losses[0], t_accs[0])
    rep.line(f"Teacher final training accuracy (seed {seeds[0]}): {t_accs[0, -1]:.4f}")

    rep.section("DEMO 4: Student training comparison (T = 3, alpha = 0.7)")
    n = len(seeds)
    pairs = paired_students(seeds, teacher_logits_for(teacher, t_states.params, ds, members=True), 3.0, 0.7)
    st_states, st_losses, st_accs = _train_logged(rep, student, "kd", ds, cfg, pairs.pop("seeds"),
                                                  "students (standard + distilled)", **pairs)
    n_s = _member_param_count(st_states.params)
    rep.line(f"Student parameters: {n_s:,}; compression ratio {n_t / n_s:.2f}x")
    _log_every_20(rep, "standard ", st_losses[0], st_accs[0])
    _log_every_20(rep, "distilled", st_losses[n], st_accs[n])
    t_acc = {split: evaluate_on(teacher, t_states.params, x, y, members=True)["accuracy"]
             for split, x, y in [("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)]}
    s_acc = {split: evaluate_on(student, st_states.params, x, y, members=True)["accuracy"]
             for split, x, y in [("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)]}
    acc = {"teacher": t_acc, "standard": {k: v[:n] for k, v in s_acc.items()},
           "distilled": {k: v[n:] for k, v in s_acc.items()}}
    s_losses, d_losses = st_losses[:n], st_losses[n:]
    a0 = {k: float(v["train"][0]) for k, v in acc.items()}
    rep.table(f"the seed's single run (seed {seeds[0]}), training accuracy", ["model", "accuracy"],
              [["teacher", f"{a0['teacher']:.4f}"], ["student (standard)", f"{a0['standard']:.4f}"],
               ["student (distilled)", f"{a0['distilled']:.4f}"],
               ["improvement from distillation", f"{a0['distilled'] - a0['standard']:+.4f}"]])
    stats = {name: {split: mean_ci(v[split]) for split in ("train", "test")} for name, v in acc.items()}
    gain = {split: mean_ci(acc["distilled"][split] - acc["standard"][split]) for split in ("train", "test")}
    rows = [[name, _fmt(stats[name]["train"]), _fmt(stats[name]["test"])] for name in acc]
    rows.append(["distilled - standard (paired)", _fmt(gain["train"]), _fmt(gain["test"])])
    rep.table(f"over {len(seeds)} seeds (teachers one vmapped program, students another): mean ± 95% CI",
              ["model", "train accuracy", "held-out accuracy"], rows)
    rep.line("The seed's labels are random: held-out accuracy is chance (0.2) for every model; "
             "training accuracy measures memorisation of 500 random labels, not learning.")
    return {
        "param_counts": {"teacher": n_t, "student": n_s, "compression": n_t / n_s},
        "config": {"steps": cfg.steps, "batch_size": cfg.batch_size, "temperature": 3.0,
                   "alpha": 0.7, "seeds": list(map(int, seeds))},
        "single_run": a0,
        "accuracy": {n: {s: v.tolist() for s, v in d.items()} for n, d in acc.items()},
        "mean_ci": stats, "paired_gain": gain,
        "losses": {"teacher": t_losses, "standard": s_losses, "distilled": d_losses},
    }


def hyperparameters(rep, seeds) -> dict:
    """Demo 5: temperature sweep (alpha 0.7) and alpha sweep (T 3) on the seed's demo-5 data."""
    rep.section("DEMO 5: Hyperparameter tuning (one teacher; both sweeps x seeds as one vmapped program)")
    ds, cfg, teacher, student = _demo5_problem()
    # as in the seed: one teacher, then a student per configuration (here x seeds)
    t_states, _ = fit_members(teacher, "ce", ds, cfg, seeds[:1], compiler_options=SHORT_RUN_COMPILE)
    t_logits = np.asarray(teacher_logits_for(teacher, t_states.params, ds, members=True))[0]
    configs, member_seeds, hyper = _demo5_members(seeds)
    with rep.progress(f"{len(member_seeds)} students", cfg.steps) as advance:
        states, _ = fit_members(student, "kd", ds, cfg, member_seeds, hyper=hyper, teacher_logits=t_logits,
                                on_chunk=lambda d, t, s: advance(d), compiler_options=SHORT_RUN_COMPILE)
    acc = evaluate_on(student, states.params, ds.x_train, ds.y_train, members=True)["accuracy"]
    acc = acc.reshape(len(configs), len(seeds))
    stats = [mean_ci(a) for a in acc]
    nT = len(DEMO5_TEMPERATURES)
    rep.table(f"temperature (alpha = 0.7), training accuracy over {len(seeds)} seeds",
              ["T", "mean ± 95% CI"], [[f"{T:g}", _fmt(s)] for T, s in zip(DEMO5_TEMPERATURES, stats[:nT])])
    rep.table(f"alpha (T = 3), training accuracy over {len(seeds)} seeds",
              ["alpha", "mean ± 95% CI"], [[f"{a:g}", _fmt(s)] for a, s in zip(DEMO5_ALPHAS, stats[nT:])])
    return {"temperatures": list(DEMO5_TEMPERATURES), "alphas": list(DEMO5_ALPHAS),
            "temperature_sweep": stats[:nT], "alpha_sweep": stats[nT:],
            "accuracy": acc.tolist(), "config": {"steps": cfg.steps, "batch_size": cfg.batch_size}}


def digits_heldout(rep, seeds, epochs: int = 30, student_hidden: int = DIGITS_STUDENT_HIDDEN,
                   temperature: float = 3.0, alpha: float = 0.7) -> dict:
    """Beyond the seed: held-out test accuracy on scikit-learn's digits."""
    rep.section("HELD-OUT: distillation on real data (scikit-learn digits, 8x8 images)")
    ds, cfg, teacher, student = _digits_problem(epochs, student_hidden)
    rep.line(f"{len(ds.y_train)} train / {len(ds.y_test)} test images, 10 classes; {cfg.describe()}; "
             f"teacher {teacher.hidden_dim}-wide with dropout 0.3, student {student_hidden}-wide; "
             f"T = {temperature:g}, alpha = {alpha:g}; {len(seeds)} seeds.")
    steps = (len(ds.y_train) // cfg.batch_size) * epochs
    with rep.progress("teachers", steps) as advance:
        t_states, t_losses = fit_members(teacher, "ce", ds, cfg, seeds, on_chunk=lambda d, t, s: advance(d))
    logits = teacher_logits_for(teacher, t_states.params, ds, members=True)
    n, pairs = len(seeds), paired_students(seeds, logits, temperature, alpha)
    with rep.progress("students (standard + distilled)", steps) as advance:
        st_states, st_losses = fit_members(student, "kd", ds, cfg, on_chunk=lambda d, t, s: advance(d), **pairs)
    t_acc = evaluate_on(teacher, t_states.params, ds.x_test, ds.y_test, members=True)["accuracy"]
    s_acc = evaluate_on(student, st_states.params, ds.x_test, ds.y_test, members=True)["accuracy"]
    acc = {"teacher": t_acc, "standard": s_acc[:n], "distilled": s_acc[n:]}
    s_losses, d_losses = st_losses[:n], st_losses[n:]
    stats = {k: mean_ci(v) for k, v in acc.items()}
    gain = mean_ci(acc["distilled"] - acc["standard"])
    rows = [[k, _fmt(v)] for k, v in stats.items()]
    rows.append(["distilled - standard (paired)", f"{gain[0]:+.4f} ± {gain[1]:.4f}"])
    rep.table("test accuracy, mean ± 95% CI", ["model", "test accuracy"], rows)
    lo, hi = gain[0] - gain[1], gain[0] + gain[1]
    verdict = ("distillation helped" if lo > 0 else "distillation hurt" if hi < 0
               else "no significant difference")
    rep.line(f"Paired gain of distillation: {gain[0]:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}] -> {verdict}.")
    return {"config": {"epochs": epochs, "batch_size": cfg.batch_size, "student_hidden": student_hidden,
                       "temperature": temperature, "alpha": alpha, "seeds": list(map(int, seeds))},
            "test_accuracy": {k: v.tolist() for k, v in acc.items()}, "mean_ci": stats,
            "paired_gain": gain, "verdict": verdict,
            "losses": {"teacher": t_losses, "standard": s_losses, "distilled": d_losses}}


# ----------------------------------------------------------------------------- compiling ahead

class CompileAhead:
    """Compiles the programs of the chosen sections on background threads, in the order
    the sections run them, while earlier sections train (XLA compiles with the GIL
    released). Each job calls the functions its section calls, with the same shapes, so
    the section finds its programs compiled, or waits for the one still compiling.

    ``workers`` threads compile at once: by default one per 4 CPU cores (XLA already
    spreads one compilation over a few cores), at least one. It runs on the CPU backend
    only: there it shortens a cold ``--sections 1-5`` by ~0.25 s on 2 cores (median of
    5), while on an H200 it gained nothing with 4 threads and cost ~5 s with one (not
    investigated), so on other backends the sections compile their own programs.

    Use as a context manager around the sections: leaving normally waits for the jobs
    (re-raising any error); leaving on an exception cancels the jobs not yet started.
    """

    def __init__(self, sections, seeds, digits_epochs: int = 30, workers: int | None = None):
        jobs = []
        if jax.default_backend() != "cpu":
            sections = ()
        if 3 in sections or 4 in sections:
            jobs += [functools.partial(_compile_seed_teachers, seeds),
                     functools.partial(_compile_seed_students, seeds)]
        if 5 in sections:
            jobs += [functools.partial(_compile_demo5_teacher, seeds),
                     functools.partial(_compile_demo5_students, seeds)]
        if 6 in sections:
            jobs += [functools.partial(_compile_digits_teachers, seeds, digits_epochs),
                     functools.partial(_compile_digits_students, seeds, digits_epochs)]
        workers = workers or max(1, (os.cpu_count() or 1) // 4)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdjax-compile")
        self._jobs = [self._pool.submit(job) for job in jobs]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            return False
        for job in self._jobs:
            job.result()
        self._pool.shutdown()
        return False


def _params_like(model, input_dim: int, members: int):
    """Placeholder batched params (only shapes and dtypes are used: compiling)."""
    one = init_params(model, 0, input_dim)
    return jax.tree_util.tree_map(lambda a: np.broadcast_to(a, (members, *a.shape)), one)


def _compile_evaluate(model, members: int, x, y):
    params = _params_like(model, x.shape[-1], members)
    evaluate.lower(model, params, jax.device_put(x), jax.device_put(y), members=True).compile()


def _compile_predict(model, members: int, x):
    params = _params_like(model, x.shape[-1], members)
    predict_logits.lower(model, params, jax.device_put(x), members=True).compile()


def _compile_seed_teachers(seeds):
    ds, cfg, teacher, _ = _seed_problem()
    compile_members(teacher, "ce", ds, cfg, seeds, chunk=20, compiler_options=SHORT_RUN_COMPILE)
    _compile_evaluate(teacher, len(seeds), ds.x_train, ds.y_train)  # x_test: same shapes
    _compile_predict(teacher, len(seeds), ds.x_train)


def _compile_seed_students(seeds):
    ds, cfg, _, student = _seed_problem()
    placeholder = np.zeros((len(seeds), len(ds.y_train), ds.num_classes), np.float32)
    compile_members(student, "kd", ds, cfg, chunk=20, compiler_options=SHORT_RUN_COMPILE,
                    **paired_students(seeds, placeholder, 3.0, 0.7))
    _compile_evaluate(student, 2 * len(seeds), ds.x_train, ds.y_train)


def _compile_demo5_teacher(seeds):
    ds, cfg, teacher, _ = _demo5_problem()
    compile_members(teacher, "ce", ds, cfg, seeds[:1], compiler_options=SHORT_RUN_COMPILE)
    _compile_predict(teacher, 1, ds.x_train)


def _compile_demo5_students(seeds):
    ds, cfg, _, student = _demo5_problem()
    _, member_seeds, hyper = _demo5_members(seeds)
    placeholder = np.zeros((len(ds.y_train), ds.num_classes), np.float32)
    compile_members(student, "kd", ds, cfg, member_seeds, hyper=hyper, teacher_logits=placeholder,
                    compiler_options=SHORT_RUN_COMPILE)
    _compile_evaluate(student, len(member_seeds), ds.x_train, ds.y_train)


def _compile_digits_teachers(seeds, epochs):
    ds, cfg, teacher, _ = _digits_problem(epochs, DIGITS_STUDENT_HIDDEN)
    compile_members(teacher, "ce", ds, cfg, seeds)
    _compile_predict(teacher, len(seeds), ds.x_train)
    _compile_evaluate(teacher, len(seeds), ds.x_test, ds.y_test)


def _compile_digits_students(seeds, epochs):
    ds, cfg, _, student = _digits_problem(epochs, DIGITS_STUDENT_HIDDEN)
    placeholder = np.zeros((len(seeds), len(ds.y_train), ds.num_classes), np.float32)
    compile_members(student, "kd", ds, cfg, **paired_students(seeds, placeholder, 3.0, 0.7))
    _compile_evaluate(student, 2 * len(seeds), ds.x_test, ds.y_test)
