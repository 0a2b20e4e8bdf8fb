"""The bodies of ``kdjax demo``, ``distill``, ``omit-class``, ``sweep`` and ``teacher-logits``: inputs checked
(``kdjax.app.inputs``), the workflow run, tables printed, ``results.json`` and plots written."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import numpy as np

from kdjax.app import UsageError, inputs, methods
from kdjax.app.distill_report import SYNTHETIC, distill_from_cache, finish, metrics_log, report_distill
from kdjax.app.reporting import Reporter, conclusion, fmt_ci, plural, version
from kdjax.errors import InputError

__all__ = ["cmd_demo", "cmd_distill", "cmd_omit_class", "cmd_on_policy", "cmd_sweep", "cmd_teacher_logits"]


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
    from kdjax.app import demo, plots
    from kdjax.fitting import Programs

    sections = _parse_sections(args.sections)
    if args.seeds < 2:
        raise UsageError(f"--seeds: expected at least 2 (for confidence intervals), got {args.seeds}")
    inputs.claim_out(args)
    programs = Programs()  # shared by every section: each program compiles once
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
        r4 = results["seed_comparison"] = demo.seed_comparison(rep, seeds, programs)
        figs["learning_curves"] = lambda: plots.learning_curves(
            os.path.join(out, "learning_curves.png"), r4["losses"],
            f"seed data, {len(seeds)} seeds (distilled: the KD objective, not CE)")
    if 5 in sections:
        r5 = results["hyperparameters"] = demo.hyperparameters(rep, seeds, programs)
        figs["hyperparameters"] = lambda: plots.hyper_sweeps(
            os.path.join(out, "hyperparameters.png"), r5["temperatures"],
            [m for m, _ in r5["temperature_sweep"]], [h for _, h in r5["temperature_sweep"]],
            r5["alphas"], [m for m, _ in r5["alpha_sweep"]], [h for _, h in r5["alpha_sweep"]],
            "training accuracy (random labels)")
    results["seed_demos_seconds"] = time.perf_counter() - t0
    if 6 in sections:
        r6 = results["digits"] = demo.digits_heldout(rep, seeds, epochs=epochs, programs=programs)
        figs["digits_comparison"] = lambda: _digits_plot(
            os.path.join(out, "digits_comparison.png"), r6, f"digits test accuracy, {len(seeds)} seeds (95% CI)")
    if 7 in sections:
        r7 = results["omitted_class"] = demo.omitted_class(rep, seeds, epochs=epochs, programs=programs)
        figs["omitted_class"] = lambda: _omitted_plot(os.path.join(out, "omitted_class.png"), r7, len(seeds))
    if 8 in sections:
        r8 = results["tuned"] = demo.tuned_digits(rep, seeds, epochs=epochs, untuned=results.get("digits"),
                                                   programs=programs)
        figs["tuned_comparison"] = lambda: _digits_plot(
            os.path.join(out, "tuned_comparison.png"), r8,
            f"digits, T = {r8['best']['temperature']:g}, alpha = {r8['best']['alpha']:g} chosen on validation")
    results["seconds"] = time.perf_counter() - t0
    results["conclusion"] = rep.conclude(demo.conclusion(results))
    rep.line(f"demo done in {results['seconds']:.1f} s (sections 1-5: {results['seed_demos_seconds']:.1f} s)")
    return finish(args, rep, results, figs)


def _digits_plot(path, r: dict, title: str) -> str:
    """The teacher, standard and distilled students' test accuracy (95% CI) of a digits section."""
    from kdjax.app import plots

    kinds = ["teacher", "standard", "distilled"]
    return plots.comparison(path, kinds, [r["mean_ci"][k][0] for k in kinds], [r["mean_ci"][k][1] for k in kinds],
                            r["paired_gain"], title, "test accuracy")


def _omitted_plot(path, r: dict, seeds: int) -> str:
    from kdjax.app import plots

    c = r["config"]
    return plots.omitted_class(path, r["mean_ci"], r["paper"]["accuracy"], c["omit"],
                               f"students never shown a {c['omit']}: {seeds} seeds, T = {c['temperature']:g}, "
                               f"alpha = {c['alpha']:g} (95% CI)")


def cmd_omit_class(args, rep: Reporter) -> int:
    from kdjax.app import demo
    from kdjax.losses import check_alpha, check_temperature

    check_temperature(args.temperature)
    check_alpha(args.alpha)
    if args.seeds < 2:
        raise UsageError(f"--seeds: expected at least 2 (for confidence intervals), got {args.seeds}")
    ds = inputs.dataset(args)
    inputs.claim_out(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    r = demo.omitted_class(rep, seeds, epochs=args.epochs, omit=args.omit, temperature=args.temperature,
                           alpha=args.alpha, teacher_hidden=args.teacher_hidden, student_hidden=args.student_hidden,
                           validation_fraction=args.validation_fraction, ds=ds)
    gain, n, k = r["paired_gain"], len(seeds), args.omit
    lines = [conclusion(f"Distilled - standard accuracy on the omitted class {k} ({how}, paired by seed)",
                        gain[when]["omitted"], n)
             for when, how in (("before", "raw"), ("after", "bias matched to the class prior"))]
    lines.append(conclusion("Distilled - standard overall test accuracy (bias matched, paired by seed)",
                            gain["after"]["overall"], n))
    results = {"dataset": ds.name, "config": vars(args) | {"func": None}, "conclusion": rep.conclude(lines),
               **r}
    return finish(args, rep, results, {"omitted_class": lambda: _omitted_plot(
        os.path.join(args.out, "omitted_class.png"), r, len(seeds))})


def cmd_distill(args, rep: Reporter) -> int:
    from kdjax import sweep, workflows
    from kdjax.app import metrics
    from kdjax.losses import check_alpha, check_temperature

    if args.teacher_logits:
        return _distill_from_cache(args, rep)
    methods.resolve_temperature(args)
    methods.check_arch(args)
    if methods.on_policy(args.method):
        methods.on_policy_split(args)  # --prompt-tokens against --context, before anything is built
    check_temperature(args.temperature)  # before anything is trained
    check_alpha(args.alpha)
    ckpts = inputs.checkpoints(args)
    tok = inputs.tokenizer(args)
    paired = None
    if args.method == "uld":  # a teacher with another tokenizer: the text in both tokenizations
        teacher, t_state, student = inputs.teacher_and_student(args, None, tok)
        paired = inputs.paired_text(args, tok, teacher)
        ds = paired.student
    else:
        ds = inputs.dataset(args, tok)
    if args.dataset == "synthetic":
        rep.line(SYNTHETIC)
    cfg = inputs.run_config(args)
    inputs.check_schedule_memory(args, len(ds.y_train), 3 * args.seeds)  # teachers, standard and distilled
    seeds = list(range(args.seed, args.seed + args.seeds))
    ckpts = inputs.with_inputs(ckpts, ds, args.teacher)
    if paired is None:
        teacher, t_state, student = inputs.teacher_and_student(args, ds, tok)
    if tok is not None:
        trained = f"a byte-level BPE of {tok.get_vocab_size()} tokens trained here"
        rep.line(f"tokenizer: {args.tokenizer or trained}; the teacher's: {args.teacher}/tokenizer.json"
                 if paired is not None else
                 f"tokenizer: {args.tokenizer or (args.teacher + '/tokenizer.json' if t_state is not None else trained)}")
    inputs.validate_models((teacher, student), ds)
    if args.arch in ("transformer", "llama"):  # the larger step: a teacher trained here, else the student's
        inputs.check_lm_memory(args, student, "student", step=t_state is not None)
        if t_state is None:
            inputs.check_lm_memory(args, teacher, "teacher")
    objective = methods.objective(args, teacher, student, cfg.total_steps(len(ds.y_train)), tokenizer=tok)
    if hasattr(objective, "tap_shapes"):  # taps and connectors traced on abstract shapes
        methods.validate(objective, teacher, student, ds)
    if not getattr(objective, "teacher_online", False):  # on-policy: the teacher runs in the step, nothing cached
        inputs.check_logits_memory(ds, teacher, 1 if (args.teacher or t_state is not None) else 2 * args.seeds)
    rep.line(f"{ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} test, examples of shape {ds.input_shape}, "
             f"{ds.num_classes} classes; {cfg.describe()}; "
             + (f"T in {args.temperatures}, alpha in {args.alphas} (tuned)" if args.tune
                else f"method {args.method}: {methods.describe(objective)}" if objective is not None
                else f"T = {args.temperature:g}, alpha = {args.alpha:g}") + f"; {plural(args.seeds, 'seed')}")
    rep.line(f"teacher {inputs.describe(teacher)}, student {inputs.describe(student)}")
    if args.teacher and t_state is None:
        t_state = inputs.load_teacher(args.teacher, teacher, ds)
    if args.teacher:
        rep.line(f"teacher loaded from {args.teacher}")
    t_example = ds.x_train[:1] if paired is None else paired.extra["teacher_x"][:1]
    mesh = inputs.make_mesh(args, rep, len(seeds), cfg.batch_size,
                            [("teacher", teacher, t_example), ("student", student, ds.x_train[:1])])
    t_cfg = None
    if args.teacher_steps is not None:
        if args.tune or args.teacher:
            raise UsageError("--teacher-steps: expected a teacher trained here (no --teacher) and no --tune")
        t_cfg = dataclasses.replace(cfg, steps=args.teacher_steps, epochs=None)
        rep.line(f"teachers: {t_cfg.describe()}")
    metrics.check_tensorboard(args.tensorboard)
    inputs.claim_out(args)
    seed_names = lambda kind: [f"{kind}/seed{s}" for s in seeds]
    members = {"teachers": seed_names("teacher"), "students": seed_names("standard") + seed_names("distilled"),
               "standard": seed_names("standard"), "distilled": seed_names("distilled"),
               "tuning teachers": [f"teacher/seed{seeds[0]}"],
               "tuning students": [f"T{t:g}/alpha{a:g}/seed{s}" for t, a, s in
                                   zip(*sweep.grid(args.temperatures, args.alphas, seeds))]}
    log = metrics_log(args, members)
    tuned = None
    with rep.progress() as on_chunk, contextlib.closing(log):
        if args.tune:
            tuned = workflows.tuned_distill(
                teacher, student, ds, cfg, seeds, temperatures=args.temperatures, alphas=args.alphas,
                validation_fraction=args.validation_fraction, teacher_state=t_state, checkpoints=ckpts,
                on_chunk=on_chunk, log=rep.line, mesh=mesh, on_losses=rep.watch(log.losses))
            r = tuned.result
        else:
            r = workflows.distill(teacher, student, ds, cfg, seeds, temperature=args.temperature,
                                  alpha=args.alpha, teacher_state=t_state, checkpoints=ckpts,
                                  on_chunk=on_chunk, log=rep.line, mesh=mesh, teacher_cfg=t_cfg, on_losses=rep.watch(log.losses),
                                  objective=objective, extra_data=paired and paired.extra,
                                  teacher_data=paired and paired.teacher)
        log.evaluation("test", cfg.total_steps(len(ds.y_train)),
                       {"accuracy": r.accuracy["test"], "loss": r.eval_loss["test"]},
                       {"teacher": ["teacher/loaded"] if t_state is not None else seed_names("teacher"),
                        "standard": seed_names("standard"), "distilled": seed_names("distilled")})
    if tuned is not None:
        rep.table(f"validation accuracy ({args.validation_fraction:g} of the training rows), mean ± 95% CI over "
                  f"n = {plural(len(seeds), 'seed')}; "
                  f"rows T, columns alpha", ["T \\ alpha"] + [f"{a:g}" for a in tuned.alphas],
                  [[f"{T:g}"] + [fmt_ci(c) for c in row]
                   for T, row in zip(tuned.temperatures, tuned.validation_mean_ci)])
        rep.line(f"chosen on validation: T = {tuned.best[0]:g}, alpha = {tuned.best[1]:g}; students retrained "
                 f"on all {len(ds.y_train)} training rows")
    per_byte = None if paired is None else {"teacher": paired.tokens_per_byte["teacher"],
                                            "standard": paired.tokens_per_byte["student"],
                                            "distilled": paired.tokens_per_byte["student"]}
    return report_distill(args, rep, r, ds, student, tok, seeds, teacher=teacher, objective=objective,
                           tuned=tuned, teacher_label="teacher (loaded)" if t_state is not None else "teacher",
                           per_byte=per_byte)


def topk_coverage(model, variables, tokens, k: int, batch_size: int) -> float:
    """The mean, over every position of ``tokens`` (``[windows, length]``), of the probability
    mass ``model``'s top ``k`` tokens hold: sum(exp(top-k log-probabilities)), in [0, 1]. What
    a top-k cache keeps of the teacher (1: all of it); computed ``batch_size`` windows at a
    time, the last batch padded (its padding rows dropped)."""
    import jax
    import jax.numpy as jnp

    from kdjax.offline import topk_logprobs

    @jax.jit
    def mass(x):
        values, _ = topk_logprobs(model.apply(variables, x), k)
        return jnp.sum(jnp.exp(values), axis=-1).sum(axis=-1)  # [windows]: summed over positions

    tokens = np.asarray(tokens, np.int32)
    total = 0.0
    for i in range(0, len(tokens), batch_size):
        rows = tokens[i:i + batch_size]
        padded = np.concatenate([rows, np.zeros((batch_size - len(rows), tokens.shape[1]), np.int32)])
        total += float(np.asarray(mass(padded), np.float64)[:len(rows)].sum())
    return total / tokens.size


def cmd_teacher_logits(args, rep: Reporter) -> int:
    """``kdjax teacher-logits``: the teacher's top-k log-probabilities on the training windows
    of ``--dataset`` (as ``kdjax distill --arch llama`` cuts them), written once to a cache
    (``kdjax.offline.write_topk_cache``) with the tokenizer and the teacher's validation
    figures; a killed build resumes when run again."""
    from kdjax import checkpoint, offline
    from kdjax.fitting import evaluate_on
    from kdjax.tokenizer import check_vocabulary, content_sha256

    if not inputs.hf_folder(args):
        raise UsageError(f"--teacher: expected a Hugging Face checkpoint folder (config.json, *.safetensors), "
                         f"got {args.teacher}")
    if os.path.isfile(args.out):
        raise UsageError(f"--out: expected a directory for the cache, got an existing file {args.out}")
    if args.method == "uld":
        from kdjax.app.uld_cache import teacher_logits_uld

        return teacher_logits_uld(args, rep)
    args.k = 64 if args.k is None else args.k
    tok = inputs.tokenizer(args)
    ds = inputs.dataset(args, tok)
    teacher, t_state, _ = inputs.hf_teacher(args, student=False)
    check_vocabulary(tok, teacher)
    variables = {"params": t_state.params}
    rows, length = ds.x_train.shape
    rep.line(f"{ds.name}: {rows} training windows of {length} tokens; teacher "
             f"{inputs.describe(teacher)} from {args.teacher}; top-{args.k} log-probabilities as {args.values_dtype}")
    manifest_path = os.path.join(args.out, "manifest.json")
    if not args.overwrite and os.path.exists(manifest_path):
        rep.line(f"{args.out} holds a cache: it is resumed (the same teacher, data, tokenizer and k) or refused")
    t0 = time.perf_counter()
    ev = evaluate_on(teacher, t_state, ds.x_test, ds.y_test)
    coverage = round(topk_coverage(teacher, variables, ds.x_test, args.k, min(args.batch_size, len(ds.x_test))), 6)
    metadata = {"teacher_folder": os.path.abspath(args.teacher), "teacher_config": teacher.hf_config(),
                "tokenizer_sha256": content_sha256(tok), "dataset": ds.name, "context": int(length),
                # the shards' bytes depend on the batch (XLA's sums): a resume with another one is refused
                "batch_size": int(args.batch_size),
                "validation": {"tokens_sha256": inputs.array_sha256(ds.x_test),
                               "accuracy": float(ev["accuracy"]), "loss": float(ev["loss"]),
                               "topk_coverage": coverage}}
    inputs.claim_out(args)
    m = offline.write_topk_cache(args.out, teacher, variables, ds.x_train, args.k, batch_size=args.batch_size,
                                 values_dtype=np.dtype(args.values_dtype), metadata=metadata)
    checkpoint.atomic_write_text(os.path.join(args.out, "tokenizer.json"), tok.to_str())
    inputs.seal_out(args)
    seconds = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(args.out, sh["file"])) for sh in m["shards"])
    tokens = rows * length
    rep.line(f"wrote {args.out}: {len(m['shards'])} shard(s), {tokens} tokens, {m['bytes_per_token']} bytes per "
             f"token ({size / tokens:.1f} on disk, against {4 * m['vocab']} for float32 logits over the "
             f"{m['vocab']}-token vocabulary); {seconds:.1f} s")
    rep.line(f"teacher on the validation windows: next-token accuracy {float(ev['accuracy']):.4f}, "
             f"{float(ev['loss']) / np.log(2):.3f} bits per token; its top {args.k} hold {coverage:.1%} of its "
             f"probability mass (mean over positions)")
    if coverage < args.min_coverage:
        rep.warn(f"warning: the top {args.k} keep only {coverage:.1%} of the teacher's probability mass (below "
                 f"--min-coverage {args.min_coverage:g}): students distilled from this cache learn a truncated "
                 f"teacher; raise --k, or use a stronger teacher")
    if args.json:
        print(json.dumps({"cache": args.out, "rows": rows, "length": length, "k": args.k, "vocab": m["vocab"],
                          "bytes_per_token": m["bytes_per_token"], "bytes_on_disk": size, "seconds": seconds,
                          "topk_coverage": coverage, "teacher_validation": metadata["validation"],
                          "kdjax_version": version()}))
    return 0


def _distill_from_cache(args, rep: Reporter) -> int:
    """``kdjax distill --arch llama --teacher-logits CACHE``: the students of ``distill``
    trained from a teacher's cached top-k (``workflows.distill_offline``); no teacher runs.
    The student is of the cached teacher's family; the tokens must be the cache's."""
    from kdjax import offline
    from kdjax.losses import check_alpha, check_temperature
    from kdjax.tokenizer import check_vocabulary, content_sha256

    if args.method == "uld":  # a teacher of another tokenizer, cached per aligned group
        from kdjax.app.uld_cache import distill_from_uld_cache

        return distill_from_uld_cache(args, rep)
    for flag, given in (("--teacher", args.teacher), ("--tune", args.tune), ("--teacher-steps", args.teacher_steps),
                        ("--method " + args.method, args.method != "kd")):
        if given:
            raise UsageError(f"{flag}: not used with --teacher-logits (the cache is the teacher; --method kd "
                             f"with --temperature and --alpha, or uld for a cache of teacher-logits --method uld)")
    if args.topk_loss in ("hinge", "logistic_ranking"):
        for flag, given in (("--temperature", args.temperature is not None),
                            ("--topk-missing", args.topk_missing != "zero")):
            if given:
                raise UsageError(f"{flag}: not used with --topk-loss {args.topk_loss} (a ranking loss: it orders the "
                                 f"teacher's top k, at no temperature)")
    methods.resolve_temperature(args)
    check_temperature(args.temperature)
    check_alpha(args.alpha)
    ckpts = inputs.checkpoints(args)
    cache = args.teacher_logits
    try:
        values, indices, m = offline.read_topk_cache(cache)  # every shard verified
    except InputError as e:
        if offline.store.ULD_FORMAT in str(e):
            raise UsageError(f"--teacher-logits {cache}: a ULD cache (kdjax teacher-logits --method uld); expected "
                             f"--method uld to distil from it") from None
        raise UsageError(f"--teacher-logits: {e}") from None
    meta = m.get("metadata") or {}
    if "teacher_config" not in meta:
        raise UsageError(f"--teacher-logits {cache}: expected a cache written by kdjax teacher-logits (its manifest "
                         f"names the teacher's configuration), got one without")
    tok = inputs.tokenizer(args)
    ds = inputs.dataset(args, tok)
    if ds.x_train.shape != (m["rows"], m["length"]) or inputs.array_sha256(ds.x_train) != m["tokens"]:
        why = ("another tokenizer" if meta.get("tokenizer_sha256") != content_sha256(tok)
               else "other text or another --context / --text-bytes")
        raise UsageError(f"--teacher-logits {cache}: built for other training tokens than these ({why}; the cache: "
                         f"{meta.get('dataset')}, context {meta.get('context')})")
    try:  # the same tokens, and the same tokenizer by content (not only its size)
        offline.check_cache_tokenizer(m, tok)
    except InputError as e:
        raise UsageError(f"--teacher-logits: {e}") from None
    teacher = inputs.cache_teacher(cache, m, meta)
    student = inputs.student_like(teacher, args)
    check_vocabulary(tok, student)
    inputs.validate_models((student,), ds)
    inputs.check_lm_memory(args, student, "student")
    cfg = inputs.run_config(args)
    inputs.check_schedule_memory(args, len(ds.y_train), 2 * args.seeds)
    seeds = list(range(args.seed, args.seed + args.seeds))
    ckpts = inputs.with_inputs(ckpts, ds, os.path.join(cache, "manifest.json"))
    validation = meta.get("validation") or {}
    same_validation = validation.get("tokens_sha256") == inputs.array_sha256(ds.x_test)
    teacher_eval = {"test": {"accuracy": validation["accuracy"], "loss": validation["loss"]}} if same_validation \
        else None
    rep.line(f"{ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} validation windows; {cfg.describe()}; "
             f"top-k {args.topk_loss}, T = {args.temperature:g}, alpha = {args.alpha:g}; {plural(args.seeds, 'seed')}")
    coverage = validation.get("topk_coverage")
    rep.line(f"teacher: the top-{m['k']} cache {cache} ({m['bytes_per_token']} bytes per token"
             + ("" if coverage is None else f", {coverage:.1%} of the teacher's probability mass")
             + f"; {inputs.describe(teacher)}, not loaded); student {inputs.describe(student)}")
    r = distill_from_cache(args, rep, student, ds, cfg, seeds, ckpts, teacher_eval, values=values, indices=indices,
                           temperature=args.temperature, alpha=args.alpha, missing=args.topk_missing,
                           loss=args.topk_loss)
    extra = {"teacher_logits": {"cache": cache, "k": m["k"], "bytes_per_token": m["bytes_per_token"],
                                "missing": args.topk_missing, "loss": args.topk_loss, "teacher_folder": meta.get("teacher_folder"),
                                "topk_coverage": coverage}}
    return report_distill(args, rep, r, ds, student, tok, seeds, teacher=None, objective=None, tuned=None,
                           teacher_label=f"teacher (cached, top-{m['k']})", extra=extra)


def cmd_on_policy(args, rep: Reporter) -> int:
    """``kdjax on-policy``: ``kdjax.app.onpolicy_task`` with the command's sizes; a table per
    measure (mean ± 95% CI over seeds, paired against the first method) and results.json."""
    from kdjax.app import onpolicy_task as ot

    if args.warmup < 0:
        raise UsageError(f"--warmup: expected a number of steps >= 0, got {args.warmup}")
    if not args.lr > 0:
        raise UsageError(f"--lr: expected a number > 0, got {args.lr}")
    if len(set(args.methods)) != len(args.methods):
        raise UsageError(f"--methods: expected each method once, got {args.methods}")
    if args.batch_size > args.train:
        raise UsageError(f"--batch-size: expected at most --train ({args.train}) prompts, got {args.batch_size}")
    inputs.check_schedule_memory(args, args.train, args.seeds * len(args.methods) + 1)
    s = ot.Setup(task=ot.Task(length=args.length), train=args.train, test=args.test,
                 teacher=(args.teacher_layers, args.teacher_dim), student=(args.student_layers, args.student_dim),
                 teacher_steps=args.teacher_steps, warmup=args.warmup, steps=args.steps, batch=args.batch_size,
                 lr=args.lr)
    inputs.check_program_memory(s.largest_programs(), "--length, --batch-size, --train or the model sizes")
    inputs.claim_out(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    rep.line(f"sorting {args.length} digits: {args.train} training / {args.test} held-out prompts; teacher "
             f"{args.teacher_layers} x {args.teacher_dim} ({args.teacher_steps} steps), student {args.student_layers} "
             f"x {args.student_dim}: " + (f"{args.warmup} supervised steps, then " if args.warmup else "")
             + f"{args.steps} updates of each method, batch {args.batch_size}, Adam {args.lr:g}; {plural(len(seeds), 'seed')}")
    t0 = time.perf_counter()
    with rep.progress() as on_chunk:
        r = ot.run(s, seeds, tuple(args.methods), log=rep.line, on_progress=on_chunk)
    over = f"mean ± 95% CI over n = {plural(len(seeds), 'seed')}"
    base = args.methods[0]
    paired = r[f"paired_vs_{base}"]
    for key, title in (("accuracy", "exact-match accuracy of greedy answers (held out; higher is better)"),
                       ("teacher_nll", "teacher NLL of the student's own samples, nats per token (lower is better)"),
                       ("bits_per_token", "bits per token on the reference answers (lower is better)")):
        rep.table(f"{title}, {over}; teacher: {r['teacher'][key]:.4f}", ["method", key, f"- {base} (paired)"],
                  [[m, fmt_ci(r["mean_ci"][m][key]), "" if m == base else fmt_ci(paired[m][key], signed=True)]
                   for m in args.methods])
    r["conclusion"] = rep.conclude(
        [conclusion(f"Method {m} - {base}: exact-match accuracy on held-out prompts (paired by seed)", paired[m]["accuracy"],
                    len(seeds), better=f"{m} beats {base}", worse=f"{m} is worse than {base}")
         for m in args.methods[1:]] or [f"One method ({base}): nothing to compare; --methods lists several."])
    r["seconds"] = time.perf_counter() - t0
    r["config"] = vars(args) | {"func": None}
    return finish(args, rep, r, {})


def _sweep_conclusion(acc, stats, temps, alphas, n: int) -> str:
    """The best distilling cell (alpha > 0) against cross-entropy alone (alpha = 0) at its T,
    paired by seed (a sweep's members of one seed share init and minibatches); the cell is
    chosen on the test set, which the sentence says."""
    from kdjax.stats import mean_ci

    cells = [(i, j) for i in range(len(temps)) for j in range(len(alphas)) if alphas[j] != 0]
    if not cells:
        return "Every cell has alpha = 0 (cross-entropy alone): nothing is distilled, nothing to compare."
    i, j = max(cells, key=lambda ij: stats[ij[0]][ij[1]][0])
    cell = f"T = {temps[i]:g}, alpha = {alphas[j]:g}"
    if 0 not in alphas:
        return (f"The best distilling cell is {cell}: test accuracy {fmt_ci(stats[i][j])} (95% CI, n = "
                f"{plural(n, 'seed')}); add --alphas 0 for cross-entropy alone to compare against, paired by seed.")
    diff = mean_ci(acc[i, j] - acc[i, alphas.index(0)])
    return conclusion(f"The best distilling cell ({cell}, chosen on the test set, so optimistic) - cross-entropy "
                      f"alone (alpha = 0) at T = {temps[i]:g}, test accuracy (paired by seed)", diff, n)


def cmd_sweep(args, rep: Reporter) -> int:
    from kdjax import sweep, workflows
    from kdjax.app import metrics, plots
    from kdjax.stats import mean_ci
    from kdjax.train import make_hyper

    ckpts = inputs.checkpoints(args)
    tok = inputs.tokenizer(args)
    ds = inputs.dataset(args, tok)
    if args.dataset == "synthetic":
        rep.line(SYNTHETIC)
    cfg = inputs.run_config(args)
    temps, alphas = list(args.temperatures), list(args.alphas)
    inputs.check_schedule_memory(args, len(ds.y_train), len(temps) * len(alphas) * args.seeds + 1)
    seeds = list(range(args.seed, args.seed + args.seeds))
    ckpts = inputs.with_inputs(ckpts, ds, args.teacher)
    T, A, S = sweep.grid(temps, alphas, seeds)
    make_hyper(T, A)  # validates every value before anything is compiled
    teacher, t_state, student = inputs.teacher_and_student(args, ds, tok)
    inputs.validate_models((teacher, student), ds)
    inputs.check_logits_memory(ds, teacher, 1)  # one teacher's logits, shared by every member
    rep.line(f"{ds.name}: {len(T)} students ({len(temps)} temperatures x {len(alphas)} alphas x "
             f"{len(seeds)} seeds) as one compiled program; {cfg.describe()}")
    if args.teacher and t_state is None:
        t_state = inputs.load_teacher(args.teacher, teacher, ds)
    if args.members_per_group is not None and (args.mesh or len(inputs._devices()) > 1):
        raise UsageError("--members-per-group: groups of members run on one device; got it with several "
                         "(a mesh splits the members over devices instead; leave it at 'all')")
    mesh = inputs.make_mesh(args, rep, len(T), cfg.batch_size,
                            [("teacher", teacher, ds.x_train[:1]), ("student", student, ds.x_train[:1])])
    metrics.check_tensorboard(args.tensorboard)
    inputs.claim_out(args)
    names = {"teachers": [f"teacher/seed{seeds[0]}"],
             "students": [f"T{t:g}/alpha{a:g}/seed{s}" for t, a, s in zip(T, A, S)]}
    log = metrics_log(args, names)
    with rep.progress() as on_chunk, contextlib.closing(log):
        r = workflows.run_sweep(teacher, student, ds, cfg, T, A, S, teacher_state=t_state, teacher_seed=seeds[0],
                                checkpoints=ckpts, on_chunk=on_chunk, log=rep.line, mesh=mesh,
                                members_per_group=args.members_per_group, on_losses=rep.watch(log.losses))
        log.evaluation("test", cfg.total_steps(len(ds.y_train)),
                       {"accuracy": {"teacher": [r.teacher_accuracy], "students": r.accuracy}},
                       {"teacher": ["teacher/loaded" if t_state is not None else names["teachers"][0]],
                        "students": names["students"]})
    acc = r.accuracy.reshape(len(temps), len(alphas), len(seeds))
    stats = [[mean_ci(acc[i, j]) for j in range(len(alphas))] for i in range(len(temps))]
    rep.table(f"mean test accuracy ± 95% CI over n = {plural(len(seeds), 'seed')} (rows: temperature, columns: alpha)",
              ["T \\ alpha"] + [f"{a:g}" for a in alphas],
              [[f"{t:g}"] + [fmt_ci(c, digits=3) for c in row] for t, row in zip(temps, stats)])
    best = max(((i, j) for i in range(len(temps)) for j in range(len(alphas))),
               key=lambda ij: stats[ij[0]][ij[1]][0])
    rep.line(f"teacher test accuracy {r.teacher_accuracy:.4f}; best: T = {temps[best[0]]:g}, "
             f"alpha = {alphas[best[1]]:g} ({stats[best[0]][best[1]][0]:.4f})")
    means = np.array([[m for m, _ in row] for row in stats])
    lines = [_sweep_conclusion(acc, stats, temps, alphas, len(seeds))]
    if args.dataset == "synthetic":
        lines.append(SYNTHETIC)
    results = {"dataset": ds.name, "config": vars(args) | {"func": None}, "conclusion": rep.conclude(lines),
               "temperatures": temps,
               "alphas": alphas, "seeds": seeds, "teacher_test_accuracy": r.teacher_accuracy,
               "test_accuracy": acc.tolist(), "mean_ci": stats,
               "best": {"temperature": temps[best[0]], "alpha": alphas[best[1]]},
               "members_per_group": r.members_per_group,
               "members_per_group_seconds": None if r.pick_seconds is None
               else {str(g): t for g, t in r.pick_seconds.items()}}
    if args.out and tok is not None:
        from kdjax.checkpoint import atomic_write_text

        atomic_write_text(os.path.join(args.out, "tokenizer.json"), tok.to_str())
    figs = {"heatmap": lambda: plots.heatmap(os.path.join(args.out, "sweep_heatmap.png"), temps, alphas,
                                             means, f"{ds.name}: {plural(len(seeds), 'seed')} per cell")}
    return finish(args, rep, results, figs)

