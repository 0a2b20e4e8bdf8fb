"""The ULD objective (``kdjax.crosstok.ULD``): a student trained against a teacher of another
tokenizer through one train step, the teacher online, cached whole or cached as its sorted
probabilities per aligned group (``kdjax.offline.write_uld_cache``)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from kdjax.crosstok.align import ALIGNMENT
from kdjax.errors import InputError, InputTypeError
from kdjax.losses import check_temperature, hard_ce, masked_mean

if TYPE_CHECKING:
    from kdjax.crosstok import Hybrid

__all__ = ["ULD"]


@dataclasses.dataclass(frozen=True)
class ULD:
    """Train a student with ULD against a teacher of another tokenizer:
    ``crossentropy_weight · mean_where(CE(student(x), y)) + distillation_weight · uld``.

    The batch: ``"x"``/``"y"`` the student's tokens and targets, ``"where"`` its scored
    positions (default: all); the teacher's logits cached as ``batch["teacher_logits"]`` or
    from the online teacher (``Teacher(model, variables)``) on ``batch["teacher_x"]``, its own
    tokenization of the same text. Two alignments, chosen by the batch:

    * positional (``uld_loss``): ``batch["teacher_where"]``, the teacher's scored positions;
    * byte offsets (``uld_loss_aligned``, TRL's extended ULD): the ``alignment_indices`` arrays
      (``"student_index"``, ``"teacher_index"``, ``"student_member"``, ``"teacher_member"``,
      ``"group_valid"``) and ``batch["teacher_y"]``, the teacher's tokens at its positions
      (the student's are ``"y"``); the EOS skipping is then the alignment's, and ``merge`` the
      groups' merging (``uld_loss_aligned``). With ``batch["teacher_sorted"]`` (a ULD cache,
      ``kdjax.offline.read_uld_cache``) no teacher runs: ``uld_loss_cached``, at the cache's
      teacher temperature (``teacher_temperature`` unused; ``merge`` must be the cache's, and
      ``hybrid`` None: the cache keeps no probability of a given token).

    ``hyper`` is unused (may be None); the defaults are TRL's ``GOLDConfig``'s. ``teacher``:
    the teacher module, for steps with no ``teacher=`` bound (``kdjax.workflows.distill``).
    ``teacher_online``: ``kdjax.workflows.distill`` runs the teacher in the step (its logits on
    the student's tokens would mean nothing).
    """

    crossentropy_weight: float = 0.0
    distillation_weight: float = 1.0
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    skip_student_eos: bool = True
    skip_teacher_eos: bool = True
    hybrid: Hybrid | None = None
    merge: str = "observed"
    teacher: Any = None  # the teacher module, when no teacher= is bound to the step (kdjax.workflows)
    teacher_online = True

    def __post_init__(self):
        for name in ("crossentropy_weight", "distillation_weight"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
                raise InputTypeError(f"{name}: expected a number >= 0, got {w!r} ({type(w).__name__})")
            if not (np.isfinite(w) and w >= 0):
                raise InputError(f"{name}: expected a finite number >= 0, got {w}")
        from kdjax import crosstok

        if self.hybrid is not None and not isinstance(self.hybrid, crosstok.Hybrid):
            raise InputTypeError(f"hybrid: expected None or a Hybrid (hybrid_from_vocabs), got "
                                 f"{type(self.hybrid).__name__}")
        check_temperature(self.student_temperature, "student_temperature")
        check_temperature(self.teacher_temperature, "teacher_temperature")
        crosstok._check_merge(self.merge)

    def describe(self) -> str:
        """One line: the weights, form, temperatures and merging."""
        form = "hybrid ULD" if self.hybrid is not None else "ULD"
        return (f"{self.crossentropy_weight:g} * CE + {self.distillation_weight:g} * {form} (T student "
                f"{self.student_temperature:g}, teacher {self.teacher_temperature:g}, {self.merge} merging of "
                f"aligned groups; TRL's ULDLoss)")

    def check(self, batch, *, hyper, teacher):
        """Refuse a batch this objective cannot read (the protocol's trace-time hook).

        Args:
          batch: the minibatch dict; hyper: unused; teacher: the bound ``Teacher`` or None.

        Raises:
          InputError: a key the chosen alignment needs is missing, no teacher signal at all,
            or ``hybrid`` with a cache.
        """
        aligned = "group_valid" in batch
        cached = "teacher_sorted" in batch
        if cached and (not aligned or self.hybrid is not None):
            raise InputError("ULD: batch['teacher_sorted'] (a ULD cache) needs the byte-offset alignment arrays and "
                             "hybrid=None (the cache keeps sorted probabilities, not each shared token's)")
        need = ("x", "y") + ((() if cached else ("teacher_y",)) + ALIGNMENT if aligned else ("teacher_where",))
        missing = [k for k in need if k not in batch]
        if missing:
            raise InputError(f"ULD: expected batch[{missing[0]!r}] ({'byte-offset' if aligned else 'positional'} "
                             f"alignment), got keys {sorted(batch)}")
        if not cached and "teacher_logits" not in batch and (teacher is None or "teacher_x" not in batch):
            raise InputError("ULD: expected batch['teacher_sorted'], batch['teacher_logits'] or a bound teacher "
                             "with batch['teacher_x'] (the teacher's tokenization of the same text)")

    def loss(self, student, params, model_state, batch, *, rng, hyper, teacher):
        """The protocol's loss (``kdjax.objectives``).

        Args:
          student, params, model_state: the student module and its variables.
          batch: as in the class docstring; rng: the step's key (dropout).
          hyper: unused; teacher: the bound ``Teacher`` or None.

        Returns:
          ``(loss, (new model_state, {"uld", and "ce" when weighted}))``.
        """
        from kdjax import crosstok  # the package's losses (looked up at call time)
        from kdjax.objectives import apply_model  # kdjax.objectives imports the loss modules

        self.check(batch, hyper=hyper, teacher=teacher)
        logits, new_state = apply_model(student, params, model_state, batch["x"], train=True, rng=rng)
        where = batch.get("where", jnp.ones(logits.shape[:2], bool))
        temps = {"student_temperature": self.student_temperature, "teacher_temperature": self.teacher_temperature}
        alignment = {k: batch[k] for k in ALIGNMENT if k in batch}
        if "teacher_sorted" in batch:
            uld = crosstok.uld_loss_cached(logits, batch["teacher_sorted"], student_tokens=batch["y"],
                                           alignment=alignment, student_temperature=self.student_temperature,
                                           merge=self.merge)
        else:
            if "teacher_logits" in batch:
                t = batch["teacher_logits"]
            else:
                variables = dict(teacher.variables)
                t = apply_model(teacher.model, variables.pop("params"), variables, batch["teacher_x"],
                                train=False)[0]
            if "group_valid" in batch:
                uld = crosstok.uld_loss_aligned(logits, t, student_tokens=batch["y"],
                                                teacher_tokens=batch["teacher_y"], alignment=alignment,
                                                hybrid=self.hybrid, merge=self.merge, **temps)
            else:
                uld = crosstok.uld_loss(logits, t, student_where=where, teacher_where=batch["teacher_where"],
                                        skip_student_eos=self.skip_student_eos,
                                        skip_teacher_eos=self.skip_teacher_eos, hybrid=self.hybrid, **temps)
        loss = self.distillation_weight * uld
        metrics = {"uld": uld}
        if self.crossentropy_weight > 0:
            ce = masked_mean(hard_ce(logits, batch["y"]), where)
            loss = loss + self.crossentropy_weight * ce
            metrics["ce"] = ce
        return loss, (new_state, metrics)

