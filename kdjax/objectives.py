"""The objective protocol: what every distillation method implements and the one train step calls.

An objective is any object with::

    loss(self, student, params, model_state, batch, *, rng, hyper, teacher)
        -> (loss, (new_model_state, metrics))

``student`` is the student module (static), ``params``/``model_state`` its variables (what
is differentiated: ``params``), ``batch`` the minibatch (cached teacher outputs ride in it),
``rng`` the step's key, ``hyper`` the call's hyperparameter pytree (traced; ``None`` when the
objective has none) and ``teacher`` ``None`` or a ``Teacher(model, variables)``; ``metrics`` is
a dict of scalars (may be empty). Optional hooks, found by name and never by class:

* ``check(batch, *, hyper, teacher)``: trace-time validation (shapes, keys, a missing teacher);
* ``init(rng, student, params, model_state, *, teacher, example, labels=None)`` ->
  ``(params, model_state)``: the student's variables with the objective's trainable parts
  added (connectors, CRD heads and memory banks);
* ``needs_step = True``: the batch carries ``"step"``, the optimizer step count;
* ``needs_index = True``: the data carry ``"index"``, each example's row;
* ``teacher``: the teacher module, when the objective names its own (no ``teacher=`` bound);
* ``teacher_online = True`` / ``teacher_taps``: what ``kdjax.workflows.distill`` runs or caches.

Built-ins here: ``CE()``, ``KD(divergence=...)``, ``LogitLoss(fn)`` (the version-2 callable
``fn(logits, batch, teacher_logits, hyper)``) and ``TopKKD`` (cached top-k log-probabilities);
``"ce"``, ``"kd"`` and a callable remain shorthands (``as_objective``). Methods with more parts
live in their own modules (``kdjax.features``, ``kdjax.fused``, ``kdjax.onpolicy``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError
from kdjax.losses import (MISSING, SPARSE_LOSSES, check_temperature, check_where, distillation_loss, hard_ce,
                          masked_mean, topk_distillation_loss)

__all__ = ["Teacher", "CE", "KD", "LogitLoss", "TopKKD", "as_objective", "apply_model", "as_variables",
           "own_variables", "teacher_logits", "raw_key", "CONNECTORS", "OBJECTIVES"]

OBJECTIVES = ("ce", "kd")
CONNECTORS = "connectors"  # the subtree of a student's variables that holds an objective's trainable parts


@flax.struct.dataclass
class Teacher:
    """A frozen teacher: its module (static) and its full variables dict (traced)."""

    model: Any = flax.struct.field(pytree_node=False)
    variables: Any


def as_variables(tree) -> dict:
    """A Flax variables dict (``{"params": ..., "batch_stats": ...}``) from any of three forms.

    Args:
      tree: a ``TrainState`` (an objective's ``"connectors"`` left out), a variables dict or
        ``FrozenDict`` (one with ``"params"``), or a bare params tree.

    Returns:
      A dict with ``"params"`` and the other collections (a bare params tree: ``{"params": tree}``).
    """
    if hasattr(tree, "params") and hasattr(tree, "model_state"):
        params, state = own_variables(tree.params, tree.model_state)
        return {"params": params, **state}
    tree = dict(flax.core.unfreeze(tree)) if isinstance(tree, (dict, flax.core.FrozenDict)) else tree
    return tree if isinstance(tree, dict) and "params" in tree else {"params": tree}


def own_variables(params, model_state=None):
    """The student's own variables: the objective's parts (``"connectors"``) removed (what to
    export, convert or evaluate elsewhere).

    Args:
      params: the student's params, possibly with ``"connectors"``.
      model_state: its other collections, or None (``{}``).

    Returns:
      ``(params, model_state)``: new dicts; the arguments are not changed.
    """
    params, model_state = dict(params), dict(model_state or {})
    params.pop(CONNECTORS, None)
    model_state.pop(CONNECTORS, None)
    return params, model_state


def raw_key(rng):
    """Raw ``uint32[2]`` key words.

    Args:
      rng: a typed PRNG key, raw key words (returned as they are) or an int.

    Returns:
      The key words; for an int, ``PRNGKey(int)``'s, as a NumPy array.
    """
    if isinstance(rng, (int, np.integer)):
        return np.array([(int(rng) >> 32) & 0xFFFFFFFF, int(rng) & 0xFFFFFFFF], np.uint32)
    if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return rng


def apply_model(model, params, model_state, x, *, train: bool, rng=None):
    """``(logits, new_model_state)``: ``model.apply`` in train or eval mode.

    Args:
      model: a linen module called as ``apply(variables, x, train=bool, rngs=...)``.
      params, model_state: its parameters and other collections (``{}`` when stateless).
      x: the input batch.
      train: in train mode ``model_state``'s collections are mutable (BatchNorm statistics
        are updated) and ``rng`` seeds dropout.
      rng: the dropout key, or None.

    Returns:
      ``(output, model_state)``: the new state in train mode, the given one in eval mode.

    Raises:
      InputError: the model needs a collection the state lacks (a BatchNorm model given
        ``model_state={}``).
    """
    variables = {"params": params, **model_state}
    rngs = None if rng is None else {"dropout": rng}
    try:
        if train and model_state:
            return model.apply(variables, x, train=True, rngs=rngs, mutable=list(model_state))
        return model.apply(variables, x, train=train, rngs=rngs), model_state
    except (flax.errors.ScopeCollectionNotFound, flax.errors.ScopeVariableNotFoundError) as e:
        found = re.search(r'collection "(\w+)"', str(e))
        name = found.group(1) if found else "a non-parameter collection"
        raise InputError(
            f"model_state: {type(model).__name__} needs its '{name}' variables (e.g. BatchNorm "
            f"statistics), got model_state with collections {sorted(model_state)}; build the state "
            f"with kdjax.create_train_state(model, rng, x[:1]), or pass model_state= to "
            f"state_from_params (a TrainState, not bare params, to predict_logits/evaluate)") from None


def teacher_logits(batch, teacher: Teacher | None):
    """The teacher's logits on ``batch["x"]``.

    Args:
      batch: the minibatch: ``"x"``, optionally the cached ``"teacher_logits"``.
      teacher: None or a ``Teacher``, run in eval mode when nothing is cached.

    Returns:
      ``batch["teacher_logits"]`` if present, else the online teacher's logits, else None.
    """
    if "teacher_logits" in batch:
        return batch["teacher_logits"]
    if teacher is None:
        return None
    variables = dict(teacher.variables)
    return apply_model(teacher.model, variables.pop("params"), variables, batch["x"], train=False)[0]


def _check_xy(batch, who: str) -> None:
    if "x" not in batch or "y" not in batch:
        raise InputError(f"{who}: expected batch keys 'x' and 'y' (optionally 'teacher_logits'), got {sorted(batch)}")


def _check_teacher(batch, teacher, who: str, cached=("teacher_logits",)) -> None:
    if teacher is None and not any(k in batch for k in cached):
        raise InputError(f"objective {who}: expected batch[{cached[0]!r}] or both a bound teacher and "
                         f"teacher_params, got neither")


@dataclasses.dataclass(frozen=True)
class CE:
    """Cross-entropy on the labels, mean over ``batch["where"]``'s positions (all without it):
    ``mean(CE(student(x), y))``; no teacher, no ``hyper``."""

    def check(self, batch, *, hyper, teacher):
        """Trace-time validation of the batch.

        Args:
          batch: the minibatch; hyper, teacher: unused. (See kdjax.objectives, the protocol.)

        Raises:
          InputError: ``batch`` lacks ``"x"`` or ``"y"``.
        """
        _check_xy(batch, "'ce'")

    def loss(self, student, params, model_state, batch, *, rng, hyper, teacher):
        """The mean cross-entropy.

        Args:
          student, params, model_state: the student module and its variables.
          batch: ``"x"``, ``"y"``, optionally ``"where"``.
          rng: the dropout key; hyper, teacher: unused. (See kdjax.objectives, the protocol.)

        Returns:
          ``(loss, (new_model_state, {}))``.

        Raises:
          InputError, InputTypeError: labels or ``where`` that do not fit the logits.
        """
        logits, new_state = apply_model(student, params, model_state, batch["x"], train=True, rng=rng)
        where = batch.get("where")
        check_where(where, logits.shape[:-1])
        return masked_mean(hard_ce(logits, batch["y"]), where), (new_state, {})


@dataclasses.dataclass(frozen=True)
class KD:
    """``distillation_loss``: ``alpha·T²·mean(D(teacher ‖ student)) + (1 − alpha)·mean(CE)``
    with ``hyper.temperature``/``hyper.alpha`` (a ``kdjax.make_hyper``), ``D`` the
    ``divergence``, over ``batch["where"]``; the teacher's logits cached in the batch or from
    the online teacher."""

    divergence: str = "kl"

    def check(self, batch, *, hyper, teacher):
        """Trace-time validation.

        Args:
          batch: the minibatch; hyper: the ``Hyper``; teacher: None or a ``Teacher``.
          (See kdjax.objectives, the protocol.)

        Raises:
          InputError: ``batch`` lacks ``"x"`` or ``"y"``, ``hyper`` is None, or there is
            neither a teacher nor ``batch["teacher_logits"]``.
        """
        _check_xy(batch, "'kd'")
        if hyper is None:
            raise InputError("hyper: objective 'kd' needs a Hyper (see kdjax.make_hyper), got None")
        _check_teacher(batch, teacher, "'kd'")

    def loss(self, student, params, model_state, batch, *, rng, hyper, teacher):
        """``distillation_loss`` of the student's logits against the teacher's.

        Args:
          student, params, model_state: the student module and its variables.
          batch: ``"x"``, ``"y"``, optionally ``"where"`` and ``"teacher_logits"``.
          rng: the dropout key; hyper: ``temperature`` and ``alpha``; teacher: None or a
            ``Teacher``. (See kdjax.objectives, the protocol.)

        Returns:
          ``(loss, (new_model_state, {}))``.

        Raises:
          InputError, InputTypeError: as ``distillation_loss`` (shapes, labels, ``where``).
        """
        logits, new_state = apply_model(student, params, model_state, batch["x"], train=True, rng=rng)
        t = teacher_logits(batch, teacher)
        kw = {} if self.divergence == "kl" else {"divergence": self.divergence}
        loss = distillation_loss(logits, t, batch["y"], hyper.temperature, hyper.alpha, where=batch.get("where"), **kw)
        return loss, (new_state, {})


@dataclasses.dataclass(frozen=True)
class LogitLoss:
    """A loss of the student's logits, the batch, the teacher's logits (or None) and
    ``hyper``: ``fn(logits, batch, teacher_logits, hyper) -> float scalar``."""

    fn: Callable

    def check(self, batch, *, hyper, teacher):
        """Trace-time validation.

        Args:
          batch: the minibatch; hyper, teacher: unused here. (See kdjax.objectives, the protocol.)

        Raises:
          InputError: ``batch`` lacks ``"x"``.
        """
        if "x" not in batch:
            raise InputError(f"objective: expected batch key 'x', got {sorted(batch)}")

    def loss(self, student, params, model_state, batch, *, rng, hyper, teacher):
        """``fn(logits, batch, teacher_logits, hyper)``.

        Args:
          student, params, model_state: the student module and its variables.
          batch: ``"x"`` and whatever ``fn`` reads.
          rng: the dropout key; hyper: passed to ``fn``; teacher: None or a ``Teacher`` (its
            logits passed to ``fn``). (See kdjax.objectives, the protocol.)

        Returns:
          ``(loss, (new_model_state, {}))``.

        Raises:
          InputError: ``fn`` returned something other than a float scalar.
        """
        logits, new_state = apply_model(student, params, model_state, batch["x"], train=True, rng=rng)
        loss = self.fn(logits, batch, teacher_logits(batch, teacher), hyper)
        if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
            raise InputError(f"objective: expected the callable to return a float scalar, got "
                             f"{jnp.result_type(loss)}{list(jnp.shape(loss))}")
        return loss, (new_state, {})


@dataclasses.dataclass(frozen=True)
class TopKKD:
    """KD on cached top-k teacher log-probabilities: ``topk_distillation_loss`` of the student's
    logits against ``batch["teacher_topk_values"]``/``["teacher_topk_indices"]``
    (``kdjax.offline.topk_logprobs`` of the teacher, computed once) with ``hyper``'s
    temperature and alpha; ``missing``, ``sparse_loss`` (one of ``kdjax.losses.SPARSE_LOSSES``) and
    ``generation_temperature`` (the cache's) as ``topk_distillation_loss`` takes them;
    ``renormalize=True`` (``sparse_loss="kl"``, ``missing="zero"``): tunix's top-k KL, the
    student's softmax renormalised over the teacher's k ids; ``where`` masks."""

    missing: str = "zero"
    sparse_loss: str = "kl"
    generation_temperature: float = 1.0
    renormalize: bool = False

    def __post_init__(self):
        if self.missing not in MISSING:
            raise InputError(f"missing: expected one of {MISSING}, got {self.missing!r}")
        if self.sparse_loss not in SPARSE_LOSSES:
            raise InputError(f"sparse_loss: expected one of {SPARSE_LOSSES}, got {self.sparse_loss!r}")
        check_temperature(self.generation_temperature, "generation_temperature")
        if not isinstance(self.renormalize, bool):
            raise InputTypeError(f"renormalize: expected True or False, got {self.renormalize!r}")
        if self.renormalize and (self.sparse_loss, self.missing) != ("kl", "zero"):
            raise InputError(f"renormalize=True: expected sparse_loss='kl' and missing='zero' (tunix's top-k KL), got "
                             f"sparse_loss={self.sparse_loss!r}, missing={self.missing!r}")

    def check(self, batch, *, hyper, teacher):
        """Trace-time validation.

        Args:
          batch: the minibatch; hyper: the ``Hyper``; teacher: unused.
          (See kdjax.objectives, the protocol.)

        Raises:
          InputError: ``batch`` lacks ``"x"``, ``"y"``, ``"teacher_topk_values"`` or
            ``"teacher_topk_indices"``, or ``hyper`` is None.
        """
        _check_xy(batch, "TopKKD")
        if hyper is None:
            raise InputError("hyper: TopKKD needs a Hyper (kdjax.make_hyper), got None")
        for key in ("teacher_topk_values", "teacher_topk_indices"):
            if key not in batch:
                raise InputError(f"TopKKD: expected batch[{key!r}] (kdjax.offline.topk_logprobs of the teacher), "
                                 f"got keys {sorted(batch)}")

    def loss(self, student, params, model_state, batch, *, rng, hyper, teacher):
        """``topk_distillation_loss`` of the student's logits against the cached top-k.

        Args:
          student, params, model_state: the student module and its variables.
          batch: ``"x"``, ``"y"``, ``"teacher_topk_values"``, ``"teacher_topk_indices"``,
            optionally ``"where"``.
          rng: the dropout key; hyper: ``temperature`` and ``alpha``; teacher: unused.
          (See kdjax.objectives, the protocol.)

        Returns:
          ``(loss, (new_model_state, {}))``.

        Raises:
          InputError, InputTypeError: as ``topk_distillation_loss`` (shapes, labels, ``where``).
        """
        logits, new_state = apply_model(student, params, model_state, batch["x"], train=True, rng=rng)
        loss = topk_distillation_loss(logits, batch["teacher_topk_values"], batch["teacher_topk_indices"], batch["y"],
                                      hyper.temperature, hyper.alpha, where=batch.get("where"), missing=self.missing,
                                      loss=self.sparse_loss, generation_temperature=self.generation_temperature,
                                      **({"renormalize": True} if self.renormalize else {}))
        return loss, (new_state, {})


def as_objective(objective):
    """The objective ``objective`` stands for.

    Args:
      objective: ``"ce"`` (→ ``CE()``), ``"kd"`` (→ ``KD()``), an object with ``loss`` (→
        itself) or another callable ``fn(logits, batch, teacher_logits, hyper)`` (→
        ``LogitLoss(fn)``).

    Returns:
      An object implementing the protocol.

    Raises:
      InputError: anything else.
    """
    if isinstance(objective, str):
        if objective in OBJECTIVES:
            return CE() if objective == "ce" else KD()
    elif callable(getattr(objective, "loss", None)):
        return objective
    elif callable(objective):
        return LogitLoss(objective)
    raise InputError(f"objective: expected one of {OBJECTIVES}, an object with loss(student, params, model_state, "
                     f"batch, *, rng, hyper, teacher) (kdjax.objectives) or a callable loss(logits, batch, "
                     f"teacher_logits, hyper), got {objective!r}")
