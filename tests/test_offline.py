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
from kdjax.errors import InputError

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
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest | {"shards": manifest["shards"][:1]}))
    offline.write_topk_cache(tmp_path / "d", teacher, v, tokens, 4, batch_size=2, shard_rows=3)
    for name in ("shard-00001.npz", "shard-00002.npz", "manifest.json"):
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    # refusals: another teacher, other tokens, a truncated shard, an unfinished cache, a different k
    other = teacher.init(jax.random.PRNGKey(1), jnp.asarray(tokens[:1]))
    with pytest.raises(InputError, match="built with another teacher"):
        offline.read_topk_cache(tmp_path / "c", teacher=teacher, variables=other)
    with pytest.raises(InputError, match="built for other tokens"):
        offline.read_topk_cache(tmp_path / "c", tokens=tokens[::-1])
    with pytest.raises(InputError, match="another teacher, tokens, k or layout"):
        offline.write_topk_cache(tmp_path / "c", teacher, v, tokens, 5, shard_rows=3)
    shard = tmp_path / "c" / "shard-00001.npz"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(InputError, match="shard-00001.npz: truncated or corrupted"):
        offline.read_topk_cache(tmp_path / "c")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest | {"shards": manifest["shards"][:1]}))
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
