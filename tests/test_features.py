"""kdjax.features: taps on any Flax model by module name (train mode updates BatchNorm as
without taps), and the feature losses' shape rules. Their numbers against mdistiller's
formulas are parity rows (parity/checks/features.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close

import kdjax
from kdjax import features
from kdjax.errors import InputError, InputTypeError


class UserCNN(nn.Module):  # a user's model, Flax's own BatchNorm
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
        x = nn.Dense(16, name="embed")(x.reshape(x.shape[0], -1))
        return nn.Dense(3, name="head")(nn.relu(x))


def test_capture_user_cnn_eval_and_train():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 6, 2)), jnp.float32)
    m = UserCNN()
    v = m.init(jax.random.PRNGKey(0), x)
    logits, f = features.capture(m, v, x, ["bn", "embed"])
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(m.apply(v, x)))
    assert f["bn"].shape == (4, 6, 6, 8) and f["embed"].shape == (4, 16)
    p, s = v["params"], v["batch_stats"]
    h = nn.Conv(8, (3, 3)).apply({"params": p["conv"]}, x)
    h = nn.BatchNorm(use_running_average=True).apply({"params": p["bn"], "batch_stats": s["bn"]}, h)
    np.testing.assert_allclose(np.asarray(f["bn"]), np.asarray(h), rtol=1e-6, atol=1e-6)
    want = nn.Dense(16).apply({"params": p["embed"]}, nn.relu(h).reshape(4, -1))
    np.testing.assert_allclose(np.asarray(f["embed"]), np.asarray(want), rtol=1e-6, atol=1e-6)
    (logits_t, state), f = features.capture(m, v, x, "conv", train=True)
    want_logits, want_state = m.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(logits_t), np.asarray(want_logits))
    assert_trees_close(state, dict(want_state), rtol=0, atol=0)  # statistics updated exactly as without taps


def test_capture_kdjax_models_by_their_pytorch_names():
    r = kdjax.ResNet((1, 1), (4, 8), 10)
    x = jnp.ones((2, 8, 8, 3))
    v = r.init(jax.random.PRNGKey(0), x)
    _, f = features.capture(r, v, x, ["layer1", "layer2.0", "layer2.0.downsample"])
    assert f["layer1"].shape == (2, 8, 8, 4) and f["layer2.0"].shape == (2, 4, 4, 8)
    lm = kdjax.TransformerLM(11, 2, 8, 2, 6)
    tokens = jnp.zeros((3, 6), jnp.int32)
    v = lm.init(jax.random.PRNGKey(0), tokens)
    _, f = features.capture(lm, v, tokens, ["transformer.h.1", "transformer.ln_f"])
    assert f["transformer.h.1"].shape == (3, 6, 8) and f["transformer.ln_f"].shape == (3, 6, 8)


def test_unknown_path_lists_the_available_ones():
    r = kdjax.ResNet((1,), (4,), 3)
    x = jnp.ones((1, 8, 8, 3))
    v = r.init(jax.random.PRNGKey(0), x)
    with pytest.raises(InputError, match=r"got \['layer3'\]; available: bn1, conv1, fc, layer1, layer1.0"):
        features.capture(r, v, x, ["layer3"])


@pytest.mark.parametrize("call,exc,words", [
    (lambda: features.hint(jnp.ones((2, 3)), jnp.ones((2, 4))), InputError, ["teacher's shape (2, 4)", "connector"]),
    (lambda: features.attention_transfer(jnp.ones((2, 3)), jnp.ones((2, 3))), InputError, ["rank >= 4"]),
    (lambda: features.rkd(jnp.ones((2, 3)), jnp.ones((3, 3))), InputError, ["same batch", "2 and 3"]),
    (lambda: features.pkt(jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3))), InputTypeError, ["floating-point"]),
])
def test_feature_loss_errors(call, exc, words):
    with pytest.raises(exc) as e:
        call()
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_losses_are_zero_at_equal_inputs_and_teacher_gets_no_gradient():
    rng = np.random.default_rng(1)
    f = jnp.asarray(rng.standard_normal((5, 4, 4, 6)))
    e = jnp.asarray(rng.standard_normal((5, 7)))
    for loss, a in ((features.hint, f), (features.attention_transfer, f), (features.similarity_preserving, f),
                    (features.rkd, e), (features.pkt, e)):
        assert abs(float(loss(a, a))) < 1e-12, loss.__name__
        g = jax.grad(lambda t: loss(a * 1.5, t))(a)
        assert float(jnp.max(jnp.abs(g))) == 0.0, loss.__name__
