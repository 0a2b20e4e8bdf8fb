"""``kdjax on-policy``: when does on-policy distillation matter? A task whose answers can be
checked — sorting digits — a trained teacher that solves it, and a small student trained
five ways at equal updates (same init, same prompts per step, same optimizer; optionally
after the same ``warmup`` steps of supervised training, as on-policy distillation is used
in practice):

* ``sft``: cross-entropy on the data's answers;
* ``kd``: token-level KD on the data's answers (GKD with lmbda 0, beta 0: forward KL);
* ``seqkd``: cross-entropy on the teacher's greedy answers (Kim & Rush), generated once;
* ``gkd``: TRL's GKD, lmbda 0.5, beta 0.5, sampling temperature 0.9 (GKDConfig's);
* ``reverse_kl``: tinker-cookbook's on-policy reverse KL (coef 1, no discount).

Measured on held-out prompts: exact-match accuracy of the student's greedy answers, the
teacher's NLL of the student's own samples (temperature 1; nats per token), and the
student's bits per token on the reference answers; mean ± 95% CI over seeds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("sft", "kd", "seqkd", "gkd", "reverse_kl")


@dataclasses.dataclass(frozen=True)
class Task:
    """Sort ``length`` digits in ``[0, digits)``: prompt = the digits then SEP; answer = them
    sorted then EOS. Vocabulary: the digits, SEP, EOS."""

    length: int = 8
    digits: int = 10

    @property
    def sep(self) -> int:
        return self.digits

    @property
    def eos(self) -> int:
        return self.digits + 1

    @property
    def vocab(self) -> int:
        return self.digits + 2

    def make(self, n: int, seed: int):
        """``(prompts [n, length + 1], answers [n, length + 1])`` int32."""
        x = np.random.default_rng(seed).integers(0, self.digits, (n, self.length))
        prompts = np.concatenate([x, np.full((n, 1), self.sep)], axis=1)
        answers = np.concatenate([np.sort(x, axis=1), np.full((n, 1), self.eos)], axis=1)
        return prompts.astype(np.int32), answers.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Setup:
    task: Task = Task()
    train: int = 4096
    test: int = 512
    teacher: tuple = (2, 128)  # layers, hidden
    student: tuple = (1, 32)
    teacher_steps: int = 2000
    warmup: int = 0  # SFT steps every student starts from (the same for every method)
    steps: int = 400
    batch: int = 64
    lr: float = 1e-3

    def model(self, layers: int, hidden: int):
        from kdjax.models import Llama

        return Llama(vocab_size=self.task.vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                     num_layers=layers, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=max(64, 2 * (self.task.length + 1)), tie_word_embeddings=True)

    def largest_programs(self):
        """``(what, lowered program)`` of the experiment's largest programs, built abstractly
        (nothing computed): the teacher's training step and its greedy answers to every
        training prompt, whose memory ``kdjax on-policy`` checks before it starts."""
        import kdjax
        from kdjax.generation import rollout

        teacher, n = self.model(*self.teacher), self.task.length + 1
        tokens = lambda rows, length: jax.ShapeDtypeStruct((rows, length), jnp.int32)
        state = jax.eval_shape(lambda: kdjax.create_train_state(teacher, 0, jnp.zeros((1, 2 * n), jnp.int32)))
        batch = {"x": tokens(self.batch, 2 * n), "y": tokens(self.batch, 2 * n),
                 "where": jax.ShapeDtypeStruct((self.batch, 2 * n), bool)}
        step = kdjax.make_train_step(teacher, "ce").lower(state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32))
        answers = jax.jit(lambda v, p: rollout(teacher, v, p, n, eos_id=self.task.eos).tokens).lower(
            {"params": state.params}, tokens(self.train, n))
        return [(f"the teacher's training step (batch {self.batch} x {2 * n} tokens)", step),
                (f"the teacher's answers to the {self.train} training prompts ({n} tokens each)", answers)]


def _sequence_data(prompts, answers):
    from kdjax.onpolicy import sequence_data

    tokens = np.concatenate([prompts, answers], axis=1)
    return sequence_data(tokens, np.ones(tokens.shape, bool), prompts.shape[1])


def train_teacher(s: Setup, seed: int, prompts, answers):
    import kdjax

    teacher = s.model(*s.teacher)
    data = _sequence_data(prompts, answers)
    state = kdjax.create_train_state(teacher, seed, data["x"][:1], learning_rate=s.lr)
    schedule = kdjax.data.random_batch_schedule(jax.random.PRNGKey(seed), len(prompts), s.batch, s.teacher_steps)
    state, m = kdjax.make_run(teacher, "ce")(state, data, schedule, jax.random.PRNGKey(seed))
    return teacher, state, np.asarray(m["loss"])


def evaluate(model, variables, teacher, t_variables, prompts, answers, task: Task, seed: int) -> dict:
    """Exact-match accuracy of greedy answers, the teacher's NLL (nats/token) of the model's
    samples at temperature 1, and bits per token on the reference answers."""
    from kdjax.generation import rollout
    from kdjax.onpolicy import sequence_logprobs

    p, n = jnp.asarray(prompts), answers.shape[1]
    greedy = rollout(model, variables, p, n, eos_id=task.eos)
    correct = np.all(np.asarray(greedy.tokens[:, prompts.shape[1]:]) == answers, axis=1)
    sampled = rollout(model, variables, p, n, rng=jax.random.PRNGKey(10_000 + seed), eos_id=task.eos)
    _, t_logp = sequence_logprobs(teacher, t_variables, sampled.tokens, sampled.mask, prompts.shape[1])
    keep = sampled.completion_mask
    nll = -float(jnp.sum(jnp.where(keep, t_logp, 0.0)) / jnp.sum(keep))
    reference = jnp.concatenate([p, jnp.asarray(answers)], axis=1)
    _, logp = sequence_logprobs(model, variables, reference, jnp.ones(reference.shape, bool), prompts.shape[1])
    return {"accuracy": float(correct.mean()), "teacher_nll": nll, "bits_per_token": float(-logp.mean() / np.log(2))}


class Runs:
    """The compiled training runs of one experiment, each built once and reused by every
    seed and method (a run built per call would compile its program again)."""

    def __init__(self, s: Setup, teacher):
        import kdjax

        self.s, self.teacher, self.student = s, teacher, s.model(*s.student)
        self.ce = kdjax.make_run(self.student, "ce")  # the warm-up, sft and seqkd
        self._on_policy: dict = {}

    def on_policy(self, method: str, max_new_tokens: int):
        from kdjax import onpolicy

        key = (method, max_new_tokens)
        if key not in self._on_policy:
            options = {"kd": dict(method="gkd", lmbda=0.0, beta=0.0),
                       "gkd": dict(method="gkd", lmbda=0.5, beta=0.5, temperature=0.9),
                       "reverse_kl": dict(method="reverse_kl")}[method]
            self._on_policy[key] = onpolicy.make_on_policy_run(self.student, self.teacher,
                                                               max_new_tokens=max_new_tokens, eos_id=self.s.task.eos,
                                                               **options)
        return self._on_policy[key]


def train_student(s: Setup, method: str, seed: int, runs: Runs, t_state, prompts, answers, teacher_answers):
    """The student after ``s.steps`` updates of ``method`` (init and prompt schedule from
    ``seed``; identical across methods), trained by ``runs``' programs."""
    import kdjax

    student = runs.student
    state = kdjax.create_train_state(student, 1000 + seed, prompts[:1], learning_rate=s.lr)
    if s.warmup:  # the same supervised start for every method
        warm = kdjax.data.random_batch_schedule(jax.random.PRNGKey(3000 + seed), len(prompts), s.batch, s.warmup)
        state, _ = runs.ce(state, _sequence_data(prompts, answers), warm, jax.random.PRNGKey(4000 + seed))
    schedule = kdjax.data.random_batch_schedule(jax.random.PRNGKey(1000 + seed), len(prompts), s.batch, s.steps)
    rng = jax.random.PRNGKey(2000 + seed)
    if method in ("sft", "seqkd"):
        data = _sequence_data(prompts, answers if method == "sft" else teacher_answers)
        state, m = runs.ce(state, data, schedule, rng)
        return student, state, np.asarray(m["loss"])
    data = {"prompts": prompts, "prompt_mask": np.ones(prompts.shape, bool), "completions": answers,
            "completion_mask": np.ones(answers.shape, bool)}
    state, m = runs.on_policy(method, answers.shape[1])(state, data, schedule, rng, t_state)
    return student, state, np.asarray(m["loss"])


def run(s: Setup, seeds, methods=METHODS, log=lambda line: None, on_progress=lambda *a: None) -> dict:
    """Teacher (trained once, on the first seed), then every method x seed; the evaluation of
    each, and mean ± 95% CI per method. ``on_progress(phase, done, total)`` after the teacher
    (``"teacher"``) and after each student (``"students"``: method x seed)."""
    from kdjax.generation import rollout
    from kdjax.stats import mean_ci

    prompts, answers = s.task.make(s.train, seed=0)
    test_p, test_a = s.task.make(s.test, seed=1)
    teacher, t_state, t_losses = train_teacher(s, seeds[0], prompts, answers)
    on_progress("teacher", 1, 1)
    t_eval = evaluate(teacher, t_state.variables, teacher, t_state.variables, test_p, test_a, s.task, seeds[0])
    log(f"teacher: {t_eval['accuracy']:.3f} exact match, {t_eval['bits_per_token']:.3f} bits/token on held-out "
        f"prompts")
    greedy = rollout(teacher, t_state.variables, jnp.asarray(prompts), answers.shape[1], eos_id=s.task.eos)
    teacher_answers = np.asarray(greedy.tokens[:, prompts.shape[1]:])
    per = {m: {k: [] for k in ("accuracy", "teacher_nll", "bits_per_token")} for m in methods}
    runs = Runs(s, teacher)
    for method in methods:
        for seed in seeds:
            student, state, _ = train_student(s, method, seed, runs, t_state, prompts, answers, teacher_answers)
            ev = evaluate(student, state.variables, teacher, t_state.variables, test_p, test_a, s.task, seed)
            for k, v in ev.items():
                per[method][k].append(v)
            on_progress("students", sum(map(len, (per[m]["accuracy"] for m in methods))), len(methods) * len(seeds))
        log(f"{method}: accuracy {np.mean(per[method]['accuracy']):.3f}, teacher NLL "
            f"{np.mean(per[method]['teacher_nll']):.3f}, bits/token {np.mean(per[method]['bits_per_token']):.3f}")
    stats = {m: {k: mean_ci(v) for k, v in d.items()} for m, d in per.items()}
    base = per[methods[0]]
    paired = {m: {k: mean_ci(np.asarray(per[m][k]) - np.asarray(base[k])) for k in base} for m in methods[1:]}
    return {"setup": dataclasses.asdict(s), "seeds": list(seeds), "teacher": t_eval, "per_seed": per,
            "mean_ci": stats, f"paired_vs_{methods[0]}": paired,
            "teacher_answer_accuracy_on_train": float(np.all(teacher_answers == answers, axis=1).mean())}
