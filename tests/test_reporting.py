"""What a run writes: whole files or none (a kill mid-write), and a metrics log a resume trims."""

import json
import os

import pytest

from mtl_gbml import reporting


def test_atomic_write_leaves_the_old_file_when_the_write_does_not_finish(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    reporting.atomic_write(str(path), '{"old": 1}')
    assert json.loads(path.read_text()) == {"old": 1}

    def killed(*args):  # what a kill between the write and the rename leaves to a reader
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        reporting.atomic_write(str(path), '{"new": 2}' * 1000)
    assert json.loads(path.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind
    monkeypatch.undo()
    reporting.atomic_write(str(path), '{"new": 2}')
    assert json.loads(path.read_text()) == {"new": 2}
    assert os.listdir(tmp_path) == ["results.json"]


def test_resume_trims_the_metrics_log_and_ends_a_line_cut_before_its_newline(tmp_path):
    """On resume from step 4, lines past it go; a torn line is dropped; a last line that a kill
    cut just before its newline parses, is kept, and the next record starts on its own line."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (2, 4)]
    path.write_text(lines[0] + "\n" + '{"step": 3, "lo\n' + lines[1])  # torn, then no newline
    w = reporting.MetricsWriter(str(tmp_path), resume_step=4, tensorboard=False)
    w.write({"step": 6, "loss": 0.1})
    w.close()
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in got] == [2, 4, 6]
    w = reporting.MetricsWriter(str(tmp_path), resume_step=2, tensorboard=False)
    w.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [2]
