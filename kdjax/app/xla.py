"""XLA options of kdjax's entry points, set before JAX starts its backend.

The ``kdjax`` command, ``python -m parity`` and ``python -m benchmarks`` route XLA:CPU's
float32 convolutions to its Eigen kernels instead of the YNNPACK fusions this jaxlib picks
by default (``docs/benchmarks.md`` has the measurements: about 3x faster convolutions with
gradients on CPU, bitwise reproducible across processes). Only those entry points do it:
the library never sets a process-wide option. A library user who wants the same adds the
flag to ``XLA_FLAGS`` before importing JAX::

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution python train.py

XLA aborts on a flag it does not know, so the flag is added only for jaxlib versions it was
measured on, never twice, never over a setting of the user's, and not at all with
``KDJAX_XLA_DEFAULTS=off`` (JAX's own defaults) or when JAX is told to use no CPU.
"""

from __future__ import annotations

import os
from importlib import metadata

__all__ = ["EIGEN_CONVOLUTIONS", "KNOWN_JAXLIB", "cpu_flags", "apply"]

EIGEN_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
KNOWN_JAXLIB = ((0, 10),)  # (major, minor) of the jaxlib releases the flag was measured on


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def cpu_flags(environ=os.environ, jaxlib_version: tuple[int, int] | None | str = "installed") -> list[str]:
    """The flags ``apply`` would add to ``environ["XLA_FLAGS"]`` (none when unsafe or unwanted)."""
    version = _jaxlib_version() if jaxlib_version == "installed" else jaxlib_version
    if environ.get("KDJAX_XLA_DEFAULTS", "").lower() in ("off", "0", "jax", "none"):
        return []
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and "cpu" not in platforms:
        return []
    if version not in KNOWN_JAXLIB:  # an older or newer jaxlib may not know the flag: JAX's defaults
        return []
    if "xla_cpu_experimental_ynn_fusion_type" in environ.get("XLA_FLAGS", ""):
        return []  # the user chose: theirs stands
    return [EIGEN_CONVOLUTIONS]


def apply(environ=os.environ) -> list[str]:
    """Append ``cpu_flags`` to ``environ["XLA_FLAGS"]`` (keeping the user's); call before
    JAX's backend starts (importing jax is fine, a first computation is not)."""
    flags = cpu_flags(environ)
    if flags:
        environ["XLA_FLAGS"] = " ".join([environ.get("XLA_FLAGS", "").strip(), *flags]).strip()
    return flags
