"""Runs inside a subprocess with several (forced) CPU devices; prints one JSON line.

    python tests/parallel_script.py single OUT.json       # data/member parallel vs one device (8 devices)
    python tests/parallel_script.py multihost OUT.npz     # one process of a 2-process run (kdjax.parallel.initialize)
    python tests/parallel_script.py reference OUT.npz     # the same run in one process (4 devices)

The device count comes from the caller's XLA_FLAGS.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import kdjax
from kdjax import checkpoint, data, parallel, sweep
from kdjax.errors import InputError


def leaves(tree):
    return [parallel.to_host(a) for a in jax.tree_util.tree_leaves(tree)]


def maxdiff(a, b) -> float:
    return max(float(np.max(np.abs(u.astype(np.float64) - v.astype(np.float64)))) for u, v in zip(leaves(a), leaves(b)))


def digits(n=512):
    ds = data.digits(images=True)
    return ds.x_train[:n], ds.y_train[:n]


def single(out_path):
    results = {"devices": len(jax.devices())}
    x, y = digits(256)
    sched = data.seed_schedule(jax.random.PRNGKey(0), len(y), 64, 6)
    rng = jax.random.PRNGKey(1)
    for dtype in ("float64", "float32"):
        with jax.enable_x64(dtype == "float64"):
            jd = jnp.float64 if dtype == "float64" else jnp.float32
            d = {"x": x.astype(jd), "y": y}
            teacher = kdjax.TeacherMLP(32, 10, dtype=jd)  # dropout on a split batch
            for name, model, objective in [("teacher_mlp_dropout", teacher, "ce"),
                                           ("resnet_batchnorm", kdjax.ResNet((1,), (4,), 10, dtype=jd), "kd")]:
                dd = dict(d, teacher_logits=jnp.asarray(np.random.default_rng(0).normal(size=(len(y), 10)), jd))
                args = (rng, kdjax.make_hyper(3.0, 0.7, jd)) if objective == "kd" else (rng,)
                fresh = lambda: kdjax.create_train_state(model, 0, d["x"][:1])
                one, l1 = kdjax.make_run(model, objective)(fresh(), dd, sched, *args)
                run8 = kdjax.make_run(model, objective, mesh=parallel.make_mesh(1, 8))
                eight, l8 = run8(fresh(), dd, sched, *args)
                run8(fresh(), dd, sched, *args)
                results[f"{name}_{dtype}"] = {
                    "state": maxdiff((one.params, one.model_state), (eight.params, eight.model_state)),
                    "loss": maxdiff(l1, l8), "compiles": run8._cache_size(),
                    "spec": str(jax.tree_util.tree_leaves(eight.params)[0].sharding.spec)}
    # host-fed streaming steps on a mesh = the same steps on one device
    model = kdjax.StudentMLP(16, 10)
    step1, step8 = kdjax.make_train_step(model, "ce"), kdjax.make_train_step(model, "ce", mesh=parallel.make_mesh(1, 8))
    a = kdjax.create_train_state(model, 0, x[:1])
    b = kdjax.create_train_state(model, 0, x[:1])
    for idx in sched[:5]:
        a, _ = step1(a, {"x": x[idx], "y": y[idx]}, rng)
        b, _ = step8(b, {"x": x[idx], "y": y[idx]}, rng)
    results["streaming_float32"] = {"state": maxdiff(a.params, b.params),
                                    "batch_spec": "P('data',)", "compiles": step8._cache_size()}
    # member-parallel sweep over members=4 x data=2 = the unsharded sweep, member for member
    tl = np.random.default_rng(1).normal(size=(len(y), 10)).astype(np.float32)
    d = {"x": x, "y": y, "teacher_logits": tl}
    T, A, S = sweep.grid([1.0, 2.0, 4.0, 8.0], [0.5, 0.9], [0])
    keys = sweep.member_keys(S)
    h = sweep.sweep_hyper(T, A)
    student = kdjax.ResNet((1,), (4,), 10)
    base, lb = sweep.make_sweep_run(student, "kd", shared_schedule=True)(
        sweep.init_members(student, keys["init"], x[:1]), d, sched, keys["dropout"], h)
    mesh = parallel.make_mesh(4, 2)
    srun = sweep.make_sweep_run(student, "kd", shared_schedule=True, mesh=mesh)
    m, lm = srun(sweep.init_members(student, keys["init"], x[:1]), d, sched, keys["dropout"], h)
    kernel = m.params["fc"]["kernel"]
    placement = {}
    for shard in kernel.addressable_shards:  # member slice held by each device
        placement[str(shard.device.id)] = [shard.index[0].start, shard.index[0].stop]
    want = {str(dev.id): [2 * i, 2 * i + 2] for i, row in enumerate(mesh.devices) for dev in row}
    results["sweep_float32"] = {"state": maxdiff((base.params, base.model_state), (m.params, m.model_state)),
                                "loss": maxdiff(lb, lm), "spec": str(kernel.sharding.spec),
                                "placement_ok": placement == want}
    # a sharded sweep state checkpointed, restored on 2 devices, continued: = continuing on 8
    path = out_path + ".ckpt"
    checkpoint.save(path, m)
    tree, _ = checkpoint.load(path, target=sweep.init_members(student, keys["init"], x[:1]))
    cont8, _ = srun(m, d, sched[:4], keys["dropout"], h)
    cont2, _ = sweep.make_sweep_run(student, "kd", shared_schedule=True, mesh=parallel.make_mesh(2, 1))(
        tree, d, sched[:4], keys["dropout"], h)
    results["restore_on_2_devices"] = {"state": maxdiff(cont8.params, cont2.params),
                                       "devices": len(jax.tree_util.tree_leaves(cont2.params)[0].sharding.device_set)}
    # the fused vocabulary loss with tokens sharded over "data" = unsharded
    from kdjax.fused import linear_distillation_loss
    rng_np = np.random.default_rng(5)
    hid = rng_np.normal(size=(64, 16)).astype(np.float32)
    ker = (rng_np.normal(size=(16, 40)) * 0.3).astype(np.float32)
    tlog = rng_np.normal(size=(64, 40)).astype(np.float32)
    lab = rng_np.integers(0, 40, 64)
    loss = jax.jit(jax.value_and_grad(lambda h, k, t, yy: linear_distillation_loss(
        h, k, yy, teacher_logits=t, temperature=2.0, alpha=0.5, chunk_size=16), (0, 1)))
    rows = parallel.data_sharding(parallel.make_mesh(1, 8))
    whole = loss(hid, ker, tlog, lab)
    split = loss(*(jax.device_put(a, rows) for a in (hid,)), ker, jax.device_put(tlog, rows), jax.device_put(lab, rows))
    results["fused_loss_sharded_tokens"] = {"state": maxdiff(whole, split),
                                            "grad_spec": str(split[1][0].sharding.spec)}
    # user mistakes: one InputError each, before anything compiles
    errors = {"compiles before errors": srun._cache_size()}
    bad = {"batch not divisible by data": lambda: kdjax.make_run(model, "ce", mesh=parallel.make_mesh(1, 8))(
               kdjax.create_train_state(model, 0, x[:1]), d, sched[:, :60], rng),
           "members not divisible": lambda: sweep.make_sweep_run(student, "kd", shared_schedule=True, mesh=mesh)(
               sweep.init_members(student, keys["init"][:6], x[:1]), d, sched, keys["dropout"][:6],
               sweep.sweep_hyper(T[:6], A[:6])),
           "mesh larger than devices": lambda: parallel.make_mesh(4, 4),
           "streaming rows not divisible": lambda: step8(b, {"x": x[:60], "y": y[:60]}, rng)}
    for name, call in bad.items():
        try:
            call()
            errors[name] = "no error"
        except InputError as e:
            errors[name] = str(e)
    errors["compiles after errors"] = srun._cache_size()
    results["errors"] = errors
    with open(out_path, "w") as f:
        json.dump(results, f)


def distributed_run(out_path):
    """A data-parallel distillation over every device of every process (4 in all)."""
    x, y = digits(256)
    tl = np.random.default_rng(2).normal(size=(len(y), 10)).astype(np.float32)
    sched = data.seed_schedule(jax.random.PRNGKey(3), len(y), 32, 10)
    model = kdjax.ResNet((1,), (4,), 10)
    mesh = parallel.make_mesh(1, 4)
    run = kdjax.make_run(model, "kd", mesh=mesh)
    state = kdjax.create_train_state(model, 0, x[:1])
    state, losses = run(state, {"x": x, "y": y, "teacher_logits": tl}, sched, jax.random.PRNGKey(4),
                        kdjax.make_hyper(4.0, 0.5))
    checkpoint.save(out_path, {"state": state, "losses": losses},
                    {"processes": jax.process_count(), "devices": len(jax.devices()),
                     "local_devices": len(jax.local_devices())})


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "single":
        single(out)
    else:
        if mode == "multihost":
            assert parallel.initialize(), "expected a 2-process environment"
        distributed_run(out)
    print("done", jax.process_index(), flush=True)
