"""What a command writes, by manifest: ``.kdjax-outputs.json`` in ``--out`` names every file
and folder kdjax wrote there (and the Hugging Face folders, ``--save-hf`` and ``--save-hf-teacher``,
it wrote into), so that

* ``--overwrite`` removes exactly those and nothing of the user's;
* a file kdjax would write but did not (the user's own ``tokenizer.json``, a teacher
  folder's, an older kdjax's ``results.json``) is never replaced: the run is refused first;
* ``--resume`` knows which outputs of an interrupted run are its own.

Every check runs before anything is trained or written (``check``); ``claim`` then clears
the old run (``--overwrite``) and records what this run may write before it writes it;
``seal`` keeps in the record only what exists at the end.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil

from kdjax.app import UsageError

__all__ = ["MANIFEST", "HF_FILES", "HF_OUTPUTS", "Outputs", "declared", "check_save_hf", "written_here",
           "hf_files_present", "same_or_inside"]

MANIFEST = ".kdjax-outputs.json"

# What each command may write into --out (fnmatch patterns); the plots only without --no-plots.
_PLOTS = {
    "demo": ("softmax_temperature.png", "learning_curves.png", "hyperparameters.png", "digits_comparison.png",
             "omitted_class.png", "tuned_comparison.png"),
    "distill": ("learning_curves.png", "comparison.png"),
    "omit-class": ("omitted_class.png",),
    "sweep": ("sweep_heatmap.png",),
    "on-policy": (),
    "lm-methods": ("lm_methods_[0-9]*.png", "lm_methods_cost.png"),
}
_RUN = ("results.json", "metrics.jsonl", "checkpoints")
_CACHE = ("manifest.json", "tokenizer.json", "teacher_tokenizer.json", "shard-[0-9][0-9][0-9][0-9][0-9].npz")  # offline's shard names exactly

# What a Hugging Face folder written by kdjax holds (convert.save_hf's files and the tokenizer).
HF_FILES = ("config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
            "tokenizer.json")


def declared(args) -> tuple[str, ...]:
    """The names (patterns) ``args.command`` may write into ``--out``."""
    if args.command == "teacher-logits":
        return _CACHE
    names = _RUN + (() if getattr(args, "no_plots", False) else _PLOTS.get(args.command, ()))
    if args.command == "distill":
        names += ("teacher.ckpt", "student_distilled.ckpt", "student_standard.ckpt")
    if args.command in ("distill", "sweep") and getattr(args, "arch", None) == "llama":
        names += ("tokenizer.json",)
    return names


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def same_or_inside(a: str, b: str) -> bool:
    """``a`` is ``b`` or lies inside it (after resolving links)."""
    a, b = _real(a), _real(b)
    return a == b or os.path.commonpath([a, b]) == b


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def hf_files_present(directory: str) -> list[str]:
    """The files of ``directory`` that writing a Hugging Face folder there would replace."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if _matches(n, HF_FILES))


class Outputs:
    """The record of what kdjax wrote into one ``--out`` directory."""

    def __init__(self, directory: str, names):
        self.directory = directory
        self.names = tuple(names)
        self.path = os.path.join(directory, MANIFEST)

    def read(self) -> dict:
        """The record on disk (``{}`` when there is none); a damaged one is one line."""
        if not os.path.exists(self.path):
            return {}
        try:
            with open(self.path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"--out: {self.path} is not kdjax's record of its outputs ({type(e).__name__}); "
                             f"remove it or choose another --out") from None
        if not isinstance(record, dict) or not isinstance(record.get("files", []), list):
            raise UsageError(f"--out: {self.path}: expected kdjax's record of its outputs (an object with 'files'), "
                             f"got {type(record).__name__}; remove it or choose another --out")
        return record

    def recorded(self) -> set[str]:
        """The names and patterns (``shard-*.npz``: a cache's shards) kdjax recorded writing;
        a hand-edited entry that is a path or a pattern this command does not write counts for
        nothing."""
        return {n for n in self.read().get("files", []) if isinstance(n, str) and n == os.path.basename(n)
                and n not in ("", ".", "..", MANIFEST) and (not _is_pattern(n) or n in self.names)}

    def present(self) -> list[str]:
        """The entries of the directory this command would write (kdjax's or not)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(n for n in os.listdir(self.directory) if _matches(n, self.names))

    def foreign(self) -> list[str]:
        """Entries this command would write that kdjax did not write here."""
        ours = self.recorded()
        return [n for n in self.present() if not _matches(n, ours)]

    def check(self) -> None:
        """Refuse, before anything runs, a directory holding files this run would replace
        that kdjax did not write (with or without --overwrite)."""
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise UsageError(f"--out: expected a directory, got an existing file {self.directory}")
        foreign = self.foreign()
        if foreign:
            why = ("no " + MANIFEST + ": written by an older kdjax or by you" if not os.path.exists(self.path)
                   else "not in its " + MANIFEST)
            raise UsageError(f"--out: {self.directory} holds {', '.join(foreign)}, which kdjax did not write ({why}); "
                             f"this run would replace them: move them away or choose another --out")

    def write(self, files, **extra) -> None:
        from kdjax.checkpoint import atomic_write_text

        record = self.read() | extra
        record["files"] = sorted(set(files))
        atomic_write_text(self.path, json.dumps(record, indent=1))

    def claim(self, overwrite: bool, **extra) -> None:
        """Once every input is accepted: with ``overwrite``, remove exactly the recorded
        outputs (and writes a kill interrupted); create the directory; record what this run
        may write, before it writes it."""
        for name in os.listdir(self.directory) if os.path.isdir(self.directory) else ():
            if name.startswith(".tmp-") and os.path.isfile(os.path.join(self.directory, name)):
                os.remove(os.path.join(self.directory, name))  # a write a kill interrupted (atomic_write_bytes)
        if overwrite and os.path.isdir(self.directory):
            ours = self.recorded()
            for name in os.listdir(self.directory):
                path = os.path.join(self.directory, name)
                if name != MANIFEST and _matches(name, ours):
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
        os.makedirs(self.directory, exist_ok=True)
        self.write((set() if overwrite else self.recorded()) | set(self.names), **extra)

    def seal(self) -> None:
        """At the end of a run: the record keeps the names that exist (and its patterns)."""
        existing = set(os.listdir(self.directory))
        self.write({n for n in self.recorded() if n in existing or _is_pattern(n)})


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


# The Hugging Face folders a command may write besides --out: (flag, the argument's name,
# the key of the --out record that says this run wrote it).
HF_OUTPUTS = (("--save-hf", "save_hf"), ("--save-hf-teacher", "save_hf_teacher"))


def check_save_hf(args, flag: str, target: str, out_names=()) -> bool:
    """Refuse a Hugging Face output folder ``target`` (given as ``flag``: ``--save-hf`` or
    ``--save-hf-teacher``) this run would damage, before anything runs; True when its Hugging
    Face files are this run's own (a resumed run that wrote them before a kill).

    Args:
      args: the parsed command line (``--out``, ``--overwrite``, ``--resume``, the inputs).
      flag: the option that names ``target``.
      target: the folder.
      out_names: what the run may write into ``--out`` (``declared``).

    Returns:
      Whether ``target`` already holds Hugging Face files this run may replace.

    Raises:
      UsageError: a file, a folder that is, holds or lies inside an input, ``--out``, one of
        the run's outputs or the other Hugging Face output; or one holding Hugging Face
        files without ``--overwrite`` that this run did not write.
    """
    if os.path.exists(target) and not os.path.isdir(target):
        raise UsageError(f"{flag}: expected a directory, got an existing file {target}")
    for other_flag, other in (("--teacher", getattr(args, "teacher", None)),
                              ("--teacher-logits", getattr(args, "teacher_logits", None)),
                              ("--tokenizer", getattr(args, "tokenizer", None))):
        if other and os.path.exists(other) and (same_or_inside(target, other) or same_or_inside(other, target)):
            raise UsageError(f"{flag}: expected a folder apart from {other_flag} ({other}), got {target}")
    for other_flag, dest in HF_OUTPUTS:
        other = getattr(args, dest, None)
        if other_flag != flag and other and (same_or_inside(target, other) or same_or_inside(other, target)):
            raise UsageError(f"{flag}: expected a folder apart from {other_flag} ({other}): each writes its own "
                             f"config.json and weights, got {target}")
    if args.out is not None:
        if _real(target) == _real(args.out):
            raise UsageError(f"{flag}: expected a folder other than --out ({args.out}: the run's results and "
                             f"checkpoints), got the same folder")
        for name in out_names:
            if same_or_inside(target, os.path.join(args.out, name)):
                raise UsageError(f"{flag}: expected a folder outside the run's own outputs in --out, got {target} "
                                 f"(inside {os.path.join(args.out, name)})")
        if same_or_inside(args.out, target):
            raise UsageError(f"--out: expected a folder outside {flag} ({target}), got {args.out}")
    probe = target
    while not os.path.exists(probe):  # the folder, or the nearest existing one it would be made in
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.path.isdir(probe):
        raise UsageError(f"{flag}: {target} cannot be made: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: {target} cannot be written: no permission to write in {probe}")
    present = hf_files_present(target)
    if not present or args.overwrite:
        return bool(present)
    if not (args.out is not None and getattr(args, "resume", False) and written_here(args, flag, target)):
        raise UsageError(f"{flag}: {target} exists; pass --overwrite to replace its Hugging Face files "
                         f"({', '.join(present)}; nothing else in the folder is touched)")
    return True


def written_here(args, flag: str, target: str) -> bool:
    """The record of ``--out`` says this run began writing its ``flag`` folder into ``target``
    (``mark_writing``): the Hugging Face files there are its own. A folder it only claimed,
    that another run wrote into meanwhile, is not."""
    key = dict(HF_OUTPUTS)[flag]
    record = Outputs(args.out, ()).read() if args.out is not None else {}
    return record.get(key) == _real(target) and record.get(key + "_writing") is True


def mark_writing(args, flag: str) -> None:
    """Record, just before this run writes its ``flag`` folder, that the files there are its own."""
    if args.out is not None:
        out = Outputs(args.out, ())
        out.write(out.read().get("files", []), **{dict(HF_OUTPUTS)[flag] + "_writing": True})
