"""scripts/gpu_smoke.sh --tiny: the first-GPU-run script, end to end on the tiny models on CPU (so that it cannot rot)."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_smoke_tiny_passes_every_step(tmp_path):
    out = tmp_path / "smoke"
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_smoke.sh"), "--tiny", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    logs = "".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(out.glob("*.log")))
    assert r.returncode == 0, r.stdout + r.stderr + logs
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "result" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["versions", "plan", "preflight", "train", "server",
                                                                 "syn-grpo", "eval"]
    assert all(row.split("|")[2].strip() == "PASS" for row in rows), r.stdout
    assert (out / "eval" / "results.json").exists() and (out / "train" / "checkpoint-3").is_dir()


def test_gpu_smoke_rejects_an_unknown_argument():
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_smoke.sh"), "--fast"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown argument --fast" in r.stderr
