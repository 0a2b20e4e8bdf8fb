"""Runs inside a subprocess with several (forced) CPU devices; prints one JSON line.

    python tests/parallel_script.py single OUT.json       # data/member parallel vs one device (8 devices)
    python tests/parallel_script.py multihost OUT.npz     # one process of a 2-process run (kdjax.parallel.initialize)
    python tests/parallel_script.py reference OUT.npz     # the same run in one process (4 devices)
    python tests/parallel_script.py fsdp OUT.json         # parameters sharded over "fsdp" vs unsharded (8 devices)
    (multihost / reference with a third argument "fsdp": the 2-process run with sharded parameters)

The device count comes from the caller's XLA_FLAGS.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import kdjax
from kdjax import checkpoint, convert, data, parallel, sweep
from kdjax.errors import InputError


def leaves(tree):
    return [parallel.to_host(a) for a in jax.tree_util.tree_leaves(tree)]


def maxdiff(a, b) -> float:
    return max(float(np.max(np.abs(u.astype(np.float64) - v.astype(np.float64)))) for u, v in zip(leaves(a), leaves(b)))


def messages(calls: dict) -> dict:
    """``{name: the InputError's message, or "no error"}`` of each call."""
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = "no error"
        except InputError as e:
            out[name] = str(e)
    return out


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
    want = {str(dev.id): [2 * i, 2 * i + 2] for i, row in enumerate(mesh.devices) for dev in row.ravel()}
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
    errors |= messages({
           "batch not divisible by data": lambda: kdjax.make_run(model, "ce", mesh=parallel.make_mesh(1, 8))(
               kdjax.create_train_state(model, 0, x[:1]), d, sched[:, :60], rng),
           "members not divisible": lambda: sweep.make_sweep_run(student, "kd", shared_schedule=True, mesh=mesh)(
               sweep.init_members(student, keys["init"][:6], x[:1]), d, sched, keys["dropout"][:6],
               sweep.sweep_hyper(T[:6], A[:6])),
           "mesh larger than devices": lambda: parallel.make_mesh(4, 4),
           "streaming rows not divisible": lambda: step8(b, {"x": x[:60], "y": y[:60]}, rng)})
    errors["compiles after errors"] = srun._cache_size()
    results["errors"] = errors
    with open(out_path, "w") as f:
        json.dump(results, f)


def split_fraction(tree) -> float:
    """The largest array's share held by one device (1/F when split over F devices)."""
    big = max(jax.tree_util.tree_leaves(tree), key=lambda a: a.size)
    return big.addressable_shards[0].data.size / big.size


def fsdp(out_path):
    """Float64: runs with parameters (and optimizer state, BatchNorm statistics, the
    teacher) sharded over fsdp=4 x data=2 equal the same runs on one device."""
    from kdjax.fused import FusedLM
    from kdjax.models import Llama
    from kdjax import onpolicy

    jax.config.update("jax_enable_x64", True)
    results = {"devices": len(jax.devices())}
    mesh = parallel.make_mesh(1, 2, 4)
    rng, h = jax.random.PRNGKey(1), kdjax.make_hyper(3.0, 0.7, jnp.float64)
    x, y = digits(128)
    sched = data.seed_schedule(jax.random.PRNGKey(0), len(y), 32, 4)
    tl = np.random.default_rng(0).normal(size=(len(y), 10))
    teacher = Llama(vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, dtype=jnp.float64)
    student = teacher.clone(hidden_size=16, intermediate_size=32, num_layers=1, tie_word_embeddings=True)
    tokens = np.random.default_rng(1).integers(0, 48, (32, 8)).astype(np.int32)
    lm_data = {"x": tokens, "y": np.roll(tokens, -1, 1)}
    lm_sched = data.seed_schedule(jax.random.PRNGKey(2), len(tokens), 8, 3)
    t_state = kdjax.create_train_state(teacher, 0, tokens[:1])
    cases = [("mlp", kdjax.StudentMLP(32, 10, dtype=jnp.float64), "kd", x.reshape(len(x), -1),
              {"teacher_logits": tl}, sched, (h,)),
             ("resnet_batchnorm", kdjax.ResNet((1,), (8,), 10, dtype=jnp.float64), "kd", x, {"teacher_logits": tl},
              sched, (h,)),
             ("llama_teacher_online", student, "kd", None, {}, lm_sched, (h, t_state)),
             ("llama_fused_lm", student, FusedLM(chunk_size=4), None, {}, lm_sched, (h, t_state))]
    for name, model, objective, xx, extra, sch, args in cases:
        d = dict(lm_data) if xx is None else {"x": xx.astype(np.float64), "y": y}
        d.update(extra)
        kw = {"teacher": teacher} if len(args) > 1 else {}
        one, l1 = kdjax.make_run(model, objective, **kw)(kdjax.create_train_state(model, 0, d["x"][:1]), d, sch,
                                                        rng, *args)
        start = kdjax.create_train_state(model, 0, d["x"][:1], mesh=mesh)
        init_diff = maxdiff(start, kdjax.create_train_state(model, 0, d["x"][:1]))
        run = kdjax.make_run(model, objective, mesh=mesh, **kw)
        sharded, l8 = run(start, d, sch, rng, *args)
        results[name] = {"init": init_diff, "state": maxdiff(one, sharded), "loss": maxdiff(l1, l8),
                         "held": split_fraction(sharded.params), "held_opt": split_fraction(sharded.opt_state),
                         "teacher_held": split_fraction(parallel.put(t_state, parallel.model_shardings(t_state, mesh, ())).params)
                         if len(args) > 1 else None,
                         "describe": parallel.describe_sharding(sharded.params)}
    # the on-policy step (generation inside) and a host-fed step, sharded = unsharded
    batch = {"prompts": tokens[:8, :4], "prompt_mask": np.ones((8, 4), bool), "completions": tokens[:8, 4:],
             "completion_mask": np.ones((8, 4), bool)}
    s_state = kdjax.create_train_state(student, 3, tokens[:1])
    opts = dict(lmbda=1.0, max_new_tokens=4, donate=False)
    a, ma = onpolicy.make_on_policy_step(student, teacher, "gkd", **opts)(s_state, batch, rng, t_state.variables)
    b, mb = onpolicy.make_on_policy_step(student, teacher, "gkd", mesh=mesh, **opts)(s_state, batch, rng,
                                                                                       t_state.variables)
    results["on_policy"] = {"state": maxdiff(a, b), "loss": abs(float(ma["loss"]) - float(mb["loss"])),
                            "held": split_fraction(b.params)}
    a, _ = kdjax.make_train_step(student, "kd", teacher=teacher, donate=False)(
        s_state, lm_data_batch(lm_data), rng, h, t_state)
    b, _ = kdjax.make_train_step(student, "kd", teacher=teacher, mesh=mesh, donate=False)(
        s_state, lm_data_batch(lm_data), rng, h, t_state)
    results["streaming"] = {"state": maxdiff(a, b), "held": split_fraction(b.params)}
    # a sweep: members=2 x fsdp=4, each member's state split over its own four devices
    keys = sweep.member_keys(np.array([0, 1]))
    hs = sweep.sweep_hyper([2.0, 4.0], [0.5, 0.9], jnp.float64)
    resnet = kdjax.ResNet((1,), (8,), 10, dtype=jnp.float64)
    d = {"x": x.astype(np.float64), "y": y, "teacher_logits": tl}
    base, _ = sweep.make_sweep_run(resnet, "kd", shared_schedule=True)(
        sweep.init_members(resnet, keys["init"], d["x"][:1]), d, sched, keys["dropout"], hs)
    m, _ = sweep.make_sweep_run(resnet, "kd", shared_schedule=True, mesh=parallel.make_mesh(2, 1, 4))(
        sweep.init_members(resnet, keys["init"], d["x"][:1]), d, sched, keys["dropout"], hs)
    conv = m.params["layer1"]["0"]["conv1"]["kernel"]
    results["sweep"] = {"state": maxdiff(base, m), "spec": str(conv.sharding.spec),
                        "held": conv.addressable_shards[0].data.size / conv.size}
    # two GKD students as one sweep (generation inside the vmapped run), members=2 x fsdp=4
    gkd = onpolicy.OnPolicy(teacher, "gkd", max_new_tokens=4, lmbda=1.0, prompt_length=4)
    keys = sweep.member_keys(np.array([0, 1]))
    lm_sched2 = data.seed_schedule(jax.random.PRNGKey(3), len(tokens), 8, 2)
    mesh24 = parallel.make_mesh(2, 1, 4)
    plain = sweep.init_members(student, keys["init"], tokens[:1])
    sharded_init = sweep.init_members(student, keys["init"], tokens[:1], mesh=mesh24)  # model.init, out_shardings
    init_diff, init_held = maxdiff(plain, sharded_init), split_fraction(sharded_init.params)
    base, lb = sweep.make_sweep_run(student, gkd, shared_schedule=True)(plain, lm_data, lm_sched2,
                                                                        keys["dropout"], None, t_state.variables)
    m, lm = sweep.make_sweep_run(student, gkd, shared_schedule=True, mesh=mesh24)(
        sharded_init, lm_data, lm_sched2, keys["dropout"], None, t_state.variables)
    q = m.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    results["on_policy_sweep"] = {"state": maxdiff(base, m), "loss": maxdiff(lb["loss"], lm["loss"]),
                                  "held": q.addressable_shards[0].data.size / q.size, "init": init_diff,
                                  "init_held": init_held}
    # a checkpoint of the fsdp=4 state restored straight onto fsdp=2 (each device reads its shards)
    saved = kdjax.create_train_state(student, 5, tokens[:1], mesh=mesh)
    checkpoint.save(out_path + ".fsdp.ckpt", saved)
    target = kdjax.create_train_state(student, 6, tokens[:1], mesh=parallel.make_mesh(1, 1, 2))
    back, _ = checkpoint.load(out_path + ".fsdp.ckpt", target=target)
    results["restore_on_fsdp_2"] = {"state": maxdiff(saved, back), "held": split_fraction(back.params),
                                    "devices": len(jax.tree_util.tree_leaves(back.params)[0].sharding.device_set)}
    # user rules: a rule table overrides the default; mistakes are one line each
    rules = [("embed_tokens/embedding", (None, "fsdp")), (r"mlp/.*/kernel", ("fsdp", None))]
    ruled = kdjax.create_train_state(student, 0, tokens[:1], mesh=mesh, rules=rules)
    specs = {jax.tree_util.keystr(k): str(v.sharding.spec) for k, v in jax.tree_util.tree_leaves_with_path(ruled)}
    results["rules"] = {k: v for k, v in specs.items() if "embed_tokens" in k or "up_proj" in k}
    errors = messages({"rule names nothing": lambda: kdjax.make_run(student, "kd", teacher=teacher, mesh=mesh,
                                                        rules=[("no_such_layer", (None,))])(
               kdjax.create_train_state(student, 0, tokens[:1]), lm_data, lm_sched, rng, h, t_state),
           "rule does not divide": lambda: kdjax.create_train_state(
               student, 0, tokens[:1], mesh=parallel.make_mesh(1, 1, 3), rules=[("q_proj/kernel", (None, "fsdp"))]),
           "rule axis unknown": lambda: parallel.param_specs(ruled.params, mesh, [("kernel", ("tp", None))]),
           "rule rank": lambda: parallel.param_specs(ruled.params, mesh, [("q_proj/kernel", ("fsdp",))])})
    results["errors"] = errors
    with open(out_path, "w") as f:
        json.dump(results, f)


def lm_data_batch(lm_data):
    return {k: v[:8] for k, v in lm_data.items()}


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
    checkpoint.save(out_path, {"state": state, "losses": losses}, _where())


def distributed_fsdp_run(out_path):
    """A Llama distilled from an online Llama teacher with every parameter, Adam moment and
    the teacher split over fsdp=4 (across the processes), both initialised sharded."""
    from kdjax.models import Llama

    teacher = Llama(vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    student = teacher.clone(hidden_size=16, intermediate_size=32, num_layers=1)
    tokens = np.random.default_rng(1).integers(0, 48, (32, 8)).astype(np.int32)
    mesh = parallel.make_mesh(1, 1, 4)
    t_state = kdjax.create_train_state(teacher, 0, tokens[:1], mesh=mesh)
    state = kdjax.create_train_state(student, 1, tokens[:1], mesh=mesh)
    held = split_fraction(state.params)
    run = kdjax.make_run(student, "kd", teacher=teacher, mesh=mesh)
    state, losses = run(state, {"x": tokens, "y": np.roll(tokens, -1, 1)},
                        data.seed_schedule(jax.random.PRNGKey(2), 32, 8, 4), jax.random.PRNGKey(4),
                        kdjax.make_hyper(2.0, 0.5), t_state)
    checkpoint.save(out_path, {"state": state, "losses": losses}, {**_where(), "held": held})
    convert.save_hf(student, {"params": state.params}, out_path + ".hf")  # gathered; process 0 writes


def _where() -> dict:
    return {"processes": jax.process_count(), "devices": len(jax.devices()), "local_devices": len(jax.local_devices())}


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "single":
        single(out)
    elif mode == "fsdp":
        fsdp(out)
    else:
        if mode == "multihost":
            assert parallel.initialize(), "expected a 2-process environment"
        (distributed_fsdp_run if sys.argv[3:] == ["fsdp"] else distributed_run)(out)
    print("done", jax.process_index(), flush=True)
