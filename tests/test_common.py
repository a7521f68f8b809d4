"""common.py: config dataclasses as command lines (--config FILE, aliases), atomic writes, JSONL I/O, derived
seeds."""
import json
import os
from dataclasses import dataclass

import pytest

from common import Stream, append_jsonl, atomic_write, derive_seed, opt, parse_config, read_jsonl


@dataclass
class _Cfg:
    algo: str = opt("grpo", "algorithm", choices=("grpo", "syn-grpo"))
    lr: float | None = opt(None, "learning rate", aliases=("--learning-rate",))
    mu: int = opt(1, "updates per batch", aliases=("--num-iterations",))
    strict: bool = opt(False, "stop at a bad row")
    data: tuple = opt((), "files")


def test_a_config_file_sets_fields_and_flags_beside_it_win(tmp_path):
    path = tmp_path / "run.yaml"
    # YAML 1.1 reads 1e-6 as a string: typed as the flag would be; aliases and - or _ are accepted as keys
    path.write_text("algo: syn-grpo\nlearning-rate: 1e-6\nnum_iterations: 2\nstrict: true\ndata: [a.jsonl, b.jsonl]\n")
    assert parse_config(_Cfg, ["--config", str(path)]) == _Cfg("syn-grpo", 1e-6, 2, True, ("a.jsonl", "b.jsonl"))
    assert parse_config(_Cfg, ["--config", str(path), "--mu", "3", "--no-strict"]).mu == 3
    assert parse_config(_Cfg, ["--num-iterations", "4", "--config", str(path)]).mu == 4   # wherever the flag is
    (tmp_path / "run.json").write_text(json.dumps({"lr": None, "mu": 5}))                 # a run's config.json
    assert parse_config(_Cfg, ["--config", str(tmp_path / "run.json")]) == _Cfg(mu=5)


@pytest.mark.parametrize("text,message", [
    ("alg: grpo\n", "unknown field 'alg'"),
    ("algo: syn_grpo\n", "'syn_grpo' is not one of grpo, syn-grpo"),
    ("mu: two\n", "mu: invalid int value 'two'"),
    ("mu: 1.5\n", "mu: invalid int value 1.5"),
    ("strict: yes please\n", "strict: expected true or false"),
    ("- a list\n", "expected a mapping"),
    ("algo: [unclosed\n", "--config"),
])
def test_a_bad_config_file_stops_with_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_config(_Cfg, ["--config", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_missing_config_file_stops_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(_Cfg, ["--config", str(tmp_path / "none.yaml")])
    assert "--config" in capsys.readouterr().err


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(path)) as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]   # no temporary file left behind
    with atomic_write(str(path)) as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["f.json"]
    with pytest.raises(IsADirectoryError):                                     # a path that is a folder
        with atomic_write(str(tmp_path)) as f:
            f.write("x")
    assert os.listdir(tmp_path) == ["f.json"]


def test_append_jsonl_ends_a_torn_last_line_first(tmp_path):
    path = str(tmp_path / "log.jsonl")
    append_jsonl(path, [{"a": 1}])
    with open(path, "a") as f:
        f.write('{"a": 2, "b"')                 # a writer killed mid-line
    append_jsonl(path, [{"a": 3}], fsync=True)
    assert read_jsonl(path, skip_bad=True) == [{"a": 1}, {"a": 3}]
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(path)


def test_derived_seeds_are_the_one_rule_and_streams_never_meet():
    assert derive_seed(0, 5) == 5 and derive_seed(1, 2, 3) == (1_000_003 + 2) * 1_000_003 + 3
    assert 0 <= derive_seed(2 ** 62, 2 ** 40, 7) < 2 ** 63
    # before the streams, derive_seed(seed, 1) was the --max-samples subset, epoch 1's order and step 1's sampling
    for seed in range(3):
        uses = [derive_seed(seed, Stream.SUBSET), derive_seed(seed, Stream.DATA_ORDER, 1),
                derive_seed(seed, Stream.SAMPLING, 1), derive_seed(seed, Stream.PROMPT_SAMPLING, 1, 0),
                derive_seed(seed, Stream.SYNTHESIS_JOB, 2, 0), derive_seed(seed, Stream.OFFLINE_JOB, 0)]
        assert len(set(uses)) == len(uses)


def test_built_once_builds_a_missing_folder_and_then_only_reads_it(tmp_path):
    from common import atomic_dir, built_once
    calls = []

    def build(path):
        calls.append(path)
        with atomic_dir(path) as tmp:
            open(os.path.join(tmp, "config.json"), "w").write("{}")
    path = str(tmp_path / "tiny-x")
    assert built_once(path, build) == path and built_once(path, build) == path
    assert calls == [path]
    os.makedirs(tmp_path / "half")                                      # a folder without its marker is rebuilt
    assert built_once(str(tmp_path / "half"), lambda p: calls.append(p)) and calls[-1] == str(tmp_path / "half")
