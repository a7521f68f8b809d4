"""Where a GRPO step's time goes, ours vs TRL's GRPOTrainer: torch.profiler over the same steps of both trainers
(the bench model, settings and data of bench/run.py's vs-TRL row), run one after the other in this invocation.

    python bench/profile_step.py [--steps 6]

Each trainer runs in its own process; the profiler skips the first two steps (warm-up) and records the rest.
Prints, per trainer, seconds per step by operator (self CPU time; the profiler's own overhead inflates small
ops, so read it for attribution, not for speed) and the operators where ours spends more than TRL.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
SETTINGS = ["--batch-size", "4", "--num-generations", "6", "--max-new-tokens", "48"]


def profiler(steps: int):
    import torch
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                  schedule=torch.profiler.schedule(wait=1, warmup=1, active=steps - 2))


def table(prof, steps: int) -> dict:
    """Operator -> self CPU seconds per profiled step."""
    return {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages()}


def profile_ours(model: str, steps: int) -> dict:
    import train
    prof = profiler(steps)
    log_step = train.log_step

    def log_and_step(*args, **kw):        # the loop's last phase: the profiler's step boundary
        row = log_step(*args, **kw)
        prof.step()
        return row

    train.log_step = log_and_step
    cfg = train.parse_args(["--model", model, "--sft-steps", "0", "--max-steps", str(steps), "--save-every", "0",
                            "--log-completions", "0", "--lr", "1e-3", "--shapes-objects", "1-2", "--no-freeze-vision",
                            "--out-dir", tempfile.mkdtemp(prefix="prof-ours-"), *SETTINGS])
    with prof:
        train.main(cfg)
    return table(prof, steps - 2)


def profile_trl(model: str, steps: int) -> dict:
    from transformers import TrainerCallback
    import trl_grpo
    prof = profiler(steps)

    class Step(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            prof.step()

    sys.argv = ["trl_grpo.py", "--model", model, "--steps", str(steps), *SETTINGS]
    with prof:
        trl_grpo.main(callbacks=[Step()])
    return table(prof, steps - 2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        out = (profile_ours if a.worker == "ours" else profile_trl)(a.model, a.steps)
        print("PROFILE " + json.dumps(out))
        return
    from run import sft_model
    model = sft_model()
    res = {}
    for who in ("ours", "trl"):
        r = subprocess.run([sys.executable, __file__, "--worker", who, "--model", model, "--steps", str(a.steps)],
                           cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        lines = [l for l in r.stdout.splitlines() if l.startswith("PROFILE ")]
        if r.returncode or not lines:
            raise SystemExit(f"{who} failed:\n{r.stderr[-3000:]}")
        res[who] = json.loads(lines[-1][8:])
    total = {w: sum(v.values()) for w, v in res.items()}
    print(f"self CPU seconds per step: ours {total['ours']:.3f}, TRL {total['trl']:.3f}\n")
    for who in ("ours", "trl"):
        top = sorted(res[who].items(), key=lambda kv: -kv[1])[:12]
        print(f"{who}: top operators (s/step)")
        for k, v in top:
            print(f"  {v:7.4f}  {k}")
    keys = set(res["ours"]) | set(res["trl"])
    more = sorted(((res["ours"].get(k, 0) - res["trl"].get(k, 0), k) for k in keys), reverse=True)[:12]
    print("\nwhere ours spends more than TRL (s/step: ours - TRL)")
    for d, k in more:
        print(f"  {d:+7.4f}  {k}  (ours {res['ours'].get(k, 0):.4f}, TRL {res['trl'].get(k, 0):.4f})")
    less = sorted(((res["trl"].get(k, 0) - res["ours"].get(k, 0), k) for k in keys), reverse=True)[:8]
    print("\nwhere TRL spends more than ours")
    for d, k in less:
        print(f"  {d:+7.4f}  {k}  (ours {res['ours'].get(k, 0):.4f}, TRL {res['trl'].get(k, 0):.4f})")


if __name__ == "__main__":
    main()
