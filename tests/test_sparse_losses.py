"""kdjax.losses' sparse family beyond the KL (topk_jsd, topk_tvd, the ranking losses, targets
cached at another temperature) against their dense or hand-written definitions; DistillKit's
own numbers are parity's (``python -m parity --only topk``)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import losses
from kdjax.errors import InputError
from kdjax.objectives import TopKKD

rng = np.random.default_rng(3)
S = jnp.asarray(rng.normal(size=(2, 4, 9)) * 2, jnp.float32)
T = jnp.asarray(rng.normal(size=(2, 4, 9)) * 3, jnp.float32)
Y = jnp.asarray(rng.integers(0, 9, (2, 4)))
WHERE = jnp.asarray([[True, True, True, False], [True, True, False, False]])


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_at_k_equal_to_vocab_jsd_and_tvd_are_the_dense_ones(temperature):
    values, indices = losses.topk_logprobs(T, 9)
    np.testing.assert_allclose(losses.topk_jsd(S, values, indices, temperature),
                               losses.jsd(S, T, temperature, beta=0.5), rtol=2e-5, atol=2e-6)
    p, q = jax.nn.softmax(T / temperature), jax.nn.softmax(S / temperature)
    np.testing.assert_allclose(losses.topk_tvd(S, values, indices, temperature), 0.5 * jnp.abs(p - q).sum(-1),
                               rtol=2e-5, atol=2e-6)


def test_a_smaller_k_counts_the_students_mass_outside_it():
    """missing="zero": the teacher has no mass outside its k, so the student's whole mass
    there is TVD, and JSD counts it times log 2."""
    values, indices = losses.topk_logprobs(T, 3)
    p = jnp.exp(values - jax.nn.logsumexp(values, -1, keepdims=True))
    q_all = jax.nn.softmax(S)
    q = jnp.take_along_axis(q_all, indices, -1)
    outside = 1 - q.sum(-1)
    np.testing.assert_allclose(losses.topk_tvd(S, values, indices), 0.5 * (jnp.abs(p - q).sum(-1) + outside),
                               rtol=1e-5)
    m = 0.5 * (p + q)
    want = 0.5 * ((p * jnp.log(p / m)).sum(-1) + (q * jnp.log(q / m)).sum(-1) + outside * np.log(2))
    np.testing.assert_allclose(losses.topk_jsd(S, values, indices), want, rtol=1e-5)


def test_targets_cached_at_another_temperature_are_brought_to_t():
    """A cache made at T_gen = 0.5 read at T = 2 is the teacher's softmax at T = 2 (k = vocab)."""
    values, indices = losses.topk_logprobs(T / 0.5, 9)
    for f, dense in ((losses.topk_kl, losses.soft_kl(S, T, 2.0)), (losses.topk_jsd, losses.jsd(S, T, 2.0))):
        np.testing.assert_allclose(f(S, values, indices, 2.0, generation_temperature=0.5), dense, rtol=2e-5, atol=2e-6)
        assert not np.allclose(f(S, values, indices, 2.0), dense, rtol=1e-3)


def _pairwise(values, term, where):
    """The ranking losses by explicit loops over positions and pairs (DistillKit's definition)."""
    p = np.exp(np.asarray(values, np.float64))
    total, count = 0.0, 0
    for pos in itertools.product(*map(range, p.shape[:-1])):
        if not where[pos]:
            continue
        for i, j in itertools.permutations(range(p.shape[-1]), 2):
            if p[pos][i] > p[pos][j] + 1e-8 and p[pos][i] > 1e-8 and p[pos][j] > 1e-8:
                total, count = total + term(pos, i, j), count + 1
    return total / count


def test_ranking_losses_equal_their_pairwise_definitions():
    values, indices = losses.topk_logprobs(T, 4)
    s, ids, w = np.asarray(S, np.float64), np.asarray(indices), np.asarray(WHERE)
    q = np.exp(s - s.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    p = np.exp(np.asarray(values, np.float64))

    def hinge(pos, i, j, margin=None):
        gap = p[pos][i] - p[pos][j] if margin is None else margin
        return max(0.0, gap - (q[pos][ids[pos][i]] - q[pos][ids[pos][j]]))

    logistic = lambda pos, i, j: np.log1p(np.exp(-(s[pos][ids[pos][i]] - s[pos][ids[pos][j]])))
    np.testing.assert_allclose(losses.topk_hinge(S, values, indices, where=WHERE), _pairwise(values, hinge, w),
                               rtol=1e-5)
    np.testing.assert_allclose(losses.topk_hinge(S, values, indices, margin=0.2, where=WHERE),
                               _pairwise(values, lambda *a: hinge(*a, margin=0.2), w), rtol=1e-5)
    np.testing.assert_allclose(losses.topk_logistic_ranking(S, values, indices, where=WHERE),
                               _pairwise(values, logistic, w), rtol=1e-5)
    grad = jax.grad(lambda x: losses.topk_logistic_ranking(x, values, indices, where=WHERE))(S)
    assert np.all(np.asarray(grad)[1, 2:] == 0) and np.abs(np.asarray(grad)).sum() > 0  # masked rows get none


def test_topkkd_trains_with_each_sparse_loss_and_refuses_wrong_ones():
    student = kdjax.TransformerLM(9, 1, 8, 2, 4)
    tokens = jnp.asarray(rng.integers(0, 9, (2, 4)), jnp.int32)
    state = kdjax.create_train_state(student, 0, tokens[:1])
    values, indices = losses.topk_logprobs(T, 5)
    batch = {"x": tokens, "y": Y, "where": WHERE, "teacher_topk_values": values, "teacher_topk_indices": indices}
    hyper = kdjax.make_hyper(2.0, 0.5)
    seen = set()
    for name in losses.SPARSE_LOSSES:
        _, m = kdjax.make_train_step(student, TopKKD(sparse_loss=name), donate=False)(state, batch,
                                                                                      jax.random.PRNGKey(0), hyper)
        logits = student.apply({"params": state.params}, tokens)
        want = losses.topk_distillation_loss(logits, values, indices, Y, 2.0, 0.5, where=WHERE, loss=name)
        np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
        seen.add(round(float(m["loss"]), 5))
    assert len(seen) == len(losses.SPARSE_LOSSES)  # five different losses, not one five times
    with pytest.raises(InputError, match="sparse_loss: expected one of"):
        TopKKD(sparse_loss="kld")
    with pytest.raises(InputError, match="generation_temperature: expected a finite number > 0"):
        TopKKD(generation_temperature=0.0)
    with pytest.raises(InputError, match="loss: expected one of"):
        losses.topk_distillation_loss(S, values, indices, Y, loss="hinge_loss")
    with pytest.raises(InputError, match="where: expected"):
        losses.topk_hinge(S, values, indices, where=WHERE[:, :3])
    with pytest.raises(InputError, match="eps: expected a number in"):
        losses.topk_jsd(S, values, indices, eps=1.5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_renormalized_topk_kl_is_the_kl_over_the_k_ids(temperature):
    """renormalize=True (tunix's distill_top_k): both sides softmaxed over the k ids alone; the
    default gathers the full-vocabulary softmax and so differs; at k = vocab the two agree."""
    values, indices = losses.topk_logprobs(T, 4)
    s_k, t_k = jnp.take_along_axis(S, indices, -1), jnp.take_along_axis(T, indices, -1)
    p, log_q = jax.nn.softmax(t_k / temperature), jax.nn.log_softmax(s_k / temperature)
    want = jnp.sum(p * (jnp.log(p) - log_q), -1)
    got = losses.topk_kl(S, values, indices, temperature, renormalize=True)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert float(jnp.max(jnp.abs(losses.topk_kl(S, values, indices, temperature) - got))) > 1e-3
    full_v, full_i = losses.topk_logprobs(T, 9)
    np.testing.assert_allclose(losses.topk_kl(S, full_v, full_i, temperature, renormalize=True),
                               losses.soft_kl(S, T, temperature), rtol=2e-5, atol=2e-6)
    combined = losses.topk_distillation_loss(S, values, indices, Y, temperature, 0.3, where=WHERE, renormalize=True)
    hard = losses.masked_mean(losses.hard_ce(S, Y, where=WHERE), WHERE)
    np.testing.assert_allclose(combined, 0.3 * temperature**2 * losses.masked_mean(got, WHERE) + 0.7 * hard, rtol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(losses.topk_kl(x, values, indices, temperature, renormalize=True)))(S)
    outside = np.ones(S.shape, bool)
    np.put_along_axis(outside, np.asarray(indices), False, -1)
    assert float(jnp.max(jnp.abs(grad[outside]))) == 0.0  # logits outside the k ids get no gradient


def test_renormalized_topk_errors_and_objective():
    values, indices = losses.topk_logprobs(T, 4)
    with pytest.raises(InputError, match="renormalize=True: expected missing='zero'.*got missing='symmetric_uniform'"):
        losses.topk_kl(S, values, indices, missing="symmetric_uniform", renormalize=True)
    with pytest.raises(kdjax.errors.InputTypeError, match="renormalize: expected True or False, got 'yes'"):
        losses.topk_kl(S, values, indices, renormalize="yes")
    with pytest.raises(InputError, match="renormalize: expected False with loss='jsd'"):
        losses.topk_distillation_loss(S, values, indices, Y, loss="jsd", renormalize=True)
    with pytest.raises(InputError, match="renormalize=True: expected sparse_loss='kl' and missing='zero'"):
        TopKKD(sparse_loss="tvd", renormalize=True)
    student = kdjax.MLP((8,), 9)
    x = jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)
    params, state = kdjax.train.init_variables(student, 0, x[:1])
    values, indices, y, where = values.reshape(8, 4), indices.reshape(8, 4), Y.reshape(8), WHERE.reshape(8)
    batch = {"x": x, "y": y, "where": where, "teacher_topk_values": values, "teacher_topk_indices": indices}
    hyper = kdjax.make_hyper(2.0, 0.6)
    got, _ = TopKKD(renormalize=True).loss(student, params, state, batch, rng=jax.random.PRNGKey(0), hyper=hyper,
                                          teacher=None)
    logits = student.apply({"params": params, **state}, x)
    np.testing.assert_allclose(got, losses.topk_distillation_loss(logits, values, indices, y, 2.0, 0.6, where=where,
                                                                  renormalize=True), rtol=1e-6)
