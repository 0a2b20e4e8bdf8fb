"""What a command needs before it trains, each checked first: the data set, the models
(built abstractly), a loaded teacher, the mesh, the output directory (refused or claimed)
and the run's identity for resuming."""

from __future__ import annotations

import json
import os

import numpy as np

from kdjax.app import UsageError
from kdjax.app.reporting import Reporter, jsonable, plural
from kdjax.errors import InputError

__all__ = ["dataset", "run_config", "models", "teacher_and_student", "student_like", "hf_teacher", "tokenizer",
           "hf_folder", "validate_models", "check_logits_memory", "describe", "load_teacher", "checkpoints",
           "make_mesh", "check_out", "claim_out", "seal_out", "save_hf_overwrite", "identity", "with_inputs",
           "array_sha256", "check_program_memory", "check_lm_memory", "check_schedule_memory"]


def check_out(args) -> None:
    """Refuse an --out (and --save-hf) that this run would damage, before anything is computed
    or written: a file kdjax did not write that the run would replace (``outputs``), a
    finished or unfinished run without --overwrite / --resume, a folder that is the teacher's."""
    from kdjax.app import outputs

    out = args.out
    if out is not None:
        resume, overwrite = getattr(args, "resume", False), args.overwrite
        if resume and overwrite:
            raise UsageError("--resume / --overwrite: expected one of them (continue the run in --out, or replace it)")
        for flag in ("teacher", "teacher_logits", "tokenizer"):
            other = getattr(args, flag, None)
            if other and os.path.exists(other) and outputs.same_or_inside(out, other):
                raise UsageError(f"--out: expected a folder apart from --{flag.replace('_', '-')} ({other}), got {out}")
        outputs.Outputs(out, outputs.declared(args)).check()
        if args.command != "teacher-logits":
            if os.path.exists(os.path.join(out, "results.json")) and not overwrite:
                raise UsageError(f"--out: {out} already holds results.json; pass --overwrite to replace it")
            if os.path.isdir(os.path.join(out, "checkpoints")) and not (resume or overwrite):
                raise UsageError(f"--out: {out} holds the checkpoints of an unfinished run; pass --resume to "
                                 f"continue it or --overwrite to start over")
    for flag, dest in outputs.HF_OUTPUTS:
        if getattr(args, dest, None):
            outputs.check_save_hf(args, flag, getattr(args, dest), outputs.declared(args) if out is not None else ())


def claim_out(args) -> None:
    """Once every input is accepted: clear the old run (--overwrite: exactly the outputs kdjax
    recorded writing), create --out and record what this run may write there. On many
    processes process 0 does it, between two barriers: every process has checked --out
    before it changes, and none writes into it before it is claimed."""
    import jax

    from kdjax import parallel
    from kdjax.app import outputs

    if args.out is None:
        return
    parallel.barrier("kdjax-out-checked")
    if jax.process_index() == 0:
        folders = {dest: getattr(args, dest, None) for _, dest in outputs.HF_OUTPUTS}
        claimed = {dest: os.path.realpath(os.path.abspath(d)) if d else None for dest, d in folders.items()}
        if not getattr(args, "resume", False):  # a new run has written no Hugging Face folder yet
            claimed |= {dest + "_writing": False for dest in folders}
        outputs.Outputs(args.out, outputs.declared(args)).claim(args.overwrite, **claimed)
    parallel.barrier("kdjax-out-claimed")


def seal_out(args) -> None:
    """At the end of a command: the record of --out keeps only what exists."""
    from kdjax.app import outputs

    if args.out is not None and os.path.isdir(args.out):
        outputs.Outputs(args.out, outputs.declared(args)).seal()


def save_hf_overwrite(args, flag: str = "--save-hf") -> bool:
    """May the Hugging Face files in ``flag``'s folder (``--save-hf``, ``--save-hf-teacher``) be
    replaced: --overwrite, or this run's own (recorded in --out when it was claimed)."""
    from kdjax.app import outputs

    if args.overwrite or args.out is None:
        return args.overwrite
    return outputs.written_here(args, flag, getattr(args, dict(outputs.HF_OUTPUTS)[flag]))


def hf_folder(args) -> bool:
    """``--teacher`` names a Hugging Face checkpoint folder (``--arch llama``), not a kdjax
    checkpoint (also a directory: ``kdjax.checkpoint``)."""
    from kdjax import checkpoint

    teacher = getattr(args, "teacher", None)
    return bool(teacher) and os.path.isdir(teacher) and not os.path.exists(os.path.join(teacher, checkpoint.MANIFEST))


def tokenizer(args):
    """``--arch llama``'s tokenizer: ``--tokenizer``, the ``--teacher`` folder's, or a
    byte-level BPE of ``--vocab-size`` tokens trained here on the training text; else None.
    With ``--method uld`` the student's own: ``--tokenizer`` or one trained here (the
    teacher's is ``teacher_tokenizer``)."""
    if args.arch != "llama":
        return None
    from kdjax import data
    from kdjax import tokenizer as tk

    uld = getattr(args, "method", None) == "uld"
    if args.tokenizer:
        tok = tk.load_tokenizer(args.tokenizer)
        own = os.path.join(args.teacher, "tokenizer.json") if hf_folder(args) else None
        if not uld and own and os.path.isfile(own) and not tk.same_tokenizer(own, tok):
            raise UsageError(f"--tokenizer {args.tokenizer}: expected the teacher's own tokenizer ({own}), got "
                             f"another one (its vocabulary or merges differ): the teacher's token ids would "
                             f"mean other text; a teacher with another tokenizer distils with --method uld")
        return tok
    cache = getattr(args, "teacher_logits", None)
    if cache:
        path = os.path.join(cache, "tokenizer.json")
        if not os.path.isfile(path):
            raise UsageError(f"--teacher-logits {cache}: has no tokenizer.json (kdjax teacher-logits writes one); "
                             f"pass --tokenizer PATH, the one the cache was built with")
        return tk.load_tokenizer(path)
    if hf_folder(args) and not uld:
        return teacher_tokenizer(args)
    if args.dataset != "text" and not args.dataset.endswith(".txt"):
        raise UsageError(f"--arch llama: expected --dataset text or a .txt corpus, got {args.dataset!r}")
    _, train, _, _ = data.text_documents(None if args.dataset == "text" else args.dataset, utf8=True)
    docs = data._first(train, args.text_bytes)
    # UTF-8 (a character a cut at --text-bytes leaves half is dropped; a bad byte is one line)
    return tk.train_bpe([data.decode_text(d, args.dataset) for d in docs], args.vocab_size)


def teacher_tokenizer(args):
    """The ``--teacher`` folder's own ``tokenizer.json``."""
    from kdjax import tokenizer as tk

    path = os.path.join(args.teacher, "tokenizer.json")
    if not os.path.isfile(path) and getattr(args, "method", None) == "uld":
        raise UsageError(f"--teacher {args.teacher}: has no tokenizer.json; --method uld needs the teacher's own "
                         f"tokenizer in its folder (--tokenizer is the student's)")
    if not os.path.isfile(path):
        raise UsageError(f"--teacher {args.teacher}: has no tokenizer.json; pass --tokenizer PATH (the "
                         f"teacher's own: a tokenizer with another vocabulary would train on garbage)")
    return tk.load_tokenizer(path)


def paired_text(args, tok, teacher, teacher_tok=None):
    """``--method uld``'s data: the corpus in the student's and the teacher's tokenizations
    (``kdjax.crosstok.text.paired_text``); the teacher's tokenizer ``teacher_tok`` or its folder's."""
    from kdjax.crosstok.text import paired_text as paired

    if args.dataset != "text" and not args.dataset.endswith(".txt"):
        raise UsageError(f"--method uld: expected --dataset text or a .txt corpus (text both tokenizers read), "
                         f"got {args.dataset!r}")
    try:
        return paired(args.context, None if args.dataset == "text" else args.dataset, student_tokenizer=tok,
                      teacher_tokenizer=teacher_tok or teacher_tokenizer(args), max_bytes=args.text_bytes,
                      max_teacher_length=teacher.max_position_embeddings)
    except InputError as e:
        raise UsageError(f"--method uld: {e}") from None


def array_sha256(a) -> str:
    """The sha256 (hex) of an array's bytes in C order: which tokens a cache was built on."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def dataset(args, tok=None):
    from kdjax import data

    name, images, tokens = args.dataset, args.arch == "resnet", args.arch in ("transformer", "llama")
    if name == "text" or name.endswith(".txt") or (tokens and name.endswith(".npz")):
        if not tokens:
            raise UsageError(f"--dataset {name}: expected --arch transformer or llama (a language model), got "
                             f"--arch {args.arch}")
        return data.text(args.context, None if name == "text" else name, max_bytes=args.text_bytes, tokenizer=tok)
    if tokens:
        raise UsageError(f"--arch {args.arch}: expected --dataset text, a .txt corpus or an .npz of tokens "
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


def run_config(args):
    from kdjax.fitting import RunConfig

    return RunConfig(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                     optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
                     nesterov=args.nesterov, lr_schedule=args.lr_schedule)


def models(args, num_classes: int):
    """(teacher, student) of ``--arch``, sized by the width/depth flags."""
    from kdjax.models import Llama, ResNet, StudentMLP, TeacherMLP, TransformerLM

    if args.arch == "llama":
        if args.heads % args.kv_heads:
            raise UsageError(f"--kv-heads: expected a divisor of --heads ({args.heads}), got {args.kv_heads}")
        make = lambda layers, dim: Llama(vocab_size=num_classes, hidden_size=dim, intermediate_size=4 * dim,
                                         num_layers=layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                                         max_position_embeddings=args.context, tie_word_embeddings=True)
        return make(args.teacher_layers, args.teacher_dim), make(args.student_layers, args.student_dim)
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


def hf_teacher(args, student: bool = True):
    """``(teacher, its TrainState, student)`` for a ``--teacher`` Hugging Face folder: the
    teacher as its config says, the student of the same family (``student_like``; None
    with ``student=False``)."""
    from kdjax import convert
    from kdjax.models import Llama
    from kdjax.train import state_from_params

    try:
        teacher, variables = convert.load_hf(args.teacher)
    except InputError as e:
        raise UsageError(f"--teacher: {e}") from None
    if not isinstance(teacher, Llama):
        raise UsageError(f"--teacher {args.teacher}: expected a Llama-family folder for --arch llama, got "
                         f"{type(teacher).__name__}")
    if args.context > teacher.max_position_embeddings:
        raise UsageError(f"--context: expected at most the teacher's max_position_embeddings "
                         f"({teacher.max_position_embeddings}, {args.teacher}/config.json), got {args.context}")
    params = dict(variables).pop("params")
    return teacher, state_from_params(params), student_like(teacher, args) if student else None


def teacher_and_student(args, ds, tok):
    """``(teacher, its loaded TrainState or None, student)`` of a command: from a
    ``--teacher`` Hugging Face folder with ``--arch llama``, else built by ``models``; with a
    tokenizer, both models checked against its vocabulary."""
    t_state = None
    if getattr(args, "method", None) == "uld":  # the student of the teacher's family with its own vocabulary
        if not (hf_folder(args) and args.arch == "llama"):
            raise UsageError(f"--method uld: expected --teacher DIR, a Llama-family Hugging Face folder with its own "
                             f"tokenizer.json, got {args.teacher or 'none'}")
        from kdjax.tokenizer import check_vocabulary

        teacher, t_state, student = hf_teacher(args)
        student = student.clone(vocab_size=int(tok.get_vocab_size()))
        check_vocabulary(teacher_tokenizer(args), teacher)
        check_vocabulary(tok, student)
        return teacher, t_state, student
    if hf_folder(args) and args.arch == "llama":
        teacher, t_state, student = hf_teacher(args)
    else:
        teacher, student = models(args, ds.num_classes)
    if tok is not None:
        from kdjax.tokenizer import check_vocabulary

        check_vocabulary(tok, teacher, student)
    return teacher, t_state, student


def student_like(teacher, args):
    """The student of ``teacher``'s family (its vocabulary, rotary and norm settings) at
    ``--student-layers`` x ``--student-dim`` with ``--heads``/``--kv-heads``."""
    if args.heads % args.kv_heads:
        raise UsageError(f"--kv-heads: expected a divisor of --heads ({args.heads}), got {args.kv_heads}")
    windows = None if teacher.sliding_windows is None else (next(
        (w for w in teacher.sliding_windows if w), None),) * args.student_layers
    return teacher.clone(hidden_size=args.student_dim, intermediate_size=4 * args.student_dim,
                         num_layers=args.student_layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                         head_dim=None, sliding_windows=windows)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_logits_memory(ds, teacher, copies: int, memory: int | None = None) -> int:
    """The bytes of the teacher's float32 logits ``distill`` caches on every training example
    (``copies`` of them: 2 per seed for teachers trained here, 1 for a loaded one); refuse in
    one line when that is more than half of ``memory`` (default: this machine's), naming the
    way around it. Returns the bytes."""
    import jax

    example = jax.ShapeDtypeStruct((1, *ds.input_shape), ds.x_train.dtype)
    out = jax.eval_shape(lambda e: teacher.apply(teacher.init(jax.random.PRNGKey(0), e), e), example)
    per_example = int(np.prod(out.shape[1:]))
    need = len(ds.y_train) * per_example * 4 * copies
    memory = _physical_memory() if memory is None else memory
    if memory and need > memory // 2:
        raise UsageError(f"the teacher's logits on every training example would take {need / 2**30:.1f} GiB "
                         f"({len(ds.y_train)} x {' x '.join(map(str, out.shape[1:]))} floats x {copies}), more than "
                         f"half of this machine's {memory / 2**30:.1f} GiB; for a large vocabulary build a top-k "
                         f"cache (kdjax teacher-logits, then --teacher-logits CACHE), or lower --text-bytes / "
                         f"--context / --seeds")
    return need


def check_program_memory(programs, hint: str, memory: int | None = None) -> None:
    """Refuse in one line, before anything runs, a program whose buffers (arguments, outputs
    and temporaries, from XLA's ``memory_analysis`` of the compiled program) would take more
    than half of ``memory`` (default: this machine's). ``programs``: ``(what, lowered)``;
    ``hint`` names the options that size them."""
    memory = _physical_memory() if memory is None else memory
    for what, lowered in programs:
        m = lowered.compile().memory_analysis()
        if m is None or not memory:
            continue
        need = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
        if need > memory // 2:
            raise UsageError(f"{what} would need {need / 2**30:.1f} GiB, more than half of this machine's "
                             f"{memory / 2**30:.1f} GiB; lower {hint}")


def check_lm_memory(args, model, who: str, step: bool = True) -> None:
    """Refuse a language model whose parameters, gradients and Adam state would not fit half
    of this machine's memory; with ``step``, then ``check_program_memory`` of its training
    step at ``--batch-size`` x ``--context`` tokens (the sizes are the user's to choose).
    Nothing is allocated: the state is built from ``jax.eval_shape`` alone."""
    import jax
    import jax.numpy as jnp

    from kdjax.train import TrainState, adam, make_train_step

    tokens = jax.ShapeDtypeStruct((args.batch_size, args.context), jnp.int32)
    variables = dict(jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, args.context),
                                                                                            jnp.int32)))
    params = variables.pop("params")
    size = sum(int(np.prod(p.shape, dtype=object)) * p.dtype.itemsize for p in jax.tree_util.tree_leaves(params))
    memory = _physical_memory()
    if memory and 4 * size > memory // 2:  # parameters, gradients and Adam's two moments, before XLA sees them
        raise UsageError(f"the {who}'s parameters, gradients and optimizer state would need {4 * size / 2**30:.1f} "
                         f"GiB, more than half of this machine's {memory / 2**30:.1f} GiB; lower the model sizes")
    if not step:
        return
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, variables, jax.eval_shape(adam().init, params))
    lowered = make_train_step(model, "ce").lower(state, {"x": tokens, "y": tokens},
                                                 jax.ShapeDtypeStruct((2,), jnp.uint32))
    check_program_memory([(f"the {who}'s training step (batch {args.batch_size} x {args.context} tokens)", lowered)],
                         "--batch-size or --context")


def check_schedule_memory(args, num_examples: int, members: int, memory: int | None = None) -> None:
    """Refuse, before any schedule or seed list is built, a run whose minibatch index
    schedules (``members`` of them: int32 ``[steps, batch]``) would take more than half of
    ``memory`` (default: this machine's)."""
    steps = args.steps if getattr(args, "epochs", None) is None else (num_examples // args.batch_size) * args.epochs
    need = 4 * members * steps * args.batch_size
    memory = _physical_memory() if memory is None else memory
    if memory and need > memory // 2:
        raise UsageError(f"--steps / --epochs x --batch-size x --seeds: the index schedules alone would take "
                         f"{need / 2**30:.1f} GiB, more than half of this machine's {memory / 2**30:.1f} GiB")


def validate_models(models, ds) -> None:
    """Build every model abstractly (``jax.eval_shape`` of its init: no compute): a
    configuration that cannot work is refused before anything trains."""
    import jax

    example = jax.ShapeDtypeStruct((1, *ds.input_shape), ds.x_train.dtype)
    for model in models:
        jax.eval_shape(model.init, jax.random.PRNGKey(0), example)


def describe(model) -> str:
    from kdjax.models import Llama, ResNet, TransformerLM

    if isinstance(model, TransformerLM):
        return (f"TransformerLM({plural(model.num_layers, 'layer')}, d_model {model.d_model}, "
                f"{plural(model.num_heads, 'head')})")
    if isinstance(model, Llama):
        return (f"{model.architecture}({plural(model.num_layers, 'layer')}, hidden {model.hidden_size}, {model.num_heads} "
                f"heads / {model.num_kv_heads} kv, vocab {model.vocab_size})")
    if isinstance(model, ResNet):
        return f"ResNet(blocks {tuple(model.stage_sizes)}, widths {tuple(model.widths)}, {model.stem} stem)"
    return f"{type(model).__name__}({model.hidden_dim})"


def load_teacher(path: str, teacher, ds):
    """The teacher's ``TrainState`` from a kdjax checkpoint or a PyTorch state_dict (.pt)."""
    import jax

    from kdjax import checkpoint, convert
    from kdjax.train import state_from_params

    if not os.path.exists(path):
        raise UsageError(f"--teacher: expected a kdjax checkpoint or a .pt/.pth file, got {path}, which does not "
                         f"exist")
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


# Arguments that cannot change a run's numbers (output locations among them); every other
# one is part of its identity, so that --resume never continues a run made with other settings.
_NOT_IDENTITY = {"command", "func", "out", "overwrite", "no_plots", "json", "quiet", "resume", "mesh", "save_hf",
                 "save_hf_teacher", "tensorboard"}


def identity(args) -> dict:
    """``{"--flag": value}`` of every argument that changes results (stored with checkpoints)."""
    return {f"--{k.replace('_', '-')}": v for k, v in sorted(vars(args).items()) if k not in _NOT_IDENTITY}


def checkpoints(args):
    from kdjax.workflows import Checkpoints

    if args.resume and not args.out:
        raise UsageError("--resume: expected --out DIR (where the checkpoints are), got none")
    if not args.out:
        return None
    return Checkpoints(os.path.join(args.out, "checkpoints"), args.checkpoint_every, args.resume,
                       json.loads(json.dumps(jsonable(identity(args)))))  # as it reads back from disk


def with_inputs(ckpts, ds, *paths):
    """``ckpts`` whose identity also holds the content of the run's inputs: the data set's
    arrays and every file of ``paths`` (a teacher folder or file, a cache), as sha256. A
    ``--resume`` after the corpus, the teacher's weights or the cache changed is then refused,
    as one with other options is (the options alone cannot tell)."""
    import dataclasses
    import hashlib

    if ckpts is None:
        return None
    h = hashlib.sha256()
    for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        h.update(str((a.shape, a.dtype)).encode() + np.ascontiguousarray(a).tobytes())
    extra = {"data_sha256": h.hexdigest()}
    for i, path in enumerate(p for p in paths if p):
        h = hashlib.sha256()
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
        for f in files:
            h.update(os.path.relpath(f, path).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        extra[f"input{i}_sha256"] = h.hexdigest()
    return dataclasses.replace(ckpts, identity={**(ckpts.identity or {}), **extra})


_MESH_AXES = ("members", "data", "fsdp")


def _parse_mesh(text: str | None) -> dict:
    if text is None:
        return {}
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in _MESH_AXES or key.strip() in out or not value.strip().isdigit() or int(value) < 1:
            raise UsageError(f"--mesh: expected data=D,fsdp=F,members=M (each optional, positive integers), "
                             f"got {text!r}")
        out[key.strip()] = int(value)
    return out


def _devices():
    import jax

    return jax.local_devices() if jax.process_count() == 1 else jax.devices()


def make_mesh(args, rep: Reporter, members: int, batch: int, models=()):
    """``--mesh data=D,fsdp=F,members=M``, else every local device (``parallel.default_shape``).
    With fsdp > 1, one line per ``(name, model, example input)`` of ``models``: how its
    parameters are split."""
    import jax

    from kdjax import parallel

    spec = _parse_mesh(args.mesh)
    devices = _devices()
    if spec:
        m = spec.get("members", 1)
        mesh = parallel.make_mesh(m, spec.get("data"), spec.get("fsdp", 1), devices)
        parallel.check_divides(members, mesh, "members", "--mesh: the members of this run")
        parallel.check_divides(batch, mesh, parallel.BATCH, "--mesh: --batch-size")
    else:
        m, d = parallel.default_shape(len(devices), members, batch)
        mesh = None if m * d == 1 else parallel.make_mesh(m, d, 1, devices)
    rep.line(f"running on {parallel.describe(mesh)}")
    if mesh is not None and mesh.shape["fsdp"] > 1:
        for name, model, example in models:
            shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example, train=False))["params"]
            rep.line(f"{name} parameters over fsdp={mesh.shape['fsdp']} (largest dimension it divides): "
                     f"{parallel.describe_sharding(shapes, mesh)}")
    return mesh


def cache_teacher(cache: str, m: dict, meta: dict):
    """The cached teacher's model from the manifest's metadata, checked first: a Llama-family
    configuration of the cache's vocabulary, validation figures that are numbers in range. (The
    manifest's checksum catches an edit or damage; these catch a manifest that was re-checksummed
    after an edit, or written by hand.)"""
    import math

    from kdjax import convert
    from kdjax.models import Llama

    where = f"--teacher-logits {cache}: manifest.json teacher_config"
    try:
        arch = convert._hf_architecture(meta["teacher_config"], where)
    except InputError as e:
        raise UsageError(str(e)) from None
    if arch == "GPT2LMHeadModel" or meta["teacher_config"].get("vocab_size") != m["vocab"]:
        raise UsageError(f"{where}: expected a Llama-family teacher of the cache's {m['vocab']}-token vocabulary, got "
                         f"{arch} with vocab_size {meta['teacher_config'].get('vocab_size')!r}")
    validation = meta.get("validation") or {}
    for key, hi in (("accuracy", 1.0), ("loss", math.inf), ("topk_coverage", 1.0)):
        v = validation.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v <= hi) or math.isnan(v):
            raise UsageError(f"--teacher-logits {cache}: manifest.json validation.{key}: expected a number in [0, "
                             f"{hi:g}], got {v!r}")
    return Llama.from_hf_config(meta["teacher_config"])
