"""The ``kdjax`` command: ``demo``, ``distill``, ``omit-class``, ``sweep``, ``teacher-logits``,
``on-policy`` and ``lm-methods``.

User mistakes (bad arguments, invalid data, out-of-range hyperparameters: a
``UsageError`` here, ``kdjax.errors.InputError``/``InputTypeError`` in the library)
print one line ``kdjax: error: ...`` and exit with status 2; a path the OS refuses
prints its reason and exits 1. Any other exception is a kdjax bug: it keeps its
traceback. A refused run leaves nothing behind.
"""

from __future__ import annotations

import gc
import logging
import os
import shlex
import shutil
import sys

from kdjax.app import EXIT_INTERRUPTED, EXIT_USAGE, UsageError
from kdjax.app.inputs import check_out
from kdjax.app.parser import build_parser, check_modes, given_options, resolve_defaults
from kdjax.app.reporting import Reporter
from kdjax.errors import InputError, InputTypeError

__all__ = ["main", "run"]


def _enable_compile_cache() -> None:
    """Persist compiled programs across runs (``$KDJAX_CACHE_DIR``, default
    ``~/.cache/kdjax/xla``; ``KDJAX_CACHE_DIR=off`` disables). A cold run compiles every
    program once (about 0.5-1 s each on CPU); later runs load them from disk."""
    import jax

    path = os.environ.get("KDJAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "kdjax", "xla"))
    if path.lower() in ("", "0", "off", "none"):
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return  # an unwritable home: run without the cache
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _unused(directory: str) -> bool:
    """Nothing but kdjax's record of its outputs (and empty files) in ``directory``."""
    from kdjax.app.outputs import MANIFEST

    paths = [os.path.join(directory, n) for n in os.listdir(directory) if n != MANIFEST]
    return all(os.path.isfile(p) and os.path.getsize(p) == 0 for p in paths)


def _interrupted(args, argv) -> str:
    """The one line Ctrl-C prints: what was kept, and the command that continues."""
    out = getattr(args, "out", None)
    rest = [a for a in argv if a != "--overwrite"]
    if args.command == "teacher-logits":
        return (f"interrupted; the shards written so far are kept in {out}: run the same command again "
                f"(kdjax {shlex.join(rest)}) to finish the cache")
    ckpts = None if out is None else os.path.join(out, "checkpoints")
    if ckpts is None or not os.path.isdir(ckpts) or not os.listdir(ckpts):
        return "interrupted; nothing was saved" + ("" if out is not None or not hasattr(args, "resume")
                                                   else " (checkpoints need --out DIR)")
    return (f"interrupted; the last checkpoints are in {ckpts}: continue with "
            f"kdjax {shlex.join(rest + ([] if '--resume' in rest else ['--resume']))}")


def main(argv=None) -> int:
    """Parse ``argv`` and run the command; returns the exit status (no process-wide setup).

    A refused run leaves nothing behind: an --out directory this run created is removed
    while it holds nothing of the run's. Ctrl-C prints one line (what was saved and the
    command that resumes) and returns 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    created = args.out is not None and not os.path.exists(args.out)
    try:
        resolve_defaults(args)
        check_modes(args, given_options(argv))
        check_out(args)
        rep = Reporter(json_mode=args.json, quiet=args.quiet)
        return args.func(args, rep)
    except (UsageError, InputError, InputTypeError) as e:
        if created and os.path.isdir(args.out) and _unused(args.out):
            shutil.rmtree(args.out)
        print(f"kdjax: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return EXIT_USAGE
    except OSError as e:  # a path we cannot read or write: the OS's reason, in one line
        print(f"kdjax: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nkdjax: {_interrupted(args, argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED


def run() -> None:
    """The ``kdjax`` executable (and ``python -m kdjax``): process-wide start-up, then ``main``.

    XLA:CPU's Eigen convolutions are selected (``kdjax.app.xla``), the persistent
    compilation cache is enabled, ``jax.distributed`` is started when
    the environment describes several processes (``kdjax.parallel.initialize``), and the
    objects that importing JAX, Flax and optax allocates are moved out of the garbage
    collector's view
    (``gc.freeze``): tracing creates many short-lived objects, and every full
    collection would otherwise re-scan all of them (see the README's timings).
    """
    try:
        from kdjax.app import xla

        xla.apply()  # before JAX's backend starts: XLA:CPU's Eigen convolutions (see kdjax.app.xla)
        _enable_compile_cache()
        import kdjax.workflows  # noqa: F401  (jax, flax, optax)
        from kdjax import parallel

        parallel.initialize()  # jax.distributed, when the environment names several processes
    except InputError as e:
        print(f"kdjax: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    except KeyboardInterrupt:  # while JAX starts: nothing ran yet
        print("\nkdjax: interrupted; nothing was saved", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)
    # Orbax reports a failed checkpoint write through absl's logger with a traceback before kdjax's
    # one line (kdjax.checkpoint turns it into an OSError): the command prints that line alone
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    gc.freeze()
    code = main()
    if code == EXIT_INTERRUPTED:  # what was saved is on disk; XLA's threads may be mid-program: no teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
