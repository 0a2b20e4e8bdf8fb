"""Where the ``cifar`` student's training step spends its time, JAX against PyTorch.

    python -m benchmarks.step_profile [--batch 128] [--repeats 10]

The ``cifar`` preset's student (ResNet (1, 1, 1, 1) x (16, 32, 64, 128), 32x32x3 inputs,
batch 128), cross-entropy, Adam, in both libraries, split into parts each timed on its
own (medians, interleaved JAX/torch, after a warm-up; torch both in its default NCHW memory
and in channels-last, oneDNN's faster layout on CPU):

* ``forward``: the training-mode forward pass (BatchNorm on batch statistics);
* ``forward + backward``: the loss's parameter gradients;
* ``step``: forward + backward + Adam (kdjax: ``make_train_step``; torch:
  ``torch.optim.Adam(foreach=True)``);
* ``step in lax.scan``: kdjax's fused run, per step (torch has no counterpart);
* ``BatchNorm``: every BatchNorm of the student alone at its shape, forward + backward;
* ``Adam``: the optimizer update alone on the student's parameters.

The convolutions alone are ``python -m benchmarks.conv_profile``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _time(fns: dict, repeats: int) -> dict:
    for fn in fns.values():  # warm-up and compile
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _bn_shapes(batch: int):
    """(hw, channels) of every BatchNorm of the cifar student, in order."""
    from benchmarks.conv_profile import student_convs

    return [(hw // s, co) for _, hw, _, co, _, s in student_convs(batch)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    from kdjax.app import xla

    xla.apply()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    import torch.nn.functional as F

    import kdjax
    from benchmarks.presets import PRESETS
    from kdjax import data
    from kdjax.models.resnet import BatchNorm

    p = PRESETS["cifar"]
    student_j, student_t = p.jax_models()[1], p.torch_models()[1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, *p.image)).astype(np.float32)
    y = rng.integers(0, p.num_classes, args.batch)
    state = kdjax.create_train_state(student_j, 0, x[:1])
    variables = state.variables
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    batch = {"x": xj, "y": yj}

    def loss_j(params, model_state):
        logits, new = student_j.apply({"params": params, **model_state}, xj, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, yj).mean(), new

    fwd_j = jax.jit(lambda v: student_j.apply(v, xj, train=True, mutable=["batch_stats"])[0])
    grad_j = jax.jit(jax.grad(loss_j, has_aux=True))
    step_j = kdjax.make_train_step(student_j, "ce", donate=False)
    run_j = kdjax.make_run(student_j, "ce", donate=False)
    steps = 10
    sched = data.random_batch_schedule(jax.random.PRNGKey(0), args.batch, args.batch, steps)
    tx = kdjax.adam()
    adam_j = jax.jit(lambda g, o, prm: optax.apply_updates(prm, tx.update(g, o, prm)[0]))
    grads = grad_j(state.params, state.model_state)[0]
    key = jax.random.PRNGKey(0)

    bn = []
    for hw, c in _bn_shapes(args.batch):
        xb, gb = rng.standard_normal((2, args.batch, hw, hw, c)).astype(np.float32)  # input, output gradient
        mod = BatchNorm()
        v = mod.init(key, jnp.asarray(xb[:2]), train=False)
        f = jax.jit(jax.grad(lambda prm, xx, g, m=mod, s=v["batch_stats"]: jnp.sum(g * m.apply(
            {"params": prm, "batch_stats": s}, xx, train=True, mutable=["batch_stats"])[0]), (0, 1)))
        bn.append((f, v["params"], jnp.asarray(xb), jnp.asarray(gb), xb, gb))

    def bn_j():
        for f, prm, xb, gb, *_ in bn:
            jax.block_until_ready(f(prm, xb, gb))

    def torch_parts(layout):
        """forward, forward + backward, step, BatchNorm, Adam of a torch student in ``layout``."""
        import copy

        model = copy.deepcopy(student_t).to(memory_format=layout).train()
        to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=layout)
        xt, yt = to_t(x), torch.from_numpy(y)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)

        def fwd_t():
            with torch.no_grad():
                model(xt)

        def grad_t():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xt), yt).backward()

        def step_t():
            grad_t()
            opt.step()

        grad_t()
        opt_only = torch.optim.Adam(model.parameters(), lr=1e-9, foreach=True)
        bn_inputs = [(to_t(xb).requires_grad_(), to_t(gb), torch.ones(xb.shape[-1], requires_grad=True),
                      torch.zeros(xb.shape[-1], requires_grad=True), torch.zeros(xb.shape[-1]), torch.ones(xb.shape[-1]))
                     for *_, xb, gb in bn]

        def bn_t():
            for xbt, gbt, wt, bt, rm, rv in bn_inputs:
                out = F.batch_norm(xbt, rm, rv, wt, bt, training=True, momentum=0.1)
                torch.autograd.grad(out, (xbt, wt, bt), gbt)

        return {"forward": fwd_t, "forward + backward": grad_t, "step": step_t, "BatchNorm (all, f+b)": bn_t,
                "Adam": opt_only.step}

    torch_rows = {"torch": torch_parts(torch.contiguous_format), "torch CL": torch_parts(torch.channels_last)}
    rows = {
        "forward": lambda: jax.block_until_ready(fwd_j(variables)),
        "forward + backward": lambda: jax.block_until_ready(grad_j(state.params, state.model_state)),
        "step": lambda: jax.block_until_ready(step_j(state, batch, key)),
        "step in lax.scan": lambda: jax.block_until_ready(run_j(state, batch, sched, key)),
        "BatchNorm (all, f+b)": bn_j,
        "Adam": lambda: jax.block_until_ready(adam_j(grads, state.opt_state, state.params)),
    }
    fns = {}
    for name, j in rows.items():
        fns[("jax", name)] = j
        for lib, parts in torch_rows.items():
            if name in parts:
                fns[(lib, name)] = parts[name]
    ms = _time(fns, args.repeats)
    ms[("jax", "step in lax.scan")] /= steps
    print(f"cifar student, batch {args.batch}, medians of {args.repeats} interleaved (ms); jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); torch CL: channels-last memory")
    print(f"{'part':>22} {'jax':>8} {'torch':>8} {'torch CL':>9} {'jax/best torch':>15}")
    for name in rows:
        j, t, cl = ms[("jax", name)], ms.get(("torch", name)), ms.get(("torch CL", name))
        if t is None:  # the fused run has no torch counterpart: against torch's best step
            best = min(ms[("torch", "step")], ms[("torch CL", "step")])
            print(f"{name:>22} {j:>8.1f} {'-':>8} {'-':>9} {j / best:>14.2f}x (best torch step)")
            continue
        print(f"{name:>22} {j:>8.1f} {t:>8.1f} {cl:>9.1f} {j / min(t, cl):>14.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
