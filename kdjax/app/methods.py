"""``kdjax distill --method``: the method table (``TABLE``: one row per method — its objective,
the options it takes, its architectures, its default temperature, its reference), which the
parser's choices and "only used with" refusals read. The mdistiller methods are
``kdjax.features`` objectives, the on-policy methods of language models (``gkd``: TRL's
GKD, ``reverse_kl``: tinker-cookbook's on-policy reverse KL) ``kdjax.onpolicy.OnPolicy``,
``uld`` (a teacher with another tokenizer: TRL's ULD) ``kdjax.crosstok.ULD`` with weights
``1 - alpha`` on CE and ``alpha`` on ULD.

Weights, temperatures and CRD's settings are mdistiller's defaults
(``mdistiller/engine/cfg.py``): CE weight 1 for every feature method; FitNet 100 on the
second-to-last stage (``HINT_LAYER``), AT 1000 on every stage (p = 2), SP 3000 on the last
stage, RKD 1 (distance 25, angle 50), PKT 30000 and CRD 0.8 (128-d embeddings, 16384
negatives, T 0.07, momentum 0.5) on the pooled features (the classifier's input); DKD:
CE 1, alpha 1, beta 8, T 4, warm-up over the first 20/240 of the run.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from kdjax.app import UsageError

LM_ARCHS, VISION_ARCHS = ("transformer", "llama"), ("mlp", "resnet")
FEATURE_OPTIONS = ("feature_layers", "feature_weight", "kd_weight")
_load = importlib.import_module  # a row's library module, imported when the method is chosen (--help stays light)


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of ``--method``: the objective it trains with, the method options it takes
    (argument names; any other method option is refused with it), the architectures it
    runs on, its default ``--temperature`` and the reference it equals."""

    build: Callable  # (args, teacher, student, total steps, tokenizer) -> an objective (kdjax.objectives), or None: kd
    options: tuple = ()
    archs: tuple = VISION_ARCHS
    temperature: float = 4.0
    reference: str = ""


def _dkd(args, teacher, student, total_steps, *_):
    from kdjax.features import Objective

    return Objective(ce=1.0, kd=1.0, temperature=args.temperature, divergence="dkd", dkd_alpha=1.0, dkd_beta=8.0,
                     warmup_steps=max(1, round(total_steps * 20 / 240)))


def _feature(loss: str, weight: float):
    def build(args, teacher, student, total_steps, *_):
        from kdjax.features import Objective, Term

        pairs = parse_pairs(args.feature_layers) if args.feature_layers else default_pairs(args.method, teacher,
                                                                                             student)
        w = args.feature_weight if args.feature_weight is not None else weight
        options = {"negatives": args.crd_negatives} if loss == "crd" else {}
        return Objective(ce=1.0, kd=args.kd_weight or 0.0, temperature=args.temperature,
                         terms=tuple(Term(loss, t, s, w, options=options) for t, s in pairs))
    return build


def _on_policy(args, teacher, student, total_steps, *_):
    prompt, new = on_policy_split(args)
    return _load("kdjax.onpolicy").OnPolicy(teacher, args.method, max_new_tokens=new, lmbda=args.lmbda, beta=args.beta,
                    temperature=args.temperature, prompt_length=prompt)


def _uld(args, teacher, student, total_steps, tokenizer):
    crosstok = _load("kdjax.crosstok")
    from kdjax.app.inputs import teacher_tokenizer

    hybrid = None
    if args.uld_hybrid:
        try:
            hybrid = crosstok.hybrid_from_vocabs(tokenizer.get_vocab(), teacher_tokenizer(args).get_vocab())
        except _load("kdjax.errors").InputError as e:
            raise UsageError(f"--uld-hybrid: {e}") from None
    return crosstok.ULD(crossentropy_weight=1.0 - args.alpha, distillation_weight=args.alpha,
                        student_temperature=args.temperature, teacher_temperature=args.temperature, hybrid=hybrid,
                        merge=args.uld_merge or "observed", teacher=teacher)


_MDISTILLER = "mdistiller's {} (mdistiller/distillers/{}.py, weights of engine/cfg.py)"
# The method table: a new method is its library file (an objective) and one row here.
TABLE = {
    "kd": Method(lambda *a: None, ("temperature", "alpha", "tune"), VISION_ARCHS + LM_ARCHS, 3.0,
                 "Hinton et al. (2015); 08_distillation.py's loss"),
    "dkd": Method(_dkd, ("temperature",), reference=_MDISTILLER.format("dkd_loss", "DKD")),
    "fitnet": Method(_feature("hint", 100.0), FEATURE_OPTIONS, reference=_MDISTILLER.format("FitNet", "FitNet")),
    "at": Method(_feature("at", 1000.0), FEATURE_OPTIONS, reference=_MDISTILLER.format("at_loss", "AT")),
    "sp": Method(_feature("sp", 3000.0), FEATURE_OPTIONS, reference=_MDISTILLER.format("sp_loss", "SP")),
    "rkd": Method(_feature("rkd", 1.0), FEATURE_OPTIONS, reference=_MDISTILLER.format("rkd_loss", "RKD")),
    "pkt": Method(_feature("pkt", 30000.0), FEATURE_OPTIONS, reference=_MDISTILLER.format("pkt_loss", "PKT")),
    "crd": Method(_feature("crd", 0.8), FEATURE_OPTIONS + ("crd_negatives",),
                  reference=_MDISTILLER.format("CRD", "CRD")),
    "gkd": Method(_on_policy, ("temperature", "lmbda", "beta", "prompt_tokens"), LM_ARCHS, 0.9,
                  "TRL 1.16's GKDTrainer (trl/experimental/gkd), generalized_jsd_loss"),
    "reverse_kl": Method(_on_policy, ("temperature", "prompt_tokens"), LM_ARCHS, 1.0,
                         "tinker-cookbook's on-policy distillation (reverse-KL advantages, importance sampling)"),
    "uld": Method(_uld, ("temperature", "alpha", "uld_hybrid", "uld_merge"), ("llama",), 1.0,
                  "TRL 1.16's ULDLoss (trl/experimental/gold), byte-offset alignment: a teacher with another "
                  "tokenizer"),
}


def methods_taking(option: str) -> tuple:
    """The methods whose row lists ``option`` (``"prompt_tokens"``: the on-policy methods, which
    sample in the step; ``"feature_layers"``: the feature methods)."""
    return tuple(m for m, row in TABLE.items() if option in row.options)


def method_options() -> tuple:
    """Every option some method takes: with any other ``--method`` it is refused."""
    return tuple(dict.fromkeys(o for row in TABLE.values() for o in row.options))


def on_policy(method: str) -> bool:
    return "prompt_tokens" in TABLE[method].options


def only_with(option: str) -> str:
    """The parser's refusal of ``option`` with another method: "only used with --method ..."."""
    taking = methods_taking(option)
    if taking == methods_taking("feature_layers"):
        return "only used with a feature --method"
    names = ", ".join(taking[:-1]) + (" or " if len(taking) > 1 else "") + taking[-1]
    return f"only used with --method {names}"


def _stages(model) -> list[str]:
    from kdjax.models import ResNet, StudentMLP, TeacherMLP

    if isinstance(model, ResNet):
        return [f"layer{i + 1}" for i in range(len(model.stage_sizes))]
    if isinstance(model, TeacherMLP):
        return ["fc1", "fc2", "fc3"]
    if isinstance(model, StudentMLP):
        return ["fc1"]
    raise UsageError(f"--method: feature methods need a ResNet or an MLP pair, got {type(model).__name__}")


def _pooled(model) -> str:
    from kdjax.models import ResNet, TeacherMLP

    return "fc:input" if isinstance(model, ResNet) else ("fc4:input" if isinstance(model, TeacherMLP) else "fc2:input")


def default_pairs(method: str, teacher, student) -> list[tuple[str, str]]:
    """(teacher tap, student tap) pairs of ``method`` for this model pair."""
    ts, ss = _stages(teacher), _stages(student)
    if method == "fitnet":
        return [(ts[max(0, len(ts) - 2)], ss[max(0, len(ss) - 2)])]
    if method == "at":
        if len(ts) != len(ss) or "fc1" in ts:
            raise UsageError("--method at: expected ResNets with as many stages (attention maps need feature maps); "
                             "give --feature-layers TEACHER:STUDENT pairs of NHWC taps")
        return list(zip(ts, ss))
    if method == "sp":
        return [(ts[-1], ss[-1])] if "fc1" not in ts else [(_pooled(teacher), _pooled(student))]
    return [(_pooled(teacher), _pooled(student))]


def parse_pairs(items) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        # taps may contain ':' (fc:input): then the pair is written TEACHER=STUDENT
        t, sep, s = item.partition(":") if item.count(":") == 1 else item.partition("=")
        if not sep or not t or not s:
            raise UsageError(f"--feature-layers: expected TEACHER:STUDENT tap pairs (e.g. layer2:layer2 or "
                             f"fc:input=fc:input), got {item!r}")
        pairs.append((t, s))
    return pairs


def resolve_temperature(args) -> None:
    """``--temperature`` left out: the method's row (3 for kd, 08_distillation.py's; mdistiller's
    4 for dkd and for the logit term a feature method gets with ``--kd-weight``; the sampling
    temperature of the on-policy methods: 0.9 for gkd, TRL's GKDConfig, 1 for reverse_kl)."""
    if args.temperature is None:
        args.temperature = TABLE[args.method].temperature


def check_arch(args) -> None:
    """Refuse a method on an architecture its row does not list."""
    row = TABLE[args.method]
    if args.arch not in row.archs:
        want = ("a language model (--arch transformer or llama)" if row.archs == LM_ARCHS
                else f"--arch {' or '.join(row.archs)}")
        taking = [m for m, r in TABLE.items() if args.arch in r.archs]
        raise UsageError(f"--method {args.method}: expected {want}, got --arch {args.arch} (which takes --method "
                         f"{', '.join(taking)})")


def on_policy_split(args) -> tuple[int, int]:
    """(prompt tokens, new tokens) of each --context window: --prompt-tokens (default half)."""
    prompt = args.prompt_tokens if args.prompt_tokens is not None else args.context // 2
    if not 1 <= prompt < args.context:
        raise UsageError(f"--prompt-tokens: expected 1 to {args.context - 1} (the --context window holds the "
                         f"prompt and the completion), got {prompt}")
    return prompt, args.context - prompt


def describe(objective) -> str:
    """The objective in words: its ``describe()``, else its ``repr``."""
    return objective.describe() if hasattr(objective, "describe") else repr(objective)


def objective(args, teacher, student, total_steps: int, tokenizer=None):
    """The objective of ``args.method`` (its row's ``build``; None for ``kd``, the built-in);
    ``tokenizer``: the student's, for a method that reads its vocabulary."""
    return TABLE[args.method].build(args, teacher, student, total_steps, tokenizer)


def validate(objective, teacher, student, ds) -> None:
    """Trace every term on abstract shapes (nothing computed): an unknown tap, a pair no
    connector maps or a loss that cannot take these shapes is refused before training."""
    import jax

    from kdjax.features import LOSSES, connector_for

    example = jax.ShapeDtypeStruct((2, *ds.input_shape), ds.x_train.dtype)
    shapes = lambda model: jax.eval_shape(model.init, jax.random.PRNGKey(0), example)
    s_shapes, t_shapes = objective.tap_shapes(student, shapes(student), teacher, shapes(teacher), example)
    for term in objective.terms:
        s, t = s_shapes[term.student], t_shapes[term.teacher]
        if term.connected:  # the connector maps the student's feature to the teacher's shape
            connector_for(s.shape, t.shape)
            s = t
        if term.loss != "crd":
            jax.eval_shape(lambda a, b: LOSSES[term.loss](a, b, **dict(term.options)), s, t)
