"""Rewards: pure functions of (completion text, sample, model-input size) -> float, the group statistics of
Syn-GRPO and MM-UPT, and their composition into a step's rewards. Nothing here raises on any completion string;
the only I/O is `load_reward_function`, which imports a user's --reward-function file.

  parsing        extract_tag, parse_box, parse_detections, parse_score, extract_boxed
  accuracy       rec_accuracy (Eq. 2, IoU), ovd_accuracy (Eq. 3, s_ovd * COCO mAP), math_accuracy
  format         format_reward: exactly the tags the algorithm asks for, in order, and an answer that parses
  evaluation     greedy_match (GP / GR at IoU 0.5), coco_map (equals pycocotools, tested)
  Syn-GRPO       diversity (Eq. 4), DiversitySmoother (§3.3.2), diversity_reward (Eq. 6), select_description (Eq. 8)
  MM-UPT         majority_vote_rewards, majority_rewards (per prompt), pseudo_label_correct
  composition    score_completion -> RewardParts (one completion: accuracy, format);
                 score_groups -> GroupRewards (a step's (B, G) rewards: Eq. 7 total, diversity, descriptions)
  user reward    load_reward_function (--reward-function path.py:fn, checked on gold answers)

Boxes: the model answers in pixels of its resized input; every accuracy function rescales predictions to the
original frame before comparing with the gold labels (which are always in the original frame).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from data import Sample, from_frame, iou
from prompts import OUTPUT_TAGS

# ----------------------------------------------------------------------------------------------------
# Parsing

_NUM = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_BOX_RE = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
MAX_PARSE_CHARS = 20_000   # longer answers are not parsed (a 100 kB completion must not stall the reward loop)


def extract_tag(text: str, tag: str) -> str | None:
    """Content of the last complete <tag>...</tag>, or None."""
    if not isinstance(text, str):
        return None
    close = text.rfind(f"</{tag}>")
    if close < 0:
        return None
    open_ = text.rfind(f"<{tag}>", 0, close)
    return None if open_ < 0 else text[open_ + len(tag) + 2:close]


def _finite(vals) -> bool:
    return all(math.isfinite(v) and abs(v) < 1e7 for v in vals)


def parse_box(answer: str | None) -> list[float] | None:
    """First [x1, y1, x2, y2] of numbers in the answer (ints or floats; VLM-R1 only took ints), or None."""
    if not answer or len(answer) > MAX_PARSE_CHARS:
        return None
    m = _BOX_RE.search(answer)
    if not m:
        return None
    box = [float(v) for v in m.groups()]
    return box if _finite(box) else None


def parse_detections(answer: str | None) -> list | None:
    """OVD answer -> list of items, each {"bbox": [4 floats] or None, "label": str or None}.

    Accepts a bare JSON list or one inside a ```json fence; "None" means no detections (empty list).
    Returns None when nothing parses. Malformed items are kept (bbox None) so s_ovd still counts them."""
    if answer is None or len(answer) > MAX_PARSE_CHARS:
        return None
    a = answer.strip()
    fence = re.findall(r"```(?:json)?(.*?)```", a, flags=re.S)
    if fence:
        a = fence[-1].strip()
    if a in ("None", "none", "[]"):
        return []
    try:
        obj = json.loads(a)
    except (ValueError, RecursionError):
        return None
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list):
        return None
    items = []
    for it in obj:
        box, label = None, None
        if isinstance(it, dict):
            b = it.get("bbox_2d", it.get("bbox"))
            if (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           for v in b) and _finite([float(v) for v in b])):
                box = [float(v) for v in b]
            label = it.get("label") if isinstance(it.get("label"), str) else None
        items.append({"bbox": box, "label": label})
    return items


def parse_score(text: str) -> float | None:
    """The predicted diversity in <score>; None unless it is a single number in [0, 1]."""
    s = extract_tag(text, "score")
    if s is None or len(s) > 64:
        return None
    try:
        v = float(s.strip())
    except ValueError:
        return None
    return v if 0.0 <= v <= 1.0 else None


def extract_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} with braces matched (MathRuler's rule); None when absent or unclosed."""
    if not isinstance(text, str):
        return None
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, min(len(text), i + MAX_PARSE_CHARS)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


# ----------------------------------------------------------------------------------------------------
# Geometry (`iou` of two boxes lives with the box frames in data.py)


def iou_matrix_xywh(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(D, G) IoU of xywh boxes, computed exactly as pycocotools' bbIou (maskApi.c), float64."""
    if len(d) == 0 or len(g) == 0:
        return np.zeros((len(d), len(g)))
    dx, dy, dw, dh = (d[:, i:i + 1] for i in range(4))
    gx, gy, gw, gh = (g[None, :, i] for i in range(4))
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = w * h
    out = inter / (dw * dh + gw * gh - inter)
    return np.where((w <= 0) | (h <= 0), 0.0, out)


IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1)   # COCOeval's arrays, bit for bit
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1)


def _match(ious: np.ndarray) -> np.ndarray:
    """COCOeval.evaluateImg's greedy matching for one (image, category): detections in listed order (all scores
    equal), each takes the best still-free gold box with IoU >= t. ious (D, G) -> matched flags (T, D).
    Python lists, not numpy indexing: D and G are a handful, and element access dominates the reward's time."""
    D, G = ious.shape
    rows = ious.tolist()
    out = np.zeros((len(IOU_THRS), D), bool)
    for ti, t in enumerate(IOU_THRS.tolist()):
        used, t = [False] * G, min(t, 1 - 1e-10)
        for d, row in enumerate(rows):
            best, m = t, -1
            for g, v in enumerate(row):
                if used[g] or v < best:
                    continue
                best, m = v, g
            if m >= 0:
                used[m], out[ti, d] = True, True
    return out


def _average_precision(tp: np.ndarray, ignore: np.ndarray, n_gt: int) -> float:
    """COCOeval.accumulate for one category: tp/ignore (T, D) in detection order -> AP averaged over the IoU
    thresholds and 101 recall points (precision made monotone right to left; 0 past the last recall).
    All thresholds at once: rows are independent."""
    T, D = tp.shape
    if D == 0 or n_gt == 0 or not tp.any():     # no true positive: precision is 0 at every recall point
        return 0.0
    tps, fps = np.cumsum(tp & ~ignore, 1), np.cumsum(~tp & ~ignore, 1)          # (T, D)
    rc = tps / n_gt
    pr = tps / (fps + tps + np.spacing(1))
    pr = np.maximum.accumulate(pr[:, ::-1], 1)[:, ::-1]
    inds = (rc[:, None, :] < REC_THRS[None, :, None]).sum(2)                    # (T, R) = searchsorted(left)
    q = pr[np.arange(T)[:, None], np.minimum(inds, D - 1)] * (inds < D)
    return float(q.mean())


def coco_map_dataset(gts: list, preds: list, max_dets: int = 100) -> float:
    """COCO mAP@[.5:.95] over images: gts[i] / preds[i] = [{"bbox": [x1,y1,x2,y2], "label": str}] of image i,
    predictions with score 1.0 in listed order (VLM-R1's convention), categories = the gold labels. Equals
    pycocotools' evaluate + accumulate (tested); a prediction whose label has no gold box anywhere is dropped."""
    cats = sorted({g["label"] for img in gts for g in img})
    # per image: every prediction against every gold box once; categories then take sub-matrices
    images = []
    for gt, pred in zip(gts, preds):
        g = np.array([_xywh(o["bbox"]) for o in gt], dtype=np.float64).reshape(-1, 4)
        d = np.array([_xywh(o["bbox"]) for o in pred], dtype=np.float64).reshape(-1, 4)
        images.append(([o["label"] for o in gt], [o["label"] for o in pred], d, iou_matrix_xywh(d, g)))
    aps = []
    for c in cats:
        tps, igns, n_gt = [], [], 0
        for g_lab, d_lab, d, ious in images:
            gi = [k for k, lab in enumerate(g_lab) if lab == c]
            di = [k for k, lab in enumerate(d_lab) if lab == c][:max_dets]
            n_gt += len(gi)
            if di:
                tp = _match(ious[di][:, gi])
                tps.append(tp)
                igns.append(~tp & (d[di, 2] * d[di, 3] > 1e10)[None, :])  # unmatched and outside the "all" area range
        if n_gt:
            tp = np.concatenate(tps, 1) if tps else np.zeros((len(IOU_THRS), 0), bool)
            ig = np.concatenate(igns, 1) if igns else tp
            aps.append(_average_precision(tp, ig, n_gt))
    return float(np.mean(aps)) if aps else 0.0


def coco_map(gt: list, pred: list, max_dets: int = 100) -> float:
    """COCO mAP of one image (the OVD reward's mAP term, Eq. 3)."""
    return coco_map_dataset([gt], [pred], max_dets)


def _xywh(b):
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def greedy_match(gt: list, pred: list, thr: float = 0.5) -> int:
    """Number of 1:1 matches, taking the highest-IoU same-label pair first, IoU >= thr (GP / GR; Syn-GRPO §4
    follows VLM-R1's greedy precision and recall at IoU 0.5)."""
    pairs = sorted(((iou(p["bbox"], g["bbox"]), i, j) for i, p in enumerate(pred) for j, g in enumerate(gt)
                    if p["label"] == g["label"]), key=lambda x: -x[0])
    used_p, used_g, n = set(), set(), 0
    for v, i, j in pairs:
        if v < thr:
            break
        if i not in used_p and j not in used_g:
            used_p.add(i), used_g.add(j)
            n += 1
    return n


# ----------------------------------------------------------------------------------------------------
# Accuracy rewards (all in [0, 1])


def predicted_box(text: str, sample: Sample, frame_size) -> list | None:
    box = parse_box(extract_tag(text, "answer"))
    if box is None:
        return None
    return from_frame(box, frame_size, (sample.width, sample.height)) if frame_size and frame_size[0] else box


def rec_accuracy(text: str, sample: Sample, frame_size=None) -> float:
    """Eq. 2: IoU(gold, predicted), the prediction rescaled to the original frame; 0 if no box parses."""
    box = predicted_box(text, sample, frame_size)
    return 0.0 if box is None or sample.solution is None else iou(sample.solution, box)


def predicted_detections(text: str, sample: Sample, frame_size=None) -> list | None:
    """Parsed detections in the original frame, or None when the answer does not parse."""
    items = parse_detections(extract_tag(text, "answer"))
    if items is None:
        return None
    if frame_size and frame_size[0]:
        for it in items:
            if it["bbox"] is not None:
                it["bbox"] = from_frame(it["bbox"], frame_size, (sample.width, sample.height))
    return items


def valid_detections(items: list) -> list:
    return [it for it in items if it["bbox"] is not None and it["label"] is not None
            and it["bbox"][2] > it["bbox"][0] and it["bbox"][3] > it["bbox"][1]]


def ovd_accuracy(text: str, sample: Sample, frame_size=None) -> float:
    """Eq. 3: s_ovd * mAP, s_ovd = min(1, N_gt / N_pred) counting every listed item (malformed ones too)."""
    items = predicted_detections(text, sample, frame_size)
    if items is None:
        return 0.0
    gt = sample.objects
    if not gt:
        return 1.0 if not items else 0.0
    if not items:
        return 0.0
    s_ovd = min(1.0, len(gt) / len(items))
    return s_ovd * coco_map(gt, valid_detections(items))


def math_accuracy(text: str, sample: Sample, frame_size=None) -> float:
    pred = extract_boxed(text)
    return float(pred is not None and sample.answer is not None and math_equal(pred, sample.answer))


def math_equal(a: str, b: str) -> bool:
    """Answer equivalence through mathruler's grader (PRM800K rules + sympy); never raises."""
    try:
        from mathruler.grader import grade_answer
        return bool(grade_answer(a, b))
    except Exception:
        return a.strip() == b.strip()


ACCURACY = {"rec": rec_accuracy, "ovd": ovd_accuracy, "isr": ovd_accuracy, "math": math_accuracy}


# ----------------------------------------------------------------------------------------------------
# Format reward

# prompts.OUTPUT_TAGS in order, each once, white space around them (e.g. \s*<think>.*?</think>\s*<answer>.*?</answer>\s*)
_FORMATS = {algo: re.compile(r"\s*" + r"\s*".join(f"<{t}>.*?</{t}>" for t in tags) + r"\s*", re.S)
            for algo, tags in OUTPUT_TAGS.items()}


_MATH_THINK = re.compile(r"\s*<think>.*</think>.*\\boxed\{.*\}.*", re.S)   # SynthRL's math format


def format_reward(text: str, task: str, algo: str = "grpo", math_format: str = "boxed") -> float:
    """1 if the completion is exactly the required tags in order (each once) and the answer parses, else 0. Math:
    a \\boxed{} answer (MM-UPT; boxed), after a <think> block (SynthRL; think)."""
    if not isinstance(text, str) or len(text) > 4 * MAX_PARSE_CHARS:
        return 0.0
    if task == "math":
        ok = extract_boxed(text) is not None
        return float(ok and (math_format != "think" or bool(_MATH_THINK.fullmatch(text))))
    key = "syn-grpo" if algo == "syn-grpo" else "grpo"
    if not _FORMATS[key].fullmatch(text) or any(text.count(f"<{t}>") != 1 or text.count(f"</{t}>") != 1
                                                 for t in OUTPUT_TAGS[key]):
        return 0.0
    if key == "syn-grpo" and (parse_score(text) is None or not extract_tag(text, "description").strip()):
        return 0.0          # a description the data server can use, a score in [0, 1]
    ans = extract_tag(text, "answer")
    ok = parse_box(ans) is not None if task == "rec" else parse_detections(ans) is not None
    return float(ok)


# ----------------------------------------------------------------------------------------------------
# Syn-GRPO: diversity, smoothing, diversity reward, description selection


def diversity(acc: list[float]) -> float:
    """Eq. 4 normalised: population variance of one group's accuracy rewards divided by its bound 1/4
    (Popoviciu, rewards in [0, 1]); torch's default unbiased variance could exceed the bound."""
    if len(acc) == 0:
        return 0.0
    a = np.asarray(acc, dtype=np.float64)
    return float(min(1.0, 4.0 * a.var()))


class DiversitySmoother:
    """Syn-GRPO §3.3.2: Vglobal_k = g*Vglobal_{k-1} + (1-g)*Vbatch_k (Vglobal_1 = Vbatch_1), and
    V~(q) = clip(V(q) * Vglobal_k / Vbatch_k, 0, 1). With Vbatch_k = 0 every V(q) is 0 and stays 0."""

    def __init__(self, gamma: float = 0.7):
        self.gamma, self.v_global = gamma, None

    def __call__(self, v: list[float]) -> tuple[list[float], float, float]:
        """v: V(q) of each sample in the batch -> (smoothed V~(q), Vbatch_k, Vglobal_k)."""
        v_batch = float(np.mean(v)) if len(v) else 0.0
        self.v_global = v_batch if self.v_global is None else self.gamma * self.v_global + (1 - self.gamma) * v_batch
        if v_batch <= 0.0:
            return [0.0 for _ in v], v_batch, self.v_global
        ratio = self.v_global / v_batch
        return [min(1.0, max(0.0, x * ratio)) for x in v], v_batch, self.v_global

    def state_dict(self) -> dict:
        return {"gamma": self.gamma, "v_global": self.v_global}

    def load_state_dict(self, s: dict) -> None:
        self.gamma, self.v_global = s["gamma"], s["v_global"]   # older checkpoints also hold an unused "steps"


def diversity_reward(score: float | None, v_smoothed: float) -> float:
    """Eq. 6: 1 - |v_i - V~(q)|; 0 when <score> is missing or outside [0, 1]."""
    return 0.0 if score is None else 1.0 - abs(score - v_smoothed)


def score_tracking(scores: list[list[float | None]], v_smoothed: list[float]) -> dict:
    """How well the predicted <score>s follow their groups' smoothed diversity V~(q): the Pearson correlation over
    every parsed score of the step (None when either side is constant), their spread, and the share that parse."""
    pairs = [(v, v_smoothed[b]) for b, g in enumerate(scores) for v in g if v is not None]
    n = sum(len(g) for g in scores)
    out = {"score_parsed": len(pairs) / n if n else 0.0, "score_std": float(np.std([v for v, _ in pairs])) if pairs else 0.0}
    x, y = np.array(pairs).T if pairs else (np.zeros(0), np.zeros(0))
    ok = len(pairs) > 1 and x.std() > 0 and y.std() > 0
    out["score_diversity_corr"] = float(np.corrcoef(x, y)[0, 1]) if ok else None
    return out


def select_description(texts: list[str], r_div: list[float]) -> str | None:
    """Eq. 8: the <description> of argmax_i R_div(o_i) (first index on ties); None if that one has none."""
    if not texts:
        return None
    i = int(np.argmax(r_div))
    d = extract_tag(texts[i], "description")
    return d.strip() if d and d.strip() else None


# ----------------------------------------------------------------------------------------------------
# MM-UPT: majority vote within one group


def majority_vote_rewards(answers: list[str | None], equal=None) -> tuple[list[float], str | None]:
    """Rewards 1 for answers equivalent to the group's most common answer, else 0.

    Votes are grouped by equivalence (`equal`, default exact match after strip), ties go to the cluster seen
    first, and None ("no answer") is not a vote and gets 0. Call it once per prompt id, never by position."""
    eq = equal or (lambda a, b: a.strip() == b.strip())
    reps, counts = [], []
    for a in answers:
        if a is None:
            continue
        for k, r in enumerate(reps):
            if eq(a, r):
                counts[k] += 1
                break
        else:
            reps.append(a)
            counts.append(1)
    if not reps:
        return [0.0] * len(answers), None
    label = reps[int(np.argmax(counts))]   # argmax returns the first maximum: ties -> earliest cluster
    return [float(a is not None and eq(a, label)) for a in answers], label


def majority_rewards(texts: list[list[str]], samples: list[Sample], frame_sizes: list) -> tuple[list, list]:
    """MM-UPT, per prompt (never by position): 1 for answers equivalent to the group's majority answer, else 0.
    Math answers vote through MathRuler's equivalence; rec boxes (original frame) cluster at IoU >= 0.5, the
    consensus box being the largest cluster's first member. Returns (rewards (B, G) lists, pseudo-labels (B,))."""
    out, labels = [], []
    for group, sample, size in zip(texts, samples, frame_sizes):
        if sample.task == "math":
            r, label = majority_vote_rewards([extract_boxed(t) for t in group], math_equal)
        else:
            answers = [predicted_box(t, sample, size) for t in group]
            r, label = majority_vote_rewards(answers, lambda a, b: iou(a, b) >= 0.5)
        out.append(r)
        labels.append(label)
    return out, labels


def pseudo_label_correct(label, sample: Sample) -> bool:
    """A majority answer (math string or rec box in the original frame) against the gold label (TTRL's "reward
    accuracy": how often the pseudo-label is right; a diagnostic, never a reward)."""
    if label is None:
        return False
    if sample.task == "math":
        return sample.answer is not None and math_equal(label, sample.answer)
    return sample.solution is not None and iou(label, sample.solution) > 0.5


# ----------------------------------------------------------------------------------------------------
# Composition: one completion, then a step's groups


@dataclass
class RewardParts:
    accuracy: float
    format: float

    @property
    def total(self) -> float:   # Eq. 7 without the diversity reward, which needs the whole group
        return self.accuracy + self.format


def score_completion(text: str, sample: Sample, frame_size, algo: str = "grpo", math_format: str = "boxed") -> RewardParts:
    """Accuracy and format reward of one completion; never raises (a reward bug must not kill a run)."""
    try:
        acc = ACCURACY[sample.task](text, sample, frame_size)
        acc = acc if math.isfinite(acc) else 0.0
    except Exception:
        acc = 0.0
    try:
        fmt = format_reward(text, sample.task, algo, math_format)
    except Exception:
        fmt = 0.0
    return RewardParts(accuracy=acc, format=fmt)


@dataclass
class GroupRewards:
    """A step's rewards, B prompts x G completions."""
    accuracy: torch.Tensor            # (B, G) R_acc (Eq. 2 / 3); under --reward majority: agreement with the majority
    format: torch.Tensor              # (B, G) R_format (0 under --reward majority: MM-UPT has no format term)
    diversity: torch.Tensor           # (B, G) R_div (Eq. 6), syn-grpo only, else 0
    descriptions: list = field(default_factory=list)   # (B,) Eq. 8's selected <description> (syn-grpo), else None
    stats: dict = field(default_factory=dict)          # diversity V (Eq. 4) and its smoothing; MM-UPT diagnostics
    weights: tuple = (1.0, 1.0, 1.0, 1.0)   # of accuracy, format, diversity, custom: 1, 1, 1 in Eq. 7; SynthRL 0.9, 0.1
    custom: torch.Tensor | None = None      # (B, G) the --reward-function's term, None without one

    @property
    def total(self) -> torch.Tensor:  # Eq. 7: r_i = R_acc + R_format + R_div (+ a user's term), (B, G)
        wa, wf, wd, wc = self.weights
        total = wa * self.accuracy + wf * self.format + wd * self.diversity
        return total if self.custom is None else total + wc * self.custom


def score_groups(texts: list[list[str]], samples: list[Sample], frame_sizes: list, algo: str = "grpo",
                 reward: str = "gold", smooth=None, with_diversity_reward: bool = True, weights=(1.0, 1.0, 1.0, 1.0),
                 math_format: str = "boxed", custom=None) -> GroupRewards:
    """Every reward of a step. texts: G completions per prompt. reward: "gold" (the labels) or "majority" (MM-UPT).
    smooth: V(q) of the batch -> (V~(q), V_batch, V_global), the diversity smoother (syn-grpo only).
    with_diversity_reward=False: "Syn-GRPO (w/o R_diversity)": R_div is 0, so Eq. 8's argmax picks each prompt's first
    completion (the G are exchangeable samples: a random one). custom: a checked --reward-function
    (load_reward_function), called once on the step's completions."""
    parts = [[score_completion(t, s, size, algo, math_format) for t in g] for g, s, size in zip(texts, samples, frame_sizes)]
    acc = torch.tensor([[x.accuracy for x in g] for g in parts])
    fmt = torch.tensor([[x.format for x in g] for g in parts])
    stats = {}
    if reward == "majority":
        agreement, labels = majority_rewards(texts, samples, frame_sizes)
        labelled = [b for b, s in enumerate(samples) if (s.answer if s.task == "math" else s.solution) is not None]
        if labelled:   # where gold labels exist: diagnostics only, never used as reward
            stats["majority_acc"] = float(np.mean([pseudo_label_correct(labels[b], samples[b]) for b in labelled]))
            stats["gold_accuracy"] = acc[labelled].mean().item()
        stats["format_rate"] = fmt.mean().item()
        acc, fmt = torch.tensor(agreement), torch.zeros_like(fmt)
    v = [diversity(a.tolist()) for a in acc]                     # Eq. 4 of each prompt, from the reward's accuracy
    stats["diversity"] = float(np.mean(v))
    stats["variance"] = stats["diversity"] / 4   # Eq. 4 itself: the group's variance, before the normalisation
    div, descriptions = torch.zeros_like(acc), [None] * len(texts)
    if algo == "syn-grpo":
        v_smoothed, _, v_global = smooth(v)
        scores = [[parse_score(t) for t in g] for g in texts]
        for b, g in enumerate(texts):
            if with_diversity_reward:
                div[b] = torch.tensor([diversity_reward(x, v_smoothed[b]) for x in scores[b]])
            descriptions[b] = select_description(g, div[b].tolist())
        stats.update(diversity_smoothed=float(np.mean(v_smoothed)), diversity_global=v_global,
                     **score_tracking(scores, v_smoothed))
    extra = None
    if custom is not None:   # one call on the flat batch, as TRL calls its reward functions
        flat = custom([t for g in texts for t in g], [s for g, s in zip(texts, samples) for _ in g])
        extra = torch.tensor(flat, dtype=acc.dtype).reshape(acc.shape)
    return GroupRewards(accuracy=acc, format=fmt, diversity=div, descriptions=descriptions, stats=stats,
                        weights=tuple(weights), custom=extra)


# ----------------------------------------------------------------------------------------------------
# A user's reward (--reward-function path.py:fn), as TRL users write them: fn(completions, samples) -> list[float]


class RewardFunctionError(ValueError):
    """A --reward-function that cannot be used; the message says what is wrong."""


def load_reward_function(spec: str, probe: tuple[list[str], list[Sample]]):
    """The function `fn` of `path.py:fn`, checked at start-up by calling it on `probe` (completions, samples): it
    must return one finite number per completion. Returns it wrapped so that a later failure is one clear error."""
    path, _, name = spec.rpartition(":")
    if not path or not name or not path.endswith(".py"):
        raise RewardFunctionError(f"--reward-function {spec}: expected path.py:function")
    if not os.path.isfile(path):
        raise RewardFunctionError(f"--reward-function {spec}: {path}: no such file")
    try:
        module_spec = importlib.util.spec_from_file_location(f"reward_plugin_{name}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise RewardFunctionError(f"--reward-function {spec}: importing {path} failed: "
                                  f"{type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardFunctionError(f"--reward-function {spec}: {path} has no function {name!r}")

    def checked(completions: list[str], samples: list[Sample]) -> list[float]:
        try:
            out = fn(completions, samples)
        except Exception as e:
            raise RewardFunctionError(f"--reward-function {spec} raised {type(e).__name__}: {e}") from None
        ok = isinstance(out, (list, tuple)) and len(out) == len(completions) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in out)
        if not ok:
            raise RewardFunctionError(f"--reward-function {spec}: expected a list of {len(completions)} finite numbers "
                                      f"(one per completion), got {str(out)[:100]}")
        return [float(v) for v in out]

    checked(*probe)
    checked.__name__ = name
    return checked
