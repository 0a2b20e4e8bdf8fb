"""The ``kdjax`` command's arguments: the parser (help texts with defaults), and the check
that refuses options the chosen mode would ignore."""

from __future__ import annotations

import argparse
import sys

from kdjax.app import EXIT_USAGE, UsageError, commands
from kdjax.app.lm_methods import METHODS as LM_METHODS
from kdjax.app.methods import TABLE, method_options, only_with
from kdjax.app.reporting import version

__all__ = ["build_parser", "given_options", "check_modes", "resolve_defaults", "version"]


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help (``None`` and ``False`` defaults left out)."""

    def _get_help_string(self, action):
        if (action.default is None or action.default is False or action.default is argparse.SUPPRESS
                or "%(default)" in (action.help or "")):  # `is`: a default of 0 is shown
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        print(f"kdjax: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


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


SEED_LIMIT = 2**32  # seeds are NumPy SeedSequence / jax.random.PRNGKey entropy: non-negative, and this fits both


def _seed(text):
    """``--seed``: an integer in [0, 2^32) (a negative one or one past int64 was a traceback
    from NumPy or JAX once the run had started)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^32), got {text!r}")
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^32), got {v}")
    return v


def _common_output(p):
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for results.json, plots, metrics.jsonl and checkpoints; without it nothing is "
                        "saved but what --save-hf and --tensorboard write to their own folders")
    p.add_argument("--overwrite", action="store_true",
                   help="replace kdjax's own outputs of an earlier run in --out (nothing else there is touched)")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots in --out")
    p.add_argument("--json", action="store_true", help="machine-readable results on stdout")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (bars on a terminal, else a plain line on stderr every ~10%% or ~30 s)")


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
    p.add_argument("--dataset", default="synthetic",
                   help="synthetic (random labels: the reference script 08_distillation.py's data), digits "
                        "(scikit-learn's, bundled), text (byte-level Python sources, bundled; a language model: "
                        "--arch llama by default, or transformer), PATH.npz (x_train, y_train, x_test, y_test; images "
                        "NHWC) or PATH.txt (a corpus, for a language model)")
    p.add_argument("--arch", choices=["mlp", "resnet", "transformer", "llama"], default=None,
                   help="mlp: the reference script's teacher/student MLPs; resnet: BasicBlock ResNets on images; "
                        "transformer: GPT-2 language models on --dataset text (bytes); llama: Llama-family "
                        "decoders on tokenised text (--tokenizer; --teacher a Hugging Face folder). Default: mlp, "
                        "or for text (text, a .txt corpus) llama")
    p.add_argument("--teacher-hidden", type=_positive_int, default=256, help="mlp: teacher width")
    p.add_argument("--student-hidden", type=_positive_int, default=64, help="mlp: student width")
    p.add_argument("--teacher-blocks", type=_positive_int, nargs="+", default=[1, 1, 1], metavar="N",
                   help="resnet: teacher blocks per stage")
    p.add_argument("--teacher-widths", type=_positive_int, nargs="+", default=[16, 32, 64], metavar="C",
                   help="resnet: teacher channels per stage")
    p.add_argument("--student-blocks", type=_positive_int, nargs="+", default=[1, 1, 1], metavar="N",
                   help="resnet: student blocks per stage")
    p.add_argument("--student-widths", type=_positive_int, nargs="+", default=[4, 8, 16], metavar="C",
                   help="resnet: student channels per stage")
    p.add_argument("--stem", choices=["cifar", "imagenet"], default="cifar",
                   help="resnet: 3x3/1 conv (cifar) or torchvision's 7x7/2 conv + max pool (imagenet)")
    p.add_argument("--context", type=_positive_int, default=64, help="transformer, llama: tokens per window")
    p.add_argument("--teacher-layers", type=_positive_int, default=2, help="transformer, llama: teacher layers (trained here)")
    p.add_argument("--teacher-dim", type=_positive_int, default=64, help="transformer, llama: teacher width (d_model / hidden size; trained here)")
    p.add_argument("--student-layers", type=_positive_int, default=1, help="transformer, llama: student layers")
    p.add_argument("--student-dim", type=_positive_int, default=32, help="transformer, llama: student width (d_model / hidden size)")
    p.add_argument("--heads", type=_positive_int, default=4, help="transformer, llama: attention heads")
    p.add_argument("--kv-heads", type=_positive_int, default=2, help="llama: key/value heads (grouped queries)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="llama: a tokenizer.json (default: the --teacher folder's, else a byte-level BPE of "
                        "--vocab-size tokens trained here on the training text, offline)")
    p.add_argument("--vocab-size", type=_positive_int, default=1024,
                   help="llama: the BPE trained when no tokenizer is given")
    p.add_argument("--save-hf", default=None, metavar="DIR",
                   help="kdjax distill, transformer or llama: write the distilled student of the first --seed as "
                        "a Hugging Face folder (config.json, model.safetensors; llama: tokenizer.json too)")
    p.add_argument("--num-classes", type=_positive_int, default=None,
                   help="--dataset PATH.npz: the class count (default: the training labels' maximum + 1; "
                        "test labels outside it are refused)")
    p.add_argument("--text-bytes", type=_positive_int, default=200_000,
                   help="--dataset text: training bytes kept (validation a tenth as many)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=100,
                        help="training steps, one random minibatch each (what 08_distillation.py calls epochs)")
    length.add_argument("--epochs", type=_positive_int, default=None, help="real shuffled passes instead")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="examples per step")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam (08_distillation.py's) or sgd (momentum, weight decay: torch.optim.SGD)")
    p.add_argument("--momentum", type=_float_in(0, 1, "a number in [0, 1)"), default=0.9, help="sgd")
    p.add_argument("--weight-decay", type=_float_in(0, float("inf"), "a number >= 0"), default=5e-4,
                   help="sgd: L2 weight decay (every parameter)")
    p.add_argument("--nesterov", action="store_true", help="sgd: Nesterov momentum")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: annealed to 0 over the run (CosineAnnealingLR, per step)")
    p.add_argument("--seeds", type=_positive_int, default=seeds_default, help="number of seeds")
    p.add_argument("--seed", type=_seed, default=0, help="first seed (the seeds are --seed, --seed + 1, ...)")
    p.add_argument("--teacher", default=None, metavar="PATH",
                   help="load the teacher instead of training it: a Hugging Face folder (config.json, "
                        "*.safetensors, tokenizer.json) with --arch llama, a kdjax checkpoint (e.g. teacher.ckpt of an "
                        "earlier --out), or a PyTorch state_dict .pt/.pth (needs torch): 08_distillation.py's TeacherMLP "
                        "names with --arch mlp, a torchvision-layout ResNet with --arch resnet, a Hugging Face "
                        "GPT-2 with --arch transformer; its shapes must match the width/depth options")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write the per-step losses and the evaluation to TensorBoard event files in DIR "
                        "(needs tensorboardX: pip install 'kdjax[tensorboard]'); --out always gets metrics.jsonl")
    p.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,members=M",
                   help="device mesh: students split over M, minibatches over D x F devices, every model's "
                        "parameters and optimizer state split over F (default: every local device, on members "
                        "first, parameters replicated)")


# The --help sections, in this order; an option not listed stays under "options".
_GROUPS = {
    "data": ("dataset", "num_classes", "text_bytes", "length", "train", "test"),
    "models": ("arch", "teacher", "teacher_hidden", "student_hidden", "teacher_blocks", "teacher_widths",
               "student_blocks", "student_widths", "stem"),
    "language models (--arch transformer or llama)": (
        "context", "teacher_layers", "teacher_dim", "student_layers", "student_dim", "heads", "kv_heads", "tokenizer",
        "vocab_size", "teacher_logits", "topk_missing", "topk_loss", "save_hf", "save_hf_teacher"),
    "training": ("steps", "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "nesterov",
                 "lr_schedule", "teacher_steps", "warmup", "seeds", "seed", "sections", "quick"),
    "distillation method": ("method", "methods", "temperature", "alpha", "omit", "feature_layers", "feature_weight",
                            "kd_weight", "crd_negatives", "lmbda", "beta", "prompt_tokens", "uld_hybrid", "uld_merge", "tune", "temperatures",
                            "alphas", "validation_fraction"),
    "top-k cache": ("k", "min_coverage", "values_dtype"),
    "output and resume": ("out", "overwrite", "no_plots", "json", "quiet", "checkpoint_every", "resume",
                          "tensorboard"),
    "performance": ("mesh", "members_per_group"),
}
# Per command, where an option means something else there (on-policy's models are small
# language models of its own task; teacher-logits' --batch-size is windows per forward pass).
_GROUP_OF = {"on-policy": {d: "models" for d in ("teacher_layers", "teacher_dim", "student_layers", "student_dim")},
             "teacher-logits": {"teacher": "models", "context": "data", "tokenizer": "data",
                                "batch_size": "performance"}}


def _grouped(p, command: str) -> None:
    """Move the options of subparser ``p`` into their --help sections (``_GROUPS``)."""
    where = {dest: title for title, dests in _GROUPS.items() for dest in dests} | _GROUP_OF.get(command, {})
    actions = [a for a in p._optionals._group_actions if a.dest in where]
    for title in _GROUPS:
        mine = [a for a in actions if where[a.dest] == title]
        if mine:
            group = p.add_argument_group(title)
            group._group_actions.extend(mine)
            for a in mine:
                p._optionals._group_actions.remove(a)


def _resumable(p):
    p.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="K",
                   help="with --out: checkpoint every K steps (default: every ~5%% of the run)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the checkpoints in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdjax", description="Knowledge distillation in JAX.")
    parser.add_argument("--version", action="version", version=f"kdjax {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add = lambda name, **kw: sub.add_parser(name, formatter_class=_Help, **kw)

    demo = add("demo", help="the five demos of the reference script (08_distillation.py), then distillation on digits: held out, "
                                       "an omitted class, tuned T and alpha")
    demo.add_argument("--seeds", type=int, default=8, help="seeds for the multi-seed comparisons (>= 2)")
    demo.add_argument("--seed", type=_seed, default=42, help="first seed")
    demo.add_argument("--sections", default="1-8", help="which sections to run, e.g. 1-5 or 1,6 (6: held-out "
                      "digits, 7: omitted class, 8: tuned T and alpha)")
    demo.add_argument("--quick", action="store_true", help="2 digits epochs instead of 30 (smoke tests)")
    _common_output(demo)
    demo.set_defaults(func=commands.cmd_demo)

    distill = add("distill", help="teacher, standard and distilled student on a data set")
    _training_args(distill, seeds_default=4)
    distill.add_argument("--temperature", type=float, default=None,
                         help="softening temperature T > 0 (default: 3, 08_distillation.py's; 4 with --method dkd, mdistiller's)")
    distill.add_argument("--alpha", type=float, default=0.7, help="weight of the soft term, in [0, 1]")
    distill.add_argument("--method", choices=list(TABLE), default="kd",
                         help="kd (Hinton's, --temperature/--alpha), dkd, or a feature method: fitnet, at, sp, rkd, "
                              "pkt, crd (mdistiller's weights); for language models also gkd (TRL's GKD) and "
                              "reverse_kl (on-policy), and uld (a --teacher folder with another tokenizer: TRL's "
                              "ULD, (1 - alpha) CE + alpha ULD); see docs/cli.md")
    distill.add_argument("--feature-layers", nargs="+", default=None, metavar="T:S",
                         help="feature methods: teacher:student tap pairs (TEACHER=STUDENT when a tap has ':', "
                              "e.g. fc:input=fc:input); default: the method's layers")
    distill.add_argument("--feature-weight", type=_float_in(0, float("inf"), "a number >= 0"), default=None,
                         help="feature methods: the feature term's weight (default: mdistiller's)")
    distill.add_argument("--kd-weight", type=_float_in(0, float("inf"), "a number >= 0"), default=None,
                         help="feature methods: add the logit term W * T^2 KL (T from --temperature, default 4 "
                              "as mdistiller's KD) to the method's CE + feature term")
    distill.add_argument("--crd-negatives", type=_positive_int, default=16384,
                         help="crd: negatives per example (mdistiller's)")
    distill.add_argument("--lmbda", type=_float_in(0, 1.0000001, "a probability in [0, 1]"), default=0.5,
                         help="gkd: the probability of a step on the student's own samples (TRL's lmbda)")
    distill.add_argument("--beta", type=_float_in(0, 1.0000001, "a number in [0, 1]"), default=0.5,
                         help="gkd: the generalised JSD's beta (0: KL(teacher||student), 1: the reverse KL)")
    distill.add_argument("--prompt-tokens", type=_positive_int, default=None,
                         help="gkd, reverse_kl: the first tokens of each --context window are the prompt, the rest "
                              "the completion the student samples (default: half)")
    distill.add_argument("--uld-hybrid", action="store_true",
                         help="uld: TRL's hybrid form (JSD on the tokens both vocabularies share, ULD on the rest)")
    distill.add_argument("--uld-merge", choices=["observed", "bayesian"], default=None,
                         help="uld: a group of positions merges into the first position's distribution times the "
                              "later tokens' probabilities (observed, TRL's default) or the last one's times the "
                              "earlier ones' (bayesian); with a ULD cache, the cache's")
    distill.add_argument("--teacher-logits", default=None, metavar="CACHE",
                         help="llama: train the students from a teacher's top-k cache (kdjax teacher-logits) "
                              "instead of running a teacher; the student is of the cached teacher's family")
    distill.add_argument("--topk-missing", choices=["zero", "symmetric_uniform"], default="zero",
                         help="with --teacher-logits: the teacher's mass outside its top k, renormalised away "
                              "(zero) or one more outcome (DistillKit's symmetric_uniform)")
    distill.add_argument("--topk-loss", choices=["kl", "jsd", "tvd", "hinge", "logistic_ranking"], default="kl",
                         help="with --teacher-logits: the loss against the teacher's top k (DistillKit's sparse KL, "
                              "JSD, TVD, or its ranking losses hinge and logistic_ranking, which take no "
                              "--temperature); default: kl")
    distill.add_argument("--save-hf-teacher", default=None, metavar="DIR",
                         help="llama: write the teacher (trained here for the first --seed, or the one loaded) as a "
                              "Hugging Face folder (config.json, model.safetensors, tokenizer.json) that kdjax "
                              "teacher-logits --teacher DIR and transformers load")
    distill.add_argument("--teacher-steps", type=_positive_int, default=None,
                         help="train the teachers this many steps (default: as the students)")
    distill.add_argument("--tune", action="store_true",
                         help="choose T and alpha from --temperatures x --alphas on a validation split of the "
                              "training rows (never the test set), then distill at the best")
    distill.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="with --tune")
    distill.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0], help="with --tune")
    distill.add_argument("--validation-fraction", type=float, default=0.2,
                         help="with --tune: share of the training rows held out for the choice")
    _resumable(distill)
    _common_output(distill)
    distill.set_defaults(func=commands.cmd_distill)

    om = add("omit-class", help="Hinton et al.'s experiment: students that never see one class")
    om.add_argument("--dataset", default="digits", help="digits, or PATH.npz (x_train, y_train, x_test, y_test)")
    om.add_argument("--num-classes", type=_positive_int, default=None,
                    help="--dataset PATH.npz: the class count (default: the training labels' maximum + 1)")
    om.add_argument("--omit", type=int, default=3, help="the class left out of the transfer set")
    om.add_argument("--epochs", type=_positive_int, default=30, help="shuffled passes")
    om.add_argument("--teacher-hidden", type=_positive_int, default=256, help="teacher width")
    om.add_argument("--student-hidden", type=_positive_int, default=64, help="student width")
    om.add_argument("--temperature", type=float, default=20.0, help="the paper's MNIST value")
    om.add_argument("--alpha", type=float, default=0.9, help="weight of the soft term")
    om.add_argument("--validation-fraction", type=float, default=0.2,
                    help="share of the training rows whose inputs set the bias shift")
    om.add_argument("--seeds", type=int, default=8, help="number of seeds (>= 2)")
    om.add_argument("--seed", type=_seed, default=0, help="first seed")
    _common_output(om)
    om.set_defaults(func=commands.cmd_omit_class, arch="mlp")

    tl = add("teacher-logits", help="a Hugging Face teacher's top-k log-probabilities on the training text (or, "
                                    "with --method uld, its sorted probabilities per group aligned with another "
                                    "tokenizer's), computed once into a cache for kdjax distill --teacher-logits")
    tl.add_argument("--teacher", required=True, metavar="DIR",
                    help="a Llama-family Hugging Face folder (config.json, *.safetensors, tokenizer.json)")
    tl.add_argument("--dataset", default="text", help="text (the bundled Python sources) or PATH.txt")
    tl.add_argument("--text-bytes", type=_positive_int, default=200_000,
                    help="--dataset text: training bytes kept (as kdjax distill)")
    tl.add_argument("--context", type=_positive_int, default=64, help="tokens per window (as kdjax distill)")
    tl.add_argument("--tokenizer", default=None, metavar="PATH",
                    help="a tokenizer.json (default: the --teacher folder's; with --method uld the student's, "
                         "default: trained here); copied into the cache")
    tl.add_argument("--method", choices=["kd", "uld"], default="kd",
                    help="kd: the teacher's top-k log-probabilities per token (the student shares its tokenizer); "
                         "uld: a teacher with another tokenizer, its sorted probabilities per byte-aligned group of "
                         "the student's windows (--tokenizer is then the student's), for kdjax distill "
                         "--teacher-logits CACHE --method uld")
    tl.add_argument("--k", type=_positive_int, default=None,
                    help="log-probabilities kept per token (kd, default 64), or probabilities per aligned group "
                         "(uld, default 256; the teacher's vocabulary size is exact ULD)")
    tl.add_argument("--temperature", type=float, default=None,
                    help="uld: the teacher's softmax temperature (default 1), fixed in the cache")
    tl.add_argument("--uld-merge", choices=["observed", "bayesian"], default="observed",
                    help="uld: how a group of teacher positions merges (as kdjax distill --uld-merge), fixed in the "
                         "cache")
    tl.add_argument("--vocab-size", type=_positive_int, default=1024,
                    help="uld without --tokenizer: the student's byte-level BPE, trained here on the training text "
                         "(as kdjax distill)")
    tl.add_argument("--min-coverage", type=_float_in(0, 1.0000001, "a fraction in [0, 1]"), default=0.5,
                    help="warn when the top k keep less of the teacher's probability mass than this (kd: the mean "
                         "over the validation windows' positions, stored in the cache; uld: over the training "
                         "windows' aligned groups); printed")
    tl.add_argument("--values-dtype", choices=["float32", "float16"], default="float32",
                    help="storage of the values: kd's log-probabilities (token ids are int32, k * 8 or k * 6 bytes "
                         "per token), uld's probabilities (k * 4 + 4 or k * 2 + 4 bytes per aligned group)")
    tl.add_argument("--batch-size", type=_positive_int, default=32, help="windows per teacher forward pass")
    tl.add_argument("--out", required=True, metavar="CACHE",
                    help="the cache directory (shards + manifest.json + tokenizer.json); run again to resume")
    tl.add_argument("--overwrite", action="store_true", help="replace a cache already in --out")
    tl.add_argument("--json", action="store_true", help="a machine-readable summary on stdout")
    tl.add_argument("--quiet", action="store_true",
                    help="no progress (bars on a terminal, else a plain line on stderr every ~10%% or ~30 s)")
    tl.set_defaults(func=commands.cmd_teacher_logits, arch="llama")

    op = add("on-policy", help="sorting digits: a trained teacher, a small student trained by SFT, KD, SeqKD, GKD "
                               "and on-policy reverse KL at equal updates; greedy accuracy on held-out prompts")
    op.add_argument("--methods", nargs="+", choices=["sft", "kd", "seqkd", "gkd", "reverse_kl"],
                    default=["sft", "kd", "seqkd", "gkd", "reverse_kl"], help="the first is the paired baseline")
    op.add_argument("--length", type=_positive_int, default=8, help="digits per prompt")
    op.add_argument("--train", type=_positive_int, default=4096, help="training prompts")
    op.add_argument("--test", type=_positive_int, default=512, help="held-out prompts")
    op.add_argument("--teacher-layers", type=_positive_int, default=2, help="the teacher's layers")
    op.add_argument("--teacher-dim", type=_positive_int, default=128, help="the teacher's hidden size")
    op.add_argument("--student-layers", type=_positive_int, default=1, help="the student's layers")
    op.add_argument("--student-dim", type=_positive_int, default=32, help="the student's hidden size")
    op.add_argument("--teacher-steps", type=_positive_int, default=2000, help="the teacher's cross-entropy steps")
    op.add_argument("--warmup", type=int, default=0,
                    help="supervised steps every student starts from (the same for every method)")
    op.add_argument("--steps", type=_positive_int, default=400, help="each method's student updates")
    op.add_argument("--batch-size", type=_positive_int, default=64, help="prompts per update")
    op.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    op.add_argument("--seeds", type=_positive_int, default=4, help="students per method (>= 2 for intervals)")
    op.add_argument("--seed", type=_seed, default=0, help="first seed")
    _common_output(op)
    op.set_defaults(func=commands.cmd_on_policy, arch="llama")

    lm = add("lm-methods", help="which language-model distillation method, at what cost: CE, dense KD, top-k caches, "
                                "SeqKD, GKD, on-policy reverse KL and ULD on the bundled text at equal student "
                                "updates, in bits per byte, with their costs")
    lm.add_argument("--methods", nargs="+", choices=list(LM_METHODS), default=list(LM_METHODS),
                    help="ce first (the paired baseline)")
    lm.add_argument("--budgets", nargs="+", type=_positive_int, default=[100, 300],
                    help="student updates at which every method is read (one run to the largest)")
    lm.add_argument("--text-bytes", type=_positive_int, default=2_000_000,
                    help="training bytes of the bundled text (default: all of it, 1.4 MB)")
    lm.add_argument("--context", type=_positive_int, default=64, help="tokens per window")
    lm.add_argument("--vocab-size", type=_positive_int, default=512,
                    help="the byte-level BPE of the teacher and the students, trained here")
    lm.add_argument("--uld-vocab-size", type=_positive_int, default=1024,
                    help="uld: the other tokenizer, of the second teacher")
    lm.add_argument("--teacher-layers", type=_positive_int, default=2, help="each teacher's layers")
    lm.add_argument("--teacher-dim", type=_positive_int, default=128, help="each teacher's hidden size")
    lm.add_argument("--student-layers", type=_positive_int, default=2, help="the student's layers")
    lm.add_argument("--student-dim", type=_positive_int, default=64,
                    help="the student's hidden size (2 x 64: a quarter of a 2 x 128 teacher's transformer weights)")
    lm.add_argument("--teacher-steps", type=_positive_int, default=1500, help="each teacher's cross-entropy steps")
    lm.add_argument("--batch-size", type=_positive_int, default=32, help="windows per update")
    lm.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (teachers and students)")
    lm.add_argument("--temperature", type=float, default=1.0, help="kd, top-k and uld: T")
    lm.add_argument("--alpha", type=float, default=0.5, help="kd, top-k and uld: the distillation weight")
    lm.add_argument("--seeds", type=_positive_int, default=8, help="students per method (>= 2 for intervals)")
    lm.add_argument("--seed", type=_seed, default=0, help="first seed (the teachers train on it)")
    lm.add_argument("--resume", action="store_true", help="continue an interrupted study in --out (finished "
                                                          "teachers and methods are read back)")
    _common_output(lm)
    lm.set_defaults(func=_lm_methods, arch="llama", dataset="text", tokenizer=None, teacher=None)

    sw = add("sweep", help="temperatures x alphas x seeds as one compiled program")
    _training_args(sw, seeds_default=2)
    sw.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="the grid's T values")
    sw.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.9, 1.0], help="the grid's alpha values")
    sw.add_argument("--members-per-group", type=_members_per_group, default=None, metavar="all|auto|N",
                    help="how the students run: all as one vmap (default), N at a time, or 'auto' "
                         "(the fastest of those, timed on the first chunk; recorded in results.json; "
                         "choices agree to float rounding, not bitwise)")
    _resumable(sw)
    _common_output(sw)
    sw.set_defaults(func=commands.cmd_sweep)
    for name, command in sub.choices.items():
        _grouped(command, name)
    return parser


def resolve_defaults(args) -> None:
    """Defaults that depend on other options: ``--arch`` from the data set (text: a
    language model)."""
    if getattr(args, "arch", "given") is None:
        text = args.dataset == "text" or args.dataset.endswith(".txt")
        args.arch = "llama" if text else "mlp"


def given_options(argv) -> set[str]:
    """The options typed on the command line (not their defaults): a second parse in
    which no option has a default, so only those present come back."""
    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    for p in subparsers.choices.values():
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "func"}


def _hf_folder(args) -> bool:
    import os

    return bool(getattr(args, "teacher", None)) and os.path.isdir(args.teacher)


# Options that only mean something in some modes: (does it apply to these args?, why not).
_ONLY_WITH = {
    **dict.fromkeys(("teacher_hidden", "student_hidden"), (lambda a: a.arch == "mlp", "only used with --arch mlp")),
    **dict.fromkeys(("teacher_blocks", "teacher_widths", "student_blocks", "student_widths", "stem"),
                    (lambda a: a.arch == "resnet", "only used with --arch resnet")),
    **dict.fromkeys(("context", "student_layers", "student_dim", "heads"),
                    (lambda a: a.arch in ("transformer", "llama"), "only used with --arch transformer or llama")),
    **dict.fromkeys(("teacher_layers", "teacher_dim"),
                    (lambda a: a.arch == "transformer" or (a.arch == "llama" and not _hf_folder(a)
                                                           and not getattr(a, "teacher_logits", None)),
                     "only used with --arch transformer or llama, and not with a --teacher folder or "
                     "--teacher-logits cache (its config says)")),
    "teacher_logits": (lambda a: a.arch == "llama", "only used with --arch llama"),
    **dict.fromkeys(("topk_missing", "topk_loss"), (lambda a: getattr(a, "teacher_logits", None) is not None,
                                                    "only used with --teacher-logits")),
    **dict.fromkeys(("kv_heads", "tokenizer", "vocab_size"),
                    (lambda a: a.arch == "llama", "only used with --arch llama")),
    "vocab_size": (lambda a: a.arch == "llama" and not a.tokenizer and not getattr(a, "teacher_logits", None)
                   and (not _hf_folder(a) or getattr(a, "method", None) == "uld"),
                   "only used with --arch llama when the tokenizer is trained here (no --tokenizer, no --teacher "
                   "folder but with --method uld)"),
    "save_hf": (lambda a: a.command == "distill" and a.arch in ("transformer", "llama"),
                "only used with kdjax distill --arch transformer or llama"),
    "save_hf_teacher": (lambda a: a.arch == "llama" and not a.teacher_logits and getattr(a, "method", None) != "uld",
                        "only used with --arch llama (a folder kdjax teacher-logits reads), and not with "
                        "--teacher-logits (no teacher runs: the cache is all there is of it) or --method uld "
                        "(the teacher is the --teacher folder)"),
    "text_bytes": (lambda a: a.dataset == "text", "only used with --dataset text"),
    "num_classes": (lambda a: a.dataset.endswith(".npz") and a.arch not in ("transformer", "llama"),
                    "only used with a --dataset PATH.npz of labelled examples"),
    **dict.fromkeys(("momentum", "weight_decay", "nesterov"),
                    (lambda a: a.optimizer == "sgd", "only used with --optimizer sgd")),
    **dict.fromkeys(("temperatures", "alphas", "validation_fraction"),
                    (lambda a: a.command != "distill" or a.tune, "only used with --tune")),
    "checkpoint_every": (lambda a: a.out is not None, "only used with --out DIR"),  # --no-plots alone: harmless
    "overwrite": (lambda a: a.out is not None or getattr(a, "save_hf", None) is not None
                  or getattr(a, "save_hf_teacher", None) is not None,
                  "only used with --out DIR, --save-hf DIR or --save-hf-teacher DIR"),
}


def _method_options() -> dict:
    """The method options' rules, read from the method table (``methods.TABLE``) when used:
    each option applies to the methods whose row lists it."""
    rules = {o: (lambda a, o=o: a.command != "distill" or o in TABLE[a.method].options, only_with(o))
             for o in method_options()}
    if "temperature" in rules:
        rules["temperature"] = (lambda a: a.command != "distill" or (
            not a.tune and ("temperature" in TABLE[a.method].options or a.kd_weight)),
            only_with("temperature") + " (or a feature method with --kd-weight), and not with --tune (which "
            "chooses T from --temperatures)")
    if "alpha" in rules:
        rules["alpha"] = (lambda a: a.command != "distill" or (not a.tune and "alpha" in TABLE[a.method].options),
                          only_with("alpha") + " (without --tune)")
    for o in ("temperature", "uld_merge"):  # kdjax teacher-logits: the ULD cache's (a top-k cache is at T = 1)
        if o in rules:
            applies, why = rules[o]
            rules[o] = (lambda a, applies=applies: a.method == "uld" if a.command == "teacher-logits" else applies(a),
                        why + "; with kdjax teacher-logits, only with --method uld")
    return rules


def check_modes(args, given: set[str]) -> None:
    """Refuse an option the chosen mode would ignore: it would change nothing the user expects."""
    rules = _ONLY_WITH | _method_options()
    for dest in sorted(given):
        applies, why = rules.get(dest, (None, None))
        if applies is not None and not applies(args):
            raise UsageError(f"--{dest.replace('_', '-')}: {why}")


def _lm_methods(args, rep):
    from kdjax.app.lm_methods import cmd_lm_methods

    return cmd_lm_methods(args, rep)

