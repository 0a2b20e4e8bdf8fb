"""The ``kdjax`` command. ``kdjax demo`` trains the seed's teacher, a standard student
and a distilled student on the seed's data and prints their accuracies."""

from __future__ import annotations

import argparse
import sys

import jax

from kdjax import data, experiments
from kdjax.models import StudentMLP, TeacherMLP, param_count
from kdjax.train import evaluate, make_hyper


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2."""


def cmd_demo(args) -> int:
    ds = data.synthetic(500, 50, 5, seed=args.seed)
    cfg = experiments.RunConfig(steps=args.steps, batch_size=64)
    teacher, student = TeacherMLP(256, 5), StudentMLP(64, 5)
    tstate, _ = experiments.fit(teacher, "ce", ds, cfg, seed=args.seed)
    logits = experiments.teacher_logits_for(teacher, tstate.params, ds)
    sstate, _ = experiments.fit(student, "ce", ds, cfg, seed=args.seed + 1)
    dstate, _ = experiments.fit(student, "kd", ds, cfg, seed=args.seed + 1,
                                hyper=make_hyper(args.temperature, args.alpha), teacher_logits=logits)
    acc = lambda m, p: float(evaluate(m, p, ds.x_train, ds.y_train)["accuracy"])
    print(f"Teacher parameters: {param_count(tstate.params):,}")
    print(f"Student parameters: {param_count(sstate.params):,}")
    print(f"Teacher accuracy (train):              {acc(teacher, tstate.params):.4f}")
    print(f"Student (standard) accuracy (train):   {acc(student, sstate.params):.4f}")
    print(f"Student (distilled) accuracy (train):  {acc(student, dstate.params):.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="teacher vs standard vs distilled student on the seed's data")
    demo.add_argument("--steps", type=int, default=100)
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--temperature", type=float, default=3.0)
    demo.add_argument("--alpha", type=float, default=0.7)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, TypeError) as e:
        print(f"kdjax: error: {e}", file=sys.stderr)
        return 2
