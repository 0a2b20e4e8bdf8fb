"""The JAX-native peer: Keras 3's ``keras.distillation.Distiller`` on the JAX backend, for the
MLP presets. The teacher and student are Keras ``Sequential`` MLPs holding the preset's
weights; the loss is ``Distiller(student_loss_weight=1 - alpha, distillation_losses=
LogitsDistillation(temperature=T, loss=KLDivergence()))``, i.e. alpha T^2 KL + (1 - alpha) CE
(T 3, alpha 0.7, as every row), Adam (lr 1e-3, epsilon 1e-8), ``jit_compile=True``.
Timed as a Keras user runs it: ``fit`` over the preset's batches in its order (one epoch,
no shuffling). ``keras_distiller``: Keras's defaults (one step per compiled call);
``keras_distiller_spe``: ``steps_per_execution`` = the repetition's steps (Keras's own
fusing of steps). Keras must be imported with ``KERAS_BACKEND=jax`` (set here if Keras
is not imported yet)."""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

from benchmarks.presets import Impl

KERAS_IMPLS = ("keras_distiller", "keras_distiller_spe")


def _keras():
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "jax"
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"keras runs on the {keras.backend.backend()} backend here, not jax")
    return keras


def _sequential(keras, params, input_dim: int):
    """Dense layers ``fc1, fc2, ...`` (ReLU between) from a kdjax MLP's params."""
    names = sorted(params, key=lambda n: int(n[2:]))
    model = keras.Sequential([keras.Input((input_dim,))] + [
        keras.layers.Dense(params[n]["kernel"].shape[1], activation=None if i == len(names) - 1 else "relu")
        for i, n in enumerate(names)])
    for layer, n in zip(model.layers, names):
        layer.set_weights([np.asarray(params[n]["kernel"]), np.asarray(params[n]["bias"])])
    return model


class KerasDistiller(Impl):
    def __init__(self, p, inp, steps_per_execution: bool = False):
        super().__init__(p, inp)
        self.spe = steps_per_execution
        self.name = "keras_distiller_spe" if steps_per_execution else "keras_distiller"

    def setup(self):
        # Keras broadcasts by implicit rank promotion, which a caller (the tests) may have made an error
        with jax.numpy_rank_promotion("allow"):
            return self._setup()

    def _setup(self):
        keras = _keras()
        d = self.p.input_shape[0]
        teacher = _sequential(keras, self.inp.teacher_state.params, d)
        student = _sequential(keras, self.inp.student_vars[0], d)
        self.distiller = keras.distillation.Distiller(
            teacher=teacher, student=student, student_loss_weight=0.3,
            distillation_losses=keras.distillation.LogitsDistillation(temperature=3.0,
                                                                      loss=keras.losses.KLDivergence()))
        self.distiller.compile(optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-8),
                               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True,
                               steps_per_execution=len(self.inp.schedule) if self.spe else 1)
        idx = np.asarray(self.inp.schedule).reshape(-1)
        self.x, self.y = self.inp.x[idx], self.inp.y[idx]
        first = float(self.distiller.compute_loss(x=self.x[:self.p.batch], y=self.y[:self.p.batch]))
        want = self._reference_first_loss()
        if not np.isclose(first, want, rtol=1e-4, atol=0):  # the row must compute the same loss
            raise RuntimeError(f"{self.name}: first loss {first} differs from the PyTorch reference's {want}")
        t0 = time.perf_counter()
        self._fit()  # warm-up (and compilation)
        return time.perf_counter() - t0

    def _reference_first_loss(self) -> float:
        import torch

        from parity import reference as ref

        b = self.inp.schedule[0]
        x, y = torch.from_numpy(self.inp.x_torch[b]), torch.from_numpy(self.inp.y[b]).long()
        student = self.p.torch_models()[1]
        student.load_state_dict(self.inp.t_student.state_dict())
        with torch.no_grad():
            return float(ref.distillation_loss(student.cpu().train()(x), self.inp.t_teacher.cpu()(x), y, 3.0, 0.7))

    def _fit(self):
        self.distiller.fit(self.x, self.y, batch_size=self.p.batch, epochs=1, shuffle=False, verbose=0)

    def run(self):
        t0 = time.perf_counter()
        with jax.numpy_rank_promotion("allow"):
            self._fit()
        return time.perf_counter() - t0, len(self.inp.schedule)
