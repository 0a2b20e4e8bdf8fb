"""Many students as one compiled program: ``vmap`` over (temperature, alpha, seed).

Each member of a sweep has its own init, index schedule and dropout key (from its
seed) and its own temperature/alpha (traced arrays); the data and the cached teacher
logits are shared. N students cost about N students of compute and one compilation,
and a new grid of values with the same size reuses that compilation. Members may also
run in groups or one at a time inside that program (``members_per_group``; chosen by
timing with ``pick_members_per_group``).
"""

from __future__ import annotations

import functools
import itertools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import parallel
from kdjax.data import epoch_schedule, random_batch_schedule
from kdjax.errors import InputError
from kdjax.train import (CheckedRun, evaluate, init_variables, make_hyper, make_train_step, run_steps,
                         state_from_params)
from kdjax.train.state import _create_sharded

__all__ = ["grid", "member_keys", "init_members", "member_schedules", "make_sweep_run",
           "pick_members_per_group", "evaluate_members", "sweep_hyper"]


def grid(temperatures: Sequence[float], alphas: Sequence[float], seeds: Sequence[int]):
    """Flatten the Cartesian product of the three axes into one row per member.

    Args:
      temperatures, alphas, seeds: the values of each axis.

    Returns:
      ``(temperatures, alphas, seeds)``: equal-length NumPy arrays (float64, float64, int64),
      temperature-major (the seed varies fastest).

    Raises:
      InputError: an empty axis.
    """
    rows = list(itertools.product(temperatures, alphas, seeds))
    if not rows:
        raise InputError("grid: expected at least one temperature, alpha and seed, got an empty axis")
    t, a, s = (np.asarray(col) for col in zip(*rows))
    return t.astype(np.float64), a.astype(np.float64), s.astype(np.int64)


def member_keys(seeds) -> dict[str, np.ndarray]:
    """Per-member raw ``uint32[2]`` PRNG keys for init, schedule and dropout.

    Derived with NumPy's ``SeedSequence`` (built for spawning independent streams from
    one integer), so no program is compiled just to make keys.

    Args:
      seeds: N integer seeds (any shape; flattened).

    Returns:
      ``{"init", "schedule", "dropout"}``: ``[N, 2]`` uint32 arrays.
    """
    words = np.stack([np.random.SeedSequence(int(s)).generate_state(6, np.uint32)
                      for s in np.ravel(seeds)])
    return {"init": words[:, 0:2], "schedule": words[:, 2:4], "dropout": words[:, 4:6]}


def init_members(model, init_keys, example_input, learning_rate=1e-3, *, tx=None, mesh=None, rules=None):
    """A batched ``TrainState``: one member per key (leading axis N).

    Member i starts exactly where ``create_train_state(model, init_keys[i], example_input)``
    does (params, ``model_state`` and optimizer state).

    Args:
      model: any linen module called as ``model(x, train=bool)``.
      init_keys: ``[N, 2]`` raw keys (``member_keys(seeds)["init"]``).
      example_input: an example batch (array or ``jax.ShapeDtypeStruct``) or an int
        ``input_dim``, as in ``create_train_state``.
      learning_rate, tx: as ``create_train_state``'s (default ``adam(learning_rate)``).
      mesh, rules: create the state sharded as ``make_sweep_run(..., mesh=, rules=)`` places
        it (members over ``"members"``, each member's arrays over ``"fsdp"``), as
        ``create_train_state(..., mesh=)`` does.

    Returns:
      The batched ``TrainState``.

    Raises:
      InputError: ``init_keys`` not ``[N, 2]`` with N >= 1, or a learning rate that is not > 0.
      InputTypeError: a model that is not a linen module called with ``train=``.
    """
    if isinstance(example_input, (int, np.integer)):
        example_input = jax.ShapeDtypeStruct((1, int(example_input)), getattr(model, "dtype", jnp.float32))
    if mesh is not None and getattr(model, "kdjax_init", None) is None:
        keys = np.asarray(init_keys)
        if keys.ndim != 2 or len(keys) == 0:
            raise InputError(f"init_keys: expected [N, 2] raw keys (N >= 1), got shape {keys.shape}")
        return _create_sharded(model, keys, example_input, tx, learning_rate, mesh, rules, members=True)
    params, model_state = init_variables(model, init_keys, example_input, members=True)
    state = state_from_params(params, model_state=model_state, learning_rate=learning_rate, tx=tx, members=True)
    return state if mesh is None else parallel.put(state, parallel.model_shardings(state, mesh, rules, members=True))


def member_schedules(schedule_keys, num_samples: int, batch_size: int, *, steps: int | None = None,
                     epochs: int | None = None):
    """One index schedule per member: the reference script's random minibatches, or real epochs.

    Args:
      schedule_keys: one key per member (``member_keys(seeds)["schedule"]``).
      num_samples, batch_size: the training rows and the minibatch size.
      steps, epochs: exactly one of them: ``random_batch_schedule``'s steps or ``epoch_schedule``'s passes.

    Returns:
      ``[N, steps, batch_size]`` int32 indices (NumPy).

    Raises:
      InputError: both or neither of ``steps`` and ``epochs``; a batch size outside
        ``[1, num_samples]`` or a count < 1.
    """
    if (steps is None) == (epochs is None):
        raise InputError("member_schedules: expected exactly one of steps or epochs")
    if steps is not None:
        make = functools.partial(random_batch_schedule, num_samples=num_samples,
                                 batch_size=batch_size, steps=steps)
    else:
        make = functools.partial(epoch_schedule, num_samples=num_samples,
                                 batch_size=batch_size, epochs=epochs)
    return np.stack([make(k) for k in schedule_keys])


def make_sweep_run(model, objective="kd", *, tx=None, teacher=None,
                   shared_schedule: bool = False, member_teacher_logits: bool = False, mesh=None,
                   rules=None, members_per_group: int | None = None):
    """Jitted ``vmap`` of ``run_steps`` over members.

    Call as ``run(states, data, schedules, rngs, hyper=None, teacher_variables=None)`` with
    ``states``, ``rngs`` and the fields of ``hyper`` batched on axis 0 and ``data`` shared;
    ``teacher_variables``: an online teacher's (shared, or one per member with
    ``member_teacher_logits``), for an objective that runs the teacher in the step;
    ``schedules``: ``[N, steps, batch]``, or one ``[steps, batch]`` with ``shared_schedule``.
    Schedules with an index outside the data's rows are refused on the host
    (``train.CheckedRun``). Every member's ``model_state`` (BatchNorm statistics) is its own.

    Args:
      model, objective, tx, teacher: as ``kdjax.train.make_run``.
      shared_schedule: one schedule for every member (a sweep over temperature x alpha at one
        seed: every member sees the same minibatches, so the first layer is one wide matmul).
      member_teacher_logits: ``data["teacher_logits"]`` is ``[N, n, classes]`` (and every leaf
        of ``data["teacher_features"]`` has a leading ``N``): member i distills from its own
        teacher (e.g. one teacher per seed).
      mesh: split the members over its ``"members"`` axis and every member's minibatches over
        its ``"data"`` and ``"fsdp"`` axes (both must divide evenly: checked before
        compiling); inputs are placed for the caller and the results come back sharded so.
      rules: with a mesh, how every member's state is sharded over ``"fsdp"``
        (``kdjax.parallel.param_specs``).
      members_per_group: (no mesh) run the members that many at a time, one group after
        another in the same program (``lax.map`` over groups, each group a ``vmap``; 1 is
        members in sequence). The default, None, is one ``vmap`` of all of them (for one
        member, its plain program: ``make_run``'s results, bitwise). Every choice computes
        the same per-member functions; the floating-point results may differ in the last bits
        (XLA may order a batched matmul's sums differently from an unbatched one's).
        ``pick_members_per_group`` chooses by timing.

    Returns:
      ``run(...) -> (states, metrics)``, ``metrics["loss"]`` ``[N, steps]``; the ``states``
      passed in are donated.

    Raises:
      InputError: ``members_per_group`` with a mesh, or not a positive int; ``objective`` not
        an objective (``kdjax.objectives.as_objective``).
      InputTypeError: a model or teacher that is not a linen module called with ``train=``.
    """
    step = make_train_step(model, objective, tx=tx, teacher=teacher, jit=False)
    teacher_axes = 0 if member_teacher_logits else None  # an online teacher: one per member, or shared
    # (state, own data, schedule, rng, hyper, teacher variables)
    in_axes = (0, 0, None if shared_schedule else 0, 0, 0, teacher_axes)
    split = functools.partial(_split_data, member_teacher_logits)
    if members_per_group is not None:
        if mesh is not None:
            raise InputError("members_per_group: groups of members run on one device; got it with a mesh "
                             "(a mesh splits members over its 'members' axis instead)")
        if isinstance(members_per_group, bool) or not isinstance(members_per_group, (int, np.integer)) \
                or members_per_group < 1:
            raise InputError(f"members_per_group: expected a positive int or None, got {members_per_group!r}")
        grouped = functools.partial(_grouped_run, step=step, in_axes=in_axes, size=int(members_per_group),
                                    split=split)
        return CheckedRun(jax.jit(grouped, donate_argnums=0))
    if mesh is None:
        vrun = functools.partial(_vmapped_run, step=step, in_axes=in_axes, split=split, batch_sharding=None)
        return CheckedRun(jax.jit(vrun, donate_argnums=0))
    rules = parallel.check_rules(rules, mesh)
    vrun = functools.partial(_vmapped_run, step=step, in_axes=in_axes, split=split,
                             batch_sharding=parallel.data_sharding(mesh),
                             state_sharding=functools.partial(parallel.model_shardings, mesh=mesh, rules=rules))
    jitted = jax.jit(vrun, donate_argnums=0)
    place = functools.partial(_place_members, mesh, rules, shared_schedule, member_teacher_logits, in_axes)
    return CheckedRun(jitted, place=place)


# data entries that are per member (one teacher per member) with member_teacher_logits
_PER_MEMBER = ("teacher_logits", "teacher_features")


def _split_data(per_member: bool, data):
    """``(shared, own)``: the data every member reads, and the entries with a member axis."""
    own = {k: v for k, v in data.items() if per_member and k in _PER_MEMBER}
    return {k: v for k, v in data.items() if k not in own}, own


def _check_hyper(states, hyper) -> None:
    """One line when a field of ``hyper`` is not one value per member (shapes: free at trace time)."""
    n = np.shape(jax.tree_util.tree_leaves(states)[0])[0]
    for path, leaf in jax.tree_util.tree_leaves_with_path(hyper):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != n:
            raise InputError(f"hyper{jax.tree_util.keystr(path)}: expected one value per member, shape [{n}] "
                             f"(kdjax.sweep.sweep_hyper), got shape {tuple(np.shape(leaf))}; an objective that "
                             f"reads no hyper takes None")


def _vmapped_run(states, data, schedules, rngs, hyper=None, teacher=None, *, step, in_axes, split, batch_sharding,
                 state_sharding=None):
    _check_hyper(states, hyper)
    if batch_sharding is None and np.shape(jax.tree_util.tree_leaves(states)[0])[0] == 1:
        # one member: XLA:CPU runs a vmap over a batch of one slower than the plain program
        # (docs/benchmarks.md); the same member function, unbatched
        return _grouped_run(states, data, schedules, rngs, hyper, teacher, step=step, in_axes=in_axes, size=1,
                            split=split)
    shared, own = split(data)

    def member(state, own, schedule, rng, hyp, t):
        # (inside vmap's spmd_axis_name, every sharding constraint also splits axis 0 over "members")
        return run_steps(state, {**shared, **own}, schedule, rng, hyp, t, step=step, batch_sharding=batch_sharding,
                         state_sharding=state_sharding)

    spmd = None if batch_sharding is None else "members"
    return jax.vmap(member, in_axes=in_axes, spmd_axis_name=spmd)(states, own, schedules, rngs, hyper, teacher)


def pick_members_per_group(model, objective, states, data, schedules, rngs, hyper=None, *,
                           candidates=None, repeats: int = 3, **make_kw):
    """Time ``make_sweep_run(model, objective, members_per_group=g, **make_kw)`` for each
    ``g`` in ``candidates`` on these inputs.

    Each candidate compiles once and runs ``1 + repeats`` times, interleaved with the
    others, on a copy of ``states`` (nothing is donated or changed). The choice depends on
    the machine and its load: record it and pass it back explicitly to repeat a run bitwise.

    Args:
      model, objective: as ``make_sweep_run``; make_kw: its other keywords.
      states, data, schedules, rngs, hyper: a sweep run's arguments; pass a short
        ``schedules``, e.g. one chunk of the real run.
      candidates: the ``members_per_group`` values to time. Default: None (one vmap of all N
        members), 1 (members in sequence) and the largest divisor of N not above sqrt(N)
        (groups); only None for one member.
      repeats: timed runs per candidate, >= 1.

    Returns:
      ``(fastest g, {g: median seconds})``.

    Raises:
      InputError: ``repeats`` < 1, or as ``make_sweep_run``.
    """
    if repeats < 1:
        raise InputError(f"repeats: expected a positive int, got {repeats}")
    n = int(np.shape(jax.tree_util.tree_leaves(states)[0])[0])
    if candidates is None:  # (one member: nothing to choose)
        group = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
        candidates = list(dict.fromkeys([None, 1, group])) if n > 1 else [None]
    runs = {g: make_sweep_run(model, objective, members_per_group=g, **make_kw) for g in candidates}
    times = {g: [] for g in candidates}
    for k in range(repeats + 1):  # the first round compiles and warms up
        for g, run in runs.items():
            copy = jax.tree_util.tree_map(jnp.copy, states)
            t0 = time.perf_counter()
            jax.block_until_ready(run(copy, data, schedules, rngs, hyper))
            if k:
                times[g].append(time.perf_counter() - t0)
    medians = {g: float(np.median(t)) for g, t in times.items()}
    return min(medians, key=medians.get), medians


def _grouped_run(states, data, schedules, rngs, hyper=None, teacher=None, *, step, in_axes, size, split):
    _check_hyper(states, hyper)
    # lax.map over the per-member arguments (in_axes 0; of data, the per-member teacher
    # entries); the rest is shared by every member.
    shared, own = split(data)
    args = (schedules, hyper, teacher)
    per_member = [a if axis == 0 else None for a, axis in zip(args, (in_axes[2], in_axes[4], in_axes[5]))]

    def member(m):
        state, own, rng, *mine = m
        schedule, hyp, t = [whole if one is None else one for whole, one in zip(args, mine)]
        return run_steps(state, {**shared, **own}, schedule, rng, hyp, t, step=step)

    # size 1: a plain loop over members, the single run's own program per member
    # (lax.map's batch_size=1 would still vmap each member over a batch of one)
    return jax.lax.map(member, (states, own, rngs, *per_member), batch_size=None if size == 1 else size)


def _place_members(mesh, rules, shared_schedule, member_teacher_logits, in_axes, states, data, schedules,
                   args, kwargs):
    members = np.shape(jax.tree_util.tree_leaves(states)[0])[0]
    parallel.check_divides(members, mesh, "members", "members")
    _check_hyper(states, args[1] if len(args) > 1 else kwargs.get("hyper"))
    parallel.check_divides(np.shape(schedules)[-1], mesh, parallel.BATCH, "batch size")
    parallel.check_rules(rules, mesh, states.params)
    rep, mem = parallel.replicated(mesh), parallel.member_sharding(mesh)
    data = {k: parallel.put(v, mem if (k in _PER_MEMBER and member_teacher_logits) else rep)
            for k, v in data.items()}
    schedules = parallel.put(schedules, parallel.schedule_sharding(mesh, members=not shared_schedule))
    states = parallel.put(states, parallel.model_shardings(states, mesh, rules, members=True))
    rngs, hyper, teacher = (tuple(args) + (None, None))[:3]
    placed = [parallel.put(rngs, mem), parallel.put(hyper, mem)]
    if teacher is not None:
        placed.append(parallel.put(teacher, parallel.model_shardings(teacher, mesh, rules, members=in_axes[5] == 0)))
    return states, data, schedules, tuple(placed), kwargs


def evaluate_members(model, params, x, y):
    """``evaluate`` for every member.

    Args:
      model: the module; params: the batched ``TrainState`` (or params); x, y: the data.

    Returns:
      ``{"loss": [N], "accuracy": [N]}`` (device arrays).
    """
    return evaluate(model, params, x, y, members=True)


def sweep_hyper(temperatures, alphas, dtype=jnp.float32):
    """Validated, batched ``Hyper`` for a sweep (``make_hyper`` of arrays).

    Args:
      temperatures, alphas: one value per member; dtype: the arrays' dtype.

    Returns:
      A ``Hyper`` with ``[N]`` fields.

    Raises:
      InputError: a temperature that is not finite and > 0, or an alpha outside [0, 1].
    """
    return make_hyper(np.asarray(temperatures), np.asarray(alphas), dtype)
