"""Every public name of ../shared/DESIGN.md and the README's API map is importable where it
is documented and callable as documented (tiny inputs: the names, not the numbers, are
under test here; the numbers are in the other tests and the parity suite)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax

MAP = {  # the README's API map, module by module
    "kdjax": ["TeacherMLP", "StudentMLP", "MLP", "ResNet", "resnet18", "TransformerLM", "create_train_state",
              "state_from_params", "TrainState", "make_train_step", "train_step", "make_run", "run_steps",
              "make_hyper", "Hyper", "adam", "sgd", "cosine_schedule", "multistep_schedule", "set_learning_rate",
              "predict_logits", "evaluate", "distillation_loss", "soft_kl", "hard_ce"],
    "kdjax.losses": ["soft_kl", "reverse_kl", "jsd", "dkd", "hard_ce", "distillation_loss", "masked_mean"],
    "kdjax.fused": ["linear_distillation_loss", "FusedLM"],
    "kdjax.features": ["capture", "available_taps", "hint", "attention_transfer", "similarity_preserving", "rkd", "pkt",
                       "mse", "mae", "cosine_similarity", "pooled_cosine", "pool_to_shape", "objective", "Objective",
                       "Term", "ConvConnector", "LinearConnector", "connector_for", "init_connectors",
                       "student_variables"],
    "kdjax.models": ["TeacherMLP", "StudentMLP", "MLP", "ResNet", "resnet18", "TransformerLM", "Llama", "BatchNorm",
                     "Conv", "conv2d"],
    "kdjax.sweep": ["grid", "member_keys", "init_members", "member_schedules", "make_sweep_run",
                    "pick_members_per_group", "evaluate_members", "sweep_hyper"],
    "kdjax.parallel": ["make_mesh", "initialize"],
    "kdjax.convert": ["torch_to_variables", "variables_to_torch", "torch_name", "torch_to_flax", "flax_to_torch",
                      "load_hf", "save_hf"],
    "kdjax.data": ["synthetic", "digits", "text", "load_npz", "seed_schedule", "random_batch_schedule", "epoch_schedule",
                   "validation_split", "without_class", "take_batch"],
    "kdjax.fitting": ["RunConfig", "fit", "fit_members", "Programs", "paired_students", "teacher_logits_for",
                      "teacher_features_for", "initial_members", "evaluate_on"],
    "kdjax.workflows": ["distill", "run_sweep", "tuned_distill", "Checkpoints"],
    "kdjax.hinton": ["omit_class", "match_prior_bias"],
    "kdjax.tokenizer": ["load_tokenizer", "train_bpe", "check_vocabulary"],
    "kdjax.offline": ["topk_logprobs", "topk_kl", "topk_distillation_loss", "TopKKD", "write_topk_cache",
                      "read_topk_cache", "fingerprint"],
    "kdjax.stats": ["mean_ci", "t975"],
    "kdjax.checkpoint": ["save", "load", "save_rotating", "load_latest"],
    "kdjax.errors": ["InputError", "InputTypeError"],
}


@pytest.mark.parametrize("module", sorted(MAP))
def test_every_mapped_name_exists(module):
    mod = importlib.import_module(module)
    missing = [n for n in MAP[module] if not hasattr(mod, n)]
    assert not missing, missing


def test_version_1_calls():
    s, t, y = jnp.zeros((4, 5)), jnp.ones((4, 5)), jnp.arange(4)
    assert float(kdjax.distillation_loss(s, t, y)) > 0  # defaults T = 3, alpha = 0.7
    assert kdjax.soft_kl(s, t, 3.0).shape == (4,) and kdjax.hard_ce(s, y).shape == (4,)
    for model in (kdjax.TeacherMLP(16, 5), kdjax.StudentMLP(8, 5), kdjax.MLP((8,), 5)):
        state = kdjax.create_train_state(model, jax.random.PRNGKey(0), 50)  # (model, rng, input_dim)
        assert kdjax.predict_logits(model, state.params, jnp.zeros((2, 50))).shape == (2, 5)
        assert set(kdjax.evaluate(model, state.params, jnp.zeros((2, 50)), jnp.zeros(2, jnp.int32))) == {
            "loss", "accuracy"}
    student = kdjax.StudentMLP(8, 5)
    state = kdjax.create_train_state(student, jax.random.PRNGKey(0), 50)
    batch = {"x": jnp.zeros((4, 50)), "y": y, "teacher_logits": t}
    state, m = kdjax.make_train_step(student, "kd")(state, batch, jax.random.PRNGKey(1), kdjax.make_hyper(3.0, 0.7))
    sched = kdjax.data.seed_schedule(jax.random.PRNGKey(0), 4, 2, 3)
    state, m = kdjax.make_run(student, "kd")(state, batch, sched, jax.random.PRNGKey(1), kdjax.make_hyper())
    assert m["loss"].shape == (3,)
    sd = kdjax.convert.flax_to_torch(state.params)
    assert set(kdjax.convert.torch_to_flax(sd)) == {"fc1", "fc2"}
    T, A, S = kdjax.sweep.grid([1.0, 2.0], [0.5], [0])
    assert len(T) == len(A) == len(S) == 2


def test_version_2_calls():
    x = jnp.zeros((2, 8, 8, 3))
    state = kdjax.create_train_state(kdjax.ResNet((1,), (4,), 3), jax.random.PRNGKey(0), x, tx=kdjax.sgd(0.1),
                                     learning_rate=1e-3)
    assert isinstance(state, kdjax.TrainState) and set(state.model_state) == {"batch_stats"}
    assert set(state.variables) == {"params", "batch_stats"}
    assert kdjax.resnet18(10, "imagenet").stem == "imagenet"
    lm = kdjax.TransformerLM(11, 1, 8, 2, 6)
    v = lm.init(jax.random.PRNGKey(0), jnp.zeros((1, 6), jnp.int32))
    back = kdjax.convert.torch_to_variables(kdjax.convert.variables_to_torch(v, tied=lm.tied_weights),
                                            jax.eval_shape(lambda: v), tied=lm.tied_weights)
    assert set(back) == {"params"}
    s, t = jnp.zeros((2, 3, 5)), jnp.ones((2, 3, 5))
    y, where = jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3), bool)
    L = kdjax.losses
    for f in (L.soft_kl, L.reverse_kl, lambda a, b, T: L.jsd(a, b, T, 0.5)):
        assert f(s, t, 2.0).shape == (2, 3)
    assert L.dkd(s, t, y, 4.0, 1.0, 8.0, where=where).shape == (2, 3)
    assert np.isfinite(float(L.distillation_loss(s, t, y, 2.0, 0.5, where=where, divergence="jsd")))
    fused = kdjax.fused.linear_distillation_loss(jnp.ones((2, 3, 4)), jnp.ones((4, 5)), y, teacher_logits=t,
                                                 temperature=2.0, alpha=0.5, where=where, chunk_size=2)
    assert np.isfinite(float(fused))
    mesh = kdjax.parallel.make_mesh(members=1, data=None, devices=None)
    assert mesh.axis_names == ("members", "data", "fsdp")  # version 3 added "fsdp" (size 1 here)
    mesh = kdjax.parallel.make_mesh(members=1, data=None, fsdp=1, devices=None)  # DESIGN.md, version 3
    assert dict(mesh.shape) == {"members": 1, "data": len(jax.devices()), "fsdp": 1}
    assert kdjax.parallel.initialize({}) is False
