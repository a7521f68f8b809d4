"""Evaluation: benchmarks, paper-style tables, training curves and synthesized-image galleries.

    python eval.py --model runs/default/final --task rec --data refcoco_val.json lisa_test.json --image-root DIR
    python eval.py score --task ovd --data gold.jsonl --predictions preds.jsonl    # any system's outputs, no model
    python eval.py plot runs/default                                               # reward / entropy / diversity curves
    python eval.py gallery runs/default                                            # original vs synthesized images

Metrics (Syn-GRPO §4, following VLM-R1), computed with the same parsers and box rescaling as the training rewards (rewards.py):
  rec       accuracy = share of predictions with IoU > 0.5 (strict, VLM-R1), plus mean IoU
  ovd, isr  COCO mAP@[.5:.95] over the whole split (every box scored 1.0 in listed order, equal to pycocotools),
            greedy precision GP and greedy recall GR at IoU 0.5, pooled over the split (1:1 matching by IoU,
            labels must agree): GP = matched / predicted, GR = matched / gold
  math      accuracy of the last \\boxed{} answer (multiple-choice letters normalised)
Generation is greedy by default; `--limit N --seed S` evaluates VLM-R1's random subsets (they used 2000, seed 42).
"""
from __future__ import annotations

import difflib
import json
import os
import random
import re
import sys
from dataclasses import dataclass

import numpy as np

import rewards as R
from common import (ArgumentParser, atomic_write, opt, output_problem, parse_config, read_jsonl, stop_at_first,
                    write_jsonl)
from prompts import MATH_FORMATS
from data import (BOX_FRAMES, QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, TASKS, DataError, DataPool, Sample, frame_size,
                  load_image, missing_sources, read_rows_or_stop, read_template, smart_resize, source_name)
from models import model_problem
from rollout import Sampling, encode_prompt, load_engine


@dataclass
class EvalConfig:
    model: str = opt("tiny", "hub id, checkpoint dir (e.g. runs/default/final), tiny or tiny-qwen-vocab")
    task: str = opt("rec", "rec (accuracy at IoU > 0.5), ovd / isr (mAP, GP, GR), math (accuracy)", choices=TASKS)
    data: tuple = opt((), "benchmark splits, each in any format of train.py --data (README \"Data\"): our JSONL, "
                          "VLM-R1's JSONL or JSON lists (its RefCOCO / LISA files), COCO detection JSON (ovd, isr), a "
                          "Hugging Face dataset (save_to_disk dir, .parquet, .arrow, name@split)")
    image_root: str = opt("", "image paths in the files are relative to this folder ('' = each file's folder)")
    out_dir: str = opt("runs/eval", "predictions_<split>.jsonl, results.json and results.md go here")
    backend: str = opt("hf", "generation backend", choices=("hf", "vllm"))
    max_new_tokens: int = opt(1024, "completion length limit, the same for every format: 1,024, the paper's training "
                                     "length (VLM-R1's), so that a four-tag answer, after <think>, <score> and "
                                     "<description>, is not cut off where a two-tag one is not (VLM-R1's REC evaluation "
                                     "used 256: give --max-new-tokens 256 to match it)")
    limit: int = opt(0, "a random subset of this many rows per split (VLM-R1: 2000); 0 = every row")
    seed: int = opt(42, "seed of that subset (VLM-R1: 42)")
    batch_size: int = opt(16, "prompts per generation call")
    max_model_len: int = opt(4096, "vLLM's context limit, prompt + completion")
    vllm_gpu_memory_utilization: float = opt(0.9, "share of the GPU's memory vLLM takes (vLLM's default: nothing "
                                                  "else shares the GPU during evaluation)")
    prompt_template: str = opt("", "a prompt template file, as train.py's --prompt-template (evaluate with the prompt "
                                   "the model was trained on)")
    min_pixels: int = opt(0, "the image processor's pixel floor, as train.py's --min-pixels (0 = the model's own)")
    max_pixels: int = opt(0, "the image processor's pixel budget, as train.py's --max-pixels (0 = the model's own)")
    algo: str = opt("grpo", "the output format the model was trained to give: grpo (<think>, <answer>) or syn-grpo "
                            "(<think>, <score>, <description>, <answer>); the answer is read the same way",
                    choices=("grpo", "syn-grpo"))
    math_format: str = opt("boxed", "math: the instruction the model was trained with, as train.py's --math-format "
                                    "(boxed: MM-UPT's; think: SynthRL's <think> then \\boxed{})", choices=MATH_FORMATS)


# ----------------------------------------------------------------------------------------------------
# Loading benchmark files


def load_split(path: str, task: str, image_root: str = "", limit: int = 0, seed: int = 42,
               max_boxes_per_category: int = 0, need_images: bool = True, prog: str = "eval.py") -> list[Sample]:
    """A benchmark split in any format train.py's --data takes (data.read_data: our JSONL, VLM-R1's JSONL or JSON
    lists such as its RefCOCO val / LISA test files, COCO detection JSON for ovd/isr, Hugging Face datasets). Bad
    rows are reported and skipped. need_images=False (scoring saved predictions): a row whose image is not there is
    kept if it gives its width and height. A split with no valid row stops `prog` with one line."""
    samples = read_rows_or_stop(path, task, image_root, prog=prog, need_images=need_images,
                                max_boxes_per_category=max_boxes_per_category)
    if limit and len(samples) > limit:   # VLM-R1: random.seed(42); random.shuffle(data); data[:2000]
        samples = list(samples)
        random.Random(seed).shuffle(samples)
        samples = samples[:limit]
    return samples


# ----------------------------------------------------------------------------------------------------
# Scoring (pure: predictions -> numbers)


def normalise_choice(ans: str | None) -> str | None:
    """'(B)', 'B.', 'B) 5', 'option b' -> 'B'; anything else unchanged."""
    if ans is None:
        return None
    m = re.fullmatch(r"\s*(?:option\s*)?\(?([A-Ha-h])\)?[.:)]?(?:\s.*)?", ans, flags=re.S)
    return m.group(1).upper() if m else ans.strip()


def frame_size_for(sample: Sample, row: dict, box_frame: str = "pixels") -> tuple:
    """The extent of the box frame a raw completion's boxes are in: the row's `frame_size` (older rows: `input_size`,
    the same for Qwen2.5-VL), else `box_frame`'s: 1000 x 1000 for rel1000, Qwen2.5-VL's default resize for pixels."""
    size = row.get("frame_size", row.get("input_size"))
    if (isinstance(size, list) and len(size) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          and 0 < v < 1e6 for v in size)):
        return tuple(size)
    if box_frame == "rel1000":
        return frame_size("rel1000", None)
    if sample.width <= 0 or sample.height <= 0:
        return None                        # unknown original size: boxes are taken as given
    h, w = smart_resize(sample.height, sample.width, 28, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
    return (w, h)


def parse_prediction(row: dict, sample: Sample, box_frame: str = "pixels"):
    """A prediction row -> rec box | ovd items | math answer, in the original frame. Rows are either
    {"id", "completion"[, "frame_size"]} (raw model text, parsed like training; without frame_size, its boxes are in
    `box_frame`) or already parsed: {"id", "boxes", "labels"} (original pixels) / {"id", "answer"}."""
    if "completion" in row:
        text = row["completion"] if isinstance(row["completion"], str) else ""
        if sample.task == "math":
            return R.extract_boxed(text)
        size = frame_size_for(sample, row, box_frame)
        if sample.task == "rec":
            return R.predicted_box(text, sample, size)
        if sample.task in ("ovd", "isr"):
            items = R.predicted_detections(text, sample, size)
            return R.valid_detections(items) if items else []
    if sample.task == "math":
        a = row.get("answer")
        return None if a is None else str(a)
    boxes = row.get("boxes") if isinstance(row.get("boxes"), list) else []
    labels = row.get("labels") if isinstance(row.get("labels"), list) else [None] * len(boxes)
    items = []
    for b, label in zip(boxes, labels):
        box = R.parse_box(json.dumps(b)) if isinstance(b, list) else None
        if box is not None and box[2] > box[0] and box[3] > box[1]:
            items.append({"bbox": box, "label": label if isinstance(label, str) else None})
    if sample.task == "rec":
        return items[0]["bbox"] if items else None
    return [it for it in items if it["label"] is not None]


def score_split(task: str, samples: list[Sample], preds: dict) -> dict:
    """preds: sample id -> parsed prediction (missing = no answer). Returns the split's metrics."""
    n = len(samples)
    if task == "rec":
        ious = [R.iou(s.solution, preds[s.id]) if preds.get(s.id) is not None else 0.0 for s in samples]
        return {"n": n, "accuracy": float(np.mean([v > 0.5 for v in ious])) if n else 0.0,
                "mean_iou": float(np.mean(ious)) if n else 0.0}
    if task in ("ovd", "isr"):
        gts = [s.objects for s in samples]
        dts = [preds.get(s.id) or [] for s in samples]
        matched = sum(R.greedy_match(g, d) for g, d in zip(gts, dts))
        n_pred, n_gold = sum(map(len, dts)), sum(map(len, gts))
        return {"n": n, "mAP": R.coco_map_dataset(gts, dts), "GP": matched / n_pred if n_pred else 0.0,
                "GR": matched / n_gold if n_gold else 0.0}
    correct = [preds.get(s.id) is not None and s.answer is not None and
               (normalise_choice(preds[s.id]) == normalise_choice(s.answer) or R.math_equal(preds[s.id], s.answer))
               for s in samples]
    return {"n": n, "accuracy": float(np.mean(correct)) if n else 0.0}


def markdown_table(task: str, results: dict, name: str = "model") -> str:
    """Paper-style table: REC columns = splits (accuracy %); OVD/ISR rows = splits with mAP, GP, GR (%);
    math columns = benchmarks plus their average."""
    if task in ("ovd", "isr"):
        lines = ["| split | mAP | GP (IoU=0.5) | GR (IoU=0.5) |", "|---|---|---|---|"]
        lines += [f"| {k} | {100 * v['mAP']:.2f} | {100 * v['GP']:.2f} | {100 * v['GR']:.2f} |" for k, v in results.items()]
        return "\n".join(lines)
    cols = list(results)
    vals = [100 * results[c]["accuracy"] for c in cols]
    if task == "math" and len(cols) > 1:
        cols, vals = cols + ["Avg"], vals + [float(np.mean(vals))]
    return "\n".join([f"| method | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|",
                      f"| {name} | {' | '.join(f'{v:.2f}' for v in vals)} |"])


# ----------------------------------------------------------------------------------------------------
# Commands


def predict(engine, processor, samples: list[Sample], algo: str = "grpo", max_new_tokens: int = 256,
            batch_size: int = 16, math_format: str = "boxed", template: str = "") -> list[dict]:
    """Greedy completions as prediction rows {id, completion, frame_size}: what evaluation saves and scores (train.py
    validates with it too)."""
    rows = []
    for start in range(0, len(samples), batch_size):
        prompts = [encode_prompt(processor, s, algo, math_format=math_format, template=template)
                   for s in samples[start:start + batch_size]]
        groups = engine.generate(prompts, Sampling(greedy=True, max_tokens=max_new_tokens))
        rows += [{"id": p.sample.id, "completion": g[0].text, "frame_size": list(p.frame_size)}
                 for p, g in zip(prompts, groups)]
    return rows


def score_rows(task: str, samples: list[Sample], rows: list[dict]) -> dict:
    """The split's metrics from raw prediction rows (parsed as in training)."""
    by_id = {s.id: s for s in samples}
    return score_split(task, samples, {r["id"]: parse_prediction(r, by_id[r["id"]]) for r in rows})


def evaluate(cfg: EvalConfig) -> dict:
    """Generate (greedy) on every split, save predictions, score, write results.json and results.md."""
    try:
        template = read_template(cfg.prompt_template, cfg.task)
    except DataError as e:
        raise SystemExit(f"eval.py: {e}")
    splits = {path: load_split(path, cfg.task, cfg.image_root, cfg.limit, cfg.seed) for path in cfg.data}   # or stop
    engine, processor = load_engine(cfg.model, cfg.backend, chunk=cfg.batch_size, max_model_len=cfg.max_model_len,
                                    gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                                    min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    os.makedirs(cfg.out_dir, exist_ok=True)
    results = {}
    for path, samples in splits.items():
        split = source_name(path)
        rows = predict(engine, processor, samples, cfg.algo, cfg.max_new_tokens, cfg.batch_size,
                       math_format=cfg.math_format, template=template)
        write_jsonl(os.path.join(cfg.out_dir, f"predictions_{split}.jsonl"), rows)
        results[split] = score_rows(cfg.task, samples, rows)
        print(split, results[split])
    write_results(cfg.out_dir, cfg.task, results, cfg.model)
    return results


def write_results(out_dir: str, task: str, results: dict, name: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, "results.json")) as f:
        json.dump({"task": task, "model": name, "results": results}, f, indent=1)
    table = markdown_table(task, results, name)
    with atomic_write(os.path.join(out_dir, "results.md")) as f:
        f.write(table + "\n")
    print(table)


@dataclass
class ScoreConfig:
    """python eval.py score --task T --data GOLD --predictions PREDS: metrics of saved predictions, no model."""
    task: str = opt("rec", "the task of the gold file", choices=TASKS)
    data: str = opt("", "the gold file (any format --data of evaluation takes)")
    predictions: str = opt("", "JSONL of {id, completion[, frame_size]} (raw model text, parsed as in training) or "
                               "{id, boxes[, labels]} in original pixels or {id, answer}")
    box_frame: str = opt("pixels", "the frame of raw completions' boxes when a row gives no frame_size: pixels (of "
                                   "Qwen2.5-VL's default resize of the image) or rel1000 (0-1000 relative: Qwen2-VL, "
                                   "Qwen3-VL, InternVL, GLM-4.1V)", choices=BOX_FRAMES)
    image_root: str = opt("", "image folder of the gold file; rows that give width and height need no image")
    out_dir: str = opt("", "write results.json / results.md here ('' = print the metrics as JSON)")
    allow_partial: bool = opt(False, "score even when some gold rows have no prediction (they count as wrong) or some "
                                     "predictions have ids the gold file does not")


def score_command(task: str, data: str, predictions: str, image_root: str = "", out_dir: str = "",
                  allow_partial: bool = False, box_frame: str = "pixels") -> dict:
    """Score saved predictions against a gold file: no model, and no image for rows that carry width and height.
    The coverage is printed (matched, missing and unknown ids); below full coverage it stops unless allow_partial
    (a gold row without a prediction then counts as wrong)."""
    for name, path in (("--data", data), ("--predictions", predictions)):
        if not path or (missing_sources(path) if name == "--data" else not os.path.isfile(path)):
            raise SystemExit(f"eval.py score: {name} {path or '(missing)'}: no such file")
    samples = load_split(data, task, image_root, need_images=False, prog="eval.py score")
    by_id = {s.id: s for s in samples}
    preds, unknown = {}, []
    with open(predictions, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                sid = str(row["id"])
            except (ValueError, KeyError, TypeError):
                print(f"{predictions}:{lineno}: not a prediction row, ignored", file=sys.stderr)
                continue
            if sid not in by_id:
                unknown.append(sid)
            else:
                try:
                    preds[sid] = parse_prediction(row, by_id[sid], box_frame)
                except Exception as e:   # a malformed prediction scores as no answer, never a crash
                    print(f"{predictions}:{lineno}: unparsable prediction ({e}), counted as no answer", file=sys.stderr)
                    preds[sid] = None
    if not preds:
        raise SystemExit(f"eval.py score: no row of {predictions} has the id of a row of {data}")
    check_coverage(samples, preds, unknown, allow_partial)
    res = {source_name(data): score_split(task, samples, preds)}
    if out_dir:
        write_results(out_dir, task, res, os.path.basename(predictions))
    else:
        print(json.dumps(res))
    return res


def check_coverage(samples: list[Sample], preds: dict, unknown: list, allow_partial: bool) -> None:
    """Say how many gold rows have a prediction; stop below full coverage unless asked to score anyway."""
    missing = [s.id for s in samples if s.id not in preds]
    if (missing or unknown) and not allow_partial:
        example = lambda ids: f" (e.g. {', '.join(ids[:3])})" if ids else ""
        raise SystemExit(f"eval.py score: predictions for {len(preds)} of {len(samples)} gold rows: {len(missing)} "
                         f"missing{example(missing)}, {len(unknown)} ids not in the gold file{example(unknown)}; "
                         "--allow-partial scores them anyway (a missing row counts as wrong)")
    print(f"coverage: {len(preds)} of {len(samples)} gold rows have a prediction; {len(missing)} missing, "
          f"{len(unknown)} unknown ids", file=sys.stderr)


CURVES = ("reward", "reward_accuracy", "entropy", "diversity", "diversity_smoothed", "reward_diversity")


def trailing_mean(y, k: int) -> np.ndarray:
    """The mean of the last k values at each step (fewer at the start: no zero padding drags the ends down)."""
    c = np.concatenate([[0.0], np.cumsum(np.asarray(y, dtype=np.float64))])
    i = np.arange(1, len(y) + 1)
    return (c[i] - c[np.maximum(0, i - k)]) / np.minimum(i, k)


def curves(rows: list[dict]) -> dict:
    """metrics.jsonl's training rows -> {key: (steps, values, trailing mean over a twentieth of the run)}."""
    out = {}
    for key in CURVES:
        pts = [(r["step"], r[key]) for r in rows if "step" in r and isinstance(r.get(key), (int, float))]
        if pts:
            x, y = (np.array(v, dtype=np.float64) for v in zip(*pts))
            out[key] = (x, y, trailing_mean(y, max(1, len(y) // 20)))
    return out


def plot_command(run_dir: str) -> list[str]:
    """One PNG per training curve found in metrics.jsonl (paper Fig. 2 / Fig. 7 shapes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for key, (x, y, smooth) in curves(read_jsonl(os.path.join(run_dir, "metrics.jsonl"))).items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(x, y, lw=0.8, alpha=0.4, label="per step")
        ax.plot(x, smooth, lw=1.8, label=f"trailing mean ({max(1, len(y) // 20)})")
        ax.set_xlabel("step"), ax.set_ylabel(key), ax.set_title(key.replace("_", " ")), ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(run_dir, f"curve_{key}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def gallery_command(run_dir: str, rows: int = 6, cols: int = 0) -> str:
    """A grid: each row an original image and its synthesized descendants (from the pool's lineage; the first `cols`
    of them, 0 = all), gold boxes drawn, each cell titled with its generation, training step and the description it
    was drawn from (paper Fig. 5 / Fig. 8)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    pool = DataPool.load(os.path.join(run_dir, "pool.json"))
    chains = [ids for ids in pool.lineage.values() if len(ids) > 1][:rows] or [ids for ids in pool.lineage.values()][:rows]
    chains = [c[:cols] for c in chains] if cols else chains
    cols = max(len(c) for c in chains)
    fig, axes = plt.subplots(len(chains), cols, figsize=(2.4 * cols, 2.4 * len(chains)), squeeze=False)
    for r, chain in enumerate(chains):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(chain):
                continue
            s = pool.samples[chain[c]]
            ax.imshow(load_image(s.image))
            for b in s.gold_boxes():
                ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, color="lime", lw=1.2))
            title = "original" if s.generation == 0 else (f"gen {s.generation}, step {s.meta.get('step', '?')}"
                                                           + (f"\n{s.meta['description']}" if s.meta.get("description") else ""))
            ax.set_title(title, fontsize=7)
    fig.tight_layout()
    path = os.path.join(run_dir, "gallery.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


COMMANDS = ("score", "plot", "gallery")   # and, without one, the evaluation of a model


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        near = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        raise SystemExit(f"eval.py: unknown command {argv[0]!r}: one of {', '.join(COMMANDS)}, or flags alone to "
                         f"evaluate a model" + (f" (did you mean {near[0]}?)" if near else ""))
    if argv and argv[0] == "score":
        c = parse_config(ScoreConfig, argv[1:], description=ScoreConfig.__doc__)
        stop_at_first("eval.py score", [c.out_dir and output_problem("--out-dir", c.out_dir, folder=True)])
        return score_command(c.task, c.data, c.predictions, c.image_root, c.out_dir, c.allow_partial, c.box_frame)
    if argv and argv[0] in ("plot", "gallery"):
        p = ArgumentParser(prog=f"eval.py {argv[0]}")
        p.add_argument("run_dir", help="a train.py --out-dir (metrics.jsonl; pool.json for the gallery)")
        a = p.parse_args(argv[1:])
        need = "metrics.jsonl" if argv[0] == "plot" else "pool.json"
        if not os.path.isfile(os.path.join(a.run_dir, need)):
            raise SystemExit(f"eval.py {argv[0]}: {a.run_dir} is not a training run (no {need} there)")
        out = plot_command(a.run_dir) if argv[0] == "plot" else gallery_command(a.run_dir)
        print(out)
        return out
    cfg = parse_config(EvalConfig, argv, description=__doc__)
    if not cfg.data:
        raise SystemExit("eval.py: --data is required (one or more benchmark files)")
    stop_at_first("eval.py", [model_problem(cfg.model), output_problem("--out-dir", cfg.out_dir, folder=True)]
                  + [f"--data {p}: no such file" for p in cfg.data if missing_sources(p)])
    return evaluate(cfg)


if __name__ == "__main__":
    main()
