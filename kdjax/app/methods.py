"""``kdjax distill --method``: the mdistiller methods as ``kdjax.features`` objectives, and the
on-policy methods of language models (``gkd``: TRL's GKD, ``reverse_kl``: tinker-cookbook's
on-policy reverse KL) as ``kdjax.onpolicy.OnPolicy`` objectives.

Weights, temperatures and CRD's settings are mdistiller's defaults
(``mdistiller/engine/cfg.py``): CE weight 1 for every feature method; FitNet 100 on the
second-to-last stage (``HINT_LAYER``), AT 1000 on every stage (p = 2), SP 3000 on the last
stage, RKD 1 (distance 25, angle 50), PKT 30000 and CRD 0.8 (128-d embeddings, 16384
negatives, T 0.07, momentum 0.5) on the pooled features (the classifier's input); DKD:
CE 1, alpha 1, beta 8, T 4, warm-up over the first 20/240 of the run.
"""

from __future__ import annotations

from kdjax.app import UsageError

METHODS = ("kd", "dkd", "fitnet", "at", "sp", "rkd", "pkt", "crd", "gkd", "reverse_kl")
FEATURE_METHODS = ("fitnet", "at", "sp", "rkd", "pkt", "crd")
ON_POLICY_METHODS = ("gkd", "reverse_kl")
_WEIGHTS = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "rkd": 1.0, "pkt": 30000.0, "crd": 0.8}
_LOSS = {"fitnet": "hint", "at": "at", "sp": "sp", "rkd": "rkd", "pkt": "pkt", "crd": "crd"}


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
        t, sep, s = item.partition(":") if item.count(":") == 1 else _split_pair(item)
        if not sep or not t or not s:
            raise UsageError(f"--feature-layers: expected TEACHER:STUDENT tap pairs (e.g. layer2:layer2 or "
                             f"fc:input=fc:input), got {item!r}")
        pairs.append((t, s))
    return pairs


def _split_pair(item: str):
    # taps may contain ':' (fc:input): then the pair is written TEACHER=STUDENT
    t, sep, s = item.partition("=")
    return t, sep, s


def resolve_temperature(args) -> None:
    """``--temperature`` left out: the seed's 3 for kd, mdistiller's 4 for dkd and for the
    logit term a feature method gets with ``--kd-weight``; the sampling temperature of the
    on-policy methods: 0.9 for gkd (TRL's GKDConfig), 1 for reverse_kl (tinker-cookbook)."""
    if args.temperature is None:
        args.temperature = {"gkd": 0.9, "reverse_kl": 1.0}.get(
            args.method, 4.0 if args.method == "dkd" or getattr(args, "kd_weight", None) else 3.0)


def check_arch(args) -> None:
    lm = args.arch in ("transformer", "llama")
    if args.method in ON_POLICY_METHODS and not lm:
        raise UsageError(f"--method {args.method}: expected a language model (--arch transformer or llama), got "
                         f"--arch {args.arch}")
    if args.method not in ("kd",) + ON_POLICY_METHODS and lm:
        raise UsageError(f"--method {args.method}: expected --arch mlp or resnet (language models take --method "
                         f"kd, gkd or reverse_kl)")


def on_policy_split(args) -> tuple[int, int]:
    """(prompt tokens, new tokens) of each --context window: --prompt-tokens (default half)."""
    prompt = args.prompt_tokens if args.prompt_tokens is not None else args.context // 2
    if not 1 <= prompt < args.context:
        raise UsageError(f"--prompt-tokens: expected 1 to {args.context - 1} (the --context window holds the "
                         f"prompt and the completion), got {prompt}")
    return prompt, args.context - prompt


def objective(args, teacher, student, total_steps: int):
    """The ``kdjax.features.Objective`` of ``args.method`` (the ``kdjax.onpolicy.OnPolicy``
    of an on-policy method; None for ``kd``)."""
    from kdjax.features import Objective, Term

    method = args.method
    if method == "kd":
        return None
    if method in ON_POLICY_METHODS:
        from kdjax.onpolicy import OnPolicy

        prompt, new = on_policy_split(args)
        return OnPolicy(teacher, method, max_new_tokens=new, lmbda=args.lmbda, beta=args.beta,
                        temperature=args.temperature, prompt_length=prompt)
    if method == "dkd":
        return Objective(ce=1.0, kd=1.0, temperature=args.temperature, divergence="dkd", dkd_alpha=1.0, dkd_beta=8.0,
                         warmup_steps=max(1, round(total_steps * 20 / 240)))
    pairs = parse_pairs(args.feature_layers) if args.feature_layers else default_pairs(method, teacher, student)
    weight = args.feature_weight if args.feature_weight is not None else _WEIGHTS[method]
    options = {"negatives": args.crd_negatives} if method == "crd" else {}
    return Objective(ce=1.0, kd=args.kd_weight or 0.0, temperature=args.temperature,
                     terms=tuple(Term(_LOSS[method], t, s, weight, options=options) for t, s in pairs))


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
