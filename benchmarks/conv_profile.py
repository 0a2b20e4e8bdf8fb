"""Per-convolution profile of the ``cifar`` preset's student: XLA vs PyTorch.

    python -m benchmarks.conv_profile [--batch 128] [--repeats 20]

For every convolution of the student (shapes from the preset), the median time of the
forward pass and of forward + backward (input and weight gradients), for JAX (jitted
``kdjax.models.conv2d``, alone and inside a ``lax.scan`` as in a fused run) and for
torch (``F.conv2d`` + autograd, NCHW and channels-last, oneDNN's fast layout on CPU). It says which library's convolutions are faster
on this machine, layer by layer; the end-to-end rows are ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def student_convs(batch: int):
    """(name, hw_in, c_in, c_out, kernel, stride) of the cifar preset's student."""
    from benchmarks.presets import PRESETS

    p = PRESETS["cifar"]
    (stages, widths), (h, _, c) = p.student, p.image
    convs = [("conv1", h, c, widths[0], 3, 1)]
    c_in = widths[0]
    for i, (n, w) in enumerate(zip(stages, widths)):
        for j in range(n):
            s = 2 if (i > 0 and j == 0) else 1
            convs.append((f"layer{i + 1}.{j}.conv1", h, c_in, w, 3, s))
            if s != 1 or c_in != w:
                convs.append((f"layer{i + 1}.{j}.downsample", h, c_in, w, 1, s))
            h //= s
            convs.append((f"layer{i + 1}.{j}.conv2", h, w, w, 3, 1))
            c_in = w
    return convs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.conv_profile", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--xla-defaults", choices=["kdjax", "jax"], default="kdjax",
                    help="kdjax: the entry points' XLA options (Eigen convolutions); jax: JAX's own")
    args = ap.parse_args(argv)
    import os

    from kdjax.app import xla

    if args.xla_defaults == "jax":
        os.environ["KDJAX_XLA_DEFAULTS"] = "off"
    xla.apply()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F
    from rich.console import Console
    from rich.table import Table

    from kdjax.models import conv2d

    on_gpu = jax.devices()[0].platform == "gpu"  # torch on the same kind of device
    dev = torch.device("cuda" if on_gpu else "cpu")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    table = Table(title=f"student convolutions, batch {args.batch}: median ms (forward / forward+backward)")
    for col in ("conv", "in -> out", "jax fwd", "jax f+b", "jax f+b in scan", "torch fwd", "torch f+b",
                "torch CL fwd", "torch CL f+b", "jax / best torch (f+b)"):
        table.add_column(col, justify="left" if col in ("conv", "in -> out") else "right")
    totals = np.zeros(7)
    rng = np.random.default_rng(0)
    for name, hw, ci, co, k, s in student_convs(args.batch):
        pads = ((k // 2, k // 2),) * 2
        x = rng.standard_normal((args.batch, hw, hw, ci)).astype(np.float32)
        w = (rng.standard_normal((k, k, ci, co)) * 0.1).astype(np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        fwd = jax.jit(lambda x, w: conv2d(x, w, s, pads))
        both = jax.jit(jax.grad(lambda x, w: jnp.sum(conv2d(x, w, s, pads) ** 2), (0, 1)))

        def body(c, _):
            g = jax.grad(lambda x, w: jnp.sum(conv2d(x, w, s, pads) ** 2), (0, 1))(*c)
            return (c[0] - 1e-9 * g[0], c[1] - 1e-9 * g[1]), None

        scan = jax.jit(lambda x, w: jax.lax.scan(body, (x, w), None, length=10)[0])
        t = [_median_ms(lambda: jax.block_until_ready(fwd(xj, wj)), args.repeats),
             _median_ms(lambda: jax.block_until_ready(both(xj, wj)), args.repeats),
             _median_ms(lambda: jax.block_until_ready(scan(xj, wj)), max(3, args.repeats // 5)) / 10]
        for fmt in (torch.contiguous_format, torch.channels_last):
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev).contiguous(memory_format=fmt)
            wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).to(dev).contiguous(memory_format=fmt)
            xt.requires_grad_(), wt.requires_grad_()

            def torch_fwd():
                with torch.no_grad():
                    F.conv2d(xt, wt, stride=s, padding=k // 2)
                sync()

            def torch_both():
                y = F.conv2d(xt, wt, stride=s, padding=k // 2)
                torch.autograd.grad((y ** 2).sum(), (xt, wt))
                sync()

            t.append(_median_ms(torch_fwd, args.repeats))
            t.append(_median_ms(torch_both, args.repeats))
        totals += t
        table.add_row(name, f"{hw}x{hw}x{ci} -> {co} ({k}x{k}/{s})", *(f"{v:.2f}" for v in t),
                      f"{t[1] / min(t[4], t[6]):.2f}")
    table.add_row("total", "", *(f"{v:.1f}" for v in totals), f"{totals[1] / min(totals[4], totals[6]):.2f}")
    Console(width=150).print(table)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} on {dev} "
          f"({torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
