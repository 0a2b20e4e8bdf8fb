"""What a ``kdjax`` run leaves: ``results.json`` with its environment, ``metrics.jsonl``, and
``distill``'s tables, checkpoints, Hugging Face folders and plots (``report_distill``), shared by
the commands that distil (``kdjax.app.commands``, ``kdjax.app.uld_cache``)."""

from __future__ import annotations

import json
import os

import numpy as np

from kdjax.app import inputs, methods
from kdjax.app.reporting import Reporter, conclusion, fmt_ci, jsonable, plural, version

__all__ = ["SYNTHETIC", "finish", "metrics_log", "distill_from_cache", "report_distill"]


SYNTHETIC = ("--dataset synthetic (the default) has random labels, the reference script 08_distillation.py's data: "
              "held-out accuracy is chance whatever the method; --dataset digits or --dataset text for a meaningful run.")


def finish(args, rep: Reporter, results: dict, plots: dict) -> int:
    import jax

    from kdjax.checkpoint import atomic_write_text

    if jax.process_index() != 0:  # on many hosts, process 0 reports
        return 0
    results = jsonable(results)
    results["kdjax_version"] = version()
    results["wall_seconds"] = rep.timing()  # the run and each phase (setup, training phases, finish)
    results["environment"] = {"jax": jax.__version__, "backend": jax.default_backend(),
                              "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    if args.out:
        if not args.no_plots:
            results["plots"] = {k: os.path.basename(fn()) for k, fn in plots.items()}
        atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(results, indent=1))
        inputs.seal_out(args)
        rep.line(f"wrote {os.path.join(args.out, 'results.json')}"
                 + ("" if args.no_plots or not plots else f" and {plural(len(plots), 'plot')}"))
    if args.json:
        print(json.dumps(results))
    return 0


def metrics_log(args, members: dict):
    """``metrics.jsonl`` in --out (when given) and TensorBoard scalars (--tensorboard DIR)."""
    from kdjax.app.metrics import MetricsLog

    import jax

    if jax.process_index() != 0:  # on many hosts, process 0 logs (every process sees every loss)
        return MetricsLog(None, None, members)
    path = None if args.out is None else os.path.join(args.out, "metrics.jsonl")
    return MetricsLog(path, args.tensorboard, members, resume=getattr(args, "resume", False))


def distill_from_cache(args, rep: Reporter, student, ds, cfg, seeds, ckpts, teacher_eval, **objective):
    """The standard and distilled students of ``kdjax distill --teacher-logits CACHE``
    (``workflows.distill_offline`` with the cache's ``objective`` arguments; no teacher runs):
    the mesh, --out claimed, metrics.jsonl. ``teacher_eval``: the cache's teacher figures, None
    when they are for other validation windows (then no teacher row, which is said)."""
    import contextlib

    from kdjax import workflows
    from kdjax.app import metrics

    mesh = inputs.make_mesh(args, rep, 2 * len(seeds), cfg.batch_size, [("student", student, ds.x_train[:1])])
    metrics.check_tensorboard(args.tensorboard)
    inputs.claim_out(args)
    names = {k: [f"{k}/seed{s}" for s in seeds] for k in ("standard", "distilled")}
    log = metrics_log(args, {"students": names["standard"] + names["distilled"], **names})
    with rep.progress() as on_chunk, contextlib.closing(log):
        r = workflows.distill_offline(student, ds, cfg, seeds, teacher_eval=teacher_eval, checkpoints=ckpts,
                                      on_chunk=on_chunk, log=rep.line, mesh=mesh, on_losses=rep.watch(log.losses),
                                      **objective)
        log.evaluation("test", cfg.total_steps(len(ds.y_train)),
                       {"accuracy": r.accuracy["test"], "loss": r.eval_loss["test"]},
                       {"teacher": ["teacher/cached"], **names})
    if teacher_eval is None:
        rep.line("the cache's teacher figures are for other validation windows: no teacher row")
    return r


def _variables(states) -> dict:
    return {"params": states.params, "model_state": states.model_state}


def report_distill(args, rep: Reporter, r, ds, student, tok, seeds, *, teacher, objective, tuned,
                    teacher_label: str, extra: dict | None = None, per_byte: dict | None = None) -> int:
    """The tables, ``results.json``, the Hugging Face student, checkpoints and plots of a
    ``distill`` run (``teacher`` None: no teacher checkpoint, e.g. from a top-k cache).
    ``per_byte``: each model's target tokens per byte (models with other tokenizers): bits per
    byte instead of per token."""
    import jax

    from kdjax import checkpoint
    from kdjax.app import plots
    from kdjax.stats import mean_ci

    acc, stats, gain = r.accuracy["test"], r.mean_ci["test"], r.paired_gain["test"]
    lm = args.arch in ("transformer", "llama")
    unit = "token" if args.arch == "llama" else "byte"
    bits = "byte" if per_byte else unit  # other tokenizers: only bits per byte compare
    over = f"mean ± 95% CI over n = {plural(len(seeds), 'seed')}"
    label = lambda k: (teacher_label if k == "teacher" else
                       f"distilled ({args.method})" if k == "distilled" and args.method != "kd" else k)
    own = " (each model on its own tokens)" if per_byte else ""
    rep.table(f"validation next-{unit} accuracy{own} ({over})" if lm else f"test accuracy ({over})", ["model", "accuracy"],
              [[label(k), fmt_ci(v)] for k, v in stats.items()]
              + [["distilled - standard (paired)", fmt_ci(gain, signed=True)]])
    bpb = {k: np.asarray(v) / np.log(2) * (per_byte[k] if per_byte else 1) for k, v in r.eval_loss["test"].items()}
    bpb_stats = {k: mean_ci(v) for k, v in bpb.items()}
    bpb_gain = mean_ci(bpb["distilled"] - bpb["standard"])
    if lm:
        rep.table(f"validation bits per {bits} (cross-entropy / ln 2{' x tokens per byte' if per_byte else ''}; "
                  f"lower is better), {over}", ["model", f"bits per {bits}"],
                  [[teacher_label if k == "teacher" else k, fmt_ci(v)] for k, v in bpb_stats.items()]
                  + [["distilled - standard (paired)", fmt_ci(bpb_gain, signed=True)]])
    what = "Distilled - standard" if args.method == "kd" else f"Distilled ({args.method}) - standard"
    lines = [conclusion(f"{what} {f'validation next-{unit} accuracy' if lm else 'test accuracy'} on {ds.name} "
                        f"(paired by seed)", gain, len(seeds))]
    if lm:
        lines.append(conclusion(f"{what} validation bits per {bits} (paired by seed; lower is better)", bpb_gain,
                                len(seeds), lower_is_better=True, digits=3))
    if ds.name.startswith("synthetic"):
        lines.append(SYNTHETIC)
    results = {"dataset": ds.name, "config": vars(args) | {"func": None}, "conclusion": rep.conclude(lines),
               "method": args.method, "objective": methods.describe(objective) if objective is not None else None,
               "teacher_test_accuracy": float(acc["teacher"][0]) if "teacher" in acc else None,
               "test_accuracy": {k: v.tolist() for k, v in acc.items()}, "mean_ci": stats,
               "paired_gain": gain, "losses": r.losses,
               "test_loss": {k: np.asarray(v).tolist() for k, v in r.eval_loss["test"].items()}} | (extra or {})
    if lm:
        results[f"bits_per_{bits}"] = {k: v.tolist() for k, v in bpb.items()}
        results[f"bits_per_{bits}_mean_ci"], results[f"bits_per_{bits}_paired_gain"] = bpb_stats, bpb_gain
        if per_byte:
            results["tokens_per_byte"] = per_byte
    if tuned is not None:
        results["tuning"] = {"temperatures": tuned.temperatures, "alphas": tuned.alphas,
                             "validation_accuracy": tuned.validation.tolist(),
                             "validation_mean_ci": tuned.validation_mean_ci,
                             "best": {"temperature": tuned.best[0], "alpha": tuned.best[1]}}
    if args.save_hf:
        own = jax.tree_util.tree_map(lambda a: np.asarray(a[0]), r.distilled)
        _write_hf(args, "--save-hf", student, own, tok)
        rep.line(f"distilled student (seed {seeds[0]}) written to {args.save_hf} (Hugging Face format)")
        results["save_hf"] = args.save_hf
    if getattr(args, "save_hf_teacher", None):
        own = jax.tree_util.tree_map(np.asarray, r.teacher_member(0))
        _write_hf(args, "--save-hf-teacher", teacher, own, tok)
        which = "loaded" if r.teacher_losses is None else f"seed {seeds[0]}"
        rep.line(f"teacher ({which}) written to {args.save_hf_teacher} (Hugging Face format; kdjax teacher-logits "
                 f"--teacher {args.save_hf_teacher} caches its top-k)")
        results["save_hf_teacher"] = args.save_hf_teacher
    if args.out and tok is not None:
        checkpoint.atomic_write_text(os.path.join(args.out, "tokenizer.json"), tok.to_str())
    if args.out:
        first = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)
        meta = {"dataset": ds.name, "input_shape": list(ds.input_shape), "num_classes": ds.num_classes}
        if teacher is not None:
            checkpoint.save(os.path.join(args.out, "teacher.ckpt"), _variables(r.teacher_member(0)),
                            meta | {"model": inputs.describe(teacher)})
        for kind, states in (("distilled", r.distilled), ("standard", r.standard)):
            checkpoint.save(os.path.join(args.out, f"student_{kind}.ckpt"), _variables(first(states)),
                            meta | {"model": inputs.describe(student), "seed": seeds[0]})
    names = [k for k in ("teacher", "standard", "distilled") if k in stats]
    figs = {
        "learning_curves": lambda: plots.learning_curves(
            os.path.join(args.out, "learning_curves.png"), r.losses, f"{ds.name}: student training loss"),
        "comparison": lambda: plots.comparison(
            os.path.join(args.out, "comparison.png"), names, [stats[k][0] for k in names],
            [stats[k][1] for k in names], gain, f"{ds.name}: test accuracy{own}", "test accuracy"),
    }
    return finish(args, rep, results, figs)


def _write_hf(args, flag: str, model, state, tok) -> None:
    """``model`` with ``state``'s weights as a Hugging Face folder at ``flag``'s path (checked
    before the run: ``outputs.check_save_hf``), its tokenizer beside it."""
    from kdjax import checkpoint, convert

    from kdjax.app import outputs

    import jax

    directory = args.save_hf if flag == "--save-hf" else args.save_hf_teacher
    overwrite = inputs.save_hf_overwrite(args, flag)  # as checked before the run
    primary = jax.process_index() == 0  # on many hosts, process 0 writes (save_hf too)
    if primary:
        outputs.mark_writing(args, flag)
    convert.save_hf(model, {"params": state.params, **state.model_state}, directory, overwrite=overwrite)
    if tok is not None and primary:
        checkpoint.atomic_write_text(os.path.join(directory, "tokenizer.json"), tok.to_str())
