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
import dataclasses
import gc
import json
import os
import shutil
import sys
import time

import numpy as np

from kdjax.errors import InputError, InputTypeError
from kdjax.reporting import fmt_ci

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
    def progress(self):
        """Yields ``on_chunk(phase, done, total, states)``: one bar per phase, moved
        between compiled chunks only."""
        if self.quiet or not self.console.is_terminal:
            yield lambda *args: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("steps"), TimeElapsedColumn(), console=self.console,
                      transient=True) as bar:
            tasks = {}

            def update(phase, done, total, states=None):
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total)
                bar.update(tasks[phase], completed=done)

            yield update


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


# What kdjax writes into --out; --overwrite removes exactly these, nothing else of the user's.
_OUTPUTS = ("results.json", "checkpoints", "teacher.ckpt", "student_distilled.ckpt", "student_standard.ckpt",
            "softmax_temperature.png", "learning_curves.png", "hyperparameters.png", "digits_comparison.png",
            "omitted_class.png", "tuned_comparison.png", "comparison.png", "sweep_heatmap.png")


def _check_out(args) -> None:
    """Refuse an --out that this run would damage, before anything is computed or written."""
    out = args.out
    if out is None:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out: expected a directory, got an existing file {out}")
    resume, overwrite = getattr(args, "resume", False), args.overwrite
    if resume and overwrite:
        raise UsageError("--resume / --overwrite: expected one of them (continue the run in --out, or replace it)")
    if os.path.exists(os.path.join(out, "results.json")) and not overwrite:
        raise UsageError(f"--out: {out} already holds results.json; pass --overwrite to replace it")
    if os.path.isdir(os.path.join(out, "checkpoints")) and not (resume or overwrite):
        raise UsageError(f"--out: {out} holds the checkpoints of an unfinished run; pass --resume to continue "
                         f"it or --overwrite to start over")


def _claim_out(args) -> None:
    """Once every input is accepted: clear the old run (--overwrite) and create --out."""
    if args.out is None:
        return
    if args.overwrite:
        for name in _OUTPUTS:
            path = os.path.join(args.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        for name in os.listdir(args.out) if os.path.isdir(args.out) else ():
            if name.startswith(".tmp-"):  # a write a kill interrupted (checkpoint.atomic_write_bytes)
                os.remove(os.path.join(args.out, name))
    os.makedirs(args.out, exist_ok=True)


def _finish(args, rep: Reporter, results: dict, plots: dict) -> int:
    import jax

    from kdjax.checkpoint import atomic_write_text

    if jax.process_index() != 0:  # on many hosts, process 0 reports
        return 0
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
            raise UsageError(f"--sections: expected numbers 1-8 like '1-5' or '1,3,6', got {text!r}")
        out.update(range(lo, hi + 1))
    if not out or min(out) < 1 or max(out) > 8:
        raise UsageError(f"--sections: expected numbers in 1-8, got {text!r}")
    return sorted(out)


def cmd_demo(args, rep: Reporter) -> int:
    from kdjax import demo, plots

    sections = _parse_sections(args.sections)
    if args.seeds < 2:
        raise UsageError(f"--seeds: expected at least 2 (for confidence intervals), got {args.seeds}")
    _claim_out(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    results, figs, t0 = {}, {}, time.perf_counter()
    out = args.out
    epochs = 2 if args.quick else 30
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
    if 7 in sections:
        r7 = results["omitted_class"] = demo.omitted_class(rep, seeds, epochs=epochs)
        figs["omitted_class"] = lambda: _omitted_plot(os.path.join(out, "omitted_class.png"), r7, len(seeds))
    if 8 in sections:
        r8 = results["tuned"] = demo.tuned_digits(rep, seeds, epochs=epochs, untuned=results.get("digits"))
        figs["tuned_comparison"] = lambda: plots.comparison(
            os.path.join(out, "tuned_comparison.png"), ["teacher", "standard", "distilled"],
            [r8["mean_ci"][k][0] for k in ("teacher", "standard", "distilled")],
            [r8["mean_ci"][k][1] for k in ("teacher", "standard", "distilled")], r8["paired_gain"],
            f"digits, T = {r8['best']['temperature']:g}, alpha = {r8['best']['alpha']:g} chosen on validation",
            "test accuracy")
    results["seconds"] = time.perf_counter() - t0
    rep.line(f"demo done in {results['seconds']:.1f} s (sections 1-5: {results['seed_demos_seconds']:.1f} s)")
    return _finish(args, rep, results, figs)


def _omitted_plot(path, r: dict, seeds: int) -> str:
    from kdjax import plots

    c = r["config"]
    return plots.omitted_class(path, r["mean_ci"], r["paper"]["accuracy"], c["omit"],
                               f"students never shown a {c['omit']}: {seeds} seeds, T = {c['temperature']:g}, "
                               f"alpha = {c['alpha']:g} (95% CI)")


def cmd_omit_class(args, rep: Reporter) -> int:
    from kdjax import demo
    from kdjax.losses import check_alpha, check_temperature

    check_temperature(args.temperature)
    check_alpha(args.alpha)
    if args.seeds < 2:
        raise UsageError(f"--seeds: expected at least 2 (for confidence intervals), got {args.seeds}")
    ds = _dataset(args)
    _claim_out(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    r = demo.omitted_class(rep, seeds, epochs=args.epochs, omit=args.omit, temperature=args.temperature,
                           alpha=args.alpha, teacher_hidden=args.teacher_hidden, student_hidden=args.student_hidden,
                           validation_fraction=args.validation_fraction, ds=ds)
    results = {"dataset": ds.name, "config": vars(args) | {"func": None}, **r}
    return _finish(args, rep, results, {"omitted_class": lambda: _omitted_plot(
        os.path.join(args.out, "omitted_class.png"), r, len(seeds))})


# ----------------------------------------------------------------------------- distill / sweep

def _dataset(args):
    from kdjax import data

    name, images, tokens = args.dataset, args.arch == "resnet", args.arch == "transformer"
    if name == "text" or name.endswith(".txt") or (tokens and name.endswith(".npz")):
        if not tokens:
            raise UsageError(f"--dataset {name}: expected --arch transformer (a language model), got --arch {args.arch}")
        return data.text(args.context, None if name == "text" else name, max_bytes=args.text_bytes)
    if tokens:
        raise UsageError(f"--arch transformer: expected --dataset text, a .txt corpus or an .npz of tokens "
                         f"(train, validation), got {name!r}")
    if name == "synthetic":
        ds = (data.synthetic_images(500, (8, 8, 3), 5, seed=args.seed, test_samples=500) if images
              else data.synthetic(500, 50, 5, seed=args.seed, test_samples=500))
    elif name == "digits":
        ds = data.digits(seed=args.seed, images=images)
    elif name.endswith(".npz") or os.path.exists(name):
        ds = data.load_npz(name, getattr(args, "num_classes", None))
    else:
        raise UsageError(f"--dataset: expected 'synthetic', 'digits', 'text' or a path to an .npz/.txt file, "
                         f"got {name!r}")
    if images and ds.x_train.ndim != 4:
        raise UsageError(f"--arch resnet: expected images [n, height, width, channels] (NHWC) in the data "
                         f"set, got x_train of shape {ds.x_train.shape}")
    return ds


def _run_config(args):
    from kdjax.experiments import RunConfig

    return RunConfig(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                     optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
                     nesterov=args.nesterov, lr_schedule=args.lr_schedule)


def _models(args, num_classes: int):
    """(teacher, student) of ``--arch``, sized by the width/depth flags."""
    from kdjax.models import ResNet, StudentMLP, TeacherMLP, TransformerLM

    if args.arch == "transformer":  # GPT-2 dropout (0.1) in the teacher, none in the student, as the MLPs
        return (TransformerLM(num_classes, args.teacher_layers, args.teacher_dim, args.heads, args.context, 0.1),
                TransformerLM(num_classes, args.student_layers, args.student_dim, args.heads, args.context))
    if args.arch == "mlp":
        return TeacherMLP(args.teacher_hidden, num_classes), StudentMLP(args.student_hidden, num_classes)
    nets = []
    for who in ("teacher", "student"):
        blocks, widths = getattr(args, f"{who}_blocks"), getattr(args, f"{who}_widths")
        if len(blocks) != len(widths):
            raise UsageError(f"--{who}-blocks / --{who}-widths: expected one width per stage, got "
                             f"{len(blocks)} stages and {len(widths)} widths")
        nets.append(ResNet(tuple(blocks), tuple(widths), num_classes, args.stem))
    return tuple(nets)


def _validate_models(models, ds) -> None:
    """Build every model abstractly (``jax.eval_shape`` of its init: no compute): a
    configuration that cannot work is refused before anything trains."""
    import jax

    example = jax.ShapeDtypeStruct((1, *ds.input_shape), ds.x_train.dtype)
    for model in models:
        jax.eval_shape(model.init, jax.random.PRNGKey(0), example)


def _describe(model) -> str:
    from kdjax.models import ResNet, TransformerLM

    if isinstance(model, TransformerLM):
        return f"TransformerLM({model.num_layers} layers, d_model {model.d_model}, {model.num_heads} heads)"
    if isinstance(model, ResNet):
        return f"ResNet(blocks {tuple(model.stage_sizes)}, widths {tuple(model.widths)}, {model.stem} stem)"
    return f"{type(model).__name__}({model.hidden_dim})"


def _load_teacher(path: str, teacher, ds):
    """The teacher's ``TrainState`` from a kdjax checkpoint or a PyTorch state_dict (.pt)."""
    import jax

    from kdjax import checkpoint, convert
    from kdjax.train import state_from_params

    if not os.path.isfile(path):
        raise UsageError(f"--teacher: expected an existing file, got {path}")
    like = jax.eval_shape(teacher.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, *ds.input_shape),
                                                                                    ds.x_train.dtype))
    if path.endswith((".pt", ".pth")):
        try:
            import torch
        except ImportError:
            raise UsageError("--teacher: loading a PyTorch .pt file needs torch; "
                             "pip install torch (or convert it to a kdjax checkpoint first)")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's own message runs to paragraphs of advice: its first line
            first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
            raise UsageError(f"--teacher: {path}: expected a PyTorch state_dict saved by torch.save, could not "
                             f"read it ({type(e).__name__}: {first[:120]})")
        if not isinstance(state_dict, dict):
            raise UsageError(f"--teacher: {path}: expected a state_dict (dict), got {type(state_dict).__name__}")
    else:
        tree, _ = checkpoint.load(path)
        variables = {"params": tree.get("params", tree), **tree.get("model_state", {})}
        state_dict = convert.variables_to_torch(variables)  # then checked against the model
    try:
        variables = dict(convert.torch_to_variables(state_dict, like, tied=getattr(teacher, "tied_weights", None)))
    except InputError as e:
        raise UsageError(f"--teacher: {path}: {e}") from None
    params = variables.pop("params")
    return state_from_params(params, model_state=variables)


# Arguments that cannot change a run's numbers; every other one is part of its identity,
# so that --resume never continues a run made with other settings.
_NOT_IDENTITY = {"command", "func", "out", "overwrite", "no_plots", "json", "quiet", "resume", "mesh"}


def _identity(args) -> dict:
    """``{"--flag": value}`` of every argument that changes results (stored with checkpoints)."""
    return {f"--{k.replace('_', '-')}": v for k, v in sorted(vars(args).items()) if k not in _NOT_IDENTITY}


def _checkpoints(args):
    from kdjax.experiments import Checkpoints

    if args.resume and not args.out:
        raise UsageError("--resume: expected --out DIR (where the checkpoints are), got none")
    if not args.out:
        return None
    return Checkpoints(os.path.join(args.out, "checkpoints"), args.checkpoint_every, args.resume,
                       json.loads(json.dumps(_jsonable(_identity(args)))))  # as it reads back from disk


def _parse_mesh(text: str | None) -> dict:
    if text is None:
        return {}
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("members", "data") or not value.strip().isdigit() or int(value) < 1:
            raise UsageError(f"--mesh: expected members=M,data=D (positive integers), got {text!r}")
        out[key.strip()] = int(value)
    return out


def _devices():
    import jax

    return jax.local_devices() if jax.process_count() == 1 else jax.devices()


def _mesh(args, rep: Reporter, members: int, batch: int):
    """``--mesh members=M,data=D``, else every local device (``parallel.default_shape``)."""
    from kdjax import parallel

    spec = _parse_mesh(args.mesh)
    devices = _devices()
    if spec:
        m = spec.get("members", 1)
        mesh = parallel.make_mesh(m, spec.get("data"), devices)
        parallel.check_divides(members, mesh, "members", "--mesh: the members of this run")
        parallel.check_divides(batch, mesh, "data", "--mesh: --batch-size")
    else:
        m, d = parallel.default_shape(len(devices), members, batch)
        mesh = None if m * d == 1 else parallel.make_mesh(m, d, devices)
    rep.line(f"running on {parallel.describe(mesh)}")
    return mesh


def _variables(states) -> dict:
    return {"params": states.params, "model_state": states.model_state}


def cmd_distill(args, rep: Reporter) -> int:
    import jax

    from kdjax import checkpoint, experiments, plots
    from kdjax.experiments import mean_ci
    from kdjax.losses import check_alpha, check_temperature

    check_temperature(args.temperature)  # before anything is trained
    check_alpha(args.alpha)
    ckpts = _checkpoints(args)
    ds = _dataset(args)
    cfg = _run_config(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    teacher, student = _models(args, ds.num_classes)
    _validate_models((teacher, student), ds)
    rep.line(f"{ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} test, examples of shape {ds.input_shape}, "
             f"{ds.num_classes} classes; {cfg.describe()}; "
             + (f"T in {args.temperatures}, alpha in {args.alphas} (tuned)" if args.tune
                else f"T = {args.temperature:g}, alpha = {args.alpha:g}") + f"; {args.seeds} seed(s)")
    rep.line(f"teacher {_describe(teacher)}, student {_describe(student)}")
    t_state = None
    if args.teacher:
        t_state = _load_teacher(args.teacher, teacher, ds)
        rep.line(f"teacher loaded from {args.teacher}")
    mesh = _mesh(args, rep, len(seeds), cfg.batch_size)
    t_cfg = None
    if args.teacher_steps is not None:
        if args.tune or args.teacher:
            raise UsageError("--teacher-steps: expected a teacher trained here (no --teacher) and no --tune")
        t_cfg = dataclasses.replace(cfg, steps=args.teacher_steps, epochs=None)
        rep.line(f"teachers: {t_cfg.describe()}")
    _claim_out(args)
    tuned = None
    with rep.progress() as on_chunk:
        if args.tune:
            tuned = experiments.tuned_distill(
                teacher, student, ds, cfg, seeds, temperatures=args.temperatures, alphas=args.alphas,
                validation_fraction=args.validation_fraction, teacher_state=t_state, checkpoints=ckpts,
                on_chunk=on_chunk, log=rep.line, mesh=mesh)
            r = tuned.result
        else:
            r = experiments.distill(teacher, student, ds, cfg, seeds, temperature=args.temperature,
                                    alpha=args.alpha, teacher_state=t_state, checkpoints=ckpts,
                                    on_chunk=on_chunk, log=rep.line, mesh=mesh, teacher_cfg=t_cfg)
    if tuned is not None:
        rep.table(f"validation accuracy ({args.validation_fraction:g} of the training rows), mean ± 95% CI over "
                  f"n = {len(seeds)} seed(s); "
                  f"rows T, columns alpha", ["T \\ alpha"] + [f"{a:g}" for a in tuned.alphas],
                  [[f"{T:g}"] + [fmt_ci(c) for c in row]
                   for T, row in zip(tuned.temperatures, tuned.validation_mean_ci)])
        rep.line(f"chosen on validation: T = {tuned.best[0]:g}, alpha = {tuned.best[1]:g}; students retrained "
                 f"on all {len(ds.y_train)} training rows")
    acc, stats, gain = r.accuracy["test"], r.mean_ci["test"], r.paired_gain["test"]
    teacher_label = "teacher (loaded)" if t_state is not None else "teacher"
    lm = args.arch == "transformer"
    over = f"mean ± 95% CI over n = {len(seeds)} seed(s)"
    rep.table(f"validation next-byte accuracy ({over})" if lm else f"test accuracy ({over})", ["model", "accuracy"],
              [[teacher_label if k == "teacher" else k, fmt_ci(v)] for k, v in stats.items()]
              + [["distilled - standard (paired)", fmt_ci(gain, signed=True)]])
    bpb = {k: np.asarray(v) / np.log(2) for k, v in r.eval_loss["test"].items()}
    bpb_stats = {k: mean_ci(v) for k, v in bpb.items()}
    bpb_gain = mean_ci(bpb["distilled"] - bpb["standard"])
    if lm:
        rep.table(f"validation bits per byte (cross-entropy / ln 2; lower is better), {over}",
                  ["model", "bits per byte"],
                  [[teacher_label if k == "teacher" else k, fmt_ci(v)] for k, v in bpb_stats.items()]
                  + [["distilled - standard (paired)", fmt_ci(bpb_gain, signed=True)]])
    results = {"dataset": ds.name, "config": vars(args) | {"func": None},
               "teacher_test_accuracy": float(acc["teacher"][0]),
               "test_accuracy": {k: v.tolist() for k, v in acc.items()}, "mean_ci": stats,
               "paired_gain": gain, "losses": r.losses,
               "test_loss": {k: np.asarray(v).tolist() for k, v in r.eval_loss["test"].items()}}
    if lm:
        results["bits_per_byte"] = {k: v.tolist() for k, v in bpb.items()}
        results["bits_per_byte_mean_ci"], results["bits_per_byte_paired_gain"] = bpb_stats, bpb_gain
    if tuned is not None:
        results["tuning"] = {"temperatures": tuned.temperatures, "alphas": tuned.alphas,
                             "validation_accuracy": tuned.validation.tolist(),
                             "validation_mean_ci": tuned.validation_mean_ci,
                             "best": {"temperature": tuned.best[0], "alpha": tuned.best[1]}}
    if args.out:
        first = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)
        meta = {"dataset": ds.name, "input_shape": list(ds.input_shape), "num_classes": ds.num_classes}
        checkpoint.save(os.path.join(args.out, "teacher.ckpt"), _variables(r.teacher_member(0)),
                        meta | {"model": _describe(teacher)})
        for kind, states in (("distilled", r.distilled), ("standard", r.standard)):
            checkpoint.save(os.path.join(args.out, f"student_{kind}.ckpt"), _variables(first(states)),
                            meta | {"model": _describe(student), "seed": seeds[0]})
    names = ["teacher", "standard", "distilled"]
    figs = {
        "learning_curves": lambda: plots.learning_curves(
            os.path.join(args.out, "learning_curves.png"), r.losses, f"{ds.name}: student training loss"),
        "comparison": lambda: plots.comparison(
            os.path.join(args.out, "comparison.png"), names, [stats[k][0] for k in names],
            [stats[k][1] for k in names], gain, f"{ds.name}: test accuracy", "test accuracy"),
    }
    return _finish(args, rep, results, figs)


def cmd_sweep(args, rep: Reporter) -> int:
    from kdjax import experiments, plots, sweep
    from kdjax.experiments import mean_ci
    from kdjax.train import make_hyper

    ckpts = _checkpoints(args)
    ds = _dataset(args)
    cfg = _run_config(args)
    temps, alphas = list(args.temperatures), list(args.alphas)
    seeds = list(range(args.seed, args.seed + args.seeds))
    T, A, S = sweep.grid(temps, alphas, seeds)
    make_hyper(T, A)  # validates every value before anything is compiled
    teacher, student = _models(args, ds.num_classes)
    _validate_models((teacher, student), ds)
    rep.line(f"{ds.name}: {len(T)} students ({len(temps)} temperatures x {len(alphas)} alphas x "
             f"{len(seeds)} seeds) as one compiled program; {cfg.describe()}")
    t_state = _load_teacher(args.teacher, teacher, ds) if args.teacher else None
    if args.members_per_group is not None and (args.mesh or len(_devices()) > 1):
        raise UsageError("--members-per-group: groups of members run on one device; got it with several "
                         "(a mesh splits the members over devices instead; leave it at 'all')")
    mesh = _mesh(args, rep, len(T), cfg.batch_size)
    _claim_out(args)
    with rep.progress() as on_chunk:
        r = experiments.sweep(teacher, student, ds, cfg, T, A, S, teacher_state=t_state, teacher_seed=seeds[0],
                              checkpoints=ckpts, on_chunk=on_chunk, log=rep.line, mesh=mesh,
                              members_per_group=args.members_per_group)
    acc = r.accuracy.reshape(len(temps), len(alphas), len(seeds))
    stats = [[mean_ci(acc[i, j]) for j in range(len(alphas))] for i in range(len(temps))]
    rep.table(f"mean test accuracy ± 95% CI over n = {len(seeds)} seed(s) (rows: temperature, columns: alpha)",
              ["T \\ alpha"] + [f"{a:g}" for a in alphas],
              [[f"{t:g}"] + [fmt_ci(c, digits=3) for c in row] for t, row in zip(temps, stats)])
    best = max(((i, j) for i in range(len(temps)) for j in range(len(alphas))),
               key=lambda ij: stats[ij[0]][ij[1]][0])
    rep.line(f"teacher test accuracy {r.teacher_accuracy:.4f}; best: T = {temps[best[0]]:g}, "
             f"alpha = {alphas[best[1]]:g} ({stats[best[0]][best[1]][0]:.4f})")
    means = np.array([[m for m, _ in row] for row in stats])
    results = {"dataset": ds.name, "config": vars(args) | {"func": None}, "temperatures": temps,
               "alphas": alphas, "seeds": seeds, "teacher_test_accuracy": r.teacher_accuracy,
               "test_accuracy": acc.tolist(), "mean_ci": stats,
               "best": {"temperature": temps[best[0]], "alpha": alphas[best[1]]},
               "members_per_group": r.members_per_group,
               "members_per_group_seconds": None if r.pick_seconds is None
               else {str(g): t for g, t in r.pick_seconds.items()}}
    figs = {"heatmap": lambda: plots.heatmap(os.path.join(args.out, "sweep_heatmap.png"), temps, alphas,
                                             means, f"{ds.name}: {len(seeds)} seed(s) per cell")}
    return _finish(args, rep, results, figs)


# ----------------------------------------------------------------------------- parser

def _members_per_group(text):
    if text in ("all", "auto"):
        return None if text == "all" else text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'all', 'auto' or a positive integer, got {text!r}") from None


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


def _float_in(lo, hi, what):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if not (lo <= v < hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v:g}")
        return v
    return parse


def _training_args(p, seeds_default: int):
    p.add_argument("--dataset", default="synthetic", help="synthetic, digits, or PATH.npz "
                   "(x_train, y_train, x_test, y_test; images NHWC)")
    p.add_argument("--arch", choices=["mlp", "resnet", "transformer"], default="mlp",
                   help="mlp: the seed's teacher/student MLPs; resnet: BasicBlock ResNets on images; "
                        "transformer: GPT-2 language models on --dataset text")
    p.add_argument("--teacher-hidden", type=_positive_int, default=256, help="mlp: teacher width")
    p.add_argument("--student-hidden", type=_positive_int, default=64, help="mlp: student width")
    p.add_argument("--teacher-blocks", type=_positive_int, nargs="+", default=[1, 1, 1], metavar="N",
                   help="resnet: teacher blocks per stage (default 1 1 1)")
    p.add_argument("--teacher-widths", type=_positive_int, nargs="+", default=[16, 32, 64], metavar="C",
                   help="resnet: teacher channels per stage (default 16 32 64)")
    p.add_argument("--student-blocks", type=_positive_int, nargs="+", default=[1, 1, 1], metavar="N",
                   help="resnet: student blocks per stage (default 1 1 1)")
    p.add_argument("--student-widths", type=_positive_int, nargs="+", default=[4, 8, 16], metavar="C",
                   help="resnet: student channels per stage (default 4 8 16)")
    p.add_argument("--stem", choices=["cifar", "imagenet"], default="cifar",
                   help="resnet: 3x3/1 conv (cifar) or torchvision's 7x7/2 conv + max pool (imagenet)")
    p.add_argument("--context", type=_positive_int, default=64, help="transformer: tokens per window")
    p.add_argument("--teacher-layers", type=_positive_int, default=2, help="transformer (default 2)")
    p.add_argument("--teacher-dim", type=_positive_int, default=64, help="transformer: d_model (default 64)")
    p.add_argument("--student-layers", type=_positive_int, default=1, help="transformer (default 1)")
    p.add_argument("--student-dim", type=_positive_int, default=32, help="transformer: d_model (default 32)")
    p.add_argument("--heads", type=_positive_int, default=4, help="transformer: attention heads (default 4)")
    p.add_argument("--num-classes", type=_positive_int, default=None,
                   help="--dataset PATH.npz: the class count (default: the training labels' maximum + 1; "
                        "test labels outside it are refused)")
    p.add_argument("--text-bytes", type=_positive_int, default=200_000,
                   help="--dataset text: training bytes kept (default 200000; validation a tenth)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=100,
                        help="the seed's 'epochs': one random minibatch per step (default 100)")
    length.add_argument("--epochs", type=_positive_int, default=None, help="real shuffled passes instead")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam (the seed's) or sgd (momentum, weight decay: torch.optim.SGD)")
    p.add_argument("--momentum", type=_float_in(0, 1, "a number in [0, 1)"), default=0.9, help="sgd")
    p.add_argument("--weight-decay", type=_float_in(0, float("inf"), "a number >= 0"), default=5e-4,
                   help="sgd (default 5e-4)")
    p.add_argument("--nesterov", action="store_true", help="sgd: Nesterov momentum")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: annealed to 0 over the run (CosineAnnealingLR, per step)")
    p.add_argument("--seeds", type=_positive_int, default=seeds_default, help="number of seeds")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--teacher", default=None,
                   help="load the teacher: a kdjax checkpoint, or a PyTorch state_dict .pt (needs torch; "
                        "an MLP, or a torchvision-layout ResNet with --arch resnet)")
    p.add_argument("--mesh", default=None, metavar="members=M,data=D",
                   help="device mesh: students split over M, minibatches over D devices (default: every "
                        "local device, on members first)")


def _resumable(p):
    p.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="K",
                   help="with --out: checkpoint every K steps (default: every ~5%% of the run)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the checkpoints in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdjax", description="Knowledge distillation in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="the seed's five demos, then distillation on digits: held out, "
                                       "an omitted class, tuned T and alpha")
    demo.add_argument("--seeds", type=int, default=8, help="seeds for the multi-seed comparisons (>= 2)")
    demo.add_argument("--seed", type=int, default=42, help="first seed")
    demo.add_argument("--sections", default="1-8", help="which sections to run, e.g. 1-5 or 1,6 (6: held-out "
                      "digits, 7: omitted class, 8: tuned T and alpha)")
    demo.add_argument("--quick", action="store_true", help="2 digits epochs instead of 30 (smoke tests)")
    _common_output(demo)
    demo.set_defaults(func=cmd_demo)

    distill = sub.add_parser("distill", help="teacher, standard and distilled student on a data set")
    _training_args(distill, seeds_default=4)
    distill.add_argument("--temperature", type=float, default=3.0)
    distill.add_argument("--alpha", type=float, default=0.7)
    distill.add_argument("--teacher-steps", type=_positive_int, default=None,
                         help="train the teachers this many steps (default: as the students)")
    distill.add_argument("--tune", action="store_true",
                         help="choose T and alpha from --temperatures x --alphas on a validation split of the "
                              "training rows (never the test set), then distill at the best")
    distill.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="with --tune")
    distill.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0], help="with --tune")
    distill.add_argument("--validation-fraction", type=float, default=0.2,
                         help="with --tune: share of the training rows held out for the choice (default 0.2)")
    _resumable(distill)
    _common_output(distill)
    distill.set_defaults(func=cmd_distill)

    om = sub.add_parser("omit-class", help="Hinton et al.'s experiment: students that never see one class")
    om.add_argument("--dataset", default="digits", help="digits, or PATH.npz (x_train, y_train, x_test, y_test)")
    om.add_argument("--num-classes", type=_positive_int, default=None,
                    help="--dataset PATH.npz: the class count (default: the training labels' maximum + 1)")
    om.add_argument("--omit", type=int, default=3, help="the class left out of the transfer set (default 3)")
    om.add_argument("--epochs", type=_positive_int, default=30)
    om.add_argument("--teacher-hidden", type=_positive_int, default=256)
    om.add_argument("--student-hidden", type=_positive_int, default=64)
    om.add_argument("--temperature", type=float, default=20.0, help="default 20, the paper's MNIST value")
    om.add_argument("--alpha", type=float, default=0.9)
    om.add_argument("--validation-fraction", type=float, default=0.2,
                    help="share of the training rows whose inputs set the bias shift (default 0.2)")
    om.add_argument("--seeds", type=int, default=8, help="number of seeds (>= 2)")
    om.add_argument("--seed", type=int, default=0, help="first seed")
    _common_output(om)
    om.set_defaults(func=cmd_omit_class, arch="mlp")

    sw = sub.add_parser("sweep", help="temperatures x alphas x seeds as one compiled program")
    _training_args(sw, seeds_default=2)
    sw.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    sw.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
    sw.add_argument("--members-per-group", type=_members_per_group, default=None, metavar="all|auto|N",
                    help="how the students run: all as one vmap (default), N at a time, or 'auto' "
                         "(the fastest of those, timed on the first chunk; recorded in results.json; "
                         "choices agree to float rounding, not bitwise)")
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


def _given(argv) -> set[str]:
    """The options typed on the command line (not their defaults): a second parse in
    which no option has a default, so only those present come back."""
    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    for p in subparsers.choices.values():
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "func"}


# Options that only mean something in some modes: (does it apply to these args?, why not).
_ONLY_WITH = {
    **dict.fromkeys(("teacher_hidden", "student_hidden"), (lambda a: a.arch == "mlp", "only used with --arch mlp")),
    **dict.fromkeys(("teacher_blocks", "teacher_widths", "student_blocks", "student_widths", "stem"),
                    (lambda a: a.arch == "resnet", "only used with --arch resnet")),
    **dict.fromkeys(("context", "teacher_layers", "teacher_dim", "student_layers", "student_dim", "heads"),
                    (lambda a: a.arch == "transformer", "only used with --arch transformer")),
    "text_bytes": (lambda a: a.dataset == "text", "only used with --dataset text"),
    "num_classes": (lambda a: a.dataset.endswith(".npz") and a.arch != "transformer",
                    "only used with a --dataset PATH.npz of labelled examples"),
    **dict.fromkeys(("momentum", "weight_decay", "nesterov"),
                    (lambda a: a.optimizer == "sgd", "only used with --optimizer sgd")),
    **dict.fromkeys(("temperatures", "alphas", "validation_fraction"),
                    (lambda a: a.command != "distill" or a.tune, "only used with --tune")),
    **dict.fromkeys(("temperature", "alpha"), (lambda a: a.command != "distill" or not a.tune,
                                               "not used with --tune, which chooses T and alpha from --temperatures "
                                               "x --alphas")),
    **dict.fromkeys(("checkpoint_every", "overwrite", "no_plots"),
                    (lambda a: a.out is not None, "only used with --out DIR")),
}


def _check_modes(args, given: set[str]) -> None:
    """Refuse an option the chosen mode would ignore: it would change nothing the user expects."""
    for dest in sorted(given):
        applies, why = _ONLY_WITH.get(dest, (None, None))
        if applies is not None and not applies(args):
            raise UsageError(f"--{dest.replace('_', '-')}: {why}")


def main(argv=None) -> int:
    """Parse ``argv`` and run the command; returns the exit status (no process-wide setup).

    A refused run leaves nothing behind: an --out directory this run created is removed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    created = args.out is not None and not os.path.exists(args.out)
    try:
        _check_modes(args, _given(argv))
        _check_out(args)
        rep = Reporter(json_mode=args.json, quiet=args.quiet)
        return args.func(args, rep)
    except (UsageError, InputError, InputTypeError) as e:
        if created and os.path.isdir(args.out):
            shutil.rmtree(args.out)
        print(f"kdjax: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return EXIT_USAGE
    except OSError as e:  # a path we cannot read or write: the OS's reason, in one line
        print(f"kdjax: error: {e}", file=sys.stderr)
        return 1
    # anything else is a bug in kdjax: it keeps its traceback


def run() -> None:
    """The ``kdjax`` executable (and ``python -m kdjax``): process-wide start-up, then ``main``.

    The persistent compilation cache is enabled here, ``jax.distributed`` is started when
    the environment describes several processes (``kdjax.parallel.initialize``), and the
    objects that importing JAX, Flax and optax allocates are moved out of the garbage
    collector's view
    (``gc.freeze``): tracing creates many short-lived objects, and every full
    collection would otherwise re-scan all of them (see the README's timings).
    """
    _enable_compile_cache()
    import kdjax.experiments  # noqa: F401  (jax, flax, optax)
    from kdjax import parallel

    try:
        parallel.initialize()  # jax.distributed, when the environment names several processes
    except InputError as e:
        print(f"kdjax: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    gc.freeze()
    raise SystemExit(main())
