"""``kdjax demo``: the reference script's five demos, then distillation on real data.

Each section prints through a ``Reporter`` (see ``kdjax.cli``) and returns a plain
dict for ``results.json``. Sections 3-4 and 6 run ``kdjax.workflows.distill`` (one
vmapped program for the teachers, one for the standard and distilled students, a
pair sharing its seed); section 5 runs ``kdjax.workflows.run_sweep``; section 7
``omit_class`` (Hinton et al.'s omitted digit), section 8 ``tuned_distill`` (T and
alpha chosen on a validation split).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import data, hinton, workflows
from kdjax.fitting import RunConfig, evaluate_on
from kdjax.stats import mean_ci
from kdjax.models import StudentMLP, TeacherMLP
from kdjax.app.reporting import fmt_ci, verdict

SEED_LOGITS = (2.0, 1.0, 0.5, 0.2)
SEED_TEMPERATURES = (1.0, 2.0, 5.0, 10.0)
SEED_TEACHER_ROWS = ((3.0, 1.5, 0.8, 0.5), (2.0, 1.8, 1.5, 1.0))
DEMO5_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
DEMO5_ALPHAS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)
DIGITS_STUDENT_HIDDEN = 16


def _member_param_count(batched_params) -> int:
    """Parameters of one member of a batched params tree (from shapes; no device work)."""
    return sum(int(np.prod(a.shape[1:])) for a in jax.tree_util.tree_leaves(batched_params))


@jax.jit
def _softened(logits, temperatures):
    """softmax(z / T) and the reference script's entropy -sum p log(p + 1e-10): ``[rows, T, C]``, ``[rows, T]``."""
    p = jax.nn.softmax(logits[:, None, :] / temperatures[None, :, None], axis=-1)
    return p, -jnp.sum(p * jnp.log(p + 1e-10), axis=-1)


def _soft_table():
    """Demos 1 and 2 in one small program: every row at every temperature either uses."""
    rows = np.asarray((SEED_LOGITS, *SEED_TEACHER_ROWS), np.float32)
    temps = np.asarray((*SEED_TEMPERATURES, 3.0), np.float32)
    return tuple(np.asarray(a) for a in _softened(rows, temps))




def temperature_effect(rep) -> dict:
    """Demo 1: softmax(z / T) and its entropy -sum p log(p + 1e-10), as in the reference script."""
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
    """The reference script's progress lines for member 0: minibatch loss and training accuracy."""
    for k, acc in enumerate(accs):
        step = 20 * (k + 1)
        rep.line(f"  {name} step {step:3d}: loss = {losses[step - 1]:.4f}, train acc = {acc:.4f}")


def seed_comparison(rep, seeds, programs=None) -> dict:
    """Demos 3 and 4 on the reference script's data: teacher, standard student, distilled student."""
    ds, cfg = data.synthetic(500, 50, 5, seed=42, test_samples=500), RunConfig(steps=100, batch_size=64)
    teacher, student = TeacherMLP(256, 5), StudentMLP(64, 5)
    models, accs = {"teachers": teacher, "students": student}, {"teachers": [], "students": []}

    with rep.progress() as bar:
        def on_chunk(phase, done, total, states):  # the reference script's training accuracy every 20 steps
            accs[phase].append(evaluate_on(models[phase], states, ds.x_train, ds.y_train, members=True)["accuracy"])
            bar(phase, done, total)

        r = workflows.distill(teacher, student, ds, cfg, seeds, temperature=3.0, alpha=0.7,
                              splits=("train", "test"), chunk=20, on_chunk=on_chunk, programs=programs)
    t_accs, st_accs = (np.stack(accs[k], axis=1) for k in ("teachers", "students"))  # [members, chunks]
    n = len(seeds)
    n_t, n_s = _member_param_count(r.teacher.params), _member_param_count(r.students.params)

    rep.section("DEMO 3: Basic knowledge distillation — the teacher")
    rep.line(f"The reference script's data: {len(ds.y_train)} examples x {ds.input_dim} features, {ds.num_classes} "
             f"random labels; {cfg.describe()}.")
    rep.line(f"Teacher parameters: {n_t:,}")
    _log_every_20(rep, "teacher", r.teacher_losses[0], t_accs[0])
    rep.line(f"Teacher final training accuracy (seed {seeds[0]}): {t_accs[0, -1]:.4f}")

    rep.section("DEMO 4: Student training comparison (T = 3, alpha = 0.7)")
    rep.line(f"Student parameters: {n_s:,}; compression ratio {n_t / n_s:.2f}x")
    _log_every_20(rep, "standard ", r.losses["standard"][0], st_accs[0])
    _log_every_20(rep, "distilled", r.losses["distilled"][0], st_accs[n])
    acc = {name: {split: r.accuracy[split][name] for split in ("train", "test")}
           for name in ("teacher", "standard", "distilled")}
    a0 = {k: float(v["train"][0]) for k, v in acc.items()}
    rep.table(f"the reference script's single run (seed {seeds[0]}), training accuracy", ["model", "accuracy"],
              [["teacher", f"{a0['teacher']:.4f}"], ["student (standard)", f"{a0['standard']:.4f}"],
               ["student (distilled)", f"{a0['distilled']:.4f}"],
               ["improvement from distillation", f"{a0['distilled'] - a0['standard']:+.4f}"]])
    stats = {name: {split: r.mean_ci[split][name] for split in ("train", "test")} for name in acc}
    gain = r.paired_gain
    rows = [[name, fmt_ci(stats[name]["train"]), fmt_ci(stats[name]["test"])] for name in acc]
    rows.append(["distilled - standard (paired)", fmt_ci(gain["train"]), fmt_ci(gain["test"])])
    rep.table(f"over n = {len(seeds)} seeds (teachers one vmapped program, students another): mean ± 95% CI",
              ["model", "train accuracy", "held-out accuracy"], rows)
    rep.line("The reference script's labels are random: held-out accuracy is chance (0.2) for every model; "
             "training accuracy measures memorisation of 500 random labels, not learning.")
    return {
        "param_counts": {"teacher": n_t, "student": n_s, "compression": n_t / n_s},
        "config": {"steps": cfg.steps, "batch_size": cfg.batch_size, "temperature": 3.0,
                   "alpha": 0.7, "seeds": list(map(int, seeds))},
        "single_run": a0,
        "accuracy": {n: {s: v.tolist() for s, v in d.items()} for n, d in acc.items()},
        "mean_ci": stats, "paired_gain": gain,
        "losses": {"teacher": r.teacher_losses, **r.losses},
    }


def hyperparameters(rep, seeds, programs=None) -> dict:
    """Demo 5: temperature sweep (alpha 0.7) and alpha sweep (T 3) on the reference script's demo-5 data."""
    rep.section("DEMO 5: the reference script's temperature and alpha sweeps (one teacher; both sweeps x seeds as one program)")
    rep.line("As in the reference script, this ranks settings by TRAINING accuracy on random labels: how many of 400 random "
             "labels a student memorises, not how well it generalises (section 8 chooses T and alpha on "
             "validation data).")
    ds, cfg = data.synthetic(400, 40, 4, seed=42, test_samples=400), RunConfig(steps=80, batch_size=64)
    configs = [(T, 0.7) for T in DEMO5_TEMPERATURES] + [(3.0, a) for a in DEMO5_ALPHAS]
    temps = np.repeat([c[0] for c in configs], len(seeds))
    alphas = np.repeat([c[1] for c in configs], len(seeds))
    member_seeds = np.tile(seeds, len(configs))  # a seed's students share init and minibatches
    # as in the reference script: one teacher, then a student per configuration (here x seeds)
    with rep.progress() as bar:
        r = workflows.run_sweep(TeacherMLP(200, 4), StudentMLP(50, 4), ds, cfg, temps, alphas, member_seeds,
                                teacher_seed=seeds[0], split="train", on_chunk=bar, programs=programs)
    acc = r.accuracy.reshape(len(configs), len(seeds))
    stats = [mean_ci(a) for a in acc]
    nT = len(DEMO5_TEMPERATURES)
    rep.table(f"temperature (alpha = 0.7), training accuracy over n = {len(seeds)} seeds",
              ["T", "mean ± 95% CI"], [[f"{T:g}", fmt_ci(s)] for T, s in zip(DEMO5_TEMPERATURES, stats[:nT])])
    rep.table(f"alpha (T = 3), training accuracy over n = {len(seeds)} seeds",
              ["alpha", "mean ± 95% CI"], [[f"{a:g}", fmt_ci(s)] for a, s in zip(DEMO5_ALPHAS, stats[nT:])])
    return {"temperatures": list(DEMO5_TEMPERATURES), "alphas": list(DEMO5_ALPHAS),
            "temperature_sweep": stats[:nT], "alpha_sweep": stats[nT:],
            "accuracy": acc.tolist(), "config": {"steps": cfg.steps, "batch_size": cfg.batch_size}}


def digits_heldout(rep, seeds, epochs: int = 30, student_hidden: int = DIGITS_STUDENT_HIDDEN,
                   temperature: float = 3.0, alpha: float = 0.7, programs=None) -> dict:
    """Beyond the reference script: held-out test accuracy on scikit-learn's digits."""
    rep.section("HELD-OUT: distillation on real data (scikit-learn digits, 8x8 images)")
    ds, cfg = data.digits(), RunConfig(epochs=epochs, batch_size=64)
    teacher, student = TeacherMLP(256, 10), StudentMLP(student_hidden, 10)
    rep.line(f"{len(ds.y_train)} train / {len(ds.y_test)} test images, 10 classes; {cfg.describe()}; "
             f"teacher {teacher.hidden_dim}-wide with dropout 0.3, student {student_hidden}-wide; "
             f"T = {temperature:g}, alpha = {alpha:g}; {len(seeds)} seeds.")
    with rep.progress() as bar:
        r = workflows.distill(teacher, student, ds, cfg, seeds, temperature=temperature, alpha=alpha,
                              on_chunk=bar, programs=programs)
    acc, stats, gain = r.accuracy["test"], r.mean_ci["test"], r.paired_gain["test"]
    rows = [[k, fmt_ci(v)] for k, v in stats.items()]
    rows.append(["distilled - standard (paired)", fmt_ci(gain, signed=True)])
    rep.table(f"test accuracy, mean ± 95% CI over n = {len(seeds)} seeds", ["model", "test accuracy"], rows)
    lo, hi = gain[0] - gain[1], gain[0] + gain[1]
    said = verdict(gain)
    rep.line(f"Paired gain of distillation: {gain[0]:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}] -> {said}.")
    return {"config": {"epochs": epochs, "batch_size": cfg.batch_size, "student_hidden": student_hidden,
                       "temperature": temperature, "alpha": alpha, "seeds": list(map(int, seeds))},
            "test_accuracy": {k: v.tolist() for k, v in acc.items()}, "mean_ci": stats,
            "paired_gain": gain, "verdict": said,
            "losses": {"teacher": r.teacher_losses, **r.losses}}


# Hinton, Vinyals & Dean (2015), section 3, on MNIST (10,000 test images, 1,010 threes):
# the distilled net trained without 3s, before and after raising the 3's bias by 3.5
# (a shift the paper chose on the test set).
PAPER_OMITTED = {"test_images": 10000, "omitted_in_test": 1010, "bias_shift": 3.5, "temperature": 20.0,
                 "before": {"errors": 206, "errors_omitted": 133}, "after": {"errors": 109, "errors_omitted": 14}}
OMIT_STUDENT_HIDDEN = 64
TUNE_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
TUNE_ALPHAS = (0.25, 0.5, 0.75, 1.0)


def _paper_accuracy(when: str) -> dict:
    p = PAPER_OMITTED
    return {"omitted": 1 - p[when]["errors_omitted"] / p["omitted_in_test"],
            "overall": 1 - p[when]["errors"] / p["test_images"]}


def omitted_class(rep, seeds, epochs: int = 30, omit: int = 3, temperature: float = 20.0, alpha: float = 0.9,
                  teacher_hidden: int = 256, student_hidden: int = OMIT_STUDENT_HIDDEN, validation_fraction: float = 0.2,
                  ds: data.Dataset | None = None, programs=None) -> dict:
    """Hinton et al.'s omitted-class experiment: students that never see one digit."""
    rep.section(f"OMITTED CLASS: the student never sees a {omit} (Hinton et al. 2015, section 3)")
    ds = data.digits() if ds is None else ds
    cfg = RunConfig(epochs=epochs, batch_size=64)
    teacher, student = TeacherMLP(teacher_hidden, ds.num_classes), StudentMLP(student_hidden, ds.num_classes)
    with rep.progress() as bar:
        r = hinton.omit_class(teacher, student, ds, cfg, seeds, omit=omit, temperature=temperature,
                              alpha=alpha, validation_fraction=validation_fraction, on_chunk=bar, programs=programs)
    c = r.test_counts
    rep.line(f"{ds.name}: teacher trained on {c['teacher']} examples of all classes; students on the transfer set of {c['transfer']} without class {omit}; "
             f"{c['validation']} validation inputs (labels unused) set the bias; {c['overall']} test images, "
             f"{c['omitted']} of class {omit}. Teacher {teacher.hidden_dim}-wide, students {student_hidden}-wide; "
             f"{cfg.describe()}; T = {temperature:g}, alpha = {alpha:g}; {len(seeds)} seeds.")
    rows = []
    for when in ("before", "after"):
        for m in ("teacher", "standard", "distilled"):
            if m == "teacher" and when == "after":
                continue
            s, e = r.mean_ci[when][m], r.errors[when][m]
            label = m if m == "teacher" else f"{m}, {'raw' if when == 'before' else 'bias matched'}"
            rows.append([label, fmt_ci(s["omitted"]), fmt_ci(s["overall"]),
                         f"{np.mean(e['omitted']):.1f} / {np.mean(e['overall']):.1f}"])
    for when in ("before", "after"):
        g = r.paired_gain[when]
        rows.append([f"distilled - standard ({'raw' if when == 'before' else 'bias matched'})",
                     fmt_ci(g["omitted"], signed=True), fmt_ci(g["overall"], signed=True), ""])
    for when in ("before", "after"):
        pa, pe = _paper_accuracy(when), PAPER_OMITTED[when]
        rows.append([f"paper, distilled {'raw' if when == 'before' else '+3.5 bias (test-tuned)'}",
                     f"{pa['omitted']:.4f}", f"{pa['overall']:.4f}", f"{pe['errors_omitted']} / {pe['errors']}"])
    rep.table(f"test accuracy on class {omit} and overall, mean ± 95% CI over n = {len(seeds)} seeds",
              ["model", f"class {omit}", "overall", f"errors on {omit} / all"], rows)
    b = {k: float(np.mean(v)) for k, v in r.bias.items()}
    rep.line(f"Bias shift matched to the class prior {r.prior:.3f} on validation inputs: standard "
             f"{b['standard']:+.2f}, distilled {b['distilled']:+.2f} (mean; the paper added 3.5 by hand).")
    raw = r.paired_gain["before"]["omitted"]
    rep.line(f"A standard student never predicts a {omit} (its accuracy there is 0 by construction); the "
             f"distilled one learns the class from soft targets on the other digits alone: "
             f"{fmt_ci(raw, signed=True)} on class {omit} before any adjustment.")
    as_list = lambda tree: {w: {m: {k: np.asarray(v).tolist() for k, v in d.items()} for m, d in a.items()}
                            for w, a in tree.items()}
    return {"config": {"omit": omit, "epochs": epochs, "batch_size": cfg.batch_size, "temperature": temperature,
                       "alpha": alpha, "teacher_hidden": teacher.hidden_dim, "student_hidden": student_hidden,
                       "validation_fraction": validation_fraction, "seeds": list(map(int, seeds)),
                       "bias": "matched to the class prior on validation inputs (labels unused)"},
            "counts": c, "prior": r.prior, "bias": {k: v.tolist() for k, v in r.bias.items()},
            "accuracy": as_list(r.accuracy), "errors": as_list(r.errors), "mean_ci": r.mean_ci,
            "paired_gain": r.paired_gain,
            "paper": PAPER_OMITTED | {"accuracy": {w: _paper_accuracy(w) for w in ("before", "after")}}}


def tuned_digits(rep, seeds, epochs: int = 30, student_hidden: int = DIGITS_STUDENT_HIDDEN,
                 untuned: dict | None = None, validation_fraction: float = 0.2, programs=None) -> dict:
    """Choose T and alpha on a validation split, then the held-out comparison at them."""
    rep.section("TUNED: T and alpha chosen on validation data (digits)")
    ds, cfg = data.digits(), RunConfig(epochs=epochs, batch_size=64)
    teacher, student = TeacherMLP(256, 10), StudentMLP(student_hidden, 10)
    with rep.progress() as bar:
        t = workflows.tuned_distill(teacher, student, ds, cfg, seeds, temperatures=TUNE_TEMPERATURES,
                                    alphas=TUNE_ALPHAS, validation_fraction=validation_fraction, on_chunk=bar,
                                    programs=programs)
    rep.table(f"validation accuracy (a {validation_fraction:g} split of the training rows), mean ± 95% CI "
              f"over n = {len(seeds)} seeds; rows T, columns alpha",
              ["T \\ alpha"] + [f"{a:g}" for a in t.alphas],
              [[f"{T:g}"] + [fmt_ci(c) for c in row] for T, row in zip(t.temperatures, t.validation_mean_ci)])
    r, (bT, bA) = t.result, t.best
    rows = [[k, fmt_ci(v)] for k, v in r.mean_ci["test"].items()]
    gain = r.paired_gain["test"]
    rows.append([f"distilled - standard, tuned (T = {bT:g}, alpha = {bA:g})", fmt_ci(gain, signed=True)])
    if untuned is not None:
        ug, uc = untuned["paired_gain"], untuned["config"]
        rows.append([f"distilled - standard, untuned (T = {uc['temperature']:g}, alpha = {uc['alpha']:g})",
                     fmt_ci(ug, signed=True)])
    rep.table(f"test accuracy at the chosen T and alpha (students retrained on all training rows), mean ± 95% "
              f"CI over n = {len(seeds)} seeds",
              ["model", "test accuracy"], rows)
    lo, hi = gain[0] - gain[1], gain[0] + gain[1]
    said = verdict(gain)
    rep.line(f"Tuned paired gain {gain[0]:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}] -> {said}.")
    return {"config": {"epochs": epochs, "batch_size": cfg.batch_size, "student_hidden": student_hidden,
                       "temperatures": t.temperatures, "alphas": t.alphas, "seeds": list(map(int, seeds)),
                       "validation_fraction": validation_fraction},
            "validation_accuracy": t.validation.tolist(), "validation_mean_ci": t.validation_mean_ci,
            "best": {"temperature": bT, "alpha": bA},
            "test_accuracy": {k: v.tolist() for k, v in r.accuracy["test"].items()},
            "mean_ci": r.mean_ci["test"], "paired_gain": gain, "verdict": said,
            "untuned_paired_gain": None if untuned is None else untuned["paired_gain"]}


def conclusion(results: dict) -> list[str]:
    """What the sections that ran showed, one line each, from their results."""
    lines = []
    if "temperature_effect" in results:
        e = results["temperature_effect"]["entropy"]
        lines.append(f"1-2. Temperature softens the teacher: the entropy of the reference script's logits grows from {e[0]:.2f} "
                     f"(T = 1) to {e[-1]:.2f} nats (T = 10), exposing what it knows about the other classes.")
    if "seed_comparison" in results:
        s = results["seed_comparison"]
        lines.append(f"3-4. On the reference script's random labels nothing generalises (held-out accuracy "
                     f"{s['mean_ci']['teacher']['test'][0]:.3f} for the teacher, chance 0.2); the distilled student "
                     f"memorises {-s['paired_gain']['train'][0]:.3f} fewer training labels than the standard one "
                     f"({verdict(s['paired_gain']['train'])} on training accuracy).")
    if "hyperparameters" in results:
        h = results["hyperparameters"]
        best_t = h["temperatures"][max(range(len(h["temperatures"])), key=lambda i: h["temperature_sweep"][i][0])]
        lines.append(f"5. The sweeps rank memorisation of random labels, not generalisation: T = {best_t:g} "
                     f"memorises most; it says nothing about held-out data.")
    if "digits" in results:
        d = results["digits"]
        lines.append(f"6. On held-out digits at the reference script's T = 3 / alpha = 0.7 the distilled "
                     f"{d['config']['student_hidden']}-unit student scores "
                     f"{d['paired_gain'][0]:+.4f} ± {d['paired_gain'][1]:.4f} against the standard one: "
                     f"{d['verdict']}.")
    if "omitted_class" in results:
        o = results["omitted_class"]["mean_ci"]
        k = results["omitted_class"]["config"]["omit"]
        shown = verdict(results["omitted_class"]["paired_gain"]["before"]["omitted"]) == "distillation helped"
        lines.append(f"7. A student that never saw a {k} recognises {o['before']['distilled']['omitted'][0]:.0%} of the "
                     f"test {k}s from soft targets alone ({o['after']['distilled']['omitted'][0]:.0%} with its bias "
                     f"matched to the class prior); the standard student {o['before']['standard']['omitted'][0]:.0%} "
                     f"and {o['after']['standard']['omitted'][0]:.0%}: "
                     + ("Hinton et al.'s mechanism reproduces." if shown else
                        "the mechanism does not show at this budget (no significant gain on the omitted class)."))
    if "tuned" in results:
        t = results["tuned"]
        lines.append(f"8. T and alpha chosen on validation data (T = {t['best']['temperature']:g}, alpha = "
                     f"{t['best']['alpha']:g}): paired gain {t['paired_gain'][0]:+.4f} ± {t['paired_gain'][1]:.4f}, "
                     f"{t['verdict']}.")
    return lines
