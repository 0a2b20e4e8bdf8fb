"""The user's files are never lost (issue 36): kdjax writes and removes only the outputs it
recorded writing (``.kdjax-outputs.json``), checks --out and --save-hf before it trains, cuts
metrics.jsonl back on --resume, and Ctrl-C is one line and exit 130."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_cli import kdjax_here
from test_cli_trust import refused, snapshot

pytest.importorskip("matplotlib")

MLP = ["--steps", "6", "--seeds", "1", "--teacher-hidden", "16", "--student-hidden", "8", "--batch-size", "16",
       "--checkpoint-every", "2", "--quiet", "--no-plots"]
LM = ["--dataset", "text", "--arch", "llama", "--steps", "4", "--seeds", "1", "--text-bytes", "20000", "--context", "16",
      "--teacher-layers", "1", "--teacher-dim", "16", "--student-dim", "16", "--vocab-size", "300", "--quiet",
      "--no-plots", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory):
    """A tiny Llama teacher folder (max_position_embeddings 16) with its tokenizer."""
    from kdjax import convert, data
    from kdjax import tokenizer as tk
    from kdjax.models import Llama

    root = tmp_path_factory.mktemp("teacher")
    _, train, _, _ = data.text_documents(None)
    tok = tk.train_bpe([bytes(d).decode("utf-8", "ignore") for d in data._first(train, 20000)], 300)
    teacher = Llama(vocab_size=tok.get_vocab_size(), hidden_size=16, intermediate_size=32, num_layers=1, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=16, tie_word_embeddings=True)
    convert.save_hf(teacher, teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32)), root / "hf")
    tok.save(str(root / "hf" / "tokenizer.json"))
    return root / "hf"


def test_save_hf_into_out_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "R"
    refused(kdjax_here(capsys, "distill", *LM, "--out", out, "--save-hf", out), "--save-hf", "other than --out")
    assert not out.exists()  # nothing was created, nothing trained
    refused(kdjax_here(capsys, "distill", *LM, "--out", out, "--save-hf", out / "checkpoints" / "hf"),
            "outside the run's own outputs")


def test_overwrite_keeps_the_users_files_in_out_and_save_hf(tmp_path, capsys):
    out, hf = tmp_path / "out", tmp_path / "hf"
    p = kdjax_here(capsys, "distill", *LM, "--out", out, "--save-hf", hf)
    assert p.returncode == 0, p.stderr[-2000:]
    (out / "mine.txt").write_text("the user's own file")
    (hf / "README.md").write_text("the user's model card")
    p = kdjax_here(capsys, "distill", *LM, "--out", out, "--save-hf", hf, "--overwrite")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "mine.txt").read_text() == "the user's own file"
    assert (hf / "README.md").read_text() == "the user's model card"
    for name in ("results.json", "metrics.jsonl", "checkpoints", "tokenizer.json"):
        assert (out / name).exists(), name
    assert (hf / "config.json").exists() and (hf / "tokenizer.json").exists()


def test_a_file_kdjax_did_not_write_is_never_replaced(tmp_path, capsys, hf_teacher):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("the user's tokenizer")
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        refused(kdjax_here(capsys, "distill", *LM, "--out", out, *extra), "tokenizer.json", "kdjax did not write")
        assert snapshot(out) == before
    teacher_files = snapshot(hf_teacher)
    args = ["--dataset", "text", "--arch", "llama", "--steps", "2", "--seeds", "1", "--text-bytes", "20000",
            "--context", "16", "--student-dim", "16", "--quiet"]
    refused(kdjax_here(capsys, "distill", *args, "--teacher", hf_teacher, "--out", hf_teacher), "--out", "--teacher")
    refused(kdjax_here(capsys, "distill", *args, "--teacher", hf_teacher, "--save-hf", hf_teacher, "--overwrite"),
            "--save-hf", "--teacher")
    refused(kdjax_here(capsys, "teacher-logits", "--teacher", hf_teacher, "--out", hf_teacher, "--context", "16",
                       "--text-bytes", "20000", "--quiet"), "--out", "--teacher")
    assert snapshot(hf_teacher) == teacher_files


def test_teacher_inputs_are_checked_against_the_teacher(tmp_path, capsys, hf_teacher):
    from kdjax import tokenizer as tk

    args = ["--dataset", "text", "--arch", "llama", "--steps", "2", "--seeds", "1", "--text-bytes", "20000",
            "--student-dim", "16", "--quiet", "--teacher", hf_teacher]
    refused(kdjax_here(capsys, "distill", *args, "--context", "32"), "--context", "max_position_embeddings (16")
    refused(kdjax_here(capsys, "teacher-logits", "--teacher", hf_teacher, "--out", tmp_path / "c", "--context", "32",
                       "--text-bytes", "20000", "--quiet"), "--context", "max_position_embeddings (16")
    assert not (tmp_path / "c").exists()
    own = tk.load_tokenizer(hf_teacher / "tokenizer.json")
    other = tk.train_bpe(["completely different words here " * 80 + "".join(map(chr, range(33, 127)))],
                         own.get_vocab_size(), tmp_path / "other.json")
    if other.get_vocab_size() == own.get_vocab_size():  # the same size: only the content tells them apart
        refused(kdjax_here(capsys, "distill", *args, "--context", "16", "--tokenizer", tmp_path / "other.json"),
                "--tokenizer", "expected the teacher's own tokenizer")
    p = kdjax_here(capsys, "distill", *args, "--context", "16", "--tokenizer", hf_teacher / "tokenizer.json")
    assert p.returncode == 0, p.stderr[-2000:]  # the same tokenizer, by content: accepted


def _kill_after_writing(monkeypatch, phase, step):
    """Simulate kill -9 right after ``phase``'s losses up to ``step`` were logged and before
    the checkpoint of that step reached the disk (it is dropped)."""
    from kdjax import checkpoint
    from kdjax.app import metrics

    save, losses = checkpoint.RotatingSaver.__call__, metrics.MetricsLog.losses

    def saver(self, tree, meta=None):
        if not (meta["phase"] == phase and meta["done"] == step):
            save(self, tree, meta)

    def log(self, name, first, values):
        losses(self, name, first, values)
        if name == phase and first + values.shape[-1] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.RotatingSaver, "__call__", saver)
    monkeypatch.setattr(metrics.MetricsLog, "losses", log)


def _scalars(directory):
    """TensorBoard's view of the event files: per folder, a SessionLog START at step T hides
    the earlier events at steps >= T (tensorboardX's purge_step), as TensorBoard reads them."""
    from tensorboardX.proto import event_pb2

    from test_metrics import read_events  # noqa: F401  (the same record format)
    import struct

    out = {}
    for folder in sorted({p.parent for p in directory.rglob("events.out.tfevents.*")}):
        seen = []
        for path in sorted(folder.glob("events.out.tfevents.*")):
            data, at = path.read_bytes(), 0
            while at < len(data):
                (length,) = struct.unpack("<Q", data[at:at + 8])
                event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
                at += 12 + length + 4
                if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                    seen = [(tag, s, v) for tag, s, v in seen if s < event.step]
                seen += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
        for tag, s, v in seen:
            out.setdefault(tag, []).append((s, v))
    return out


def test_resume_logs_each_step_once(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboardX")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    p = kdjax_here(capsys, "distill", *MLP, "--out", whole, "--tensorboard", tmp_path / "tb_whole")
    assert p.returncode == 0, p.stderr[-2000:]
    with monkeypatch.context() as m:
        _kill_after_writing(m, "students", 6)
        p = kdjax_here(capsys, "distill", *MLP, "--out", cut, "--tensorboard", tmp_path / "tb_cut")
    assert p.returncode == 130 and "--resume" in p.stderr, p.stderr
    assert '"students", "step": 6' in (cut / "metrics.jsonl").read_text()  # logged, then lost with its checkpoint
    p = kdjax_here(capsys, "distill", *MLP, "--out", cut, "--tensorboard", tmp_path / "tb_cut", "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (cut / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()
    assert _scalars(tmp_path / "tb_cut") == _scalars(tmp_path / "tb_whole")


def test_metrics_line_cut_short_by_a_kill_is_dropped(tmp_path):
    from kdjax.app.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"phase": "students", "step": 1, "loss": {}}\n{"phase": "stud')
    log = MetricsLog(str(path), None, {}, resume=True)
    log.losses("students", 1, jnp.ones((1, 1)))
    log.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_save_hf_run_killed_before_results_resumes_bit_for_bit(tmp_path, capsys, monkeypatch):
    from kdjax.app import distill_report

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    p = kdjax_here(capsys, "distill", *LM, "--out", whole, "--save-hf", tmp_path / "hf_whole")
    assert p.returncode == 0, p.stderr[-2000:]

    def killed(*a, **k):
        raise KeyboardInterrupt  # after the Hugging Face folder, before results.json

    with monkeypatch.context() as m:
        m.setattr(distill_report, "finish", killed)
        p = kdjax_here(capsys, "distill", *LM, "--out", cut, "--save-hf", tmp_path / "hf_cut")
    assert p.returncode == 130 and (tmp_path / "hf_cut" / "config.json").exists()
    assert not (cut / "results.json").exists()
    p = kdjax_here(capsys, "distill", *LM, "--out", cut, "--save-hf", tmp_path / "hf_cut", "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert snapshot(tmp_path / "hf_cut") == snapshot(tmp_path / "hf_whole")
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    for key in ("test_accuracy", "losses", "test_loss", "bits_per_token"):
        assert a[key] == b[key], key
    # the output location is not part of the run's identity: resumable without --save-hf too
    os.remove(cut / "results.json")
    p = kdjax_here(capsys, "distill", *LM, "--out", cut, "--resume")
    assert p.returncode == 0, p.stderr[-2000:]


def test_ctrl_c_is_one_line_exit_130_and_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kdjax", "distill", "--steps", "1000", "--seeds", "1", "--teacher-hidden", "16",
           "--student-hidden", "8", "--batch-size", "16", "--checkpoint-every", "10", "--quiet", "--no-plots",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "teachers.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 130, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("kdjax: interrupted; the last checkpoints are in") and lines[0].endswith("--resume")
    resume = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr[-3000:]


def test_a_resume_never_replaces_a_model_folder_another_run_wrote(tmp_path, capsys, monkeypatch):
    """A run killed while training had only claimed its --save-hf folder; another run wrote a
    model there meanwhile: the resume is refused, the other model untouched."""
    out, hf = tmp_path / "out", tmp_path / "hf"
    with monkeypatch.context() as m:
        _kill_after_writing(m, "students", 4)
        p = kdjax_here(capsys, "distill", *LM, "--out", out, "--save-hf", hf)
    assert p.returncode == 130
    p = kdjax_here(capsys, "distill", *LM, "--seed", "7", "--out", tmp_path / "other", "--save-hf", hf)  # another run
    assert p.returncode == 0, p.stderr[-2000:]
    theirs = snapshot(hf)
    refused(kdjax_here(capsys, "distill", *LM, "--out", out, "--save-hf", hf, "--resume"), "--save-hf",
            "exists; pass --overwrite")
    assert snapshot(hf) == theirs


def test_an_unwritable_save_hf_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("a file")
    refused(kdjax_here(capsys, "distill", *LM, "--out", tmp_path / "o", "--save-hf", tmp_path / "afile" / "sub"), "--save-hf",
            "cannot be made", "is a file")


def test_overwrite_keeps_a_users_file_that_only_looks_like_a_shard(tmp_path):
    from kdjax.app import outputs

    cache = tmp_path / "cache"
    cache.mkdir()
    names = outputs._CACHE
    (cache / "shard-00000.npz").write_bytes(b"kdjax's")
    (cache / "shard-old-backup.npz").write_bytes(b"the user's")
    outputs.Outputs(str(cache), names).write(["manifest.json", "tokenizer.json", names[-1]])
    outputs.Outputs(str(cache), names).claim(True)
    assert not (cache / "shard-00000.npz").exists() and (cache / "shard-old-backup.npz").read_bytes() == b"the user's"


def test_a_kill_during_save_hf_leaves_no_temporary_file_after_the_next_write(tmp_path):
    from kdjax import convert
    from kdjax.models import Llama

    model = Llama(vocab_size=37, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=4, num_kv_heads=2)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / ".tmp-save_hf-abc123").write_bytes(b"half a model")  # what a kill during save_hf leaves
    (folder / ".tmp-notes").write_text("not save_hf's")
    convert.save_hf(model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32)), folder)
    assert sorted(os.listdir(folder)) == [".tmp-notes", "config.json", "model.safetensors"]


def test_written_files_are_readable_as_the_umask_says(tmp_path):
    from kdjax import checkpoint

    old = os.umask(0o022)
    try:
        checkpoint.atomic_write_text(str(tmp_path / "results.json"), "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644  # mkstemp would make it 0600


def test_cache_metadata_is_checked_when_read(tmp_path):
    """A manifest edited and checksummed again passes the checksum: what distill reads from its
    metadata is checked anyway."""
    from kdjax.app import UsageError, inputs

    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    ok = {"teacher_config": config, "validation": {"accuracy": 0.5, "loss": 2.0}}
    assert inputs.cache_teacher("c", {"vocab": 300}, ok).vocab_size == 300
    for meta, words in [({**ok, "validation": {"accuracy": "x", "loss": 2.0}}, "validation.accuracy"),
                        ({**ok, "validation": {"accuracy": 1.7, "loss": 2.0}}, "validation.accuracy"),
                        ({**ok, "validation": {"accuracy": 0.5, "loss": float("nan")}}, "validation.loss"),
                        ({**ok, "teacher_config": config | {"vocab_size": 400}}, "vocab_size 400"),
                        ({**ok, "teacher_config": config | {"model_type": "gpt2", "architectures": None}}, "")]:
        with pytest.raises(UsageError, match=words):
            inputs.cache_teacher("c", {"vocab": 300}, meta)


def test_a_resume_after_the_data_changed_is_refused(tmp_path, capsys, monkeypatch):
    """The options alone cannot tell that the data changed after a kill: the run's identity
    holds the data's content too."""
    from kdjax import data

    ds = data.synthetic(200, 10, 3, seed=0, test_samples=50)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
    args = ["--dataset", path, *MLP, "--out", tmp_path / "out"]
    with monkeypatch.context() as m:
        _kill_after_writing(m, "students", 4)
        assert kdjax_here(capsys, "distill", *args).returncode == 130
    y = ds.y_train.copy()
    y[0] = (y[0] + 1) % 3  # one label changed
    np.savez(path, x_train=ds.x_train, y_train=y, x_test=ds.x_test, y_test=ds.y_test)
    refused(kdjax_here(capsys, "distill", *args, "--resume"), "resume:", "data_sha256")


def test_the_identity_holds_the_teachers_content(tmp_path):
    from kdjax import data
    from kdjax.app import inputs
    from kdjax.workflows import Checkpoints

    ds = data.synthetic(20, 4, 2, seed=0, test_samples=5)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes(b"weights A")
    ids = [inputs.with_inputs(Checkpoints("c", identity={"--seed": 0}), ds, teacher).identity]
    (teacher / "model.safetensors").write_bytes(b"weights B")
    ids.append(inputs.with_inputs(Checkpoints("c", identity={"--seed": 0}), ds, teacher).identity)
    assert ids[0]["--seed"] == 0 and ids[0]["data_sha256"] == ids[1]["data_sha256"]
    assert ids[0]["input0_sha256"] != ids[1]["input0_sha256"]
