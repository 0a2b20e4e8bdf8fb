"""Compiled text generation for kdjax's decoders (``TransformerLM``, ``Llama``): a prefill of
the prompts into a key/value cache, then a ``lax.scan`` of one-token decode steps — one XLA
program per (model, shapes, options), reproducible from a key.

* ``generate(model, variables, prompts, max_new_tokens, rng=None, temperature=1.0,
  top_k=None, top_p=None, eos_id=None, pad_id=None, prompt_mask=None)`` -> int32 tokens
  ``[batch, prompt + max_new_tokens]`` (the prompts included).
* ``rollout(...)``, the same arguments -> ``Generation`` (``tokens``, ``mask``,
  ``logprobs``): what on-policy training needs.
* ``sample_logits(logits, key, temperature, top_k, top_p)``: one draw per row and its
  log-probability under the distribution it was drawn from.

Prompts of different lengths are **left-padded** (``prompt_mask`` false before each row's
first real token), as ``transformers`` generates a batch: padded keys are never attended
to and each row's positions count its real tokens only, so a row's output does not depend
on the padding (tested against ``transformers``' ``generate(do_sample=False)``). After a
row emits ``eos_id`` it is filled with ``pad_id``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError, check_count

__all__ = ["Generation", "generate", "rollout", "sample_logits"]


class Generation(NamedTuple):
    """What ``rollout`` returns (a pytree). ``tokens``: ``[batch, prompt + new]`` int32, the
    prompts then the completions (``pad_id`` after a row's EOS). ``mask``: the same shape,
    true at the prompts' real tokens and at every completion token up to and including EOS.
    ``logprobs``: ``[batch, new]``, each completion token's log-probability under the
    distribution it was drawn from (after temperature, top-k and top-p; greedy: the model's
    softmax), 0 after EOS."""

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array

    @property
    def completion_mask(self):
        """``mask``'s completion part, ``[batch, new]``."""
        return self.mask[:, self.mask.shape[1] - self.logprobs.shape[1]:]


def _filtered(logits, temperature, top_k, top_p):
    """``logits / temperature`` with everything outside the top k and the top-p nucleus at
    -inf (``transformers``' order: temperature, top-k, top-p; at least one token kept)."""
    wide = jnp.promote_types(logits.dtype, jnp.float32)
    x = logits.astype(wide) / jnp.asarray(temperature, wide)
    low = jnp.asarray(-jnp.inf, wide)
    if top_k is not None:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x < kth, low, x)
    if top_p is not None:
        order = jnp.argsort(-x, axis=-1)
        ranked = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        above = jnp.cumsum(probs, axis=-1) - probs  # the mass ranked strictly above each token
        drop_ranked = (above >= jnp.asarray(top_p, wide)).at[..., 0].set(False)
        drop = jnp.take_along_axis(drop_ranked, jnp.argsort(order, axis=-1), axis=-1)
        x = jnp.where(drop, low, x)
    return x


def _concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _check_key(name: str, key) -> None:
    """A PRNG key: a new-style key array (``jax.random.key(n)``) or a raw uint32 one
    (``jax.random.PRNGKey(n)``); refuses an int, which jax would take for something else."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return
    if dtype is not None and dtype == jnp.uint32 and np.ndim(key) == 1:
        return
    got = f"{key!r} ({type(key).__name__})" if dtype is None else f"an array {dtype}{list(np.shape(key))}"
    raise InputTypeError(f"{name}: expected a PRNG key (pass jax.random.PRNGKey(n) or jax.random.key(n)), got {got}")


def _check_sampling(temperature, top_k, top_p, vocab) -> None:
    """Range checks of the sampling options (``temperature``, ``top_p``: when concrete)."""
    from kdjax.losses import _concrete_scalar

    t = _concrete_scalar("temperature", temperature)
    if t is not None and not (np.isfinite(t) and t >= 0):
        raise InputError(f"temperature: expected a number >= 0 (0: greedy) and finite, got {t}")
    if top_k is not None:
        check_count("top_k", top_k)
        if vocab is not None and top_k > vocab:
            raise InputError(f"top_k: expected an int in [1, {vocab}] (the vocabulary), got {top_k}")
    p = None if top_p is None else _concrete_scalar("top_p", top_p)
    if p is not None and not 0 < p <= 1:
        raise InputError(f"top_p: expected a number in (0, 1], got {p}")


def sample_logits(logits, key, temperature=1.0, top_k: int | None = None, top_p=None):
    """``(tokens, logprobs)``: one token per row of ``logits`` ``[..., vocab]`` drawn from
    ``softmax(filtered logits)`` (``key`` None: the argmax, with its log-softmax), and its
    log-probability under that distribution.

    Args:
      logits: ``[..., vocab]`` floating array.
      key: a PRNG key (``jax.random.PRNGKey(n)`` or ``jax.random.key(n)``), or None (greedy).
      temperature: a finite number > 0 (a key is given) or >= 0.
      top_k: None or an int in ``[1, vocab]``.
      top_p: None or a number in ``(0, 1]``.

    Returns:
      ``(tokens [...] int32, logprobs [...])``.

    Raises:
      InputError / InputTypeError: logits that are not floating ``[..., vocab]``, a key that
        is not a PRNG key (an int), ``top_k`` outside ``[1, vocab]``; ``temperature`` not
        finite or (with a key) not > 0 and ``top_p`` outside ``(0, 1]`` when they are
        concrete (under ``jit`` traced values are not checked).
    """
    if not hasattr(logits, "dtype") or np.ndim(logits) < 1 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise InputTypeError(f"logits: expected a floating array [..., vocab], got "
                             f"{getattr(logits, 'dtype', type(logits).__name__)}{list(np.shape(logits))}")
    _check_sampling(temperature, top_k, top_p, logits.shape[-1])
    if key is None:
        tokens = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    else:
        _check_key("key", key)
        if _concrete(temperature) and float(temperature) == 0:
            raise InputError("temperature: expected a number > 0 to sample with a key (0 is greedy: pass key=None)")
        x = _filtered(logits, temperature, top_k, top_p)
        tokens = jax.random.categorical(key, x, axis=-1)
        logp = jax.nn.log_softmax(x, axis=-1)
    return tokens.astype(jnp.int32), jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("model", "new", "top_k", "eos_id", "pad_id", "greedy"))
def _generate(model, variables, prompts, prompt_mask, key, temperature, top_p, *, new, top_k, eos_id, pad_id,
              greedy):
    b, p = prompts.shape
    keys_mask = jnp.concatenate([prompt_mask, jnp.ones((b, new), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    logits, cache = model.apply(variables, prompts, mask=keys_mask, position_ids=positions,
                                cache=model.init_cache(b, p + new), cache_index=0)
    real = jnp.sum(prompt_mask, axis=1)

    def step(carry, t):
        last, cache, done = carry
        token, logp = sample_logits(last, None if greedy else jax.random.fold_in(key, t), temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token)
        live = ~done
        if eos_id is not None:
            done = done | (token == eos_id)
        logits, cache = model.apply(variables, token[:, None], mask=keys_mask, position_ids=(real + t)[:, None],
                                    cache=cache, cache_index=p + t)
        return (logits[:, -1], cache, done), (token, jnp.where(live, logp, 0.0), live)

    init = (logits[:, -1], cache, jnp.zeros((b,), bool))
    _, (tokens, logprobs, live) = jax.lax.scan(step, init, jnp.arange(new))
    return Generation(jnp.concatenate([prompts.astype(jnp.int32), tokens.T], axis=1),
                      jnp.concatenate([prompt_mask, live.T], axis=1), logprobs.T)


def _check_prompts(prompts, prompt_mask, vocab):
    if not hasattr(prompts, "shape") or len(np.shape(prompts)) != 2:
        raise InputError(f"prompts: expected token ids [batch, length], got shape {np.shape(prompts)}")
    if not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise InputTypeError(f"prompts: expected integer token ids, got {prompts.dtype}")
    if 0 in prompts.shape:
        raise InputError(f"prompts: expected at least one prompt of at least one token, got shape "
                         f"{tuple(prompts.shape)}")
    if _concrete(prompts) and vocab is not None:
        ids = np.asarray(prompts)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise InputError(f"prompts: expected token ids in [0, {vocab}) (the model's vocabulary), got ids in "
                             f"[{lo}, {hi}]")
    if prompt_mask is None:
        return jnp.ones(prompts.shape, bool)
    if tuple(np.shape(prompt_mask)) != tuple(prompts.shape):
        raise InputError(f"prompt_mask: expected the prompts' shape {tuple(prompts.shape)}, got "
                         f"{tuple(np.shape(prompt_mask))}")
    dtype = prompt_mask.dtype if hasattr(prompt_mask, "dtype") else np.asarray(prompt_mask).dtype
    if dtype != bool:
        raise InputTypeError(f"prompt_mask: expected bool, got {dtype}")
    if _concrete(prompt_mask):
        m = np.asarray(prompt_mask)
        if not m[:, -1].all() or (np.diff(m.astype(np.int8), axis=1) < 0).any():
            raise InputError("prompt_mask: expected left-padded prompts (padding first, then the real tokens, "
                             "the last one real in every row)")
    return jnp.asarray(prompt_mask, bool)


def generate(model, variables, prompts, max_new_tokens: int, *, rng=None, temperature=1.0, top_k: int | None = None,
             top_p=None, eos_id: int | None = None, pad_id: int | None = None, prompt_mask=None):
    """Continue ``prompts`` ``[batch, length]`` by ``max_new_tokens`` tokens: int32 tokens
    ``[batch, length + max_new_tokens]``, the prompts included.

    Greedy (the argmax) when ``rng`` is None or ``temperature`` is 0; otherwise each token
    is drawn from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely
    tokens and then to the smallest set whose probability reaches ``top_p`` (the order of
    ``transformers``' warpers), with key ``fold_in(rng, t)`` at step t: the same key gives
    the same tokens. ``prompt_mask`` (bool, true at real tokens) describes left-padded
    prompts. A row that emits ``eos_id`` continues with ``pad_id`` (default ``eos_id``,
    else 0). The model needs ``init_cache`` and ``apply(..., cache=, cache_index=)``
    (kdjax's ``TransformerLM`` and ``Llama``). Works under ``jit`` and ``vmap`` (the
    ``variables`` and keys may be traced); compiled once per shapes and static options.
    ``rollout`` returns the completion mask and the tokens' log-probabilities too.

    Args:
      model: a decoder with ``init_cache`` (kdjax's ``TransformerLM`` or ``Llama``).
      variables: its Flax variables.
      prompts: int ``[batch, length]`` token ids in ``[0, vocab)``, batch and length >= 1.
      max_new_tokens: an int >= 1; ``length + max_new_tokens`` at most the model's context
        (``max_len`` / ``max_position_embeddings``).
      rng: None (greedy) or a PRNG key (``jax.random.PRNGKey(n)`` or ``jax.random.key(n)``;
        an int is refused).
      temperature: a finite number >= 0.
      top_k: None or an int in ``[1, vocab]``.
      top_p: None or a number in ``(0, 1]``.
      eos_id, pad_id: None or token ids in ``[0, vocab)``.
      prompt_mask: None or bool ``[batch, length]``, left-padded.

    Returns:
      int32 ``[batch, length + max_new_tokens]``.

    Raises:
      InputError / InputTypeError: naming the argument, for each rule above. The token ids,
        ``prompt_mask``'s padding order, ``temperature`` and ``top_p`` are checked when they
        are concrete; under ``jit`` traced values are not (an id outside the vocabulary then
        reads a NaN embedding).
    """
    return rollout(model, variables, prompts, max_new_tokens, rng=rng, temperature=temperature, top_k=top_k,
                   top_p=top_p, eos_id=eos_id, pad_id=pad_id, prompt_mask=prompt_mask).tokens


def rollout(model, variables, prompts, max_new_tokens: int, *, rng=None, temperature=1.0, top_k: int | None = None,
            top_p=None, eos_id: int | None = None, pad_id: int | None = None, prompt_mask=None) -> Generation:
    """``generate`` with what on-policy training needs: a ``Generation`` of the tokens, the
    mask of real tokens (prompts' real tokens, completions up to and including EOS) and each
    completion token's log-probability under the distribution it was drawn from.

    Args:
      model, variables, prompts, max_new_tokens, rng, temperature, top_k, top_p, eos_id, pad_id,
        prompt_mask: as ``generate`` (and so are the Raises).

    Returns:
      A ``Generation``.
    """
    check_count("max_new_tokens", max_new_tokens)
    if not (hasattr(model, "init_cache") and hasattr(model, "apply")):
        raise InputError(f"model: expected a decoder with init_cache and a key/value cache (kdjax's TransformerLM "
                         f"or Llama), got {type(model).__name__}")
    vocab = getattr(model, "vocab_size", None)
    prompt_mask = _check_prompts(prompts, prompt_mask, vocab)
    limit = getattr(model, "max_len", None) or getattr(model, "max_position_embeddings", None)
    if limit is not None and prompts.shape[1] + max_new_tokens > limit:
        raise InputError(f"max_new_tokens: prompts of {prompts.shape[1]} tokens + {max_new_tokens} new exceed the "
                         f"model's context of {limit} positions")
    _check_sampling(temperature, top_k, top_p, vocab)
    if rng is not None:
        _check_key("rng", rng)
    greedy = rng is None or (_concrete(temperature) and float(temperature) == 0)
    for name, v in (("eos_id", eos_id), ("pad_id", pad_id)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))
                              or v < 0 or (vocab is not None and v >= vocab)):
            raise InputError(f"{name}: expected a token id in [0, {vocab}), got {v!r}")
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    key = jax.random.PRNGKey(0) if greedy else rng
    return _generate(model, variables, prompts, prompt_mask, key, 1.0 if greedy else temperature, top_p,
                     new=int(max_new_tokens), top_k=top_k, eos_id=eos_id, pad_id=int(pad_id), greedy=greedy)
