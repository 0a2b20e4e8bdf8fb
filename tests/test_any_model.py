"""Any Flax model through the front door: a user's CNN with BatchNorm and Dropout as
teacher and student, fused and as a sweep; ResNet's BatchNorm; clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kdjax
from kdjax import data, fitting, sweep
from kdjax.errors import InputError, InputTypeError
from conftest import assert_trees_close

STEPS = 12


class UserCNN(nn.Module):
    """What a user writes: Flax's own BatchNorm (momentum 0.99) and Dropout."""

    width: int = 4
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (3, 3), use_bias=False)(x)  # a bias before BatchNorm has zero gradient
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.Dropout(0.2, deterministic=not train)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


@pytest.fixture(scope="module")
def setup():
    ds = data.digits(images=True)
    d = {"x": jnp.asarray(ds.x_train), "y": jnp.asarray(ds.y_train)}
    schedule = data.seed_schedule(jax.random.PRNGKey(1), len(ds.y_train), 32, STEPS)
    teacher, student = UserCNN(8), UserCNN(4)
    rng = jax.random.PRNGKey(0)
    t0 = kdjax.create_train_state(teacher, jax.random.PRNGKey(2), d["x"][:1])
    t_state, t_loss = kdjax.make_run(teacher, "ce")(t0, d, schedule, rng)
    t_logits = kdjax.predict_logits(teacher, t_state, d["x"])
    return dict(ds=ds, d=d, schedule=schedule, teacher=teacher, student=student, rng=rng,
                t_state=t_state, t_loss=t_loss, t_logits=t_logits)


def fresh(model, x, seed=3):
    return kdjax.create_train_state(model, jax.random.PRNGKey(seed), x[:1])


def test_state_has_batch_stats_and_training_changes_and_uses_them(setup):
    s = setup
    init = fresh(s["teacher"], s["d"]["x"], seed=2)
    assert set(init.model_state) == {"batch_stats"}
    before = init.model_state["batch_stats"]["BatchNorm_0"]["mean"]
    after = s["t_state"].model_state["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(np.asarray(before), np.asarray(after))  # updated in training
    assert np.isfinite(np.asarray(s["t_loss"]["loss"])).all()
    # evaluation reads them: the same params with the initial statistics predict otherwise
    stale = s["t_state"].replace(model_state=init.model_state)
    x = s["d"]["x"][:64]
    assert not np.allclose(np.asarray(kdjax.predict_logits(s["teacher"], stale, x)),
                           np.asarray(kdjax.predict_logits(s["teacher"], s["t_state"], x)))
    # ...and eval mode is deterministic (no dropout, no batch statistics)
    np.testing.assert_array_equal(np.asarray(kdjax.predict_logits(s["teacher"], s["t_state"], x)),
                                  np.asarray(s["t_logits"][:64]))


def loop(step, state, d, schedule, rng, *args):
    losses = []
    for idx in schedule:
        state, m = step(state, {k: v[idx] for k, v in d.items()}, rng, *args)
        losses.append(m["loss"])
    return state, jnp.stack(losses)


def test_distilled_student_fused_equals_loop_and_online_teacher(setup):
    s = setup
    d, x, h = dict(s["d"], teacher_logits=s["t_logits"]), s["d"]["x"], kdjax.make_hyper(4.0, 0.6)
    fused, f_loss = kdjax.make_run(s["student"], "kd")(fresh(s["student"], x), d, s["schedule"], s["rng"], h)
    looped, l_loss = loop(kdjax.make_train_step(s["student"], "kd"), fresh(s["student"], x), d,
                          s["schedule"], s["rng"], h)
    assert_trees_close((fused.params, fused.model_state), (looped.params, looped.model_state),
                       rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(f_loss["loss"]), np.asarray(l_loss), rtol=1e-5, atol=1e-6)
    # online teacher (its TrainState carries batch_stats) = cached logits
    online, o_loss = kdjax.make_run(s["student"], "kd", teacher=s["teacher"])(
        fresh(s["student"], x), s["d"], s["schedule"], s["rng"], h, s["t_state"])
    np.testing.assert_allclose(np.asarray(o_loss["loss"]), np.asarray(f_loss["loss"]), rtol=1e-5, atol=1e-6)
    # distillation used the teacher: differs from plain cross-entropy
    ce, _ = kdjax.make_run(s["student"], "ce")(fresh(s["student"], x), s["d"], s["schedule"], s["rng"])
    assert not np.allclose(np.asarray(ce.params["Dense_0"]["kernel"]), np.asarray(fused.params["Dense_0"]["kernel"]))


def test_sweep_of_batchnorm_students_equals_single_runs(setup):
    s = setup
    x = s["d"]["x"]
    temps, alphas, seeds = sweep.grid([2.0, 5.0], [0.5], [0, 1])
    keys = sweep.member_keys(seeds)
    states = sweep.init_members(s["student"], keys["init"], x[:1])
    assert np.shape(states.model_state["batch_stats"]["BatchNorm_0"]["var"]) == (4, 4)
    scheds = sweep.member_schedules(keys["schedule"], len(s["ds"].y_train), 32, steps=STEPS)
    d = dict(s["d"], teacher_logits=s["t_logits"])
    final, losses = sweep.make_sweep_run(s["student"], "kd")(states, d, scheds, keys["dropout"],
                                                            sweep.sweep_hyper(temps, alphas))
    run = kdjax.make_run(s["student"], "kd")
    for i in (0, 3):
        one = kdjax.create_train_state(s["student"], keys["init"][i], x[:1])
        one, one_loss = run(one, d, scheds[i], keys["dropout"][i], kdjax.make_hyper(temps[i], alphas[i]))
        member = jax.tree_util.tree_map(lambda a, i=i: a[i], (final.params, final.model_state))
        assert_trees_close(member, (one.params, one.model_state), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(losses["loss"][i]), np.asarray(one_loss["loss"]), rtol=1e-5, atol=1e-6)
    acc = sweep.evaluate_members(s["student"], final, x[:100], s["d"]["y"][:100])["accuracy"]
    assert acc.shape == (4,)


def test_callable_objective_equals_kd_and_is_checked(setup):
    s = setup
    x, h = s["d"]["x"], kdjax.make_hyper(3.0, 0.7)
    d = dict(s["d"], teacher_logits=s["t_logits"])

    def my_kd(logits, batch, teacher_logits, hyper):
        return kdjax.distillation_loss(logits, teacher_logits, batch["y"], hyper.temperature, hyper.alpha)

    a, la = kdjax.make_run(s["student"], "kd")(fresh(s["student"], x), d, s["schedule"][:4], s["rng"], h)
    b, lb = kdjax.make_run(s["student"], my_kd)(fresh(s["student"], x), d, s["schedule"][:4], s["rng"], h)
    np.testing.assert_array_equal(np.asarray(la["loss"]), np.asarray(lb["loss"]))
    assert_trees_close(a.params, b.params, rtol=0, atol=0)
    step = kdjax.make_train_step(s["student"], lambda logits, batch, t, hyper: logits.sum(-1))
    batch = {"x": x[:8], "y": s["d"]["y"][:8]}
    with pytest.raises(InputError, match="float scalar"):
        step(fresh(s["student"], x), batch, s["rng"])
    with pytest.raises(InputError, match="objective"):
        kdjax.make_train_step(s["student"], "mse")


def test_fit_members_resume_with_batch_stats_is_bitwise(setup, tmp_path):
    """Checkpoint a BatchNorm student mid-run, restore, continue: bitwise equal."""
    from flax import serialization

    from kdjax import checkpoint

    ds, cfg = data.digits(images=True), fitting.RunConfig(steps=8, batch_size=32, optimizer="sgd",
                                                               learning_rate=0.05, lr_schedule="cosine")
    whole, whole_loss = fitting.fit_members(UserCNN(4), "ce", ds, cfg, [0, 1], chunk=4)
    saved = {}

    def keep(done, states, losses):
        if done == 4:
            checkpoint.save(tmp_path / "s.ckpt", {"states": states, "losses": losses})
            saved["done"] = True

    fitting.fit_members(UserCNN(4), "ce", ds, cfg, [0, 1], chunk=4, on_checkpoint=keep)
    tree, _ = checkpoint.load(tmp_path / "s.ckpt")
    start = serialization.from_state_dict(fitting.initial_members(UserCNN(4), ds, cfg, [0, 1]), tree["states"])
    resumed, r_loss = fitting.fit_members(UserCNN(4), "ce", ds, cfg, [0, 1], chunk=4,
                                              start=(start, tree["losses"]))
    np.testing.assert_array_equal(whole_loss, r_loss)
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_predict_in_batches_equals_whole(setup):
    s = setup
    x = s["d"]["x"][:103]
    whole = kdjax.predict_logits(s["teacher"], s["t_state"], x)
    np.testing.assert_allclose(np.asarray(kdjax.predict_logits(s["teacher"], s["t_state"], x, batch_size=25)),
                               np.asarray(whole), rtol=1e-6, atol=1e-6)
    m1 = kdjax.evaluate(s["teacher"], s["t_state"], x, s["d"]["y"][:103])
    m2 = kdjax.evaluate(s["teacher"], s["t_state"], x, s["d"]["y"][:103], batch_size=50)
    assert float(m1["accuracy"]) == float(m2["accuracy"])


# ----------------------------------------------------------------------------- ResNet


def test_resnet_batchnorm_has_pytorch_semantics():
    """Train mode normalises with the biased batch variance and updates running_var with
    the unbiased one, momentum 0.1; eval mode uses the running statistics."""
    model = kdjax.ResNet((1,), (4,), num_classes=3, stem="cifar", dtype=jnp.float64)
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 6, 6, 2)) * 3 + 1)
        variables = model.init(jax.random.PRNGKey(0), x)
        captured = {}

        def spy(next_fun, args, kwargs, context):  # the input of the stem's BatchNorm
            if context.module.name == "bn1" and context.module.parent.name is None:
                captured["x"] = np.asarray(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(spy):
            _, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
        h = captured["x"].reshape(-1, 4)
        n = h.shape[0]
        stats = new["batch_stats"]["bn1"]
        np.testing.assert_allclose(stats["mean"], 0.1 * h.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * h.var(0) * n / (n - 1), rtol=1e-12)
        # eval differs from train mode (running vs batch statistics)
        train_out = model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
        assert not np.allclose(np.asarray(train_out), np.asarray(model.apply(variables, x)))
        # init did not move the statistics
        np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], np.ones(4))


def test_resnet18_layout():
    v = jax.eval_shape(kdjax.resnet18().init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert kdjax.param_count(v["params"]) == 11_689_512  # torchvision's resnet18
    names = kdjax.convert.variables_to_torch(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), v))
    for key in ("conv1.weight", "bn1.running_var", "bn1.num_batches_tracked", "layer1.0.conv2.weight",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean", "layer4.1.bn2.bias",
                "fc.weight", "fc.bias"):
        assert key in names, key
    assert names["conv1.weight"].shape == (64, 3, 7, 7) and names["fc.weight"].shape == (1000, 512)
    assert "layer1.0.downsample.0.weight" not in names  # no shortcut conv where shapes agree
    small = jax.eval_shape(kdjax.ResNet((1, 1), (8, 16), 10, "cifar").init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 8, 8, 3), np.float32))
    assert small["params"]["conv1"]["kernel"].shape == (3, 3, 3, 8)


@pytest.mark.parametrize("how", ["model.init", "host"])
def test_resnet_init_is_torchvisions(how):
    """Both inits draw torchvision's distributions; the host one has model.init's tree."""
    model = kdjax.ResNet((1, 1), (16, 32), 10, "cifar")
    x = jnp.zeros((1, 8, 8, 3))
    flax_vars = model.init(jax.random.PRNGKey(0), x)
    if how == "host":
        state = kdjax.create_train_state(model, jax.random.PRNGKey(0), x)
        v = state.variables
        assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(flax_vars)
        for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(flax_vars)):
            assert a.shape == b.shape and a.dtype == b.dtype
    else:
        v = flax_vars
    p = v["params"]
    k = np.asarray(p["layer2"]["0"]["conv1"]["kernel"])  # kaiming normal, fan_out = 32 * 9
    np.testing.assert_allclose(k.std(), np.sqrt(2 / (32 * 9)), rtol=0.05)
    assert np.abs(k).max() > 2.5 * np.sqrt(2 / (32 * 9))  # untruncated
    np.testing.assert_array_equal(np.asarray(p["layer1"]["0"]["bn1"]["scale"]), 1.0)
    np.testing.assert_array_equal(np.asarray(p["bn1"]["bias"]), 0.0)
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["bn1"]["var"]), 1.0)
    fc = np.asarray(p["fc"]["kernel"])
    assert np.abs(fc).max() <= 1 / np.sqrt(32) and np.abs(fc).max() > 0.9 / np.sqrt(32)
    assert np.abs(np.asarray(p["fc"]["bias"])).max() > 0  # nn.Linear's bias is not zero


# ----------------------------------------------------------------------------- errors


def test_batchnorm_model_without_model_state_is_one_clear_error(setup):
    s = setup
    params = s["t_state"].params
    state = kdjax.state_from_params(params)
    batch = {"x": s["d"]["x"][:8], "y": s["d"]["y"][:8]}
    with pytest.raises(InputError, match=r"needs its 'batch_stats' variables.*got model_state with collections \[\]"):
        kdjax.make_train_step(s["teacher"], "ce")(state, batch, s["rng"])
    with pytest.raises(InputError, match="batch_stats"):
        kdjax.predict_logits(s["teacher"], params, s["d"]["x"][:4])


@pytest.mark.parametrize("x,words", [
    (np.zeros((2, 3, 16, 16), np.float32), ["NHWC", "(1, 3, 16, 16)", "NCHW", "transpose(0, 2, 3, 1)"]),
    (np.zeros((2, 16, 16), np.float32), ["NHWC", "(1, 16, 16)"]),
    (np.zeros((2, 16, 16, 3), np.int32), ["floating", "int32"]),
])
def test_resnet_input_errors_at_init(x, words):
    with pytest.raises((InputError, InputTypeError)) as e:
        kdjax.create_train_state(kdjax.ResNet((1,), (4,)), jax.random.PRNGKey(0), x[:1])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_resnet_nchw_batch_to_nhwc_params():
    model = kdjax.ResNet((1,), (4,))
    state = kdjax.create_train_state(model, 0, np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(InputError, match=r"3 channels.*\(2, 3, 8, 8\).*NCHW"):
        kdjax.predict_logits(model, state, jnp.zeros((2, 3, 8, 8)))


def test_other_user_mistakes():
    with pytest.raises(InputError, match="example_input"):
        kdjax.create_train_state(UserCNN(), 0, np.float32(1.0))
    with pytest.raises(InputError, match=r"\[batch, features\]"):
        kdjax.create_train_state(kdjax.StudentMLP(4, 2), 0, np.zeros((3,), np.float32))
    with pytest.raises(InputTypeError, match="flax.linen Module"):
        kdjax.create_train_state(lambda x: x, 0, np.zeros((1, 3)))

    class NoTrain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x)

    with pytest.raises(InputTypeError, match=r"model\(x, train=bool\).*takes \(x\)"):
        kdjax.create_train_state(NoTrain(), 0, np.zeros((1, 3)))
    with pytest.raises(InputError, match="expected example_input or input_dim, got both"):
        kdjax.create_train_state(kdjax.StudentMLP(4, 2), 0, np.zeros((1, 3)), input_dim=3)
    with pytest.raises(InputError, match="stem"):
        kdjax.create_train_state(kdjax.ResNet((1,), (4,), stem="tiny"), 0, np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(InputError, match="stage_sizes"):
        kdjax.create_train_state(kdjax.ResNet((1, 1), (4,)), 0, np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(InputError, match="batch_size"):
        kdjax.predict_logits(kdjax.StudentMLP(4, 2), {}, np.zeros((1, 3)), batch_size=0)


def test_mlp_state_same_for_int_and_example_input():
    """v1's create_train_state(model, rng, input_dim) and the example-batch call agree
    (and images are flattened for MLPs)."""
    m = kdjax.StudentMLP(8, 3)
    a = kdjax.create_train_state(m, jax.random.PRNGKey(1), 64)
    b = kdjax.create_train_state(m, jax.random.PRNGKey(1), np.zeros((5, 8, 8, 1), np.float32))
    c = kdjax.create_train_state(m, jax.random.PRNGKey(1), input_dim=64)
    for x, y, z in zip(*(jax.tree_util.tree_leaves(s) for s in (a, b, c))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
    images = jnp.ones((2, 8, 8, 1))
    np.testing.assert_array_equal(np.asarray(m.apply({"params": a.params}, images)),
                                  np.asarray(m.apply({"params": a.params}, images.reshape(2, 64))))


def test_image_data():
    ds = data.digits(images=True)
    flat = data.digits()
    assert ds.x_train.shape[1:] == (8, 8, 1) and ds.input_shape == (8, 8, 1) and ds.input_dim == 64
    np.testing.assert_array_equal(ds.x_train.reshape(len(ds.x_train), -1), flat.x_train)
    syn = data.synthetic_images(20, (4, 4, 3), 3, test_samples=5)
    assert syn.x_train.shape == (20, 4, 4, 3) and syn.x_test.shape == (5, 4, 4, 3)
    np.testing.assert_array_equal(syn.x_train.reshape(20, -1), data.synthetic(20, 48, 3, test_samples=5).x_train)
    with pytest.raises(InputError, match="shape"):
        data.synthetic_images(20, (4, 4), 3)


def test_npz_images(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "i.npz", x_train=rng.normal(size=(10, 4, 4, 3)), y_train=rng.integers(0, 2, 10),
             x_test=rng.normal(size=(4, 4, 4, 3)), y_test=rng.integers(0, 2, 4))
    ds = data.load_npz(tmp_path / "i.npz")
    assert ds.input_shape == (4, 4, 3)
    np.savez(tmp_path / "j.npz", x_train=rng.normal(size=(10, 4, 4, 3)), y_train=rng.integers(0, 2, 10),
             x_test=rng.normal(size=(4, 3, 4, 4)), y_test=rng.integers(0, 2, 4))
    with pytest.raises(InputError, match=r"test examples of shape \(4, 4, 3\).*\(3, 4, 4\)"):
        data.load_npz(tmp_path / "j.npz")


# ----------------------------------------------------------------------------- optimizers


def test_sgd_momentum_weight_decay_nesterov_by_hand():
    """Two steps on f(w) = w^2 / 2 (gradient w), against torch.optim.SGD's formula."""
    for nesterov in (False, True):
        tx = kdjax.sgd(0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
        w = jnp.array([2.0])
        state = tx.init(w)
        want_w, buf = 2.0, None
        for _ in range(2):
            g = want_w + 0.01 * want_w
            buf = g if buf is None else 0.9 * buf + g
            want_w -= 0.1 * (g + 0.9 * buf if nesterov else buf)
            upd, state = tx.update(w, state, w)
            w = optax.apply_updates(w, upd)
        np.testing.assert_allclose(float(w[0]), want_w, rtol=1e-6)


def test_schedules_closed_forms():
    cos = kdjax.cosine_schedule(0.1, 10, eta_min=0.001)
    got = np.array([float(cos(t)) for t in range(11)])
    want = 0.001 + (0.1 - 0.001) * (1 + np.cos(np.pi * np.arange(11) / 10)) / 2
    np.testing.assert_allclose(got, want, rtol=1e-6)
    per_epoch = kdjax.cosine_schedule(0.1, 4, every=3)
    assert float(per_epoch(2)) == float(per_epoch(0)) == pytest.approx(0.1)
    assert float(per_epoch(3)) == pytest.approx(0.1 * (1 + np.cos(np.pi / 4)) / 2)
    ms = kdjax.multistep_schedule(0.1, [3, 5], 0.5)
    np.testing.assert_allclose([float(ms(t)) for t in range(7)], [0.1] * 3 + [0.05] * 2 + [0.025] * 2, rtol=1e-6)
    with pytest.raises(InputError, match="milestones"):
        kdjax.multistep_schedule(0.1, [5, 3])
    with pytest.raises(InputError, match="t_max"):
        kdjax.cosine_schedule(0.1, 0)
    with pytest.raises(InputError, match="momentum"):
        kdjax.sgd(0.1, momentum=1.0)
    with pytest.raises(InputError, match="nesterov"):
        kdjax.sgd(0.1, momentum=0.0, nesterov=True)


@pytest.mark.parametrize("shape", [(6, 4, 4, 3), (5, 7)])
def test_batch_norm_gradient_equals_autodiff(shape):
    """BatchNorm's closed-form training gradient is autodiff's of the plain formula, in
    float64, for x, scale and bias, with cotangents on the returned mean and variance too."""
    from kdjax.models.resnet import _batch_norm_plain, batch_norm_train

    with jax.enable_x64(True):
        rng = np.random.default_rng(len(shape))
        c = shape[-1]
        x, scale, bias = rng.normal(size=shape) * 3 + 1, rng.normal(size=c), rng.normal(size=c)
        cot = (rng.normal(size=shape), rng.normal(size=c), rng.normal(size=c))
        loss = lambda bn: (lambda *a: sum(jnp.sum(o * g) for o, g in zip(bn(*a, 1e-5), cot)))
        want = jax.grad(loss(_batch_norm_plain), (0, 1, 2))(x, scale, bias)
        got = jax.grad(loss(batch_norm_train), (0, 1, 2))(x, scale, bias)
        for g, h in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-12, atol=1e-12)
        for g, h in zip(batch_norm_train(x, scale, bias, 1e-5), _batch_norm_plain(x, scale, bias, 1e-5)):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(h))


@pytest.mark.parametrize("hw,k,stride,pads,batch", [(8, 3, 1, ((1, 1), (1, 1)), 3), (8, 3, 2, ((1, 1), (1, 1)), 3),
                                                    (7, 3, 2, ((1, 1), (1, 1)), 3), (8, 1, 2, ((0, 0), (0, 0)), 3),
                                                    (15, 7, 2, ((3, 3), (3, 3)), 3), (8, 3, 2, ((0, 1), (0, 1)), 3),
                                                    (7, 3, 2, ((1, 1), (1, 1)), 37), (8, 3, 1, ((1, 1), (1, 1)), 32),
                                                    (5, 3, 1, ((1, 1), (1, 1)), 201)])
def test_conv2d_gradients_equal_autodiff(hw, k, stride, pads, batch):
    """conv2d's written-out gradients are autodiff's, in float64, forward and reverse; a
    batch of 37 or 32 has its kernel gradient summed over chunks of 16 images, one of 201
    over 8 chunks (7 of 26 images and 19)."""
    from kdjax.models import conv2d
    from kdjax.models.resnet import WEIGHT_GRAD_CHUNKS, WEIGHT_GRAD_IMAGES

    assert (WEIGHT_GRAD_IMAGES, WEIGHT_GRAD_CHUNKS) == (16, 8)  # the chunkings the batches above test
    with jax.enable_x64(True):
        rng = np.random.default_rng(hw * k + stride)
        x, w = jnp.asarray(rng.normal(size=(batch, hw, hw, 4))), jnp.asarray(rng.normal(size=(k, k, 4, 5)))
        plain = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), pads,
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
        loss = lambda conv: (lambda x, w: jnp.sum(jnp.sin(conv(x, w))))
        want = jax.grad(loss(plain), (0, 1))(x, w)
        got = jax.grad(loss(lambda x, w: conv2d(x, w, stride, pads)), (0, 1))(x, w)
        np.testing.assert_allclose(np.asarray(conv2d(x, w, stride, pads)), np.asarray(plain(x, w)), rtol=1e-13)
        for g, h in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-12, atol=1e-12)
