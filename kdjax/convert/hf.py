"""Hugging Face checkpoint folders <-> kdjax decoders: ``load_hf``, ``save_hf``, ``hf_files``.

A folder holds ``config.json`` and safetensors weights (one file or shards with an index);
the weights map by name through ``kdjax.convert.torch_to_variables`` / ``variables_to_torch``.
Every name here is importable from ``kdjax.convert`` as well.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Mapping

import numpy as np

from kdjax.convert import _leaves, torch_to_variables, variables_to_torch
from kdjax.errors import InputError, InputTypeError

HF_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                    "GPT2LMHeadModel")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "mistral": "MistralForCausalLM", "gpt2": "GPT2LMHeadModel"}
# the integer fields of each family: (name, required)
_LLAMA_INTS = (("vocab_size", True), ("hidden_size", True), ("intermediate_size", True),
               ("num_hidden_layers", True), ("num_attention_heads", True), ("num_key_value_heads", False),
               ("head_dim", False), ("max_position_embeddings", False))
_GPT2_INTS = (("vocab_size", True), ("n_layer", True), ("n_embd", True), ("n_head", True), ("n_positions", True))
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
# the files save_hf writes (and, with overwrite=True, replaces or removes as stale)
_HF_OWN = ("config.json", "model.safetensors", "model.safetensors.index.json")
_TEMP = ".tmp-save_hf-"  # save_hf's temporary files, renamed into place
_HF_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _got(v) -> str:
    return f"{v!r} ({type(v).__name__})"


def _hf_architecture(config, where: str) -> str:
    """The architecture a ``config.json`` dict names, after checking every field kdjax reads
    (one ``InputError`` naming the first bad field, before any model is built)."""
    if not isinstance(config, Mapping):
        raise InputError(f"{where}: expected a JSON object, got a JSON {type(config).__name__}")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
        raise InputError(f"{where}: architectures: expected a list of names such as ['LlamaForCausalLM'], got "
                         f"{_got(archs)}")
    model_type = config.get("model_type")
    arch = archs[0] if archs else _MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if arch not in HF_ARCHITECTURES:
        got = archs[0] if archs else model_type
        raise InputError(f"{where}: architecture {got!r} is not supported (expected one of "
                         f"{', '.join(HF_ARCHITECTURES)}, or a model_type among {', '.join(_MODEL_TYPES)})")
    for name, required in _GPT2_INTS if arch == "GPT2LMHeadModel" else _LLAMA_INTS:
        v = config.get(name)
        if v is None and not required:
            continue
        if not _is_int(v) or v < 1:
            raise InputError(f"{where}: {name}: expected an int >= 1, got "
                             f"{'nothing (the key is missing)' if name not in config else _got(v)}")
    for name in _BOOLS:
        if config.get(name) is not None and not isinstance(config[name], bool):
            raise InputError(f"{where}: {name}: expected true or false, got {_got(config[name])}")
    if arch == "GPT2LMHeadModel":
        if config["n_embd"] % config["n_head"]:
            raise InputError(f"{where}: n_head: expected a divisor of n_embd ({config['n_embd']}), got "
                             f"{config['n_head']}")
        return arch
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv:
        raise InputError(f"{where}: num_key_value_heads: expected a divisor of num_attention_heads ({heads}), got {kv}")
    if config.get("head_dim") is None and config["hidden_size"] % heads:
        raise InputError(f"{where}: num_attention_heads: expected a divisor of hidden_size ({config['hidden_size']}) "
                         f"when there is no head_dim, got {heads}")
    for name in ("rms_norm_eps", "rope_theta"):
        v = config.get(name)
        if v is not None and not (_is_number(v) and v > 0):
            raise InputError(f"{where}: {name}: expected a finite number > 0, got {_got(v)}")
    for name in ("rope_parameters", "rope_scaling"):
        rope = config.get(name)
        if rope is None:
            continue
        if not isinstance(rope, Mapping):
            raise InputError(f"{where}: {name}: expected an object or null, got {_got(rope)}")
        if rope.get("rope_type", rope.get("type")) == "llama3":
            for key in ("factor", "low_freq_factor", "high_freq_factor"):
                if not (_is_number(rope.get(key)) and rope[key] > 0):
                    raise InputError(f"{where}: {name}.{key}: expected a finite number > 0 (llama3 scaling), got "
                                     f"{_got(rope.get(key))}")
        if rope.get("rope_theta") is not None and not (_is_number(rope["rope_theta"]) and rope["rope_theta"] > 0):
            raise InputError(f"{where}: {name}.rope_theta: expected a finite number > 0, got {_got(rope['rope_theta'])}")
    window = config.get("sliding_window")
    if window is not None and window is not False and not (_is_int(window) and window >= 1):
        raise InputError(f"{where}: sliding_window: expected an int >= 1 or null, got {_got(window)}")
    types = config.get("layer_types")
    if types is not None and not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
        raise InputError(f"{where}: layer_types: expected a list of strings, got {_got(types)}")
    return arch


def _hf_model(config: dict, dtype, where: str = "config.json"):
    from kdjax.models import Llama, TransformerLM

    arch = _hf_architecture(config, where)
    if arch == "GPT2LMHeadModel":
        return TransformerLM.from_gpt2_config(config, dtype=dtype)
    if not config.get("architectures"):
        config = {**config, "architectures": [arch]}
    return Llama.from_hf_config(config, dtype=dtype)


def _gpt2_config(model) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": model.vocab_size,
            "n_layer": model.num_layers, "n_embd": model.d_model, "n_head": model.num_heads,
            "n_positions": model.max_len, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": model.tie_embeddings, "resid_pdrop": model.dropout_rate,
            "embd_pdrop": model.dropout_rate, "attn_pdrop": model.dropout_rate}


def _weight_files(path: str) -> list:
    """The safetensors files of a checkpoint folder: those ``model.safetensors.index.json``
    lists (plain names inside the folder), else ``model.safetensors``."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        return ["model.safetensors"]
    where = os.path.join(path, "model.safetensors.index.json")
    try:
        with open(index) as f:
            weight_map = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{where}: expected a readable JSON index ({type(e).__name__}: {e})") from None
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{where}: weight_map: expected an object of tensor names to file names, got "
                         f"{_got(weight_map)}")
    files = sorted(set(weight_map.values()), key=str)
    for name in files:
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise InputError(f"{where}: weight_map: expected plain file names inside the folder, got {name!r}")
    return files


def load_hf(directory, *, dtype=None):
    """``(model, variables)`` from a Hugging Face checkpoint directory: ``config.json`` and
    ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``), read
    with ``safetensors`` (no torch). Architectures: ``HF_ARCHITECTURES`` (the Llama family
    as ``kdjax.models.Llama``, GPT-2 as ``TransformerLM``), named by ``architectures`` or,
    without it, by ``model_type``. ``dtype``: the model's (default float32); the weights are
    cast to it.

    Args:
      directory: the checkpoint folder (a path).
      dtype: the model's dtype (default float32).

    Returns:
      ``(model, variables)``.

    Raises:
      InputError: a missing or unreadable file; a ``config.json`` that is not a JSON object,
        names an unsupported architecture, or lacks or mis-types a field kdjax reads (the
        field named: ``vocab_size``, ``hidden_size``, ... must be ints >= 1); an index whose
        file names leave the folder; weights that do not fit the configuration (every key
        named).
      InputTypeError: ``directory`` is not a path.
    """
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    try:
        path = os.fspath(directory)
    except TypeError:
        raise InputTypeError(f"directory: expected a path to a Hugging Face checkpoint folder, got "
                             f"{type(directory).__name__}") from None
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: expected a Hugging Face checkpoint directory with a readable config.json "
                         f"({type(e).__name__}: {e})") from None
    _hf_architecture(config, os.path.join(path, "config.json"))  # every field checked before the weights are read
    files = _weight_files(path)
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise InputError("load_hf: needs the safetensors package (pip install 'kdjax[hf]')") from None

    shapes = {}
    try:
        for name in files:
            with safe_open(os.path.join(path, name), framework="flax") as f:
                shapes |= {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (OSError, ValueError, RuntimeError, TypeError, SafetensorError) as e:
        raise InputError(f"{path}: could not read the weights {files} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    _check_sizes(config, shapes, path)  # before a model of config.json's sizes is built (they may be absurd)
    model = _hf_model(config, dtype, os.path.join(path, "config.json"))
    state = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="flax") as f:
            for key in f.keys():
                state[key] = np.asarray(f.get_tensor(key).astype(dtype))
    like = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1), jnp.int32))
    try:
        return model, torch_to_variables(state, like, tied=model.tied_weights)
    except InputError as e:
        raise InputError(f"{path}: the weights do not fit config.json: {e}") from None


def _check_sizes(config: dict, shapes: dict, path: str) -> None:
    """The layer count and the embedding's shape of the weights against ``config.json``: a
    config whose sizes disagree with its weights is refused from the headers alone."""
    gpt2 = "transformer.wte.weight" in shapes
    layers_key, embed_key = ("transformer.h", "transformer.wte.weight") if gpt2 else ("model.layers",
                                                                                    "model.embed_tokens.weight")
    n_layers = config.get("n_layer" if gpt2 else "num_hidden_layers")
    width = config.get("n_embd" if gpt2 else "hidden_size")
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(layers_key) + r"\.(\d+)\.", k))}
    if found and len(found) != n_layers:
        raise InputError(f"{path}: the weights do not fit config.json: they hold {len(found)} layers, config.json "
                         f"says {n_layers}")
    want = (config.get("vocab_size"), width)
    if embed_key in shapes and shapes[embed_key] != want:
        raise InputError(f"{path}: the weights do not fit config.json: {embed_key}: expected shape {want} (its "
                         f"vocab_size and {'n_embd' if gpt2 else 'hidden_size'}), got {shapes[embed_key]}")


def hf_files(directory) -> list:
    """The files of ``directory`` that ``save_hf`` counts as its own: the ones it writes
    (``config.json``, ``model.safetensors``) and the ones it removes as stale when it
    replaces a checkpoint (``model.safetensors.index.json`` and shards named
    ``model-NNNNN-of-NNNNN.safetensors``). ``save_hf`` refuses a folder holding any of them
    unless ``overwrite=True``, and never touches any other file.

    Args:
      directory: a folder (it may not exist: then ``[]``).

    Returns:
      Sorted absolute paths of those files that exist.
    """
    path = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n in _HF_OWN or _HF_SHARD.fullmatch(n))


def _check_variables(model, variables) -> None:
    """``InputError`` naming the first path where ``variables`` differ from ``model.init``'s
    tree (a missing, unexpected or mis-shaped leaf), computed with ``jax.eval_shape``."""
    import jax
    import jax.numpy as jnp

    if not isinstance(variables, Mapping):
        raise InputTypeError(f"variables: expected a Flax variables dict {{'params': ...}}, got "
                             f"{type(variables).__name__}")
    like = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1), jnp.int32))
    want = {"/".join(p): tuple(np.shape(v)) for p, v in _leaves(like).items()}
    got = {"/".join(p): tuple(np.shape(v)) for p, v in _leaves(variables).items()}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        raise InputError(f"variables: expected the {type(model).__name__}'s variables, got none at {missing[0]} "
                         f"({len(missing)} missing)")
    if unexpected:
        raise InputError(f"variables: expected the {type(model).__name__}'s variables, got an unexpected "
                         f"{unexpected[0]} ({len(unexpected)} unexpected)")
    for name in sorted(want):
        if got[name] != want[name]:
            raise InputError(f"variables: {name}: expected shape {want[name]} (the model's), got {got[name]}")


def save_hf(model, variables, directory, *, overwrite: bool = False) -> list:
    """Write ``config.json`` and ``model.safetensors`` so that ``transformers``'
    ``AutoModelForCausalLM.from_pretrained(directory)`` builds ``model`` with these weights
    (a tied head is written once, as ``transformers`` does).

    The variables are checked against ``model`` first (nothing is written for variables of
    another model). ``directory`` may exist: a folder holding none of ``hf_files``' names
    is written into; one holding any is refused unless ``overwrite``, which replaces
    ``config.json`` and ``model.safetensors`` and removes a stale index and shards of
    ``save_hf``'s naming (``hf_files``); every other file in the folder is left as it was.
    Each file is written to a temporary file in the folder and renamed into place, so a
    crash leaves each file old or new, never half written. On many processes every process
    calls it: sharded arrays are gathered (``parallel.to_host``) and process 0 writes.

    Args:
      model: a kdjax ``Llama``-family model or ``TransformerLM``.
      variables: its Flax variables (``{"params": ...}``).
      directory: the folder to write (created if missing).
      overwrite: replace kdjax's own files of an earlier ``save_hf`` there.

    Returns:
      The absolute paths written (``[<dir>/config.json, <dir>/model.safetensors]``).

    Raises:
      InputError: variables that do not fit ``model`` (the first differing path named), a
        ``directory`` that is a file, or one holding ``hf_files`` without ``overwrite``.
      InputTypeError: ``model`` is not one of kdjax's decoders.
    """
    import jax

    from kdjax import parallel
    from kdjax.models import Llama, TransformerLM

    try:
        import safetensors.numpy  # noqa: F401
    except ImportError:
        raise InputError("save_hf: needs the safetensors package (pip install 'kdjax[hf]')") from None

    if isinstance(model, Llama):
        config = model.hf_config()
    elif isinstance(model, TransformerLM):
        config = _gpt2_config(model)
    else:
        raise InputTypeError(f"save_hf: expected a kdjax Llama-family model or TransformerLM, got "
                             f"{type(model).__name__}")
    _check_variables(model, variables)
    path = os.path.abspath(os.fspath(directory))
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"save_hf: {path}: expected a folder, got a file")
    own = hf_files(path)
    if own and not overwrite:
        raise InputError(f"save_hf: {path} exists; pass overwrite=True to replace its "
                         f"{', '.join(os.path.basename(f) for f in own)} (no other file is touched)")
    tensors = {k: np.ascontiguousarray(v) for k, v in
               variables_to_torch(jax.tree_util.tree_map(parallel.to_host, variables)).items()}
    parallel.barrier("kdjax-save-hf-checked")  # every process has checked the folder before it changes
    written = [os.path.join(path, "model.safetensors"), os.path.join(path, "config.json")]
    if jax.process_index() == 0:
        _write_hf_files(path, own, tensors, config)
    parallel.barrier("kdjax-save-hf-written")
    return sorted(written)


def _write_hf_files(path: str, own: list, tensors: dict, config: dict) -> None:
    from safetensors.numpy import save_file

    from kdjax.checkpoint import _fsync_dir, temp_file

    created = not os.path.exists(path)
    os.makedirs(path, exist_ok=True)
    for stale in os.listdir(path):  # a save_hf a kill interrupted: its own temporary files only
        if stale.startswith(_TEMP):
            os.unlink(os.path.join(path, stale))
    temps = []

    def temp():
        fd, name = temp_file(path, _TEMP)
        os.close(fd)
        temps.append(name)
        return name

    try:
        weights, cfg = temp(), temp()
        save_file(tensors, weights, metadata={"format": "pt"})
        with open(cfg, "w") as f:
            json.dump(config, f, indent=2)
        for name in (weights, cfg):
            with open(name, "rb+") as f:
                os.fsync(f.fileno())
        for name in own:  # a stale index first: readers then take model.safetensors
            if os.path.basename(name) not in ("config.json", "model.safetensors"):
                os.unlink(name)
        os.replace(weights, os.path.join(path, "model.safetensors"))
        os.replace(cfg, os.path.join(path, "config.json"))
        _fsync_dir(path)
    except BaseException:
        for name in temps:
            if os.path.exists(name):
                os.unlink(name)
        if created and not os.listdir(path):
            os.rmdir(path)
        raise
