"""``kdjax lm-methods``: which language-model distillation method, at what cost.

On the bundled text (one byte-level BPE for teacher and students), a teacher trained here and a
student of a quarter of its transformer parameters, trained by every method for the same
student updates (same init and minibatches per seed, one vmapped program per method), read
at each budget on the validation windows in **bits per byte**:

* ``ce``: cross-entropy alone (the paired baseline);
* ``ce_half``: cross-entropy on the second half's targets only (what seqkd and the on-policy
  methods see of each window: the control for their having half the targets);
* ``kd``: dense KD, ``(1 − alpha) CE + alpha T² KL`` on the teacher's logits of every window
  (computed once and held in memory: the teacher reads the corpus once);
* ``topk8``, ``topk64``, ``topk_all``: the same loss from a cache of the teacher's top k
  (``kdjax.fused.FusedLM``; ``topk_all`` keeps the whole vocabulary: ``kd`` by another path);
* ``seqkd``: cross-entropy on the teacher's greedy continuation of each window's first half
  (Kim & Rush: its output, the loss on those targets only);
* ``gkd0``, ``gkd0.5``, ``gkd1``: TRL's GKD (beta 0.5, sampling T 0.9) at lmbda 0, 0.5, 1,
  completing the second half of each window;
* ``reverse_kl``: on-policy reverse KL (tinker-cookbook's), the same split;
* ``uld``: ``(1 − alpha) CE + alpha ULD`` against a second teacher of the same size trained
  on another segmentation of the same text (a BPE whose merges cross words, of
  ``uld_vocab_size`` tokens; ``kdjax.crosstok``).

seqkd and the on-policy methods train on the second half's targets (positions ``prompt − 1``
on) only, so each student is also read on those. Costs per method: teacher tokens processed
to reach the budget, wall seconds to the budget (preparation and compilation included,
evaluation not; the teachers' training, shared, apart), the steady milliseconds per update
of all seeds' students together (one vmapped program: under ``vmap`` GKD's per-member choice
between data and samples runs both branches, so gkd0 pays for sampling too), and bytes kept
per training token. Each finished teacher and method is saved (``--out``/checkpoints) with the
study's identity (settings, data, kdjax version); ``--resume`` reads back what is finished and
refuses parts of another study.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np

from kdjax.app import UsageError

__all__ = ["METHODS", "Setup", "run"]

METHODS = ("ce", "ce_half", "kd", "topk8", "topk64", "topk_all", "seqkd", "gkd0", "gkd0.5", "gkd1", "reverse_kl",
           "uld")
GKD_BETA, GKD_TEMPERATURE = 0.5, 0.9  # TRL's GKDConfig defaults
TEACHER_SEED = 1_000_003  # the teachers' seed: the first student seed + this (their own init and minibatches)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The study's sizes (``kdjax lm-methods``' flags)."""

    text_bytes: int = 2_000_000  # the whole bundled text (1.4 MB): a teacher trained longer on less overfits
    context: int = 64
    vocab_size: int = 512
    uld_vocab_size: int = 1024
    teacher: tuple = (2, 128)  # layers, hidden size
    student: tuple = (2, 64)
    teacher_steps: int = 1500
    budgets: tuple = (100, 300)
    batch: int = 32
    lr: float = 1e-3
    temperature: float = 1.0
    alpha: float = 0.5

    @property
    def prompt(self) -> int:
        """The on-policy methods' and SeqKD's prompt: the first half of each window."""
        return self.context // 2


def _llama(vocab: int, size: tuple, context: int):
    from kdjax.models import Llama

    layers, dim = size
    heads = max(1, dim // 32)
    return Llama(vocab_size=vocab, hidden_size=dim, intermediate_size=4 * dim, num_layers=layers, num_heads=heads,
                 num_kv_heads=max(1, heads // 2), max_position_embeddings=context)


def _cfg(s: Setup, steps: int):
    from kdjax.fitting import RunConfig

    return RunConfig(steps=steps, batch_size=s.batch, learning_rate=s.lr)


class Study:
    """The data, the two teachers and one method at a time; finished parts saved under
    ``directory`` (None: nothing saved) with the study's identity, which a resumed study must
    share (``resume``: read back; a part of another study is refused in one line)."""

    def __init__(self, s: Setup, seeds, directory: str | None, log, *, resume: bool = False, uld: bool = True):
        import hashlib

        from kdjax import data
        from kdjax import tokenizer as tk
        from kdjax.app.reporting import version
        from kdjax.crosstok.text import paired_text

        self.s, self.seeds, self.dir, self.log, self.resume = s, [int(x) for x in seeds], directory, log, resume
        _, train, _, _ = data.text_documents(None, utf8=True)
        docs = [data.decode_text(d) for d in data._first(train, s.text_bytes)]
        self.tok = tk.train_bpe(docs, s.vocab_size)
        # another segmentation of the same text: merges across words, another vocabulary size
        self.uld_tok = tk.train_bpe(docs, s.uld_vocab_size, split_words=False)
        self.paired = paired_text(s.context, student_tokenizer=self.tok, teacher_tokenizer=self.uld_tok,
                                  max_bytes=s.text_bytes, max_teacher_length=4 * s.context if uld else None)
        self.ds = self.paired.student
        self.per_byte = self.paired.tokens_per_byte
        vocab = int(self.tok.get_vocab_size())
        self.student = _llama(vocab, s.student, s.context)
        self.teacher = _llama(vocab, s.teacher, s.context)
        width = self.paired.extra["teacher_x"].shape[1]
        self.uld_teacher = _llama(int(self.uld_tok.get_vocab_size()), s.teacher, max(width, s.context))
        h = hashlib.sha256()
        for d in (self.ds, self.paired.teacher):
            for a in (d.x_train, d.y_train, d.x_test, d.y_test):
                h.update(np.ascontiguousarray(a).tobytes())
        self.identity = json.loads(json.dumps({
            "setup": dataclasses.asdict(s), "seeds": self.seeds, "data_sha256": h.hexdigest(),
            "gkd": [GKD_BETA, GKD_TEMPERATURE], "kdjax": version()}))
        self._teachers = {}

    # ------------------------------------------------------------------ saved parts

    def _path(self, name: str) -> str | None:
        return None if self.dir is None else os.path.join(self.dir, name)

    def _saved(self, name: str):
        """A finished part of this study, or None; one of another study is refused."""
        path = self._path(name)
        if path is None or not os.path.exists(path):
            return None
        with open(path) as f:
            saved = json.load(f)
        if saved.get("identity") != self.identity:
            raise UsageError(f"--resume: {path} belongs to a study with other settings, data or kdjax version; "
                             f"expected the same command (or --overwrite to start over)")
        return saved

    def _save(self, name: str, value: dict) -> None:
        from kdjax.checkpoint import atomic_write_text

        if self.dir is not None:
            os.makedirs(self.dir, exist_ok=True)
            atomic_write_text(self._path(name), json.dumps(value | {"identity": self.identity}))

    # ------------------------------------------------------------------ teachers

    def teacher_state(self, which: str):
        """``(TrainState, {"bits_per_byte", "seconds"})`` of the main or ULD teacher: trained
        here once (on a seed apart from the students'), or read back from a finished part."""
        import jax
        import jax.numpy as jnp

        from kdjax import checkpoint
        from kdjax.fitting import evaluate_on, fit_members
        from kdjax.train import state_from_params

        if which in self._teachers:
            return self._teachers[which]
        model, ds = (self.teacher, self.ds) if which == "main" else (self.uld_teacher, self.paired.teacher)
        tpb = self.per_byte["student" if which == "main" else "teacher"]
        info, path = self._saved(f"teacher_{which}.json"), self._path(f"teacher_{which}.ckpt")
        if info is not None and os.path.exists(path):
            tree, _ = checkpoint.load(path)
            state = state_from_params(jax.tree_util.tree_map(jnp.asarray, tree["params"]))
        else:
            t0 = time.perf_counter()
            states, _ = fit_members(model, "ce", ds, _cfg(self.s, self.s.teacher_steps), [self.seeds[0] + TEACHER_SEED])
            state = jax.tree_util.tree_map(lambda a: a[0], states)
            loss = float(evaluate_on(model, state, ds.x_test, ds.y_test)["loss"])
            info = {"bits_per_byte": loss / math.log(2) * tpb, "seconds": time.perf_counter() - t0}
            if self.dir is not None:
                os.makedirs(self.dir, exist_ok=True)
                checkpoint.save(path, {"params": state.params}, {"model": repr(model)})
                self._save(f"teacher_{which}.json", info)  # after the weights: its presence means both are there
            self.log(f"teacher ({which}): {info['bits_per_byte']:.3f} bits per byte, {info['seconds']:.0f} s")
        info = {k: info[k] for k in ("bits_per_byte", "seconds")}
        self._teachers[which] = (state, info)
        return state, info

    # ------------------------------------------------------------------ one method

    def method(self, name: str) -> dict:
        """The students of ``name`` at every budget (saved; a finished one is read back)."""
        saved = self._saved(f"method_{name}.json")
        if saved is not None:
            self.log(f"{name}: finished in an earlier run, read back")
            return saved
        import jax

        s = self.s
        t0 = time.perf_counter()
        objective, kw, ds, teacher_tokens, bytes_per_token = self._objective(name)
        prep = time.perf_counter() - t0
        budgets = sorted(s.budgets)
        out = {"bits_per_byte": {}, "second_half_bits_per_byte": {}, "seconds": {}, "teacher_tokens": {}}
        evaluating, marks = [0.0], []  # seconds spent evaluating; (updates, seconds) at each chunk's end

        def on_chunk(done, total, states):
            jax.block_until_ready(states)  # the chunk's work done (dispatch is asynchronous)
            now = time.perf_counter()
            marks.append((done, now - t0 - evaluating[0]))
            if done in budgets:
                b = str(done)
                full, half = self._bits_per_byte(states)
                out["bits_per_byte"][b], out["second_half_bits_per_byte"][b] = full, half
                out["seconds"][b] = marks[-1][1]
                out["teacher_tokens"][b] = int(teacher_tokens(done))
            evaluating[0] += time.perf_counter() - now

        from kdjax.fitting import fit_members

        fit_members(self.student, objective, ds, _cfg(s, budgets[-1]), self.seeds, chunk=math.gcd(*budgets),
                    on_chunk=on_chunk, **kw)
        (u0, t_first), (u1, t_last) = marks[0], marks[-1]
        out |= {"prepare_seconds": prep, "first_chunk_seconds": t_first - prep, "bytes_per_token": bytes_per_token,
                "ms_per_update": 1000 * (t_last - t_first) / (u1 - u0) if u1 > u0 else None}
        self._save(f"method_{name}.json", out)
        b = str(budgets[-1])
        self.log(f"{name}: {np.mean(out['bits_per_byte'][b]):.3f} bits per byte at {b} updates, "
                 f"{out['seconds'][b]:.0f} s")
        return out

    def _bits_per_byte(self, states):
        """Each member's validation bits per byte: over every target, and over the second half's
        (the targets the on-policy methods and SeqKD train on: positions ``prompt - 1 ..``)."""
        import jax
        import jax.numpy as jnp

        from kdjax.objectives import apply_model

        @jax.jit
        def nll(params, model_state, x, y):
            logits = jax.vmap(lambda p, m: apply_model(self.student, p, m, x, train=False)[0])(params, model_state)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            return -jnp.take_along_axis(logp, jnp.broadcast_to(y, logp.shape[:-1])[..., None], axis=-1)[..., 0]

        x, y = self.ds.x_test, self.ds.y_test
        per = np.concatenate([np.asarray(nll(states.params, states.model_state, jnp.asarray(x[i:i + 64]),
                                             jnp.asarray(y[i:i + 64]))) for i in range(0, len(x), 64)], axis=1)
        scale = self.per_byte["student"] / math.log(2)
        full = per.mean(axis=(1, 2)) * scale
        half = per[:, :, self.s.prompt - 1:].mean(axis=(1, 2)) * scale
        return full.astype(np.float64).tolist(), half.astype(np.float64).tolist()

    def _objective(self, name: str):
        """``(objective, fit_members keywords, data, teacher tokens at n updates, bytes per token)``."""
        from kdjax.crosstok import ULD
        from kdjax.fused import FusedLM
        from kdjax.objectives import as_variables
        from kdjax.train import make_hyper

        s, ds, n = self.s, self.ds, len(self.seeds)
        rows, length = ds.x_train.shape
        once = lambda _: rows * length  # the teacher read every window once
        hyper = make_hyper(np.full(n, s.temperature), np.full(n, s.alpha))
        second_half = np.zeros(ds.y_train.shape, bool)
        second_half[:, s.prompt - 1:] = True
        if name in ("ce", "ce_half"):
            return "ce", ({"extra_data": {"where": second_half}} if name == "ce_half" else {}), ds, lambda _: 0, 0
        if name == "uld":
            t_state, _ = self.teacher_state("uld")
            width = self.paired.extra["teacher_x"].shape[1]
            obj = ULD(crossentropy_weight=1 - s.alpha, distillation_weight=s.alpha, student_temperature=s.temperature,
                      teacher_temperature=s.temperature, teacher=self.uld_teacher)
            return obj, {"extra_data": self.paired.extra, "teacher_variables": as_variables(t_state)}, ds, \
                lambda u: u * s.batch * width, 0
        t_state, _ = self.teacher_state("main")
        variables = as_variables(t_state)
        vocab = int(self.teacher.vocab_size)
        if name == "kd":
            from kdjax.fitting import teacher_logits_for

            logits = teacher_logits_for(self.teacher, t_state, ds)
            return "kd", {"hyper": hyper, "teacher_logits": logits}, ds, once, 4 * vocab
        if name.startswith("topk"):
            k = vocab if name == "topk_all" else int(name[4:])
            values, indices = _topk(self.teacher, variables, ds.x_train, k)
            return FusedLM(missing="zero"), {"hyper": hyper, "extra_data": {
                "teacher_topk_values": values, "teacher_topk_indices": indices}}, ds, once, 8 * k
        if name == "seqkd":  # CE on the teacher's second halves only (Kim & Rush: its outputs, not the prompt)
            return "ce", {"extra_data": {"where": second_half}}, _seqkd_data(self.teacher, variables, ds, s.prompt), \
                lambda _: rows * 2 * length, 4
        from kdjax.onpolicy import OnPolicy

        new = s.context - s.prompt
        if name == "reverse_kl":
            obj = OnPolicy(self.teacher, "reverse_kl", max_new_tokens=new, prompt_length=s.prompt)
        else:
            obj = OnPolicy(self.teacher, "gkd", max_new_tokens=new, lmbda=float(name[3:]), beta=GKD_BETA,
                           temperature=GKD_TEMPERATURE, prompt_length=s.prompt)
        return obj, {"teacher_variables": variables}, ds, lambda u: u * s.batch * s.context, 0


def _topk(teacher, variables, x, k: int, batch: int = 64):
    """The teacher's top-k log-probabilities and ids on every window (in memory)."""
    import jax
    import jax.numpy as jnp

    from kdjax.losses import topk_logprobs

    f = jax.jit(lambda v, xb: topk_logprobs(teacher.apply(v, xb), k))
    parts = [f(variables, jnp.asarray(x[i:i + batch])) for i in range(0, len(x), batch)]
    return (np.concatenate([np.asarray(p[0]) for p in parts]), np.concatenate([np.asarray(p[1]) for p in parts]))


def _seqkd_data(teacher, variables, ds, prompt: int, batch: int = 64):
    """``ds`` with each training window's text after ``prompt`` tokens written by the teacher (greedy)."""
    import jax
    import jax.numpy as jnp

    from kdjax.data import Dataset
    from kdjax.generation import generate

    rows, length = ds.x_train.shape

    @jax.jit
    def write(v, p):  # the window's tokens after the prompt, then the target after its last
        seq = generate(teacher, v, p, length - prompt)
        return jnp.concatenate([seq, jnp.argmax(teacher.apply(v, seq)[:, -1:], axis=-1).astype(seq.dtype)], axis=1)

    seq = np.concatenate([np.asarray(write(variables, jnp.asarray(ds.x_train[i:i + batch, :prompt])))
                          for i in range(0, rows, batch)])
    return Dataset(ds.name, seq[:, :length].astype(np.int32), seq[:, 1:].astype(np.int32), ds.x_test, ds.y_test,
                   ds.num_classes)


def summarize(results: dict, methods, budgets) -> dict:
    """Mean ± 95% CI per method and budget, over every target and the second half's, each
    paired against ``ce`` (by seed), beside the method's costs."""
    from kdjax.stats import mean_ci

    out = {}
    for b in map(str, budgets):
        row = {}
        for m in methods:
            r = results[m]
            row[m] = {"seconds": r["seconds"][b], "teacher_tokens": r["teacher_tokens"][b],
                      "bytes_per_token": r["bytes_per_token"], "ms_per_update": r["ms_per_update"]}
            for key, name in (("bits_per_byte", ""), ("second_half_bits_per_byte", "second_half_")):
                v, base = np.asarray(r[key][b]), np.asarray(results["ce"][key][b])
                row[m] |= {f"{name}mean_ci": mean_ci(v), f"{name}paired_vs_ce": mean_ci(v - base)}
        out[b] = row
    return out


def run(s: Setup, seeds, methods, *, directory: str | None, resume: bool = False, log=print) -> dict:
    """The study: both teachers (as the methods need them), then each method; results.json's body."""
    if methods[0] != "ce":
        raise UsageError(f"--methods: expected ce first (the paired baseline), got {methods[0]}")
    study = Study(s, seeds, directory, log, resume=resume, uld="uld" in methods)
    log(f"{study.ds.name}: {len(study.ds.y_train)} training / {len(study.ds.y_test)} validation windows of "
        f"{s.context} tokens; teacher {s.teacher[0]} x {s.teacher[1]}, student {s.student[0]} x {s.student[1]}")
    teachers = {}
    if any(m not in ("ce", "ce_half", "uld") for m in methods):
        teachers["main"] = study.teacher_state("main")[1]
    if "uld" in methods:
        teachers["uld"] = study.teacher_state("uld")[1]
    results = {m: study.method(m) for m in methods}
    return {"setup": dataclasses.asdict(s), "seeds": study.seeds, "methods": list(methods),
            "identity": study.identity, "tokens_per_byte": study.per_byte, "teachers": teachers,
            "per_method": results, "summary": summarize(results, methods, s.budgets)}


def cmd_lm_methods(args, rep) -> int:
    """``kdjax lm-methods``: the study with the command's sizes; a table per budget (mean ± 95%
    CI over seeds, paired against ce, costs), plots and results.json."""
    from kdjax.app import inputs, plots
    from kdjax.app.distill_report import finish
    from kdjax.app.reporting import conclusion, fmt_ci, plural
    from kdjax.losses import check_alpha, check_temperature

    if len(set(args.methods)) != len(args.methods):
        raise UsageError(f"--methods: expected each method once, got {args.methods}")
    if args.methods[0] != "ce":
        raise UsageError(f"--methods: expected ce first (the paired baseline), got {args.methods[0]}")
    if len(set(args.budgets)) != len(args.budgets):
        raise UsageError(f"--budgets: expected distinct numbers of updates, got {args.budgets}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        raise UsageError(f"--lr: expected a finite number > 0, got {args.lr}")
    if args.context < 4:
        raise UsageError(f"--context: expected at least 4 tokens (a prompt and a completion), got {args.context}")
    if args.resume and not args.out:
        raise UsageError("--resume: expected --out DIR (where the finished parts are), got none")
    check_temperature(args.temperature, "--temperature")
    check_alpha(args.alpha)
    s = Setup(text_bytes=args.text_bytes, context=args.context, vocab_size=args.vocab_size,
              uld_vocab_size=args.uld_vocab_size, teacher=(args.teacher_layers, args.teacher_dim),
              student=(args.student_layers, args.student_dim), teacher_steps=args.teacher_steps,
              budgets=tuple(sorted(args.budgets)), batch=args.batch_size, lr=args.lr, temperature=args.temperature,
              alpha=args.alpha)
    seeds = list(range(args.seed, args.seed + args.seeds))
    need = 4 * args.batch_size * (max(s.budgets) * args.seeds + s.teacher_steps)  # the index schedules
    memory = inputs._physical_memory()
    if memory and need > memory // 2:
        raise UsageError(f"--budgets / --teacher-steps x --batch-size x --seeds: the index schedules alone would take "
                         f"{need / 2**30:.1f} GiB, more than half of this machine's {memory / 2**30:.1f} GiB")
    inputs.claim_out(args)
    directory = None if args.out is None else os.path.join(args.out, "checkpoints")
    rep.line(f"{len(args.methods)} methods x budgets {list(s.budgets)} student updates (batch {s.batch}, Adam "
             f"{s.lr:g}); T = {s.temperature:g}, alpha = {s.alpha:g}; {plural(len(seeds), 'seed')}")
    t0 = time.perf_counter()
    r = run(s, seeds, tuple(args.methods), directory=directory, resume=args.resume, log=rep.line)
    over = f"mean ± 95% CI over n = {plural(len(seeds), 'seed')}"
    figs, lines = {}, []
    for b in map(str, s.budgets):
        rows = r["summary"][b]
        rep.table(f"validation bits per byte after {b} student updates ({over}; lower is better): every target, "
                  f"and the second half's (what seqkd and the on-policy methods train on); costs",
                  ["method", "bits per byte", "- ce (paired)", "2nd half", "- ce (paired)", "teacher tokens",
                   "seconds", "ms / update", "bytes / token"],
                  [[m, fmt_ci(c["mean_ci"]), "" if m == "ce" else fmt_ci(c["paired_vs_ce"], signed=True),
                    fmt_ci(c["second_half_mean_ci"]),
                    "" if m == "ce" else fmt_ci(c["second_half_paired_vs_ce"], signed=True),
                    f"{c['teacher_tokens']:,}", f"{c['seconds']:.0f}",
                    "" if c["ms_per_update"] is None else f"{c['ms_per_update']:.0f}", str(c["bytes_per_token"])]
                   for m, c in rows.items()])
        if b == str(s.budgets[-1]):
            lines += [conclusion(f"{m} - ce after {b} updates: validation bits per byte (paired by seed; lower is "
                                 f"better)", rows[m]["paired_vs_ce"], len(seeds), lower_is_better=True, digits=3)
                      for m in args.methods[1:]]
        figs[f"budget_{b}"] = (lambda b=b, rows=rows: plots.methods_bars(
            os.path.join(args.out, f"lm_methods_{b}.png"), list(rows), [c["mean_ci"][0] for c in rows.values()],
            [c["mean_ci"][1] for c in rows.values()], f"after {b} student updates ({plural(len(seeds), 'seed')})",
            "validation bits per byte"))
    last = r["summary"][str(s.budgets[-1])]
    figs["cost"] = lambda: plots.quality_cost(
        os.path.join(args.out, "lm_methods_cost.png"), list(last), [c["seconds"] for c in last.values()],
        [c["mean_ci"][0] for c in last.values()], [c["mean_ci"][1] for c in last.values()],
        f"after {s.budgets[-1]} updates: quality against wall time", "wall seconds on this machine (log)",
        "validation bits per byte")
    teachers = ", ".join(f"{k} {v['bits_per_byte']:.3f}" for k, v in r["teachers"].items())
    rep.line(f"teachers' validation bits per byte: {teachers}")
    ce = r["summary"][str(s.budgets[-1])]["ce"]["mean_ci"][0]
    weak = [k for k, v in r["teachers"].items() if v["bits_per_byte"] >= ce]
    if weak:
        rep.warn(f"warning: the {' and '.join(weak)} teacher is no better than the ce student after "
                 f"{s.budgets[-1]} updates ({ce:.3f} bits per byte): it has little to teach (train it longer, or on "
                 f"more text if it overfits)")
    r["conclusion"] = rep.conclude(lines or ["One method (ce): nothing to compare; --methods lists several."])
    r["seconds"] = time.perf_counter() - t0
    r["config"] = vars(args) | {"func": None}
    return finish(args, rep, r, {} if args.out is None else figs)
