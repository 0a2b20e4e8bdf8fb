"""A GPT-2 style language model (flax.linen) with Hugging Face GPT-2's parameter names.

``TransformerLM`` is GPT-2's architecture: token + learned position embeddings,
``num_layers`` pre-LayerNorm blocks (causal multi-head self-attention, then a GELU MLP
of width 4 * d_model, each added to the residual stream), a final LayerNorm, and an
output head tied to the token embedding (``logits = h @ wte.T``) unless
``tie_embeddings=False``. Dropout sits where GPT-2 puts it: after the embeddings, on
the attention probabilities, and after each block's output projections.

Names and layouts follow ``transformers``' ``GPT2LMHeadModel`` so that
``kdjax.convert.torch_to_variables`` maps its ``state_dict`` by name: modules
``transformer/{wte, wpe, h/<i>/{ln_1, attn/{c_attn, c_proj}, ln_2, mlp/{c_fc, c_proj}},
ln_f}`` and ``lm_head`` when untied. GPT-2's linear layers are ``Conv1D`` modules whose
``weight`` is stored ``[in, out]`` (not ``nn.Linear``'s ``[out, in]``); kdjax's
``Conv1D`` keeps that layout and that name, so no transpose happens on conversion.

Semantics matched to GPT-2: GELU with the tanh approximation (``gelu_new``), LayerNorm
with epsilon 1e-5 and the two-pass variance, attention scores scaled by
1/sqrt(head_dim) and masked with the dtype's most negative finite value (as
``transformers`` does), position ids ``0..length-1``, and GPT-2's init (normal(0, 0.02)
weights and embeddings, the output projections scaled by 1/sqrt(2 * num_layers), zero
biases).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError

__all__ = ["TransformerLM", "Conv1D", "check_tokens"]


def check_tokens(tokens, vocab_size: int, max_len: int | None = None, where: str = "tokens") -> None:
    """Host-side check of token ids (inside ``jit`` the embedding lookup would clamp an
    out-of-range id silently, so data is checked before it gets there).

    Args:
      tokens: ``[batch, length]`` integer ids (a tracer: only shape and dtype are checked).
      vocab_size: ids must lie in ``[0, vocab_size)``.
      max_len: the longest allowed length, or None.
      where: the name the error messages give the tokens.

    Raises:
      InputError: a wrong shape, a length above ``max_len`` or an id out of range.
      InputTypeError: ids that are not integers.
    """
    shape, dtype = np.shape(tokens), np.asarray(tokens).dtype if not hasattr(tokens, "dtype") else tokens.dtype
    if len(shape) != 2:
        raise InputError(f"{where}: expected token ids of shape [batch, length], got shape {tuple(shape)}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise InputTypeError(f"{where}: expected integer token ids, got dtype {dtype}")
    if max_len is not None and shape[1] > max_len:
        raise InputError(f"{where}: expected sequences of at most max_len = {max_len} tokens, got {shape[1]}")
    if isinstance(tokens, jax.core.Tracer) or 0 in shape:
        return
    t = np.asarray(tokens)
    if t.min() < 0 or t.max() >= vocab_size:
        raise InputError(f"{where}: expected token ids in [0, {vocab_size}) (vocab_size), got ids from "
                         f"{t.min()} to {t.max()}")


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``y = x @ weight + bias`` with ``weight`` stored ``[in, out]``."""

    features: int
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.normal(self.std), (x.shape[-1], self.features), self.dtype)
        b = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        return x @ w + b.reshape((1,) * (x.ndim - 1) + b.shape)


def _layer_norm(dtype, name: str | None = None):
    # GPT-2: eps 1e-5; the two-pass variance (Flax's default fast variance rounds differently)
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype, param_dtype=dtype, name=name)


class _Part(nn.Module):  # the fields every piece of a block needs
    num_heads: int
    num_layers: int
    dropout_rate: float
    dtype: jnp.dtype


class _Attention(_Part):
    @nn.compact
    def __call__(self, x, mask, train: bool, cache=None, index=None):
        b, n, d = x.shape
        hd = d // self.num_heads
        q, k, v = jnp.split(Conv1D(3 * d, dtype=self.dtype, name="c_attn")(x), 3, axis=-1)
        heads = lambda t: t.reshape(b, n, self.num_heads, hd).transpose(0, 2, 1, 3)  # [b, heads, n, hd]
        q, k, v = heads(q), heads(k), heads(v)
        if cache is not None:  # decoding: write k, v at slots index.. of the cache, attend to all of it
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, 0, index, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, 0, index, 0))
            cache = (k, v)
        scores = q @ k.transpose(0, 1, 3, 2) / jnp.asarray(math.sqrt(hd), x.dtype)
        scores = jnp.where(mask, scores, jnp.finfo(x.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        # the tap "transformer.h.<i>.attn:attention_probs" (kdjax.features.capture); kept only
        # when the "intermediates" collection is mutable, so a plain apply is unchanged
        self.sow("intermediates", "attention_probs", probs)
        probs = nn.Dropout(self.dropout_rate, deterministic=not train)(probs)
        out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        out = Conv1D(d, std=0.02 / math.sqrt(2 * self.num_layers), dtype=self.dtype, name="c_proj")(out)
        out = nn.Dropout(self.dropout_rate, deterministic=not train)(out)
        return out if cache is None else (out, cache)


class _MLP(_Part):
    @nn.compact
    def __call__(self, x, train: bool):
        d = x.shape[-1]
        h = jax.nn.gelu(Conv1D(4 * d, dtype=self.dtype, name="c_fc")(x), approximate=True)
        h = Conv1D(d, std=0.02 / math.sqrt(2 * self.num_layers), dtype=self.dtype, name="c_proj")(h)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(h)


class _Block(_Part):
    @nn.compact
    def __call__(self, x, mask, train: bool, cache=None, index=None):
        a = _Attention(self.num_heads, self.num_layers, self.dropout_rate, self.dtype, name="attn")(
            _layer_norm(self.dtype, "ln_1")(x), mask, train, cache, index)
        a, cache = (a, None) if cache is None else a
        x = x + a
        x = x + _MLP(self.num_heads, self.num_layers, self.dropout_rate, self.dtype, name="mlp")(
            _layer_norm(self.dtype, "ln_2")(x), train)
        return x if cache is None else (x, cache)


class _Blocks(nn.Module):  # "h": children "0", "1", ... as in the PyTorch ModuleList
    num_layers: int
    num_heads: int
    dropout_rate: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask, train: bool, cache=None, index=None):
        new = []
        for i in range(self.num_layers):
            block = _Block(self.num_heads, self.num_layers, self.dropout_rate, self.dtype, name=str(i))
            if cache is None:
                x = block(x, mask, train)
            else:
                x, kv = block(x, mask, train, cache[i], index)
                new.append(kv)
        return x if cache is None else (x, tuple(new))


class _Transformer(nn.Module):
    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    max_len: int
    dropout_rate: float
    dtype: jnp.dtype

    def setup(self):
        init = nn.initializers.normal(0.02)
        self.wte = nn.Embed(self.vocab_size, self.d_model, embedding_init=init, dtype=self.dtype,
                            param_dtype=self.dtype)
        self.wpe = nn.Embed(self.max_len, self.d_model, embedding_init=init, dtype=self.dtype,
                            param_dtype=self.dtype)
        self.drop = nn.Dropout(self.dropout_rate)
        self.h = _Blocks(self.num_layers, self.num_heads, self.dropout_rate, self.dtype)
        self.ln_f = _layer_norm(self.dtype)

    def __call__(self, tokens, mask, train: bool, position_ids=None, cache=None, index=None):
        n = tokens.shape[1]
        positions = jnp.arange(n)[None] if position_ids is None else position_ids
        x = self.wte(tokens) + self.wpe(positions)
        x = self.drop(x, deterministic=not train)
        if cache is None:
            return self.ln_f(self.h(x, mask, train))
        h, cache = self.h(x, mask, train, cache, index)
        return self.ln_f(h), cache

    def tied_logits(self, h):
        return self.wte.attend(h)


class TransformerLM(nn.Module):
    """GPT-2: ``model.apply(variables, tokens, train=False, mask=None)`` -> logits
    ``[batch, length, vocab_size]``.

    ``tokens``: int ``[batch, length]``, length <= ``max_len``. ``mask``: optional bool
    ``[batch, length]``, True at real tokens: no position attends to a padded one (the
    logits *at* padded positions are meaningless; leave them out of the loss with
    ``where=``). Dropout (``dropout_rate``, GPT-2's 0.1 for training) is active only
    with ``train=True`` and ``rngs={"dropout": key}``.
    """

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    max_len: int
    dropout_rate: float = 0.0
    tie_embeddings: bool = True
    dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_gpt2_config(cls, config, **overrides) -> "TransformerLM":
        """The model a Hugging Face ``GPT2Config`` (or its ``to_dict()``) describes.

        A ``state_dict`` cannot tell the number of heads (the shapes are the same for
        any count), so build the model from the checkpoint's config rather than by hand.

        Args:
          config: a ``GPT2Config`` or its dict.
          **overrides: fields replacing the config's (``dtype=jnp.float64``, say).

        Returns:
          The ``TransformerLM``.

        Raises:
          InputError: what ``TransformerLM`` does not implement (another activation or
            LayerNorm epsilon, unscaled attention), or a config without the keys it needs.
        """
        c = config if isinstance(config, dict) else config.to_dict()
        need = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
        bad = {k: c[k] for k, v in need.items() if k in c and c[k] != v}
        if bad:
            raise InputError(f"GPT-2 config: expected {{{', '.join(f'{k}: {need[k]!r}' for k in bad)}}} "
                             f"(what TransformerLM implements), got {bad}")
        try:
            kw = dict(vocab_size=c["vocab_size"], num_layers=c["n_layer"], d_model=c["n_embd"],
                      num_heads=c["n_head"], max_len=c["n_positions"],
                      tie_embeddings=c.get("tie_word_embeddings", True))
        except KeyError as e:
            raise InputError(f"GPT-2 config: expected keys vocab_size, n_layer, n_embd, n_head, n_positions; "
                             f"missing {e}") from None
        return cls(**(kw | overrides))

    def output_layer(self, params) -> tuple:
        """The head applied to the hidden states ``apply(..., hidden_states=True)`` returns.

        Args:
          params: this model's params.

        Returns:
          ``(kernel [d_model, vocab], bias or None)`` (the transposed embedding when tied).
        """
        if self.tie_embeddings:
            return params["transformer"]["wte"]["embedding"].T, None
        return params["lm_head"]["kernel"], None

    @property
    def tied_weights(self) -> dict:
        """The ties of its ``state_dict`` (``kdjax.convert``'s ``tied=``): the head is the
        token embedding unless ``tie_embeddings=False``."""
        return {"lm_head.weight": "transformer.wte.weight"} if self.tie_embeddings else {}

    def _check(self):
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "max_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(f"TransformerLM {name}: expected a positive int, got {v!r}")
        if self.d_model % self.num_heads:
            raise InputError(f"TransformerLM: expected d_model divisible by num_heads, got d_model = "
                             f"{self.d_model} and num_heads = {self.num_heads}")
        if not 0 <= self.dropout_rate < 1:
            raise InputError(f"TransformerLM dropout_rate: expected a number in [0, 1), got {self.dropout_rate}")

    def init_cache(self, batch: int, length: int) -> tuple:
        """An empty key/value cache for ``apply(..., cache=)``.

        Args:
          batch: rows.
          length: slots.

        Returns:
          Per layer ``(keys, values)``, each zeros ``[batch, heads, length, d_model / heads]``.
        """
        shape = (batch, self.num_heads, length, self.d_model // self.num_heads)
        return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(self.num_layers))

    @nn.compact
    def __call__(self, tokens, train: bool = False, mask=None, hidden_states: bool = False, position_ids=None,
                 cache=None, cache_index=None):
        """``position_ids``: ``[batch, length]`` (default ``0..length-1``). With ``cache``
        (``init_cache``) the tokens are decoded into it at slots ``cache_index, ...``,
        attending causally by slot; ``mask`` is then over the cache's slots and the result
        is ``(logits or hidden states, new cache)``."""
        self._check()
        check_tokens(tokens, self.vocab_size, None if cache is not None else self.max_len)
        b, n = tokens.shape
        if cache is None:
            allowed = jnp.tril(jnp.ones((n, n), bool))[None, None]  # [1, 1, query, key]
            keys = n
        else:
            if cache_index is None:
                raise InputError("cache_index: expected the slot of the first token when decoding with a cache, "
                                 "got None")
            keys = cache[0][0].shape[2]
            if keys > self.max_len:
                raise InputError(f"cache: expected at most max_len = {self.max_len} slots, got {keys}")
            allowed = (jnp.arange(keys)[None, :] <= (cache_index + jnp.arange(n))[:, None])[None, None]
            if position_ids is None:
                position_ids = jnp.broadcast_to(cache_index + jnp.arange(n), (b, n))
        if mask is not None:
            if np.shape(mask) != (b, keys):
                raise InputError(f"mask: expected shape {(b, keys)} (as {'tokens' if cache is None else 'the cache'}), "
                                 f"got {tuple(np.shape(mask))}")
            allowed = allowed & jnp.asarray(mask, bool)[:, None, None, :]
        body = _Transformer(self.vocab_size, self.num_layers, self.d_model, self.num_heads, self.max_len,
                            self.dropout_rate, self.dtype, name="transformer")
        if cache is None:
            h = body(tokens, allowed, train, position_ids)
        else:
            h, cache = body(tokens, allowed, train, position_ids, cache, cache_index)
            return self._head(body, h, hidden_states), cache
        return self._head(body, h, hidden_states)

    def _head(self, body, h, hidden_states: bool):
        if hidden_states:
            return h
        if self.tie_embeddings:
            return body.tied_logits(h)
        return nn.Dense(self.vocab_size, use_bias=False, kernel_init=nn.initializers.normal(0.02),
                        dtype=self.dtype, param_dtype=self.dtype, name="lm_head")(h)
