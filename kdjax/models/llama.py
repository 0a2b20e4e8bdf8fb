"""The Llama family of decoders (Llama 2 and 3, Qwen2/2.5, Qwen3, Mistral) with Hugging Face's
parameter names, so ``kdjax.convert.torch_to_variables`` maps their ``state_dict`` one to one.

Blocks ``x + attn(rms_norm(x))``, then ``x + mlp(rms_norm(x))``: grouped-query attention, rotary
embeddings (Llama 3's scaling optional), optional q/k/v and o biases (Qwen2), per-head q/k
RMSNorm (Qwen3), sliding windows (Mistral; Qwen's ``layer_types``), a SwiGLU MLP. RMSNorm,
softmax and the rotary cos/sin in at least float32, as ``transformers`` (float64 stays float64)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError

__all__ = ["Llama", "ARCHITECTURES"]

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
_MODEL_TYPES = dict(zip(("llama", "qwen2", "qwen3", "mistral"), ARCHITECTURES))  # config.json's model_type


def _wide(dtype):
    return jnp.promote_types(dtype, jnp.float32)


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``, the normalisation in at least float32."""

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        h = x.astype(_wide(x.dtype))
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return w.reshape((1,) * (x.ndim - 1) + (-1,)) * h.astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: tuple | None, dtype) -> np.ndarray:
    """Rotary inverse frequencies ``1 / theta^(2i / head_dim)``, as ``transformers``.

    Args:
      head_dim: even, at least 2; theta: the base; dtype: float64, else float32; scaling: None or Llama
        3's ``(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)``.
    Returns: NumPy ``[head_dim // 2]``.
    Raises: InputError: ``head_dim`` odd or below 2.
    """
    if head_dim < 2 or head_dim % 2:
        raise InputError(f"Llama: expected an even head dimension of at least 2 (rotary embeddings rotate pairs; "
                         f"hidden_size / num_heads), got {head_dim}")
    np_dtype = np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32
    inv = 1.0 / (np.asarray(theta, np_dtype) ** (np.arange(0, head_dim, 2).astype(np_dtype) / head_dim))
    if scaling is None:
        return inv
    factor, low, high, old = scaling
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np_dtype)


def _repeat_kv(x, group: int):
    """``[b, kv heads, n, d]`` -> ``[b, kv heads * group, n, d]``, each head ``group`` times in a row."""
    return jnp.repeat(x, group, axis=1)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@dataclasses.dataclass(frozen=True)
class _Cfg:  # the Llama's fields, passed to its submodules (a Module field would be adopted as a child)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_windows: tuple | None
    dtype: Any


class Attention(nn.Module):
    cfg: _Cfg
    window: int | None

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, index=None):
        c = self.cfg
        b, n, _ = x.shape
        hd, h, kvh = c.head_size, c.num_heads, c.num_kv_heads
        dense = lambda features, bias, name: nn.Dense(features, use_bias=bias, dtype=c.dtype, param_dtype=c.dtype,
                                                      kernel_init=nn.initializers.normal(0.02), name=name)
        q = dense(h * hd, c.qkv_bias, "q_proj")(x).reshape(b, n, h, hd)
        k = dense(kvh * hd, c.qkv_bias, "k_proj")(x).reshape(b, n, kvh, hd)
        v = dense(kvh * hd, c.qkv_bias, "v_proj")(x).reshape(b, n, kvh, hd)
        if c.qk_norm:  # Qwen3: RMSNorm of every head, before the rotation
            q = RMSNorm(c.rms_norm_eps, c.dtype, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, c.dtype, name="k_norm")(k)
        q, k = (t.transpose(0, 2, 1, 3) for t in (q, k))  # [b, heads, n, hd]
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        v = v.transpose(0, 2, 1, 3)
        i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]  # the queries' and keys' slots
        if cache is not None:  # decoding: write k, v at slots index.. of the cache, attend to all of it
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, 0, index, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, 0, index, 0))
            cache = (k, v)
            i, j = index + i, jnp.arange(k.shape[2])[None, :]
        group = h // kvh  # query head i reads key/value head i // group
        k, v = _repeat_kv(k, group), _repeat_kv(v, group)
        scores = (q @ k.transpose(0, 1, 3, 2)) * jnp.asarray(hd ** -0.5, q.dtype)
        allowed = mask
        if self.window is not None:  # Mistral: key j visible from query i when i - j < window
            allowed = allowed & (i - j < self.window)[None, None]
        wide = _wide(scores.dtype)
        scores = jnp.where(allowed, scores.astype(wide), jnp.finfo(wide).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        self.sow("intermediates", "attention_probs", probs)
        out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, h * hd)
        out = dense(c.hidden_size, c.o_bias, "o_proj")(out)
        return out if cache is None else (out, cache)


class MLP(nn.Module):
    cfg: _Cfg

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=c.dtype, param_dtype=c.dtype,
                                                kernel_init=nn.initializers.normal(0.02), name=name)
        return dense(c.hidden_size, "down_proj")(nn.silu(dense(c.intermediate_size, "gate_proj")(x))
                                                 * dense(c.intermediate_size, "up_proj")(x))


class DecoderLayer(nn.Module):
    cfg: _Cfg
    window: int | None

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, index=None):
        c = self.cfg
        a = Attention(c, self.window, name="self_attn")(RMSNorm(c.rms_norm_eps, c.dtype, name="input_layernorm")(x),
                                                        cos, sin, mask, cache, index)
        a, cache = (a, None) if cache is None else a
        x = x + a
        x = x + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, c.dtype, name="post_attention_layernorm")(x))
        return x if cache is None else (x, cache)


class _Layers(nn.Module):  # "layers": children "0", "1", ... as the PyTorch ModuleList
    cfg: _Cfg

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, index=None):
        new = []
        for i in range(self.cfg.num_layers):
            layer = DecoderLayer(self.cfg, self.cfg.sliding_windows[i] if self.cfg.sliding_windows else None,
                                 name=str(i))
            if cache is None:
                x = layer(x, cos, sin, mask)
            else:
                x, kv = layer(x, cos, sin, mask, cache[i], index)
                new.append(kv)
        return x if cache is None else (x, tuple(new))


class _Model(nn.Module):  # Hugging Face's "model": embed_tokens, layers, norm
    cfg: _Cfg

    def setup(self):
        c = self.cfg
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.dtype,
                                     embedding_init=nn.initializers.normal(0.02))
        self.layers = _Layers(c)
        self.norm = RMSNorm(c.rms_norm_eps, c.dtype)

    def __call__(self, tokens, cos, sin, mask, cache=None, index=None):
        if cache is None:
            return self.norm(self.layers(self.embed_tokens(tokens), cos, sin, mask))
        h, cache = self.layers(self.embed_tokens(tokens), cos, sin, mask, cache, index)
        return self.norm(h), cache

    def tied_logits(self, h):
        return self.embed_tokens.attend(h)


class Llama(nn.Module):
    """A Llama-family causal LM: ``apply(variables, tokens [batch, length], train=False, mask=None,
    position_ids=None)`` -> logits ``[batch, length, vocab_size]``; ``mask`` bool, false at padding;
    ``position_ids`` default ``0..length-1``. No dropout. ``hidden_states=True``: the final normalised
    hidden states instead (for ``kdjax.fused.linear_distillation_loss``)."""

    vocab_size: int = 32000
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    architecture: str = "LlamaForCausalLM"
    dtype: Any = jnp.float32

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def output_layer(self, params) -> tuple:
        """The head applied to ``hidden_states=True``'s output.

        Args: params: this model's params.
        Returns: ``(kernel [hidden, vocab], None)`` (the transposed token embedding when tied).
        """
        if self.tie_word_embeddings:
            return params["model"]["embed_tokens"]["embedding"].T, None
        return params["lm_head"]["kernel"], None

    @property
    def tied_weights(self) -> dict:
        """The ``state_dict`` copies a tied head lists (``torch_to_variables(tied=...)``)."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.tie_word_embeddings else {}

    def init_cache(self, batch: int, length: int) -> tuple:
        """An empty key/value cache for ``apply(..., cache=)``.

        Args: batch, length: its rows and slots.
        Returns: per layer ``(keys, values)``, each zeros ``[batch, kv heads, length, head dim]``.
        """
        shape = (batch, self.num_kv_heads, length, self.head_size)
        return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(self.num_layers))

    @nn.compact
    def __call__(self, tokens, train: bool = False, mask=None, position_ids=None, hidden_states: bool = False,
                 cache=None, cache_index=None):
        """With ``cache`` (``init_cache``): tokens written at slots ``cache_index, ...``, attending causally
        by slot, ``mask`` ``[batch, cache length]`` (default all true); returns ``(output, new cache)``."""
        if cache is not None:
            return self._decode(tokens, mask, position_ids, hidden_states, cache, cache_index)
        self._check(tokens, mask)
        b, n = tokens.shape
        position_ids = jnp.broadcast_to(jnp.arange(n), (b, n)) if position_ids is None else position_ids
        cos, sin = self._rotary(position_ids)
        allowed = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, :].astype(bool)
        model = _Model(self._cfg(), name="model")
        return self._head(model, model(tokens, cos, sin, allowed), hidden_states)

    def _decode(self, tokens, mask, position_ids, hidden_states, cache, index):
        self._check(tokens, None)
        b, n = tokens.shape
        slots = cache[0][0].shape[2]
        if index is None:
            raise InputError("cache_index: expected the slot of the first token when decoding with a cache, got None")
        mask = jnp.ones((b, slots), bool) if mask is None else mask
        if tuple(mask.shape) != (b, slots):
            raise InputError(f"Llama: expected a mask over the cache's slots {(b, slots)}, got {tuple(mask.shape)}")
        position_ids = jnp.broadcast_to(index + jnp.arange(n), (b, n)) if position_ids is None else position_ids
        cos, sin = self._rotary(position_ids)
        query_slots = index + jnp.arange(n)
        allowed = (jnp.arange(slots)[None, :] <= query_slots[:, None])[None, None] & mask[:, None, None, :].astype(bool)
        model = _Model(self._cfg(), name="model")
        h, cache = model(tokens, cos, sin, allowed, cache, index)
        return self._head(model, h, hidden_states), cache

    def _rotary(self, position_ids):
        inv = jnp.asarray(rope_frequencies(self.head_size, self.rope_theta, self.rope_scaling, _wide(self.dtype)))
        angles = position_ids.astype(inv.dtype)[..., None] * inv[None, None, :]  # [b, n, hd / 2]
        angles = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype)

    def _cfg(self) -> _Cfg:
        return _Cfg(self.vocab_size, self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads,
                    self.num_kv_heads, self.head_size, self.rms_norm_eps, self.qkv_bias, self.o_bias, self.qk_norm,
                    self.sliding_windows, self.dtype)

    def _head(self, model, h, hidden_states: bool):
        if hidden_states:
            return h
        if self.tie_word_embeddings:
            return model.tied_logits(h)
        return nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.dtype,
                        kernel_init=nn.initializers.normal(0.02), name="lm_head")(h)

    def _check(self, tokens, mask):
        if self.num_heads % self.num_kv_heads:
            raise InputError(f"Llama: expected num_heads divisible by num_kv_heads, got {self.num_heads} and "
                             f"{self.num_kv_heads}")
        if self.head_size % 2:
            raise InputError(f"Llama: expected an even head dimension (rotary embeddings rotate pairs), got "
                             f"{self.head_size} (hidden_size {self.hidden_size} / {self.num_heads} heads)")
        if self.sliding_windows is not None and len(self.sliding_windows) != self.num_layers:
            raise InputError(f"Llama: expected one sliding window (or None) per layer ({self.num_layers}), got "
                             f"{len(self.sliding_windows)}")
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise InputError(f"Llama: expected integer tokens [batch, length], got {tokens.dtype}{list(tokens.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(tokens.shape):
            raise InputError(f"Llama: expected a mask shaped as the tokens {tuple(tokens.shape)}, got "
                             f"{tuple(mask.shape)}")

    @classmethod
    def from_hf_config(cls, config, **overrides) -> "Llama":
        """The model of a ``transformers`` config.

        Args:
          config: a ``LlamaConfig``/``Qwen2Config``/``Qwen3Config``/``MistralConfig`` or its dict.
          **overrides: fields replacing the config's (``dtype=jnp.float64``, say).
        Returns: the ``Llama``.
        Raises: InputError: another architecture or rope type, or an MLP other than silu without bias.
        """
        c = dict(config if isinstance(config, Mapping) else config.to_dict())
        arch = (c.get("architectures") or [None])[0] or _MODEL_TYPES.get(c.get("model_type"))
        if arch not in ARCHITECTURES:
            raise InputError(f"config: expected one of the architectures {ARCHITECTURES}, got "
                             f"{arch or c.get('model_type')!r}")
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise InputError(f"config: rope_type {rope_type!r} is not supported (expected 'default' or 'llama3')")
        scaling = None if rope_type == "default" else (
            float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
            float(rope.get("original_max_position_embeddings", c.get("max_position_embeddings", 2048))))
        layers = int(c["num_hidden_layers"])
        windows = None
        if arch == "MistralForCausalLM" and c.get("sliding_window"):
            windows = (int(c["sliding_window"]),) * layers
        elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and c.get("sliding_window") and (
                c.get("use_sliding_window") or "sliding_attention" in (c.get("layer_types") or ())):
            types = c.get("layer_types") or ["sliding_attention"] * layers
            windows = tuple(int(c["sliding_window"]) if t == "sliding_attention" else None for t in types)
        bias = bool(c.get("attention_bias", False))
        fields = dict(
            vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]), num_layers=layers,
            num_heads=int(c["num_attention_heads"]),
            num_kv_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
            head_dim=None if c.get("head_dim") in (None, int(c["hidden_size"]) // int(c["num_attention_heads"]))
            else int(c["head_dim"]), rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            rope_scaling=scaling, qkv_bias=True if arch == "Qwen2ForCausalLM" else bias,
            o_bias=bias if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") else False,
            qk_norm=arch == "Qwen3ForCausalLM", sliding_windows=windows,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)), architecture=arch)
        if c.get("hidden_act", "silu") != "silu" or c.get("mlp_bias", False):
            raise InputError(f"config: expected hidden_act 'silu' without an MLP bias, got {c.get('hidden_act')!r}, "
                             f"mlp_bias={c.get('mlp_bias')}")
        return cls(**(fields | overrides))

    def hf_config(self) -> dict:
        """Returns: the ``config.json`` dict ``transformers`` builds this model from."""
        model_type = {a: t for t, a in _MODEL_TYPES.items()}[self.architecture]
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            f, low, high, old = self.rope_scaling
            rope |= {"rope_type": "llama3", "factor": f, "low_freq_factor": low, "high_freq_factor": high,
                     "original_max_position_embeddings": int(old)}
        out = {"architectures": [self.architecture], "model_type": model_type, "vocab_size": self.vocab_size,
               "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
               "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
               "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_size, "rms_norm_eps": self.rms_norm_eps,
               "rope_parameters": rope, "rope_theta": self.rope_theta, "hidden_act": "silu",
               "max_position_embeddings": self.max_position_embeddings,
               "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": str(jnp.dtype(self.dtype))}
        if self.architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
            out["attention_bias"] = self.o_bias
        windows = [w for w in (self.sliding_windows or ()) if w is not None]
        if windows:
            out["sliding_window"] = windows[0]
            if self.architecture != "MistralForCausalLM":
                out["use_sliding_window"] = True
                out["layer_types"] = ["sliding_attention" if w else "full_attention" for w in self.sliding_windows]
        elif self.architecture == "MistralForCausalLM":
            out["sliding_window"] = None
        return out
