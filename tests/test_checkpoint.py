"""checkpoint.py: on resume the logs are trimmed to the checkpoint, atomically."""
import json
import os

import pytest

import common
from checkpoint import trim_logs


def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_a_resume_trims_metrics_and_completions_to_the_checkpoint(tmp_path):
    metrics = [{"phase": "sft", "sft_step": 0}, {"phase": "eval", "eval_step": 0}, {"step": 0}, {"step": 1},
               {"phase": "eval", "eval_step": 2}, {"step": 2}, {"phase": "eval", "eval_step": 3}]
    write_rows(tmp_path / "metrics.jsonl", metrics)
    write_rows(tmp_path / "completions.jsonl", [{"step": s, "id": "a"} for s in (0, 1, 2)])
    trim_logs(str(tmp_path), 2)              # the checkpoint holds 2 updates: step 2 and validation 3 are redone
    assert read_rows(tmp_path / "metrics.jsonl") == metrics[:5]
    assert read_rows(tmp_path / "completions.jsonl") == [{"step": 0, "id": "a"}, {"step": 1, "id": "a"}]


def test_a_kill_during_the_trim_leaves_the_whole_log(tmp_path, monkeypatch):
    rows = [{"step": s} for s in range(5)]
    write_rows(tmp_path / "metrics.jsonl", rows)

    def killed(src, dst):
        raise KeyboardInterrupt   # the moment before the rename
    monkeypatch.setattr(common.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        trim_logs(str(tmp_path), 2)
    assert read_rows(tmp_path / "metrics.jsonl") == rows and os.listdir(tmp_path) == ["metrics.jsonl"]
