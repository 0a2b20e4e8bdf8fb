"""The ``kdjax`` command: ``demo``, ``distill`` and ``sweep``.

User mistakes (bad arguments, invalid data, out-of-range hyperparameters: a
``UsageError`` here, ``kdjax.errors.InputError``/``InputTypeError`` in the library)
print one line ``kdjax: error: ...`` and exit with status 2; a path the OS refuses
prints its reason and exits 1. Any other exception is a kdjax bug: it keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time

import numpy as np

from kdjax.errors import InputError, InputTypeError

EXIT_USAGE = 2


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        print(f"kdjax: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# ----------------------------------------------------------------------------- output

class Reporter:
    """Rich tables and progress bars; on stderr when ``--json`` owns stdout."""

    def __init__(self, json_mode: bool, quiet: bool):
        from rich.console import Console

        self.console = Console(stderr=json_mode, width=None if sys.stdout.isatty() else 110)
        self.quiet = quiet

    def section(self, title: str):
        self.console.rule(f"[bold]{title}")

    def line(self, text: str):
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def table(self, title: str, columns, rows):
        from rich.table import Table

        t = Table()  # the title on its own line: rich would wrap it to the table's width
        self.console.print(title, style="italic", highlight=False)
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*map(str, r))
        self.console.print(t)

    @contextlib.contextmanager
    def progress(self, label: str, total: int):
        """Yields ``advance(steps_done)``; called between compiled chunks only."""
        if self.quiet or not self.console.is_terminal:
            yield lambda done: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("steps"), TimeElapsedColumn(), console=self.console,
                      transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda done: bar.update(task, completed=done)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / jax arrays and scalars
        return _jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _prepare_out(out: str | None, overwrite: bool) -> str | None:
    if out is None:
        return None
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out: expected a directory, got an existing file {out}")
    if os.path.exists(os.path.join(out, "results.json")) and not overwrite:
        raise UsageError(f"--out: {out} already holds results.json; pass --overwrite to replace it")
    os.makedirs(out, exist_ok=True)
    return out


def _finish(args, rep: Reporter, results: dict, plots: dict) -> int:
    from kdjax.checkpoint import atomic_write_text

    results = _jsonable(results)
    if args.out:
        if not args.no_plots:
            results["plots"] = {k: os.path.basename(fn()) for k, fn in plots.items()}
        atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(results, indent=1))
        rep.line(f"wrote {os.path.join(args.out, 'results.json')}"
                 + ("" if args.no_plots else f" and {len(plots)} plots"))
    if args.json:
        print(json.dumps(results))
    return 0


# ----------------------------------------------------------------------------- demo

def _parse_sections(text: str) -> list[int]:
    out = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise UsageError(f"--sections: expected numbers 1-6 like '1-5' or '1,3,6', got {text!r}")
        out.update(range(lo, hi + 1))
    if not out or min(out) < 1 or max(out) > 6:
        raise UsageError(f"--sections: expected numbers in 1-6, got {text!r}")
    return sorted(out)


def cmd_demo(args, rep: Reporter) -> int:
    from kdjax import demo, plots

    sections = _parse_sections(args.sections)
    if args.seeds < 2:
        raise UsageError(f"--seeds: expected at least 2 (for confidence intervals), got {args.seeds}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    results, figs, t0 = {}, {}, time.perf_counter()
    out = args.out
    epochs = 2 if args.quick else 30
    with demo.CompileAhead(sections, seeds, digits_epochs=epochs):  # compiles while earlier sections train
        if 1 in sections:
            r = results["temperature_effect"] = demo.temperature_effect(rep)
            figs["softmax_temperature"] = lambda: plots.softmax_temperature(
                os.path.join(out, "softmax_temperature.png"), r["logits"], r["temperatures"], r["probs"], r["entropy"])
        if 2 in sections:
            results["soft_vs_hard"] = demo.soft_vs_hard(rep)
        if 3 in sections or 4 in sections:
            r4 = results["seed_comparison"] = demo.seed_comparison(rep, seeds)
            figs["learning_curves"] = lambda: plots.learning_curves(
                os.path.join(out, "learning_curves.png"), r4["losses"],
                f"seed data, {len(seeds)} seeds (distilled: the KD objective, not CE)")
        if 5 in sections:
            r5 = results["hyperparameters"] = demo.hyperparameters(rep, seeds)
            figs["hyperparameters"] = lambda: plots.hyper_sweeps(
                os.path.join(out, "hyperparameters.png"), r5["temperatures"],
                [m for m, _ in r5["temperature_sweep"]], [h for _, h in r5["temperature_sweep"]],
                r5["alphas"], [m for m, _ in r5["alpha_sweep"]], [h for _, h in r5["alpha_sweep"]],
                "training accuracy (random labels)")
        results["seed_demos_seconds"] = time.perf_counter() - t0
        if 6 in sections:
            r6 = results["digits"] = demo.digits_heldout(rep, seeds, epochs=epochs)
            figs["digits_comparison"] = lambda: plots.comparison(
                os.path.join(out, "digits_comparison.png"), ["teacher", "standard", "distilled"],
                [r6["mean_ci"][k][0] for k in ("teacher", "standard", "distilled")],
                [r6["mean_ci"][k][1] for k in ("teacher", "standard", "distilled")],
                r6["paired_gain"], f"digits test accuracy, {len(seeds)} seeds (95% CI)", "test accuracy")
    results["seconds"] = time.perf_counter() - t0
    rep.line(f"demo done in {results['seconds']:.1f} s (sections 1-5: {results['seed_demos_seconds']:.1f} s)")
    return _finish(args, rep, results, figs)


# ----------------------------------------------------------------------------- distill / sweep

def _dataset(name: str, seed: int):
    from kdjax import data

    if name == "synthetic":
        return data.synthetic(500, 50, 5, seed=seed, test_samples=500)
    if name == "digits":
        return data.digits(seed=seed)
    if name.endswith(".npz") or os.path.exists(name):
        return data.load_npz(name)
    raise UsageError(f"--dataset: expected 'synthetic', 'digits' or a path to an .npz file, got {name!r}")


def _run_config(args):
    from kdjax.experiments import RunConfig

    return RunConfig(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
                     learning_rate=args.lr)


def _load_teacher(path: str, teacher, ds):
    """Teacher params from a kdjax checkpoint or a PyTorch state_dict (.pt)."""
    import jax

    from kdjax import checkpoint, convert
    from kdjax.train import create_train_state

    like = create_train_state(teacher, jax.random.PRNGKey(0), ds.input_dim).params
    if not os.path.isfile(path):
        raise UsageError(f"--teacher: expected an existing file, got {path}")
    if path.endswith((".pt", ".pth")):
        try:
            import torch
        except ImportError:
            raise UsageError("--teacher: loading a PyTorch .pt file needs torch; "
                             "pip install torch (or convert it to a kdjax checkpoint first)")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"--teacher: {path}: expected a PyTorch state_dict, got {type(e).__name__}: {e}")
        if not isinstance(state_dict, dict):
            raise UsageError(f"--teacher: {path}: expected a state_dict (dict), got {type(state_dict).__name__}")
        return convert.torch_to_flax(state_dict, like=like)
    tree, _ = checkpoint.load(path)
    params = tree.get("params", tree)
    convert.flax_to_torch(params, like=convert.flax_to_torch(like))  # keys and shapes
    return params


_IDENTITY = ("dataset", "teacher_hidden", "student_hidden", "steps", "epochs", "batch_size", "lr",
             "seeds", "seed", "temperature", "alpha", "temperatures", "alphas", "teacher",
             "checkpoint_every")


def _phase(args, rep, name, model, objective, ds, cfg, seeds, **kw):
    """``fit_members`` with crash-safe checkpoints under ``--out/checkpoints/<name>.ckpt``
    (every ``--checkpoint-every`` steps) and ``--resume`` from the latest good one."""
    from flax import serialization

    from kdjax import checkpoint, sweep
    from kdjax.experiments import fit_members

    out = getattr(args, "out", None)
    path = os.path.join(out, "checkpoints", f"{name}.ckpt") if out else None
    identity = {k: getattr(args, k) for k in _IDENTITY if hasattr(args, k)}
    start = None
    if getattr(args, "resume", False) and path:
        try:
            tree, meta, used, problem = checkpoint.load_latest(path)
        except FileNotFoundError:
            tree = None
        if tree is not None:
            if problem:
                rep.line(f"warning: {problem}; resuming from {used}")
            if meta.get("config") != identity:
                raise UsageError(f"--resume: {used} was written by a run with a different config "
                                 f"({meta.get('config')}); use the same arguments or a new --out")
            fresh = sweep.init_members(model, sweep.member_keys(seeds)["init"], ds.input_dim,
                                       cfg.learning_rate)
            start = (serialization.from_state_dict(fresh, tree["states"]), np.asarray(tree["losses"]))
            rep.line(f"{name}: resuming at step {start[1].shape[1]} from {used}")

    def save(done, states, losses):
        checkpoint.save_rotating(path, {"states": states, "losses": losses},
                                 {"config": identity, "phase": name, "done": done})

    with rep.progress(name, _total_steps(cfg, ds)) as advance:
        return fit_members(model, objective, ds, cfg, seeds, chunk=getattr(args, "checkpoint_every", None),
                           start=start, on_checkpoint=save if path else None,
                           on_chunk=lambda d, t, s: advance(d), **kw)


def _teachers(args, rep, teacher, ds, cfg, seeds):
    """Per-seed teachers trained here, or one loaded teacher: (logits, params of seed 0)."""
    import jax

    from kdjax.experiments import teacher_logits_for

    if args.teacher:
        params = _load_teacher(args.teacher, teacher, ds)
        rep.line(f"teacher loaded from {args.teacher}")
        return teacher_logits_for(teacher, params, ds), params
    states, _ = _phase(args, rep, "teachers", teacher, "ce", ds, cfg, seeds)
    return (teacher_logits_for(teacher, states.params, ds, members=True),
            jax.tree_util.tree_map(lambda a: a[0], states.params))


def _total_steps(cfg, ds) -> int:
    return cfg.steps if cfg.epochs is None else (len(ds.y_train) // cfg.batch_size) * cfg.epochs


def _check_resume(args) -> None:
    if args.resume and not args.out:
        raise UsageError("--resume: expected --out DIR (where the checkpoints are), got none")


def cmd_distill(args, rep: Reporter) -> int:
    import jax

    from kdjax import checkpoint, plots
    from kdjax.experiments import evaluate_on, mean_ci, paired_students
    from kdjax.losses import check_alpha, check_temperature
    from kdjax.models import StudentMLP, TeacherMLP

    _check_resume(args)
    check_temperature(args.temperature)  # before anything is trained
    check_alpha(args.alpha)
    ds = _dataset(args.dataset, args.seed)
    cfg = _run_config(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    n = len(seeds)
    teacher = TeacherMLP(args.teacher_hidden, ds.num_classes)
    student = StudentMLP(args.student_hidden, ds.num_classes)
    rep.line(f"{ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} test, {ds.input_dim} features, "
             f"{ds.num_classes} classes; {cfg.describe()}; T = {args.temperature:g}, "
             f"alpha = {args.alpha:g}; {args.seeds} seed(s)")
    logits, t_params = _teachers(args, rep, teacher, ds, cfg, seeds)
    # standard (members :n) and distilled (n:) students, one program; pairs share a seed
    pairs = paired_students(seeds, logits, args.temperature, args.alpha)
    st_states, st_losses = _phase(args, rep, "students", student, "kd", ds, cfg, pairs.pop("seeds"), **pairs)
    s_params = jax.tree_util.tree_map(lambda a: a[:n], st_states.params)
    d_params = jax.tree_util.tree_map(lambda a: a[n:], st_states.params)
    s_losses, d_losses = st_losses[:n], st_losses[n:]
    t_acc = evaluate_on(teacher, t_params, ds.x_test, ds.y_test)["accuracy"]
    s_acc = evaluate_on(student, st_states.params, ds.x_test, ds.y_test, members=True)["accuracy"]
    acc = {"standard": s_acc[:n], "distilled": s_acc[n:]}
    stats = {k: mean_ci(v) for k, v in acc.items()}
    gain = mean_ci(acc["distilled"] - acc["standard"])
    rep.table("test accuracy (mean ± 95% CI over seeds)", ["model", "test accuracy"],
              [["teacher (seed 0 / loaded)", f"{float(t_acc):.4f}"]]
              + [[k, f"{m:.4f} ± {h:.4f}"] for k, (m, h) in stats.items()]
              + [["distilled - standard (paired)", f"{gain[0]:+.4f} ± {gain[1]:.4f}"]])
    results = {"dataset": ds.name, "config": vars(args) | {"func": None},
               "teacher_test_accuracy": float(t_acc),
               "test_accuracy": {k: v.tolist() for k, v in acc.items()}, "mean_ci": stats,
               "paired_gain": gain, "losses": {"standard": s_losses, "distilled": d_losses}}
    if args.out:
        take0 = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)
        meta = {"dataset": ds.name, "input_dim": ds.input_dim, "num_classes": ds.num_classes}
        checkpoint.save(os.path.join(args.out, "teacher.ckpt"), {"params": t_params},
                        meta | {"model": "TeacherMLP", "hidden_dim": args.teacher_hidden})
        checkpoint.save(os.path.join(args.out, "student_distilled.ckpt"), {"params": take0(d_params)},
                        meta | {"model": "StudentMLP", "hidden_dim": args.student_hidden, "seed": seeds[0]})
        checkpoint.save(os.path.join(args.out, "student_standard.ckpt"), {"params": take0(s_params)},
                        meta | {"model": "StudentMLP", "hidden_dim": args.student_hidden, "seed": seeds[0]})
    figs = {
        "learning_curves": lambda: plots.learning_curves(
            os.path.join(args.out, "learning_curves.png"), {"standard": s_losses, "distilled": d_losses},
            f"{ds.name}: student training loss"),
        "comparison": lambda: plots.comparison(
            os.path.join(args.out, "comparison.png"), ["teacher", "standard", "distilled"],
            [float(t_acc), stats["standard"][0], stats["distilled"][0]],
            [0.0, stats["standard"][1], stats["distilled"][1]], gain,
            f"{ds.name}: test accuracy", "test accuracy"),
    }
    return _finish(args, rep, results, figs)


def cmd_sweep(args, rep: Reporter) -> int:
    from kdjax import plots, sweep
    from kdjax.experiments import evaluate_on, mean_ci
    from kdjax.models import StudentMLP, TeacherMLP
    from kdjax.train import make_hyper

    _check_resume(args)
    ds = _dataset(args.dataset, args.seed)
    cfg = _run_config(args)
    temps, alphas = list(args.temperatures), list(args.alphas)
    seeds = list(range(args.seed, args.seed + args.seeds))
    T, A, S = sweep.grid(temps, alphas, seeds)
    hyper = make_hyper(T, A)  # validates every value before anything is compiled
    teacher = TeacherMLP(args.teacher_hidden, ds.num_classes)
    student = StudentMLP(args.student_hidden, ds.num_classes)
    rep.line(f"{ds.name}: {len(T)} students ({len(temps)} temperatures x {len(alphas)} alphas x "
             f"{len(seeds)} seeds) as one compiled program; {cfg.describe()}")
    # one teacher (the first seed) for the whole grid; both phases checkpoint under --out
    logits, _ = _teachers(argparse.Namespace(**{**vars(args), "seeds": 1}), rep, teacher, ds,
                          cfg, seeds[:1])
    if logits.ndim == 3:
        logits = logits[0]
    states, _ = _phase(args, rep, "students", student, "kd", ds, cfg, S, hyper=hyper,
                       teacher_logits=logits)
    acc = evaluate_on(student, states.params, ds.x_test, ds.y_test, members=True)["accuracy"]
    acc = acc.reshape(len(temps), len(alphas), len(seeds))
    stats = [[mean_ci(acc[i, j]) for j in range(len(alphas))] for i in range(len(temps))]
    rep.table("mean test accuracy ± 95% CI (rows: temperature, columns: alpha)",
              ["T \\ alpha"] + [f"{a:g}" for a in alphas],
              [[f"{t:g}"] + [f"{m:.3f} ± {h:.3f}" for m, h in row] for t, row in zip(temps, stats)])
    best = max(((i, j) for i in range(len(temps)) for j in range(len(alphas))),
               key=lambda ij: stats[ij[0]][ij[1]][0])
    rep.line(f"best: T = {temps[best[0]]:g}, alpha = {alphas[best[1]]:g} "
             f"({stats[best[0]][best[1]][0]:.4f})")
    means = np.array([[m for m, _ in row] for row in stats])
    results = {"dataset": ds.name, "config": vars(args) | {"func": None}, "temperatures": temps,
               "alphas": alphas, "seeds": seeds, "test_accuracy": acc.tolist(),
               "mean_ci": stats, "best": {"temperature": temps[best[0]], "alpha": alphas[best[1]]}}
    figs = {"heatmap": lambda: plots.heatmap(os.path.join(args.out, "sweep_heatmap.png"), temps, alphas,
                                             means, f"{ds.name}: {len(seeds)} seed(s) per cell")}
    return _finish(args, rep, results, figs)


# ----------------------------------------------------------------------------- parser

def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _common_output(p):
    p.add_argument("--out", default=None, help="directory for results.json, plots (and checkpoints)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--json", action="store_true", help="machine-readable results on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _training_args(p, seeds_default: int):
    p.add_argument("--dataset", default="synthetic", help="synthetic, digits, or PATH.npz "
                   "(x_train, y_train, x_test, y_test)")
    p.add_argument("--teacher-hidden", type=_positive_int, default=256)
    p.add_argument("--student-hidden", type=_positive_int, default=64)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=100,
                        help="the seed's 'epochs': one random minibatch per step (default 100)")
    length.add_argument("--epochs", type=_positive_int, default=None, help="real shuffled passes instead")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=_positive_int, default=seeds_default, help="number of seeds")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--teacher", default=None,
                   help="load the teacher: a kdjax checkpoint, or a PyTorch state_dict .pt (needs torch)")


def _resumable(p):
    p.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="K",
                   help="with --out: checkpoint every K steps (default: every ~5%% of the run)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the checkpoints in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdjax", description="Knowledge distillation in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="the seed's five demos, then held-out distillation on digits")
    demo.add_argument("--seeds", type=int, default=8, help="seeds for the multi-seed comparisons (>= 2)")
    demo.add_argument("--seed", type=int, default=42, help="first seed")
    demo.add_argument("--sections", default="1-6", help="which sections to run, e.g. 1-5 or 1,6")
    demo.add_argument("--quick", action="store_true", help="2 digits epochs instead of 30 (smoke tests)")
    _common_output(demo)
    demo.set_defaults(func=cmd_demo)

    distill = sub.add_parser("distill", help="teacher, standard and distilled student on a data set")
    _training_args(distill, seeds_default=4)
    distill.add_argument("--temperature", type=float, default=3.0)
    distill.add_argument("--alpha", type=float, default=0.7)
    _resumable(distill)
    _common_output(distill)
    distill.set_defaults(func=cmd_distill)

    sw = sub.add_parser("sweep", help="temperatures x alphas x seeds as one compiled program")
    _training_args(sw, seeds_default=2)
    sw.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    sw.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
    _resumable(sw)
    _common_output(sw)
    sw.set_defaults(func=cmd_sweep)
    return parser


def _enable_compile_cache() -> None:
    """Persist compiled programs across runs (``$KDJAX_CACHE_DIR``, default
    ``~/.cache/kdjax/xla``; ``KDJAX_CACHE_DIR=off`` disables). A cold run compiles every
    program once (about 0.5-1 s each on CPU); later runs load them from disk."""
    import jax

    path = os.environ.get("KDJAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "kdjax", "xla"))
    if path.lower() in ("", "0", "off", "none"):
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return  # an unwritable home: run without the cache
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _settle_imports() -> None:
    """Import JAX, Flax and optax, then hide the ~120k objects they allocate from the
    garbage collector (``gc.freeze``). Tracing creates many short-lived objects, and
    every full collection would otherwise re-scan all of them: ~0.5 s of a demo run."""
    import kdjax.experiments  # noqa: F401  (jax, flax, optax)

    gc.freeze()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _enable_compile_cache()
    _settle_imports()
    try:
        args.out = _prepare_out(args.out, args.overwrite)
        rep = Reporter(json_mode=args.json, quiet=args.quiet)
        return args.func(args, rep)
    except (UsageError, InputError, InputTypeError) as e:
        print(f"kdjax: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a path we cannot read or write: the OS's reason, in one line
        print(f"kdjax: error: {e}", file=sys.stderr)
        return 1
    # anything else is a bug in kdjax: it keeps its traceback
