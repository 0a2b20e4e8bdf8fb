"""Many devices and hosts: a device mesh, the shardings kdjax's runs use, multi-host start-up.

kdjax does no communication of its own: arrays are placed with ``jax.sharding``
shardings, and XLA's SPMD partitioner splits the compiled runs and inserts the
collectives (the gradient all-reduce of a data-parallel step, the all-gather of a
sharded parameter before it is used, BatchNorm's batch statistics over the whole
global batch). ``jax.distributed`` connects the hosts.

A mesh has three axes, ``("members", "data", "fsdp")``:

* ``"data"`` splits every batch by rows (data parallelism).
* ``"fsdp"`` splits every batch by rows too, and also the parameters, the optimizer
  state and the model state (fully sharded data parallelism, ZeRO-3): each device
  holds ~1/F of every large array, and the partitioner gathers a parameter where a
  layer needs it. A batch is split over ``data x fsdp`` devices.
* ``"members"`` splits the students of a sweep (each member on its own devices).

Placement (``make_run(..., mesh=)``, ``make_sweep_run(..., mesh=)``,
``make_train_step(..., mesh=)``, ``make_on_policy_step(..., mesh=)`` do it for the caller):

==========================  =====================================================
what                        sharding
==========================  =====================================================
params, optimizer state,    ``param_specs``: by rule over ``"fsdp"``, replicated
model state, teacher        over ``"data"`` (a sweep's: ``"members"`` on axis 0)
fused run's data set        replicated (random minibatches read any row)
index schedule              ``P(None, ("data", "fsdp"))``: each device gathers its rows
host-fed batch (streaming)  ``P(("data", "fsdp"))``, one process's rows each
hyperparameters, keys       replicated (a sweep's: ``P("members")``)
per-member teacher logits   ``P("members")``
==========================  =====================================================

The rule for an array (``param_specs``): the first user rule ``(pattern, spec)`` whose
regular expression ``re.search``-es the array's path (``"/"``-joined names inside its
collection, e.g. ``"layers_0/attn/q_proj/kernel"``; an optimizer-state array takes the
rule of the parameter it belongs to), else the default: the largest dimension that
``"fsdp"`` divides (the first of equals) over ``"fsdp"``; an array with none is
replicated. With ``fsdp=1`` everything is replicated, as before.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax.errors import InputError, InputTypeError, check_count

__all__ = ["AXES", "BATCH", "make_mesh", "data_only", "replicated", "data_sharding", "member_sharding",
           "schedule_sharding", "check_divides", "param_specs", "state_specs", "model_shardings", "shardings", "check_rules",
           "constrain", "put", "to_host", "initialize", "describe", "describe_sharding", "default_shape"]

AXES = ("members", "data", "fsdp")
BATCH = ("data", "fsdp")  # the axes a batch's rows are split over


def make_mesh(members: int = 1, data: int | None = None, fsdp: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("members", "data", "fsdp")`` of shape ``(members, data, fsdp)``.

    ``devices`` defaults to ``jax.devices()`` (every device of every process);
    ``data=None`` takes the devices ``members x fsdp`` leave. Uses the first
    ``members * data * fsdp`` devices, in order (``fsdp`` varies fastest: a parameter's
    shards sit on neighbouring devices).

    Args:
      members, fsdp: ints >= 1.
      data: an int >= 1, or None (the devices left).
      devices: a non-empty sequence of distinct ``jax.Device``s (default ``jax.devices()``).

    Returns:
      The ``Mesh``.

    Raises:
      InputTypeError: a count that is not an int; ``devices`` that is not a sequence of devices.
      InputError: a count < 1; ``devices`` empty or naming a device twice; ``members x fsdp``
        that does not divide the devices (``data=None``); ``members x data x fsdp`` larger than
        the devices.
    """
    check_count("make_mesh: members", members)
    check_count("make_mesh: fsdp", fsdp)
    if data is not None:
        check_count("make_mesh: data", data)
    if devices is None:
        devices = jax.devices()
    elif isinstance(devices, (str, bytes)) or not hasattr(devices, "__iter__"):
        raise InputTypeError(f"make_mesh: devices: expected a sequence of jax devices, got {type(devices).__name__}")
    devices = list(devices)
    if not devices:
        raise InputError("make_mesh: devices: expected at least one device, got an empty sequence")
    for d in devices:
        if not isinstance(d, jax.Device):
            raise InputTypeError(f"make_mesh: devices: expected jax devices (jax.devices()), got "
                                 f"{d!r} ({type(d).__name__})")
    seen = set()
    for d in devices:
        if d in seen:
            raise InputError(f"make_mesh: devices: expected distinct devices, got {d} more than once")
        seen.add(d)
    if data is None:
        if len(devices) % (members * fsdp):
            raise InputError(f"make_mesh: expected members x fsdp to divide the {len(devices)} devices, got "
                             f"{members} x {fsdp}")
        data = len(devices) // (members * fsdp)
    if members * data * fsdp > len(devices):
        raise InputError(f"make_mesh: expected members x data x fsdp <= {len(devices)} devices, got "
                         f"{members} x {data} x {fsdp} = {members * data * fsdp}")
    grid = np.asarray(devices[: members * data * fsdp], dtype=object).reshape(members, data, fsdp)
    return Mesh(grid, AXES)


def data_only(mesh: Mesh) -> Mesh:
    """The same ``"data"`` and ``"fsdp"`` axes with one member (the first row of devices):
    for a run of a single model beside a sweep's mesh.

    Args:
      mesh: a mesh of ``make_mesh``.

    Returns:
      The ``Mesh`` of its first member row.
    """
    return Mesh(mesh.devices[:1], AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every array whole on every device: data sets, the step counter.

    Args:
      mesh: a mesh of ``make_mesh``.

    Returns:
      The ``NamedSharding``.
    """
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (axis 0) over ``"data"`` and ``"fsdp"``: a batch.

    Args:
      mesh: a mesh of ``make_mesh``.

    Returns:
      The ``NamedSharding``.
    """
    return NamedSharding(mesh, P(BATCH))


def member_sharding(mesh: Mesh) -> NamedSharding:
    """Axis 0 over ``"members"``: a sweep's hyperparameters, keys.

    Args:
      mesh: a mesh of ``make_mesh``.

    Returns:
      The ``NamedSharding``.
    """
    return NamedSharding(mesh, P("members"))


def schedule_sharding(mesh: Mesh, members: bool = False) -> NamedSharding:
    """A ``[steps, batch]`` schedule (``[N, steps, batch]`` with ``members``): batch columns over
    ``"data"`` and ``"fsdp"``, so each device gathers its own rows of every minibatch.

    Args:
      mesh: a mesh of ``make_mesh``; members: the schedule has a leading member axis.

    Returns:
      The ``NamedSharding``.
    """
    return NamedSharding(mesh, P("members", None, BATCH) if members else P(None, BATCH))


def check_divides(count: int, mesh: Mesh, axis: str | tuple, what: str) -> None:
    """``InputError`` unless the mesh axis (or axes: their product) divides ``count`` (checked
    before compiling).

    Args:
      count: the number to split; mesh: the mesh; axis: an axis name or a tuple of them.
      what: the name in the error message.

    Raises:
      InputError: the axes' product does not divide ``count``.
    """
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    size = math.prod(mesh.shape[a] for a in names)
    if count % size:
        label = " x ".join(f"'{a}' ({mesh.shape[a]})" for a in names)
        raise InputError(f"{what}: expected a multiple of the mesh's {label} = {size}, got {count}")


def put(tree, sharding):
    """Place every leaf of ``tree`` with ``sharding`` (one ``NamedSharding``, or a tree of them
    shaped like ``tree``; leaves already placed so are kept).

    On one process this is ``jax.device_put``. On many, every process passes the same
    global values (e.g. the whole data set and schedule, built from the same seeds) and
    each keeps only the shards of its own devices.

    Args:
      tree: a pytree of arrays; sharding: a ``NamedSharding`` or a tree of them like ``tree``.

    Returns:
      ``tree`` with every leaf a placed ``jax.Array``.
    """
    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        host = to_host(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(sharding, NamedSharding):
        return jax.tree_util.tree_map(lambda x: one(x, sharding), tree)
    return jax.tree_util.tree_map(one, tree, sharding)


def to_host(x) -> np.ndarray:
    """A NumPy copy of a (possibly sharded, possibly multi-process) array.

    Args:
      x: an array (a ``jax.Array``, sharded or not, or anything NumPy reads).

    Returns:
      The whole array as NumPy.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        barrier("kdjax_to_host")
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def barrier(name: str) -> None:
    """Wait until every process reaches ``barrier(name)``; a no-op for one process.

    Before a cross-process collective: gloo gives a collective's first connection 30 s,
    and a process may arrive later than that (members on separate processes share no
    collective while they train); the coordination service's barrier waits 10 minutes.

    Args:
      name: the barrier's name, the same on every process.
    """
    if jax.process_count() > 1:
        from jax._src import distributed  # the one barrier with a timeout JAX offers

        distributed.global_state.client.wait_at_barrier(name, 600_000)


_ENV = ("KDJAX_COORDINATOR", "KDJAX_NUM_PROCESSES", "KDJAX_PROCESS_ID")
# Environments in which JAX's own cluster detection finds the coordinator (SLURM, Open MPI,
# multi-host TPU); kdjax asks it only when one of these says there is more than one process.
_CLUSTER_SIZE = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def initialize(environ=None) -> bool:
    """Start ``jax.distributed`` for a multi-process run; a no-op for one process.

    From ``KDJAX_COORDINATOR=host:port``, ``KDJAX_NUM_PROCESSES`` and ``KDJAX_PROCESS_ID``
    (all three, or none), else from a cluster JAX detects by itself (SLURM, Open MPI,
    TPU pods). Call it first, before anything touches a device. Returns True if it
    connected. An incomplete or invalid environment raises ``InputError``.

    Args:
      environ: the environment to read (default ``os.environ``).

    Returns:
      True if ``jax.distributed`` was started.

    Raises:
      InputError: some but not all of the three variables, or a malformed one.
    """
    env = os.environ if environ is None else environ
    given = {k: env[k] for k in _ENV if env.get(k)}
    if given and len(given) < len(_ENV):
        missing = [k for k in _ENV if k not in given]
        raise InputError(f"initialize: expected all of {', '.join(_ENV)}, missing {', '.join(missing)}")
    if given:
        host, _, port = given["KDJAX_COORDINATOR"].rpartition(":")
        if not host or not port.isdigit():
            raise InputError(f"KDJAX_COORDINATOR: expected host:port, got {given['KDJAX_COORDINATOR']!r}")
        try:
            n, i = int(given["KDJAX_NUM_PROCESSES"]), int(given["KDJAX_PROCESS_ID"])
        except ValueError:
            raise InputError(f"KDJAX_NUM_PROCESSES / KDJAX_PROCESS_ID: expected integers, got "
                             f"{given['KDJAX_NUM_PROCESSES']!r} / {given['KDJAX_PROCESS_ID']!r}") from None
        if n < 1 or not 0 <= i < n:
            raise InputError(f"KDJAX_PROCESS_ID: expected 0 <= id < KDJAX_NUM_PROCESSES ({n}), got {i}")
        if n == 1:
            return False
        jax.distributed.initialize(given["KDJAX_COORDINATOR"], n, i)
        return True
    if any(_int(env.get(k, "1")) > 1 for k in _CLUSTER_SIZE if k != "TPU_WORKER_HOSTNAMES") or \
            "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()
        return True
    return False


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 1


def describe(mesh: Mesh | None) -> str:
    """One line: the mesh's shape and devices.

    Args:
      mesh: a mesh, or None (one device).

    Returns:
      The line.
    """
    if mesh is None:
        d = jax.devices()[0]
        return f"one device ({d.platform})"
    devices = mesh.devices.ravel()
    hosts = len({d.process_index for d in devices})
    return (f"mesh members={mesh.shape['members']} x data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over "
            f"{len(devices)} "
            f"{devices[0].platform} device(s)" + (f" on {hosts} processes" if hosts > 1 else ""))


def default_shape(num_devices: int, members: int, batch: int) -> tuple[int, int]:
    """The mesh the CLI uses when none is given: as many devices as possible on members
    (embarrassingly parallel), the rest on data where they divide the batch.

    Args:
      num_devices: the devices; members: the sweep's members; batch: the batch size.

    Returns:
      ``(members, data)`` axis sizes.
    """
    m = math.gcd(num_devices, members)
    d = num_devices // m
    while d > 1 and batch % d:
        d -= 1
    return m, d


# parameter sharding (kdjax/parallel/specs.py), importable from here as before
from kdjax.parallel.specs import (  # noqa: E402
    check_rules, constrain, describe_sharding, model_shardings, param_specs, shardings, state_specs)
