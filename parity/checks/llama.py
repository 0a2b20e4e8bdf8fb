"""The Llama family (``kdjax.models.Llama``) against random-init ``transformers`` models:
Llama (with Llama 3's rope scaling), Qwen2 (q/k/v bias, tied head), Qwen3 (q/k norm, a head
size that is not hidden / heads) and Mistral (a sliding window shorter than the sequence),
converted by ``torch_to_variables``; logits with and without a right-padding mask (compared
where the mask is true), the rotary frequencies, and the ``save_hf`` -> ``from_pretrained``
round trip.

``transformers`` computes RMSNorm and the rotary cos/sin in float32 whatever the model's
dtype; the float64 rows patch both to compute in float64 (kdjax computes them in the wider
of float32 and the model's dtype) and give the rotary embedding the float64 frequencies
``kdjax.models.llama.rope_frequencies`` computes; those frequencies are compared with
``transformers``' own float32 ones in a separate row, and the float32 rows use
``transformers`` unpatched.
"""

from __future__ import annotations

import contextlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch

from kdjax import convert
from kdjax.models.llama import Llama, rope_frequencies
from parity.checks.common import TOL, Ctx, Result, compare

VOCAB, LEN = 61, 10
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def _families():
    import transformers as T

    return {"Llama (llama3 rope)": (T.LlamaForCausalLM, T.LlamaConfig(**BASE, rope_parameters=LLAMA3)),
            "Qwen2 (qkv bias, tied head)": (T.Qwen2ForCausalLM, T.Qwen2Config(**BASE, tie_word_embeddings=True)),
            "Qwen3 (q/k norm, head_dim 16)": (T.Qwen3ForCausalLM, T.Qwen3Config(**BASE, head_dim=16)),
            "Mistral (sliding window 3)": (T.MistralForCausalLM, T.MistralConfig(**BASE, sliding_window=3))}


@contextlib.contextmanager
def _hf_in_float64(module):
    """RMSNorm and rotary cos/sin of ``module`` computed in float64 (see the module doc)."""
    norms = {type(m) for m in module.modules() if type(m).__name__.endswith("RMSNorm")}

    def norm_forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(torch.float64)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    rotary = module.model.rotary_emb
    saved = [(c, c.forward) for c in norms] + [(type(rotary), type(rotary).forward)]
    old_freq = rotary.inv_freq
    cfg = module.config
    rope = cfg.rope_parameters
    scaling = None if rope["rope_type"] == "default" else (
        rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"])
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    try:
        for c in norms:
            c.forward = norm_forward
        type(rotary).forward = rope_forward
        rotary.inv_freq = torch.from_numpy(rope_frequencies(head, rope["rope_theta"], scaling, jnp.float64))
        yield
    finally:
        for c, f in saved:
            c.forward = f
        rotary.inv_freq = old_freq


def _tokens():
    rng = np.random.default_rng(7)
    x = rng.integers(0, VOCAB, (3, LEN))
    mask = np.arange(LEN)[None] < np.array([[LEN], [6], [3]])
    return x, mask


def check_llama_hf(ctx: Ctx) -> list[Result]:
    try:
        families = _families()
    except Exception as e:  # transformers absent or broken: skipped rows with the reason
        tol = TOL[ctx.dtype]["logits"]
        return [Result("llama family (transformers)", ctx.dtype, float("nan"), float("nan"), tol[0], tol[1], False,
                       f"transformers not importable ({type(e).__name__})", skipped=True)]
    x, mask = _tokens()
    out = []
    for name, (cls, cfg) in families.items():
        torch.manual_seed(0)
        hf = cls(cfg).eval().to(ctx.tdtype)
        model = Llama.from_hf_config(cfg, dtype=ctx.jdtype)
        like = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, LEN), jnp.int32))
        v = jax.tree_util.tree_map(jnp.asarray, convert.torch_to_variables(hf.state_dict(), like,
                                                                           tied=model.tied_weights))
        apply = jax.jit(lambda v, x, m=None: model.apply(v, x, mask=m))
        patch = _hf_in_float64(hf) if ctx.dtype == "float64" else contextlib.nullcontext()
        with patch, torch.no_grad():
            plain = hf(torch.from_numpy(x)).logits
            masked = hf(torch.from_numpy(x), attention_mask=torch.from_numpy(mask.astype(np.int64))).logits
        note = "transformers' norm and rope in float64" if ctx.dtype == "float64" else ""
        out.append(compare(f"{name}: logits", ctx, apply(v, jnp.asarray(x)), plain, TOL[ctx.dtype]["logits"], note))
        got = np.asarray(apply(v, jnp.asarray(x), jnp.asarray(mask)))[mask]
        out.append(compare(f"{name}: logits, padding mask", ctx, got, masked.cpu().numpy()[mask],
                           TOL[ctx.dtype]["logits"], note))
        if ctx.dtype == "float32":
            rotary = hf.model.rotary_emb
            rope = cfg.rope_parameters
            scaling = None if rope["rope_type"] == "default" else (
                rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                rope["original_max_position_embeddings"])
            ours = rope_frequencies(model.head_size, rope["rope_theta"], scaling, jnp.float64)
            out.append(compare(f"{name}: rotary frequencies vs transformers' float32 ones", ctx, ours,
                               rotary.inv_freq.double(), (0.0, 1e-6)))
            out.append(_round_trip(name, ctx, model, v, cls, x))
    return out


def _round_trip(name, ctx, model, v, cls, x) -> Result:
    """``save_hf`` then ``transformers``' ``from_pretrained``: the same logits."""
    with tempfile.TemporaryDirectory() as d:
        convert.save_hf(model, v, d + "/student")
        back = cls.from_pretrained(d + "/student").eval()
        with torch.no_grad():
            want = back(torch.from_numpy(x)).logits
        loaded_model, loaded = convert.load_hf(d + "/student")
    got = jax.jit(lambda v, x: model.apply(v, x))(v, jnp.asarray(x))
    same = loaded_model == model and all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(v),
                                                                               jax.tree_util.tree_leaves(loaded)))
    r = compare(f"{name}: save_hf -> from_pretrained logits; load_hf exact", ctx, got, want, TOL["float32"]["logits"])
    if not same:
        r.passed, r.note = False, "load_hf did not give back the same model and variables"
    return r
