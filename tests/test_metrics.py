"""Metrics where users look: metrics.jsonl in --out, and TensorBoard event files that a
reader gets back with the expected tags and step counts."""

import json
import struct

import pytest

pytest.importorskip("matplotlib")


def read_events(directory):
    """Scalars ``{tag: [(step, value), ...]}`` from TensorBoard event files, read with the
    record format (length, CRC, payload, CRC) and tensorboardX's Event protobuf."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            payload = data[at + 12:at + 12 + length]
            at += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def test_distill_writes_jsonl_and_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboardX")
    from kdjax.app import cli

    out, tb = tmp_path / "run", tmp_path / "tb"
    code = cli.main(["distill", "--steps", "6", "--seeds", "2", "--teacher-hidden", "16", "--student-hidden", "8",
                     "--batch-size", "16", "--checkpoint-every", "3", "--quiet", "--no-plots", "--out", str(out),
                     "--tensorboard", str(tb)])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    by_phase = {}
    for rec in lines:
        by_phase.setdefault(rec["phase"], []).append(rec)
    assert [r["step"] for r in by_phase["teachers"]] == [1, 2, 3, 4, 5, 6]
    assert set(by_phase["students"][0]["loss"]) == {"standard/seed0", "standard/seed1", "distilled/seed0",
                                                    "distilled/seed1"}
    results = json.loads((out / "results.json").read_text())
    # the logged losses are the run's own (results.json keeps them too)
    assert [r["loss"]["distilled/seed1"] for r in by_phase["students"]] == pytest.approx(
        results["losses"]["distilled"][1], rel=1e-6)
    (evaluation,) = by_phase["evaluation"]
    assert evaluation["accuracy"]["teacher/seed0"] == pytest.approx(results["test_accuracy"]["teacher"][0])

    scalars = read_events(tb)
    assert [s for s, _ in scalars["students/loss/distilled/seed0"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["teachers/loss/teacher/seed1"]] == pytest.approx(
        [r["loss"]["teacher/seed1"] for r in by_phase["teachers"]], rel=1e-6)
    assert scalars["evaluation/test/accuracy/standard/seed0"] == [(6, pytest.approx(
        results["test_accuracy"]["standard"][0]))]


def test_tensorboard_without_its_writer_is_one_line(monkeypatch, capsys, tmp_path):
    import sys

    from kdjax.app import cli

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
    code = cli.main(["distill", "--steps", "2", "--tensorboard", str(tmp_path / "tb"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--tensorboard: needs tensorboardX" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
