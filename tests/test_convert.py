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
