"""kdjax.generate: greedy output equal to transformers' generate(do_sample=False) for
converted random-init GPT-2, Llama, Qwen2 and Mistral models (left-padded prompts of
different lengths, with and without EOS); the key/value cache equal to the full forward;
sampling reproducible from the key and distributed as intended (a chi-square test with a
stated false-alarm rate); one compile per shape; bad input in one line."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kdjax import convert
from kdjax.errors import InputError, InputTypeError
from kdjax.generation import _generate, generate, rollout
from kdjax.models import Llama, StudentMLP, TransformerLM

V, LENS, NEW = 64, [5, 3, 7, 1], 8


def _prompts():
    rng = np.random.default_rng(0)
    p = max(LENS)
    prompts, mask = np.zeros((len(LENS), p), np.int64), np.zeros((len(LENS), p), bool)
    for i, n in enumerate(LENS):
        prompts[i, p - n:], mask[i, p - n:] = rng.integers(1, V, n), True
    return prompts, mask


def _hf_configs(transformers):
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)
    return {"gpt2": transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                            initializer_range=0.3, bos_token_id=None, eos_token_id=None),
            "llama": transformers.LlamaConfig(**small),
            "qwen2": transformers.Qwen2Config(**small),
            "mistral": transformers.MistralConfig(**small, sliding_window=4)}


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
def test_greedy_equals_transformers_generate(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_hf_configs(transformers)[family]).eval()
    hf.save_pretrained(tmp_path)
    model, variables = convert.load_hf(tmp_path)
    prompts, mask = _prompts()

    def hf_generate(**kw):
        with torch.no_grad():
            return hf.generate(input_ids=torch.from_numpy(prompts), attention_mask=torch.from_numpy(mask.astype(int)),
                               do_sample=False, max_new_tokens=NEW, pad_token_id=0, **kw).numpy()

    want = hf_generate()
    np.testing.assert_array_equal(generate(model, variables, jnp.asarray(prompts, jnp.int32), NEW,
                                           prompt_mask=jnp.asarray(mask)), want)
    got = rollout(model, variables, jnp.asarray(prompts, jnp.int32), NEW, prompt_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(got.tokens), want)
    assert np.asarray(got.mask)[:, :mask.shape[1]].tolist() == mask.tolist() and np.asarray(got.completion_mask).all()
    # an EOS that row 0 emits at its 4th new token: that row stops there, padded with 0 after it
    eos = int(want[0, mask.shape[1] + 3])
    want = hf_generate(eos_token_id=eos)
    got = rollout(model, variables, jnp.asarray(prompts, jnp.int32), NEW, prompt_mask=jnp.asarray(mask), eos_id=eos,
                  pad_id=0)
    tokens = np.asarray(got.tokens)
    np.testing.assert_array_equal(tokens[:, :want.shape[1]], want)
    assert (tokens[:, want.shape[1]:] == 0).all()
    completion = np.asarray(got.completion_mask)
    first_eos = np.argmax(tokens[0, mask.shape[1]:] == eos)
    assert completion[0, :first_eos + 1].all() and not completion[0, first_eos + 1:].any()


def _tiny_llama(vocab=V):
    model = Llama(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    return model, model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))


def test_cache_logprobs_equal_the_full_forward_and_one_compile():
    """Greedy log-probabilities from the cached decode equal those of one full forward over
    the generated sequence (its padding masked, its positions counted per row); a second call
    with other prompts of the same shapes reuses the compiled program."""
    model, variables = _tiny_llama()
    prompts, mask = _prompts()
    g = rollout(model, variables, jnp.asarray(prompts, jnp.int32), NEW, prompt_mask=jnp.asarray(mask))
    positions = jnp.maximum(jnp.cumsum(g.mask, axis=1) - 1, 0)
    logits = model.apply(variables, g.tokens, mask=g.mask, position_ids=positions)
    logp = jax.nn.log_softmax(logits, axis=-1)[:, mask.shape[1] - 1:-1]
    want = jnp.take_along_axis(logp, g.tokens[:, mask.shape[1]:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(g.logprobs, want, atol=2e-6)
    before = _generate._cache_size()
    generate(model, variables, jnp.asarray(prompts[::-1], jnp.int32), NEW, prompt_mask=jnp.asarray(mask[::-1]))
    assert _generate._cache_size() == before


def test_sampling_is_reproducible_from_the_key():
    model, variables = _tiny_llama()
    prompts = jnp.asarray(_prompts()[0][:, -1:], jnp.int32)
    a = generate(model, variables, prompts, NEW, rng=jax.random.PRNGKey(5), temperature=2.0)
    b = generate(model, variables, prompts, NEW, rng=jax.random.PRNGKey(5), temperature=2.0)
    c = generate(model, variables, prompts, NEW, rng=jax.random.PRNGKey(6), temperature=2.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # temperature 0 is greedy, whatever the key
    np.testing.assert_array_equal(generate(model, variables, prompts, NEW, rng=jax.random.PRNGKey(5), temperature=0),
                                  generate(model, variables, prompts, NEW))


@pytest.mark.parametrize("options", [dict(temperature=0.7), dict(temperature=1.5, top_k=3),
                                     dict(temperature=1.0, top_p=0.8), dict(temperature=0.9, top_k=4, top_p=0.7)])
def test_samples_follow_the_intended_distribution(options):
    """20,000 first tokens drawn from one prompt against softmax(filtered logits / T): a
    chi-square test at false-alarm rate 1e-3 on the kept tokens; filtered tokens never
    drawn. The same test fails for a wrong temperature (checked for the first case)."""
    from scipy import stats

    vocab, n = 6, 20_000
    model = Llama(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    variables = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 2), jnp.int32))
    variables = jax.tree_util.tree_map(lambda a: a * 3, variables)  # spread the logits (0.45 to 0.03)
    prompt = jnp.asarray([[1, 2]], jnp.int32)
    logits = np.asarray(model.apply(variables, prompt)[0, -1], np.float64)
    tokens = generate(model, variables, jnp.broadcast_to(prompt, (n, 2)), 1, rng=jax.random.PRNGKey(7), **options)
    counts = np.bincount(np.asarray(tokens[:, -1]), minlength=vocab)

    def intended(temperature, top_k=None, top_p=None):
        x = logits / temperature
        order = np.argsort(-x)
        keep = np.zeros(vocab, bool)
        keep[order[:top_k or vocab]] = True
        p = np.where(keep, np.exp(x - x.max()), 0.0)
        p /= p.sum()
        if top_p is not None:
            ranked = p[order]
            above = np.cumsum(ranked) - ranked
            keep &= ~np.isin(np.arange(vocab), order[1:][above[1:] >= top_p])
            p = np.where(keep, p, 0.0) / np.where(keep, p, 0.0).sum()
        return p

    def p_value(p):
        kept = p > 0
        return stats.chisquare(counts[kept], n * p[kept]).pvalue

    p = intended(**options)
    assert (counts[p == 0] == 0).all() and (p > 0).sum() >= 2
    assert p_value(p) > 1e-3, (counts, n * p)
    if options == dict(temperature=0.7):
        assert p_value(intended(1.0)) < 1e-3  # the test has power against a wrong temperature


def test_bad_input_is_one_line():
    model, variables = _tiny_llama()
    prompts, mask = _prompts()
    p, m = jnp.asarray(prompts, jnp.int32), jnp.asarray(mask)
    for kwargs, words in [
        (dict(prompt_mask=m[:, ::-1]), "expected left-padded prompts"),
        (dict(prompt_mask=m[:, :3]), "prompt_mask: expected the prompts' shape"),
        (dict(rng=jax.random.PRNGKey(0), temperature=-1.0), "temperature: expected a number >= 0 (0: greedy)"),
        (dict(rng=jax.random.PRNGKey(0), top_p=1.5), "top_p: expected a number in (0, 1]"),
        (dict(eos_id=V), f"eos_id: expected a token id in [0, {V})"),
    ]:
        with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            generate(model, variables, p, NEW, **kwargs)
    with pytest.raises(InputTypeError, match="prompts: expected integer"):
        generate(model, variables, p.astype(jnp.float32), NEW)
    with pytest.raises(InputError, match="max_new_tokens"):
        generate(model, variables, p, 0)
    with pytest.raises(InputError, match="expected a decoder with init_cache"):
        generate(StudentMLP(4, 3), {}, p, NEW)
    gpt = TransformerLM(V, 1, 16, 2, 10)
    with pytest.raises(InputError, match="exceed the model's context of 10 positions"):
        generate(gpt, gpt.init(jax.random.PRNGKey(0), p), p, 4)
    short = model.clone(max_position_embeddings=10)
    with pytest.raises(InputError, match="prompts of 7 tokens \\+ 8 new exceed the model's context of 10"):
        generate(short, variables, p, NEW)
