"""Table 1 of the Syn-GRPO paper in miniature, on a CPU: a testbed where synthesized images can matter, a gate that
says so before any method row runs, one converged warm start for every row, and paired statistics. Fig. 2 and
Fig. 8's claim in miniature beside it.

    python experiments/paper.py              # 3 seeds, 200 steps a row, 300 test images a split (~85 min)
    python experiments/paper.py --quick      # 1 seed, the gate and the primary contrast's rows (9 min)
    python experiments/paper.py --seeds 1 --steps 2 --sft-steps 10 --sft-chunk 5 --shapes-n 8 --eval-n 4   # CI

The testbed (the predictions, written before any row ran: experiments/predictions.md):
  * the task: shapes REC, one shape an image, the tiny random-weight Qwen2.5-VL;
  * scarce, narrow training data: --shapes-n pale images (32; batch 4: each slot comes back every 8 steps);
  * the synthesizer: `--pipeline procedural` (procedural.py), whose background follows the description's words
    (family, colour, contrast, scale), so that a description changes what the policy next trains on, and how hard;
  * three test splits of --eval-n images: in-domain (pale, as training), near-OOD (the synthesizer's families at
    parameters no description chooses: what synthesized images can prepare for) and far-OOD (saturated stripes, a
    family nothing here draws).
Per seed:
  1. The warm start, shared by every row: SFT on both output formats (`--sft-format both`; the prompt selects
     two-tag or four-tag), --sft-steps, then --sft-chunk more at a time until a chunk moves greedy in-domain accuracy
     by under 2 points in both formats (at most --sft-max-chunks).
  2. The gate: the warm start loses >= 15 points on near-OOD against in-domain, and the oracle (GRPO on the pool
     pre-augmented with --oracle-copies images a sample from every family of the synthesizer) recovers at least half
     of it. Seed 0's gate runs before any method row; when it fails the script stops (--ignore-gate goes on).
  3. Every row of ROWS, --steps steps from the warm start with the same data, B, G and lr:
       Original                     the warm start itself
       SFT                          --steps more SFT steps, both formats
       GRPO                         two-tag GRPO
       GRPO, four-tag format        --algo syn-grpo --no-synthesize --no-diversity-reward: the format alone
       GRPO + Entropy Loss          --entropy-coef 0.001
       GRPO + Entropy Adv.          --entropy-adv 0.4 --entropy-adv-kappa 2
       GRPO + Offline Generation    --offline-synthesis: one image a sample from the warm start's eight
                                    descriptions, made before step 0 by the same server and pipeline
       GRPO + cheap augmentation    (ours) GRPO on the pool plus --oracle-copies photometric-noise copies a sample
                                    (NoisyRollout-style noise on the same images; no description)
       Syn-GRPO (w/o R_diversity)   --no-diversity-reward
       Syn-GRPO, descriptions in turn   (ours) online synthesis, the eight descriptions in turn (--descriptions),
                                    not Eq. 8's choice: what the model choosing its descriptions adds
       Syn-GRPO                     the method
       Oracle (gate)                GRPO on the pool plus --oracle-copies synthesizer images a sample, all families
     Synthesis is synchronous here (--synchronous-synthesis): the procedural pipeline takes milliseconds, and a run
     must not depend on the machine's timing. Every row is scored greedily (eval.py, the same 112 new tokens for
     both formats) on the three splits: REC accuracy (IoU > 0.5).
Writes results/table1.md and table1.json (rows as mean ± standard error over seeds, the gate, the warm starts'
convergence, per-run synthesis counts and V(q), paired contrasts), fig2_entropy_variance.png (the paper's H(q) and
Eq. 4's V(q) over training, GRPO vs Syn-GRPO), fig8_description_families.png (the families of the descriptions
Syn-GRPO sent, per epoch) and syn_gallery.png (eval.py's gallery of seed 0's Syn-GRPO run: slots' lineages).
Every trained row's final model stays in --work-dir/seedS/<row>/final for eval.py.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QUICK_ROWS = ("Original", "GRPO", "GRPO, four-tag format", "GRPO + Offline Generation", "Syn-GRPO", "Oracle (gate)")
ROWS = ("Original", "SFT", "GRPO", "GRPO, four-tag format", "GRPO + Entropy Loss", "GRPO + Entropy Adv.",
        "GRPO + Offline Generation", "GRPO + cheap augmentation", "Syn-GRPO (w/o R_diversity)",
        "Syn-GRPO, descriptions in turn", "Syn-GRPO", "Oracle (gate)")
SPLITS = {"in_domain": "pale", "near_ood": "near", "far_ood": "far"}   # split -> shapes background family
CONTRASTS = (("Syn-GRPO", "GRPO, four-tag format"), ("Syn-GRPO", "GRPO + Offline Generation"),
             ("Syn-GRPO", "GRPO + cheap augmentation"), ("Syn-GRPO", "Syn-GRPO, descriptions in turn"),
             ("GRPO + Offline Generation", "GRPO"), ("GRPO, four-tag format", "GRPO"))
GATE_DROP, GATE_RECOVERY = 0.15, 0.5     # near-OOD loss of the warm start; share of it the oracle must recover
CONVERGED = 0.02                         # a warm start has converged when an SFT chunk moves accuracy less
BATCH = 4                                # prompts a step (the CPU default), in every row
MAX_NEW_TOKENS = 112                     # evaluation, both formats: the four-tag training length


def steps_per_epoch(a) -> int:
    """Steps in which each slot of the original pool is drawn once: no synthesized image exists before."""
    return max(1, a.shapes_n // BATCH)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


# ----------------------------------------------------------------------------------------------------
# Data: the training pool, its augmented copies, the test splits


def training_file(a, seed: int, work: str) -> str:
    from shapes import make_shapes
    return make_shapes("rec", a.shapes_n, os.path.join(work, "data"), seed=seed, objects=(1, 1))


def augmented_file(src: str, copies: int, kind: str, seed: int) -> str:
    """src's rows plus `copies` new images of each: `oracle` re-draws the background with the synthesizer (outpaint
    with the procedural pipeline, a random description over all its families); `noise` adds photometric noise to
    the whole image (NoisyRollout-style: Gaussian pixel noise, brightness and contrast jitter). Labels unchanged."""
    from PIL import Image

    from common import read_jsonl, write_jsonl
    from outpaint import load_pipeline, load_segmenter, outpaint
    out = src.replace(".jsonl", f"_{kind}{copies}.jsonl")
    if os.path.exists(out):
        return out
    root, rows, new = os.path.dirname(src), read_jsonl(src), []
    pipe, matte = (load_pipeline("procedural"), load_segmenter("palette")) if kind == "oracle" else (None, None)
    for i, row in enumerate(rows):
        img = Image.open(os.path.join(root, row["image"])).convert("RGB")
        for k in range(copies):
            rng = random.Random(f"{kind}/{seed}/{i}/{k}")
            if kind == "oracle":
                aug, _ = outpaint(pipe, img, [row["solution"]], oracle_description(rng), seed=rng.getrandbits(31),
                                  steps=1, segmenter=matte)
            else:
                aug = photometric(img, rng)
            name = row["image"].replace(".png", f"_{kind}{k}.png")
            aug.save(os.path.join(root, name))
            new.append({**row, "id": f"{row['id']}~{kind}{k}", "image": name})
    write_jsonl(out, rows + new)
    return out


def oracle_description(rng: random.Random) -> str:
    """A description over the synthesizer's whole vocabulary: every family, colour, contrast and scale."""
    from procedural import COLOR_WORDS, CONTRAST_WORDS, FAMILY_WORDS, SCALE_WORDS
    family = rng.choice(sorted(FAMILY_WORDS))
    words = [rng.choice(CONTRAST_WORDS[rng.choice(sorted(CONTRAST_WORDS))]), rng.choice(sorted(COLOR_WORDS)),
             rng.choice(FAMILY_WORDS[family]), rng.choice(SCALE_WORDS[rng.choice(sorted(SCALE_WORDS))])]
    return " ".join(words)


def photometric(img, rng: random.Random):
    from PIL import Image
    arr = np.asarray(img, dtype=np.float32)
    arr = (arr - 128) * rng.uniform(0.6, 1.4) + 128 + rng.uniform(-40, 40)           # contrast, brightness
    arr = arr + np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(10, 40), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def test_splits(a, work: str) -> dict:
    from shapes import make_shapes
    return {split: make_shapes("rec", a.eval_n, os.path.join(work, "test"), seed=100, split="test", objects=(1, 1),
                               background=family) for split, family in SPLITS.items()}


# ----------------------------------------------------------------------------------------------------
# Training and evaluation


def evaluate(model: str, algo: str, splits: dict, out_dir: str) -> dict:
    """Greedy REC accuracy (IoU > 0.5) of one model on each split, reused when already scored."""
    import eval as E
    done = os.path.join(out_dir, "results.json")
    if os.path.exists(done):
        with open(done) as f:
            res = json.load(f)["results"]
    else:
        res = E.evaluate(E.EvalConfig(model=model, task="rec", data=tuple(splits.values()), out_dir=out_dir,
                                      backend="hf", max_new_tokens=MAX_NEW_TOKENS, algo=algo, batch_size=32))
    names = {os.path.splitext(os.path.basename(p))[0]: k for k, p in splits.items()}
    return {names[k]: v["accuracy"] for k, v in res.items()}


def train(cfg) -> str:
    """One run (skipped when its final model exists: a repeated experiment resumes where it stopped)."""
    import train as T
    final = os.path.join(cfg.out_dir, "final")
    if not os.path.exists(os.path.join(final, "config.json")):
        T.main(cfg)
    return final


def warm_start(a, seed: int, work: str, data: str, splits: dict) -> dict:
    """SFT on both formats until a chunk of --sft-chunk steps moves greedy in-domain accuracy by under CONVERGED in
    both (at most --sft-max-chunks). Returns the final model, its steps and the accuracy after each stage."""
    import train as T
    val = {"in_domain": splits["in_domain"]}
    model, steps, history = "tiny", 0, []
    for stage in range(1 + a.sft_max_chunks):
        n = a.sft_steps if stage == 0 else a.sft_chunk
        d = os.path.join(work, f"seed{seed}", f"warm{stage}")
        model = train(T.Config(model=model, algo="sft", sft_steps=n, sft_format="both", seed=seed, data=data,
                               batch_size=BATCH, out_dir=d, overwrite=True, save_every=0))
        steps += n
        acc = {algo: evaluate(model, algo, val, d + "_eval_" + algo)["in_domain"] for algo in ("grpo", "syn-grpo")}
        history.append({"sft_steps": steps, **acc})
        if stage and all(abs(acc[k] - history[-2][k]) < CONVERGED for k in acc):
            break
    return {"model": model, "sft_steps": steps, "history": history,
            "converged": len(history) > 1 and all(abs(history[-1][k] - history[-2][k]) < CONVERGED
                                                  for k in ("grpo", "syn-grpo"))}


def row_configs(warm: str, a, seed: int, work: str, data: str, descriptions: str) -> dict:
    """Paper row -> (train.Config of its run, the output format it answers in); None: the warm start itself."""
    import train as T
    base = dict(model=warm, sft_steps=0, max_steps=a.steps, seed=seed, data=data, save_every=0, overwrite=True,
                batch_size=BATCH, log_completions=BATCH)   # every prompt's description_sent is logged (Fig. 8)
    out = lambda name: os.path.join(work, f"seed{seed}", slug(name))
    grpo = lambda name, **kw: (T.Config(algo="grpo", out_dir=out(name), **{**base, **kw}), "grpo")
    syn = lambda name, **kw: (T.Config(algo="syn-grpo", out_dir=out(name), pipeline="procedural", segmenter="palette",
                                       synchronous_synthesis=True, **{**base, **kw}), "syn-grpo")
    return {
        "Original": None,
        "SFT": (T.Config(model=warm, algo="sft", sft_steps=a.steps, sft_format="both", seed=seed, data=data,
                         batch_size=BATCH, out_dir=out("SFT"), overwrite=True, save_every=0), "grpo"),
        "GRPO": grpo("GRPO"),
        "GRPO, four-tag format": syn("GRPO, four-tag format", synthesize=False, diversity_reward=False),
        "GRPO + Entropy Loss": grpo("GRPO + Entropy Loss", entropy_coef=0.001),
        "GRPO + Entropy Adv.": grpo("GRPO + Entropy Adv.", entropy_adv=0.4, entropy_adv_kappa=2.0),
        "GRPO + Offline Generation": grpo("GRPO + Offline Generation", offline_synthesis=True,
                                          descriptions=descriptions, pipeline="procedural", segmenter="palette"),
        "GRPO + cheap augmentation": grpo("GRPO + cheap augmentation",
                                          data=augmented_file(data, a.oracle_copies, "noise", seed)),
        "Syn-GRPO (w/o R_diversity)": syn("Syn-GRPO (w/o R_diversity)", diversity_reward=False),
        "Syn-GRPO, descriptions in turn": syn("Syn-GRPO, descriptions in turn", descriptions=descriptions),
        "Syn-GRPO": syn("Syn-GRPO"),
        "Oracle (gate)": grpo("Oracle (gate)", data=augmented_file(data, a.oracle_copies, "oracle", seed)),
    }


def run_record(out_dir: str, steps_per_epoch: int) -> dict:
    """What a run trained on: images synthesized, the share of synthesized prompts, and Eq. 4's V(q) of its groups
    in the first epoch and after it, over synthesized and original prompts."""
    from common import read_jsonl
    rows = [r for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if "step" in r]
    mean = lambda xs: float(np.mean(xs)) if xs else None
    later = [r for r in rows if r["step"] >= steps_per_epoch]
    from data import DataPool
    pool = DataPool.load(os.path.join(out_dir, "pool.json"))
    return {"images_synthesized": sum(x.generation > 0 for x in pool.samples.values()),   # online or offline
            "batch_synth_frac": mean([r["batch_synth_frac"] for r in rows]),
            "variance_first_epoch": mean([r["variance"] for r in rows if r["step"] < steps_per_epoch]),
            "variance_later": mean([r["variance"] for r in later]),
            "variance_later_synth": mean([r["variance_synth"] for r in later if r.get("variance_synth") is not None]),
            "variance_later_original": mean([r["variance_original"] for r in later
                                             if r.get("variance_original") is not None])}


def gate(scores: dict) -> dict:
    """The testbed's gate on one seed's scores: the warm start's near-OOD drop and the oracle's recovery of it."""
    warm, oracle = scores["Original"], scores["Oracle (gate)"]
    drop = warm["in_domain"] - warm["near_ood"]
    recovered = (oracle["near_ood"] - warm["near_ood"]) / drop if drop > 0 else 0.0
    return {"near_ood_drop": drop, "oracle_recovery": recovered,
            "passed": bool(drop >= GATE_DROP and recovered >= GATE_RECOVERY)}


def one_seed(a, seed: int, work: str, descriptions: str, splits: dict, gate_first: bool) -> dict:
    data = training_file(a, seed, work)
    warm = warm_start(a, seed, work, data, splits)
    configs = row_configs(warm["model"], a, seed, work, data, descriptions)
    order = ["Original", "Oracle (gate)"] + [r for r in a.rows if r not in ("Original", "Oracle (gate)")]
    scores, records = {}, {}
    for name in order:
        t = time.time()
        if configs[name] is None:
            scores[name] = evaluate(warm["model"], "grpo", splits, os.path.join(work, f"seed{seed}", "eval_Original"))
        else:
            cfg, fmt = configs[name]
            final = train(cfg)
            scores[name] = evaluate(final, fmt, splits, cfg.out_dir + "_eval")
            if cfg.algo != "sft":
                records[name] = run_record(cfg.out_dir, steps_per_epoch(a))
        print(f"seed {seed} {name}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in scores[name].items())
              + f" ({time.time() - t:.0f} s)", flush=True)
        if name == "Oracle (gate)":
            g = gate(scores)
            print(f"seed {seed} gate: near-OOD drop {100 * g['near_ood_drop']:.1f} points (need >= "
                  f"{100 * GATE_DROP:.0f}), oracle recovers {100 * g['oracle_recovery']:.0f} % of it (need >= "
                  f"{100 * GATE_RECOVERY:.0f} %): {'passed' if g['passed'] else 'FAILED'}", flush=True)
            if gate_first and not g["passed"] and not a.ignore_gate:
                return {"warm_start": warm, "scores": scores, "records": records, "gate": g, "stopped": True}
    warm["four_tag"] = evaluate(warm["model"], "syn-grpo", splits, os.path.join(work, f"seed{seed}", "eval_warm4"))
    return {"warm_start": warm, "scores": scores, "records": records, "gate": gate(scores)}


# ----------------------------------------------------------------------------------------------------
# Statistics, table and figures


def mean_se(xs) -> dict:
    """Mean and standard error of the mean over seeds (SE = sample std / sqrt(n); 0 with one seed)."""
    xs = np.asarray(xs, dtype=float)
    return {"mean": float(xs.mean()), "se": float(xs.std(ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0}


def paired(per_seed: dict, a_row: str, b_row: str, split: str) -> dict:
    """a - b on one split, paired by seed (the same warm start and data): per-seed differences, their mean and SE."""
    d = [per_seed[s]["scores"][a_row][split] - per_seed[s]["scores"][b_row][split] for s in sorted(per_seed)]
    return {"a": a_row, "b": b_row, "split": split, "per_seed": d, **mean_se(d)}


def write_table(per_seed: dict, a, out: str, seconds: float) -> dict:
    from common import code_commit
    seeds = sorted(per_seed)
    rows = [{"method": m, "seeds": len(seeds), **{k: mean_se([per_seed[s]["scores"][m][k] for s in seeds])
                                                  for k in SPLITS}} for m in a.rows]
    contrasts = [paired(per_seed, x, y, k) for x, y in CONTRASTS for k in SPLITS if {x, y} <= set(a.rows)]
    result = {"rows": rows, "contrasts": contrasts,
              "gate": {s: per_seed[s]["gate"] for s in seeds},
              "warm_starts": {s: per_seed[s]["warm_start"] for s in seeds},
              "runs": {s: per_seed[s]["records"] for s in seeds},
              "settings": {"seeds": seeds, "steps": a.steps, "sft_steps": a.sft_steps, "sft_chunk": a.sft_chunk,
                           "shapes_n": a.shapes_n, "eval_n": a.eval_n, "oracle_copies": a.oracle_copies,
                           "seconds": round(seconds), "commit": code_commit()},
              "per_seed": {s: per_seed[s]["scores"] for s in seeds}}
    with open(os.path.join(out, "table1.json"), "w") as f:
        json.dump(result, f, indent=1)
    pm = lambda v: f"{100 * v['mean']:.1f} ± {100 * v['se']:.1f}" if len(seeds) > 1 else f"{100 * v['mean']:.1f}"
    lines = [f"REC accuracy (%, IoU > 0.5, greedy), tiny Qwen2.5-VL on shapes; {len(seeds)} seed(s) (mean ± standard "
             f"error over seeds), {a.steps} steps a row from one shared warm start, {a.shapes_n} pale training images, "
             f"{a.eval_n} test images a split. Measured at commit {result['settings']['commit']} in "
             f"{round(seconds / 60)} min.", "",
             "| Method | in-domain (pale) | near-OOD (synthesizer's families) | far-OOD (saturated stripes) |",
             "|---|---|---|---|"]
    lines += [f"| {r['method']} | " + " | ".join(pm(r[k]) for k in SPLITS) + " |" for r in rows]
    lines += ["", "Paired differences (points; per seed, then mean ± SE):", "",
              "| Contrast | split | " + " | ".join(f"seed {s}" for s in seeds) + (" | mean ± SE |" if len(seeds) > 1
                                                                                 else " | mean (1 seed: no SE) |"),
              "|---|---|" + "---|" * (len(seeds) + 1)]
    lines += [f"| {c['a']} − {c['b']} | {c['split']} | " + " | ".join(f"{100 * x:+.1f}" for x in c["per_seed"])
              + (f" | {100 * c['mean']:+.1f} ± {100 * c['se']:.1f} |" if len(seeds) > 1 else f" | {100 * c['mean']:+.1f} |")
              for c in contrasts]
    lines += ["", "Gate (before the method rows): near-OOD drop of the warm start, share recovered by the oracle:", ""]
    lines += [f"- seed {s}: drop {100 * g['near_ood_drop']:.1f} points, recovered {100 * g['oracle_recovery']:.0f} % "
              f"({'passed' if g['passed'] else 'failed'})" for s, g in result["gate"].items()]
    lines += ["", "Warm starts (SFT on both formats; greedy in-domain accuracy after each stage, two-tag / four-tag):", ""]
    lines += [f"- seed {s}: " + ", ".join(f"{h['sft_steps']} steps {100 * h['grpo']:.1f} / {100 * h['syn-grpo']:.1f}"
                                          for h in w["history"]) + ("" if w["converged"] else " (not converged)")
              for s, w in result["warm_starts"].items()]
    lines += ["", "Runs: images synthesized, share of synthesized prompts, Eq. 4's V(q) in the first epoch / after it "
              "(after it: synthesized / original prompts):", ""]
    f3 = lambda v: "–" if v is None else f"{v:.3f}"
    for m in a.rows:
        recs = [per_seed[s]["records"].get(m) for s in seeds]
        if not all(recs):
            continue
        mean = lambda k: (None if any(r[k] is None for r in recs) else float(np.mean([r[k] for r in recs])))
        lines.append(f"- {m}: {np.mean([r['images_synthesized'] for r in recs]):.0f} images, synthesized share "
                     f"{f3(mean('batch_synth_frac'))}, V(q) {f3(mean('variance_first_epoch'))} / "
                     f"{f3(mean('variance_later'))} ({f3(mean('variance_later_synth'))} / "
                     f"{f3(mean('variance_later_original'))})")
    with open(os.path.join(out, "table1.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def curves(work: str, seeds: list, key: str, name: str) -> np.ndarray:
    """The mean over seeds of one metric per step of one row."""
    from common import read_jsonl
    runs = [[r[key] for r in read_jsonl(os.path.join(work, f"seed{s}", slug(name), "metrics.jsonl")) if "step" in r]
            for s in seeds]
    n = min(map(len, runs))
    return np.mean([r[:n] for r in runs], axis=0)


def figure2(work: str, seeds: list, path: str) -> None:
    """Fig. 2 in miniature: the paper's H(q) and Eq. 4's V(q) over training, GRPO vs Syn-GRPO from the same warm
    start (trailing mean over a tenth of the run, mean of seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval import trailing_mean
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in zip(axes, ("entropy_per_completion", "variance"), ("(a) Entropy H(q)", "(b) Diversity V(q)")):
        for name in ("GRPO", "GRPO, four-tag format", "Syn-GRPO"):
            y = curves(work, seeds, key, name)
            ax.plot(np.arange(len(y)), trailing_mean(y, max(1, len(y) // 10)), label=name, lw=1.6)
        ax.set_xlabel("step"), ax.set_title(title), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sent_descriptions(work: str, seed: int, name: str) -> list:
    """(step, description) of every job a run sent to the data server."""
    from common import read_jsonl
    return [(r["step"], r["description_sent"]) for r in
            read_jsonl(os.path.join(work, f"seed{seed}", slug(name), "completions.jsonl")) if r.get("description_sent")]


def figure8(work: str, seeds: list, steps_per_epoch: int, path: str) -> dict:
    """Fig. 8's claim in miniature: the background families of the descriptions Syn-GRPO sent, per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from procedural import FAMILIES, describe
    counts = {}
    for s in seeds:
        for step, text in sent_descriptions(work, s, "Syn-GRPO"):
            row = counts.setdefault(step // steps_per_epoch, {f: 0 for f in FAMILIES})
            row[describe(text).family] += 1
    epochs = sorted(counts)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bottom = np.zeros(len(epochs))
    for f in FAMILIES:
        share = np.array([counts[e][f] / max(1, sum(counts[e].values())) for e in epochs])
        ax.bar(epochs, share, bottom=bottom, label=f)
        bottom += share
    ax.set_xlabel("epoch"), ax.set_ylabel("share of descriptions sent"), ax.legend(fontsize=7, ncol=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return counts


def gallery(work: str, seed: int, path: str) -> None:
    """eval.py's gallery of seed's Syn-GRPO run (6 slots: the original, then its first 4 synthesized generations,
    each titled with the description it was drawn from), copied to path."""
    import shutil

    import eval as E
    shutil.copyfile(E.gallery_command(os.path.join(work, f"seed{seed}", slug("Syn-GRPO")), rows=6, cols=5), path)


def check_work_dir(a) -> None:
    """Runs and scores in --work-dir are reused (an interrupted experiment goes on where it stopped), so they must be
    of these settings and of this code (its commit): a work dir of other settings, or of runs made by other code, is
    one clear error, never a silently mixed or stale table."""
    from common import code_commit
    keep = {k: v for k, v in vars(a).items() if k not in ("out", "ignore_gate", "work_dir", "quick", "rows")}
    keep["code"] = code_commit()
    path = os.path.join(a.work_dir, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != keep:
            changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in keep.items() if saved.get(k) != v)
            raise SystemExit(f"paper.py: {a.work_dir} holds runs of other settings ({changed}); give another "
                             f"--work-dir or delete it")
    with open(path, "w") as f:
        json.dump(keep, f)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, the rows of QUICK_ROWS (the gate's and the primary "
                                                        "contrast's), one SFT chunk after the first stage, 100 test "
                                                        "images a split")
    p.add_argument("--rows", default=";".join(ROWS), help="the rows to run, separated by ';' (Original and the "
                                                          "oracle always run: the gate needs them)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (each: its own data, warm start and runs)")
    p.add_argument("--steps", type=int, default=200, help="RL (or extra SFT) steps of every row")
    p.add_argument("--sft-steps", type=int, default=1200, help="the warm start's first SFT stage")
    p.add_argument("--sft-chunk", type=int, default=200, help="SFT steps of each later stage, until one moves greedy "
                                                              "in-domain accuracy by under 2 points")
    p.add_argument("--sft-max-chunks", type=int, default=4, help="later stages at most")
    p.add_argument("--shapes-n", type=int, default=32, help="pale training images (the same for every row)")
    p.add_argument("--oracle-copies", type=int, default=8, help="augmented images a sample: the oracle's and cheap "
                                                                "augmentation's (8 since the third run of the testbed: "
                                                                "experiments/predictions.md)")
    p.add_argument("--eval-n", type=int, default=300, help="test images in each split")
    p.add_argument("--ignore-gate", action="store_true", help="run the method rows even when the gate fails")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "paper"), help="runs, checkpoints, evaluations")
    p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"), help="table1.md/.json, figures")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.rows, a.sft_max_chunks, a.eval_n = 1, ";".join(QUICK_ROWS), 1, 100
    unknown = [r for r in a.rows.split(";") if r not in ROWS]
    if unknown:
        raise SystemExit(f"paper.py: --rows: no row {', '.join(map(repr, unknown))}; the rows: {'; '.join(ROWS)}")
    a.rows = [r for r in ROWS if r in a.rows.split(";") or r in ("Original", "Oracle (gate)")]
    from prompts import DESCRIPTIONS
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work_dir, exist_ok=True)
    descriptions = os.path.join(a.work_dir, "descriptions.txt")   # the warm start's eight: offline and "in turn"
    with open(descriptions, "w") as f:
        f.write("\n".join(DESCRIPTIONS) + "\n")
    check_work_dir(a)
    splits = test_splits(a, a.work_dir)
    t0, per_seed = time.time(), {}
    for s in range(a.seeds):
        per_seed[s] = one_seed(a, s, a.work_dir, descriptions, splits, gate_first=s == 0)
        if per_seed[s].get("stopped"):
            with open(os.path.join(a.out, "gate.json"), "w") as f:
                json.dump(per_seed[s], f, indent=1)
            raise SystemExit(f"paper.py: the gate failed on seed {s} ({per_seed[s]['gate']}): the testbed cannot show "
                             f"the paper's claim; change the testbed, not the method (--ignore-gate runs the rows)")
    result = write_table(per_seed, a, a.out, time.time() - t0)
    seeds = list(range(a.seeds))
    if {"GRPO", "GRPO, four-tag format", "Syn-GRPO"} <= set(a.rows):   # the figures' rows
        figure2(a.work_dir, seeds, os.path.join(a.out, "fig2_entropy_variance.png"))
        result["fig8"] = figure8(a.work_dir, seeds, steps_per_epoch(a),
                                 os.path.join(a.out, "fig8_description_families.png"))
        gallery(a.work_dir, 0, os.path.join(a.out, "syn_gallery.png"))
    print(f"{time.time() - t0:.0f} s; {a.out}/table1.md, table1.json, fig2_entropy_variance.png, "
          f"fig8_description_families.png, syn_gallery.png")
    return result


if __name__ == "__main__":
    main()
