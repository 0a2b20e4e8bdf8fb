"""``kdjax teacher-logits --method uld`` and ``kdjax distill --teacher-logits CACHE --method uld``:
a teacher of another tokenizer cached once (its sorted probabilities per byte-aligned group of
the student's windows, ``kdjax.offline.write_uld_cache``), then students distilled from the
cache with no teacher run."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from kdjax.app import UsageError, inputs
from kdjax.app.reporting import Reporter, plural, version
from kdjax.errors import InputError

__all__ = ["teacher_logits_uld", "distill_from_uld_cache", "ULD_K"]

ULD_K = 256  # probabilities kept per aligned group by default (--k); the teacher's whole vocabulary is exact


def _check_memory(rows: int, groups: int, k: int, itemsize: int, flag: str) -> None:
    """Refuse a cache whose values would take more than half of this machine's memory."""
    need, memory = rows * groups * (k * itemsize + 4), inputs._physical_memory()
    if memory is not None and need > memory // 2:
        raise UsageError(f"{flag}: the cache's {rows} windows x {groups} groups x top {k} would take "
                         f"{need / 2**30:.1f} GiB, more than half of this machine's memory; expected a smaller --k "
                         f"(or --values-dtype float16, or less text)")


def _coverage(values, mass, valid, k: int, vocab: int) -> float:
    """The mean share of each valid group's merged probability its top k hold: 1 when k is the
    whole vocabulary; else over the groups whose mass float32 holds (a product of many small
    conditionals can underflow), each share at most 1 (float16 values round)."""
    if k >= vocab:
        return 1.0
    keep = valid & (mass > 0)
    share = np.minimum(values.astype(np.float64).sum(-1)[keep] / mass.astype(np.float64)[keep], 1.0)
    return float(np.mean(share)) if share.size else 1.0


def teacher_logits_uld(args, rep: Reporter) -> int:
    """``kdjax teacher-logits --method uld``: the student's windows (its tokenizer ``--tokenizer``
    or a BPE of ``--vocab-size`` trained here) paired with the teacher's tokenization, and the
    teacher's sorted top-k per aligned group written once, with both tokenizers."""
    from kdjax import checkpoint, offline
    from kdjax.app.inputs import teacher_tokenizer
    from kdjax.fitting import evaluate_on
    from kdjax.losses import check_temperature
    from kdjax.tokenizer import check_vocabulary, content_sha256

    temperature = 1.0 if args.temperature is None else args.temperature
    check_temperature(temperature, "--temperature")
    tok = inputs.tokenizer(args)  # the student's
    teacher, t_state, _ = inputs.hf_teacher(args, student=False)
    t_tok = teacher_tokenizer(args)
    check_vocabulary(t_tok, teacher)
    paired = inputs.paired_text(args, tok, teacher)
    k = min(ULD_K if args.k is None else args.k, teacher.vocab_size)
    if args.k is not None and args.k > teacher.vocab_size:
        raise UsageError(f"--k: expected at most the teacher's vocabulary ({teacher.vocab_size}), got {args.k}")
    rows, groups = paired.extra["group_valid"].shape
    _check_memory(rows, groups, k, np.dtype(args.values_dtype).itemsize, "--k")
    rep.line(f"{paired.student.name}: {rows} training windows of {args.context} tokens, {groups} aligned groups "
             f"each at most; teacher {inputs.describe(teacher)} from {args.teacher} with its own "
             f"{t_tok.get_vocab_size()}-token tokenizer; top {k} of each group's sorted probabilities at T = "
             f"{temperature:g}, {args.uld_merge} merging, as {args.values_dtype}")
    t0 = time.perf_counter()
    ev = evaluate_on(teacher, t_state, paired.teacher.x_test, paired.teacher.y_test)
    metadata = {"teacher_folder": os.path.abspath(args.teacher), "teacher_config": teacher.hf_config(),
                "tokenizer_sha256": content_sha256(tok),
                "teacher_tokenizer_sha256": content_sha256(t_tok), "dataset": paired.student.name,
                "context": int(args.context), "text_bytes": int(args.text_bytes),
                "batch_size": int(args.batch_size),
                "validation": {"tokens_sha256": inputs.array_sha256(paired.teacher.x_test),
                               "accuracy": float(ev["accuracy"]), "loss": float(ev["loss"]),
                               "tokens_per_byte": paired.tokens_per_byte["teacher"]}}
    inputs.claim_out(args)
    try:
        m = offline.write_uld_cache(args.out, teacher, {"params": t_state.params}, paired.extra, k,
                                    temperature=temperature, merge=args.uld_merge, batch_size=args.batch_size,
                                    values_dtype=np.dtype(args.values_dtype), metadata=metadata)
        values, mass, _ = offline.read_uld_cache(args.out)
    except InputError as e:
        raise UsageError(f"--out: {e}") from None
    checkpoint.atomic_write_text(os.path.join(args.out, "tokenizer.json"), tok.to_str())
    checkpoint.atomic_write_text(os.path.join(args.out, "teacher_tokenizer.json"), t_tok.to_str())
    inputs.seal_out(args)
    seconds = time.perf_counter() - t0
    coverage = _coverage(values, mass, paired.extra["group_valid"], k, m["vocab"])
    size = sum(os.path.getsize(os.path.join(args.out, sh["file"])) for sh in m["shards"])
    tokens = paired.student.y_train.size
    rep.line(f"wrote {args.out}: {len(m['shards'])} shard(s), {m['bytes_per_group']} bytes per group "
             f"({size / tokens:.1f} per student token on disk, against {4 * m['vocab']} for float32 logits of "
             f"each teacher token); {seconds:.1f} s")
    bpb = float(ev["loss"]) / np.log(2) * paired.tokens_per_byte["teacher"]
    rep.line(f"teacher on its validation windows: {bpb:.3f} bits per byte; its top {k} hold {coverage:.1%} of each "
             f"group's merged probability (mean over groups)")
    if coverage < args.min_coverage:
        rep.warn(f"warning: the top {k} keep only {coverage:.1%} of the teacher's merged probability (below "
                 f"--min-coverage {args.min_coverage:g}): the rest counts as 0 in the loss; raise --k")
    if args.json:
        print(json.dumps({"cache": args.out, "method": "uld", "rows": rows, "groups": groups, "k": k,
                          "vocab": m["vocab"], "values_dtype": m["values_dtype"], "temperature": temperature,
                          "merge": args.uld_merge, "bytes_per_group": m["bytes_per_group"], "bytes_on_disk": size,
                          "seconds": seconds, "coverage": coverage, "teacher_validation": metadata["validation"],
                          "kdjax_version": version()}))
    return 0


def distill_from_uld_cache(args, rep: Reporter) -> int:
    """``kdjax distill --arch llama --teacher-logits CACHE --method uld``: the standard and ULD
    students of ``distill --method uld`` from a cache of ``teacher-logits --method uld``, no
    teacher run. The cache fixes the teacher's temperature and merging; the text, context and
    tokenizers must be the cache's."""
    from kdjax import crosstok, offline
    from kdjax.app.distill_report import distill_from_cache, report_distill
    from kdjax.losses import check_alpha
    from kdjax.tokenizer import check_vocabulary, content_sha256, load_tokenizer

    for flag, given in (("--teacher", args.teacher), ("--tune", args.tune), ("--teacher-steps", args.teacher_steps),
                        ("--topk-loss", args.topk_loss != "kl"), ("--topk-missing", args.topk_missing != "zero")):
        if given:
            raise UsageError(f"{flag}: not used with --teacher-logits and --method uld (the cache is the teacher)")
    if args.uld_hybrid:
        raise UsageError("--uld-hybrid: not used with --teacher-logits (the cache keeps each group's sorted "
                         "probabilities, not each shared token's: run the hybrid form with --teacher DIR)")
    check_alpha(args.alpha)
    cache = args.teacher_logits
    try:
        m = offline.store._read_manifest(cache, offline.store.ULD_FORMAT)
    except InputError as e:
        raise UsageError(f"--teacher-logits: {e}") from None
    meta = m["metadata"]
    if "teacher_config" not in meta:
        raise UsageError(f"--teacher-logits {cache}: expected a cache written by kdjax teacher-logits --method uld "
                         f"(its manifest names the teacher's configuration), got one without")
    if sum(sh["rows"] for sh in m["shards"]) != m["rows"]:
        raise UsageError(f"--teacher-logits {cache}: the cache is unfinished; run the same kdjax teacher-logits "
                         f"--method uld command again to finish it")
    if args.temperature is not None and args.temperature != m["temperature"]:
        raise UsageError(f"--temperature {args.temperature:g}: the cache holds the teacher's probabilities at T = "
                         f"{m['temperature']:g} (kdjax teacher-logits --temperature); expected that, or a new cache")
    if args.uld_merge is not None and args.uld_merge != m["merge"]:
        raise UsageError(f"--uld-merge {args.uld_merge}: the cache's groups were merged {m['merge']}; expected "
                         f"--uld-merge {m['merge']} (or none: the cache's), or a new cache")
    args.temperature, args.uld_merge = float(m["temperature"]), m["merge"]
    ckpts = inputs.checkpoints(args)
    teacher = inputs.cache_teacher(cache, m, meta)
    t_path = os.path.join(cache, "teacher_tokenizer.json")
    if not os.path.isfile(t_path):
        raise UsageError(f"--teacher-logits {cache}: has no teacher_tokenizer.json (kdjax teacher-logits --method uld "
                         f"writes one); rebuild the cache")
    tok, t_tok = inputs.tokenizer(args), load_tokenizer(t_path)
    try:
        offline.check_cache_tokenizer(m, tok)
        check_vocabulary(t_tok, teacher)
    except InputError as e:
        raise UsageError(f"--teacher-logits: {e}") from None
    if content_sha256(t_tok) != meta.get("teacher_tokenizer_sha256"):
        raise UsageError(f"--teacher-logits {cache}: teacher_tokenizer.json is not the tokenizer the cache was built "
                         f"with (its content sha256 differs from the manifest's); rebuild the cache")
    if args.context != meta.get("context"):
        raise UsageError(f"--context {args.context}: the cache was built for windows of {meta.get('context')} tokens")
    paired = inputs.paired_text(args, tok, teacher, t_tok)
    ds = paired.student
    student = inputs.student_like(teacher, args).clone(vocab_size=int(tok.get_vocab_size()))
    check_vocabulary(tok, student)
    inputs.validate_models((student,), ds)
    inputs.check_lm_memory(args, student, "student")
    _check_memory(m["rows"], m["groups"], m["k"], np.dtype(m["values_dtype"]).itemsize, "--teacher-logits")
    try:
        values, _, m = offline.read_uld_cache(cache, extra=paired.extra)
    except InputError as e:
        if "built for other windows" in str(e):
            raise UsageError(f"--teacher-logits {cache}: built for other windows than these ({paired.student.name}, "
                             f"--text-bytes {args.text_bytes}; the cache: {meta.get('dataset')}, its --text-bytes "
                             f"{meta.get('text_bytes', 'not recorded')})") from None
        raise UsageError(f"--teacher-logits: {e}") from None
    cfg = inputs.run_config(args)
    inputs.check_schedule_memory(args, len(ds.y_train), 2 * args.seeds)
    seeds = list(range(args.seed, args.seed + args.seeds))
    ckpts = inputs.with_inputs(ckpts, ds, os.path.join(cache, "manifest.json"))
    objective = crosstok.ULD(crossentropy_weight=1.0 - args.alpha, distillation_weight=args.alpha,
                             student_temperature=args.temperature, teacher_temperature=args.temperature,
                             merge=args.uld_merge)
    validation = meta.get("validation") or {}
    same = validation.get("tokens_sha256") == inputs.array_sha256(paired.teacher.x_test)
    teacher_eval = {"test": {"accuracy": validation["accuracy"], "loss": validation["loss"]}} if same else None
    rep.line(f"{ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} validation windows; {cfg.describe()}; "
             f"method uld: {objective.describe()}; {plural(args.seeds, 'seed')}")
    rep.line(f"teacher: the ULD cache {cache} (top {m['k']} per group, {m['bytes_per_group']} bytes; "
             f"{inputs.describe(teacher)}, not loaded); student {inputs.describe(student)}")
    extra = {k: paired.extra[k] for k in crosstok.align.ALIGNMENT} | {"teacher_sorted": values}
    r = distill_from_cache(args, rep, student, ds, cfg, seeds, ckpts, teacher_eval, objective=objective,
                           extra_data=extra)
    per_byte = {"teacher": paired.tokens_per_byte["teacher"], "standard": paired.tokens_per_byte["student"],
                "distilled": paired.tokens_per_byte["student"]}
    extra_out = {"teacher_logits": {"cache": cache, "method": "uld", "k": m["k"], "merge": m["merge"],
                                    "values_dtype": m["values_dtype"],
                                    "temperature": m["temperature"], "bytes_per_group": m["bytes_per_group"],
                                    "teacher_folder": meta.get("teacher_folder")}}
    return report_distill(args, rep, r, ds, student, tok, seeds, teacher=None, objective=objective, tuned=None,
                           teacher_label=f"teacher (cached, top-{m['k']} per group)", extra=extra_out,
                           per_byte=per_byte)
