"""``python -m parity``: run the parity checks, print a table, exit non-zero on failure.

    python -m parity [--dtype float64|float32|all] [--device cpu|gpu|tpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity", description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["float64", "float32", "all"], default="all")
    p.add_argument("--device", choices=["cpu", "gpu", "tpu"], default=None,
                   help="JAX backend (default: JAX's default); torch uses cuda for gpu")
    p.add_argument("--only", nargs="*", default=None, help="run only these checks")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)

    if args.device:  # before JAX initialises a backend
        os.environ["JAX_PLATFORMS"] = {"gpu": "cuda", "cpu": "cpu", "tpu": "tpu"}[args.device]
    from kdjax.app import xla

    xla.apply()  # the entry points' XLA options (CPU convolutions), checked here as users run them
    import jax
    import torch
    from rich.console import Console
    from rich.table import Table

    from parity.checks import CHECKS, DTYPES, Ctx, run_check

    torch_device = "cuda" if args.device == "gpu" else "cpu"
    if torch_device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    dtypes = DTYPES if args.dtype == "all" else (args.dtype,)
    names = args.only or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"parity: error: unknown checks {unknown}; expected some of {list(CHECKS)}", file=sys.stderr)
        return 2

    console = Console(width=max(150, Console().width))
    device = jax.devices()[0]
    info = {"jax_device": f"{device.platform}:{device.device_kind}", "torch_device": torch_device,
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "jax_default_matmul_precision": "highest (set for every check)",
            "versions": {"python": platform.python_version(), "jax": jax.__version__,
                         "torch": torch.__version__, "numpy": __import__("numpy").__version__,
                         "flax": __import__("flax").__version__, "optax": __import__("optax").__version__}}
    console.print(f"kdjax parity: JAX on {info['jax_device']}, torch on {torch_device}, "
                  f"matmul precision highest, XLA_FLAGS={info['XLA_FLAGS']!r}; {info['versions']}")
    results, start = [], time.perf_counter()
    for dtype in dtypes:
        ctx = Ctx(dtype, torch_device)
        for name in names:
            with console.status(f"{dtype} {name}"):
                try:
                    results += run_check(name, ctx)
                except ModuleNotFoundError as e:  # gpt2_hf without transformers: said, not hidden
                    console.print(f"[yellow]skipped {name} ({dtype}): {e}; pip install 'kdjax[parity]'[/]")
    table = Table(title=f"kdjax vs PyTorch ({time.perf_counter() - start:.1f} s)")
    for col in ("check", "dtype", "max abs err", "max rel err", "tolerance", "result", "note"):
        table.add_column(col, justify="right" if "err" in col else "left")
    for r in results:
        table.add_row(r.name, r.dtype, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}",
                      f"atol {r.atol:g}" + (f", rtol {r.rtol:g}" if r.rtol else ""),
                      "[yellow]skipped[/]" if r.skipped else "[green]pass[/]" if r.passed else "[red]FAIL[/]", r.note)
    console.print(table)
    failed = [r for r in results if not r.passed and not r.skipped]
    skipped = [r for r in results if r.skipped]
    console.print(f"{len(results) - len(failed) - len(skipped)} passed, {len(failed)} failed"
                  + (f", {len(skipped)} skipped" if skipped else ""))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({**info, "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
