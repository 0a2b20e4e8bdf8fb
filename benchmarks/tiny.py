"""``python -m benchmarks --tiny``: every preset at shapes small enough to run all of them
on two CPU cores in well under a minute. For the accelerator script's CPU dry run (and its
test): the code paths, the loss checks and the JSON, not speed."""

from __future__ import annotations

import dataclasses

LM_SHAPE = (64, 16, 128)  # tokens, hidden, vocab


def presets():
    from benchmarks.presets import PRESETS

    mlp = dict(batch=8, num_samples=32, steps=2, sweep_steps=2)
    return {
        "seed": dataclasses.replace(PRESETS["seed"], **mlp),
        "hinton": dataclasses.replace(PRESETS["hinton"], teacher=(16, 24, 24, 4), student=(16, 8, 8, 4), **mlp),
        "wide": dataclasses.replace(PRESETS["wide"], teacher=(16, 32, 4), student=(16, 8, 4), **mlp),
        "cifar": dataclasses.replace(PRESETS["cifar"], teacher=((1,), (4,)), student=((1,), (4,)), batch=4,
                                     num_samples=16, steps=2, image=(8, 8, 3), num_classes=5),
    }


def features():
    from benchmarks.presets import PRESETS

    return dataclasses.replace(PRESETS["cifar"], name="features", teacher=((1, 1, 1), (8, 8, 16)),
                               student=((1, 1, 1), (4, 4, 8)), image=(8, 8, 3), batch=8, num_samples=32, steps=2)


def gpt2():
    from benchmarks.gpt2 import GPT2Shape

    return GPT2Shape(teacher_layers=2, student_layers=1, d_model=32, heads=2, vocab=128, batch=2, length=8, steps=2)


def llama():
    from benchmarks.llama import LlamaShape

    return LlamaShape(teacher=(2, 32, 4, 2, 64), student=(1, 16, 2, 1, 32), vocab=128, batch=2, length=8, steps=2)


def on_policy():
    from benchmarks.on_policy import OnPolicyShape

    return OnPolicyShape(teacher=(2, 32, 4, 2, 64), student=(1, 16, 2, 1, 32), vocab=128, batch=2, prompt=4, new=4)
