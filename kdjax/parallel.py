"""Many devices and hosts: a device mesh, the shardings kdjax's runs use, multi-host start-up.

kdjax does no communication of its own: arrays are placed with ``jax.sharding``
shardings, and XLA's SPMD partitioner splits the compiled runs and inserts the
collectives (the gradient all-reduce of a data-parallel step, BatchNorm's batch
statistics over the whole global batch). ``jax.distributed`` connects the hosts.

A mesh has two axes, ``("members", "data")``:

* ``"data"`` splits every batch by rows (data parallelism): parameters, optimizer and
  model state are replicated, gradients are reduced by the partitioner.
* ``"members"`` splits the students of a sweep (each member on its own devices).

Placement (``make_run(..., mesh=)``, ``make_sweep_run(..., mesh=)``,
``make_train_step(..., mesh=)`` do it for the caller):

==========================  =====================================================
what                        sharding
==========================  =====================================================
train state                 replicated (a sweep's: ``P("members")``)
fused run's data set        replicated (random minibatches read any row)
index schedule              ``P(None, "data")``: each device gathers its own rows
host-fed batch (streaming)  ``P("data")``, one process's rows each
hyperparameters, keys       replicated (a sweep's: ``P("members")``)
per-member teacher logits   ``P("members")``
==========================  =====================================================
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax.errors import InputError, check_count

__all__ = ["AXES", "make_mesh", "data_only", "replicated", "data_sharding", "member_sharding",
           "schedule_sharding", "check_divides", "put", "to_host", "initialize", "describe", "default_shape"]

AXES = ("members", "data")


def make_mesh(members: int = 1, data: int | None = None, devices: Sequence | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("members", "data")`` of shape ``(members, data)``.

    ``devices`` defaults to ``jax.devices()`` (every device of every process);
    ``data=None`` takes the devices the ``members`` axis leaves. Uses the first
    ``members * data`` devices, in order.
    """
    devices = list(jax.devices() if devices is None else devices)
    check_count("make_mesh: members", members)
    if data is not None:
        check_count("make_mesh: data", data)
    if data is None:
        if len(devices) % members:
            raise InputError(f"make_mesh: expected members to divide the {len(devices)} devices, got {members}")
        data = len(devices) // members
    if members * data > len(devices):
        raise InputError(f"make_mesh: expected members x data <= {len(devices)} devices, got "
                         f"{members} x {data} = {members * data}")
    return Mesh(np.asarray(devices[: members * data], dtype=object).reshape(members, data), AXES)


def data_only(mesh: Mesh) -> Mesh:
    """The same ``"data"`` axis with one member (the first row of devices): for a run of a
    single model beside a sweep's mesh."""
    return Mesh(mesh.devices[:1], AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (axis 0) over ``"data"``: a batch."""
    return NamedSharding(mesh, P("data"))


def member_sharding(mesh: Mesh) -> NamedSharding:
    """Axis 0 over ``"members"``: a sweep's states, hyperparameters, keys."""
    return NamedSharding(mesh, P("members"))


def schedule_sharding(mesh: Mesh, members: bool = False) -> NamedSharding:
    """A ``[steps, batch]`` schedule (``[N, steps, batch]`` with ``members``): batch columns over
    ``"data"``, so each device gathers its own rows of every minibatch."""
    return NamedSharding(mesh, P("members", None, "data") if members else P(None, "data"))


def check_divides(count: int, mesh: Mesh, axis: str, what: str) -> None:
    """``InputError`` unless the mesh axis divides ``count`` (checked before compiling)."""
    size = mesh.shape[axis]
    if count % size:
        raise InputError(f"{what}: expected a multiple of the mesh's '{axis}' axis ({size}), got {count}")


def put(tree, sharding: NamedSharding):
    """Place every leaf of ``tree`` with ``sharding`` (leaves already placed so are kept).

    On one process this is ``jax.device_put``. On many, every process passes the same
    global values (e.g. the whole data set and schedule, built from the same seeds) and
    each keeps only the shards of its own devices.
    """
    def one(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        host = to_host(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(one, tree)


def to_host(x) -> np.ndarray:
    """A NumPy copy of a (possibly sharded, possibly multi-process) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


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
    """One line: the mesh's shape and devices."""
    if mesh is None:
        d = jax.devices()[0]
        return f"one device ({d.platform})"
    devices = mesh.devices.ravel()
    hosts = len({d.process_index for d in devices})
    return (f"mesh members={mesh.shape['members']} x data={mesh.shape['data']} over {len(devices)} "
            f"{devices[0].platform} device(s)" + (f" on {hosts} processes" if hosts > 1 else ""))


def default_shape(num_devices: int, members: int, batch: int) -> tuple[int, int]:
    """The mesh the CLI uses when none is given: as many devices as possible on members
    (embarrassingly parallel), the rest on data where they divide the batch."""
    m = math.gcd(num_devices, members)
    d = num_devices // m
    while d > 1 and batch % d:
        d -= 1
    return m, d
