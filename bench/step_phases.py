"""Seconds per phase of a tiny GRPO run (weight push / generate / score / update), HF and vLLM backends side by
side in one run, so ratios are comparable on a noisy machine.

    python bench/step_phases.py [--steps 10] [--backends hf vllm]

Prints one row per backend: median seconds per phase over the steps after the first (warm-up), and the share of
the step spent outside generation + forward/backward (rewards, advantages, bookkeeping, weight push).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("time_weight_push", "time_generate", "time_score", "time_update")


def run(backend: str, steps: int, out: str) -> list[dict]:
    # a separate process per backend: each gets a fresh interpreter (and vLLM its own in-process engine)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out-dir", out, "--sft-steps", "20", "--max-steps",
           str(steps), "--rollout-backend", backend, "--save-every", "0", "--log-completions", "0"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "step" in r]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--backends", nargs="+", default=["hf", "vllm"])
    a = p.parse_args()
    print(f"{'backend':8s} " + " ".join(f"{k[5:]:>9s}" for k in PHASES) + f" {'step':>7s} {'overhead':>9s}")
    for backend in a.backends:
        rows = run(backend, a.steps, tempfile.mkdtemp(prefix=f"bench-{backend}-"))[1:]
        med = {k: float(np.median([r[k] for r in rows])) for k in PHASES}
        step = sum(med.values())
        overhead = (med["time_score"] + med["time_weight_push"]) / step
        print(f"{backend:8s} " + " ".join(f"{med[k]:9.3f}" for k in PHASES) + f" {step:7.3f} {overhead:9.1%}")


if __name__ == "__main__":
    main()
