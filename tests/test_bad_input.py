"""Bad input, program by program, as a new user gives it: every case exits non-zero with one line on stderr, no
traceback, and no file created or changed. The cases run in-process (the programs' own entry points, one import for
all); a few run as real commands too, to show that the entry points behave the same."""
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict

import pytest

import data
import eval as E
import server
import synth
import train
from config import Config, prepare_config
from shapes import make_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = {"train": train.cli, "eval": E.main, "server": server.main, "data": data.main,
            "synth": lambda argv: synth.main(synth.parse_args(argv))}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A folder of the files the cases name; every case runs in it."""
    box = tmp_path_factory.mktemp("bad")
    good = make_shapes("rec", 4, str(box / "shapes"), objects=(1, 1))
    os.replace(good, box / "good.jsonl")
    rows = [json.loads(line) for line in open(box / "good.jsonl")]
    for r in rows:
        r["image"] = os.path.join("shapes", r["image"])
    (box / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    outside = dict(rows[0], solution=[150, 150, 900, 900])        # a box outside its 112..224-px image
    (box / "outside.jsonl").write_text(json.dumps(outside) + "\n")
    (box / "empty.jsonl").write_text("")
    (box / "afile").write_text("not a folder")
    for d in ("emptydir", "notarun", "stripes"):
        (box / d).mkdir()
    run = box / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(asdict(prepare_config(Config(out_dir=str(run)), files=False))))
    (run / "metrics.jsonl").write_text('{"step": 0, "reward": 1.0}\n')
    (box / "unknown.yaml").write_text("learnin_rate: 1e-4\n")
    (box / "per_device.yaml").write_text("per_device_train_batch_size: 4\n")
    (box / "wrong_type.yaml").write_text("max_steps: two\n")
    (box / "template.txt").write_text("Find {thing}.")
    (box / "raises.py").write_text("def fn(completions, samples):\n    raise RuntimeError('boom')\n")
    (box / "short.py").write_text("def fn(completions, samples):\n    return [1.0]\n")
    ids = [r["id"] for r in rows]
    (box / "mismatch.jsonl").write_text(json.dumps({"id": "nobody", "boxes": [[0, 0, 1, 1]]}) + "\n")
    (box / "partial.jsonl").write_text(json.dumps({"id": ids[0], "boxes": [[0, 0, 1, 1]]}) + "\n")
    (box / "coco.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return box


def busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


# (program, arguments, what the one line says); PORT is a port another process listens on
CASES = [
    # train.py: flags, config files, data, models, runs, trackers, values
    ("train", ["--algo", "grp"], "invalid choice: 'grp'"),
    ("train", ["--algo", "syn_grpo"], "did you mean 'syn-grpo'?"),
    ("train", ["--task", "recc"], "invalid choice: 'recc'"),
    ("train", ["--learnig-rate", "1e-4"], "did you mean --learning-rate?"),
    ("train", ["--learning_rate", "1e-4"], "did you mean --learning-rate?"),
    ("train", ["--per-device-train-batch-size", "4"], "use --batch-size"),
    ("train", ["--batch-size", "two"], "invalid int value: 'two'"),
    ("train", ["--config", "unknown.yaml"], "unknown field 'learnin_rate' (did you mean --learning-rate?)"),
    ("train", ["--config", "per_device.yaml"], "use --batch-size"),
    ("train", ["--config", "wrong_type.yaml"], "invalid int value 'two'"),
    ("train", ["--config", "missing.yaml"], "--config missing.yaml"),
    ("train", ["--data", "nope.jsonl"], "--data nope.jsonl: no such file"),
    ("train", ["--data", "empty.jsonl"], "no valid rec row in empty.jsonl"),
    ("train", ["--data", "good.jsonl", "--task", "ovd"], "no valid ovd row in good.jsonl: 4 bad rows, the first"),
    ("train", ["--data", "outside.jsonl"], "lies outside the"),
    ("train", ["--data", "outside.jsonl", "--strict"], "lies outside the"),
    ("train", ["--data", "good.jsonl,good.jsonl", "--image-root", ".,.,."], "3 folders for 2 data sources"),
    ("train", ["--image-root", "nowhere"], "--image-root nowhere: no such directory"),
    ("train", ["--model", "emptydir"], "--model emptydir: a folder without a model"),
    ("train", ["--model", "tiny-qwen-vocb"], "did you mean tiny-qwen-vocab?"),
    ("train", ["--model", "runs/x/final"], "--model runs/x/final: no such checkpoint dir"),
    ("train", ["--resume", "notarun"], "no config.json there"),
    ("train", ["--resume", "no_such_run"], "--resume no_such_run: no such directory"),
    ("train", ["--resume", "run", "--lr", "1.0"], "--lr 1.0 (the run's: 0.0002) would change it"),
    ("train", ["--out-dir", "run"], "holds a run; continue it with --resume auto"),
    ("train", ["--out-dir", "run", "--data", "empty.jsonl"], "holds a run"),
    ("train", ["--out-dir", "afile"], "--out-dir afile: a file, not a folder"),
    ("train", ["--eval-data", "nope_val.jsonl"], "--eval-data nope_val.jsonl: no such file"),
    ("train", ["--eval-data", "empty.jsonl"], "no valid rec row in empty.jsonl"),
    ("train", ["--reward-function", "nope.py:fn"], "nope.py"),
    ("train", ["--reward-function", "raises.py:fn"], "raised RuntimeError: boom"),
    ("train", ["--reward-function", "short.py:fn"], "short.py:fn"),
    ("train", ["--report-to", "mlflow"], "invalid choice: 'mlflow'"),
    ("train", ["--report-to", "wandb"], "--report-to wandb: no W&B credentials"),
    ("train", ["--prompt-template", "template.txt"], "unknown field(s) {thing}"),
    ("train", ["--min-pixels", "50000", "--max-pixels", "3136"], "min <= max"),
    ("train", ["--num-generations", "1"], "--num-generations must be at least 2"),
    ("train", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("train", ["--max-steps", "-3"], "--max-steps and --sft-steps must be >= 0"),
    ("train", ["--lr", "-1"], "--lr and --sft-lr must be positive"),
    ("train", ["--reward-weights", "1,x"], "--reward-weights 1,x"),
    ("train", ["--temperature", "0"], "--temperature must be > 0"),
    ("train", ["--micro-batch", "0"], "--mu and --micro-batch must be at least 1"),
    ("train", ["--eval-every", "-1"], "--eval-every, --eval-limit"),
    ("train", ["--save-total-limit", "-1"], "--save-every and --save-total-limit must be >= 0"),
    ("train", ["--shapes-objects", "5-9"], "--shapes-objects 5-9"),
    ("train", ["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    ("train", ["--algo", "syn-grpo", "--task", "math"], "tasks rec, ovd and isr"),
    ("train", ["--device", "cuda"], "--device cuda: no CUDA device is visible"),
    ("train", ["--algo", "syn-grpo", "--server-device", "cuda:7"], "--server-device cuda:7: no such device"),
    ("train", ["--plan", "--device", "cuda", "--plan-image-size", "640"], "--plan-image-size WIDTHxHEIGHT"),
    ("train", ["--plan", "--model", "emptydir"], "no config for --model emptydir"),
    # eval.py
    ("eval", ["--model", "emptydir", "--data", "good.jsonl"], "--model emptydir: a folder without a model"),
    ("eval", ["--data", "nope.jsonl"], "--data nope.jsonl: no such file"),
    ("eval", [], "--data is required"),
    ("eval", ["--data", "empty.jsonl"], "no valid rec row in empty.jsonl"),
    ("eval", ["--data", "good.jsonl", "--out-dir", "afile"], "--out-dir afile: a file, not a folder"),
    ("eval", ["--config", "run/config.json", "--data", "good.jsonl"], "unknown field"),
    ("eval", ["scor", "--task", "rec"], "unknown command 'scor'"),
    ("eval", ["score", "--task", "rec", "--data", "good.jsonl", "--predictions", "nope.jsonl"], "no such file"),
    ("eval", ["score", "--task", "rec", "--data", "good.jsonl", "--predictions", "mismatch.jsonl"], "has the id of"),
    ("eval", ["score", "--task", "rec", "--data", "good.jsonl", "--predictions", "partial.jsonl"], "--allow-partial"),
    ("eval", ["plot", "notarun"], "notarun is not a training run (no metrics.jsonl there)"),
    ("eval", ["gallery", "notarun"], "notarun is not a training run (no pool.json there)"),
    # server.py
    ("server", ["--port", "PORT"], "cannot listen on 127.0.0.1"),
    ("server", ["--port", "70000"], "--port 70000: not a port"),
    ("server", ["--image-root", "no_such_root"], "--image-root no_such_root: no such directory"),
    ("server", ["--max-body-bytes", "-1"], "must be at least 1"),
    ("server", ["--workers", "0"], "must be at least 1"),
    ("server", ["--work-size", "7"], "--work-size must be a multiple of 8"),
    ("server", ["--device", "cuda:3"], "--device cuda:3: no such device"),
    ("server", ["--state-dir", "afile"], "--state-dir afile: a file, not a folder"),
    ("server", ["--pipeline", "tinyy"], "--pipeline tinyy"),
    ("server", ["--config", "run/config.json"], "unknown field"),
    ("server", ["--segmenter", "segment-anything"], "invalid choice: 'segment-anything'"),
    # synth.py
    ("synth", ["rum"], "invalid choice: 'rum'"),
    ("synth", ["selfq", "--mode", "in_context"], "did you mean 'in-context'?"),
    ("synth", ["selfq", "--mode", "indirect"], "invalid choice: 'indirect'"),
    ("synth", ["passrate", "--num-rollouts", "0"], "--num-rollouts"),
    ("synth", ["verify", "--t-min", "20"], "--t-min and --select-min must be in [0, --num-rollouts 16]"),
    ("synth", ["run", "--data", "nope.jsonl"], "--data nope.jsonl: no such file"),
    ("synth", ["run", "--out-dir", "afile"], "--out-dir afile: a file, not a folder"),
    ("synth", ["run", "--model", "tiny-qwen-vocb"], "did you mean tiny-qwen-vocab?"),
    ("synth", ["run", "--synthesizer", "emptydir"], "--synthesizer emptydir: a folder without a model"),
    # data.py
    ("data", ["shapes", "--objects", "3", "1", "--out", "s"], "one per grid cell"),
    ("data", ["shape", "--out", "s"], "did you mean 'shapes'?"),
    ("data", ["check", "nope.jsonl", "--task", "rec"], "nope.jsonl: no such file"),
    ("data", ["convert", "empty.jsonl", "--task", "rec", "--out", "x.jsonl"], "no valid rec row"),
    ("data", ["convert", "good.jsonl", "--task", "rec", "--out", "emptydir"], "--out emptydir: a folder"),
    ("data", ["convert", "good.jsonl", "--task", "rec", "--out", "no/such/dir/x.jsonl"], "does not exist"),
    ("data", ["coco", "coco.json", "--image-root", ".", "--out", "x.jsonl"], "nothing written"),
    ("data", ["coco", "nope.json", "--image-root", ".", "--out", "x.jsonl"], "nope.json: no such file"),
    ("data", ["context", "empty.jsonl", "--coco", "coco.json", "--out", "x.jsonl"], "no valid rec row"),
]


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_at_least_sixty_cases_and_every_program():
    assert len(CASES) >= 60 and {c[0] for c in CASES} == set(PROGRAMS)


@pytest.mark.parametrize("program,argv,says", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(program, argv, says, sandbox, monkeypatch, capsys):
    monkeypatch.chdir(sandbox)
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(sandbox))          # no ~/.netrc with W&B credentials
    monkeypatch.setattr(sys, "argv", [f"{program}.py"])   # argparse names the program as a command line would
    port = busy_port()
    argv = [str(port.getsockname()[1]) if a == "PORT" else a for a in argv]
    before = snapshot(sandbox)
    try:
        with pytest.raises(SystemExit) as e:
            PROGRAMS[program](argv)
    finally:
        port.close()
    err = capsys.readouterr().err + (f"{e.value.code}\n" if isinstance(e.value.code, str) else "")
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code not in (0, None), err
    assert len(lines) == 1 and says in lines[0] and lines[0].startswith(f"{program}.py"), err
    assert snapshot(sandbox) == before


@pytest.mark.parametrize("program,argv,says", [CASES[2], CASES[18], ("eval", ["scor"], "unknown command"),
                                                ("server", ["--port", "70000"], "not a port"),
                                                ("synth", ["passrate", "--num-rollouts", "0"], "--num-rollouts"),
                                                ("data", ["check", "nope.jsonl", "--task", "rec"], "no such file")])
def test_the_real_commands_say_the_same_in_one_line(program, argv, says, sandbox):
    r = subprocess.run([sys.executable, os.path.join(ROOT, f"{program}.py"), *argv], cwd=sandbox, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1 and says in lines[0] and "Traceback" not in r.stderr, r.stderr
