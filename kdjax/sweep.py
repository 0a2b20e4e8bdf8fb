"""Many students as one compiled program: ``vmap`` over (temperature, alpha, seed).

Each member of a sweep has its own init, index schedule and dropout key (from its
seed) and its own temperature/alpha (traced arrays); the data and the cached teacher
logits are shared. N students cost about N students of compute and one compilation,
and a new grid of values with the same size reuses that compilation.
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import parallel
from kdjax.data import epoch_schedule, seed_schedule
from kdjax.errors import InputError
from kdjax.train import (CheckedRun, evaluate, init_variables, make_hyper, make_train_step, run_steps,
                         state_from_params)

__all__ = ["grid", "member_keys", "init_members", "member_schedules", "make_sweep_run",
           "evaluate_members", "sweep_hyper"]


def grid(temperatures: Sequence[float], alphas: Sequence[float], seeds: Sequence[int]):
    """Flatten the Cartesian product into three equal-length NumPy arrays (T-major)."""
    rows = list(itertools.product(temperatures, alphas, seeds))
    if not rows:
        raise InputError("grid: expected at least one temperature, alpha and seed, got an empty axis")
    t, a, s = (np.asarray(col) for col in zip(*rows))
    return t.astype(np.float64), a.astype(np.float64), s.astype(np.int64)


def member_keys(seeds) -> dict[str, np.ndarray]:
    """Per-member raw ``uint32[2]`` PRNG keys for init, schedule and dropout.

    Derived with NumPy's ``SeedSequence`` (built for spawning independent streams from
    one integer), so no program is compiled just to make keys. Arrays ``[N, 2]``.
    """
    words = np.stack([np.random.SeedSequence(int(s)).generate_state(6, np.uint32)
                      for s in np.ravel(seeds)])
    return {"init": words[:, 0:2], "schedule": words[:, 2:4], "dropout": words[:, 4:6]}


def init_members(model, init_keys, example_input, learning_rate=1e-3, *, tx=None):
    """A batched ``TrainState``: one member per key (leading axis N).

    ``example_input`` is an example batch or an int ``input_dim``, as in
    ``create_train_state``; member i starts exactly where ``create_train_state(model,
    init_keys[i], example_input)`` does (params, ``model_state`` and optimizer state).
    """
    if isinstance(example_input, (int, np.integer)):
        example_input = jax.ShapeDtypeStruct((1, int(example_input)), getattr(model, "dtype", jnp.float32))
    params, model_state = init_variables(model, init_keys, example_input, members=True)
    return state_from_params(params, model_state=model_state, learning_rate=learning_rate, tx=tx,
                             members=True)


def member_schedules(schedule_keys, num_samples: int, batch_size: int, *, steps: int | None = None,
                     epochs: int | None = None):
    """``[N, steps, batch]`` schedules: the seed's random minibatches, or real epochs."""
    if (steps is None) == (epochs is None):
        raise InputError("member_schedules: expected exactly one of steps or epochs")
    if steps is not None:
        make = functools.partial(seed_schedule, num_samples=num_samples,
                                 batch_size=batch_size, steps=steps)
    else:
        make = functools.partial(epoch_schedule, num_samples=num_samples,
                                 batch_size=batch_size, epochs=epochs)
    return np.stack([make(k) for k in schedule_keys])


def make_sweep_run(model, objective="kd", *, tx=None, teacher=None,
                   shared_schedule: bool = False, member_teacher_logits: bool = False, mesh=None):
    """Jitted ``vmap`` of ``run_steps`` over members.

    Call as ``run(states, data, schedules, rngs, hyper)`` with ``states``, ``rngs`` and
    the fields of ``hyper`` batched on axis 0 and ``data`` shared. ``schedules`` is
    ``[N, steps, batch]``, or one ``[steps, batch]`` schedule for every member when
    ``shared_schedule`` (a sweep over temperature x alpha at one seed: every member
    sees the same minibatches, so the first layer is one wide matmul for all members).
    With ``member_teacher_logits``, ``data["teacher_logits"]`` is ``[N, n, classes]``:
    member i distills from its own teacher (e.g. one teacher per seed). Schedules with
    an index outside the data's rows are refused on the host (``train.CheckedRun``).
    Every member's ``model_state`` (BatchNorm statistics) is its own.

    With a ``mesh`` the members are split over its ``"members"`` axis and every member's
    minibatches over its ``"data"`` axis (both must divide evenly: checked before
    compiling); inputs are placed for the caller and the results come back sharded over
    ``"members"``.
    """
    step = make_train_step(model, objective, tx=tx, teacher=teacher, jit=False)
    hyper_axes = None if objective == "ce" else 0
    data_axes = {"x": None, "y": None, "teacher_logits": 0} if member_teacher_logits else None
    in_axes = (0, data_axes, None if shared_schedule else 0, 0, hyper_axes)
    if mesh is None:
        vrun = jax.vmap(functools.partial(run_steps, step=step), in_axes=in_axes)
        return CheckedRun(jax.jit(vrun, donate_argnums=0))
    run = functools.partial(run_steps, step=step, batch_sharding=parallel.data_sharding(mesh))
    vrun = jax.vmap(run, in_axes=in_axes, spmd_axis_name="members")
    jitted = jax.jit(vrun, donate_argnums=0, out_shardings=parallel.member_sharding(mesh))
    place = functools.partial(_place_members, mesh, shared_schedule, member_teacher_logits)
    return CheckedRun(jitted, place=place)


def _place_members(mesh, shared_schedule, member_teacher_logits, states, data, schedules, args, kwargs):
    members = np.shape(jax.tree_util.tree_leaves(states)[0])[0]
    parallel.check_divides(members, mesh, "members", "members")
    parallel.check_divides(np.shape(schedules)[-1], mesh, "data", "batch size")
    rep, mem = parallel.replicated(mesh), parallel.member_sharding(mesh)
    data = {k: parallel.put(v, mem if (k == "teacher_logits" and member_teacher_logits) else rep)
            for k, v in data.items()}
    schedules = parallel.put(schedules, parallel.schedule_sharding(mesh, members=not shared_schedule))
    return parallel.put(states, mem), data, schedules, parallel.put(args, mem), kwargs


def evaluate_members(model, params, x, y):
    """``evaluate`` for every member: ``{"loss": [N], "accuracy": [N]}``."""
    return evaluate(model, params, x, y, members=True)


def sweep_hyper(temperatures, alphas, dtype=jnp.float32):
    """Validated, batched ``Hyper`` for a sweep."""
    return make_hyper(np.asarray(temperatures), np.asarray(alphas), dtype)
