"""TransformerLM (GPT-2): names, causality, masks, dropout, training, errors.
Numbers against PyTorch and transformers are in parity/ (checks "transformer", "gpt2_hf")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close

import kdjax
from kdjax import convert
from kdjax.errors import InputError, InputTypeError
from kdjax.models import TransformerLM

V, L = 37, 9
MODEL = TransformerLM(V, 2, 16, 4, 12)


@pytest.fixture(scope="module")
def setup():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (3, L)), jnp.int32)
    variables = MODEL.init(jax.random.PRNGKey(0), tokens)
    return tokens, variables, jax.jit(lambda v, t, m=None: MODEL.apply(v, t, mask=m))


def test_names_are_hugging_face_gpt2s(setup):
    _, v, _ = setup
    names = set(convert.variables_to_torch(v, tied={"lm_head.weight": "transformer.wte.weight"}))
    block = {f"transformer.h.1.{m}.{p}" for m in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                  "mlp.c_proj") for p in ("weight", "bias")}
    assert block <= names
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"} <= names
    assert len(names) == 2 + 2 * 12 + 2 + 1
    # Conv1D weights stay [in, out], as GPT-2 stores them
    assert convert.variables_to_torch(v)["transformer.h.0.mlp.c_fc.weight"].shape == (16, 64)
    # GPT-2's init: std 0.02, output projections scaled by 1/sqrt(2 * layers), zero biases
    p = v["params"]["transformer"]["h"]["0"]
    assert abs(float(jnp.std(p["mlp"]["c_fc"]["weight"])) - 0.02) < 0.003
    assert abs(float(jnp.std(p["mlp"]["c_proj"]["weight"])) - 0.01) < 0.002
    assert not np.any(p["attn"]["c_attn"]["bias"])


def test_causal_and_padding_mask(setup):
    tokens, v, apply = setup
    out = apply(v, tokens)
    assert out.shape == (3, L, V)
    later = tokens.at[:, 5].set((tokens[:, 5] + 1) % V)  # a later token cannot change earlier logits
    np.testing.assert_array_equal(apply(v, later)[:, :5], out[:, :5])
    assert not np.allclose(apply(v, later)[:, 5:], out[:, 5:])
    mask = np.ones((3, L), bool)
    mask[:, 2] = False  # position 2 is padding: no later position may see it
    m = jnp.asarray(mask)
    changed = tokens.at[:, 2].set((tokens[:, 2] + 1) % V)
    np.testing.assert_allclose(apply(v, changed, m)[:, 3:], apply(v, tokens, m)[:, 3:], atol=1e-6)
    assert not np.allclose(apply(v, changed)[:, 3:], out[:, 3:])
    np.testing.assert_array_equal(apply(v, tokens, jnp.ones((3, L), bool)), out)  # all-true mask = none


def test_dropout_only_in_train_mode(setup):
    tokens, v, _ = setup
    model = TransformerLM(V, 2, 16, 4, 12, dropout_rate=0.1)
    eval_out = model.apply(v, tokens)
    np.testing.assert_allclose(eval_out, MODEL.apply(v, tokens), atol=1e-6)
    a = model.apply(v, tokens, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = model.apply(v, tokens, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(a, b) and not np.allclose(a, eval_out)


def test_token_level_distillation_trains(setup):
    """TransformerLM through kdjax's generic core: create_train_state from token ids,
    make_run with a padding mask in the data, the loss goes down."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, V, (32, L)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    where = np.arange(L)[None] < rng.integers(3, L + 1, 32)[:, None]
    teacher_logits = np.asarray(MODEL.apply(setup[1], jnp.asarray(x)))
    student = TransformerLM(V, 1, 8, 2, 12)
    state = kdjax.create_train_state(student, jax.random.PRNGKey(3), x[:1], learning_rate=1e-2)
    data = {"x": x, "y": y, "where": where, "teacher_logits": teacher_logits}
    schedule = kdjax.data.seed_schedule(jax.random.PRNGKey(4), 32, 8, 60)
    state, m = kdjax.make_run(student, "kd")(state, data, schedule, jax.random.PRNGKey(5),
                                             kdjax.make_hyper(2.0, 0.5))
    loss = np.asarray(m["loss"])
    assert np.all(np.isfinite(loss)) and loss[-10:].mean() < 0.93 * loss[:10].mean()


def test_from_gpt2_config():
    cfg = {"vocab_size": 50, "n_layer": 3, "n_embd": 24, "n_head": 6, "n_positions": 16,
           "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
    m = TransformerLM.from_gpt2_config(cfg)
    assert (m.vocab_size, m.num_layers, m.d_model, m.num_heads, m.max_len) == (50, 3, 24, 6, 16)
    with pytest.raises(InputError, match="activation_function"):
        TransformerLM.from_gpt2_config(cfg | {"activation_function": "relu"})
    with pytest.raises(InputError, match="missing 'n_head'"):
        TransformerLM.from_gpt2_config({k: v for k, v in cfg.items() if k != "n_head"})


def test_errors(setup):
    tokens, v, _ = setup
    with pytest.raises(InputError, match=r"token ids in \[0, 37\).*got ids from 0 to 37"):
        MODEL.apply(v, tokens.at[0, 0].set(V))
    with pytest.raises(InputError, match="at most max_len = 12 tokens, got 13"):
        MODEL.apply(v, jnp.zeros((1, 13), jnp.int32))
    with pytest.raises(InputTypeError, match="integer token ids"):
        MODEL.apply(v, tokens.astype(jnp.float32))
    with pytest.raises(InputError, match="shape \\[batch, length\\]"):
        MODEL.apply(v, tokens[0])
    with pytest.raises(InputError, match="mask: expected shape"):
        MODEL.apply(v, tokens, mask=jnp.ones((3, L + 1), bool))
    with pytest.raises(InputError, match="divisible by num_heads"):
        TransformerLM(V, 2, 18, 4, 12).init(jax.random.PRNGKey(0), tokens)
    # a state_dict of another depth: every missing and unexpected key, one error
    sd = convert.variables_to_torch(v, tied={"lm_head.weight": "transformer.wte.weight"})
    deeper = TransformerLM(V, 3, 16, 4, 12)
    like = jax.eval_shape(deeper.init, jax.random.PRNGKey(0), tokens)
    with pytest.raises(InputError, match=r"missing transformer\.h\.2\.attn\.c_attn\.bias"):
        convert.torch_to_variables(sd, like)
    wider = TransformerLM(V, 2, 32, 4, 12)
    with pytest.raises(InputError, match=r"transformer\.wte\.weight expected shape \(37, 32\), got \(37, 16\)"):
        convert.torch_to_variables(sd, jax.eval_shape(wider.init, jax.random.PRNGKey(0), tokens))
    # a tied copy is accepted only for a tie the model declares, and only if it really is a copy
    like = jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), tokens)
    assert MODEL.tied_weights == {"lm_head.weight": "transformer.wte.weight"}
    back = convert.torch_to_variables(sd, like, tied=MODEL.tied_weights)
    assert_trees_close(back, jax.tree_util.tree_map(np.asarray, v), rtol=0, atol=0)
    with pytest.raises(InputError, match="unexpected lm_head.weight"):
        convert.torch_to_variables(sd, like)
    sd_bad = dict(sd, **{"lm_head.weight": sd["lm_head.weight"] + 1})
    with pytest.raises(InputError, match="lm_head.weight is tied to transformer.wte.weight but differs"):
        convert.torch_to_variables(sd_bad, like, tied=MODEL.tied_weights)
    with pytest.raises(InputError, match="tied: expected ties to names the model has, got x -> y"):
        convert.torch_to_variables(sd, like, tied={"x": "y"})


def test_extra_layers_equal_to_used_ones_are_unexpected(setup):
    """A state_dict with extra layers whose values happen to equal the model's (zero
    biases, ones of fresh LayerNorms) is not a tied copy: every extra key is named."""
    tokens, v, _ = setup
    sd = convert.variables_to_torch(v)
    deeper = TransformerLM(V, 3, 16, 4, 12)
    extra = convert.variables_to_torch(deeper.init(jax.random.PRNGKey(1), tokens))
    extra = {k: a for k, a in extra.items() if k.startswith("transformer.h.2.")}
    extra["transformer.h.2.ln_1.bias"] = sd["transformer.h.0.ln_1.bias"]  # equal values, another layer
    with pytest.raises(InputError) as e:
        convert.torch_to_variables(sd | extra, jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), tokens))
    for k in extra:
        assert k in str(e.value), k
