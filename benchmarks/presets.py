"""The MLP and ResNet presets: shapes, FLOP counts, the row protocol (``Impl``) and the
inputs every row shares (same weights, same batches, for torch and kdjax)."""

from __future__ import annotations

import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import torch

import kdjax
from parity import reference as ref


SWEEP_T = (1.0, 2.0, 4.0, 8.0)
SWEEP_ALPHA = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)
IMPLS = ("torch_eager", "torch_eager_cached", "torch_compile", "torch_compile_func", "torch_func_sweep",
         "keras_distiller", "keras_distiller_spe", "kdjax_step", "kdjax_fused", "kdjax_sweep")
PEERS = ("torch", "keras")  # rows whose names start so are the peers kdjax is compared with
GPU_IMPLS = ("torch_compile_func_graphs", "torch_func_sweep_graphs")  # CUDA graphs: on a GPU only
# torch with images in channels-last memory (oneDNN's fast convolution layout on CPU): image presets only
IMAGE_IMPLS = ("torch_eager_cached_channels_last", "torch_eager_channels_last", "torch_compile_channels_last")
SWEEP_ROWS = ("torch_func_sweep", "kdjax_sweep")  # timed per student-step
TEACHER_ONLINE = ("torch_eager", "torch_compile", "keras_distiller", "keras_distiller_spe", "kdjax_step")


@dataclasses.dataclass(frozen=True)
class Preset:
    """MLPs: ``teacher``/``student`` are layer widths, input first. ResNets (``image``
    set, NHWC): they are ``(stage_sizes, widths)`` of a CIFAR-stem ``ResNet``."""

    name: str
    teacher: tuple
    student: tuple
    batch: int
    num_samples: int
    steps: int          # steps per timed repetition
    sweep_steps: int    # steps per repetition for the 24-student sweep
    seed_models: bool = False  # the seed's TeacherMLP/StudentMLP (teacher has dropout)
    image: tuple[int, int, int] | None = None
    num_classes: int = 10
    impls: tuple[str, ...] = IMPLS

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.image if self.image else (self.teacher[0],)

    @property
    def classes(self) -> int:
        return self.num_classes if self.image else self.teacher[-1]

    def jax_models(self):
        if self.image:
            return tuple(kdjax.ResNet(*cfg, self.num_classes, "cifar") for cfg in (self.teacher, self.student))
        if self.seed_models:
            return (kdjax.TeacherMLP(self.teacher[1], self.teacher[-1]),
                    kdjax.StudentMLP(self.student[1], self.student[-1]))
        return (kdjax.MLP(self.teacher[1:-1], self.teacher[-1]),
                kdjax.MLP(self.student[1:-1], self.student[-1]))

    def torch_models(self):
        if self.image:
            return tuple(ref.ResNet(*cfg, self.num_classes, "cifar", self.image[-1])
                         for cfg in (self.teacher, self.student))
        if self.seed_models:
            return (ref.TeacherMLP(self.teacher[0], self.teacher[1], self.teacher[-1]),
                    ref.StudentMLP(self.student[0], self.student[1], self.student[-1]))
        return (ref.MLP(self.teacher[0], self.teacher[1:-1], self.teacher[-1]),
                ref.MLP(self.student[0], self.student[1:-1], self.student[-1]))

    def flops(self, teacher_online: bool) -> float:
        """Matmul and convolution FLOPs of one distillation step."""
        teacher, student = (forward_flops(m, (self.batch, *self.input_shape)) for m in self.jax_models())
        s_total, s_first = student
        return 3 * s_total - s_first + (teacher[0] if teacher_online else 0)


def forward_flops(model, shape) -> tuple[float, float]:
    """``(all, first layer)`` forward FLOPs of the model's dense layers and convolutions
    (every module with a ``kernel`` param: 2 x outputs x fan-in), from the shapes Flax
    sees (``jax.eval_shape``: nothing runs)."""
    import flax.linen as nn

    counts = []

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        params = context.module.variables.get("params", {})
        if context.method_name == "__call__" and "kernel" in params:
            counts.append(2 * np.prod(out.shape) * np.prod(params["kernel"].shape[:-1]))
        return out

    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    with nn.intercept_methods(count):
        jax.eval_shape(model.apply, variables, x)
    return float(sum(counts)), float(counts[0])


PRESETS = {
    "seed": Preset("seed", (50, 256, 256, 128, 5), (50, 64, 5), 64, 500, 500, 500, True),
    # (a sweep repetition runs as many steps per member as a fused one: a run's fixed costs
    # are then shared alike, and "per student-step" compares like with like)
    "hinton": Preset("hinton", (784, 1200, 1200, 10), (784, 800, 800, 10), 128, 2048, 20, 20),
    # compute-bound: one wide hidden layer, large batch; matmuls dominate Adam and softmax
    "wide": Preset("wide", (1024, 4096, 128), (1024, 2048, 128), 2048, 8192, 3, 3),
    # a CIFAR-stem ResNet-18-shaped teacher (half width) -> a 4-block ResNet student, CIFAR images
    "cifar": Preset("cifar", ((2, 2, 2, 2), (32, 64, 128, 256)), ((1, 1, 1, 1), (16, 32, 64, 128)), 128,
                    1024, 3, 1, image=(32, 32, 3),
                    impls=("torch_eager", "torch_eager_cached", "torch_eager_cached_channels_last", "torch_compile",
                           "kdjax_step", "kdjax_fused")),
}


def sync_torch(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Impl:
    """``setup()`` prepares and compiles (returns compile seconds or None); ``run()`` times
    one repetition and returns (seconds, student-steps done)."""

    name = ""

    def __init__(self, p: Preset, inp: "Inputs"):
        self.p, self.inp = p, inp

    def setup(self) -> float | None: ...

    def run(self) -> tuple[float, int]: ...


class Inputs:
    """Shared data for one preset: the same arrays go to every implementation."""

    def __init__(self, p: Preset, torch_device: str):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((p.num_samples, *p.input_shape)).astype(np.float32)
        self.y = rng.integers(0, p.classes, p.num_samples).astype(np.int32)
        # torch's layout: NCHW images
        self.x_torch = np.ascontiguousarray(self.x.transpose(0, 3, 1, 2)) if p.image else self.x
        self.schedule = np.asarray(kdjax.data.random_batch_schedule(jax.random.PRNGKey(0), p.num_samples,
                                                             p.batch, p.steps))
        self.tdev = torch.device(torch_device)
        torch.manual_seed(0)
        self.t_teacher, self.t_student = (m.to(self.tdev) for m in p.torch_models())
        self.t_teacher.eval()
        # both sides start from the same weights
        example = jax.ShapeDtypeStruct((1, *p.input_shape), jnp.float32)
        teacher, student = p.jax_models()
        self.teacher_state = self._state(self.t_teacher, teacher, example)
        self.student_vars = self._variables(self.t_student, student, example)

    @staticmethod
    def _variables(module, model, example) -> tuple:
        v = dict(kdjax.convert.torch_to_variables(module.state_dict(), jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                                                                 example)))
        return v.pop("params"), v

    def _state(self, module, model, example, tx=None):
        params, model_state = self._variables(module, model, example)
        return kdjax.state_from_params(params, model_state=model_state, tx=tx)

    def student_state(self, members: int | None = None):
        """A fresh kdjax state at the reference student's weights (``members`` copies)."""
        params, model_state = self.student_vars
        if members:
            params, model_state = jax.tree_util.tree_map(lambda a: np.stack([a] * members), (params, model_state))
        return kdjax.state_from_params(params, model_state=model_state, members=bool(members))

    def cached_data(self, teacher) -> dict:
        """The dataset on device with the teacher's logits computed once (the fused path)."""
        x, y = jnp.asarray(self.x), jnp.asarray(self.y)
        return {"x": x, "y": y, "teacher_logits": kdjax.predict_logits(teacher, self.teacher_state, x,
                                                                       batch_size=1024)}

    def teacher_logits_torch(self) -> torch.Tensor:
        """The reference teacher's eval logits for every example, once (cached-teacher rows)."""
        with torch.no_grad():
            x = torch.from_numpy(self.x_torch).to(self.tdev)
            return torch.cat([self.t_teacher(x[i:i + 1024]) for i in range(0, len(x), 1024)])


def time_checked_rows(preset: str, rows, which, repeats: int, on_progress=lambda msg: None, peers=()):
    """The language-model and feature presets' protocol: set up every row (compilation and
    its first two losses, ``setup() -> (compile seconds, losses)``), refuse any row whose
    first two losses differ from ``kdjax_step``'s by more than a relative 1e-4, then time the
    rows in ``which`` in ``repeats`` interleaved repetitions (``run() -> (seconds, steps)``).

    ``peers``: rows of another library in a process of their own (``benchmarks.tunix_row.
    TunixRow``), set up after the others; ``setup() -> dict`` (``{"skipped"|"error": why}``, or
    ``first_losses`` and ``compile_s``), and a peer that is missing, fails or whose losses differ
    is reported so in its result instead of raising. The others are timed in the same
    interleaved repetitions, then ``finish() -> dict`` adds to their results; ``close()`` always.

    Returns ``(results, seconds per step by row (medians), best torch row, {kdjax row: best
    torch median / its median})``; ``results[row]`` has ``compile_s``, ``first_losses``,
    ``temp_bytes`` (a kdjax row's compiled temporary memory, else None), ``peak_bytes`` (its
    program's peak: arguments + outputs - aliased + temporaries), ``ms_per_step`` (median,
    min, max) and ``repeats``."""
    results, losses = {}, {}
    for row in rows:
        on_progress(f"{preset}: compiling {row.name}")
        compile_s, losses[row.name] = row.setup()
        results[row.name] = {"compile_s": compile_s, "first_losses": losses[row.name],
                             "temp_bytes": getattr(row, "temp_bytes", None),
                             "peak_bytes": getattr(row, "peak_bytes", None)}
    want = losses["kdjax_step"]
    for name, got in losses.items():
        if not np.allclose(got, want, rtol=1e-4, atol=0):
            raise RuntimeError(f"{preset}: {name}'s first two losses {got} differ from kdjax_step's {want}")
    ready = []
    try:
        for peer in peers:
            on_progress(f"{preset}: setting up {peer.name} (its own process)")
            got = peer.setup()
            if "first_losses" in got and not np.allclose(got["first_losses"], want, rtol=1e-4, atol=0):
                got = {"error": f"{peer.name}'s first two losses {got['first_losses']} differ from kdjax_step's {want}"}
            results[peer.name] = got
            if "first_losses" in got:
                ready.append(peer)
            else:
                peer.close()
        timed = [r for r in rows if r.name in which] + ready
        samples = {r.name: [] for r in timed}
        for k in range(repeats):
            for row in timed:
                on_progress(f"{preset}: repeat {k + 1}/{repeats} {row.name}")
                seconds, steps = row.run()
                samples[row.name].append(seconds / steps)
        for peer in ready:
            results[peer.name].update(peer.finish())
    finally:
        for peer in peers:
            peer.close()
    for name, sec in samples.items():
        results[name].update(ms_per_step={"median": 1e3 * statistics.median(sec), "min": 1e3 * min(sec),
                                          "max": 1e3 * max(sec)}, repeats=len(sec))
    results = {name: results[name] for name in [*samples, *(p.name for p in peers if p.name not in samples)]}
    med = {name: statistics.median(sec) for name, sec in samples.items()}
    torch_rows = {n: m for n, m in med.items() if n.startswith("torch")}
    best = min(torch_rows, key=torch_rows.get) if torch_rows else None
    peer_names = {p.name for p in peers}
    speedup = {n: med[best] / m for n, m in med.items() if best and not n.startswith("torch") and n not in peer_names}
    return results, med, best, speedup
