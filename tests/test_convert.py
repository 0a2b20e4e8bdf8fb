import subprocess
import sys

import jax
import numpy as np
import pytest

import kdjax
from kdjax.convert import flax_to_torch, torch_to_flax


def state_dict(rng=np.random.default_rng(0)):
    return {"fc1.weight": rng.standard_normal((64, 50)), "fc1.bias": rng.standard_normal(64),
            "fc2.weight": rng.standard_normal((5, 64)), "fc2.bias": rng.standard_normal(5)}


def test_names_and_transpose():
    sd = state_dict()
    p = torch_to_flax(sd)
    assert sorted(p) == ["fc1", "fc2"] and sorted(p["fc1"]) == ["bias", "kernel"]
    np.testing.assert_array_equal(p["fc1"]["kernel"], sd["fc1.weight"].T)
    np.testing.assert_array_equal(p["fc2"]["bias"], sd["fc2.bias"])


def test_round_trip_exact_and_matches_model():
    sd = state_dict()
    like = kdjax.create_train_state(kdjax.StudentMLP(64, 5), jax.random.PRNGKey(0), 50).params
    back = flax_to_torch(torch_to_flax(sd, like=like), like=sd)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    p = kdjax.create_train_state(kdjax.TeacherMLP(32, 3), jax.random.PRNGKey(0), 7).params
    again = torch_to_flax(flax_to_torch(p))
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_converted_params_give_the_same_function():
    sd = state_dict()
    x = np.random.default_rng(1).standard_normal((3, 50))
    want = np.maximum(x @ sd["fc1.weight"].T + sd["fc1.bias"], 0) @ sd["fc2.weight"].T + sd["fc2.bias"]
    with jax.enable_x64(True):
        got = kdjax.StudentMLP(64, 5, dtype=np.float64).apply({"params": torch_to_flax(sd)}, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)


@pytest.mark.parametrize("mutate,words", [
    (lambda sd: sd.pop("fc2.bias"), ["missing fc2.bias"]),
    (lambda sd: sd.update({"fc3.weight": np.zeros((5, 5))}), ["unexpected fc3.kernel"]),
    (lambda sd: sd.update({"fc1.weight": np.zeros((64, 49))}), ["fc1.kernel", "(50, 64)", "(49, 64)"]),
    (lambda sd: sd.update({"fc1.running_mean": np.zeros(3)}), ["fc1.running_mean"]),
    (lambda sd: sd.update({"fc1.weight": np.zeros(3)}), ["fc1.weight", "2-D"]),
])
def test_errors_name_the_key(mutate, words):
    sd = state_dict()
    mutate(sd)
    like = kdjax.create_train_state(kdjax.StudentMLP(64, 5), jax.random.PRNGKey(0), 50).params
    with pytest.raises(ValueError) as e:
        torch_to_flax(sd, like=like)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_accepts_tensor_like_objects():
    class FakeTensor:
        def __init__(self, a): self.a = a
        def detach(self): return self
        def cpu(self): return self
        def numpy(self): return self.a
    sd = {k: FakeTensor(v) for k, v in state_dict().items()}
    assert torch_to_flax(sd)["fc1"]["kernel"].shape == (50, 64)


# ----------------------------------------------------------------------------- any model

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kdjax.convert import torch_name, torch_to_variables, variables_to_torch  # noqa: E402


def _small_resnet_like():
    model = kdjax.ResNet((1, 1), (4, 8), num_classes=3)
    return model, jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))


def _torch_layout(like, seed=0):
    rng = np.random.default_rng(seed)
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), like)
    return {k: rng.standard_normal(v.shape).astype(np.float32) if v.ndim else v
            for k, v in variables_to_torch(zeros).items()}


def test_variables_round_trip_exact_and_layouts():
    model, like = _small_resnet_like()
    sd = _torch_layout(like)
    v = torch_to_variables(sd, like)
    np.testing.assert_array_equal(v["params"]["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(v["batch_stats"]["layer2"]["0"]["downsample"]["1"]["var"],
                                  sd["layer2.0.downsample.1.running_var"])
    np.testing.assert_array_equal(v["params"]["bn1"]["scale"], sd["bn1.weight"])
    back = variables_to_torch(v)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    assert back["bn1.num_batches_tracked"].dtype == np.int64
    assert "bn1.num_batches_tracked" not in variables_to_torch(v, num_batches_tracked=None)
    # structure and dtypes are exactly like's
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(like)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(like)))
    model.apply(v, jnp.ones((2, 8, 8, 3)))  # and it runs


def test_every_mismatch_is_named_in_one_error():
    """A state_dict from another architecture: missing, unexpected and mis-shaped keys at once."""
    _, like = _small_resnet_like()
    sd = _torch_layout(like)
    sd.pop("layer1.0.bn2.running_mean")
    sd.pop("fc.bias")
    sd["layer3.0.conv1.weight"] = np.zeros((16, 8, 3, 3), np.float32)
    sd["conv1.weight"] = np.zeros((4, 1, 3, 3), np.float32)
    with pytest.raises(ValueError) as e:
        torch_to_variables(sd, like)
    msg = str(e.value)
    for words in ("missing fc.bias, layer1.0.bn2.running_mean", "unexpected layer3.0.conv1.weight",
                  "conv1.weight expected shape (4, 3, 3, 3), got (4, 1, 3, 3)"):
        assert words in msg, (words, msg)
    assert len(msg.splitlines()) == 1


def test_name_rule():
    assert torch_name("params", ("layer1", "0", "conv1", "kernel")) == "layer1.0.conv1.weight"
    assert torch_name("params", ("wte", "embedding")) == "wte.weight"
    assert torch_name("params", ("ln_f", "scale")) == "ln_f.weight"
    assert torch_name("batch_stats", ("bn1", "mean")) == "bn1.running_mean"
    with pytest.raises(ValueError, match="no PyTorch name"):
        torch_name("cache", ("attn", "k"))


class _CnnThenLinear(nn.Module):
    """conv -> flatten -> dense, in Flax (NHWC flatten)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(2, (1, 1), use_bias=False, name="conv")(x)
        return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


def test_linear_after_flatten_permutes_input_rows():
    """A torch model flattens NCHW (C, H, W); with linear_after_flatten the Flax model
    (flattening NHWC) computes the same function; without it, it does not."""
    rng = np.random.default_rng(0)
    conv_w = rng.standard_normal((2, 3, 1, 1))  # torch [out, in, 1, 1]
    fc_w, fc_b = rng.standard_normal((3, 2 * 4 * 5)), rng.standard_normal(3)
    x_nchw = rng.standard_normal((2, 3, 4, 5))
    h = np.einsum("oi,bihw->bohw", conv_w[:, :, 0, 0], x_nchw)  # torch conv1x1
    want = h.reshape(2, -1) @ fc_w.T + fc_b  # torch.flatten (C, H, W)
    sd = {"conv.weight": conv_w, "fc.weight": fc_w, "fc.bias": fc_b}
    model, x = _CnnThenLinear(), x_nchw.transpose(0, 2, 3, 1)
    like = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 5, 3)))
    v = torch_to_variables(sd, like, linear_after_flatten={"fc": (2, 4, 5)})
    x = x.astype(np.float32)
    np.testing.assert_allclose(np.asarray(model.apply(v, x)), want, rtol=1e-5, atol=1e-5)
    plain = torch_to_variables(sd, like)
    assert not np.allclose(np.asarray(model.apply(plain, x)), want, rtol=1e-2)
    back = variables_to_torch(v, linear_after_flatten={"fc": (2, 4, 5)})
    np.testing.assert_array_equal(back["fc.weight"], fc_w.astype(np.float32))
    with pytest.raises(ValueError, match="linear_after_flatten"):
        torch_to_variables(sd, like, linear_after_flatten={"fc": (3, 4, 5)})
    with pytest.raises(ValueError, match="linear_after_flatten"):
        torch_to_variables(sd, like, linear_after_flatten={"head": (2, 4, 5)})


def test_import_kdjax_does_not_import_torch():
    code = "import sys, kdjax, kdjax.convert, kdjax.app.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
