"""The ``tunix`` row's body; runs inside tunix's own virtual environment (``benchmarks/tunix_venv.sh``),
never imported by the project's code (it imports tunix, which the project's environment lacks).

    <tunix venv>/bin/python benchmarks/tunix_peer.py SPEC.json

A worker driven over its standard input, so that its repetitions interleave with the other rows'
(``benchmarks/tunix_row.py``; it waits, idle, while they run). Every answer is one line on standard
output, ``KDJAX-TUNIX <json>`` (other output is ignored):

* at start, once both programs are compiled: ``{"first_losses", "compile_s"}`` (the first two
  losses, no update before the first), or ``{"error"}``;
* ``run``: one repetition over the schedule, ``{"seconds", "steps"}``;
* ``finish``: ``{"memory", "peak_rss_bytes", "versions"}``, then it exits.

SPEC (written by ``benchmarks/tunix_row.py``): two Hugging Face folders (``teacher``, ``student``:
``Qwen2ForCausalLM.save_pretrained`` of the llama preset's models, the very weights kdjax's rows
use), their shapes, ``tokens`` (an ``.npy`` of ``[windows, length + 1]`` token ids), ``schedule``
(``[steps, batch]`` window indices per step), ``temperature``, ``alpha``, ``lr``.

tunix's own model (``tunix.models.qwen2.model.Qwen2``, loaded by ``tunix.models.qwen2.params.
create_model_from_safe_tensors``), its ``DistillationTrainer`` with ``strategies.LogitStrategy``
and ``optax.adam(lr)``; one step is what ``trainer.train`` does per step: ``_prepare_inputs`` (the
teacher's forward, which the strategy jits itself with ``nnx.jit``) and the trainer's jitted train
step (``jit_train_and_eval_step``). The token windows carry ``length + 1`` tokens: the forward
functions read ``[:, :-1]``, the labels are ``[:, 1:]`` one-hot (``LogitStrategy`` takes label
distributions)."""

import json
import resource
import sys
import time

MARK = "KDJAX-TUNIX "


def answer(obj):
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def nbytes(tree):
    import jax

    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "nbytes")))


def program(compiled) -> dict:
    """XLA's sizes of one compiled program; ``peak``: arguments + outputs - aliased + temporaries."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def main(spec_path):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from tunix.distillation import distillation_trainer as dt
    from tunix.distillation import strategies
    from tunix.models.qwen2 import model as qmodel
    from tunix.models.qwen2 import params as qparams

    jax.config.update("jax_default_matmul_precision", "highest")
    spec = json.load(open(spec_path))
    vocab = spec["vocab"]

    def config(cfg):
        layers, d, h, kv, inter = cfg
        return qmodel.ModelConfig(num_layers=layers, vocab_size=vocab, embed_dim=d, hidden_dim=inter, num_heads=h,
                                  head_dim=d // h, num_kv_heads=kv, rope_theta=int(spec["rope_theta"]),
                                  norm_eps=spec["norm_eps"], use_tied_embedding=True)

    teacher = qparams.create_model_from_safe_tensors(spec["teacher_dir"], config(spec["teacher"]))
    student = qparams.create_model_from_safe_tensors(spec["student_dir"], config(spec["student"]))

    def forward(model, input_tokens, input_mask):
        x = input_tokens[:, :-1]
        b, n = x.shape
        positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), dtype=jnp.bool_)), (b, n, n))
        logits, _ = model(x, positions, None, causal)
        return logits

    def labels(input_tokens, input_mask):
        return jax.nn.one_hot(input_tokens[:, 1:], vocab, dtype=jnp.float32)

    # the strategy wraps each function in nnx.jit itself (BaseStrategy.__init__)
    strategy = strategies.LogitStrategy(student_forward_fn=forward, teacher_forward_fn=forward,
                                        labels_fn=labels, temperature=spec["temperature"], alpha=spec["alpha"])
    cfg = dt.TrainingConfig(eval_every_n_steps=10**9, max_steps=10**9, max_inflight_computations=1)
    trainer = dt.DistillationTrainer(student, teacher, strategy, optax.adam(spec["lr"]), cfg)
    train_step, _ = trainer.jit_train_and_eval_step()

    tokens = jnp.asarray(np.load(spec["tokens"]))
    schedule = np.asarray(spec["schedule"])
    batches = [dt.TrainingInput(input_tokens=tokens[idx], input_mask=jnp.ones(tokens[idx].shape, jnp.bool_))
               for idx in schedule]

    def step(batch):
        loss, aux, grad_norm = train_step(trainer._prepare_inputs(batch))
        return loss

    t0 = time.perf_counter()
    first = [float(step(b)) for b in batches[:2]]  # compiles both programs
    answer({"first_losses": first, "compile_s": time.perf_counter() - t0})

    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            t0 = time.perf_counter()
            for b in batches:
                loss = step(b)
            jax.block_until_ready(loss)
            answer({"seconds": time.perf_counter() - t0, "steps": len(batches)})
        elif cmd == "finish":
            break
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    memory = {}
    try:  # XLA's sizes of the two programs, and what stays live beside each
        b = batches[0]
        t_fwd = strategy._teacher_forward_fn  # nnx.jit(forward): what _prepare_inputs calls
        memory["teacher_program"] = program(t_fwd.lower(teacher, b.input_tokens, b.input_mask).compile())
        memory["teacher_temp_bytes"] = memory["teacher_program"]["temp"]
        prepared = trainer._prepare_inputs(b)
        memory["teacher_logits_bytes"] = int(prepared.teacher_output.nbytes)
        jitted = trainer._jitted_train_step_fn  # functools.partial(nnx.jit(train_step), model, optimizer)
        memory["step_program"] = program(jitted.func.lower(*jitted.args, prepared).compile())
        memory["step_temp_bytes"] = memory["step_program"]["temp"]
        memory["teacher_param_bytes"] = nbytes(nnx.state(teacher, nnx.Param))
        memory["student_state_bytes"] = nbytes(nnx.state(student)) + nbytes(nnx.state(trainer.optimizer))
        # the device's peak: the teacher program while the student and its optimizer state wait, or
        # the train step (its arguments include them and the teacher logits) while the teacher's
        # weights wait
        memory["peak_bytes"] = max(memory["teacher_program"]["peak"] + memory["student_state_bytes"],
                                   memory["step_program"]["peak"] + memory["teacher_param_bytes"])
    except Exception as e:  # reported, not fatal: the timings stand
        memory["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    from importlib.metadata import version

    answer({"memory": memory, "peak_rss_bytes": peak,
            "versions": {"tunix": version("google-tunix"), "jax": jax.__version__, "flax": version("flax")}})


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception as e:  # the row reports it
        answer({"error": f"{type(e).__name__}: {str(e)[:300]}"})
        raise
