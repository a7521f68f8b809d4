"""Table 1 of the Syn-GRPO paper in miniature, on a CPU, with the tiny model on shapes REC; and its Fig. 2.

    python experiments/paper.py              # 3 seeds, 100 steps a row (49 min on 2 idle cores)
    python experiments/paper.py --quick      # 1 seed, 40 steps a row (8 min 38 s)
    python experiments/paper.py --seeds 1 --steps 2 --sft-steps 10 --shapes-n 8 --eval-n 4   # smallest: CI

For each seed, two warm starts of the random-weight tiny model on the same shapes REC data and budget (SFT in the
two-tag format of GRPO, and in Syn-GRPO's four-tag format), then every row of Table 1's lower half, each the
command of README "The paper's experiments, one command a row":

  Original                     the two-tag warm start (the model every GRPO row starts from)
  SFT                          + --steps more SFT steps (--algo sft)
  GRPO                         + --steps GRPO steps
  GRPO + Entropy Loss          + --entropy-coef 0.001
  GRPO + Entropy Adv.          + --entropy-adv 0.4 --entropy-adv-kappa 2
  GRPO + Offline Generation    + --offline-synthesis: one image per sample made before step 0, then plain GRPO
  Syn-GRPO (w/o R_diversity)   the four-tag warm start + --steps Syn-GRPO steps, --no-diversity-reward
  Syn-GRPO                     the four-tag warm start + --steps Syn-GRPO steps

Every row is scored greedily (eval.py) on an in-domain test split (pale backgrounds, as in training) and on an
out-of-domain one (pale diagonal stripes: a background family training never shows, and not what the tiny
synthesizer draws), as REC accuracy: the share of predictions with IoU > 0.5. Writes results/table1.md,
results/table1.json and results/fig2_entropy_diversity.png (entropy and diversity over training, GRPO vs Syn-GRPO).
The four-tag warm start's own scores are in table1.json under "warm_starts".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ROWS = ("Original", "SFT", "GRPO", "GRPO + Entropy Loss", "GRPO + Entropy Adv.", "GRPO + Offline Generation",
        "Syn-GRPO (w/o R_diversity)", "Syn-GRPO")


def row_configs(warm: dict, a, seed: int, work: str, descriptions: str) -> dict:
    """Paper row -> train.Config of its run (None: the warm start itself is the row's model)."""
    import train
    common = dict(sft_steps=0, max_steps=a.steps, seed=seed, shapes_n=a.shapes_n, save_every=0, log_completions=1)
    out = lambda name: os.path.join(work, f"seed{seed}", name.replace(" ", "_").replace("(", "").replace(")", "")
                                    .replace(".", "").replace("+", "plus").replace("/", ""))
    # overwrite: a repeated experiment runs every row again from its warm start
    grpo = lambda name, **kw: train.Config(model=warm["grpo"], algo="grpo", out_dir=out(name), overwrite=True, **common,
                                           **kw)
    syn = lambda name, **kw: train.Config(model=warm["syn-grpo"], algo="syn-grpo", out_dir=out(name), overwrite=True,
                                          **common, **kw)
    return {
        "Original": None,
        "SFT": train.Config(model=warm["grpo"], algo="sft", sft_steps=a.steps, seed=seed, shapes_n=a.shapes_n,
                            out_dir=out("SFT"), overwrite=True),
        "GRPO": grpo("GRPO"),
        "GRPO + Entropy Loss": grpo("GRPO + Entropy Loss", entropy_coef=0.001),
        "GRPO + Entropy Adv.": grpo("GRPO + Entropy Adv.", entropy_adv=0.4, entropy_adv_kappa=2.0),
        "GRPO + Offline Generation": grpo("GRPO + Offline Generation", offline_synthesis=True, descriptions=descriptions),
        "Syn-GRPO (w/o R_diversity)": syn("Syn-GRPO (w/o R_diversity)", diversity_reward=False),
        "Syn-GRPO": syn("Syn-GRPO"),
    }


def warm_starts(a, seed: int, work: str) -> dict:
    """The two-tag and the four-tag warm start of this seed: the same data, steps and lr."""
    import train
    out = {}
    for algo in ("grpo", "syn-grpo"):
        d = os.path.join(work, f"seed{seed}", f"warm_{algo}")
        if not os.path.exists(os.path.join(d, "final", "config.json")):   # reused when the run is repeated
            train.main(train.Config(algo="sft", sft_steps=a.sft_steps, seed=seed, shapes_n=a.shapes_n, out_dir=d,
                                    sft_format=algo, overwrite=True))
        out[algo] = os.path.join(d, "final")
    return out


def evaluate(model: str, algo: str, splits: dict, out_dir: str) -> dict:
    """Greedy REC accuracy (IoU > 0.5) of one model on each split."""
    import eval as E
    res = E.evaluate(E.EvalConfig(model=model, task="rec", data=tuple(splits.values()), out_dir=out_dir, backend="hf",
                                  max_new_tokens=112 if algo == "syn-grpo" else 64, algo=algo, batch_size=16))
    names = {os.path.splitext(os.path.basename(p))[0]: k for k, p in splits.items()}
    return {names[k]: v["accuracy"] for k, v in res.items()}


def one_seed(a, seed: int, work: str, descriptions: str, splits: dict) -> dict:
    import train
    warm = warm_starts(a, seed, work)
    scores = {"warm_starts": {algo: evaluate(m, algo, splits, os.path.join(work, f"seed{seed}", f"eval_warm_{algo}"))
                                  for algo, m in warm.items()}}
    for name, cfg in row_configs(warm, a, seed, work, descriptions).items():
        t = time.time()
        if cfg is None:
            scores[name] = scores["warm_starts"]["grpo"]
            continue
        train.main(cfg)
        algo = "syn-grpo" if cfg.algo == "syn-grpo" else "grpo"
        scores[name] = evaluate(os.path.join(cfg.out_dir, "final"), algo, splits, cfg.out_dir + "_eval")
        print(f"seed {seed} {name}: {scores[name]} ({time.time() - t:.0f} s)", flush=True)
    return scores


def curves(work: str, seeds: list, key: str, name: str) -> np.ndarray:
    """The mean over seeds of one metric per step of one row."""
    runs = []
    for seed in seeds:
        path = os.path.join(work, f"seed{seed}", name, "metrics.jsonl")
        with open(path) as f:
            runs.append([r[key] for r in map(json.loads, f) if "step" in r])
    n = min(map(len, runs))
    return np.mean([r[:n] for r in runs], axis=0)


def figure2(work: str, seeds: list, path: str) -> None:
    """Fig. 2 in miniature: entropy and diversity over training, GRPO vs Syn-GRPO (trailing mean over a tenth of
    the run, mean of seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from eval import trailing_mean
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in zip(axes, ("entropy", "diversity"), ("(a) Entropy", "(b) Diversity")):
        for name, label in (("GRPO", "GRPO"), ("Syn-GRPO", "Syn-GRPO")):
            y = curves(work, seeds, key, name)
            ax.plot(np.arange(len(y)) / max(1, len(y) - 1) * 100, trailing_mean(y, max(1, len(y) // 10)),
                    label=label, lw=1.6)
        ax.set_xlabel("training progress (%)"), ax.set_title(title), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(per_seed: dict, a, path_md: str, path_json: str, seconds: float) -> dict:
    stat = lambda xs: {"mean": float(np.mean(xs)), "std": float(np.std(xs))}
    seeds = sorted(per_seed)
    rows = [{"method": m, "seeds": len(seeds),
             "in_domain": stat([per_seed[s][m]["in_domain"] for s in seeds]),
             "out_of_domain": stat([per_seed[s][m]["out_of_domain"] for s in seeds])} for m in ROWS]
    result = {"rows": rows, "settings": {"seeds": seeds, "steps": a.steps, "sft_steps": a.sft_steps,
                                         "shapes_n": a.shapes_n, "eval_n": a.eval_n, "seconds": round(seconds)},
              "warm_starts": {s: per_seed[s]["warm_starts"] for s in seeds}, "per_seed": per_seed}
    with open(path_json, "w") as f:
        json.dump(result, f, indent=1)
    pm = lambda v: f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}" if len(seeds) > 1 else f"{100 * v['mean']:.1f}"
    lines = [f"REC accuracy (%, IoU > 0.5, greedy), tiny Qwen2.5-VL on shapes; {len(seeds)} seed(s), {a.steps} steps "
             f"a row after a {a.sft_steps}-step warm start, {a.eval_n} test images a split.", "",
             "| Method | in-domain (pale) | out-of-domain (stripes) |", "|---|---|---|"]
    lines += [f"| {r['method']} | {pm(r['in_domain'])} | {pm(r['out_of_domain'])} |" for r in rows]
    four_tag = {k: stat([per_seed[s]["warm_starts"]["syn-grpo"][k] for s in seeds]) for k in ("in_domain", "out_of_domain")}
    lines.insert(-2, f"| *Syn-GRPO's warm start (four-tag format; Original is GRPO's)* | {pm(four_tag['in_domain'])} | "
                     f"{pm(four_tag['out_of_domain'])} |")
    lines += ["", "Gain over each row's own warm start (in-domain accuracy, points): SFT and the GRPO rows start from "
              "Original, the Syn-GRPO rows from the four-tag warm start.", "",
              "| Method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---" * (len(seeds) + 2) + "|"]
    for m in ROWS[1:]:
        start = "syn-grpo" if m.startswith("Syn-GRPO") else "grpo"
        gain = [100 * (per_seed[s][m]["in_domain"] - per_seed[s]["warm_starts"][start]["in_domain"]) for s in seeds]
        lines.append(f"| {m} | " + " | ".join(f"{g:+.0f}" for g in gain) + f" | {np.mean(gain):+.1f} |")
    with open(path_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 40 steps a row, 60 test images a split")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (each: its own data, warm starts and runs)")
    p.add_argument("--steps", type=int, default=100, help="RL (or extra SFT) steps of every row")
    p.add_argument("--sft-steps", type=int, default=1200, help="steps of each warm start (the four-tag format binds "
                                                               "the answer to the image after ~1,100)")
    p.add_argument("--shapes-n", type=int, default=128, help="training images (the same for every row)")
    p.add_argument("--eval-n", type=int, default=100, help="test images in each split")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "paper"), help="runs, checkpoints, evaluations")
    p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"), help="table1.md/.json, fig2 PNG")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.eval_n = 1, 40, 60
    from prompts import DESCRIPTIONS
    from shapes import make_shapes
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work_dir, exist_ok=True)
    descriptions = os.path.join(a.work_dir, "descriptions.txt")   # the offline baseline's fixed descriptions
    with open(descriptions, "w") as f:
        f.write("\n".join(DESCRIPTIONS) + "\n")
    test = os.path.join(a.work_dir, "test")
    splits = {"in_domain": make_shapes("rec", a.eval_n, test, seed=100, split="test", objects=(1, 1)),
              "out_of_domain": make_shapes("rec", a.eval_n, test, seed=100, split="test", objects=(1, 1),
                                           background="stripes")}
    t0 = time.time()
    per_seed = {s: one_seed(a, s, a.work_dir, descriptions, splits) for s in range(a.seeds)}
    result = write_table(per_seed, a, os.path.join(a.out, "table1.md"), os.path.join(a.out, "table1.json"),
                         time.time() - t0)
    figure2(a.work_dir, list(range(a.seeds)), os.path.join(a.out, "fig2_entropy_diversity.png"))
    print(f"{time.time() - t0:.0f} s; {a.out}/table1.md, table1.json, fig2_entropy_diversity.png")
    return result


if __name__ == "__main__":
    main()
