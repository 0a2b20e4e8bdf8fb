"""The library's boundary (issue 36, item 4): concrete bad values given to load_hf, save_hf,
generate, make_mesh, onpolicy, the losses, the tokenizer, the text corpus and a checkpoint save
end in one InputError / InputTypeError (or OSError) line naming the argument, what was expected
and what came; save_hf never touches a file it did not write."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import convert
from kdjax.errors import InputError, InputTypeError
from kdjax.models import Llama, TransformerLM

TINY = Llama(vocab_size=37, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2)
GPT = TransformerLM(37, 1, 16, 4, 12)


def one_line(excinfo, *words):
    text = str(excinfo.value)
    assert "\n" not in text, text
    for w in words:
        assert w in text, (w, text)


@pytest.fixture(scope="module")
def tiny():
    return TINY.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    convert.save_hf(TINY, tiny, root / "llama")
    convert.save_hf(GPT, GPT.init(jax.random.PRNGKey(1), jnp.zeros((1, 3), jnp.int32)), root / "gpt2")
    return root


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- load_hf


def _drop(config, key):
    return {k: v for k, v in config.items() if k != key}


LLAMA_BAD = [
    (lambda c: [c], ["expected a JSON object, got a JSON list"]),
    (lambda c: _drop(c, "vocab_size"), ["vocab_size: expected an int >= 1, got nothing"]),
    (lambda c: c | {"vocab_size": 0}, ["vocab_size: expected an int >= 1, got 0"]),
    (lambda c: c | {"vocab_size": -3}, ["vocab_size", "got -3"]),
    (lambda c: c | {"vocab_size": 2.5}, ["vocab_size", "got 2.5 (float)"]),
    (lambda c: c | {"vocab_size": "37"}, ["vocab_size", "'37' (str)"]),
    (lambda c: _drop(c, "hidden_size"), ["hidden_size: expected an int >= 1"]),
    (lambda c: c | {"num_hidden_layers": 0}, ["num_hidden_layers: expected an int >= 1, got 0"]),
    (lambda c: c | {"num_attention_heads": 0}, ["num_attention_heads: expected an int >= 1, got 0"]),
    (lambda c: c | {"num_key_value_heads": 3}, ["num_key_value_heads: expected a divisor"]),
    (lambda c: c | {"max_position_embeddings": 0}, ["max_position_embeddings: expected an int >= 1"]),
    (lambda c: c | {"rope_theta": float("nan")}, ["rope_theta: expected a finite number > 0, got nan"]),
    (lambda c: c | {"rms_norm_eps": "small"}, ["rms_norm_eps", "'small'"]),
    (lambda c: c | {"rope_parameters": "x"}, ["rope_parameters: expected an object or null"]),
    (lambda c: c | {"tie_word_embeddings": "false"}, ["tie_word_embeddings: expected true or false"]),
    (lambda c: c | {"architectures": "LlamaForCausalLM"}, ["architectures: expected a list of names"]),
    (lambda c: _drop(c, "architectures") | {"model_type": "gemma"}, ["architecture 'gemma' is not supported"]),
    (lambda c: c | {"intermediate_size": 32}, ["the weights do not fit config.json", "mlp.down_proj"]),
]


@pytest.mark.parametrize("edit, words", LLAMA_BAD)
def test_load_hf_refuses_a_bad_llama_config_in_one_line(folders, tmp_path, edit, words):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folders / "llama" / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(edit(config)))
    with pytest.raises(InputError) as e:
        convert.load_hf(tmp_path)
    one_line(e, *words)


@pytest.mark.parametrize("edit, words", [
    (lambda c: _drop(c, "vocab_size"), ["vocab_size: expected an int >= 1, got nothing"]),
    (lambda c: c | {"n_layer": 0}, ["n_layer: expected an int >= 1, got 0"]),
    (lambda c: c | {"n_head": 3}, ["n_head: expected a divisor of n_embd (16), got 3"]),
    (lambda c: c | {"vocab_size": 40}, ["the weights do not fit config.json", "expected shape (40, 16)"]),
])
def test_load_hf_refuses_a_bad_gpt2_config_in_one_line(folders, tmp_path, edit, words):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folders / "gpt2" / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(edit(json.loads((tmp_path / "config.json").read_text()))))
    with pytest.raises(InputError) as e:
        convert.load_hf(tmp_path)
    one_line(e, *words)


def test_load_hf_refuses_bad_files_in_one_line(folders, tmp_path):
    with pytest.raises(InputError) as e:
        convert.load_hf(tmp_path)  # no config.json
    one_line(e, "readable config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError) as e:
        convert.load_hf(tmp_path)
    one_line(e, "readable config.json", "JSONDecodeError")
    (tmp_path / "config.json").write_bytes((folders / "llama" / "config.json").read_bytes())
    with pytest.raises(InputError) as e:
        convert.load_hf(tmp_path)  # no weights
    one_line(e, "could not read the weights")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../w"}}))
    with pytest.raises(InputError) as e:
        convert.load_hf(tmp_path)  # an index that points outside the folder is not followed
    one_line(e, "expected plain file names inside the folder, got '../w'")
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(InputError) as e:
        convert.load_hf(tmp_path)
    one_line(e, "weight_map: expected an object")
    with pytest.raises(InputTypeError):
        convert.load_hf(3)


def test_load_hf_takes_the_architecture_from_model_type(folders, tmp_path, tiny):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folders / "llama" / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(_drop(config, "architectures")))
    model, variables = convert.load_hf(tmp_path)
    assert model == TINY
    for a, b in zip(jax.tree_util.tree_leaves(tiny), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- save_hf


def test_save_hf_refuses_variables_of_another_model_before_writing(tiny, tmp_path):
    other = TINY.clone(intermediate_size=32).init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(InputError) as e:
        convert.save_hf(TINY, other, tmp_path / "s")
    one_line(e, "variables:", "mlp/down_proj/kernel", "expected shape (24, 16)", "got (32, 16)")
    with pytest.raises(InputError) as e:
        convert.save_hf(TINY, tiny["params"], tmp_path / "s")  # params without the "params" level
    one_line(e, "variables:", "got none at params/")
    extra = {"params": {**tiny["params"], "extra": {"kernel": np.zeros((2, 2), np.float32)}}}
    with pytest.raises(InputError) as e:
        convert.save_hf(TINY, extra, tmp_path / "s")
    one_line(e, "unexpected params/extra/kernel")
    with pytest.raises(InputTypeError):
        convert.save_hf(TINY, [1, 2], tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_save_hf_writes_into_a_folder_of_other_files_and_leaves_them(tiny, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "mine.txt").write_bytes(b"the user's own file")
    (folder / "tokenizer.json").write_bytes(b"{}")
    written = convert.save_hf(TINY, tiny, folder)
    assert written == [str(folder / "config.json"), str(folder / "model.safetensors")]
    assert convert.hf_files(folder) == written
    assert (folder / "mine.txt").read_bytes() == b"the user's own file"
    assert (folder / "tokenizer.json").read_bytes() == b"{}"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "mine.txt", "model.safetensors",
                                                        "tokenizer.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    convert.save_hf(TINY, tiny, empty)  # an empty existing folder is fine
    assert convert.load_hf(empty)[0] == TINY


def test_save_hf_without_overwrite_refuses_its_own_files_and_changes_nothing(tiny, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "mine.txt").write_text("mine")
    before = _snapshot(folder)
    with pytest.raises(InputError) as e:
        convert.save_hf(TINY, tiny, folder)
    one_line(e, "exists; pass overwrite=True", "config.json")
    assert _snapshot(folder) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError) as e:
        convert.save_hf(TINY, tiny, tmp_path / "file", overwrite=True)
    one_line(e, "expected a folder, got a file")


def test_save_hf_overwrite_replaces_only_its_own_files(tiny, tmp_path):
    folder = tmp_path / "s"
    convert.save_hf(GPT, GPT.init(jax.random.PRNGKey(1), jnp.zeros((1, 3), jnp.int32)), folder)
    user = {"mine.txt": b"mine", "tokenizer.json": b"{\"v\": 1}", "generation_config.json": b"{}",
            "model-notours.safetensors": b"x"}
    for name, data in user.items():
        (folder / name).write_bytes(data)
    # a stale sharded checkpoint of save_hf's naming: it would shadow the new weights
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    convert.save_hf(TINY, tiny, folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*user, "config.json", "model.safetensors"])
    for name, data in user.items():
        assert (folder / name).read_bytes() == data
    model, back = convert.load_hf(folder)
    assert model == TINY
    for a, b in zip(jax.tree_util.tree_leaves(tiny), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(a, b)


def test_save_hf_killed_mid_write_leaves_the_old_files(tiny, tmp_path, monkeypatch):
    import safetensors.numpy

    folder = tmp_path / "s"
    convert.save_hf(GPT, GPT.init(jax.random.PRNGKey(1), jnp.zeros((1, 3), jnp.int32)), folder)
    (folder / "mine.txt").write_text("mine")
    before = _snapshot(folder)

    def half_then_die(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_then_die)
    with pytest.raises(OSError, match="No space left"):
        convert.save_hf(TINY, tiny, folder, overwrite=True)
    assert _snapshot(folder) == before  # no temporary file left, nothing replaced
    with pytest.raises(OSError):
        convert.save_hf(TINY, tiny, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # the folder it created is removed again


# ----------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def decoder():
    model = Llama(vocab_size=11, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=12)
    return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))


PROMPTS = jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.int32)
KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("prompts, kwargs, error, words", [
    (jnp.zeros((0, 3), jnp.int32), {}, InputError, ["prompts: expected at least one prompt", "(0, 3)"]),
    (jnp.zeros((2, 0), jnp.int32), {}, InputError, ["prompts: expected at least one prompt", "(2, 0)"]),
    (PROMPTS.at[0, 0].set(11), {}, InputError, ["prompts: expected token ids in [0, 11)", "[2, 11]"]),
    (PROMPTS.at[1, 2].set(-1), {}, InputError, ["prompts: expected token ids in [0, 11)", "[-1, 5]"]),
    (PROMPTS, dict(rng=KEY, top_k=0), InputError, ["top_k: expected an int >= 1, got 0"]),
    (PROMPTS, dict(rng=KEY, top_k=12), InputError, ["top_k: expected an int in [1, 11]", "got 12"]),
    (PROMPTS, dict(top_k=2.0), InputTypeError, ["top_k", "float"]),
    (PROMPTS, dict(rng=KEY, top_p=0.0), InputError, ["top_p: expected a number in (0, 1], got 0.0"]),
    (PROMPTS, dict(rng=KEY, top_p=float("nan")), InputError, ["top_p", "nan"]),
    (PROMPTS, dict(rng=KEY, temperature=float("inf")), InputError, ["temperature", "finite", "inf"]),
    (PROMPTS, dict(rng=KEY, temperature=float("nan")), InputError, ["temperature", "nan"]),
    (PROMPTS, dict(temperature=-0.5), InputError, ["temperature", "-0.5"]),
    (PROMPTS, dict(rng=5), InputTypeError, ["rng: expected a PRNG key", "jax.random.PRNGKey(n)", "5 (int)"]),
    (PROMPTS, dict(rng=jnp.zeros(3, jnp.float32)), InputTypeError, ["rng: expected a PRNG key", "float32[3]"]),
    (PROMPTS, dict(prompt_mask=jnp.ones((2, 3), jnp.int32)), InputTypeError, ["prompt_mask: expected bool",
                                                                              "int32"]),
    (PROMPTS, dict(prompt_mask=jnp.ones((2, 4), bool)), InputError, ["prompt_mask: expected the prompts' shape"]),
])
def test_generate_refuses_bad_input_in_one_line(decoder, prompts, kwargs, error, words):
    from kdjax.generation import generate

    model, variables = decoder
    with pytest.raises(error) as e:
        generate(model, variables, prompts, 2, **kwargs)
    one_line(e, *words)


def test_generate_refuses_bad_lengths_and_accepts_both_key_kinds(decoder):
    from kdjax.generation import generate

    model, variables = decoder
    for new, error, words in [(0, InputError, "max_new_tokens: expected an int >= 1, got 0"),
                              (2.0, InputTypeError, "max_new_tokens"),
                              (10, InputError, "prompts of 3 tokens + 10 new exceed the model's context of 12")]:
        with pytest.raises(error) as e:
            generate(model, variables, PROMPTS, new)
        one_line(e, words)
    a = generate(model, variables, PROMPTS, 3, rng=jax.random.PRNGKey(3), temperature=2.0)
    b = generate(model, variables, PROMPTS, 3, rng=jax.random.wrap_key_data(jax.random.PRNGKey(3)), temperature=2.0)
    np.testing.assert_array_equal(a, b)  # a new-style key of the same bits draws the same tokens


def test_sample_logits_refuses_bad_input_in_one_line():
    from kdjax.generation import sample_logits

    logits = jnp.zeros((2, 5))
    for args, kwargs, error, words in [
        ((jnp.zeros((2, 5), jnp.int32), None), {}, InputTypeError, "logits: expected a floating array"),
        ((logits, 3), {}, InputTypeError, "key: expected a PRNG key"),
        ((logits, KEY), dict(top_k=6), InputError, "top_k: expected an int in [1, 5]"),
        ((logits, KEY), dict(top_p=1.5), InputError, "top_p: expected a number in (0, 1]"),
        ((logits, KEY), dict(temperature=float("inf")), InputError, "temperature"),
        ((logits, KEY), dict(temperature=0.0), InputError, "0 is greedy: pass key=None"),
    ]:
        with pytest.raises(error) as e:
            sample_logits(*args, **kwargs)
        one_line(e, words)
    tokens, logp = sample_logits(logits, KEY, top_k=5, top_p=1.0)
    assert tokens.shape == (2,) and logp.shape == (2,)


# ----------------------------------------------------------------------------- make_mesh


def test_make_mesh_refuses_bad_devices_and_counts_in_one_line():
    from kdjax import parallel

    d = jax.devices()[0]
    for kwargs, error, words in [
        (dict(devices=[]), InputError, "devices: expected at least one device, got an empty sequence"),
        (dict(devices=[d, d]), InputError, "devices: expected distinct devices"),
        (dict(devices=["cpu:0"]), InputTypeError, "devices: expected jax devices"),
        (dict(devices=3), InputTypeError, "devices: expected a sequence of jax devices, got int"),
        (dict(data=0, devices=[d]), InputError, "data: expected an int >= 1, got 0"),
        (dict(fsdp=-1, devices=[d]), InputError, "fsdp: expected an int >= 1, got -1"),
        (dict(members=2.0, devices=[d]), InputTypeError, "members: expected an int >= 1"),
        (dict(members=2, devices=[d]), InputError, "expected members x fsdp to divide the 1 devices"),
        (dict(data=2, devices=[d]), InputError, "expected members x data x fsdp <= 1 devices"),
    ]:
        with pytest.raises(error) as e:
            parallel.make_mesh(**kwargs)
        one_line(e, words)
    assert parallel.make_mesh(devices=(d,)).devices.shape == (1, 1, 1)


# ----------------------------------------------------------------------------- onpolicy


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(discount=float("nan")), InputError, ["discount: expected a number in [0, 1], got nan"]),
    (dict(discount=2.0), InputError, ["discount", "got 2.0"]),
    (dict(discount=-1.0), InputError, ["discount", "got -1.0"]),
    (dict(coef=float("inf")), InputError, ["coef: expected a finite number, got inf"]),
    (dict(coef=float("nan")), InputError, ["coef", "nan"]),
    (dict(coef="1"), InputTypeError, ["coef: expected a real number"]),
    (dict(teacher_logprobs=jnp.zeros((2, 4))), InputError, ["teacher_logprobs: expected sampling_logprobs' shape"]),
    (dict(mask=jnp.ones((3,), bool)), InputError, ["mask: expected sampling_logprobs' shape (2, 3), got (3,)"]),
])
def test_reverse_kl_advantages_refuses_bad_values_in_one_line(kwargs, error, words):
    from kdjax import onpolicy

    args = dict(sampling_logprobs=-jnp.ones((2, 3)), teacher_logprobs=-jnp.ones((2, 3)) * 2,
                mask=jnp.ones((2, 3), bool))
    with pytest.raises(error) as e:
        onpolicy.reverse_kl_advantages(**(args | kwargs))
    one_line(e, *words)


def test_generalized_jsd_loss_refuses_bad_values_in_one_line():
    from kdjax import onpolicy

    s, t = jnp.zeros((2, 3, 5)), jnp.ones((2, 3, 5))
    for args, kwargs, error, words in [
        ((s, t), dict(beta=1.5), InputError, "beta: expected a number in [0, 1], got 1.5"),
        ((s, t), dict(beta=float("nan")), InputError, "beta"),
        ((s, t), dict(temperature=0.0), InputError, "temperature: expected a finite number > 0, got 0.0"),
        ((s, t), dict(temperature=-1.0), InputError, "temperature"),
        ((s, t[:, :2]), {}, InputError, "teacher_logits: expected the student's shape"),
        ((s, t.at[0, 1, 2].set(jnp.inf)), {}, InputError, "teacher_logits: expected finite values"),
        ((s, t, jnp.zeros((2, 4), jnp.int32)), {}, InputError, "labels: expected the logits' leading shape (2, 3)"),
        ((s, t, jnp.zeros((2, 3))), {}, InputTypeError, "labels: expected integer token ids"),
    ]:
        with pytest.raises(error) as e:
            onpolicy.generalized_jsd_loss(*args, **kwargs)
        one_line(e, words)


def test_sequence_logprobs_refuses_a_start_out_of_range(decoder):
    from kdjax import onpolicy

    model, variables = decoder
    tokens, mask = PROMPTS, jnp.ones(PROMPTS.shape, bool)
    for start, error, words in [(0, InputError, "start: expected an int >= 1, got 0"),
                                (3, InputError, "start: expected an int in [1, 2] (tokens of length 3), got 3"),
                                (1.0, InputTypeError, "start")]:
        with pytest.raises(error) as e:
            onpolicy.sequence_logprobs(model, variables, tokens, mask, start)
        one_line(e, words)
    with pytest.raises(InputError) as e:
        onpolicy.sequence_logprobs(model, variables, tokens, mask[:, :2], 1)
    one_line(e, "mask: expected the tokens' shape (2, 3)")
    logits, logp = onpolicy.sequence_logprobs(model, variables, tokens, mask, 2)
    assert logits.shape == (2, 1, 11) and logp.shape == (2, 1)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(method=3), InputError, ["method: expected one of"]),
    (dict(lmbda="half"), InputTypeError, ["lmbda: expected a real number"]),
    (dict(lmbda=float("nan")), InputError, ["lmbda: expected a probability in [0, 1], got nan"]),
    (dict(beta=-0.1), InputError, ["beta", "-0.1"]),
    (dict(max_new_tokens=2.5), InputTypeError, ["max_new_tokens", "2.5"]),
    (dict(max_new_tokens=0), InputError, ["max_new_tokens: expected an int >= 1, got 0"]),
    (dict(temperature=float("inf")), InputError, ["temperature"]),
    (dict(top_k=0), InputError, ["top_k: expected an int >= 1, got 0"]),
    (dict(top_p=0.0), InputError, ["top_p: expected a number in (0, 1], got 0.0"]),
    (dict(eos_id=-1), InputError, ["eos_id: expected an int >= 0, got -1"]),
    (dict(coef=float("nan")), InputError, ["coef: expected a finite number"]),
    (dict(discount=1.5), InputError, ["discount", "1.5"]),
    (dict(seq_kd="yes"), InputTypeError, ["seq_kd: expected True or False"]),
    (dict(teacher="gpt2"), InputTypeError, ["teacher: expected a decoder", "str"]),
])
def test_on_policy_options_are_checked_in_one_line(decoder, kwargs, error, words):
    from kdjax import onpolicy

    model, _ = decoder
    with pytest.raises(error) as e:
        onpolicy.OnPolicy(**({"teacher": model} | kwargs))
    one_line(e, *words)
    if "teacher" not in kwargs:  # and make_on_policy_step checks them before converting (int(2.5) was 2)
        with pytest.raises(error) as e:
            onpolicy.make_on_policy_step(model, model, **kwargs)
        one_line(e, *words)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_losses_refuse_non_finite_concrete_teacher_logits(bad):
    """One +inf teacher logit made its position's KL silently 0; now every entry point that
    takes teacher logits refuses a concrete non-finite one, naming where it is."""
    from kdjax import losses

    s = np.zeros((2, 3, 5), np.float32)
    t = np.ones((2, 3, 5), np.float32)
    t[1, 2, 4] = bad
    y = np.zeros((2, 3), np.int32)
    for call in (lambda: losses.soft_kl(s, t), lambda: losses.reverse_kl(s, t), lambda: losses.jsd(s, t),
                 lambda: losses.dkd(s, t, y), lambda: losses.distillation_loss(s, t, y),
                 lambda: losses.distillation_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), divergence="jsd"),
                 lambda: jax.grad(lambda a: losses.soft_kl(a, t).sum())(s)):
        with pytest.raises(InputError) as e:
            call()
        one_line(e, "teacher_logits: expected finite values", "at index [1, 2, 4]", "1 non-finite of 30")


def test_losses_under_jit_do_not_check_traced_teacher_logits():
    """Documented: a traced teacher logit cannot be inspected without a host callback, so
    under jit it is not checked (the value goes through); finite values give the same
    number as outside jit."""
    from kdjax import losses

    s, t = jnp.zeros((2, 5)), jnp.arange(10.0).reshape(2, 5)
    np.testing.assert_array_equal(jax.jit(losses.soft_kl)(s, t), losses.soft_kl(s, t))
    jax.jit(losses.soft_kl)(s, t.at[0, 0].set(jnp.inf))  # no error, no callback


def test_masked_mean_refuses_a_bad_where_in_one_line():
    from kdjax import losses

    values = jnp.arange(6.0).reshape(2, 3)
    for where, error, words in [(jnp.ones((2, 1), bool), InputError, "where: expected the values' shape (2, 3), got (2, 1)"),
                                (jnp.ones((3,), bool), InputError, "where: expected the values' shape (2, 3)"),
                                (jnp.ones((2, 3), jnp.int32), InputTypeError, "where: expected a bool mask, got int32"),
                                ([[True] * 3] * 2, InputTypeError, "where: expected a bool mask, got list")]:
        with pytest.raises(error) as e:
            losses.masked_mean(values, where)
        one_line(e, words)
    assert float(losses.masked_mean(values, jnp.asarray([[True, False, False], [False, False, True]]))) == 2.5


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizers_are_compared_by_content_not_size(tmp_path):
    from kdjax import tokenizer as tk

    a = tk.train_bpe(["def f(x):\n    return x + 1\n" * 30], 270, tmp_path / "a.json")
    b = tk.train_bpe(["the quick brown fox jumps over the lazy dog. " * 30], 270, tmp_path / "b.json")
    assert a.get_vocab_size() == b.get_vocab_size() == 270
    assert not tk.same_tokenizer(a, b) and tk.content_sha256(a) != tk.content_sha256(b)
    # the same tokenizer in a file formatted otherwise: the same content
    (tmp_path / "pretty.json").write_text(json.dumps(json.loads((tmp_path / "a.json").read_text()), indent=3,
                                                     sort_keys=True))
    assert tk.same_tokenizer(tmp_path / "a.json", tmp_path / "pretty.json")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "tokenizer.json").write_bytes((tmp_path / "b.json").read_bytes())
    assert tk.content_sha256(tmp_path / "folder") == tk.content_sha256(b)  # a folder: its tokenizer.json
    assert tk.content_sha256(str(tmp_path / "a.json")) == tk.content_sha256(a)
    assert len(tk.content_sha256(a)) == 64
    with pytest.raises(InputTypeError) as e:
        tk.content_sha256(3)
    one_line(e, "expected a tokenizers.Tokenizer or a path")


@pytest.mark.parametrize("content", [b"{}", b"[]", b"\"x\"", b"not json", bytes(range(256)),
                                     b'{"version":"1.0","model":{"type":"BPE","vocab":{"a":0},"merges":["a b"]}}'])
def test_load_tokenizer_refuses_a_file_that_is_not_a_tokenizer_in_one_line(tmp_path, content):
    from kdjax import tokenizer as tk

    (tmp_path / "t.json").write_bytes(content)
    with pytest.raises(InputError) as e:
        tk.load_tokenizer(tmp_path / "t.json")
    one_line(e, "expected a tokenizer.json file")


# ----------------------------------------------------------------------------- text corpus


@pytest.fixture(scope="module")
def bpe():
    from kdjax import tokenizer as tk

    return tk.train_bpe(["héllo wörld, ünïcode text " * 40], 280)


def test_a_non_utf8_corpus_is_refused_with_the_file_and_offset(tmp_path, bpe):
    from kdjax import data

    good = "héllo wörld " * 200
    raw = good.encode("utf-8")
    bad = raw[:1001] + b"\xff" + raw[1001:]  # offset 1001 lies between two characters
    assert raw[1001] < 0x80
    (tmp_path / "bad.txt").write_bytes(bad)
    with pytest.raises(InputError) as e:
        data.text(8, tmp_path / "bad.txt", tokenizer=bpe)
    one_line(e, str(tmp_path / "bad.txt"), "expected UTF-8 text", "0xff at byte offset 1001")
    with pytest.raises(InputError) as e:
        data.text_documents(tmp_path / "bad.txt", utf8=True)
    one_line(e, "0xff at byte offset 1001")
    data.text(8, tmp_path / "bad.txt")  # byte-level: any bytes are tokens, as before
    (tmp_path / "latin1.txt").write_bytes(good.encode("latin-1"))
    with pytest.raises(InputError) as e:
        data.text(8, tmp_path / "latin1.txt", tokenizer=bpe)
    one_line(e, "0xe9 at byte offset 1")


def test_a_utf8_corpus_is_split_and_cut_without_replacement_characters(tmp_path, bpe):
    """The train/validation split and a max_bytes cut fall inside two-byte characters here:
    no U+FFFD comes out of either (each split decodes strictly)."""
    from kdjax import data

    text = "é" * 3000  # + "a": 6001 bytes, whose 10% split at byte 5401 falls inside a character
    (tmp_path / "c.txt").write_bytes(text.encode("utf-8") + b"a")
    name, train, val, _ = data.text_documents(tmp_path / "c.txt", utf8=True)
    assert data.decode_text(train[0]) + data.decode_text(val[0]) == text + "a"
    assert bytes(val[0][:1]) != b"\xa9"  # the cut moved back to the start of a character
    ds = data.text(4, tmp_path / "c.txt", tokenizer=bpe, max_bytes=1001)  # a cut inside a character
    assert ds.x_train.size > 0
    for x in (ds.x_train, ds.x_test):
        assert "\ufffd" not in bpe.decode(np.asarray(x).ravel().tolist())
    assert data.decode_text(b"ab\xc3") == "ab"  # a character cut at the end is dropped
    with pytest.raises(InputError) as e:
        data.decode_text(b"a\xc3b", "corpus.txt")
    one_line(e, "corpus.txt: expected UTF-8 text", "0xc3 at byte offset 1")


def test_the_bundled_text_still_loads_with_a_tokenizer(bpe):
    from kdjax import data

    ds = data.text(16, tokenizer=bpe, max_bytes=20000)
    assert ds.num_classes == bpe.get_vocab_size() and ds.x_train.shape[1] == 16


# ----------------------------------------------------------------------------- checkpoint


def _enospc(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _wrapped_enospc(*args, **kwargs):
    try:
        _enospc()
    except OSError as e:
        raise ValueError("Orbax: async write failed") from e


def _tensorstore_enospc(*args, **kwargs):
    raise ValueError("Error writing local file \"/x/d/c/0\": [OS error 28: No space left on device]")


@pytest.mark.parametrize("writer", [_enospc, _wrapped_enospc, _tensorstore_enospc])
@pytest.mark.parametrize("rotating", [False, True])
def test_a_full_disk_during_a_checkpoint_is_one_oserror_line_and_keeps_the_previous(tmp_path, monkeypatch,
                                                                                    writer, rotating):
    import orbax.checkpoint as ocp

    from kdjax import checkpoint

    path = tmp_path / "ckpt"
    save = checkpoint.save_rotating if rotating else checkpoint.save
    save(path, {"w": np.arange(3.0)}, {"step": 1})
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", writer)
    with pytest.raises(OSError) as e:
        save(path, {"w": np.arange(3.0) + 1}, {"step": 2})
    one_line(e, f"checkpoint: could not write {path}:", "No space left on device")
    assert not isinstance(e.value, ValueError)
    if writer is not _tensorstore_enospc:
        assert e.value.errno == 28
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no ckpt.tmp, nothing half written
    tree, meta = checkpoint.load(path)
    assert meta == {"step": 1} and tree["w"].tolist() == [0.0, 1.0, 2.0]


def test_a_full_disk_in_the_background_saver_is_raised_by_wait(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from kdjax import checkpoint

    saver = checkpoint.RotatingSaver(tmp_path / "ckpt")
    saver({"w": np.zeros(2)}, {"step": 1})
    saver.wait()
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", _wrapped_enospc)
    saver({"w": np.ones(2)}, {"step": 2})
    with pytest.raises(OSError) as e:
        saver.wait()
    one_line(e, "checkpoint: could not write", "No space left on device")
    assert checkpoint.load_latest(tmp_path / "ckpt")[1] == {"step": 1}
