"""kdjax.crosstok: ULD against a NumPy transcription of its formula, byte-offset alignment,
errors, jit, and the ULD objective through make_train_step (cached and online teacher)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import crosstok
from kdjax.errors import InputError, InputTypeError


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sorted_l1(p, q):
    v = max(len(p), len(q))
    ps, qs = np.zeros(v), np.zeros(v)
    ps[:len(p)], qs[:len(q)] = np.sort(p)[::-1], np.sort(q)[::-1]
    return np.abs(ps - qs).sum()


def numpy_uld(s, t, sw, tw, ts=1.0, tt=1.0, es=True, et=True):
    losses = []
    for b in range(s.shape[0]):
        ps, pt = np.flatnonzero(sw[b]), np.flatnonzero(tw[b])
        ps, pt = ps[:max(len(ps) - es, 0)], pt[:max(len(pt) - et, 0)]
        n = min(len(ps), len(pt))
        if n == 0:
            losses.append(0.0)
            continue
        losses.append(sum(sorted_l1(softmax(s[b, ps[k]] / ts), softmax(t[b, pt[k]] / tt)) for k in range(n)) / n)
    return np.mean(losses)


def inputs(seed=0, b=3, ls=6, lt=8, vs=5, vt=9):
    rng = np.random.default_rng(seed)
    s, t = rng.standard_normal((b, ls, vs)) * 2, rng.standard_normal((b, lt, vt)) * 2
    sw, tw = rng.random((b, ls)) < 0.7, rng.random((b, lt)) < 0.6
    sw[-1] = False  # an empty row: contributes 0, still counts in the mean
    return s.astype(np.float32), t.astype(np.float32), sw, tw


@pytest.mark.parametrize("ts,tt,es,et", [(1.0, 1.0, True, True), (0.5, 2.0, False, True), (1.5, 1.0, True, False),
                                         (1.0, 1.0, False, False)])
def test_uld_equals_numpy_formula(ts, tt, es, et):
    s, t, sw, tw = inputs()
    got = crosstok.uld_loss(jnp.asarray(s), jnp.asarray(t), student_where=jnp.asarray(sw),
                            teacher_where=jnp.asarray(tw),
                            student_temperature=ts, teacher_temperature=tt, skip_student_eos=es, skip_teacher_eos=et)
    want = numpy_uld(s.astype(np.float64), t.astype(np.float64), sw, tw, ts, tt, es, et)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_uld_jit_gradient_and_symmetry_of_vocabularies():
    s, t, sw, tw = inputs(1)
    f = lambda a, b: crosstok.uld_loss(a, b, student_where=sw, teacher_where=tw)
    eager = f(jnp.asarray(s), jnp.asarray(t))
    jitted, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(s), jnp.asarray(t))
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).sum() > 0
    assert np.all(np.asarray(grad)[~sw] == 0)  # unscored positions get no gradient
    # the same distribution, any order and any zero-padding of the vocabulary: ULD is 0
    same = jnp.asarray(s)[..., ::-1]
    padded = jnp.concatenate([same, jnp.full(s.shape[:2] + (3,), -1e9, jnp.float32)], -1)
    assert float(crosstok.uld_loss(jnp.asarray(s), padded, student_where=sw, teacher_where=sw)) < 1e-6


def test_uld_errors():
    s, t, sw, tw = inputs()
    ok = dict(student_where=sw, teacher_where=tw)
    with pytest.raises(InputError, match=r"\[batch, length, vocab\]"):
        crosstok.uld_loss(s[0], t, **ok)
    with pytest.raises(InputTypeError, match="floating"):
        crosstok.uld_loss(s.astype(np.int32), t, **ok)
    with pytest.raises(InputTypeError, match="bool"):
        crosstok.uld_loss(s, t, student_where=sw.astype(np.int32), teacher_where=tw)
    with pytest.raises(InputError, match="teacher_where: expected shape"):
        crosstok.uld_loss(s, t, student_where=sw, teacher_where=tw[:, :3])
    with pytest.raises(InputError, match="batch size"):
        crosstok.uld_loss(s, t[:2], **ok)
    for bad in (0.0, jnp.float32(-1), float("inf")):
        with pytest.raises(InputError, match="teacher_temperature: expected a finite number > 0"):
            crosstok.uld_loss(s, t, **ok, teacher_temperature=bad)
    with pytest.raises(InputError, match="None"):
        crosstok.uld_loss(s, t, student_where=None, teacher_where=tw)
    with pytest.raises(InputError, match="expected a finite number >= 0"):
        crosstok.ULD(distillation_weight=-1.0)
    with pytest.raises(InputTypeError, match="distillation_weight: expected a number"):
        crosstok.ULD(distillation_weight="1")
    with pytest.raises(InputTypeError, match="hybrid: expected None or a Hybrid"):
        crosstok.ULD(hybrid="x")
    with pytest.raises(InputError, match="share no token"):
        crosstok.hybrid_from_vocabs({"a": 0}, {"b": 0})
    for bad in (dict(beta=2.0), dict(beta=float("nan"))):
        with pytest.raises(InputError, match="hybrid beta"):
            crosstok.Hybrid((0,), (0,), **bad)
    with pytest.raises(InputError, match="non-negative int"):
        crosstok.Hybrid((0, -1), (0, 1))
    with pytest.raises(InputError, match="distinct"):
        crosstok.Hybrid((0, 0), (0, 1))
    with pytest.raises(InputError, match="both matched_weight and unmatched_weight"):
        crosstok.Hybrid((0,), (0,), matched_weight=0.3)


def test_byte_offset_alignment_and_merge():
    # "abcdef": student a|bc|def, teacher ab|c|de|f
    so = [(0, 1), (1, 3), (3, 6)]
    to = [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert crosstok.align_by_byte_offsets(so, to) == ([[0, 1], [2]], [[0, 1], [2, 3]])
    assert crosstok.align_by_byte_offsets(so[:2], to) == ([[0, 1], []], [[0, 1], [2, 3]])
    rng = np.random.default_rng(3)
    s, t = rng.standard_normal((1, 4, 5)), rng.standard_normal((1, 5, 7))
    ids_s, ids_t = np.array([[9, 1, 2, 3]]), np.array([[0, 1, 2, 3, 4]]) % 7
    ids_s[0, 0] = 4
    sw, tw = np.array([[False, True, True, True]]), np.array([[True, True, True, True, False]])
    off_s = np.array([[(0, 0)] + so])
    off_t = np.array([to + [(0, 0)]])
    al = crosstok.alignment_indices(off_s, off_t, sw, tw, skip_student_eos=False, skip_teacher_eos=False)
    got = crosstok.uld_loss_aligned(jnp.asarray(s), jnp.asarray(t), student_tokens=ids_s, teacher_tokens=ids_t,
                                    alignment=al)
    p, q = softmax(s[0]), softmax(t[0])
    groups = [(p[1] * p[2, ids_s[0, 2]], q[0] * q[1, ids_t[0, 1]]), (p[3], q[2] * q[3, ids_t[0, 3]])]
    want = np.mean([sorted_l1(a, b) for a, b in groups])
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    bayes = crosstok.uld_loss_aligned(jnp.asarray(s), jnp.asarray(t), student_tokens=ids_s, teacher_tokens=ids_t,
                                      alignment=al, merge="bayesian")  # the last position's row, earlier scalars
    groups = [(p[2] * p[1, ids_s[0, 1]], q[1] * q[0, ids_t[0, 0]]), (p[3], q[3] * q[2, ids_t[0, 2]])]
    np.testing.assert_allclose(float(bayes), np.mean([sorted_l1(a, b) for a, b in groups]), rtol=1e-6)
    with pytest.raises(InputError, match="merge: expected one of"):
        crosstok.uld_loss_aligned(s, t, student_tokens=ids_s, teacher_tokens=ids_t, alignment=al, merge="last")
    with pytest.raises(InputError, match="merge: expected one of"):
        crosstok.ULD(merge="first")
    with pytest.raises(InputError, match="groups"):
        crosstok.alignment_indices(off_s, off_t, sw, tw, groups=1, skip_student_eos=False)
    with pytest.raises(InputTypeError, match="integer"):
        crosstok.uld_loss_aligned(s, t, student_tokens=ids_s.astype(float), teacher_tokens=ids_t, alignment=al)
    aligned = lambda **over: crosstok.uld_loss_aligned(s, t, **{"student_tokens": ids_s, "teacher_tokens": ids_t,
                                                               "alignment": al, **over})
    with pytest.raises(InputError, match=r"teacher_index in \[0, 5\)"):
        aligned(alignment={**al, "teacher_index": al["teacher_index"] + 5})
    with pytest.raises(InputError, match="expected group_valid of shape"):
        aligned(alignment={**al, "group_valid": al["group_valid"][:, :1]})
    with pytest.raises(InputTypeError, match="student_member of bool"):
        aligned(alignment={**al, "student_member": al["student_member"].astype(np.int32)})
    with pytest.raises(InputError, match=r"teacher_tokens: expected ids in \[0, 7\)"):
        aligned(teacher_tokens=ids_t - 1)
    with pytest.raises(InputError, match="student_index of shape"):
        aligned(alignment={**al, "student_index": al["student_index"][0]})


class TinyLM(nn.Module):
    vocab: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.vocab)(nn.Embed(self.vocab, 8)(x))


def test_uld_objective_through_make_train_step():
    rng = np.random.default_rng(0)
    student, teacher = TinyLM(7), TinyLM(11)
    x, tx_ = rng.integers(0, 7, (4, 6)), rng.integers(0, 11, (4, 8))
    where, twhere = np.ones((4, 6), bool), np.ones((4, 8), bool)
    where[:, 0] = False
    t_state = kdjax.create_train_state(teacher, jax.random.PRNGKey(1), jnp.asarray(tx_[:1]))
    t_logits = teacher.apply({"params": t_state.params}, jnp.asarray(tx_))
    batch = {"x": x, "y": np.roll(x, -1, 1), "where": where, "teacher_where": twhere}
    obj = crosstok.ULD(crossentropy_weight=0.5)
    key = jax.random.PRNGKey(2)
    fresh = lambda: kdjax.create_train_state(student, jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    cached_state, cached = kdjax.make_train_step(student, obj)(fresh(), dict(batch, teacher_logits=t_logits), key)
    online_state, online = kdjax.make_train_step(student, obj, teacher=teacher)(
        fresh(), dict(batch, teacher_x=tx_), key, None, t_state.params)
    np.testing.assert_allclose(float(online["loss"]), float(cached["loss"]), rtol=1e-6)
    want = 0.5 * float(cached["terms"]["ce"]) + numpy_uld(
        np.asarray(student.apply({"params": fresh().params}, jnp.asarray(x)), np.float64),
        np.asarray(t_logits, np.float64), where, twhere)
    np.testing.assert_allclose(float(cached["loss"]), want, rtol=1e-5)
    # the step trained the student
    assert not np.allclose(np.asarray(jax.tree.leaves(cached_state.params)[0]),
                           np.asarray(jax.tree.leaves(fresh().params)[0]))
    with pytest.raises(InputError, match="teacher_where"):
        kdjax.make_train_step(student, obj)(fresh(), {"x": x, "y": x, "where": where, "teacher_logits": t_logits}, key)
    with pytest.raises(InputError, match="teacher_x"):
        kdjax.make_train_step(student, obj)(fresh(), batch, key)


def test_hybrid_equals_numpy_formula():
    s, t, sw, tw = inputs(4)
    s, t = s.astype(np.float64), t.astype(np.float64)
    hybrid = crosstok.hybrid_from_vocabs({"a": 0, "b": 1, "c": 2, "d": 3, "e": 4},
                                         {"c": 5, "a": 0, "z": 1, "b": 7, "y": 2}, beta=0.3)
    assert hybrid.student_ids == (0, 2, 1) and hybrid.teacher_ids == (0, 5, 7)
    got = crosstok.uld_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), student_where=sw,
                            teacher_where=tw, hybrid=hybrid)

    def per_position(p, q, beta=0.3):
        a, b = np.log(np.maximum(p[[0, 2, 1]], 1e-8)), np.log(np.maximum(q[[0, 5, 7]], 1e-8))
        m = np.log((1 - beta) * np.exp(a) + beta * np.exp(b))
        jsd = (beta * np.exp(b) * (b - m) + (1 - beta) * np.exp(a) * (a - m)).sum()
        rest = sorted_l1(p[[3, 4]], q[[1, 2, 3, 4, 6, 8]])
        return 3 / 9 * jsd + 6 / 9 * rest

    losses = []
    for b in range(s.shape[0]):
        ps, pt = np.flatnonzero(sw[b])[:-1], np.flatnonzero(tw[b])[:-1]
        n = min(len(ps), len(pt))
        losses.append(0.0 if n <= 0 else
                      sum(per_position(softmax(s[b, ps[k]]), softmax(t[b, pt[k]])) for k in range(n)) / n)
    np.testing.assert_allclose(float(got), np.mean(losses), rtol=1e-5, atol=1e-7)
    with pytest.raises(InputError, match="hybrid"):
        crosstok.uld_loss(s, t, student_where=sw, teacher_where=tw, hybrid=crosstok.Hybrid((0, 1), (0,)))
