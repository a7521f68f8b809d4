"""Datasets, file formats and the data pool.

What lives here:
  * `Sample`: one training / evaluation example (stable `id`, image path, original size, labels).
  * Readers: our JSON Lines formats (`rec`, `ovd`/`isr`, `math`; README "Data"), and the formats users have
    (`read_data`): VLM-R1's conversation JSONL, JSON lists, COCO detection JSON, Hugging Face datasets, several
    sources at once. Bad rows raise `DataError` naming file and line (`strict=True`) or are reported and skipped.
    `python data.py check FILE --task T` reports every bad row; `python data.py convert` rewrites any format as ours.
  * The prompt templates of every task and algorithm, in one place: `PROMPTS`, `build_prompt`.
  * Box-frame bookkeeping: Qwen2.5-VL reads a resized image and answers in pixels *of the resized input*
    (`smart_resize`, `to_input_frame`, `to_original_frame`).
  * `shapes`: a synthetic dataset of coloured shapes for all four tasks, deterministic from a seed
    (the embedded default and the test fixture). `python data.py shapes --task rec --n 2000 --out DIR`.
  * `DataPool`: the training set as slots that synthesized samples replace (Syn-GRPO §3.3), with lineage,
    revert and save/load.
  * Config dataclasses as command lines: `opt` (a field with its --help text and choices) and `parse_config`,
    shared by train.py, eval.py, synth.py and server.py.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import os
import random
import re
import string
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

TASKS = ("rec", "ovd", "isr", "math")


class DataError(ValueError):
    """A malformed data row; the message names the file and line."""


# ----------------------------------------------------------------------------------------------------
# Sample


@dataclass
class Sample:
    id: str                                   # stable: derived from file + line, or given in the row
    task: str                                 # rec | ovd | isr | math
    image: str                                # absolute path (or "" for text-only math)
    width: int = 0                            # original image size, pixels
    height: int = 0
    problem: str = ""                         # rec: the question; math: the problem text
    solution: Optional[list] = None           # rec: [x1, y1, x2, y2] in original pixels
    categories: list = field(default_factory=list)   # ovd/isr: the categories to detect
    objects: list = field(default_factory=list)      # ovd/isr: [{"bbox": [x1,y1,x2,y2], "label": str}]
    answer: Optional[str] = None              # math: gold answer (None = unlabeled)
    source_id: str = ""                       # the original sample this one descends from ("" = itself)
    parent_id: str = ""                       # the sample this one was synthesized from
    generation: int = 0                       # 0 = original, k = k-th synthesized descendant
    meta: dict = field(default_factory=dict)  # free-form provenance (description, step, pass counts...)

    @property
    def root(self) -> str:
        return self.source_id or self.id

    def gold_boxes(self) -> list:
        """Every annotated box of the image, the REC referent first (the outpainting keep-mask uses all of them:
        a referring expression may name its neighbours). `with_gold_boxes` is the inverse."""
        if self.task == "rec":
            boxes = [self.solution] if self.solution else []
            return boxes + [o["bbox"] for o in self.meta.get("context_objects", [])]
        return [o["bbox"] for o in self.objects]

    def with_gold_boxes(self, boxes: list) -> "Sample":
        """A copy whose annotated boxes are `boxes`, given in `gold_boxes()` order (a synthesized image's labels)."""
        if len(boxes) != len(self.gold_boxes()):
            raise ValueError(f"{len(boxes)} boxes for a sample with {len(self.gold_boxes())}")
        new = copy.deepcopy(self)
        if self.task == "rec":
            new.solution = boxes[0]
            new.meta["context_objects"] = [dict(o, bbox=b) for o, b in zip(self.meta.get("context_objects", []), boxes[1:])]
        else:
            new.objects = [dict(o, bbox=b) for o, b in zip(self.objects, boxes)]
        return new

    def to_row(self) -> dict:
        """The JSONL row of its task plus provenance fields; image paths are kept as given."""
        row = {"id": self.id, "image": self.image, "width": self.width, "height": self.height}
        if self.task == "rec":
            row.update(problem=self.problem, solution=self.solution)
        elif self.task in ("ovd", "isr"):
            row.update(categories=self.categories, objects=self.objects)
        else:
            row.update(problem=self.problem, answer=self.answer)
        for k in ("source_id", "parent_id", "generation", "meta"):
            if getattr(self, k):
                row[k] = getattr(self, k)
        return row


def sample_from_dict(d: dict) -> Sample:
    return Sample(**{k: v for k, v in d.items() if k in Sample.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------------
# Prompts (VLM-R1's REC and OVD questions; Syn-GRPO §3.3.2 adds <score> and <description>; MM-UPT's math suffix).
# The format reward checks exactly the tags that the chosen algorithm asks for.

REC_QUESTION = "Please provide the bounding box coordinate of the region this sentence describes: {expression}."
OVD_QUESTION = (
    "Please carefully check the image and detect the following objects: {categories}. "
    "Output the bbox coordinates of detected objects in <answer></answer>. The bbox coordinates in JSON format "
    'should be: [{{"bbox_2d": [x1, y1, x2, y2], "label": "object name"}}]. '
    'If no targets are detected in the image, simply respond with "None".'
)
THINK_ANSWER = (
    " First output the thinking process in <think> </think> tags and then output the final answer in "
    "<answer> </answer> tags."
)
SYN_TAGS = (
    " First output the thinking process in <think> </think> tags, then in <score> </score> tags a number "
    "between 0 and 1 predicting how diverse your answers to this input would be, then in "
    "<description> </description> tags a description of a new image made from this one (same foreground "
    "objects, new background), and finally the answer in <answer> </answer> tags."
)
JSON_ANSWER = " Output the final answer in JSON format."
MATH_SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."
# SynthRL's solver instruction (its math format reward then requires <think> ... </think> before the \boxed{} answer)
MATH_THINK = (" You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
              "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in "
              "\\boxed{}.")
MATH_FORMATS = ("boxed", "think")

PROMPTS = {
    "rec": REC_QUESTION + THINK_ANSWER + JSON_ANSWER,
    "ovd": OVD_QUESTION + THINK_ANSWER,
    "rec/syn-grpo": REC_QUESTION + SYN_TAGS + JSON_ANSWER,
    "ovd/syn-grpo": OVD_QUESTION + SYN_TAGS,
    "math": "{problem}" + MATH_SUFFIX,
    "math/think": "{problem}" + MATH_THINK,
}


def build_prompt(sample: Sample, algo: str = "grpo", math_format: str = "boxed", template: str = "") -> str:
    """The user text for a sample. rec `problem` already holds VLM-R1's full question. math_format: boxed (MM-UPT's
    instruction) or think (SynthRL's). template (--prompt-template): the whole text instead, with {problem} (rec/math:
    the row's question; ovd/isr: the detection question) and {categories} (ovd/isr: the JSON list) filled in."""
    syn = algo == "syn-grpo"
    question = sample.problem
    if sample.task in ("ovd", "isr"):
        question = OVD_QUESTION.format(categories=json.dumps(sample.categories))
    if template:
        return template.format(problem=question, categories=json.dumps(sample.categories))
    if sample.task == "rec":
        return question + (SYN_TAGS if syn else THINK_ANSWER) + JSON_ANSWER
    if sample.task in ("ovd", "isr"):
        return question + (SYN_TAGS if syn else THINK_ANSWER)
    return question + (MATH_THINK if math_format == "think" else MATH_SUFFIX)


TEMPLATE_FIELDS = ("problem", "categories")


def read_template(path: str, task: str) -> str:
    """--prompt-template FILE, checked before anything runs: a text with {problem} and / or {categories} (and no other
    {field}; write {{ and }} for literal braces). '' for no file. Raises DataError saying what is wrong."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError as e:
        raise DataError(f"--prompt-template {path}: {e.strerror}") from None
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:
        raise DataError(f"--prompt-template {path}: {e} (write {{{{ and }}}} for literal braces)") from None
    unknown = names - set(TEMPLATE_FIELDS)
    if unknown or not names:
        what = f"unknown field(s) {{{', '.join(sorted(unknown))}}}" if unknown else "no field"
        raise DataError(f"--prompt-template {path}: {what}; a template uses {{problem}} and / or {{categories}}")
    if task not in ("ovd", "isr") and "categories" in names:
        raise DataError(f"--prompt-template {path}: {{categories}} is filled only for ovd and isr, not {task}")
    return text


# Descriptions of the warm start's Syn-GRPO targets: eight backgrounds of exactly 9 tokens each in the tiny model's
# vocabulary, and scores written with two decimals (always 4 tokens). The tiny model (RoPE base 10) finds the image
# from the answer only at a fixed distance: with descriptions of 7 to 15 tokens, or "0.5" next to "0.25", the
# answer moves and 600 warm-start steps left greedy IoU at 0.19, where equal lengths give 0.90 after 1,200 steps
# (README, "Syn-GRPO on a CPU").
DESCRIPTIONS = ("a sunny beach", "a grassy park", "a green field", "a red brick wall", "a sandy desert",
                "a frozen lake", "a snowy road", "a white room")


def gold_completion(sample: Sample, input_size, algo: str = "grpo", index: int = 0, math_format: str = "boxed") -> str:
    """The target text of supervised fine-tuning (the SFT baseline and the tiny models' warm start), in exactly
    the format the rewards parse; boxes are written in the model-input frame, as the model must answer."""
    r = lambda box: [int(round(v)) for v in to_input_frame(box, (sample.width, sample.height), input_size)]
    if sample.task == "math":
        answer = f"Counting gives {sample.answer}. \\boxed{{{sample.answer}}}"
        return f"<think>I count the shapes.</think> {answer}" if math_format == "think" else answer
    if sample.task == "rec":
        think = "I locate the object."
        answer = json.dumps({"bbox_2d": r(sample.solution)})
    else:
        think = "I list the objects."
        items = [{"bbox_2d": r(o["bbox"]), "label": o["label"]} for o in sample.objects]
        answer = json.dumps(items) if items else "None"
    extra = ""
    if algo == "syn-grpo":   # scores spread over [0, 1) and varied descriptions: GRPO then has choices to shape
        score = (index * 37) % 100 / 100
        extra = f" <score>{score:.2f}</score> <description>{DESCRIPTIONS[index % len(DESCRIPTIONS)]}</description>"
    return f"<think>{think}</think>{extra} <answer>{answer}</answer>"


# ----------------------------------------------------------------------------------------------------
# Box frames. Qwen2.5-VL's processor resizes every image to multiples of 28 (patch 14 x merge 2) with a pixel
# budget, and the model answers in absolute pixels of that resized input (QwenLM/Qwen3-VL#721; VLM-R1 #198).


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(input_height, input_width) the Qwen2-VL image processor produces; same rule as transformers'."""
    if max(height, width) / max(1, min(height, width)) > 200:
        raise ValueError(f"aspect ratio over 200: {width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def scale_box(box, src_size, dst_size) -> list:
    """Map [x1,y1,x2,y2] from an image of size src (w,h) to one of size dst (w,h); multiply before dividing."""
    (sw, sh), (dw, dh) = src_size, dst_size
    x1, y1, x2, y2 = box
    return [x1 * dw / sw, y1 * dh / sh, x2 * dw / sw, y2 * dh / sh]


def to_input_frame(box, original_size, input_size) -> list:
    return scale_box(box, original_size, input_size)


def to_original_frame(box, input_size, original_size) -> list:
    return scale_box(box, input_size, original_size)


# ----------------------------------------------------------------------------------------------------
# Readers


def is_box(b) -> bool:
    """[x1, y1, x2, y2] of finite numbers (not bools) with x2 > x1 and y2 > y1."""
    return (isinstance(b, (list, tuple)) and len(b) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)
            and b[2] > b[0] and b[3] > b[1])


def image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def load_image(path: str) -> Image.Image:
    """RGB image; raises DataError (not a PIL internal) for a missing or corrupt file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def parse_row(row: dict, task: str, image_root: str, where: str, need_image: bool = True) -> Sample:
    """Validate one JSON row of `task` and build a Sample. Raises DataError(where + reason). need_image=False
    (scoring saved predictions): a missing image is fine when the row gives the original width and height."""
    def bad(msg):
        raise DataError(f"{where}: {msg}")

    if not isinstance(row, dict):
        bad("row is not a JSON object")
    img = row.get("image")
    if isinstance(img, list) and task == "math" and len(img) == 1:
        img = img[0]
    if not isinstance(img, str) or not img:
        bad("missing or invalid 'image' (a relative path string)")
    path = img if os.path.isabs(img) else os.path.join(image_root, img)
    given = [row.get("width"), row.get("height")]
    if not os.path.isfile(path):
        if need_image or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in given):
            bad(f"image not found: {path}" + ("" if need_image else " (and no positive integer width and height)"))
        w, h = given
    else:
        try:
            w, h = image_size(path)
        except Exception as e:  # PIL raises many types for corrupt files
            bad(f"unreadable image {path}: {e}")
    s = Sample(id="", task=task, image=path, width=w, height=h)
    if task == "rec":
        if not isinstance(row.get("problem"), str) or not row["problem"].strip():
            bad("missing 'problem' (string)")
        sol = row.get("solution")
        if not is_box(sol):
            bad(f"'solution' must be [x1, y1, x2, y2] with x2 > x1, y2 > y1; got {sol!r}")
        s.problem, s.solution = row["problem"], [float(v) for v in sol]
    elif task in ("ovd", "isr"):
        cats, objs = row.get("categories"), row.get("objects")
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats) or not cats:
            bad("'categories' must be a non-empty list of strings")
        if not isinstance(objs, list):
            bad("'objects' must be a list")
        for j, o in enumerate(objs):
            if not isinstance(o, dict) or not is_box(o.get("bbox")) or not isinstance(o.get("label"), str):
                bad(f"objects[{j}] must be {{'bbox': [x1,y1,x2,y2] (x2>x1, y2>y1), 'label': str}}; got {o!r}")
        s.categories = list(cats)
        s.objects = [{"bbox": [float(v) for v in o["bbox"]], "label": o["label"]} for o in objs]
    elif task == "math":
        if not isinstance(row.get("problem"), str) or not row["problem"].strip():
            bad("missing 'problem' (string)")
        ans = row.get("answer")
        if ans is not None and not isinstance(ans, (str, int, float)):
            bad("'answer' must be a string (or null when unlabeled)")
        s.problem, s.answer = row["problem"], None if ans is None else str(ans)
    else:
        bad(f"unknown task {task!r}; expected one of {TASKS}")
    for k in ("source_id", "parent_id", "generation", "meta"):
        if k in row:
            setattr(s, k, row[k])
    return s


def write_jsonl(samples, path: str, image_root: str = "") -> None:
    """Write samples as JSONL; image paths are made relative to image_root when given. Atomic."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            row = s.to_row()
            if image_root:
                row["image"] = os.path.relpath(s.image, image_root)
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def coco_to_samples(coco_json: str, image_root: str, task: str = "ovd", max_boxes_per_category: int = 0,
                    ) -> list[Sample]:
    """COCO detection JSON (bbox = x, y, w, h) to ovd/isr samples (bbox = x1, y1, x2, y2).

    max_boxes_per_category > 0 drops, per image, every category with more boxes than that (VLM-R1's
    COCO_filtered uses 10: "VLMs generally struggle at recall"). Crowd annotations are skipped."""
    with open(coco_json, encoding="utf-8") as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    by_image: dict = {}
    for a in coco.get("annotations", []):
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = a["bbox"]
        if w <= 0 or h <= 0:
            continue
        by_image.setdefault(a["image_id"], []).append({"bbox": [x, y, x + w, y + h], "label": names[a["category_id"]]})
    out = []
    for im in coco.get("images", []):
        objs = by_image.get(im["id"], [])
        if max_boxes_per_category:
            counts = {}
            for o in objs:
                counts[o["label"]] = counts.get(o["label"], 0) + 1
            objs = [o for o in objs if counts[o["label"]] <= max_boxes_per_category]
        if not objs:
            continue
        cats = sorted({o["label"] for o in objs})
        out.append(Sample(id=str(im["id"]), task=task, image=os.path.join(image_root, im["file_name"]),
                          width=im.get("width", 0), height=im.get("height", 0), categories=cats, objects=objs))
    return out


def add_context_objects(samples: list[Sample], coco_json: str) -> int:
    """COCO-based REC (RefCOCO, RefCOCO+, RefCOCOg): the other annotated objects of each row's image become its
    `context_objects`, so that outpainting keeps the anchors of a relational expression ("the cup left of the
    plate") along with the referent. Images are matched by file name; the referent itself (the annotation with IoU
    > 0.9 against the row's box) is left out; crowd annotations are skipped. Returns the rows that got context."""
    from rewards import iou
    with open(coco_json, encoding="utf-8") as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    image_of = {os.path.basename(im["file_name"]): im["id"] for im in coco.get("images", [])}
    anns: dict = {}
    for a in coco.get("annotations", []):
        x, y, w, h = a["bbox"]
        if not a.get("iscrowd", 0) and w > 0 and h > 0:
            anns.setdefault(a["image_id"], []).append({"bbox": [x, y, x + w, y + h], "label": names[a["category_id"]]})
    n = 0
    for s in samples:
        objs = anns.get(image_of.get(os.path.basename(s.image)), [])
        context = [o for o in objs if s.solution is None or iou(o["bbox"], s.solution) <= 0.9]
        if context:
            s.meta = {**s.meta, "context_objects": context}
            n += 1
    return n


# ----------------------------------------------------------------------------------------------------
# The formats users have (README "Data"): VLM-R1's conversation JSONL, JSON lists, COCO detection JSON, Hugging Face
# datasets (save_to_disk dirs, parquet / arrow files, `name@split` from the Hub) and several sources at once.
# Every row becomes a row of our format and is validated by `parse_row`, so bad rows get the same errors.

IMAGE_CACHE = os.path.join(os.environ.get("SYN_GRPO_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                         ".cache")), "images")
HF_SUFFIXES = (".parquet", ".arrow")


def _answer_json(text: str):
    """The JSON of a gold answer as VLM-R1 writes it: bare, in <answer> tags or in a ```json fence; None if none."""
    text = re.sub(r"</?answer>", "", text).strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.S)
    try:
        return json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return None


def _categories_of(question: str, objects: list) -> list:
    """OVD categories: the JSON list after "the following objects:" in VLM-R1's question, else the answer's labels."""
    m = re.search(r"following objects:\s*(\[.*?\])", question, flags=re.S)
    listed = _answer_json(m.group(1)) if m else None
    if isinstance(listed, list) and listed and all(isinstance(c, str) for c in listed):
        return listed
    return sorted({o.get("label") for o in objects if isinstance(o, dict) and isinstance(o.get("label"), str)})


def normalise_row(row, task: str, where: str):
    """A row of a peer's format as a row of ours (unchanged when it already is one):
    VLM-R1   {"id", "image": str | [str], "conversations": [{"from": "human", "value": "<image>Q"},
             {"from": "gpt", "value": A}]}: rec A = [x1, y1, x2, y2] (or {"bbox_2d": ...}); ovd/isr A = a ```json
             list of {"bbox_2d", "label"} (categories from the question's list, else the labels); math A = the answer
    EasyR1   {"images": [image], "problem", "answer"} (rec/ovd answers as above)."""
    if not isinstance(row, dict):
        return row
    row = dict(row)
    turns = row.pop("conversations", None)
    if turns is not None:
        if (not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns)
                or not isinstance(turns[0].get("value"), str) or not isinstance(turns[1].get("value"), str)):
            raise DataError(f"{where}: 'conversations' must hold a human turn then a gpt turn, each with a 'value' "
                            "string")
        row["problem"], row["answer"] = turns[0]["value"], turns[1]["value"]
    if "image" not in row and "images" in row:
        row["image"] = row.pop("images")
    if isinstance(row.get("image"), list):
        if len(row["image"]) != 1:
            raise DataError(f"{where}: {len(row['image'])} images; a sample has exactly one")
        row["image"] = row["image"][0]
    if isinstance(row.get("problem"), str):
        row["problem"] = row["problem"].replace("<image>", "").strip()
    answer = row.get("answer")
    if task == "rec" and "solution" not in row and isinstance(answer, str):
        box = _answer_json(answer)
        box = box[0] if isinstance(box, list) and len(box) == 1 and isinstance(box[0], dict) else box
        row["solution"] = box.get("bbox_2d") if isinstance(box, dict) else box
    elif task in ("ovd", "isr") and "objects" not in row and isinstance(answer, str):
        items = [] if answer.strip() == "None" else _answer_json(answer)
        if not isinstance(items, list):
            raise DataError(f"{where}: the answer must be a JSON list of {{'bbox_2d', 'label'}}; got {answer[:80]!r}")
        row["objects"] = [{"bbox": o.get("bbox_2d"), "label": o.get("label")} if isinstance(o, dict) else o
                          for o in items]
        row.setdefault("categories", _categories_of(row.get("problem", ""), items))
    elif task == "math" and isinstance(answer, str):
        row["answer"] = re.sub(r"</?answer>", "", answer).strip()
    return row


def _image_file(value, image_dir: str):
    """A dataset's image cell as a path: a path string as is; PIL images and {"bytes", "path"} cells (how `datasets`
    stores images) are written once to image_dir, named by their content hash."""
    if isinstance(value, dict) and value.get("bytes"):
        data = value["bytes"]
    elif isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        return value.get("path") if isinstance(value, dict) else value
    path = os.path.join(image_dir, hashlib.sha1(data).hexdigest()[:20] + ".png")
    if not os.path.exists(path):
        os.makedirs(image_dir, exist_ok=True)
        try:
            Image.open(io.BytesIO(data)).convert("RGB").save(path + ".tmp.png")
        except (OSError, ValueError):
            return ""               # parse_row then reports the row's missing image
        os.replace(path + ".tmp.png", path)
    return path


def hub_name(source: str) -> bool:
    """`name@split` (EasyR1's dataset spelling) that is not a local path: a dataset of the Hugging Face Hub."""
    return "@" in source and not os.path.exists(source)


def hf_rows(source: str, image_dir: str) -> list:
    """The rows of a Hugging Face dataset: a save_to_disk dir, a .parquet / .arrow file, or `name@split` (online)."""
    import datasets
    try:
        if hub_name(source):
            name, split = source.rsplit("@", 1)
            ds = datasets.load_dataset(name, split=split)
        elif os.path.isdir(source):
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        elif source.endswith(".parquet"):
            ds = datasets.Dataset.from_parquet(source)
        else:
            ds = datasets.Dataset.from_file(source)
    except Exception as e:   # datasets raises many types (offline, missing split, not a dataset)
        hint = " (is this machine offline? save it with save_to_disk where it is online)" if hub_name(source) else ""
        raise DataError(f"{source}: cannot load the dataset: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        f"{hint}") from None
    rows = []
    for row in ds:
        for key in ("image", "images"):
            if isinstance(row.get(key), list):
                row[key] = [_image_file(v, image_dir) for v in row[key]]
            elif key in row:
                row[key] = _image_file(row[key], image_dir)
        rows.append(row)
    return rows


def source_rows(source: str, image_dir: str = IMAGE_CACHE) -> list[tuple[str, int, object]]:
    """(where, position, row) for each row of one source: JSONL (position = line number), a JSON list or a dataset
    (position = index). A line that is not JSON comes as its DataError, for the reader to raise or report."""
    if source.endswith(HF_SUFFIXES) or os.path.isdir(source) or hub_name(source):
        return [(f"{source}[{i}]", i, r) for i, r in enumerate(hf_rows(source, image_dir))]
    if source.endswith(".json"):
        with open(source, encoding="utf-8") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(obj, list):
            raise DataError(f"{source}: expected a JSON list of rows (or, for ovd and isr, COCO detection JSON)")
        return [(f"{source}[{i}]", i, r) for i, r in enumerate(obj)]
    out = []
    with open(source, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                where = f"{source}:{lineno}"
                try:
                    out.append((where, lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((where, lineno, DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")))
    return out


def is_coco(source: str) -> bool:
    """A COCO detection JSON: an object with "images" and "annotations" (looked for in its first 64 KiB)."""
    if not source.endswith(".json") or not os.path.isfile(source):
        return False
    with open(source, encoding="utf-8") as f:
        head = f.read(1 << 16)
    return head.lstrip().startswith("{") and '"annotations"' in head


def read_source(source: str, task: str, image_root: str = "", strict: bool = True, log=print, need_images: bool = True,
                image_dir: str = IMAGE_CACHE, max_boxes_per_category: int = 0) -> list[Sample]:
    """The samples of one source of any format. A row's id is its own, else <file stem>-<line or index>. strict: the
    first bad row raises DataError naming file and line; else bad rows are reported through `log` and skipped."""
    root = image_root or (source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source)))
    if task in ("ovd", "isr") and is_coco(source):
        return coco_to_samples(source, root, task, max_boxes_per_category)
    stem = source_name(source)
    samples, seen = [], set()
    for where, position, row in source_rows(source, image_dir):
        try:
            if isinstance(row, DataError):
                raise row
            row = normalise_row(row, task, where)
            s = parse_row(row, task, root, where, need_image=need_images)
            s.id = str(row["id"]) if isinstance(row.get("id"), (str, int)) else f"{stem}-{position}"
            if s.id in seen:
                raise DataError(f"{where}: duplicate id {s.id!r}")
            seen.add(s.id)
            samples.append(s)
        except DataError as e:
            if strict:
                raise
            log(f"skipping bad row: {e}")
    return samples


def source_name(source: str) -> str:
    """A source's short name: its file stem (refcoco_val), or the dataset's name and split (geometry3k-test)."""
    return os.path.splitext(os.path.basename(source.rstrip("/")))[0].replace("@", "-")


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def missing_sources(spec: str) -> list[str]:
    """The local sources of --data that are not there (a Hub `name@split` is looked up only when read)."""
    return [s for s in split_list(spec) if not hub_name(s) and not os.path.exists(s)]


def read_data(spec: str, task: str, image_root: str = "", strict: bool = True, log=print, need_images: bool = True,
              image_dir: str = IMAGE_CACHE, max_boxes_per_category: int = 0) -> list[Sample]:
    """--data as users give it: one source, or several comma-separated (VLM-R1's `a.jsonl:b.jsonl`) with one
    --image-root for all or one each. With several, each id is prefixed by its source's name (VLM-R1's files each
    number their rows from 1)."""
    sources, roots = split_list(spec), split_list(image_root) or [""]
    if len(roots) not in (1, len(sources)):
        raise DataError(f"--image-root: {len(roots)} folders for {len(sources)} data sources (give one, or one each)")
    roots = roots * len(sources) if len(roots) == 1 else roots
    kw = dict(task=task, strict=strict, log=log, need_images=need_images, image_dir=image_dir,
              max_boxes_per_category=max_boxes_per_category)
    if len(sources) == 1:
        return read_source(sources[0], image_root=roots[0], **kw)
    out = []
    for source, root in zip(sources, roots):
        out += [replace(s, id=f"{source_name(source)}/{s.id}") for s in read_source(source, image_root=root, **kw)]
    if len({s.id for s in out}) != len(out):
        raise DataError(f"--data {spec}: two sources share a name, so their ids collide; rename one")
    return out

# ----------------------------------------------------------------------------------------------------
# shapes: coloured shapes on varied backgrounds, deterministic from a seed: the embedded default and the test data.

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
FURNITURE = {"bed": (150, 110, 200), "sofa": (200, 120, 60), "table": (120, 80, 40), "wardrobe": (90, 90, 90)}


BACKGROUNDS = ("pale", "stripes")   # training draws pale ones; stripes are an out-of-domain family for evaluation


def _background(rng: random.Random, w: int, h: int, family: str = "pale") -> Image.Image:
    """Pale solid, gradient or noise backgrounds (kept light so every shape colour stands out); or, for
    evaluation out of domain, pale diagonal stripes of two tints (a family neither training nor the tiny
    synthesizer, which draws speckled textures, ever shows)."""
    if family == "stripes":
        a, b = (np.array([rng.randint(200, 250) for _ in range(3)], dtype=np.float32) for _ in range(2))
        period, slope = rng.choice((8, 12, 16)), rng.choice((-1, 1))
        yy, xx = np.mgrid[0:h, 0:w]
        band = (((xx + slope * yy) // (period // 2)) % 2).astype(bool)[..., None]
        return Image.fromarray(np.where(band, a, b).astype(np.uint8))
    kind = rng.choice(("solid", "gradient", "noise"))
    base = np.array([rng.randint(200, 250) for _ in range(3)], dtype=np.float32)
    if kind == "solid":
        arr = np.broadcast_to(base, (h, w, 3)).copy()
    elif kind == "gradient":
        other = np.array([rng.randint(200, 250) for _ in range(3)], dtype=np.float32)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        t = t[None, :, None] if t.shape[0] == w else t[:, None, None]
        arr = np.broadcast_to(base + (other - base) * t, (h, w, 3)).copy()
    else:
        nrng = np.random.default_rng(rng.getrandbits(32))
        arr = base + nrng.integers(-12, 13, size=(h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _shape_mask(kind: str, w: int, h: int, x: int, y: int, size: int) -> np.ndarray:
    """Boolean mask of one shape drawn alone; its box is read back from these pixels, so labels are exact."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    if kind in ("circle",):
        d.ellipse([x, y, x + size - 1, y + size - 1], fill=255)
    elif kind == "triangle":
        d.polygon([(x + size / 2, y), (x, y + size - 1), (x + size - 1, y + size - 1)], fill=255)
    else:  # square and furniture rectangles
        d.rectangle([x, y, x + size - 1, y + size - 1], fill=255)
    return np.asarray(m) > 0


def _mask_box(mask: np.ndarray) -> list:
    """[x1, y1, x2, y2] with x2/y2 one past the last pixel (pixel-edge coordinates, as COCO)."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


SHAPES_VERSION = 6   # bump when the generator changes: cached files carry it in their name
GRID = 2   # shapes sit centred in the cells of a 2x2 grid, in two sizes: with the tiny models' 112x112 input
           # (4x4 merged image tokens) each cell is 2x2 tokens, and the boxes take few distinct values. A 4x4 grid
           # (one token a cell) is beyond what the tiny model learns in CPU minutes: 3,000 SFT steps stayed blind.


def _place(rng, side, n, kinds):
    """n shapes in distinct grid cells of a square image; returns [(kind, x, y, size)]."""
    cell = side / GRID
    out = []
    for kind, c in zip(kinds, rng.sample(range(GRID * GRID), n)):
        size = int(cell * rng.choice((0.6, 0.8)))
        x = int(c % GRID * cell + (cell - size) / 2)          # centred in its cell
        y = int(c // GRID * cell + (cell - size) / 2)
        out.append((kind, x, y, size))
    return out


def _draw_scene(rng: random.Random, items, w, h, colors, background: str = "pale"):
    img = _background(rng, w, h, background)
    arr = np.array(img)
    boxes = []
    for (kind, x, y, size), color in zip(items, colors):
        m = _shape_mask("square" if kind in FURNITURE else kind, w, h, x, y, size)
        arr[m] = color
        boxes.append(_mask_box(m))
    return Image.fromarray(arr), boxes


def shapes_sample(task: str, index: int, seed: int = 0, objects: tuple = (2, 4),
                  background: str = "pale") -> tuple[Image.Image, dict]:
    """One shapes image and its row (without "image"), deterministic in (task, index, seed); `objects` is the
    (min, max) number of shapes in an image (fewer = easier: one shape needs no colour/shape binding);
    `background` a family of BACKGROUNDS."""
    rng = random.Random(f"shapes/{task}/{seed}/{index}")
    w = h = rng.choice((112, 168, 224))           # model input is 112x112 for the tiny models: frames differ
    if task == "isr":  # top-view "rooms": furniture rectangles on a floor
        kinds = rng.sample(list(FURNITURE), rng.randint(*objects))
        items = _place(rng, w, len(kinds), kinds)
        img, boxes = _draw_scene(rng, items, w, h, [FURNITURE[k] for k, *_ in items], background)
        objs = [{"bbox": b, "label": k} for (k, *_), b in zip(items, boxes)]
        return img, {"categories": sorted(FURNITURE), "objects": objs}
    # distinct (colour, shape) pairs so every referring expression is unique
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], rng.randint(*objects))
    items = _place(rng, w, len(pairs), [s for _, s in pairs])
    img, boxes = _draw_scene(rng, items, w, h, [COLORS[c] for c, _ in pairs], background)
    objs = [{"bbox": b, "label": s, "color": c} for (c, s), b in zip(pairs, boxes)]
    if task == "rec":
        t = rng.randrange(len(objs))
        target = objs[t]
        expr = f"the {target['color']} {target['label']}"
        others = [o for j, o in enumerate(objs) if j != t]
        if others and rng.random() < 0.5:
            o = rng.choice(others)
            rel = "left of" if target["bbox"][2] <= o["bbox"][0] else "right of" if o["bbox"][2] <= target["bbox"][0] else None
            if rel:
                expr += f" {rel} the {o['color']} {o['label']}"
        context = [{"bbox": o["bbox"], "label": f"{o['color']} {o['label']}"} for o in others]
        return img, {"problem": REC_QUESTION.format(expression=expr), "solution": target["bbox"],
                     "meta": {"expression": expr, "context_objects": context}}
    if task == "ovd":
        present = sorted({o["label"] for o in objs})
        cats = sorted(set(rng.sample(present, rng.randint(1, len(present)))) | ({rng.choice(SHAPES)} if rng.random() < 0.3 else set()))
        return img, {"categories": cats,
                     "objects": [{"bbox": o["bbox"], "label": o["label"]} for o in objs if o["label"] in cats]}
    if task == "math":   # counting: by shape, by colour, or all shapes
        question = rng.choice(("shape", "color", "total"))
        if question == "shape":
            kind = rng.choice(SHAPES)
            n, q = sum(o["label"] == kind for o in objs), f"How many {kind}s are in the image?"
        elif question == "color":
            color = rng.choice(list(COLORS))
            n, q = sum(o["color"] == color for o in objs), f"How many {color} shapes are in the image?"
        else:
            n, q = len(objs), "How many shapes are in the image in total?"
        return img, {"problem": q, "answer": str(n)}
    raise ValueError(f"unknown task {task!r}")


def make_shapes(task: str, n: int, out_dir: str, seed: int = 0, split: str = "train", objects: tuple = (2, 4),
                background: str = "pale") -> str:
    """Write n shapes samples (PNG + one JSONL of the task's format) and return the JSONL path. Cached."""
    if not 1 <= objects[0] <= objects[1] <= GRID * GRID:
        raise ValueError(f"shapes per image: need 1 <= min <= max <= {GRID * GRID} (one per grid cell), got {objects}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background family {background!r}: expected one of {BACKGROUNDS}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    tag = f"{task}_{split}_{seed}_{objects[0]}-{objects[1]}" + ("" if background == "pale" else f"_{background}")
    path = os.path.join(out_dir, f"shapes{SHAPES_VERSION}_{tag}_{n}.jsonl")
    if os.path.exists(path):
        return path
    rows = []
    for i in range(n):
        img, row = shapes_sample(task, i if split == "train" else 10_000_000 + i, seed, objects, background)
        name = f"images/v{SHAPES_VERSION}_{tag}_{i:06d}.png"
        img.save(os.path.join(out_dir, name))
        rows.append({"id": f"shapes-{task}-{split}-{seed}-{i}", "image": name, **row})
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------
# Data pool (Syn-GRPO §3.3: "synthesize new data to replace the old data"). One slot per original sample; a
# synthesized sample replaces the current occupant of its source's slot. Every sample ever placed is kept, so
# any slot can be reverted and the lineage of each slot read back (for eval.py's gallery).


class DataPool:
    def __init__(self, samples: list[Sample]):
        self.slots: list[str] = [s.id for s in samples]          # slot order = original data order
        self.samples: dict[str, Sample] = {s.id: s for s in samples}
        self.current: dict[str, str] = {s.id: s.id for s in samples}   # root id -> current sample id
        self.lineage: dict[str, list[str]] = {s.id: [s.id] for s in samples}
        if len(self.samples) != len(samples):
            raise ValueError("duplicate sample ids in the pool")

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, slot: int) -> Sample:
        return self.samples[self.current[self.slots[slot]]]

    def _child(self, parent_id: str, new: Sample) -> Sample:
        """`new` stored as the next generation of `parent_id` (lineage fields set), in no slot yet."""
        parent = self.samples[parent_id]
        if new.id in self.samples:
            raise ValueError(f"sample id {new.id!r} already in the pool")
        new = replace(new, source_id=parent.root, parent_id=parent_id, generation=parent.generation + 1)
        self.samples[new.id] = new
        return new

    def replace(self, parent_id: str, new: Sample) -> Sample:
        """Put `new` (synthesized from `parent_id`) in the parent's slot; returns the stored sample."""
        new = self._child(parent_id, new)
        self.current[new.source_id] = new.id
        self.lineage[new.source_id].append(new.id)
        return new

    def add(self, parent_id: str, new: Sample) -> Sample:
        """Put `new` (synthesized from `parent_id`) in a slot of its own, after the others; returns it."""
        new = self._child(parent_id, new)
        self.slots.append(new.id)
        self.current[new.id] = new.id
        self.lineage[new.id] = [new.id]
        return new

    def revert(self, root_id: str) -> Sample:
        """Put the original sample back in its slot (history is kept)."""
        self.current[root_id] = root_id
        return self.samples[root_id]

    def stats(self) -> dict:
        cur = [self.samples[c] for c in self.current.values()]
        return {"pool_size": len(cur),
                "pool_synth_frac": sum(s.generation > 0 for s in cur) / max(1, len(cur)),
                "pool_mean_generation": sum(s.generation for s in cur) / max(1, len(cur)),
                "pool_total_synthesized": sum(s.generation > 0 for s in self.samples.values())}

    def state_dict(self) -> dict:
        return {"slots": list(self.slots), "current": dict(self.current),
                "lineage": {k: list(v) for k, v in self.lineage.items()},
                "samples": [asdict(s) for s in self.samples.values()]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "DataPool":
        pool = cls.__new__(cls)
        pool.samples = {d["id"]: sample_from_dict(d) for d in state["samples"]}
        pool.slots, pool.current = list(state["slots"]), dict(state["current"])
        pool.lineage = {k: list(v) for k, v in state["lineage"].items()}
        return pool

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.state_dict(), f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "DataPool":
        with open(path, encoding="utf-8") as f:
            return cls.from_state_dict(json.load(f))


def stable_hash(*parts) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------
# Config dataclasses as command lines. Each entry point has one config dataclass; every field is a --flag whose
# --help is the field's own text, with its choices and default.


def opt(default, help: str, choices=None, aliases: tuple = ()):
    """A config field with its --help text (and the values it accepts: argparse rejects any other); `aliases` are the
    peers' names for it (TRL's --num-iterations for --mu), accepted as flags and as --config keys."""
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one line for a bad command line (not the usage of 60 flags), exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class ConfigParser(ArgumentParser):
    """The command line of a config dataclass, with `--config FILE`: a YAML or JSON mapping of field names (or
    their aliases, - or _) to values. The file's values replace the defaults and flags given beside it override the
    file; a run's own config.json is a valid FILE. The file's values are typed and checked as the flags are."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default="")
        known, _ = pre.parse_known_args(args)
        if known.config:
            self.set_defaults(**self.config_file_values(known.config))
        return super().parse_known_args(args, namespace)

    def config_file_values(self, path: str) -> dict:
        import yaml
        try:
            with open(path) as f:
                raw = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
        except (OSError, ValueError, yaml.YAMLError) as e:
            self.error(f"--config {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        if not isinstance(raw, dict):
            self.error(f"--config {path}: expected a mapping of field: value, got {type(raw).__name__}")
        by_name = {s.lstrip("-").replace("-", "_"): a for a in self._actions for s in a.option_strings
                   if s.startswith("--") and a.dest not in ("help", "config")}
        out = {}
        for key, value in raw.items():
            action = by_name.get(str(key).replace("-", "_"))
            if action is None:
                self.error(f"--config {path}: unknown field {key!r}")
            out[action.dest] = self._typed(action, value, f"--config {path}: {key}")
        return out

    def _typed(self, action, value, where: str):
        """A value from the file as the flag would have parsed it (YAML reads 1e-6 as a string: converted here)."""
        if value is None:
            return None                      # "resolved later", as in a run's config.json
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                self.error(f"{where}: expected true or false, got {value!r}")
            return value
        if action.nargs == "+":
            values = tuple(str(v) for v in (value if isinstance(value, list) else [value]))
            bad = [v for v in values if action.choices and v not in action.choices]
            if bad:
                self.error(f"{where}: {bad[0]!r} is not one of {', '.join(map(str, action.choices))}")
            return values
        try:
            if isinstance(value, bool) or (action.type is int and isinstance(value, float)):
                raise ValueError
            typed = action.type(value) if action.type else value
        except (TypeError, ValueError):
            self.error(f"{where}: invalid {getattr(action.type, '__name__', 'value')} value {value!r}")
        if action.choices and typed not in action.choices:
            self.error(f"{where}: {typed!r} is not one of {', '.join(map(str, action.choices))}")
        return typed


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One --flag per field of the dataclass `cls`: bools get --x / --no-x, `T | None` takes a T, tuples take 1+."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        t = hints[f.name]
        if isinstance(t, types.UnionType):                      # `T | None`: None means "resolved later"
            t = next(a for a in t.__args__ if a is not type(None))
        default = f.default if f.default is not MISSING else f.default_factory()
        kw = dict(default=default, help=f.metadata.get("help", ""))
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(t) in (tuple, list) or t in (tuple, list):
            kw.update(nargs="+", type=str)
        else:
            kw["type"] = t
        parser.add_argument("--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()), dest=f.name, **kw)


def config_parser(cls, description: str = "", epilog: str = "") -> ArgumentParser:
    """The command line of the dataclass `cls`; an entry point may add flags of its own (actions, not config)."""
    p = ConfigParser(description=description, epilog=epilog)
    p.add_argument("--config", default="", metavar="FILE", help="a YAML or JSON file of field: value (a run's "
                   "config.json is one); flags given beside it override it")
    add_config_arguments(p, cls)
    return p


def config_from(cls, namespace):
    """The dataclass `cls` from parsed arguments (flags that are not its fields are left out)."""
    a = {f.name: getattr(namespace, f.name) for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in a.items()})


def parse_config(cls, argv=None, description: str = "", epilog: str = ""):
    """Parse a command line into the dataclass `cls` (unknown flags and values outside `choices` exit with one line)."""
    return config_from(cls, config_parser(cls, description, epilog).parse_args(argv))


# ----------------------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("shapes", help="write the synthetic shapes dataset", formatter_class=_HelpFormatter)
    sp.add_argument("--task", choices=TASKS, default="rec", help="the task whose format the rows take")
    sp.add_argument("--n", type=int, default=2000, help="number of images")
    sp.add_argument("--seed", type=int, default=0, help="the dataset is a function of (task, seed, split, index)")
    sp.add_argument("--split", default="train", help="train, or any other name for a disjoint held-out split")
    sp.add_argument("--objects", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"),
                    help=f"number of shapes per image (at most {GRID * GRID}, one per grid cell)")
    sp.add_argument("--background", choices=BACKGROUNDS, default="pale",
                    help="pale (training's) or stripes (an out-of-domain family for evaluation)")
    sp.add_argument("--out", required=True, help="folder for the JSONL file and images/")
    cp = sub.add_parser("check", help="validate data of any format and report every bad row", formatter_class=_HelpFormatter)
    cp.add_argument("file", help="the data: one source or several comma-separated, any format of README \"Data\"")
    cp.add_argument("--task", choices=TASKS, required=True, help="the task whose format the rows must have")
    cp.add_argument("--image-root", default="", help="image paths are relative to this folder, or one per source "
                    "('' = each source's)")
    cv = sub.add_parser("convert", help="rewrite data of any format as our JSONL (embedded images saved beside it)",
                        formatter_class=_HelpFormatter)
    cv.add_argument("file", help="the data: one source or several comma-separated, any format of README \"Data\"")
    cv.add_argument("--task", choices=TASKS, required=True, help="the task of the rows")
    cv.add_argument("--image-root", default="", help="image paths are relative to this folder, or one per source "
                    "('' = each source's)")
    cv.add_argument("--out", required=True, help="the JSONL file to write (image paths relative to its folder)")
    co = sub.add_parser("coco", help="convert COCO detection JSON to the ovd JSONL format", formatter_class=_HelpFormatter)
    co.add_argument("coco_json", help="COCO instances JSON (bbox as x, y, w, h)")
    co.add_argument("--image-root", required=True, help="the folder of the COCO images")
    co.add_argument("--out", required=True, help="the JSONL file to write")
    co.add_argument("--task", choices=("ovd", "isr"), default="ovd", help="the task of the rows")
    co.add_argument("--max-boxes-per-category", type=int, default=0,
                    help="drop, per image, categories with more boxes than this (VLM-R1's COCO filtered: 10; 0 = keep all)")
    cx = sub.add_parser("context", help="give COCO-based REC rows the other annotated objects of their image as "
                        "context_objects (kept by the outpainting keep-mask)", formatter_class=_HelpFormatter)
    cx.add_argument("file", help="the REC JSONL file (RefCOCO / RefCOCO+ / RefCOCOg rows)")
    cx.add_argument("--coco", required=True, help="the COCO instances JSON its images come from (instances_train2014.json)")
    cx.add_argument("--image-root", default="", help="image paths are relative to this folder ('' = the file's)")
    cx.add_argument("--out", required=True, help="the JSONL file to write")
    a = p.parse_args(argv)
    missing = missing_sources(a.file) if a.cmd in ("check", "convert") else [
        path for path in [getattr(a, "file", None), getattr(a, "coco_json", None), getattr(a, "coco", None)]
        if path is not None and not os.path.isfile(path)]
    if missing:
        raise SystemExit(f"data.py {a.cmd}: {', '.join(missing)}: no such file")
    try:
        run_command(a)
    except DataError as e:
        raise SystemExit(f"data.py {a.cmd}: {e}")


def run_command(a) -> None:
    if a.cmd == "shapes":
        try:
            print(make_shapes(a.task, a.n, a.out, a.seed, a.split, tuple(a.objects), a.background))
        except ValueError as e:
            raise SystemExit(f"data.py shapes: {e}")
    elif a.cmd == "context":
        samples = read_data(a.file, "rec", a.image_root, strict=False)
        n = add_context_objects(samples, a.coco)
        write_jsonl(samples, a.out, image_root=a.image_root or os.path.dirname(os.path.abspath(a.file)))
        print(f"{a.out}: {n} of {len(samples)} rows have context objects")
    elif a.cmd in ("check", "convert"):
        bad = []
        out_dir = os.path.dirname(os.path.abspath(a.out)) if a.cmd == "convert" else ""
        good = read_data(a.file, a.task, a.image_root, strict=False, log=bad.append,
                         image_dir=os.path.join(out_dir, "images") if out_dir else IMAGE_CACHE)
        for b in bad:
            print(b)
        if a.cmd == "convert":
            write_jsonl(good, a.out, image_root=out_dir)
            print(f"{a.out}: {len(good)} rows written, {len(bad)} bad rows skipped")
            return
        print(f"{len(good)} valid rows, {len(bad)} bad rows")
        sys.exit(1 if bad else 0)
    else:
        write_jsonl(coco_to_samples(a.coco_json, a.image_root, a.task, a.max_boxes_per_category), a.out,
                    image_root=a.image_root)
        print(a.out)


if __name__ == "__main__":
    main()
