"""Objectives that compose: hard cross-entropy, logit KD and any number of feature terms.

.. math:: L = w_\\mathrm{ce}\\,\\mathrm{CE}(s, y) + w_\\mathrm{kd}\\, D(s, t)
          + \\sum_k w_k\\, \\ell_k\\big(c_k(f^S_k), f^T_k\\big)

with ``D`` the logit divergence (``"kl"``: :math:`T^2\\,\\overline{\\mathrm{KL}}`, mdistiller's
``kd_loss``; ``"dkd"``: mdistiller's ``dkd_loss`` with its warm-up), each feature term a loss
``ℓ_k`` on a tap pair (``kdjax.features.taps``) and an optional trained connector ``c_k``. The
train step computes each tap once per step and returns every weighted term in ``metrics["terms"]``.

Connector and CRD parameters live in the student's ``TrainState``: ``params["connectors"]`` and
``model_state["connectors"]`` (BatchNorm statistics, CRD's memory bank), which the student's own
model ignores and ``student_variables`` strips for export.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError
from kdjax.features import crd as crd_lib
from kdjax.features import losses as L
from kdjax.features.connectors import check_mapped, connector_for
from kdjax.features.taps import capture
from kdjax.losses import DIVERGENCES, check_temperature, divergence_per_position, dkd, hard_ce, masked_mean
from kdjax.objectives import CONNECTORS, Teacher, apply_model, as_variables, own_variables, raw_key

__all__ = ["Term", "Objective", "objective", "LOSSES", "CONNECTORS", "student_variables", "init_connectors"]

LOSSES: dict[str, Callable] = {
    "hint": L.hint, "at": L.attention_transfer, "sp": L.similarity_preserving, "rkd": L.rkd, "pkt": L.pkt,
    "mse": L.mse, "mae": L.mae, "cosine": L.cosine_similarity, "pooled_cosine": L.pooled_cosine, "crd": crd_lib.crd_loss,
}
_MASKED = ("hint", "mse", "mae", "cosine", "pooled_cosine")  # losses that take a token mask (where=)
_CONNECTED = ("hint",)  # losses whose terms get a connector unless told otherwise (FitNet's regressor)
_CRD_DEFAULTS = {"feat_dim": 128, "negatives": 16384, "temperature": 0.07, "momentum": 0.5}  # mdistiller's cfg.py


def _options(value) -> tuple:
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class Term:
    """One feature term: ``weight * loss(connector(student tap), teacher tap, **options)``.

    ``loss``: a name in ``LOSSES`` or a callable ``f(s, t) -> scalar``; ``connector``: None (the
    loss's default: FitNet's ``hint`` gets one), True or False; ``options``: extra arguments of the
    loss (``{"p": 2}`` for ``at``; for ``crd``: ``feat_dim``, ``negatives``, ``temperature``,
    ``momentum``, defaults mdistiller's). With a padding mask (``batch["where"]``, ``[batch,
    length]``) the loss gets ``where=`` (masked means over tokens; see ``takes_mask``).
    """

    loss: Any
    teacher: str
    student: str
    weight: float = 1.0
    connector: bool | None = None
    options: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "options", _options(self.options))
        if isinstance(self.loss, str) and self.loss not in LOSSES:
            raise InputError(f"term loss: expected one of {sorted(LOSSES)} or a callable f(s, t), got {self.loss!r}")
        if not (isinstance(self.loss, str) or callable(self.loss)):
            raise InputError(f"term loss: expected a name or a callable f(s, t), got {type(self.loss).__name__}")
        for name in ("teacher", "student"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InputError(f"term {name}: expected a tap name (e.g. 'layer2' or 'fc:input'), got "
                                 f"{getattr(self, name)!r}")
        _check_weight(f"term {self.key} weight", self.weight)
        if self.loss == "crd":
            unknown = sorted(set(dict(self.options)) - set(_CRD_DEFAULTS))
            if unknown:
                raise InputError(f"crd options: expected some of {sorted(_CRD_DEFAULTS)}, got {unknown}")

    @property
    def key(self) -> str:
        """The term's name in metrics and in the connectors' subtree: ``"at:layer2"``."""
        name = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "custom")
        return f"{name}:{self.student}"

    @property
    def takes_mask(self) -> bool:
        """Whether the loss takes a token mask: the element-wise built-ins, or a callable with a
        ``where`` parameter."""
        if isinstance(self.loss, str):
            return self.loss in _MASKED
        try:
            return "where" in inspect.signature(self.loss).parameters
        except (TypeError, ValueError):
            return False

    @property
    def connected(self) -> bool:
        return self.loss in _CONNECTED if self.connector is None else bool(self.connector)

    def crd_options(self) -> dict:
        return _CRD_DEFAULTS | dict(self.options)


def _check_weight(name: str, w) -> None:
    if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer)) or not math.isfinite(w) or w < 0:
        raise InputError(f"{name}: expected a finite number >= 0, got {w!r}")


@dataclasses.dataclass(frozen=True)
class Objective:
    """A weighted sum of hard CE, logit KD and feature terms (see the module docstring).

    ``kd``: the weight of the logit term, ``temperature`` its T, ``divergence`` one of ``"kl"``,
    ``"reverse_kl"``, ``"jsd"`` (each times T², as ``distillation_loss``) or ``"dkd"`` (mdistiller's
    ``dkd_loss`` with ``dkd_alpha``/``dkd_beta``, T² inside, scaled by ``min((step + 1) /
    warmup_steps, 1)``; mdistiller's is per epoch). Hashable: part of the compiled program's identity.
    """

    ce: float = 1.0
    kd: float = 0.0
    temperature: float = 4.0
    divergence: str = "kl"
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    warmup_steps: int = 0
    terms: tuple = ()

    def __post_init__(self):
        terms = tuple(t if isinstance(t, Term) else Term(*t) for t in self.terms)
        object.__setattr__(self, "terms", terms)
        _check_weight("ce", self.ce)
        _check_weight("kd", self.kd)
        check_temperature(self.temperature)
        if self.divergence not in DIVERGENCES + ("dkd",):
            raise InputError(f"divergence: expected one of {DIVERGENCES + ('dkd',)}, got {self.divergence!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise InputError(f"warmup_steps: expected an int >= 0, got {self.warmup_steps!r}")
        keys = [t.key for t in terms]
        if len(set(keys)) != len(keys):
            raise InputError(f"terms: expected one term per (loss, student tap), got {keys}")
        if self.ce == 0 and self.kd == 0 and not terms:
            raise InputError("objective: expected at least one non-zero part (ce, kd or a term), got none")

    @property
    def student_taps(self) -> list[str]:
        return sorted({t.student for t in self.terms})

    @property
    def teacher_taps(self) -> list[str]:
        return sorted({t.teacher for t in self.terms})

    @property
    def needs_index(self) -> bool:
        """CRD's memory bank needs each example's row (``batch["index"]``)."""
        return any(t.loss == "crd" for t in self.terms)

    def describe(self) -> str:
        parts = [f"{self.ce:g} CE"] if self.ce else []
        if self.kd:
            parts.append(f"{self.kd:g} {self.divergence.upper()} (T {self.temperature:g})")
        parts += [f"{t.weight:g} {t.key}" + (f"<-{t.teacher}" if t.teacher != t.student else "")
                  + (" (connector)" if t.connected else "") for t in self.terms]
        return " + ".join(parts)

    needs_step = True  # DKD's warm-up reads batch["step"]

    def check(self, batch, *, hyper, teacher):
        """Trace-time checks (see kdjax.objectives, the protocol).

        Args: batch: the minibatch; hyper: must be None (the objective holds its weights); teacher: unused.
        Raises: InputError: a ``hyper``, or a padding mask (``batch["where"]``) with a term whose loss takes none.
        """
        if hyper is not None:
            raise InputError("hyper: a kdjax.features.Objective holds its own weights and temperature; expected "
                             "hyper=None, got a Hyper")
        unmasked = [t.key for t in self.terms if not t.takes_mask]
        if batch.get("where") is not None and unmasked:
            raise InputError(f"objective: with a padding mask (batch['where']) expected feature terms whose loss takes "
                             f"one ({', '.join(_MASKED)} or a callable with a where parameter), got {unmasked}")

    def loss(self, student, params, model_state, batch, *, rng, hyper, teacher):
        """The weighted sum for one batch (see kdjax.objectives, the protocol).

        Args:
          student, params, model_state: the student and its variables, the connectors' subtrees in.
          batch: ``"x"``, ``"y"``, ``"step"``; optionally ``"where"``, cached teacher outputs, CRD's ``"index"``.
          rng: the dropout key (and CRD's); hyper: None; teacher: None or a ``Teacher``.
        Returns: ``(loss, (new_model_state, metrics))``, ``metrics`` every weighted term.
        Raises: InputError: no teacher outputs, cached or online; CRD without ``"index"``.
        """
        model, step = student, batch.get("step", 0)
        s_params, s_state, c_params, c_state = _split(params, model_state)
        taps = self.student_taps
        x = batch["x"]
        rngs = {"dropout": rng}
        if taps:
            (logits, new_s_state), s_feats = capture(model, {"params": s_params, **s_state}, x, taps, train=True,
                                                     rngs=rngs)
        else:
            logits, new_s_state = apply_model(model, s_params, s_state, x, train=True, rng=rng)
        t_logits, t_feats = self._teacher_outputs(batch, teacher)
        where = batch.get("where")  # token-level: only these positions count (CE, the logit term, feature terms)
        metrics, total = {}, 0.0
        if self.ce:
            metrics["ce"] = self.ce * masked_mean(hard_ce(logits, batch["y"], where=where), where)
        if self.kd:
            if self.divergence == "dkd":
                ramp = 1.0 if self.warmup_steps == 0 else jnp.minimum((step + 1) / self.warmup_steps, 1.0)
                value = ramp * masked_mean(dkd(logits, t_logits, batch["y"], self.temperature, self.dkd_alpha,
                                               self.dkd_beta, where=where), where)
            else:
                value = self.temperature ** 2 * masked_mean(
                    divergence_per_position(logits, t_logits, self.temperature, self.divergence), where)
            metrics["kd"] = self.kd * value
        new_c_state = dict(c_state)
        for i, term in enumerate(self.terms):
            s, t = s_feats[term.student], t_feats[term.teacher]
            key = term.key
            if term.loss == "crd":
                value, new_c_state[key] = self._crd(term, s, t, c_params[key], c_state[key], batch,
                                                    jax.random.fold_in(rng, 1 + i))
            else:
                if term.connected:
                    s, new_c_state[key] = _connect(s, t, c_params[key], c_state.get(key, {}), key)
                fn = LOSSES[term.loss] if isinstance(term.loss, str) else term.loss
                masked = {} if where is None else {"where": where}  # the token mask over the features' positions
                value = fn(s, t, **dict(term.options), **masked)
            metrics[key] = term.weight * value
        for v in metrics.values():
            total = total + v
        new_state = dict(new_s_state)
        new_c_state = {k: v for k, v in new_c_state.items() if v}
        if new_c_state:
            new_state[CONNECTORS] = new_c_state
        return total, (new_state, metrics)

    def _teacher_outputs(self, batch, teacher: Teacher | None):
        taps = self.teacher_taps
        cached = batch.get("teacher_features")
        if (not taps or cached is not None) and (not self.kd or "teacher_logits" in batch):
            missing = sorted(set(taps) - set(cached or {}))
            if missing:
                raise InputError(f"batch['teacher_features']: expected the teacher taps {taps}, missing {missing}")
            return batch.get("teacher_logits"), dict(cached or {})
        if teacher is None:
            raise InputError("objective: expected cached teacher outputs (batch['teacher_features'], "
                             "batch['teacher_logits']) or a bound teacher and teacher_params, got neither")
        if taps:
            t_logits, feats = capture(teacher.model, teacher.variables, batch["x"], taps, train=False)
        else:
            t_logits, feats = teacher.model.apply(teacher.variables, batch["x"], train=False), {}
        feats = jax.tree_util.tree_map(jax.lax.stop_gradient, feats)
        return jax.lax.stop_gradient(t_logits), feats

    def _crd(self, term, s, t, params, state, batch, key):
        if "index" not in batch:
            raise InputError("crd: expected batch['index'] (each example's row in the training set, for the "
                             "memory bank), got none; fit/distill add it, a custom loop passes data['index']")
        o = term.crd_options()
        embed = crd_lib.Embed(o["feat_dim"], dtype=s.dtype)
        f_s = embed.apply({"params": params["embed_s"]}, s)
        f_t = embed.apply({"params": params["embed_t"]}, t)
        rows = batch["index"].astype(jnp.int32)
        negatives = crd_lib.sample_negatives(key, batch["y"], state["classes"], o["negatives"])
        contrast = jnp.concatenate([rows[:, None], negatives.astype(jnp.int32)], axis=1)
        value, memory = crd_lib.crd_loss(f_s, f_t, rows, contrast, state["memory"], temperature=o["temperature"],
                                         momentum=o["momentum"])
        return value, {"memory": memory, "classes": state["classes"]}

    def init(self, rng, student, params, model_state, *, teacher: Teacher, example, labels=None):
        """The objective protocol's ``init`` hook: ``(params, model_state)`` with this objective's
        connectors (and CRD heads and memory bank) added under ``"connectors"``.

        Args:
          rng: a JAX key, raw ``uint32[2]`` words or an int; labels: every training label (CRD's).
          student, params, model_state: the student and its variables (those unchanged).
          teacher, example: the ``Teacher``; an input batch or ``ShapeDtypeStruct`` (the taps' shapes).
        Raises:
          InputError: the student has a module named ``"connectors"``; CRD without ``labels``.
        """
        if CONNECTORS in params or CONNECTORS in model_state:
            raise InputError(f"student: its variables already have a '{CONNECTORS}' entry, the name kdjax keeps "
                             f"for connectors; rename that module")
        params, model_state = dict(params), dict(model_state)
        if not any(t.connected or t.loss == "crd" for t in self.terms):
            return params, model_state
        s_shapes, t_shapes = self.tap_shapes(student, {"params": params, **model_state}, teacher.model,
                                             teacher.variables, example)
        c_params, c_state = {}, {}
        key = raw_key(rng)
        for i, term in enumerate(self.terms):
            k = jax.random.fold_in(key, i)
            s, t = s_shapes[term.student], t_shapes[term.teacher]
            if term.loss == "crd":
                if labels is None:
                    raise InputError("crd: expected the training labels (labels=) to build its memory bank, got None")
                o = term.crd_options()
                embed = crd_lib.Embed(o["feat_dim"], dtype=s.dtype)
                ks, kt, km = jax.random.split(k, 3)
                c_params[term.key] = {"embed_s": _init_params(embed, ks, s), "embed_t": _init_params(embed, kt, t)}
                n = int(np.asarray(labels).shape[0])
                c_state[term.key] = {"memory": crd_lib.init_memory(km, n, o["feat_dim"], s.dtype),
                                     "classes": jax.device_put(crd_lib.class_index(labels))}
            elif term.connected:
                conn = connector_for(s.shape, t.shape, dtype=s.dtype)
                variables = dict(flax.core.unfreeze(_init_variables(conn, k, s.shape, s.dtype)))
                c_params[term.key] = variables.pop("params")
                if variables:
                    c_state[term.key] = variables
        if c_params:
            params[CONNECTORS] = c_params
        if c_state:
            model_state[CONNECTORS] = c_state
        return params, model_state

    def tap_shapes(self, student, student_variables, teacher, teacher_variables, example):
        """``({student tap: ShapeDtypeStruct}, {teacher tap: ...})``, traced abstractly.

        Args: student, student_variables, teacher, teacher_variables: the modules and their variables
          (any form ``as_variables`` takes); example: an input batch or ``ShapeDtypeStruct``.
        """
        x = jax.ShapeDtypeStruct(tuple(example.shape), example.dtype)
        s = jax.eval_shape(lambda v, x: capture(student, v, x, self.student_taps)[1],
                           as_variables(student_variables), x) if self.student_taps else {}
        t = jax.eval_shape(lambda v, x: capture(teacher, v, x, self.teacher_taps)[1],
                           as_variables(teacher_variables), x) if self.teacher_taps else {}
        return s, t


def _init_params(module, key, struct):
    return _init_variables(module, key, struct.shape, struct.dtype)["params"]


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_variables(module, key, shape, dtype):
    # jitted once per module and shape (modules hash by their fields), not once per student
    return module.init(key, jnp.zeros(shape, dtype), train=False)


def _connect(s, t, params, state, name):
    conn = connector_for(s.shape, t.shape, dtype=s.dtype)
    if state:
        out, new = conn.apply({"params": params, **state}, s, train=True, mutable=list(state))
        new = dict(flax.core.unfreeze(new))
    else:
        out, new = conn.apply({"params": params}, s, train=True), {}
    check_mapped(name, out, t)
    return out, new


def _split(params, model_state):
    params, model_state = dict(params), dict(model_state)
    return params, model_state, params.pop(CONNECTORS, {}), model_state.pop(CONNECTORS, {})


def student_variables(params, model_state=None):
    """``(params, model_state)`` without the connectors' subtrees (to export, convert or evaluate
    elsewhere): ``kdjax.objectives.own_variables``.

    Args: params, model_state: the student's variables with the objective's parts (None: ``{}``).
    """
    return own_variables(params, model_state)


def init_connectors(objective, rng, params, model_state, student, teacher, teacher_variables, example,
                    *, labels=None):
    """``objective.init`` (``Objective.init``'s result) with the teacher as a module and its variables.

    Args: objective: one with an ``init`` hook; teacher, teacher_variables: the module and its params,
      variables or ``TrainState``; rng, params, model_state, student, example, labels: as ``Objective.init``.
    Raises: InputError: as ``Objective.init``.
    """
    return objective.init(rng, student, params, model_state, teacher=Teacher(teacher, as_variables(teacher_variables)),
                          example=example, labels=labels)


def objective(ce: float = 1.0, kd: float = 0.0, terms=(), *, temperature: float = 4.0, divergence: str = "kl",
              **options) -> Objective:
    """``Objective(ce, kd, temperature, divergence, terms=...)``::

        kdjax.features.objective(ce=1.0, terms=[("at", "layer1", "layer1", 1000.0),
                                                ("hint", "layer2", "layer2", 100.0)])

    Args:
      ce, kd, temperature, divergence, options: ``Objective``'s fields (the weights of hard CE and
        the logit term, its T and divergence; ``dkd_alpha``, ``dkd_beta``, ``warmup_steps``).
      terms: each a ``Term`` or ``(loss, teacher tap, student tap, weight[, connector[, options]])``.
    Raises: InputError: what ``Objective`` or ``Term`` refuses (a negative weight, an unknown loss, ...).
    """
    return Objective(ce=ce, kd=kd, temperature=temperature, divergence=divergence, terms=tuple(terms), **options)
