"""Property tests of the round-3 surface (issue 36, item 6): drawn combinations of the
language-model options of ``kdjax distill`` and ``kdjax teacher-logits`` (Hugging Face
teacher folders, top-k caches, --save-hf, --method, --feature-layers, --mesh, --context,
--tokenizer, --overwrite, --resume) and drawn bad values for the library functions behind
them. The CLI exits 0 or 2 (1 only for a path the OS refuses), a refusal is one line and
touches nothing, and no file kdjax did not write changes; a library call returns a finite
result of the right shape or raises ``InputError`` / ``InputTypeError`` in one line.

Everything runs in this process (``cli.main``) so that compiled programs are shared between
examples; a run that trains is one step of tiny models, and most draws end in a refusal."""

import fnmatch
import json
import os
import re
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st
from test_cli import kdjax_here
from test_cli_trust import snapshot

from kdjax.errors import InputError, InputTypeError

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

# CLI draws: few examples (a run that trains costs seconds) and no shrinking (each try may
# train again); the failing arguments are in the assertion message either way.
CLI = settings(max_examples=20, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate),
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LIB = settings(max_examples=25, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

CONTEXT = 16  # the teacher's max_position_embeddings, and every run's --context
# the tiniest run that trains: one step of a 16-wide student on 16-token windows
TINY_LM = ["--steps", "1", "--seeds", "1", "--text-bytes", "20000", "--student-dim", "16", "--quiet"]
DISTILL = ["distill", "--dataset", "text", *TINY_LM]


def _main(*args) -> int:
    from kdjax.app import cli

    try:
        return cli.main([str(a) for a in args])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Built once per module: a tiny Llama teacher folder with its tokenizer, its top-k
    cache (kdjax teacher-logits), another tokenizer, a finished kdjax distill run from the
    folder, and a folder whose config.json is a JSON list."""
    from kdjax import convert, data
    from kdjax import tokenizer as tk
    from kdjax.models import Llama

    base = tmp_path_factory.mktemp("world")
    _, train, _, _ = data.text_documents()
    tok = tk.train_bpe([bytes(d).decode() for d in data._first(train, 20000)], 300, base / "tok.json")
    tk.train_bpe(["print('hello world') " * 50], 300, base / "other.json")
    teacher = Llama(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=CONTEXT, tie_word_embeddings=True)
    variables = teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, CONTEXT), jnp.int32))
    convert.save_hf(teacher, variables, base / "teacher")
    tok.save(str(base / "teacher" / "tokenizer.json"))
    assert _main("teacher-logits", "--teacher", base / "teacher", "--text-bytes", "20000", "--context", CONTEXT,
                 "--k", "8", "--quiet", "--out", base / "cache") == 0
    assert _main(*DISTILL, "--context", CONTEXT, "--teacher", base / "teacher", "--out", base / "finished",
                 "--no-plots") == 0
    shutil.copytree(base / "teacher", base / "listconfig")
    (base / "listconfig" / "config.json").write_text("[]")
    return _World(base=base, teacher=base / "teacher", cache=base / "cache", tok=base / "tok.json",
                  other=base / "other.json", finished=base / "finished", listconfig=base / "listconfig")


class _World(types.SimpleNamespace):
    def __repr__(self):  # short in hypothesis' reports
        return f"world({self.base})"


def _workspace(tmp_path_factory, world):
    """A fresh folder per example: the user's own folder (mine.txt and a tokenizer.json of
    theirs), an empty folder, and copies of a finished and an unfinished kdjax run."""
    root = tmp_path_factory.mktemp("fz")
    (root / "user").mkdir()
    (root / "user" / "mine.txt").write_text("the user's own notes")
    (root / "user" / "tokenizer.json").write_text('{"note": "the user\'s own tokenizer.json, not kdjax\'s"}')
    (root / "empty").mkdir()
    shutil.copytree(world.finished, root / "finished")
    shutil.copytree(world.finished, root / "unfinished")
    os.remove(root / "unfinished" / "results.json")
    return root


def _place(name, root, world, out=None):
    """A drawn location: a path (or None)."""
    return {"none": None, "new": root / "new", "empty": root / "empty", "user": root / "user",
            "finished": root / "finished", "unfinished": root / "unfinished", "teacher": world.teacher,
            "inside-teacher": world.teacher / "sub", "cache": world.cache, "file": root / "user" / "mine.txt",
            "under-a-file": root / "user" / "mine.txt" / "sub", "missing": root / "nothing",
            "same-as-out": out, "inside-out": None if out is None else out / "hf",
            "inside-out-checkpoints": None if out is None else out / "checkpoints" / "hf", "around-out": root,
            }[name]


def check_cli(p, root, before, world, protected, *, out=None, save_hf=None, overwrite=False, resume=False,
              results=True):
    """The property of every CLI draw: exit 0 or 2 (1: a path the OS refused), one line on a
    refusal, which changes nothing; on success, only kdjax's own outputs were replaced (those
    recorded in --out with --overwrite / --resume, the Hugging Face files of --save-hf with
    --overwrite). Returns the refusal's line (None on success)."""
    from kdjax.app.outputs import HF_FILES, MANIFEST

    assert p.returncode in (0, 1, 2), (p.returncode, p.args, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, (p.args, p.stderr[-3000:])
    event(f"exit {p.returncode}")
    assert snapshot(world.base) == protected, p.args  # the teacher, its cache, the tokenizers, the finished run
    after = snapshot(root)
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdjax: error:"), (p.args, p.stderr[-3000:])
        event(f"refused: {re.sub(r'[^ ]*/[^ ]*', 'PATH', lines[0][14:])[:60]}")
        assert after == before, (p.args, lines, sorted(k for k in set(after) | set(before)
                                                      if after.get(k) != before.get(k)))
        return lines[0]
    ours = []  # patterns (relative to root) of what this run may replace
    if out is not None and out.is_relative_to(root):
        rel = os.path.relpath(out, root)
        record = before.get(os.path.join(rel, MANIFEST))
        names = json.loads(record).get("files", []) if record and (overwrite or resume) else []
        ours += [os.path.join(rel, n) for n in [MANIFEST, *names] if isinstance(n, str)]
    if save_hf is not None and overwrite and save_hf.is_relative_to(root):
        ours += [os.path.join(os.path.relpath(save_hf, root), n) for n in HF_FILES]

    def replaceable(path):
        return any(fnmatch.fnmatchcase(path, pattern) or path.startswith(pattern + os.sep) for pattern in ours)

    changed = [path for path, data in before.items() if after.get(path) != data and not replaceable(path)]
    assert not changed, (changed, p.args)
    if out is not None and results:
        assert (out / "results.json").exists() and not list(out.rglob(".tmp-*")), p.args
    if save_hf is not None:
        assert (save_hf / "config.json").exists() and (save_hf / "model.safetensors").exists(), p.args
    return None


# ----------------------------------------------------------------------------- kdjax distill: where it writes

TEACHERS = ["folder", "cache", "folder", "none", "both", "missing", "file", "tokenizer-file", "cache-as-teacher",
            "folder-as-cache", "list-config", "user-folder"]


def _teacher_args(kind, root, world):
    return {"folder": ["--teacher", world.teacher], "cache": ["--teacher-logits", world.cache],
            "none": ["--teacher-dim", "16", "--teacher-layers", "1", "--vocab-size", "300"],
            "both": ["--teacher", world.teacher, "--teacher-logits", world.cache],
            "missing": ["--teacher", root / "nothing"], "file": ["--teacher", root / "user" / "mine.txt"],
            "tokenizer-file": ["--teacher", world.tok], "cache-as-teacher": ["--teacher", world.cache],
            "folder-as-cache": ["--teacher-logits", world.teacher], "list-config": ["--teacher", world.listconfig],
            "user-folder": ["--teacher", root / "user"]}[kind]


def _tokenizer_args(kind, root, world):
    return {"none": [], "teacher's": ["--tokenizer", world.teacher / "tokenizer.json"],
            "same": ["--tokenizer", world.tok],
            "other": ["--tokenizer", world.other], "missing": ["--tokenizer", root / "nothing.json"],
            "not-a-tokenizer": ["--tokenizer", root / "user" / "mine.txt"],
            "user-folder": ["--tokenizer", root / "user"]}[kind]


@CLI
@given(teacher=st.sampled_from(["folder", "cache"]),
       out=st.sampled_from(["new", "none", "user", "empty", "finished", "unfinished", "teacher", "inside-teacher",
                            "cache", "file", "under-a-file"]),
       save_hf=st.sampled_from(["none", "new", "empty", "user", "same-as-out", "inside-out", "inside-out-checkpoints",
                                "around-out", "teacher", "inside-teacher", "cache", "file"]),
       tokenizer=st.sampled_from(["none", "teacher's", "same", "other", "not-a-tokenizer"]),
       overwrite=st.booleans(), resume=st.booleans())
def test_distill_outputs_never_touch_what_kdjax_did_not_write(capsys, tmp_path_factory, world, teacher, out, save_hf,
                                                               tokenizer, overwrite, resume):
    """--out and --save-hf drawn among the user's folders, kdjax's earlier runs, the
    teacher's folder and cache, files and each other, with --overwrite / --resume and a
    --tokenizer: exit 0 or 2, and every file kdjax did not write is byte-identical after."""
    protected = snapshot(world.base)
    root = _workspace(tmp_path_factory, world)
    out_path = _place(out, root, world)
    hf_path = _place(save_hf, root, world, out_path)
    args = [*DISTILL, "--arch", "llama", "--context", CONTEXT, *_teacher_args(teacher, root, world),
            *_tokenizer_args(tokenizer, root, world)]
    args += [] if out_path is None else ["--out", out_path, "--no-plots"]
    args += [] if hf_path is None else ["--save-hf", hf_path]
    args += ["--overwrite"] * overwrite + ["--resume"] * resume
    before = snapshot(root)
    check_cli(kdjax_here(capsys, *args), root, before, world, protected, out=out_path, save_hf=hf_path,
              overwrite=overwrite, resume=resume)


# ----------------------------------------------------------------------------- kdjax distill: the LM options

FEATURE_LAYERS = [["fc2:fc1"], ["layer1:layer1"], ["model.layers.0:model.layers.0"], ["bogus"], [":"], ["a:b:c"],
                  ["fc:input=fc:input"], ["x=y=z"]]
MESHES = ["data=1", "fsdp=1,members=1", "x=2", "data=0", "", "data=1,data=1", "fsdp=2", "data=abc", "members=3",
          "data=99999999999999999999", "data=-1", ",", "data"]
CONTEXTS = ["16", "32", "0", "-1", "abc", "1e3", "99999999999999999999"]


def often(good, bad):
    """Draw ``good`` about as often as all of ``bad`` together, so that draws get past the
    first check more often than not."""
    return st.sampled_from([good] * len(bad) + list(bad))


@CLI
@given(arch=often("llama", ["transformer", "default", "mlp"]), teacher=often("folder", TEACHERS),
       method=often(None, ["kd", "gkd", "reverse_kl", "dkd", "fitnet", "at", "sp", "rkd", "pkt", "crd", "uld",
                           "bogus"]),
       feature_layers=often(None, FEATURE_LAYERS), mesh=often(None, MESHES), context=often("16", CONTEXTS),
       tokenizer=often("none", ["teacher's", "other", "missing", "not-a-tokenizer", "user-folder"]),
       save_hf=st.booleans())
def test_distill_lm_options_exit_0_or_2(capsys, tmp_path_factory, world, arch, teacher, method, feature_layers, mesh,
                                        context, tokenizer, save_hf):
    """--arch, a teacher (folder, cache, both, none, or a path that is none of them),
    --method, --feature-layers, --mesh, --context and --tokenizer drawn together: exit 0 or 2
    with one line, never a traceback, and nothing written by a refusal."""
    protected = snapshot(world.base)
    root = _workspace(tmp_path_factory, world)
    out = root / "new"
    args = [*DISTILL, *([] if arch == "default" else ["--arch", arch]), "--context", context,
            *_teacher_args(teacher, root, world), *_tokenizer_args(tokenizer, root, world)]
    args += [] if method is None else ["--method", method]
    args += [] if feature_layers is None else ["--feature-layers", *feature_layers]
    args += [] if mesh is None else ["--mesh", mesh]
    args += ["--out", out, "--no-plots"] + (["--save-hf", root / "hf"] if save_hf else [])
    before = snapshot(root)
    check_cli(kdjax_here(capsys, *args), root, before, world, protected, out=out,
              save_hf=root / "hf" if save_hf else None)


# ----------------------------------------------------------------------------- kdjax distill: bad values

BAD_VALUES = {  # one or two of these on top of a run that would train; values that crash today: KNOWN below
    "--steps": ["0", "-1", "abc", "1.5", ""], "--seeds": ["0", "-2", "x"], "--student-dim": ["0", "-16", "abc"],
    "--student-layers": ["0", "two"], "--heads": ["0", "3", "5"], "--kv-heads": ["0", "3", "8"],
    "--context": ["0", "32", "1000000000"], "--text-bytes": ["0", "10", "100"], "--batch-size": ["0", "1000000000"],
    "--temperature": ["0", "-1", "nan", "inf", "abc"], "--alpha": ["-0.1", "1.5", "nan", "inf"],
    "--lr": ["0", "-1", "nan", "inf"], "--seed": ["abc", "1.5", "-1", "4294967296"], "--checkpoint-every": ["0", "-1"],
    "--prompt-tokens": ["0", "16", "100"], "--lmbda": ["-1", "2", "nan"], "--beta": ["-1", "2", "nan"],
    "--teacher-steps": ["0", "3"], "--mesh": MESHES, "--tensorboard": ["FILE", "TEACHER"], "--vocab-size": ["0", "100"],
    "--topk-missing": ["bogus", "symmetric_uniform"], "--optimizer": ["rmsprop"], "--momentum": ["1.5", "nan"],
    "--weight-decay": ["-1", "nan"], "--epochs": ["1"], "--method": ["gkd", "dkd", "bogus"], "--kd-weight": ["1"],
    "--temperatures": ["0", "nan"], "--teacher-dim": ["16"], "--num-classes": ["7"], "--dataset": ["digits", "x.npz"],
}


@CLI
@given(base=st.sampled_from(["folder", "cache"]),
       bad=st.dictionaries(st.sampled_from(sorted(BAD_VALUES)), st.integers(0, 9), min_size=1, max_size=2))
def test_distill_bad_values_are_one_line(capsys, tmp_path_factory, world, base, bad):
    """A run that would train, with one or two drawn bad values (zero, negative, huge,
    non-numeric, a file where a folder goes): exit 0 or 2 with one line, nothing written."""
    protected = snapshot(world.base)
    root = _workspace(tmp_path_factory, world)
    args = [*DISTILL, "--arch", "llama", "--context", CONTEXT, *_teacher_args(base, root, world)]
    for flag, i in bad.items():
        value = BAD_VALUES[flag][i % len(BAD_VALUES[flag])]
        args += [flag, {"FILE": root / "user" / "mine.txt", "TEACHER": world.teacher}.get(value, value)]
    args += ["--out", root / "new", "--no-plots"]
    before = snapshot(root)
    check_cli(kdjax_here(capsys, *args), root, before, world, protected, out=root / "new")


# ----------------------------------------------------------------------------- kdjax teacher-logits

@CLI
@given(teacher=often("folder", ["list-config", "missing", "file", "cache-as-teacher", "user-folder",
                                "tokenizer-file"]),
       k=often("8", ["4", "0", "-1", "300", "301", "abc", "99999999999"]),
       context=often("16", ["32", "8", "0", "x"]),
       out=st.sampled_from(["new", "cache", "user", "teacher", "file", "empty", "finished", "inside-teacher"]),
       tokenizer=often("none", ["teacher's", "other", "not-a-tokenizer", "missing"]),
       dtype=often(None, ["float16", "bfloat16"]), batch_size=often(None, ["1", "0", "1000000000"]),
       overwrite=st.booleans())
def test_teacher_logits_options_exit_0_or_2(capsys, tmp_path_factory, world, teacher, k, context, out, tokenizer,
                                            dtype, batch_size, overwrite):
    """kdjax teacher-logits with drawn teachers, k, --context, --out (a copy of the cache:
    resumed, rebuilt or refused; the user's folder; the teacher's), --tokenizer, dtype and
    batch size: exit 0 or 2 with one line, and nothing of the user's or the teacher's touched."""
    protected = snapshot(world.base)
    root = _workspace(tmp_path_factory, world)
    shutil.copytree(world.cache, root / "cache")
    teacher_args = {"folder": ["--teacher", world.teacher]}.get(teacher) or _teacher_args(teacher, root, world)
    out_path = root / "cache" if out == "cache" else _place(out, root, world)
    args = ["teacher-logits", *teacher_args, "--text-bytes", "20000", "--context", context, "--k", k, "--quiet",
            "--out", out_path, *_tokenizer_args(tokenizer, root, world)]
    args += ([] if dtype is None else ["--values-dtype", dtype]) + ([] if batch_size is None else
                                                                    ["--batch-size", batch_size])
    args += ["--overwrite"] * overwrite
    before = snapshot(root)
    p = kdjax_here(capsys, *args)
    check_cli(p, root, before, world, protected, out=out_path, overwrite=overwrite, results=False)
    if p.returncode == 0:
        from kdjax import offline

        values, indices, m = offline.read_topk_cache(out_path)  # what it wrote reads back, verified
        assert np.isfinite(values).all() and values.shape[-1] == int(k) and (indices < m["vocab"]).all()


# ----------------------------------------------------------------------------- library: drawn bad values

def refused_or(call):
    """``call()``'s result, or None when it raised InputError / InputTypeError with one
    line (any other exception fails the test)."""
    try:
        return call()
    except (InputError, InputTypeError) as e:
        assert str(e) and "\n" not in str(e), repr(e)
        event(f"{type(e).__name__}: {re.sub(r'[^ ]*/[^ ]*', 'PATH', str(e))[:60]}")
        return None


def _finite(x) -> bool:
    return bool(np.isfinite(np.asarray(x, np.float64)).all())


NOT_A_NUMBER = [float("nan"), float("inf"), -float("inf")]
# config.json fields load_hf reads, with drawn replacements (DROP: the key removed)
DROP = object()
CONFIG_VALUES = [DROP, 0, -1, 1.5, "8", None, [], {}, True, float("nan"), 2**40, 16, 64, 300, 1e-6]
CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "tie_word_embeddings", "architectures", "model_type", "rope_parameters", "rope_scaling",
               "sliding_window", "layer_types", "attention_bias", "torch_dtype"]


@LIB
@given(edits=st.dictionaries(st.sampled_from(CONFIG_KEYS), st.sampled_from(CONFIG_VALUES), max_size=3),
       whole=often(None, [[], "llama", 3, None, [{"vocab_size": 300}]]))
def test_load_hf_of_a_drawn_config_loads_or_is_one_line(tmp_path_factory, world, edits, whole):
    """convert.load_hf of the teacher's weights under a drawn config.json (keys missing,
    of the wrong type, zero, negative, huge; a JSON list): a model whose logits are finite
    and [batch, length, vocab], or one InputError line."""
    from kdjax import convert

    folder = tmp_path_factory.mktemp("hf")
    shutil.copy(world.teacher / "model.safetensors", folder / "model.safetensors")
    config = json.loads((world.teacher / "config.json").read_text())
    for key, value in edits.items():
        if value is DROP:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config if whole is None else whole))
    got = refused_or(lambda: convert.load_hf(folder))
    event("loaded" if got is not None else "refused")
    if got is not None:
        model, variables = got
        assert all(_finite(leaf) for leaf in jax.tree_util.tree_leaves(variables))
        logits = model.apply(variables, jnp.zeros((1, 4), jnp.int32))
        assert logits.shape == (1, 4, model.vocab_size) and _finite(logits)


def drawn(defaults: dict, pools: dict):
    """``defaults`` (a call that works) with up to two entries replaced by a value drawn from
    ``pools`` (bad ones, and other good ones)."""
    picks = st.dictionaries(st.sampled_from(sorted(pools)), st.integers(0, 99), max_size=2)
    return picks.map(lambda d: {**defaults, **{k: pools[k][i % len(pools[k])] for k, i in d.items()}})


@pytest.fixture(scope="module")
def tiny_lm():
    """A 32-token Llama of 8 positions and its variables (generation, caches)."""
    from kdjax.models import Llama

    model = Llama(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=8)
    return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))


KEYS = {"none": None, "PRNGKey": jax.random.PRNGKey(1), "key": jax.random.key(2), "int": 0, "float": 7.5,
        "str": "key", "uint32[3]": np.zeros(3, np.uint32), "uint32[1, 2]": np.zeros((1, 2), np.uint32)}



GENERATE = {"shape": (2, 3), "dtype": "int32", "ids": "ok", "new": 2, "rng": "none", "temperature": 1.0, "top_k": None,
            "top_p": None, "eos_id": None, "mask": "none"}
GENERATE_POOLS = {
    "shape": [(0, 3), (2, 0), (3,), (1, 2, 3), (1, 7), (1, 1)], "dtype": ["int64", "uint8", "float32", "bool"],
    "ids": ["high", "negative"], "new": [0, -1, 2.0, True, 9, "2", 1, 5], "rng": sorted(KEYS),
    "temperature": [0.0, 0.7, -1.0, *NOT_A_NUMBER, "1", np.float32(2.0), (1.0, 2.0)],
    "top_k": [1, 32, 33, 0, -1, 2.5, True, np.int64(3)], "top_p": [0.5, 1.0, 0.0, 1.5, float("nan"), -0.1],
    "eos_id": [0, 31, 32, -1, 1.0, True], "mask": ["left-padded", "right-padded", "int", "wrong-shape", "all-padding"]}


@LIB
@given(c=drawn(GENERATE, GENERATE_POOLS))
def test_generate_returns_tokens_in_the_vocabulary_or_one_line(tiny_lm, c):
    """kdjax.generate with drawn prompts (empty, wrong rank, ids outside the vocabulary,
    floats), lengths, keys (an int, a float, a key of the wrong shape), temperatures, top-k,
    top-p, eos ids and prompt masks: int32 tokens [batch, length + new] in [0, vocab) that
    begin with the prompts, or one InputError / InputTypeError line."""
    from kdjax import generate

    model, variables = tiny_lm
    shape = c["shape"]
    values = np.arange(int(np.prod(shape))).reshape(shape) % 32 + {"ok": 0, "high": 32, "negative": -40}[c["ids"]]
    prompts = jnp.asarray(values.astype(c["dtype"]))
    n = shape[-1]
    prompt_mask = {"none": None, "left-padded": np.arange(n) >= n // 2, "int": np.ones(shape, np.int32),
                   "right-padded": np.arange(n) < max(1, n - 1), "wrong-shape": np.ones((1, 1), bool),
                   "all-padding": np.zeros(shape, bool)}[c["mask"]]
    if prompt_mask is not None and prompt_mask.ndim == 1 and len(shape) == 2:
        prompt_mask = np.broadcast_to(prompt_mask, shape).copy()
    got = refused_or(lambda: generate(model, variables, prompts, c["new"], rng=KEYS[c["rng"]],
                                      temperature=c["temperature"], top_k=c["top_k"], top_p=c["top_p"],
                                      eos_id=c["eos_id"], prompt_mask=prompt_mask))
    event("generated" if got is not None else "refused")
    if got is not None:
        tokens = np.asarray(got)
        assert tokens.dtype == np.int32 and tokens.shape == (shape[0], shape[1] + c["new"]), tokens.shape
        assert (tokens >= 0).all() and (tokens < 32).all(), tokens
        assert (tokens[:, :shape[1]] == values).all()


def _topk_inputs(k, mutation):
    """Student logits [2, 3, 6], the teacher's exact top-k log-probabilities, then one mutation."""
    rng = np.random.default_rng(k)
    student = rng.normal(size=(2, 3, 6)).astype(np.float32) * 3
    teacher = rng.normal(size=(2, 3, 6)).astype(np.float32) * 3
    logp = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
    order = np.argsort(-logp, axis=-1)[..., :max(k, 0)]
    values, indices = np.take_along_axis(logp, order, -1), order.astype(np.int32)
    if mutation == "positive":
        values = values + 1.0
    elif mutation in ("nan", "inf", "-inf"):
        values = values.copy()
        values[0, 0, 0] = float(mutation)
    elif mutation == "id-high":
        indices = indices.copy()
        indices[1, 2, 0] = 6
    elif mutation == "id-negative":
        indices = -1 - indices
    elif mutation == "repeated" and k > 1:
        indices = indices.copy()
        indices[..., 1] = indices[..., 0]
    elif mutation == "float-ids":
        indices = indices.astype(np.float32)
    elif mutation == "int-values":
        values = values.astype(np.int32)
    elif mutation == "very-negative":
        values = values - 1e30
    elif mutation == "shape":
        values, indices = values[:1], indices[:1]
    return student, teacher, values, indices


def _where(kind):
    return {"none": None, "bool": np.array([[True, False, True], [False, False, True]]),
            "none-true": np.zeros((2, 3), bool), "int": np.array([[1, 0, 2], [0, 0, 1]], np.int32),
            "float": np.ones((2, 3), np.float32), "shape": np.ones((3,), bool),
            "list": [[True, False, True], [False, False, True]]}[kind]


TOPK = {"k": 3, "mutation": None, "temperature": 2.0, "missing": "zero", "eps": 1e-6, "labels": "ok", "alpha": 0.5,
        "where": "none"}
TOPK_POOLS = {
    "k": [1, 6, 7, 0], "mutation": ["positive", "nan", "inf", "-inf", "id-high", "id-negative", "repeated",
                                    "float-ids", "int-values", "very-negative", "shape"],
    "temperature": [1.0, 0.5, 0.05, 1e3, 0.0, -1.0, *NOT_A_NUMBER, "2"], "missing": ["symmetric_uniform", "bogus"],
    "eps": [0.0, 1.0, float("nan"), "x"], "labels": ["high", "negative", "float", "shape"],
    "alpha": [0.0, 1.0, 2.0, float("nan")], "where": ["bool", "none-true", "int", "float", "shape", "list"]}


@LIB
@given(c=drawn(TOPK, TOPK_POOLS))
def test_topk_losses_are_finite_or_one_line(c):
    """offline.topk_kl and topk_distillation_loss with drawn k, corrupted top-k inputs (ids
    outside the vocabulary, repeated, negative; positive, NaN, infinite log-probabilities),
    temperatures, eps, labels, alpha and masks: finite values >= 0 of the right shape (at
    k = vocab equal to soft_kl), or one InputError / InputTypeError line."""
    from kdjax import offline, soft_kl

    k, temperature, missing = c["k"], c["temperature"], c["missing"]
    student, teacher, values, indices = _topk_inputs(k, c["mutation"])
    kl = refused_or(lambda: offline.topk_kl(student, values, indices, temperature, missing=missing, eps=c["eps"]))
    event("kl" if kl is not None else "kl refused")
    if kl is not None:
        assert kl.shape == (2, 3) and _finite(kl) and (np.asarray(kl) >= -1e-4).all(), kl
        if k == 6 and c["mutation"] is None and missing == "zero":  # the whole distribution: the dense KL
            np.testing.assert_allclose(kl, soft_kl(student, teacher, temperature), rtol=1e-4, atol=1e-5)
    y = {"ok": np.zeros((2, 3), np.int32), "high": np.full((2, 3), 6, np.int32), "negative": -np.ones((2, 3), np.int32),
         "float": np.zeros((2, 3), np.float32), "shape": np.zeros((2,), np.int32)}[c["labels"]]
    loss = refused_or(lambda: offline.topk_distillation_loss(student, values, indices, y, temperature, c["alpha"],
                                                             where=_where(c["where"]), missing=missing))
    if loss is not None:
        assert np.shape(loss) == () and _finite(loss) and float(loss) >= -1e-4, loss


CACHE = {"tokens": "ok", "k": 4, "batch_size": 2, "shard_rows": 2, "values_dtype": np.float32, "metadata": None,
         "directory": "new", "teacher": "ok"}
CACHE_POOLS = {
    "tokens": ["high", "negative", "float", "1-D", "empty", "list"], "k": [1, 32, 33, 0, 2.0],
    "batch_size": [1, 3, 0, -1, 2.5], "shard_rows": [1, 5, 0, True],
    "values_dtype": [np.float16, "float16", np.int32, "bf16"],
    "metadata": [{}, {"a": 1}, [], {"x": {1, 2}}, "text", {"nan": float("nan")}, {1: 2}],
    "directory": ["a file", "existing empty"], "teacher": ["nan"]}


@LIB
@given(c=drawn(CACHE, CACHE_POOLS))
def test_write_topk_cache_writes_a_readable_cache_or_nothing(tmp_path_factory, tiny_lm, c):
    """offline.write_topk_cache with drawn tokens (ids outside the vocabulary, floats,
    wrong rank, none), k, batch and shard sizes, dtypes, metadata (not JSON), a file as the
    directory, a teacher with NaN weights: a cache that reads back (finite, ids in the
    vocabulary, [rows, length, k]), or one line and no shard holding a non-finite value."""
    from kdjax import offline

    model, variables = tiny_lm
    if c["teacher"] == "nan":
        variables = jax.tree_util.tree_map(lambda a: a * np.nan, variables)
    base = tmp_path_factory.mktemp("cache")
    path = {"new": base / "c", "a file": base / "f", "existing empty": base}[c["directory"]]
    if c["directory"] == "a file":
        path.write_text("the user's")
    rows = np.arange(24).reshape(3, 8) % 32
    x = {"ok": rows.astype(np.int32), "high": rows + 32, "negative": rows - 40, "float": rows.astype(np.float32),
         "1-D": rows[0], "empty": rows[:0], "list": rows.tolist()}[c["tokens"]]
    m = refused_or(lambda: offline.write_topk_cache(path, model, variables, x, c["k"], batch_size=c["batch_size"],
                                                    shard_rows=c["shard_rows"], values_dtype=c["values_dtype"],
                                                    metadata=c["metadata"]))
    event("written" if m is not None else "refused")
    if m is None:
        if c["teacher"] != "nan":
            assert not list(base.rglob("shard-*.npz"))  # refused before anything was written
        for shard in base.rglob("shard-*.npz"):  # (a NaN teacher: nothing from its first NaN row on)
            with np.load(shard) as z:
                assert _finite(z["values"])
        return
    values, indices, _ = offline.read_topk_cache(path)
    assert values.shape == (3, 8, c["k"]) and indices.shape == values.shape and _finite(values)
    assert (indices >= 0).all() and (indices < 32).all() and (values <= 0).all()


ADVANTAGES = {"shape": (2, 4), "bad": None, "mask": "bool", "coef": 1.0, "discount": 0.0}
ADVANTAGES_POOLS = {
    "shape": [(2,), (0, 4), (2, 4, 1), (1, 1)], "bad": ["nan", "inf", "teacher-shape", "mask-shape"],
    "mask": ["int", "float", "half"], "coef": [-2.0, 0.0, *NOT_A_NUMBER, "1", (1.0, 2.0), 3],
    "discount": [0.5, 1.0, np.float32(0.9), float("nan"), 2.0, -1.0, float("inf"), "0"]}


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # NumPy on a drawn NaN log-probability
@LIB
@given(c=drawn(ADVANTAGES, ADVANTAGES_POOLS))
def test_reverse_kl_advantages_are_the_formula_or_one_line(c):
    """onpolicy.reverse_kl_advantages with drawn shapes, non-finite log-probabilities,
    masks, coef and discount: the discounted advantages of the formula (finite from finite
    inputs), or one InputError / InputTypeError line."""
    from kdjax.onpolicy import reverse_kl_advantages

    shape, bad = c["shape"], c["bad"]
    rng = np.random.default_rng(0)
    sampling = -rng.exponential(size=shape).astype(np.float32)
    teacher = -rng.exponential(size=shape).astype(np.float32)
    m = rng.random(shape) < 0.7
    m = {"bool": m, "int": m.astype(np.int32), "float": m.astype(np.float32), "half": m * np.float32(0.5)}[c["mask"]]
    if bad in ("nan", "inf") and sampling.size:
        teacher.flat[0] = float(bad)
    teacher = teacher[..., :1] if bad == "teacher-shape" else teacher
    m = m[:1] if bad == "mask-shape" else m
    got = refused_or(lambda: reverse_kl_advantages(sampling, teacher, m, c["coef"], c["discount"]))
    event("computed" if got is not None else "refused")
    if got is None:
        return
    assert got.shape == shape, got.shape
    if bad in ("nan", "inf"):  # a non-finite log-probability is not refused (see the report); only its row may be
        assert _finite(np.asarray(got)[1:]), got
        return
    assert _finite(got), got
    a = -float(c["coef"]) * np.asarray(m, np.float64) * (sampling.astype(np.float64) - teacher)
    for t in range(shape[-1] - 2, -1, -1):  # discounted sums from the end of each row
        a[..., t] += float(c["discount"]) * a[..., t + 1]
    np.testing.assert_allclose(got, a, rtol=1e-4, atol=1e-5)


JSD = {"bad": None, "labels": "none", "beta": 0.5, "temperature": 1.0}
JSD_POOLS = {"bad": ["nan", "inf", "-inf", "shape", "int"], "labels": ["ok", "-100", "all -100", "float", "shape"],
             "beta": [0.0, 1.0, 0.1, -0.1, 1.5, float("nan"), "0.5"], "temperature": [2.0, 0.05, 0.0, -1.0,
                                                                                       *NOT_A_NUMBER]}


@LIB
@given(c=drawn(JSD, JSD_POOLS))
def test_generalized_jsd_loss_is_finite_or_one_line(c):
    """onpolicy.generalized_jsd_loss with drawn non-finite or mis-shaped teacher logits,
    labels (-100 not counted), beta and temperature: a finite scalar >= 0, or one line."""
    from kdjax.onpolicy import generalized_jsd_loss

    rng = np.random.default_rng(1)
    s, t = (rng.normal(size=(2, 3, 5)).astype(np.float32) * 4 for _ in range(2))
    if c["bad"] in ("nan", "inf", "-inf"):
        t[0, 0, 0] = float(c["bad"])
    t = t[..., :4] if c["bad"] == "shape" else np.round(t).astype(np.int32) if c["bad"] == "int" else t
    y = {"none": None, "ok": np.zeros((2, 3), np.int32), "-100": np.array([[0, -100, 1], [2, 3, -100]]),
         "all -100": np.full((2, 3), -100), "float": np.zeros((2, 3), np.float32),
         "shape": np.zeros((3,), np.int32)}[c["labels"]]
    got = refused_or(lambda: generalized_jsd_loss(s, t, y, c["beta"], c["temperature"]))
    event("computed" if got is not None else "refused")
    if got is not None:
        assert np.shape(got) == () and _finite(got) and float(got) >= -1e-5, got


MESH = {"members": 1, "data": None, "fsdp": 1, "devices": "default"}
MESH_POOLS = {"members": [0, -1, 2, 1.0, True, "1", None, np.int64(1)], "data": [1, 0, 2, 1.5],
              "fsdp": [0, 2, -3, 1.0], "devices": ["empty", "twice", "strings", "a string", "an int", "one",
                                                    "generator", "none"]}


@LIB
@given(c=drawn(MESH, MESH_POOLS))
def test_make_mesh_is_a_mesh_or_one_line(c):
    """parallel.make_mesh with drawn counts (zero, negative, floats, bools, strings) and
    device lists (empty, a device twice, names, an int): a Mesh of that shape over distinct
    devices, or one InputError / InputTypeError line."""
    from kdjax import parallel

    d = jax.devices()
    devices = {"default": None, "none": None, "empty": [], "twice": [d[0], d[0]], "strings": ["cpu:0"],
               "a string": "cpu",
               "an int": 5, "one": d[:1], "generator": (x for x in d)}[c["devices"]]
    mesh = refused_or(lambda: parallel.make_mesh(c["members"], c["data"], c["fsdp"], devices))
    event("mesh" if mesh is not None else "refused")
    if mesh is not None:
        assert mesh.axis_names == parallel.AXES
        assert (mesh.shape["members"], mesh.shape["fsdp"]) == (c["members"], c["fsdp"])
        assert c["data"] is None or mesh.shape["data"] == c["data"]
        flat = list(mesh.devices.flat)
        assert len(set(flat)) == len(flat)


@LIB
@given(values=st.sampled_from(["float", "int", "nan", "scalar", "empty"]),
       where=st.sampled_from(["bool", "none", "none-true", "int", "float", "shape", "list"]))
def test_masked_mean_is_the_mean_of_the_selected_or_one_line(values, where):
    """losses.masked_mean with drawn values and masks (ints, floats, lists, another shape):
    the mean over the positions the mask selects (0 for none), or one line."""
    from kdjax.losses import masked_mean

    assume(not (values == "empty" and where == "none"))  # KNOWN: NaN, not 0 (test_masked_mean_of_nothing_is_0)
    x = {"float": np.arange(6, dtype=np.float32).reshape(2, 3), "int": np.arange(6).reshape(2, 3),
         "nan": np.where(np.arange(6) == 1, np.nan, np.arange(6)).reshape(2, 3).astype(np.float32),
         "scalar": np.float32(3.0), "empty": np.zeros((0, 3), np.float32)}[values]
    w = _where(where)
    got = refused_or(lambda: masked_mean(x, w))
    event("computed" if got is not None else "refused")
    if got is None:
        return
    assert np.shape(got) == ()
    x64 = np.asarray(x, np.float64)
    selected = x64[np.asarray(w, bool)] if w is not None else x64.ravel()
    want = selected.mean() if selected.size else 0.0
    if np.isfinite(want) or w is None:
        np.testing.assert_allclose(float(got), want, rtol=1e-6)


LOSS = {"where": "bool", "labels": "ok", "divergence": "kl", "temperature": 2.0, "alpha": 0.5}
LOSS_POOLS = {"where": ["none", "none-true", "int", "float", "shape", "list"],
              "labels": ["masked -100", "high", "float"],
              "divergence": ["reverse_kl", "jsd", "bogus"], "temperature": [0.05, 0.0, -1.0, *NOT_A_NUMBER],
              "alpha": [0.0, 1.0, -0.5, float("nan")]}


@LIB
@given(c=drawn(LOSS, LOSS_POOLS))
def test_distillation_loss_with_where_is_finite_or_one_line(c):
    """losses.distillation_loss with drawn masks, labels (-100 where masked out), divergences,
    temperatures and alphas: a finite scalar >= 0, or one line."""
    from kdjax.losses import distillation_loss

    rng = np.random.default_rng(2)
    s, t = (rng.normal(size=(2, 3, 4)).astype(np.float32) * 3 for _ in range(2))
    w = _where(c["where"])
    keep = np.asarray(w, bool) if c["where"] not in ("none", "shape") else np.ones((2, 3), bool)
    y = {"ok": np.ones((2, 3), np.int32), "high": np.full((2, 3), 4, np.int32), "float": np.ones((2, 3), np.float32),
         "masked -100": np.where(keep, 1, -100).astype(np.int32)}[c["labels"]]
    got = refused_or(lambda: distillation_loss(s, t, y, c["temperature"], c["alpha"], where=w,
                                               divergence=c["divergence"]))
    event("computed" if got is not None else "refused")
    if got is not None:
        assert np.shape(got) == () and _finite(got) and float(got) >= -1e-5, got


# ----------------------------------------------------------------------------- known failures
# Found by the draws above and kept out of them (assume / the pools) until fixed: each is one
# command or call that must end in one line (exit 2 / InputError) or a finite value. Found and
# not tested here (they would allocate or loop for minutes): --steps 99999999999999999999
# (builds the index schedule in a Python loop), --seeds 100000000000 (MemoryError in
# list(range(...))), --student-dim 1000000000 (np.zeros of 1.1 TiB in
# train/state.py _host_adam_state, inside the abstract memory check).


def _known_cli(capsys, tmp_path_factory, world, kind):
    root = _workspace(tmp_path_factory, world)
    base = [*DISTILL, "--arch", "llama", "--context", CONTEXT, "--teacher", world.teacher, "--out", root / "new"]
    args = {"student-dim 3": base + ["--student-dim", "3"], "seed -1": base + ["--seed", "-1"],
            "seed 1e23": base + ["--seed", "99999999999999999999999"],
            "k > vocab into an existing folder": ["teacher-logits", "--teacher", world.teacher, "--text-bytes", "20000",
                                                  "--context", CONTEXT, "--k", "301", "--quiet", "--out",
                                                  root / "empty"]}[kind]
    before = snapshot(root)
    p = kdjax_here(capsys, *args)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    assert snapshot(root) == before


@pytest.mark.parametrize("kind", [
    "student-dim 3",  # found here (head_dim 0: a ZeroDivisionError in the rotary embedding); llama.py refuses it now
    "seed -1", "seed 1e23",  # found here (NumPy's and JAX's tracebacks); parser.py refuses them now
    "k > vocab into an existing folder",  # found here; fixed by 148e080 (k is checked before --out is claimed)
])
def test_known_failures_cli_are_one_line_and_touch_nothing(capsys, tmp_path_factory, world, kind):
    _known_cli(capsys, tmp_path_factory, world, kind)


def test_topk_kl_at_a_small_temperature_is_finite():
    """Found here: inf, the leftover mass's term underflowing to log(0); now in log space."""
    from kdjax import offline

    student, _, values, indices = _topk_inputs(3, None)
    assert _finite(offline.topk_kl(student, values, indices, 1e-3, missing="symmetric_uniform"))


def test_masked_mean_of_nothing_is_0():
    """Found here: NaN (jnp.mean of nothing), while the docstring promises 0."""
    from kdjax.losses import masked_mean

    assert float(masked_mean(np.zeros((0, 3), np.float32))) == 0.0
