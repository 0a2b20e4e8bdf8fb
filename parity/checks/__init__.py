"""The parity checks: kdjax against the PyTorch reference, check by check.

Every check builds identical inputs for both sides (weights copied with
``kdjax.convert``, the same NumPy batches, NCHW for torch's ResNets, index schedule and
dropout masks), runs both, and returns ``Result`` rows: max abs / max rel error against
a tolerance. The seed's MLPs: ``forward`` ... ``dropout_stats``; ResNets with BatchNorm,
SGD, Adam and learning-rate schedules: ``resnet_*`` and ``lr_schedules``.
``python -m parity`` prints them; ``parity/test_parity.py`` asserts them.

Tolerances (DESIGN.md): float64 separates algorithmic bugs from rounding, so every
comparison there is atol 1e-12 plus rtol 1e-14 (about 45 ulp; it only matters above
magnitude ~100, where 1e-12 is less than one ulp). float32 checks the shipped path:
logits and loss atol 1e-6 / rtol 1e-5, gradients atol 1e-5 / rtol 1e-4, one optimizer
step atol 1e-7 + two ulp.
Long float32 runs are compared by loss curve only (see ``RUN_LOSS_TOL_F32``).
"""

from __future__ import annotations

from typing import Callable

from parity.checks.common import DTYPES, F64, TOL, Ctx, Result, compare, precision
from parity.checks.crosstok import check_crosstok
from parity.checks.features import check_features
from parity.checks.gpt import check_gpt2_hf, check_transformer
from parity.checks.llama import check_llama_hf
from parity.checks.onpolicy import check_gkd
from parity.checks.mlp import (check_adam_step, check_dropout_stats, check_end_to_end, check_forward, check_grads,
                               check_loss, check_runs)
from parity.checks.resnet import (check_lr_schedules, check_resnet18_convert, check_resnet_forward,
                                  check_resnet_grads, check_resnet_run, check_resnet_steps)
from parity.checks.tokens import (check_conventions, check_conventions_packages, check_divergences, check_fused,
                                  check_topk)

__all__ = ["CHECKS", "run_check", "Ctx", "Result", "compare", "precision", "DTYPES", "F64", "TOL"]

CHECKS: dict[str, Callable[[Ctx], list[Result]]] = {
    "forward": check_forward,
    "loss": check_loss,
    "grads": check_grads,
    "adam_step": check_adam_step,
    "runs": check_runs,
    "end_to_end": check_end_to_end,
    "dropout_stats": check_dropout_stats,
    "resnet_forward": check_resnet_forward,
    "resnet_grads": check_resnet_grads,
    "resnet_steps": check_resnet_steps,
    "resnet_run": check_resnet_run,
    "resnet18_convert": check_resnet18_convert,
    "lr_schedules": check_lr_schedules,
    "divergences": check_divergences,
    "conventions": check_conventions,
    "conventions_packages": check_conventions_packages,
    "fused": check_fused,
    "features": check_features,
    "transformer": check_transformer,
    "gpt2_hf": check_gpt2_hf,
    "llama_hf": check_llama_hf,
    "topk": check_topk,
    "gkd": check_gkd,
    "crosstok": check_crosstok,
}


def run_check(name: str, ctx: Ctx) -> list[Result]:
    with precision(ctx):
        return CHECKS[name](ctx)
