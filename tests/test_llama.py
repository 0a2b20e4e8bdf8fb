"""kdjax.models.Llama and Hugging Face checkpoint folders (kdjax.convert.load_hf / save_hf):
configs read and written back, the folders' errors, GPT-2 through the same door, and the
decoder inside the train step. Logits against transformers are parity rows
(parity/checks/llama.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import convert
from kdjax.errors import InputError
from kdjax.models import Llama

TINY = Llama(vocab_size=37, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def tiny():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 37, (4, 9)), jnp.int32)
    return tokens, TINY.init(jax.random.PRNGKey(0), tokens)


def test_config_round_trip_for_every_family():
    for model in (TINY, TINY.clone(architecture="Qwen2ForCausalLM", qkv_bias=True, tie_word_embeddings=True),
                  TINY.clone(architecture="Qwen3ForCausalLM", qk_norm=True, head_dim=8),
                  TINY.clone(architecture="MistralForCausalLM", sliding_windows=(4, 4)),
                  TINY.clone(rope_theta=500000.0, rope_scaling=(8.0, 1.0, 4.0, 16.0))):
        assert Llama.from_hf_config(model.hf_config()) == model


def test_save_and_load_hf(tiny, tmp_path):
    tokens, v = tiny
    convert.save_hf(TINY, v, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["config.json", "model.safetensors"]
    model, back = convert.load_hf(tmp_path / "s")
    assert model == TINY
    for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="exists; pass overwrite=True"):
        convert.save_hf(TINY, v, tmp_path / "s")
    convert.save_hf(TINY, v, tmp_path / "s", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_transformers_loads_what_save_hf_writes(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    tokens, v = tiny
    convert.save_hf(TINY, v, tmp_path / "s")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    with torch.no_grad():
        want = hf(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
    np.testing.assert_allclose(TINY.apply(v, tokens), want, atol=1e-5, rtol=1e-5)
    gpt = kdjax.TransformerLM(37, 2, 16, 4, 12)
    gv = gpt.init(jax.random.PRNGKey(1), tokens)
    convert.save_hf(gpt, gv, tmp_path / "g")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g").eval()
    with torch.no_grad():
        want = hf(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
    np.testing.assert_allclose(gpt.apply(gv, tokens), want, atol=1e-5, rtol=1e-5)
    model, back = convert.load_hf(tmp_path / "g")
    assert model == gpt


def test_load_hf_errors(tiny, tmp_path):
    tokens, v = tiny
    with pytest.raises(InputError, match="readable config.json"):
        convert.load_hf(tmp_path / "nothing")
    convert.save_hf(TINY, v, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg | {"architectures": ["GemmaForCausalLM"]}))
    with pytest.raises(InputError, match="architecture 'GemmaForCausalLM' is not supported"):
        convert.load_hf(tmp_path / "s")
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 32}))
    with pytest.raises(InputError, match="mlp.down_proj"):
        convert.load_hf(tmp_path / "s")  # the weights do not fit the configuration: keys named
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    weights = tmp_path / "s" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(InputError, match="could not read the weights"):
        convert.load_hf(tmp_path / "s")
    with pytest.raises(InputError, match="rope_type 'yarn' is not supported"):
        Llama.from_hf_config(cfg | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})


def test_llama_in_the_train_step(tiny):
    tokens, v = tiny
    student = Llama(vocab_size=37, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    state = kdjax.create_train_state(student, 0, tokens[:1])
    where = jnp.arange(9)[None] < jnp.asarray([[9], [5], [9], [7]])
    batch = {"x": tokens, "y": jnp.roll(tokens, -1, 1), "where": where, "teacher_logits": TINY.apply(v, tokens)}
    step = kdjax.make_train_step(student, "kd")
    losses = []
    for _ in range(15):
        state, m = step(state, batch, jax.random.PRNGKey(0), kdjax.make_hyper(2.0, 0.5))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    with pytest.raises(InputError, match="num_heads divisible by num_kv_heads"):
        student.clone(num_kv_heads=3).init(jax.random.PRNGKey(0), tokens)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_lm_step_equals_the_logits_step(family):
    """FusedLM (hidden states + head, chunked; no [tokens, vocab] array) takes the same step
    as "kd" on the logits: online teacher (hidden states + its head) and cached logits."""
    from kdjax.fused import FusedLM

    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 37, (3, 8)), jnp.int32)
    where = jnp.arange(8)[None] < jnp.asarray([[8], [5], [7]])
    if family == "llama":
        teacher, student = TINY, TINY.clone(hidden_size=8, num_layers=1, tie_word_embeddings=True)
    else:
        teacher, student = kdjax.TransformerLM(37, 2, 16, 4, 8), kdjax.TransformerLM(37, 1, 8, 2, 8,
                                                                                       tie_embeddings=False)
    t_state = kdjax.create_train_state(teacher, 0, tokens[:1])
    state = kdjax.create_train_state(student, 1, tokens[:1])
    batch = {"x": tokens, "y": jnp.roll(tokens, -1, 1), "where": where}
    hyper = kdjax.make_hyper(2.0, 0.6)
    want_state, want = kdjax.make_train_step(student, "kd", teacher=teacher, donate=False)(
        state, batch, jax.random.PRNGKey(0), hyper, t_state)
    fused = FusedLM(chunk_size=5)
    got_state, got = kdjax.make_train_step(student, fused, teacher=teacher, donate=False)(
        state, batch, jax.random.PRNGKey(0), hyper, t_state)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(got_state.params), jax.tree_util.tree_leaves(want_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    cached = batch | {"teacher_logits": teacher.apply(t_state.variables, tokens)}
    _, got_cached = kdjax.make_train_step(student, fused, donate=False)(state, cached, jax.random.PRNGKey(0), hyper)
    np.testing.assert_allclose(got_cached["loss"], want["loss"], rtol=1e-6)
    with pytest.raises(InputError, match="FusedLM needs a Hyper"):
        kdjax.make_train_step(student, fused, donate=False)(state, cached, jax.random.PRNGKey(0))


def test_cli_llama_end_to_end_with_a_tokenizer_trained_offline(tmp_path, capsys):
    """kdjax distill --arch llama on the bundled text: a BPE trained here (or a real
    tokenizer.json given), an HF-format student that transformers loads with the same logits,
    and a --teacher folder whose tokenizer is reused; wrong inputs are one line."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from test_cli import kdjax_here

    from kdjax import tokenizer as tk

    base = ["--dataset", "text", "--arch", "llama", "--steps", "3", "--seeds", "1", "--text-bytes", "20000",
            "--context", "16", "--quiet"]
    tiny = base + ["--vocab-size", "300"]
    p = kdjax_here(capsys, "distill", *tiny, "--save-hf", tmp_path / "hf", "--out", tmp_path / "out", "--no-plots")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "bits per token" in p.stdout and "a byte-level BPE of 300 tokens trained here" in p.stdout
    tok = tk.load_tokenizer(tmp_path / "hf" / "tokenizer.json")
    assert tok.get_vocab_size() == 300 and (tmp_path / "out" / "tokenizer.json").exists()
    model, variables = convert.load_hf(tmp_path / "hf")
    ids = np.asarray([tok.encode("def f(x):\n    return x").ids], np.int64)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(model.apply(variables, jnp.asarray(ids, jnp.int32)), want, atol=1e-5, rtol=1e-5)
    # the distilled student as the next run's teacher: its folder's tokenizer is used
    p = kdjax_here(capsys, "distill", "--dataset", "text", "--arch", "llama", "--steps", "2", "--seeds", "1",
                   "--text-bytes", "20000", "--context", "16", "--teacher", tmp_path / "hf", "--student-dim", "16",
                   "--quiet")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"{tmp_path / 'hf'}/tokenizer.json" in p.stdout
    # refusals, one line each, before training
    other = tk.train_bpe(["just a few words " * 40], 280, tmp_path / "other.json")
    assert other.get_vocab_size() < 300
    for args, words in [
        (base + ["--teacher", tmp_path / "hf", "--tokenizer", tmp_path / "nope.json"], "expected a tokenizer.json"),
        (base + ["--teacher", tmp_path / "hf", "--vocab-size", "300"], "--vocab-size: only used with"),
        (tiny + ["--save-hf", tmp_path / "hf"], "exists; pass --overwrite"),
        (base + ["--teacher", tmp_path / "hf", "--teacher-dim", "8"], "--teacher-dim: only used with"),
        (tiny + ["--kv-heads", "3"], "--kv-heads: expected a divisor of --heads"),
    ]:
        p = kdjax_here(capsys, "distill", *args)
        assert p.returncode == 2 and words in p.stderr, (args, p.stderr)
    big = tk.train_bpe(["alpha beta gamma delta " * 200 + "".join(chr(c) for c in range(300, 900))], 600,
                       tmp_path / "big.json")
    if big.get_vocab_size() > 300:  # a tokenizer larger than the embedding of a teacher that brings none
        import shutil

        shutil.copytree(tmp_path / "hf", tmp_path / "hf_bare", ignore=shutil.ignore_patterns("tokenizer.json"))
        p = kdjax_here(capsys, "distill", *base, "--teacher", tmp_path / "hf_bare", "--tokenizer", tmp_path / "big.json")
        assert p.returncode == 2 and "the model's embedding only 300" in p.stderr, p.stderr


def test_cli_sweep_on_llama_language_models(tmp_path, capsys):
    """kdjax sweep on text defaults to Llama-family models with a BPE trained here; a
    temperature x seed grid runs as one program and reports every member."""
    import json

    from test_cli import kdjax_here

    p = kdjax_here(capsys, "sweep", "--dataset", "text", "--text-bytes", "20000", "--context", "16", "--steps", "3",
                   "--seeds", "2", "--temperatures", "1", "2", "--alphas", "0.5", "--vocab-size", "300", "--quiet",
                   "--no-plots", "--out", tmp_path / "s")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "s" / "results.json").read_text())
    assert np.shape(r["test_accuracy"]) == (2, 1, 2) and r["config"]["arch"] == "llama"
    assert (tmp_path / "s" / "tokenizer.json").exists()  # the BPE the run trained, to reuse
