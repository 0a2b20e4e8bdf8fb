"""The objective protocol (kdjax.objectives): an objective written outside kdjax trains through
the one train step, the fused run with an online teacher, a sweep and the workflows; the
shorthands build the built-ins; the core names no method."""

import ast
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import sweep, workflows
from kdjax.objectives import CE, KD, LogitLoss, Teacher, as_objective
from kdjax.fitting import RunConfig


@dataclasses.dataclass(frozen=True)
class TVPlusCE:
    """A user's objective: w · total variation between the teacher's and the student's
    softmaxes, plus cross-entropy; ``w`` from ``hyper["w"]`` (traced) or, without hyper, the
    field. Nothing of kdjax's objective classes is used."""

    weight: float = 1.0

    def loss(self, student, params, model_state, batch, *, rng, hyper, teacher):
        logits, new_state = kdjax.apply_model(student, params, model_state, batch["x"], train=True, rng=rng)
        t = batch["teacher_logits"] if "teacher_logits" in batch else \
            teacher.model.apply(teacher.variables, batch["x"], train=False)
        tv = 0.5 * jnp.abs(jax.nn.softmax(logits) - jax.nn.softmax(t)).sum(-1).mean()
        ce = kdjax.hard_ce(logits, batch["y"]).mean()
        w = self.weight if hyper is None else hyper["w"]
        return w * tv + ce, (new_state, {"tv": tv, "ce": ce})


@pytest.fixture(scope="module")
def setup():
    with jax.enable_x64(True):
        ds = kdjax.data.synthetic(num_samples=64, input_dim=6, num_classes=3, seed=0, test_samples=16)
        x, y = jnp.asarray(ds.x_train, jnp.float64), jnp.asarray(ds.y_train)
        teacher = kdjax.TeacherMLP(16, 3, dtype=jnp.float64)
        student = kdjax.StudentMLP(8, 3, dtype=jnp.float64)
        t_state = kdjax.create_train_state(teacher, jax.random.PRNGKey(0), 6)
        s_state = kdjax.create_train_state(student, jax.random.PRNGKey(1), 6)
        schedule = kdjax.data.seed_schedule(jax.random.PRNGKey(2), 64, 16, 6)
        yield ds, x, y, teacher, student, t_state, s_state, schedule


def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def test_a_user_objective_trains_through_the_step_and_the_run_with_an_online_teacher(setup):
    ds, x, y, teacher, student, t_state, s_state, schedule = setup
    hyper = {"w": jnp.asarray(2.0, jnp.float64)}
    rng = jax.random.PRNGKey(3)
    with jax.enable_x64(True):
        step = kdjax.make_train_step(student, TVPlusCE(), teacher=teacher, donate=False)
        state, losses = s_state, []
        for idx in schedule:
            state, m = step(state, {"x": x[idx], "y": y[idx]}, rng, hyper, t_state)
            losses.append(float(m["loss"]))
        assert set(m["terms"]) == {"tv", "ce"} and float(m["terms"]["tv"]) > 0
        run = kdjax.make_run(student, TVPlusCE(), teacher=teacher, donate=False)
        whole, mr = run(s_state, {"x": x, "y": y}, schedule, rng, hyper, t_state)
        np.testing.assert_allclose(mr["loss"], losses, rtol=1e-13, atol=0)
        for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(state.params)):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        # the weight is a traced hyperparameter: another value, the same program, another result
        _, other = run(s_state, {"x": x, "y": y}, schedule, rng, {"w": jnp.asarray(0.0, jnp.float64)}, t_state)
        assert run._cache_size() == 1 and not np.allclose(other["loss"], mr["loss"])


def test_a_user_objective_in_a_sweep_equals_each_members_own_run(setup):
    ds, x, y, teacher, student, t_state, s_state, schedule = setup
    weights = np.asarray([0.0, 1.0, 4.0])
    with jax.enable_x64(True):
        states = jax.tree_util.tree_map(lambda a: jnp.stack([a] * 3), s_state)
        rngs = jnp.stack([jax.random.PRNGKey(k) for k in (5, 6, 7)])
        srun = sweep.make_sweep_run(student, TVPlusCE(), teacher=teacher, shared_schedule=True)
        members, ms = srun(states, {"x": x, "y": y}, schedule, rngs, {"w": jnp.asarray(weights)}, t_state)
        run = kdjax.make_run(student, TVPlusCE(), teacher=teacher, donate=False)
        for i, w in enumerate(weights):
            own, mo = run(s_state, {"x": x, "y": y}, schedule, rngs[i], {"w": jnp.asarray(w)}, t_state)
            np.testing.assert_allclose(ms["loss"][i], mo["loss"], rtol=1e-12, atol=1e-14)
            for a, b in zip(jax.tree_util.tree_leaves(members.params), jax.tree_util.tree_leaves(own.params)):
                np.testing.assert_allclose(a[i], b, rtol=1e-12, atol=1e-14)


def test_a_user_objective_through_workflows_distill(setup):
    ds = kdjax.data.synthetic(num_samples=200, input_dim=10, num_classes=3, seed=1, test_samples=50)
    cfg = RunConfig(steps=20, batch_size=32)
    r = workflows.distill(kdjax.TeacherMLP(32, 3), kdjax.StudentMLP(8, 3), ds, cfg, [0, 1],
                          objective=TVPlusCE(weight=2.0))
    assert r.losses["distilled"].shape == (2, 20) and np.isfinite(r.losses["distilled"]).all()
    # the standard half is plain cross-entropy; the distilled half carries the TV term on top
    assert not np.allclose(r.losses["distilled"], r.losses["standard"])
    assert set(r.accuracy["test"]) == {"teacher", "standard", "distilled"}


def test_the_shorthands_build_the_builtins_bit_for_bit(setup):
    ds, x, y, teacher, student, t_state, s_state, schedule = setup
    assert as_objective("ce") == CE() and as_objective("kd") == KD()
    fn = lambda logits, batch, t, hyper: kdjax.hard_ce(logits, batch["y"]).mean()
    assert as_objective(fn) == LogitLoss(fn)
    hyper = kdjax.make_hyper(3.0, 0.7)
    batch = {"x": x[:16].astype(jnp.float32), "y": y[:16],
             "teacher_logits": jnp.ones((16, 3), jnp.float32)}
    s32 = kdjax.create_train_state(kdjax.StudentMLP(8, 3), jax.random.PRNGKey(1), 6)
    for short, built in (("kd", KD()), ("ce", CE())):
        a = kdjax.make_train_step(kdjax.StudentMLP(8, 3), short, donate=False)(s32, batch, jax.random.PRNGKey(0),
                                                                               hyper if short == "kd" else None)
        b = kdjax.make_train_step(kdjax.StudentMLP(8, 3), built, donate=False)(s32, batch, jax.random.PRNGKey(0),
                                                                               hyper if short == "kd" else None)
        assert float(a[1]["loss"]) == float(b[1]["loss"])
    with pytest.raises(kdjax.errors.InputError, match="objective: expected one of"):
        kdjax.make_train_step(student, 42)
    with pytest.raises(kdjax.errors.InputError, match="hyper: objective 'kd' needs a Hyper"):
        kdjax.make_train_step(kdjax.StudentMLP(8, 3), "kd", donate=False)(s32, batch, jax.random.PRNGKey(0))


def test_teacher_is_a_pytree_with_a_static_model():
    t = Teacher(kdjax.TeacherMLP(4, 2), {"params": {"w": jnp.ones(2)}})
    leaves, treedef = jax.tree_util.tree_flatten(t)
    assert len(leaves) == 1 and jax.tree_util.tree_unflatten(treedef, leaves).model == t.model


# --------------------------------------------------------------------------- the layers

ROOT = pathlib.Path(kdjax.__file__).parent
# losses <- objectives <- train <- fitting <- workflows <- app (docs/design.md); a module may
# import its own layer and lower ones only.
LAYERS = [
    {"errors", "stats"},
    {"losses", "data", "parallel", "checkpoint", "tokenizer"},
    {"models", "generation", "objectives", "features", "fused", "convert", "crosstok"},
    {"train", "sweep"},
    {"onpolicy", "offline", "fitting"},
    {"workflows", "hinton"},
    {"app", "__main__"},
]
CORE = ("train", "sweep", "fitting")
# the modules that implement methods (kdjax.features.taps, capturing intermediate values, is a utility)
METHODS = ("kdjax.features.objectives", "kdjax.features.crd", "kdjax.fused", "kdjax.onpolicy", "kdjax.offline",
           "kdjax.crosstok")


def _module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0]


def _layer(top: str) -> int:
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"kdjax.{top} is in no layer of docs/design.md's map: add it")


def _imports(path: pathlib.Path):
    """Every ``kdjax.*`` module ``path`` imports, at the top or inside a function."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdjax"):
            names = [node.module] if node.module != "kdjax" else [f"kdjax.{a.name}" for a in node.names]
            yield from names
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("kdjax"))


def test_no_import_from_a_lower_layer_to_a_higher_one():
    wrong = []
    for path in ROOT.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == ROOT:
            continue  # the package re-exports its public names
        here = _layer(_module_of(path))
        for name in _imports(path):
            parts = name.split(".")
            if len(parts) > 1 and _layer(parts[1]) > here:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, wrong


def test_the_core_imports_no_method_and_names_no_objective_class():
    for path in [p for c in CORE for p in ((ROOT / c).rglob("*.py") if (ROOT / c).is_dir() else [ROOT / f"{c}.py"])]:
        text = path.read_text()
        for name in _imports(path):
            assert name != "kdjax.features" and not name.startswith(METHODS), \
                f"{path.relative_to(ROOT)} imports the method module {name}"
        for cls in ("OnPolicy", "FusedLM", "TopKKD", "Objective)", "features.Objective", "isinstance(objective"):
            assert cls not in text, f"{path.relative_to(ROOT)} names {cls}"


def test_no_import_cycle():
    graph = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        mod = ".".join(("kdjax",) + (rel.parts[:-1] if rel.name == "__init__" else rel.parts))
        graph[mod] = {n for n in _imports(path) if n != mod}
    resolve = lambda n: n if n in graph else n.rsplit(".", 1)[0]
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            n = resolve(n)
            if n not in graph or n.startswith(m + ".") or m.startswith(n + "."):
                continue  # a package and its own submodules
            if state.get(n) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack + [m, n])}")
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_a_method_is_one_table_row(capsys, tmp_path, monkeypatch):
    """docs/design.md's example: the objective above and one row of the method table give
    `kdjax distill --method tv`, with the parser's choices, refusals and architecture check."""
    from test_cli import kdjax_here

    from kdjax.app import methods

    row = methods.Method(lambda args, *_: TVPlusCE(args.kd_weight or 1.0), ("kd_weight",),
                         reference="total variation + CE (docs/design.md's example)")
    monkeypatch.setitem(methods.TABLE, "tv", row)
    tiny = ["--steps", "3", "--seeds", "2", "--teacher-hidden", "16", "--student-hidden", "8", "--batch-size", "16",
            "--quiet", "--no-plots", "--out", tmp_path / "o"]
    p = kdjax_here(capsys, "distill", "--method", "tv", "--kd-weight", "2", *tiny)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "distilled (tv)" in p.stdout
    for args, words in [(["--method", "tv", "--alpha", "0.5"], "--alpha: only used with --method kd"),
                        (["--method", "tv", "--dataset", "text"], "--method tv: expected --arch mlp or resnet"),
                        (["--method", "fitnet", "--kd-weight", "1", "--feature-weight", "1"], None)]:
        p = kdjax_here(capsys, "distill", *args, "--steps", "1", "--quiet")
        if words is None:  # kd_weight is now taken by a non-feature method too: the message names every method
            assert p.returncode in (0, 2), p.stderr
            continue
        assert p.returncode == 2 and words in p.stderr, (args, p.stderr)
    assert "tv" in methods.methods_taking("kd_weight")
    p = kdjax_here(capsys, "distill", "--method", "kd", "--kd-weight", "1", "--steps", "1", "--quiet")
    assert p.returncode == 2 and "--kd-weight: only used with --method fitnet, at, sp, rkd, pkt, crd or tv" in p.stderr


def test_the_docs_list_every_method_with_its_reference():
    """docs/cli.md's method list is the method table: each row's name, architectures and reference."""
    from kdjax.app import methods

    doc = (ROOT.parent / "docs" / "cli.md").read_text()
    for name, row in methods.TABLE.items():
        assert f"| `{name}` | {', '.join(row.archs)} | {row.reference} |" in doc, name
