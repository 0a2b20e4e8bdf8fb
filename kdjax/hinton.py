"""Hinton, Vinyals & Dean (2015), section 3: students that never see one class learn it from
the teacher's soft targets (``omit_class``), with the omitted class's bias matched to its
prior on validation inputs (``match_prior_bias``) instead of tuned on the test set."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kdjax import data, parallel
from kdjax.data import Dataset
from kdjax.fitting import OnChunk, Programs, RunConfig, _on_device
from kdjax.stats import mean_ci
from kdjax.train import predict_logits
from kdjax.workflows import DistillResult, distill

__all__ = ["match_prior_bias", "omit_class", "OmitClassResult"]


def match_prior_bias(logits, label: int, prior: float) -> float:
    """The shift ``b`` that, added to class ``label``'s logit, makes a fraction ``prior``
    of the rows of ``logits`` ``[n, classes]`` predict ``label`` (as near as ties allow).

    Row i predicts ``label`` exactly when ``b > margin_i = max_{j != label} z_ij - z_i,label``,
    so ``b`` is the midpoint between the ``q``-th and ``(q+1)``-th smallest margins,
    ``q = round(prior * n)``. Needs no labels: it matches the predictions to a class prior.

    Args:
      logits: ``[n, classes]`` (e.g. a student's on validation inputs).
      label: the class whose logit is shifted.
      prior: the fraction of rows that should predict it, in [0, 1].

    Returns:
      The shift ``b``, a float.
    """
    z = np.asarray(logits, np.float64)
    margin = np.sort(np.delete(z, label, axis=1).max(axis=1) - z[:, label])
    q = int(round(prior * len(margin)))
    if q == 0:
        return float(margin[0] - 1.0)
    if q == len(margin):
        return float(margin[-1] + 1.0)
    return float((margin[q - 1] + margin[q]) / 2)


@dataclasses.dataclass
class OmitClassResult:
    """What ``omit_class`` returns. ``accuracy[when][model][on]`` is ``[n]`` over seeds,
    ``when`` in ``("before", "after")`` the bias adjustment, ``model`` in ``("teacher",
    "standard", "distilled")`` (the teacher is never adjusted), ``on`` in ``("omitted",
    "overall")``; ``errors`` the same layout with test-error counts. ``mean_ci`` holds
    ``(mean, 95% CI half-width)`` of each, ``paired_gain[when][on]`` distilled - standard.
    ``bias[model]`` ``[n]``: the shift added to the omitted class's logit, matched to
    ``prior`` on the validation inputs (their labels unused). ``test_counts``: test
    images (``overall``, ``omitted``) and the sizes of the teacher's training rows, the
    transfer set and the validation split."""

    omitted: int
    prior: float
    result: DistillResult
    bias: dict
    accuracy: dict
    errors: dict
    mean_ci: dict
    paired_gain: dict
    test_counts: dict


def omit_class(teacher, student, ds: Dataset, cfg: RunConfig, seeds: Sequence[int], *, omit: int = 3,
               temperature: float = 3.0, alpha: float = 0.7, validation_fraction: float = 0.2,
               teacher_state=None, on_chunk: OnChunk | None = None, mesh=None,
               programs: Programs | None = None) -> OmitClassResult:
    """Hinton, Vinyals & Dean (2015), section 3: a student that never sees class ``omit``.

    1. A stratified validation split is carved from ``ds``'s training rows
       (``data.validation_split``); teachers train on the rest, all classes.
    2. Standard and distilled students (paired seeds, as in ``distill``) train on the
       transfer set: the same rows without class ``omit``. The standard student has no
       signal for that class; the distilled one sees it only in the teacher's soft
       targets on the other classes.
    3. The omitted class's logit is shifted by ``b`` per student (the paper raised its
       bias by 3.5, chosen on the test set): here ``b`` makes the fraction of
       validation inputs predicted as ``omit`` equal that class's share of the
       teacher's training labels (``match_prior_bias``). The test set is used only
       to report accuracy, overall and on the omitted class, before and after.

    Args:
      teacher, student, ds, cfg, seeds, temperature, alpha, teacher_state, on_chunk, mesh,
        programs: as ``kdjax.workflows.distill``.
      omit: the class the students never see.
      validation_fraction: the validation split's share of ``ds``'s training rows, in (0, 1).

    Returns:
      An ``OmitClassResult``.

    Raises:
      InputError: as ``distill``; a validation fraction that leaves a split empty.
    """
    tune = data.validation_split(ds, validation_fraction)
    train = dataclasses.replace(ds, x_train=tune.x_train, y_train=tune.y_train)
    transfer = data.without_class(train, omit)
    r = distill(teacher, student, train, cfg, seeds, temperature=temperature, alpha=alpha,
                teacher_state=teacher_state, transfer=transfer, on_chunk=on_chunk, mesh=mesh, programs=programs)
    n = len(r.seeds)
    prior = float(np.mean(train.y_train == omit))
    logits = lambda model, states, x, members=True: parallel.to_host(
        predict_logits(model, states, _on_device(x), members=members))
    val, test = logits(student, r.students, tune.x_test), logits(student, r.students, ds.x_test)
    t_test = logits(teacher, r.teacher, ds.x_test, teacher_state is None)
    t_test = t_test if teacher_state is None else t_test[None]  # a loaded teacher: [1, n, classes]
    bias = np.array([match_prior_bias(v, omit, prior) for v in val])
    adjusted = test.copy()
    adjusted[:, :, omit] += bias[:, None].astype(adjusted.dtype)
    is_omit = ds.y_test == omit

    def score(z):
        wrong = np.argmax(z, axis=-1) != ds.y_test
        return ({"omitted": 1 - wrong[:, is_omit].mean(1), "overall": 1 - wrong.mean(1)},
                {"omitted": wrong[:, is_omit].sum(1), "overall": wrong.sum(1)})

    accuracy, errors = {}, {}
    for when, z in (("before", test), ("after", adjusted)):
        (acc, err), (t_acc, t_err) = score(z), score(t_test)
        accuracy[when] = {"teacher": t_acc, **{m: {k: v[sl] for k, v in acc.items()} for m, sl in
                                               (("standard", slice(None, n)), ("distilled", slice(n, None)))}}
        errors[when] = {"teacher": t_err, **{m: {k: v[sl] for k, v in err.items()} for m, sl in
                                             (("standard", slice(None, n)), ("distilled", slice(n, None)))}}
    stats = {w: {m: {k: mean_ci(v) for k, v in d.items()} for m, d in a.items()} for w, a in accuracy.items()}
    gain = {w: {k: mean_ci(a["distilled"][k] - a["standard"][k]) for k in ("omitted", "overall")}
            for w, a in accuracy.items()}
    return OmitClassResult(omit, prior, r, {"standard": bias[:n], "distilled": bias[n:]}, accuracy, errors,
                           stats, gain, {"omitted": int(is_omit.sum()), "overall": len(ds.y_test),
                                         "teacher": len(train.y_train), "transfer": len(transfer.y_train),
                                         "validation": len(tune.y_test)})
