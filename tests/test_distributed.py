"""torchrun + FSDP2 on CPU (gloo, 2 processes) against a single process, and training across two data servers."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_server import start_server
from test_train import ROOT, metrics, run_train


def torchrun(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "final", "model.safetensors"))


def final_row(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("phase") == "final"][-1]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_and_resume(tmp_path, math_model):
    """Same global batch (B=4: two prompts per rank), --prompt-seeds so that the rollouts do not depend on the
    split; mu=2 and an entropy term make the loss non-zero. Measured: loss equal to 1e-8, weights to 5e-6. The
    validation split has an odd size: one rank pads its share, and the metrics are one process's. The two ranks run
    again one row a sequence (--no-shared-prefix): the same losses and weights."""
    from shapes import make_shapes
    val = make_shapes("math", 5, str(tmp_path / "val"), split="val")
    args = ["--model", math_model, "--task", "math", "--sft-steps", "0", "--batch-size", "4", "--num-generations", "3",
            "--max-new-tokens", "16", "--prompt-seeds", "--mu", "2", "--entropy-coef", "0.01", "--eval-data", val]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r = run_train(*args, "--max-steps", "3", "--save-every", "0", "--out-dir", one)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(*args, "--max-steps", "3", "--save-every", "0", "--out-dir", two)
    assert r.returncode == 0, r.stderr[-3000:]
    digests = final_row(two)["weights_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]              # both ranks hold the same full weights
    m1, m2 = metrics(one), metrics(two)
    assert [x["step"] for x in m2] == [0, 1, 2]
    for a, b in zip(m1, m2):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["loss"] != 0
    evals = [[r for r in map(json.loads, open(os.path.join(o, "metrics.jsonl"))) if r.get("phase") == "eval"]
             for o in (one, two)]
    from data import source_name
    assert evals[0] == evals[1] and [r["eval_step"] for r in evals[0]] == [3]
    assert evals[0][0][f"eval/{source_name(val)}/n"] == 5
    w1, w2 = weights(one), weights(two)
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    # under FSDP2 the shared-prefix forward (the default) equals one row a sequence
    rows = str(tmp_path / "rows")
    r = torchrun(*args, "--max-steps", "3", "--save-every", "0", "--no-shared-prefix", "--out-dir", rows)
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(m2, metrics(rows)):
        assert a["reward"] == b["reward"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    w3 = weights(rows)
    assert max((w3[k] - w2[k]).abs().max().item() for k in w2) < 1e-4
    # resume with the same world size: 2 steps, then --resume to 3, equals the uninterrupted 3-step run
    part = str(tmp_path / "part")
    r = torchrun(*args, "--max-steps", "2", "--save-every", "1", "--out-dir", part)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun("--resume", part, "--max-steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["reward"] for x in metrics(part)] == [x["reward"] for x in m2]
    wp = weights(part)
    assert all(torch.equal(wp[k], w2[k]) for k in w2)


@pytest.mark.slow
def test_two_data_servers_one_killed_mid_run(tmp_path):
    """Jobs alternate between two servers; server B is killed after step 1. Training finishes, and every job
    server A accepted was delivered and absorbed into the pool (--synchronous-synthesis waits for them; B's are not waited for)."""
    pa, url_a = start_server(str(tmp_path / "a"), "--steps", "1")
    pb, url_b = start_server(str(tmp_path / "b"), "--steps", "1")
    desc = tmp_path / "descriptions.txt"
    desc.write_text("a snowy forest\na sunny beach\n")
    out = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--algo", "syn-grpo", "--out-dir", out,
                          "--sft-steps", "20", "--max-steps", "6", "--shapes-n", "8", "--batch-size", "2",
                          "--num-generations", "3", "--max-new-tokens", "32", "--synchronous-synthesis", "--descriptions", str(desc),
                          "--server-url", f"{url_a},{url_b}", "--save-every", "0"],
                         env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and p.poll() is None:
            if os.path.exists(os.path.join(out, "metrics.jsonl")) and any(r["step"] >= 1 for r in metrics(out)):
                break
            time.sleep(0.1)
        pb.send_signal(signal.SIGKILL)
        pb.wait()
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    finally:
        pa.terminate()
        pa.wait()
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(6))
    accepted_a = {f[:-5] for f in os.listdir(tmp_path / "a" / "jobs") if f.endswith(".json")}
    accepted_b = {f[:-5] for f in os.listdir(tmp_path / "b" / "jobs") if f.endswith(".json")}
    assert accepted_a and accepted_b                                   # both servers got work before the kill
    pool = open(os.path.join(out, "pool.json")).read()
    assert all(j in pool for j in accepted_a), "a job accepted by the live server was not delivered"
    assert sum(r["jobs_absorbed"] for r in rows) >= len(accepted_a)


@pytest.fixture(scope="module")
def syn_model(tmp_path_factory):
    """A short Syn-GRPO warm start (the four-tag format, 150 SFT steps): its completions carry a <score>."""
    import train
    out = str(tmp_path_factory.mktemp("synwarm") / "run")
    train.main(train.Config(algo="syn-grpo", synthesize=False, sft_steps=150, max_steps=1, save_every=0, out_dir=out))
    return os.path.join(out, "final")


@pytest.mark.slow
def test_syn_grpo_gives_the_same_rewards_on_two_ranks_as_on_one(tmp_path, syn_model):
    """Diversity smoothing over the whole step (V_batch and V_global over every rank's prompts): with --prompt-seeds
    the rollouts do not depend on the split, so the diversity reward, the smoothed diversity and every other reward
    are those of one process, step by step (the smoother's state included, which each rank holds alike). The SFT
    warm start is normalised over every rank's tokens: its logged losses are one process's too."""
    args = ["--model", syn_model, "--algo", "syn-grpo", "--no-synthesize", "--batch-size", "4", "--num-generations",
            "3", "--prompt-seeds", "--max-steps", "3", "--save-every", "0", "--sft-steps", "10", "--sft-lr", "1e-4"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r = run_train(*args, "--out-dir", one)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(*args, "--out-dir", two)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(one, "metrics.jsonl")) as f1, open(os.path.join(two, "metrics.jsonl")) as f2:
        sft1, sft2 = ([r["sft_loss"] for r in map(json.loads, f) if r.get("phase") == "sft"] for f in (f1, f2))
    assert len(sft1) == len(sft2) == 2 and sft1 == pytest.approx(sft2, abs=1e-5)
    m1, m2 = metrics(one), metrics(two)
    assert [x["step"] for x in m2] == [0, 1, 2]
    assert any(x["reward_diversity"] > 0 for x in m1)
    for a, b in zip(m1, m2):
        for key in ("reward", "reward_accuracy", "reward_diversity", "diversity", "diversity_smoothed",
                    "diversity_global"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
