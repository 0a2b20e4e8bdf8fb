"""kdjax.offline: top-k teacher log-probabilities and the sparse KL (DistillKit's formula;
its numbers against our PyTorch version of DistillKit are parity rows), equal to the dense
loss at k = vocab, and the TopKKD objective in a train step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import losses, offline
from kdjax.errors import InputError, InputTypeError

rng = np.random.default_rng(0)
S = jnp.asarray(rng.normal(size=(3, 5, 11)) * 2, jnp.float32)
T = jnp.asarray(rng.normal(size=(3, 5, 11)) * 3, jnp.float32)
Y = jnp.asarray(rng.integers(0, 11, (3, 5)))
WHERE = jnp.arange(5)[None] < jnp.asarray([[5], [3], [4]])


@pytest.mark.parametrize("missing,temperature", [("zero", 1.0), ("zero", 2.5), ("symmetric_uniform", 1.0)])
def test_k_equal_to_vocab_is_the_dense_loss(missing, temperature):
    values, indices = offline.topk_logprobs(T, 11)
    np.testing.assert_allclose(offline.topk_kl(S, values, indices, temperature, missing=missing),
                               losses.soft_kl(S, T, temperature), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(
        offline.topk_distillation_loss(S, values, indices, Y, temperature, 0.6, where=WHERE, missing=missing),
        losses.distillation_loss(S, T, Y, temperature, 0.6, where=WHERE), rtol=2e-5)


def test_symmetric_uniform_at_full_k_keeps_distillkits_rounding_leftover():
    """DistillKit's "symmetric_uniform" raises the leftover mass 1 - sum(p) to the power 1/T;
    at k = vocab that leftover is float32 rounding (~1e-7), which the power makes ~1e-3 at
    T = 2.5: the formula's own property, kept for parity (the "zero" mode is exact)."""
    values, indices = offline.topk_logprobs(T, 11)
    got = offline.topk_kl(S, values, indices, 2.5, missing="symmetric_uniform")
    diff = np.abs(np.asarray(got) - np.asarray(losses.soft_kl(S, T, 2.5)))
    assert diff.max() < 1e-2 and diff.max() > 0


def test_topk_values_and_a_smaller_k():
    values, indices = offline.topk_logprobs(T, 3)
    dense = jax.nn.log_softmax(T, -1)
    np.testing.assert_allclose(values, jnp.sort(dense, -1)[..., ::-1][..., :3], rtol=1e-6)
    assert indices.dtype == jnp.int32 and values.shape == (3, 5, 3)
    zero = offline.topk_kl(S, values, indices, 2.0)
    uniform = offline.topk_kl(S, values, indices, 2.0, missing="symmetric_uniform")
    assert np.all(np.isfinite(zero)) and np.all(np.isfinite(uniform)) and not np.allclose(zero, uniform)


def test_topkkd_in_the_step_and_errors():
    student = kdjax.TransformerLM(11, 1, 8, 2, 5)
    tokens = jnp.asarray(rng.integers(0, 11, (3, 5)), jnp.int32)
    state = kdjax.create_train_state(student, 0, tokens[:1])
    values, indices = offline.topk_logprobs(T, 11)
    batch = {"x": tokens, "y": Y, "where": WHERE, "teacher_topk_values": values, "teacher_topk_indices": indices}
    hyper = kdjax.make_hyper(2.0, 0.5)
    _, got = kdjax.make_train_step(student, offline.TopKKD(), donate=False)(state, batch, jax.random.PRNGKey(0), hyper)
    dense = {"x": tokens, "y": Y, "where": WHERE, "teacher_logits": T}
    _, want = kdjax.make_train_step(student, "kd", donate=False)(state, dense, jax.random.PRNGKey(0), hyper)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-5)
    with pytest.raises(InputError, match="teacher_topk_values"):
        kdjax.make_train_step(student, offline.TopKKD(), donate=False)(state, dense, jax.random.PRNGKey(0), hyper)
    # the fused vocabulary loss reads the same cache: no [tokens, vocab] array, the same step
    from kdjax.fused import FusedLM

    small = {k: (v[..., :4] if k.startswith("teacher_topk") else v) for k, v in batch.items()}
    for missing in ("zero", "symmetric_uniform"):
        want_state, want = kdjax.make_train_step(student, offline.TopKKD(missing), donate=False)(
            state, small, jax.random.PRNGKey(0), hyper)
        got_state, got = kdjax.make_train_step(student, FusedLM(chunk_size=4, missing=missing), donate=False)(
            state, small, jax.random.PRNGKey(0), hyper)
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(got_state.params), jax.tree_util.tree_leaves(want_state.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="missing: expected one of"):
        offline.TopKKD("tail")
    with pytest.raises(InputError, match="k: expected at most the vocabulary"):
        offline.topk_logprobs(T, 12)


def test_cache_round_trip_resume_and_refusals(tmp_path):
    teacher = kdjax.TransformerLM(11, 1, 8, 2, 5)
    tokens = np.asarray(rng.integers(0, 11, (7, 5)), np.int32)
    v = teacher.init(jax.random.PRNGKey(0), jnp.asarray(tokens[:1]))
    m = offline.write_topk_cache(tmp_path / "c", teacher, v, tokens, 4, batch_size=2, shard_rows=3)
    assert [sh["rows"] for sh in m["shards"]] == [3, 3, 1] and m["vocab"] == 11 and m["k"] == 4
    values, indices, _ = offline.read_topk_cache(tmp_path / "c", tokens=tokens, teacher=teacher, variables=v)
    want_v, want_i = offline.topk_logprobs(teacher.apply(v, jnp.asarray(tokens)), 4)
    np.testing.assert_allclose(values, want_v, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(indices, want_i)
    # a build killed after its first shard resumes from it: the same bytes in the end
    first = (tmp_path / "c" / "shard-00000.npz").read_bytes()
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "shard-00000.npz").write_bytes(first)
    offline._write_manifest(tmp_path / "d", manifest | {"shards": manifest["shards"][:1]})  # a killed build
    offline.write_topk_cache(tmp_path / "d", teacher, v, tokens, 4, batch_size=2, shard_rows=3)
    for name in ("shard-00001.npz", "shard-00002.npz", "manifest.json"):
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    # refusals: another teacher, other tokens, a truncated shard, an unfinished cache, a different k
    other = teacher.init(jax.random.PRNGKey(1), jnp.asarray(tokens[:1]))
    with pytest.raises(InputError, match="built with another teacher"):
        offline.read_topk_cache(tmp_path / "c", teacher=teacher, variables=other)
    with pytest.raises(InputError, match="built for other tokens"):
        offline.read_topk_cache(tmp_path / "c", tokens=tokens[::-1])
    with pytest.raises(InputError, match="built for other tokens"):  # the same bytes cut into other windows
        offline.read_topk_cache(tmp_path / "c", tokens=tokens.reshape(-1, 1))
    with pytest.raises(InputError, match="cache built with another k, bytes_per_token; use a new directory"):
        offline.write_topk_cache(tmp_path / "c", teacher, v, tokens, 5, shard_rows=3)
    shard = tmp_path / "c" / "shard-00001.npz"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(InputError, match="shard-00001.npz: truncated or corrupted"):
        offline.read_topk_cache(tmp_path / "c")
    offline._write_manifest(tmp_path / "d", manifest | {"shards": manifest["shards"][:1]})
    with pytest.raises(InputError, match="unfinished"):
        offline.read_topk_cache(tmp_path / "d")


def test_students_train_from_the_cache(tmp_path):
    """The cache feeds a fused run (one lax.scan) through TopKKD: no teacher in the program."""
    teacher, student = kdjax.TransformerLM(11, 2, 16, 2, 5), kdjax.TransformerLM(11, 1, 8, 2, 5)
    tokens = np.asarray(rng.integers(0, 11, (16, 6)), np.int32)
    v = teacher.init(jax.random.PRNGKey(0), jnp.asarray(tokens[:1, :5]))
    offline.write_topk_cache(tmp_path / "c", teacher, v, tokens[:, :5], 5)
    values, indices, _ = offline.read_topk_cache(tmp_path / "c")
    data = {"x": tokens[:, :5], "y": tokens[:, 1:], "teacher_topk_values": values, "teacher_topk_indices": indices}
    state = kdjax.create_train_state(student, 1, tokens[:1, :5])
    schedule = kdjax.data.seed_schedule(jax.random.PRNGKey(0), 16, 4, 40)
    _, m = kdjax.make_run(student, offline.TopKKD("symmetric_uniform"))(state, data, schedule, jax.random.PRNGKey(1),
                                                                      kdjax.make_hyper(2.0, 0.5))
    assert float(m["loss"][-10:].mean()) < float(m["loss"][:10].mean())


def _byte_text():
    from kdjax import data

    return data.text(8, max_bytes=3000)


def test_distill_offline_at_k_vocab_equals_distill_with_the_teacher():
    """workflows.distill_offline from the cache of every token (k = vocab, missing="zero")
    trains the students distill trains with the teacher run online: the standard students
    bitwise, the distilled ones to float32 rounding; a cache that does not fit is one line."""
    from kdjax import workflows
    from kdjax.fitting import RunConfig
    from kdjax.train import state_from_params

    ds = _byte_text()
    teacher, student = kdjax.TransformerLM(256, 1, 16, 2, 8), kdjax.TransformerLM(256, 1, 8, 2, 8)
    variables = teacher.init(jax.random.PRNGKey(3), jnp.asarray(ds.x_train[:1]))
    t_state = state_from_params(variables["params"])
    cfg = RunConfig(steps=6, batch_size=8)
    want = workflows.distill(teacher, student, ds, cfg, [0, 1], temperature=2.0, alpha=0.6, teacher_state=t_state)
    values, indices = offline.topk_logprobs(teacher.apply(variables, jnp.asarray(ds.x_train)), 256)
    for fused in (False, True):  # offline.TopKKD on the logits; FusedLM on the hidden states (rounding apart)
        got = workflows.distill_offline(student, ds, cfg, [0, 1], values, indices, temperature=2.0, alpha=0.6,
                                        fused=fused)
        if not fused:
            np.testing.assert_array_equal(got.losses["standard"], want.losses["standard"])
        np.testing.assert_allclose(got.losses["standard"], want.losses["standard"], rtol=2e-6)
        np.testing.assert_allclose(got.losses["distilled"], want.losses["distilled"], rtol=2e-5)
        for a, b in zip(jax.tree_util.tree_leaves(got.distilled.params),
                        jax.tree_util.tree_leaves(want.distilled.params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert "teacher" not in got.accuracy["test"] and got.teacher is None
    with pytest.raises(InputError, match="top-k on every training row"):
        workflows.distill_offline(student, ds, cfg, [0], values[:-1], indices[:-1])
    with pytest.raises(InputError, match=r"token ids in \[0, 256\)"):
        workflows.distill_offline(student, ds, cfg, [0], values, indices + 1)


def test_cli_teacher_logits_then_distill_from_the_cache(tmp_path, capsys):
    """kdjax teacher-logits builds the cache of a Hugging Face teacher folder (resumable,
    its tokenizer inside); kdjax distill --teacher-logits trains students of the teacher's
    family from it without loading the teacher; what does not fit is one line each."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    from test_cli import kdjax_here

    from kdjax import convert, data
    from kdjax import tokenizer as tk
    from kdjax.models import Llama

    _, train, _, _ = data.text_documents()
    tok = tk.train_bpe([bytes(d).decode() for d in data._first(train, 20000)], 300, tmp_path / "tok.json")
    teacher = Llama(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=16, tie_word_embeddings=True)
    convert.save_hf(teacher, teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32)), tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    build = ["teacher-logits", "--teacher", tmp_path / "hf", "--text-bytes", "20000", "--context", "16", "--k", "8",
             "--quiet", "--out", tmp_path / "cache"]
    p = kdjax_here(capsys, *build)
    assert p.returncode == 0, p.stderr
    assert "64 bytes per token" in p.stdout and "teacher on the validation windows" in p.stdout
    manifest = (tmp_path / "cache" / "manifest.json").read_bytes()
    assert (tmp_path / "cache" / "tokenizer.json").exists()
    p = kdjax_here(capsys, *build)  # finished: resumed, nothing rewritten
    assert p.returncode == 0 and "is resumed" in p.stdout and (tmp_path / "cache" / "manifest.json").read_bytes() == manifest
    base = ["distill", "--dataset", "text", "--arch", "llama", "--seeds", "1", "--text-bytes", "20000", "--context",
            "16", "--steps", "3", "--student-dim", "16", "--quiet"]
    p = kdjax_here(capsys, *base, "--teacher-logits", tmp_path / "cache", "--out", tmp_path / "o", "--no-plots",
                   "--save-hf", tmp_path / "student")
    assert p.returncode == 0, p.stderr
    assert "teacher (cached, top-8)" in p.stdout and "not loaded" in p.stdout
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["teacher_logits"]["bytes_per_token"] == 64 and not (tmp_path / "o" / "teacher.ckpt").exists()
    model, _ = convert.load_hf(tmp_path / "student")
    assert model.hidden_size == 16 and model.vocab_size == teacher.vocab_size
    p = kdjax_here(capsys, *base, "--teacher-logits", tmp_path / "cache", "--topk-loss", "hinge", "--out",
                   tmp_path / "o2", "--no-plots")  # DistillKit's ranking loss: another objective, another result
    assert p.returncode == 0 and "top-k hinge" in p.stdout, p.stderr
    hinge = json.loads((tmp_path / "o2" / "results.json").read_text())
    assert hinge["teacher_logits"]["loss"] == "hinge" and results["teacher_logits"]["loss"] == "kl"
    assert hinge["losses"]["distilled"] != results["losses"]["distilled"]
    # refusals, one line each, before anything trains
    other = tk.train_bpe(["print('hello world') " * 50], 280, tmp_path / "other.json")
    assert other.get_vocab_size() <= teacher.vocab_size
    cache = ["--teacher-logits", tmp_path / "cache"]
    for args, words in [
        (base + cache + ["--tokenizer", tmp_path / "other.json"], "built for other training tokens than these (another tokenizer"),
        (base[:10] + ["12"] + base[11:] + cache, "(other text or another --context / --text-bytes"),
        (base + cache + ["--student-dim", "12"], "expected an even head dimension"),
        (base + cache + ["--teacher", tmp_path / "hf"], "--teacher: not used with --teacher-logits"),
        (base + cache + ["--method", "dkd"], "--method dkd: not used with --teacher-logits"),
        (base + cache + ["--teacher-dim", "8"], "--teacher-dim: only used with"),
        (base + ["--topk-missing", "symmetric_uniform"], "--topk-missing: only used with --teacher-logits"),
        (base + ["--topk-loss", "jsd"], "--topk-loss: only used with --teacher-logits"),
        (base + cache + ["--topk-loss", "hinge", "--temperature", "2"], "--temperature: not used with --topk-loss hinge"),
        (base + ["--teacher-logits", tmp_path / "nothing"], "--teacher-logits: "),
        (["teacher-logits", "--teacher", tmp_path / "tok.json", "--out", tmp_path / "c2"], "expected a Hugging Face"),
    ]:
        p = kdjax_here(capsys, *args)
        assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
    # a hand-edited manifest (the teacher's validation accuracy): refused, never printed as the teacher's
    edited = json.loads(manifest)
    edited["metadata"]["validation"]["accuracy"] = 0.99
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(edited, indent=1))
    p = kdjax_here(capsys, *base, *cache)
    assert p.returncode == 2 and "its checksum does not match its contents" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "0.99" not in p.stdout
    (tmp_path / "cache" / "manifest.json").write_bytes(manifest)
    # another teacher into the same cache: refused; a truncated shard: refused on read
    convert.save_hf(teacher, teacher.init(jax.random.PRNGKey(1), jnp.zeros((1, 16), jnp.int32)), tmp_path / "hf",
                    overwrite=True)
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    p = kdjax_here(capsys, *build)
    assert p.returncode == 2 and "built with another teacher" in p.stderr, p.stderr
    shard = tmp_path / "cache" / "shard-00000.npz"
    shard.write_bytes(shard.read_bytes()[:1000])
    p = kdjax_here(capsys, *base, *cache)
    assert p.returncode == 2 and "truncated or corrupted" in p.stderr, p.stderr


def test_distill_refuses_dense_teacher_logits_that_cannot_fit(tmp_path, capsys, monkeypatch):
    """kdjax distill caches the teacher's logits on every training window; when those would
    take more than half the machine's memory it says so in one line, before anything is
    trained or written, and points to the top-k cache."""
    from test_cli import kdjax_here

    from kdjax.app import inputs

    ds = _byte_text()
    teacher = kdjax.TransformerLM(256, 1, 16, 2, 8)
    need = len(ds.y_train) * 8 * 256 * 4 * 3
    assert inputs.check_logits_memory(ds, teacher, 3, memory=4 * need) == need
    monkeypatch.setattr(inputs, "_physical_memory", lambda: 2**20)  # a 1 MiB machine
    monkeypatch.setattr(inputs, "check_lm_memory", lambda *a, **k: None)  # the training step's own check: not here
    p = kdjax_here(capsys, "distill", "--dataset", "text", "--arch", "transformer", "--text-bytes", "3000",
                   "--context", "8", "--seeds", "1", "--quiet", "--out", tmp_path / "o")
    assert p.returncode == 2 and "kdjax teacher-logits" in p.stderr and "more than half of this machine" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_distill_offline_resumes_bitwise_after_a_crash(tmp_path):
    """A top-k run that dies after its first checkpointed chunk, resumed from the
    checkpoint, ends with the students of an uninterrupted run, bit for bit."""
    from kdjax import workflows
    from kdjax.fitting import RunConfig

    ds = _byte_text()
    teacher, student = kdjax.TransformerLM(256, 1, 16, 2, 8), kdjax.TransformerLM(256, 1, 8, 2, 8)
    v = teacher.init(jax.random.PRNGKey(3), jnp.asarray(ds.x_train[:1]))
    values, indices = offline.topk_logprobs(teacher.apply(v, jnp.asarray(ds.x_train)), 16)
    cfg = RunConfig(steps=6, batch_size=8)
    run = lambda ckpts, **kw: workflows.distill_offline(student, ds, cfg, [0, 1], values, indices, temperature=2.0,
                                                         alpha=0.6, checkpoints=ckpts, **kw)
    want = run(workflows.Checkpoints(str(tmp_path / "full"), every=2))

    def crash(phase, done, total, states):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(workflows.Checkpoints(str(tmp_path / "part"), every=2), on_chunk=crash)
    lines = []
    got = run(workflows.Checkpoints(str(tmp_path / "part"), every=2, resume=True), log=lines.append)
    assert any("students: resuming at step 2" in line for line in lines), lines
    for a, b in zip(jax.tree_util.tree_leaves(got.students), jax.tree_util.tree_leaves(want.students)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- topk_kl refuses what is not a top-k

VALUES, INDICES = offline.topk_logprobs(T, 4)


def _refused(words, values=VALUES, indices=INDICES, student=S, **kwargs):
    with pytest.raises((InputError, InputTypeError), match=words) as e:
        offline.topk_kl(student, values, indices, **kwargs)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("indices,words", [
    (INDICES.at[0, 0, 0].set(11), r"indices: expected token ids in \[0, 11\), got ids in \[0, 11\]"),
    (INDICES.at[0, 0, 0].set(-1), r"indices: expected token ids in \[0, 11\), got ids in \[-1, 10\]"),
    (INDICES.at[1, 2, 1].set(INDICES[1, 2, 0]), "indices: expected k distinct token ids per position"),
])
def test_topk_kl_refuses_token_ids_the_student_does_not_have(indices, words):
    _refused(words, indices=indices)


@pytest.mark.parametrize("values,words", [
    (VALUES.at[0, 0, 0].set(jnp.nan), "values: expected finite log-probabilities, got 1 NaN"),
    (VALUES.at[0, 0, 0].set(jnp.inf), "values: expected finite log-probabilities"),
    (VALUES.at[0, 0, 3].set(-jnp.inf), "values: expected finite log-probabilities"),
    (VALUES + 1.0, r"values: expected log-probabilities \(<= 0\), got a maximum of"),
    (VALUES - VALUES[..., :1], "values: expected the log-probabilities of k tokens .* sum to"),
    (jnp.round(VALUES).astype(jnp.int32), "values: expected floating point log-probabilities, got int32"),
])
def test_topk_kl_refuses_values_that_are_not_log_probabilities(values, words):
    _refused(words, values=values)


@pytest.mark.parametrize("kwargs,words", [
    ({"values": VALUES[:2]}, r"values / indices: expected \[..., k\] with the student's positions \(3, 5\)"),
    ({"values": VALUES[..., :3]}, r"values / indices: expected \[..., k\]"),
    ({"student": S[:, :4]}, r"values / indices: expected \[..., k\] with the student's positions \(3, 4\)"),
    ({"values": VALUES[0, 0, 0], "indices": INDICES[0, 0, 0], "student": S[0, 0]}, "values: expected an array"),
    ({"values": np.zeros((3, 5, 12), np.float32), "indices": np.zeros((3, 5, 12), np.int32)},
     r"expected k in \[1, 11\] \(the student's vocabulary\), got k = 12"),
    ({"values": VALUES.tolist()}, "values: expected an array"),
    ({"temperature": 0.0}, "temperature: expected a finite number > 0, got 0.0"),
    ({"temperature": -2.0}, "temperature: expected a finite number > 0"),
    ({"temperature": float("nan")}, "temperature: expected a finite number > 0"),
    ({"missing": "tail"}, "missing: expected one of"),
    ({"eps": 0.0}, r"eps: expected a number in \(0, 1\)"),
    ({"eps": "small"}, r"eps: expected a number in \(0, 1\)"),
])
def test_topk_kl_refuses_bad_shapes_and_options(kwargs, words):
    _refused(words, **kwargs)


def test_topk_distillation_loss_refuses_what_topk_kl_refuses():
    with pytest.raises(InputError, match=r"indices: expected token ids in \[0, 11\)"):
        offline.topk_distillation_loss(S, VALUES, INDICES + 8, Y)
    with pytest.raises(InputError, match=r"values: expected log-probabilities \(<= 0\)"):
        offline.topk_distillation_loss(S, -VALUES, INDICES, Y)


def test_topk_logprobs_refuses_non_finite_teacher_logits():
    with pytest.raises(InputError, match="teacher_logits: expected finite logits"):
        offline.topk_logprobs(T.at[0, 0, 0].set(jnp.inf), 4)


def test_topk_kl_under_jit_does_what_its_docstring_says():
    """Traced arrays cannot be checked without a host callback: under jit an id >= V gives
    NaN (not a plausible number), and valid arrays give the eager result (to XLA's rounding)."""
    f = jax.jit(lambda s, v, i: offline.topk_kl(s, v, i, 2.0))
    np.testing.assert_allclose(f(S, VALUES, INDICES), offline.topk_kl(S, VALUES, INDICES, 2.0), rtol=1e-6)
    assert np.isnan(np.asarray(f(S, VALUES, INDICES.at[0, 0, 0].set(11)))[0, 0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_topk_kl_accepts_full_vocabulary_values_rounded_to_their_dtype(dtype):
    """No false refusal: at k = vocab (a flat 4096-token teacher, the highest entropy) the
    probabilities sum to 1 only up to the rounding of the values' dtype."""
    teacher = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4096)) * 0.1, jnp.float32)
    values, indices = offline.topk_logprobs(teacher, 4096)
    got = offline.topk_kl(jnp.zeros((2, 4096), jnp.float32), values.astype(dtype), indices)
    assert np.all(np.isfinite(np.asarray(got)))
