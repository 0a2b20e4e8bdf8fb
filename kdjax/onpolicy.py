"""On-policy distillation of language models: the student samples, the teacher scores the
student's own tokens, and sampling, scoring and the update are one jitted step.

* ``generalized_jsd_loss``: TRL's GKD loss (``trl/experimental/gkd/gkd_trainer.py``).
* ``reverse_kl_advantages``, ``importance_sampling_loss``: the on-policy reverse KL of Thinking Machines'
  tinker-cookbook (``distillation/train_on_policy.py``: ``incorporate_kl_penalty``; the Tinker API's loss).
* ``make_on_policy_step`` / ``make_on_policy_run``: one jitted step (draw, score, update) / a scan.
* ``sequence_data``: prompts + completions as training data of sequence-level KD.

Batches are ``{"prompts": [B, P], "prompt_mask": [B, P]}`` (left-padded, as ``kdjax.generate``
takes them) and, for GKD's off-policy draws, ``"completions": [B, N]`` with ``"completion_mask"``
(true up to and including the end of each completion). Positions count each row's real tokens (as
``kdjax.generate``); TRL's count the padding too, which changes its numbers for left-padded prompts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import InputError, InputTypeError, check_count
from kdjax.generation import _check_sampling, rollout
from kdjax.losses import _concrete_scalar, check_beta, check_temperature, jsd
from kdjax.train import make_run, make_train_step

__all__ = ["generalized_jsd_loss", "reverse_kl_advantages", "importance_sampling_loss", "sequence_logprobs",
           "OnPolicy", "make_on_policy_step", "make_on_policy_run", "sequence_data", "METHODS"]

METHODS = ("gkd", "reverse_kl")


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0):
    r"""TRL's ``generalized_jsd_loss`` (reduction ``"batchmean"``):

    .. math:: \frac{1}{|\{t: y_t \ne -100\}|} \sum_{t: y_t \ne -100}
              \beta\,\mathrm{KL}(P_t \| M_t) + (1 - \beta)\,\mathrm{KL}(Q_t \| M_t),
              \quad M = \beta P + (1 - \beta) Q

    with :math:`P = \mathrm{softmax}(t / T)` (teacher), :math:`Q = \mathrm{softmax}(s / T)`
    (student); ``beta = 0`` is KL(P‖Q), ``beta = 1`` KL(Q‖P); no :math:`T^2`. Without
    ``labels``, the mean over every position; with no counted position, 0.

    Args:
      student_logits: ``[..., vocab]`` floating.
      teacher_logits: the same shape (finite values, checked when concrete).
      labels: None or integer ``[...]`` (-100: not counted).
      beta, temperature: a number in [0, 1]; a finite number > 0.
    Returns:
      A scalar.
    Raises:
      InputError / InputTypeError: shapes that differ, labels that are not integers of the
        logits' leading shape; ``beta``, ``temperature`` out of range and non-finite teacher
        logits when concrete (under ``jit`` traced values are not checked).
    """
    check_beta(beta)
    check_temperature(temperature)
    per_position = jsd(student_logits, teacher_logits, temperature, beta)
    if labels is not None:
        if not hasattr(labels, "dtype") or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise InputTypeError(f"labels: expected integer token ids (-100: not counted), got "
                                 f"{getattr(labels, 'dtype', type(labels).__name__)}")
        if tuple(labels.shape) != tuple(per_position.shape):
            raise InputError(f"labels: expected the logits' leading shape {tuple(per_position.shape)}, got "
                             f"{tuple(labels.shape)}")
    if labels is None:
        return jnp.mean(per_position)
    keep = labels != -100
    return jnp.sum(jnp.where(keep, per_position, 0.0)) / jnp.maximum(jnp.sum(keep), 1).astype(per_position.dtype)


def reverse_kl_advantages(sampling_logprobs, teacher_logprobs, mask, coef=1.0, discount=0.0):
    """tinker-cookbook's per-token advantages ``A_t = -coef * mask_t * (log q_sampler(x_t) -
    log p_teacher(x_t))``; with ``discount > 0`` each replaced by ``sum_{s >= t}
    discount^(s - t) A_s`` (within the row). ``[batch, tokens]``; no gradient.

    Args:
      sampling_logprobs, teacher_logprobs: floating ``[batch, tokens]``.
      mask: ``[batch, tokens]``, true at counted tokens.
      coef, discount: a finite number; a number in [0, 1].
    Returns:
      ``[batch, tokens]`` advantages.
    Raises:
      InputError / InputTypeError: arrays that are not ``[batch, tokens]`` alike; ``coef``
        not finite or ``discount`` outside [0, 1] when concrete (under ``jit`` traced values
        are not checked).
    """
    shape = tuple(np.shape(sampling_logprobs))
    if len(shape) != 2 or not jnp.issubdtype(sampling_logprobs.dtype, jnp.floating):
        raise InputError(f"sampling_logprobs: expected floating [batch, tokens], got "
                         f"{getattr(sampling_logprobs, 'dtype', '')}{list(shape)}")
    for name, v in (("teacher_logprobs", teacher_logprobs), ("mask", mask)):
        if tuple(np.shape(v)) != shape:
            raise InputError(f"{name}: expected sampling_logprobs' shape {shape}, got {tuple(np.shape(v))}")
    c = _concrete_scalar("coef", coef)
    if c is not None and not np.isfinite(c):
        raise InputError(f"coef: expected a finite number, got {c}")
    check_beta(discount, "discount")
    a = -coef * mask.astype(sampling_logprobs.dtype) * (sampling_logprobs - teacher_logprobs)
    a = jax.lax.stop_gradient(a)
    if isinstance(discount, (int, float)) and discount == 0:
        return a

    def back(carry, x):
        carry = x + discount * carry
        return carry, carry

    _, out = jax.lax.scan(back, jnp.zeros(a.shape[:1], a.dtype), a.T, reverse=True)
    return out.T


def importance_sampling_loss(logprobs, sampling_logprobs, advantages):
    """The Tinker API's ``importance_sampling`` loss, a scalar: ``-sum(exp(logprobs - sampling_logprobs)
    * advantages)`` over every token (a sum, as there): the policy gradient under the sampler.

    Args:
      logprobs: the student's log-probabilities of the sampled tokens (differentiated).
      sampling_logprobs, advantages: the sampler's, and ``reverse_kl_advantages`` (no gradient).
    """
    ratio = jnp.exp(logprobs - jax.lax.stop_gradient(sampling_logprobs))
    return -jnp.sum(ratio * jax.lax.stop_gradient(advantages))


def _positions(mask):
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


def sequence_logprobs(model, variables, tokens, mask, start: int, temperature=1.0):
    """``(logits [B, n, V], log-probs [B, n])`` of ``tokens[:, start:]`` given what precedes
    them (``n = length - start``; padding masked, positions per row), at ``temperature``.

    Args:
      model, variables: a decoder (``apply(variables, tokens, mask=, position_ids=)``) and its variables.
      tokens, mask: integer ``[B, length]`` and its real-token mask; start: the first scored position.
      temperature: divides the logits before the log-softmax.
    Raises:
      InputError / InputTypeError: ``tokens`` not integer ``[B, length]``, ``mask`` of another
        shape, ``start`` not an int in ``[1, length - 1]``, ``temperature`` not finite > 0
        (when concrete).
    """
    if not hasattr(tokens, "dtype") or np.ndim(tokens) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise InputTypeError(f"tokens: expected integer token ids [batch, length], got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)}{list(np.shape(tokens))}")
    if tuple(np.shape(mask)) != tuple(tokens.shape):
        raise InputError(f"mask: expected the tokens' shape {tuple(tokens.shape)}, got {tuple(np.shape(mask))}")
    check_count("start", start)
    if start >= tokens.shape[1]:
        raise InputError(f"start: expected an int in [1, {tokens.shape[1] - 1}] (tokens of length "
                         f"{tokens.shape[1]}), got {start}")
    check_temperature(temperature)
    logits = model.apply(variables, tokens, mask=mask, position_ids=_positions(mask))[:, start - 1:-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / temperature, axis=-1)
    return logits, jnp.take_along_axis(logp, tokens[:, start:, None], axis=-1)[..., 0]


@dataclasses.dataclass(frozen=True)
class OnPolicy:
    """An on-policy objective: what ``make_on_policy_step`` trains with, and a train-step objective
    of ``kdjax.train`` (``kdjax.workflows.distill`` uses it so). Options as ``make_on_policy_step``;
    ``prompt_length``: with it, batches of windows ``{"x": [B, L]}`` are split into prompts
    ``x[:, :prompt_length]`` and data completions ``x[:, prompt_length:prompt_length + max_new_tokens]``."""

    teacher: Any
    method: str = "gkd"
    max_new_tokens: int = 16
    lmbda: float = 0.5
    beta: float = 0.5
    seq_kd: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    coef: float = 1.0
    discount: float = 0.0
    prompt_length: int | None = None

    teacher_online = True  # the teacher scores (and may sample) inside every step: nothing to cache

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise InputError(f"method: expected one of {METHODS}, got {self.method!r}")
        if not hasattr(self.teacher, "apply"):
            raise InputTypeError(f"teacher: expected a decoder (a Flax module such as kdjax's TransformerLM or "
                                 f"Llama), got {type(self.teacher).__name__}")
        check_count("max_new_tokens", self.max_new_tokens)
        lmbda = _concrete_scalar("lmbda", self.lmbda)
        if lmbda is not None and not 0 <= lmbda <= 1:
            raise InputError(f"lmbda: expected a probability in [0, 1], got {self.lmbda}")
        check_beta(self.beta)
        check_temperature(self.temperature)
        if not isinstance(self.seq_kd, (bool, np.bool_)):
            raise InputTypeError(f"seq_kd: expected True or False, got {self.seq_kd!r}")
        _check_sampling(self.temperature, self.top_k, self.top_p, None)  # top_k, top_p as generate checks them
        for name in ("eos_id", "pad_id"):
            if getattr(self, name) is not None:
                check_count(name, getattr(self, name), 0)
        c = _concrete_scalar("coef", self.coef)
        if c is not None and not np.isfinite(c):
            raise InputError(f"coef: expected a finite number, got {c}")
        check_beta(self.discount, "discount")
        if self.seq_kd and self.method != "gkd":
            raise InputError("seq_kd: only used with method='gkd' (the reverse KL always samples the student)")
        if self.prompt_length is not None:
            check_count("prompt_length", self.prompt_length)

    def describe(self) -> str:
        if self.method == "gkd":
            return (f"GKD (lmbda {self.lmbda:g}, beta {self.beta:g}{', seq_kd' if self.seq_kd else ''}, sampling "
                    f"T {self.temperature:g}, {self.max_new_tokens} new tokens)")
        return (f"on-policy reverse KL (coef {self.coef:g}, discount {self.discount:g}, sampling T "
                f"{self.temperature:g}, {self.max_new_tokens} new tokens)")

    def _batch(self, batch):
        if "prompts" in batch:
            if "prompt_mask" not in batch:
                raise InputError(f"batch: expected 'prompt_mask' with 'prompts' (left-padded), got {sorted(batch)}")
            return batch
        if "x" not in batch or self.prompt_length is None:
            raise InputError(f"batch: expected 'prompts' and 'prompt_mask' (or windows 'x' with an OnPolicy "
                             f"prompt_length), got {sorted(batch)}")
        x, p, n = batch["x"], self.prompt_length, self.max_new_tokens
        if x.ndim != 2 or x.shape[1] < p + n:
            raise InputError(f"batch['x']: expected windows [batch, >= prompt_length + max_new_tokens = {p + n}], got "
                             f"shape {tuple(x.shape)}")
        return {"prompts": x[:, :p], "prompt_mask": jnp.ones((x.shape[0], p), bool), "completions": x[:, p:p + n],
                "completion_mask": jnp.ones((x.shape[0], n), bool)}

    def check(self, batch, *, hyper, teacher):
        """Raises InputError without a teacher. Args: batch, hyper: unused; teacher: the ``Teacher``
        or None (see kdjax.objectives, the protocol)."""
        if teacher is None:
            raise InputError("OnPolicy: expected the teacher's variables (teacher_params: a TrainState, variables "
                             "or params), got None")

    def loss(self, student, params, model_state, batch, *, rng, hyper, teacher):
        """The draw with ``rng`` (from the student's current parameters, no gradient through it),
        the teacher's scores and the loss (see kdjax.objectives, the protocol).

        Args:
          student, params, model_state: the student decoder and its variables.
          batch: prompts (and GKD's completions) as the module docstring says, or windows ``"x"``.
          rng: the draw's key; hyper: unused; teacher: the ``Teacher`` that scores.
        Returns: ``(loss, (model_state, metrics))``: ``on_policy``, ``completion_tokens``, ``teacher_nll``.
        Raises: InputError: a batch without what the method needs, or of the wrong shape.
        """
        model, key, t_vars = student, rng, teacher.variables
        batch = self._batch(batch)
        prompts, prompt_mask = batch["prompts"], batch["prompt_mask"]
        p, n = prompts.shape[1], self.max_new_tokens
        k_choice, k_sample = jax.random.split(key)
        s_vars = {"params": params, **model_state}
        sample = functools.partial(rollout, prompts=prompts, max_new_tokens=n, rng=k_sample,
                                   temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                   eos_id=self.eos_id, pad_id=self.pad_id, prompt_mask=prompt_mask)
        completion = lambda g: (g.tokens[:, p:], g.completion_mask, g.logprobs)
        from_student = lambda: completion(sample(model, jax.lax.stop_gradient(s_vars)))
        if self.method == "gkd":
            on_policy = jax.random.uniform(k_choice) <= self.lmbda  # TRL: random.random() <= lmbda
            if self.seq_kd:
                off_policy = lambda: completion(sample(teacher.model, t_vars))
            else:
                if "completions" not in batch or "completion_mask" not in batch:
                    raise InputError("batch: GKD takes the data's completions with probability 1 - lmbda; expected "
                                     "'completions' and 'completion_mask' (or seq_kd=True)")
                want = (prompts.shape[0], n)
                if tuple(batch["completions"].shape) != want or tuple(batch["completion_mask"].shape) != want:
                    raise InputError(f"batch: expected 'completions' and 'completion_mask' of shape {want} "
                                     f"(max_new_tokens per prompt), got {tuple(batch['completions'].shape)} and "
                                     f"{tuple(batch['completion_mask'].shape)}")
                logprobs_type = jax.eval_shape(from_student)[2].dtype
                off_policy = lambda: (batch["completions"].astype(jnp.int32), batch["completion_mask"].astype(bool),
                                      jnp.zeros(want, logprobs_type))
            completions, completion_mask, sampled = jax.lax.cond(on_policy, from_student, off_policy)
        else:
            (completions, completion_mask, sampled), on_policy = from_student(), jnp.asarray(True)
        tokens = jnp.concatenate([prompts.astype(jnp.int32), completions.astype(jnp.int32)], axis=1)
        mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
        t_logits, t_logp = jax.tree_util.tree_map(jax.lax.stop_gradient,
                                                  sequence_logprobs(teacher.model, t_vars, tokens, mask, p))
        s_logits, s_logp = sequence_logprobs(model, s_vars, tokens, mask, p)
        if self.method == "gkd":
            loss = generalized_jsd_loss(s_logits, t_logits, jnp.where(completion_mask, completions, -100), self.beta)
        else:
            advantages = reverse_kl_advantages(sampled, t_logp, completion_mask, self.coef, self.discount)
            loss = importance_sampling_loss(s_logp, sampled, advantages)
        counted = jnp.maximum(jnp.sum(completion_mask), 1)
        metrics = {"on_policy": on_policy, "completion_tokens": jnp.sum(completion_mask),
                   "teacher_nll": -jnp.sum(jnp.where(completion_mask, t_logp, 0.0)) / counted}
        return loss, (model_state, metrics)


def make_on_policy_step(student, teacher, method: str = "gkd", *, tx=None, jit: bool = True, donate: bool = True,
                        mesh=None, rules=None, **options):
    """The on-policy step ``step(state, batch, rng, teacher_variables) -> (state, metrics)``.

    The step's key is ``fold_in(rng, state.step)`` (a resumed run draws what an uninterrupted
    one does); ``metrics``: the loss, whether the draw was on-policy, the completion tokens
    counted and the teacher's NLL of them (nats per token).

    Args:
      student, teacher: the decoders (kdjax's ``TransformerLM``, ``Llama``).
      method: ``"gkd"`` (TRL's ``GKDTrainer``): with probability ``lmbda`` the completions are
        sampled from the student, else the batch's (with ``seq_kd``: the teacher's); the loss is
        ``generalized_jsd_loss`` with ``beta`` at T = 1 over the completion tokens.
        ``"reverse_kl"`` (tinker-cookbook): always the student's; the loss is
        ``importance_sampling_loss`` with ``reverse_kl_advantages(coef, discount)``.
      tx, jit, donate: as ``kdjax.make_train_step`` (``tx`` defaults to ``adam()``).
      mesh, rules: split the prompts over ``"data"`` and ``"fsdp"`` and the student's state and
        the teacher's variables over ``"fsdp"`` by ``rules``, as ``make_train_step(..., mesh=)``.
      options: ``OnPolicy``'s other fields: ``lmbda``, ``beta``, ``seq_kd``, ``coef``,
        ``discount`` (the method's), ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
        ``eos_id``, ``pad_id`` (the draws', as ``kdjax.generate``), ``prompt_length``.
    Raises:
      InputError, InputTypeError: an option out of its range (checked as given, before any
        conversion), ``seq_kd`` without ``"gkd"``, a teacher that is not a Flax module.
    """
    return _TeacherLast(make_train_step(student, _objective(teacher, method, **options), tx=tx, teacher=teacher,
                                        jit=jit, mesh=mesh, rules=rules, donate=donate))


# the options converted once checked as given (int(2.5) would be 2)
_CASTS = {"max_new_tokens": int, "lmbda": float, "beta": float, "seq_kd": bool, "temperature": float, "coef": float,
          "discount": float}


def _objective(teacher, method="gkd", **options) -> OnPolicy:
    """The ``OnPolicy`` of ``make_on_policy_step``'s options, checked as given, then converted."""
    given = OnPolicy(teacher, method, **options)
    return dataclasses.replace(given, **{k: cast(getattr(given, k)) for k, cast in _CASTS.items()})


class _TeacherLast:
    """A train step or run called as ``f(state, batch or data[, schedule], rng,
    teacher_variables)`` (no ``hyper``: the objective has none), its objective's metrics
    beside the loss; every other attribute is the wrapped function's."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        *head, teacher_variables = args
        state, metrics = self.fn(*head, None, teacher_variables)
        return state, {"loss": metrics["loss"], **metrics.get("terms", {})}

    def __getattr__(self, name):
        return getattr(self.fn, name)


def make_on_policy_run(student, teacher, method: str = "gkd", *, tx=None, donate: bool = True, mesh=None,
                       rules=None, **options):
    """Many on-policy steps as one ``lax.scan``: ``run(state, data, schedule, rng,
    teacher_variables) -> (state, metrics [steps])``, batch k the rows ``schedule[k]`` of
    every array in ``data`` (``kdjax.data.random_batch_schedule``/``epoch_schedule``); equal to calling
    ``make_on_policy_step``'s step ``steps`` times (tested).

    Args:
      student, teacher, method, tx, donate, mesh, rules, options: as ``make_on_policy_step``'s (and Raises).
    """
    return _TeacherLast(make_run(student, _objective(teacher, method, **options), tx=tx, teacher=teacher, mesh=mesh,
                                 rules=rules, donate=donate))


def sequence_data(tokens, mask, prompt_length: int, pad_id: int = 0) -> dict:
    """Training data of sequence-level KD (Kim & Rush 2016), each row's real tokens moved to the front
    (a causal model's positions are then each row's own).

    Args:
      tokens, mask, prompt_length: ``[rows, P + N]`` (``Generation.tokens``/``.mask`` or
        ``offline.read_generations``: left-padded prompts of length P, then completions) and P;
      pad_id: the filler after each row's real tokens.
    Returns: ``{"x": [rows, P + N - 1], "y": x shifted by one, "where": true where y is a completion
      token}``: ``kdjax.make_run(student, "ce")`` on it is cross-entropy on the completions only.
    Raises: InputError: ``tokens``/``mask`` not ``[rows, length]`` alike, or P outside (0, length).
    """
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    if tokens.ndim != 2 or tokens.shape != mask.shape or not 0 < prompt_length < tokens.shape[1]:
        raise InputError(f"tokens / mask: expected [rows, prompt_length + new] alike with 0 < prompt_length "
                         f"({prompt_length}) < length, got {tokens.shape} and {mask.shape}")
    completion = mask.copy()
    completion[:, :prompt_length] = False
    order = np.argsort(~mask, axis=1, kind="stable")  # the real tokens first, in order
    real = np.take_along_axis(mask, order, axis=1)
    aligned = np.where(real, np.take_along_axis(tokens, order, axis=1), pad_id).astype(np.int32)
    counted = np.take_along_axis(completion, order, axis=1)
    return {"x": aligned[:, :-1], "y": aligned[:, 1:], "where": counted[:, 1:]}
