"""kdjax.features objectives inside the train step: taps beyond module outputs, connectors
trained with the student and left out of its export, CRD's bank and negatives, cached
teacher taps equal to the online teacher, and the user errors. The numbers against
PyTorch (FitNet's run, CRD's loss and bank) are parity rows (parity/checks/features.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import features
from kdjax.errors import InputError
from kdjax.features import crd
from kdjax.fitting import RunConfig
from test_compile import compiles, traces

T_NET, S_NET = kdjax.ResNet((1, 1), (8, 16), 4), kdjax.ResNet((1, 1), (4, 8), 4)
X = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8, 8, 3)), jnp.float32)
Y = jnp.arange(8) % 4


@pytest.fixture(scope="module")
def pair():
    teacher = kdjax.create_train_state(T_NET, 0, X[:1])
    params, state = kdjax.train.init_variables(S_NET, 1, X[:1])
    return teacher, params, state


def _state(obj, pair, labels=None):
    teacher, params, state = pair
    p, s = features.init_connectors(obj, 3, params, state, S_NET, T_NET, teacher, X[:2], labels=labels)
    return kdjax.state_from_params(p, model_state=s)


def test_input_and_sown_taps():
    r = kdjax.ResNet((1,), (4,), 3)
    v = r.init(jax.random.PRNGKey(0), X[:2])
    logits, f = features.capture(r, v, X[:2], ["fc:input", "layer1"])
    np.testing.assert_allclose(f["fc:input"], jnp.mean(f["layer1"], axis=(1, 2)), rtol=1e-6)
    lm = kdjax.TransformerLM(11, 2, 8, 2, 6)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 11, (3, 6)), jnp.int32)
    v = lm.init(jax.random.PRNGKey(0), tokens)
    plain = lm.apply(v, tokens)
    out, f = features.capture(lm, v, tokens, ["transformer.h.1.attn:attention_probs"])
    probs = f["transformer.h.1.attn:attention_probs"]
    assert probs.shape == (3, 2, 6, 6)
    np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, rtol=1e-6)
    assert float(jnp.max(jnp.triu(probs, 1))) == 0.0  # causal
    np.testing.assert_array_equal(out, plain)  # sowing changes nothing else
    assert "transformer.h.0.attn:attention_probs" in features.available_taps(lm, v, tokens)
    with pytest.raises(InputError, match=r"got \['transformer.h.0.attn:nope'\]; available: .*attention_probs"):
        features.capture(lm, v, tokens, ["transformer.h.0.attn:nope"])


def test_fitnet_connector_trains_and_is_not_exported(pair):
    obj = features.objective(ce=1.0, terms=[("hint", "layer2", "layer2", 100.0)])
    state = _state(obj, pair)
    conn = state.params["connectors"]["hint:layer2"]
    assert conn["conv"]["kernel"].shape == (1, 1, 8, 16) and "hint:layer2" in state.model_state["connectors"]
    step = kdjax.make_train_step(S_NET, obj, teacher=T_NET, donate=False)
    new, m = step(state, {"x": X, "y": Y}, jax.random.PRNGKey(0), None, pair[0])
    assert set(m["terms"]) == {"ce", "hint:layer2"}
    np.testing.assert_allclose(m["loss"], m["terms"]["ce"] + m["terms"]["hint:layer2"], rtol=1e-6)
    moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), conn, new.params["connectors"]["hint:layer2"])
    assert all(jax.tree_util.tree_leaves(moved)), "every connector parameter is trained"
    stats = new.model_state["connectors"]["hint:layer2"]["batch_stats"]["bn"]["mean"]
    assert bool(jnp.any(stats != 0)), "the connector's BatchNorm statistics are updated"
    params, model_state = features.student_variables(new.params, new.model_state)
    assert "connectors" not in params and "connectors" not in model_state
    # the exported student is the student: its eval equals the full state's
    np.testing.assert_allclose(S_NET.apply({"params": params, **model_state}, X),
                               kdjax.predict_logits(S_NET, new, X), rtol=1e-5, atol=1e-6)


def test_step_loss_is_the_hand_written_sum(pair):
    obj = features.objective(ce=0.5, kd=2.0, temperature=3.0,
                             terms=[("at", "layer1", "layer1", 10.0), ("sp", "layer2", "layer2", 7.0)])
    state = _state(obj, pair)
    _, m = kdjax.make_train_step(S_NET, obj, teacher=T_NET, donate=False)(
        state, {"x": X, "y": Y}, jax.random.PRNGKey(0), None, pair[0])
    (s_logits, _), s = features.capture(S_NET, state.variables, X, ["layer1", "layer2"], train=True)
    t_logits, t = features.capture(T_NET, pair[0].variables, X, ["layer1", "layer2"])
    want = (0.5 * jnp.mean(kdjax.hard_ce(s_logits, Y)) + 2.0 * 9.0 * jnp.mean(kdjax.soft_kl(s_logits, t_logits, 3.0))
            + 10.0 * features.attention_transfer(s["layer1"], t["layer1"])
            + 7.0 * features.similarity_preserving(s["layer2"], t["layer2"]))
    np.testing.assert_allclose(m["loss"], want, rtol=1e-6)


def test_cached_teacher_taps_equal_the_online_teacher(pair):
    # (SGD: Adam would turn the rounding noise of a gradient that is zero in exact arithmetic,
    # the connector's conv bias before its BatchNorm, into full-size steps)
    obj = features.objective(terms=[("hint", "layer2", "layer2", 100.0)], kd=1.0)
    tx = kdjax.sgd(0.05)
    state = _state(obj, pair)
    state = kdjax.state_from_params(state.params, model_state=state.model_state, tx=tx)
    t_logits, t_feats = features.capture(T_NET, pair[0].variables, X, ["layer2"])
    online = kdjax.make_run(S_NET, obj, tx=tx, teacher=T_NET, donate=False)
    cached = kdjax.make_run(S_NET, obj, tx=tx, donate=False)
    sched = jnp.asarray(np.random.default_rng(0).integers(0, 8, (5, 4)), jnp.int32)
    data = {"x": X, "y": Y}
    a, la = online(state, data, sched, jax.random.PRNGKey(1), None, pair[0])
    b, lb = cached(state, data | {"teacher_logits": t_logits, "teacher_features": t_feats}, sched,
                   jax.random.PRNGKey(1), None)
    np.testing.assert_allclose(la["loss"], lb["loss"], rtol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_crd_bank_negatives_and_z(pair):
    obj = features.objective(terms=[("crd", "fc:input", "fc:input", 0.8, None, {"negatives": 5, "feat_dim": 6})])
    state = _state(obj, pair, labels=np.asarray(Y))
    bank = state.model_state["connectors"]["crd:fc:input"]
    assert bank["memory"]["memory_s"].shape == (8, 6) and float(bank["memory"]["z"][0]) == -1.0
    step = kdjax.make_train_step(S_NET, obj, teacher=T_NET, donate=False)
    batch = {"x": X[:4], "y": Y[:4], "index": jnp.arange(4)}
    new, m = step(state, batch, jax.random.PRNGKey(0), None, pair[0])
    mem = new.model_state["connectors"]["crd:fc:input"]["memory"]
    assert float(mem["z"][0]) > 0 and float(mem["z"][1]) > 0  # set on first use, then fixed
    np.testing.assert_allclose(jnp.linalg.norm(mem["memory_s"][:4], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(mem["memory_s"][4:], bank["memory"]["memory_s"][4:])  # other rows untouched
    again, _ = step(new, batch, jax.random.PRNGKey(0), None, pair[0])
    np.testing.assert_array_equal(again.model_state["connectors"]["crd:fc:input"]["memory"]["z"], mem["z"])
    with pytest.raises(InputError, match=r"batch\['index'\]"):
        step(state, {"x": X[:4], "y": Y[:4]}, jax.random.PRNGKey(0), None, pair[0])


@pytest.mark.parametrize("k", [3, 40])  # without replacement (enough negatives), with replacement
def test_crd_negatives_are_other_classes(k):
    labels = np.repeat(np.arange(4), [2, 3, 5, 10])
    index = jax.device_put(crd.class_index(labels))
    y = jnp.asarray([0, 1, 2, 3, 3, 0])
    neg = np.asarray(jax.jit(crd.sample_negatives, static_argnums=3)(jax.random.PRNGKey(0), y, index, k))
    assert neg.shape == (6, k)
    assert not np.any(labels[neg] == np.asarray(y)[:, None]), "a negative of the same class"
    if k == 3:
        assert all(len(set(row)) == k for row in neg), "drawn without replacement"
    else:  # class 3's 40 negatives spread over the 10 examples of the others (P(a class missed) < 1e-3)
        assert (np.bincount(labels[neg[3]], minlength=4)[:3] > 0).all()


def test_dkd_warmup_ramps_linearly(pair):
    obj = features.Objective(ce=0.0, kd=1.0, divergence="dkd", warmup_steps=4)
    state = _state(obj, pair)
    step = kdjax.make_train_step(S_NET, obj, teacher=T_NET, donate=False)
    vals = []
    for s in range(6):
        _, m = step(state.replace(step=jnp.asarray(s, jnp.int32)), {"x": X, "y": Y}, jax.random.PRNGKey(0), None,
                    pair[0])
        vals.append(float(m["terms"]["kd"]))
    np.testing.assert_allclose(np.asarray(vals) / vals[-1], [0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("make,words", [
    (lambda: features.objective(terms=[("nope", "a", "b", 1.0)]), ["term loss", "'nope'"]),
    (lambda: features.objective(terms=[("at", "a", "b", -1.0)]), ["at:b weight", ">= 0"]),
    (lambda: features.objective(terms=[("at", "a", "b", 1.0), ("at", "c", "b", 1.0)]), ["one term per", "at:b"]),
    (lambda: features.objective(ce=0.0), ["at least one non-zero part"]),
    (lambda: features.objective(divergence="l2"), ["divergence", "'dkd'"]),
    (lambda: features.objective(terms=[("crd", "a", "b", 1.0, None, {"k": 3})]), ["crd options", "'k'"]),
    (lambda: features.connector_for((2, 4, 4, 3), (2, 8, 8, 3)), ["at least as large", "4x4", "8x8"]),
    (lambda: features.connector_for((2, 5, 3), (2, 6, 4)), ["only in their last axis"]),
])
def test_objective_errors(make, words):
    with pytest.raises(InputError) as e:
        make()
    for w in words:
        assert w in str(e.value)


def test_step_errors(pair):
    obj = features.objective(terms=[("hint", "layer2", "layer2", 1.0)])
    state = _state(obj, pair)
    step = kdjax.make_train_step(S_NET, obj, teacher=T_NET, donate=False)
    with pytest.raises(InputError, match="expected hyper=None"):
        step(state, {"x": X, "y": Y}, jax.random.PRNGKey(0), kdjax.make_hyper(), pair[0])
    with pytest.raises(InputError, match="cached teacher outputs .* or a bound teacher"):
        kdjax.make_train_step(S_NET, obj, donate=False)(state, {"x": X, "y": Y}, jax.random.PRNGKey(0))
    with pytest.raises(InputError, match=r"expected the teacher taps \['layer2'\], missing \['layer2'\]"):
        kdjax.make_train_step(S_NET, obj, donate=False)(state, {"x": X, "y": Y, "teacher_features": {"layer1": X}},
                                                        jax.random.PRNGKey(0))
    with pytest.raises(InputError, match="'connectors' entry"):
        features.init_connectors(obj, 0, {"connectors": {}}, {}, S_NET, T_NET, pair[0], X[:2])


def test_workflow_pairs_standard_and_objective_students():
    ds = kdjax.data.digits(images=True)
    ds = kdjax.data.Dataset(ds.name, ds.x_train[:128], ds.y_train[:128], ds.x_test[:64], ds.y_test[:64],
                            ds.num_classes)
    t, s = kdjax.ResNet((1,), (8,), 10), kdjax.ResNet((1,), (4,), 10)
    obj = features.objective(terms=[("hint", "layer1", "layer1", 10.0)])
    with compiles() as seen, traces() as traced:
        r = kdjax.workflows.distill(t, s, ds, RunConfig(steps=3, batch_size=16), [0, 1], objective=obj)
    # the members' teachers are taken on the host (indexing device arrays compiles a program per leaf shape)
    assert not {"jit(dynamic_slice)", "jit(squeeze)", "jit(gather)"} & {name for _, name in seen}, seen
    assert traced.count("_init_variables") == 1, traced  # one connector init program for both members
    assert r.losses["standard"].shape == (2, 3) and r.losses["distilled"].shape == (2, 3)
    assert "connectors" in r.distilled_states.params and "connectors" not in r.students.params
    standard_init = kdjax.fitting.initial_members(s, ds, RunConfig(steps=3, batch_size=16), [0, 1])
    with_conn = kdjax.fitting.initial_members(s, ds, RunConfig(steps=3, batch_size=16), [0, 1], objective=obj,
                                              teacher=t, teacher_state=r.teacher, per_seed_teacher=True)
    own = features.student_variables(with_conn.params)[0]
    for a, b in zip(jax.tree_util.tree_leaves(standard_init.params), jax.tree_util.tree_leaves(own)):
        np.testing.assert_array_equal(a, b)  # paired: the same student init with or without connectors


def test_transformer_hidden_states_and_attention_probabilities():
    """DistillKit-style hidden-state MSE through a bias-free Linear (widths 8 -> 16) and
    EasyDeL-style attention-probability MSE (equal heads and lengths), on TransformerLMs."""
    teacher, student = kdjax.TransformerLM(19, 2, 16, 2, 8), kdjax.TransformerLM(19, 1, 8, 2, 8)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 19, (6, 9)), jnp.int32)
    x, y = tokens[:, :-1], tokens[:, 1:]
    t_state = kdjax.create_train_state(teacher, 0, x[:1])
    obj = features.objective(ce=1.0, kd=1.0, terms=[
        ("mse", "transformer.h.1", "transformer.h.0", 1.0, True),
        ("mse", "transformer.h.1.attn:attention_probs", "transformer.h.0.attn:attention_probs", 10.0)])
    params, model_state = kdjax.train.init_variables(student, 1, x[:1])
    params, model_state = features.init_connectors(obj, 2, params, model_state, student, teacher, t_state, x[:2])
    assert jax.tree_util.tree_map(jnp.shape, params["connectors"]) == {"mse:transformer.h.0": {"linear": {
        "kernel": (8, 16)}}}  # bias-free
    state = kdjax.state_from_params(params, model_state=model_state)
    sched = jnp.asarray(np.random.default_rng(3).integers(0, 6, (30, 4)), jnp.int32)
    state, m = kdjax.make_run(student, obj, teacher=teacher)(state, {"x": x, "y": y}, sched, jax.random.PRNGKey(0),
                                                            None, t_state)
    for key in ("mse:transformer.h.0", "mse:transformer.h.0.attn:attention_probs"):
        assert float(m["terms"][key][-5:].mean()) < float(m["terms"][key][:5].mean()), key
    # the hidden-state term takes the mask; the attention-probability term ([batch, heads, L, L]) is refused
    with pytest.raises(InputError, match=r"mse: expected where of the features' leading shape \(2, 2, 8\)"):
        kdjax.make_train_step(student, obj, teacher=teacher)(
            state, {"x": x[:2], "y": y[:2], "where": jnp.ones((2, 8), bool)}, jax.random.PRNGKey(0), None, t_state)
    rkd_obj = features.objective(ce=1.0, terms=[("rkd", "transformer.h.1", "transformer.h.0", 1.0)])
    with pytest.raises(InputError, match=r"expected feature terms whose loss takes one .* got \['rkd:transformer.h.0'\]"):
        kdjax.make_train_step(student, rkd_obj, teacher=teacher)(
            kdjax.create_train_state(student, 1, x[:1]), {"x": x[:2], "y": y[:2], "where": jnp.ones((2, 8), bool)},
            jax.random.PRNGKey(0), None, t_state)


def test_feature_terms_take_the_padding_mask():
    """With batch['where'] a hidden-state term is the mean over the selected tokens only: equal
    to the loss on those tokens gathered, unchanged by anything at masked positions; without a
    mask the term is what it was."""
    teacher, student = kdjax.TransformerLM(19, 2, 16, 2, 8), kdjax.TransformerLM(19, 1, 16, 2, 8)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.integers(0, 19, (4, 8)), jnp.int32)
    where = jnp.asarray(rng.random((4, 8)) < 0.6).at[0, 0].set(True)
    t_state, s_state = kdjax.create_train_state(teacher, 0, x[:1]), kdjax.create_train_state(student, 1, x[:1])
    _, t_f = features.capture(teacher, t_state.variables, x, ["transformer.h.1"])
    _, s_f = features.capture(student, s_state.variables, x, ["transformer.h.0"])
    s, t = s_f["transformer.h.0"], t_f["transformer.h.1"]
    for name in ("mse", "mae", "hint", "cosine", "pooled_cosine"):
        fn = features.LOSSES[name]
        got = fn(s, t, where=where)
        np.testing.assert_allclose(got, fn(s[where], t[where]), rtol=1e-6, err_msg=name)
        noisy = jnp.where(where[..., None], s, 1e3)  # masked positions do not count
        np.testing.assert_allclose(fn(noisy, t, where=where), got, rtol=1e-6, err_msg=name)
        assert float(fn(s, t, where=jnp.zeros_like(where))) == 0.0
    for name in ("mse", "cosine"):
        obj = features.objective(ce=0.0, terms=[(name, "transformer.h.1", "transformer.h.0", 2.0)])
        batch = {"x": x, "y": x, "where": where}
        _, m = kdjax.make_train_step(student, obj, teacher=teacher, donate=False)(
            s_state, batch, jax.random.PRNGKey(0), None, t_state)
        fn = features.LOSSES[name]
        np.testing.assert_allclose(m["terms"][f"{name}:transformer.h.0"], 2.0 * fn(s, t, where=where), rtol=1e-5)
        _, m = kdjax.make_train_step(student, obj, teacher=teacher, donate=False)(
            s_state, {"x": x, "y": x}, jax.random.PRNGKey(0), None, t_state)
        np.testing.assert_allclose(m["terms"][f"{name}:transformer.h.0"], 2.0 * fn(s, t), rtol=1e-5)


def test_feature_mask_errors():
    s = jnp.ones((2, 3, 4))
    with pytest.raises(InputError, match=r"mse: expected where of the features' leading shape \(2, 3\).*got \(2, 4\)"):
        features.mse(s, s, where=jnp.ones((2, 4), bool))
    with pytest.raises(kdjax.errors.InputTypeError, match="hint: expected where as a bool mask, got float32"):
        features.hint(s, s, where=jnp.ones((2, 3)))
    with pytest.raises(InputError, match="pooled_cosine: expected axis=-1 with where"):
        features.pooled_cosine(s, s, 1, where=jnp.ones((2, 3), bool))


def test_objective_ce_and_kd_follow_the_padding_mask(pair):
    """With batch['where'] an objective of ce and kd equals distillation_loss's masked means."""
    lm_t, lm_s = kdjax.TransformerLM(13, 1, 8, 2, 6), kdjax.TransformerLM(13, 1, 8, 2, 6)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 13, (4, 6)), jnp.int32)
    where = jnp.asarray(np.random.default_rng(5).random((4, 6)) < 0.6)
    t_state = kdjax.create_train_state(lm_t, 0, tokens[:1])
    s_state = kdjax.create_train_state(lm_s, 1, tokens[:1])
    t_logits = lm_t.apply(t_state.variables, tokens)
    obj = features.objective(ce=0.3, kd=0.7, temperature=2.0)
    batch = {"x": tokens, "y": tokens, "where": where, "teacher_logits": t_logits}
    _, m = kdjax.make_train_step(lm_s, obj, donate=False)(s_state, batch, jax.random.PRNGKey(0), None)
    _, want = kdjax.make_train_step(lm_s, "kd", donate=False)(s_state, batch, jax.random.PRNGKey(0),
                                                              kdjax.make_hyper(2.0, 0.7))
    np.testing.assert_allclose(m["loss"], want["loss"], rtol=1e-6)
