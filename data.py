"""Samples, the data formats users have, box frames and the data pool.

What lives here:
  * `Sample`: one training / evaluation example (stable `id`, image path, original size, labels).
  * Readers: our JSON Lines formats (`rec`, `ovd`/`isr`, `math`; docs/data.md), and the formats users have
    (`read_data`): VLM-R1's conversation JSONL, JSON lists, COCO detection JSON, Hugging Face datasets, several
    sources at once. Bad rows raise `DataError` naming file and line (`strict=True`) or are reported and skipped.
    `python data.py check FILE --task T` reports every bad row; `python data.py convert` rewrites any format as ours.
  * SFT targets (`gold_completion`) and the check of a user's --prompt-template (`read_template`); the prompts and
    the answer's tags themselves are prompts.py's.
  * Box frames: the coordinates a model's boxes are in (`BOX_FRAMES`: Qwen2.5-VL answers in pixels *of its resized
    input*, `smart_resize`; Qwen3-VL in 0-1000 relative to the image), converted by one pair, `to_frame` /
    `from_frame`; `is_box` and `iou` for boxes in any one frame.
  * `DataPool`: the training set as slots that synthesized samples replace (Syn-GRPO §3.3), with lineage and
    save/load.
  * The command line: `python data.py shapes | check | convert | coco | context` (the dataset itself: shapes.py).
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import re
import string
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from PIL import Image

from common import CACHE, ArgumentParser, HelpFormatter, atomic_write, output_problem, split_list, stop_at_first
from prompts import DESCRIPTIONS, TEMPLATE_FIELDS, format_output
from shapes import BACKGROUNDS, GRID, make_shapes


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
# A user's prompt template and the SFT targets (the prompts and tags themselves: prompts.py)

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


def gold_completion(sample: Sample, frame_size, algo: str = "grpo", index: int = 0, math_format: str = "boxed") -> str:
    """The target text of supervised fine-tuning (the SFT baseline and the tiny models' warm start), in exactly
    the format the rewards parse; boxes are written in the model's box frame (of extent `frame_size`), as the model
    must answer."""
    r = lambda box: [int(round(v)) for v in to_frame(box, (sample.width, sample.height), frame_size)]
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
    if algo != "syn-grpo":
        return format_output("grpo", think=think, answer=answer)
    # scores spread over [0, 1) and varied descriptions: GRPO then has choices to shape
    return format_output("syn-grpo", think=think, score=f"{(index * 37) % 100 / 100:.2f}",
                         description=DESCRIPTIONS[index % len(DESCRIPTIONS)], answer=answer)


# ----------------------------------------------------------------------------------------------------
# Box frames: the coordinates a model's boxes are in, each the extent (w, h) they span. "pixels": Qwen2.5-VL's
# processor resizes every image to multiples of 28 (patch 14 x merge 2) within a pixel budget, and the model answers
# in absolute pixels of that resized input (VLM-R1#198): the extent is the input's size. "rel1000": Qwen3-VL (and
# Qwen2-VL, InternVL, GLM-4.1V) answer relative to the image, scaled to 0-1000, at any input size: the extent is
# 1000 x 1000. Gold boxes stay in the original image's pixels; prompts' answers, SFT targets and every reward go
# through `to_frame` / `from_frame` with the extent `frame_size` gives.

BOX_FRAMES = ("pixels", "rel1000")

QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 3136, 12845056   # Qwen2.5-VL's image processor defaults (56*56, 28*28*16384)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = QWEN_MIN_PIXELS,
                 max_pixels: int = QWEN_MAX_PIXELS) -> tuple[int, int]:
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


def frame_size(frame: str, input_size) -> tuple:
    """The extent (w, h) of a box frame: the model-input size for "pixels", (1000, 1000) for "rel1000"."""
    if frame not in BOX_FRAMES:
        raise ValueError(f"unknown box frame {frame!r}; expected one of {', '.join(BOX_FRAMES)}")
    return tuple(input_size) if frame == "pixels" else (1000, 1000)


def to_frame(box, original_size, frame_size) -> list:
    """A box in the original image's pixels -> the model's box frame, of extent `frame_size` (w, h)."""
    return scale_box(box, original_size, frame_size)


def from_frame(box, frame_size, original_size) -> list:
    """A box in the model's box frame, of extent `frame_size` (w, h) -> the original image's pixels."""
    return scale_box(box, frame_size, original_size)


def is_box(b) -> bool:
    """[x1, y1, x2, y2] of finite numbers (not bools) with x2 > x1 and y2 > y1."""
    return (isinstance(b, (list, tuple)) and len(b) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)
            and b[2] > b[0] and b[3] > b[1])


BOX_SLACK = 1.0   # pixels a box may stand beyond its image (COCO's float boxes overshoot the edge by rounding)


def box_problem(b, size) -> str | None:
    """Why `b` cannot be a box of an image of `size` (width, height; 0 = unknown, unchecked), or None: the one rule
    for boxes wherever they enter (data files, the data server's jobs)."""
    if not is_box(b):
        return f"{str(b)[:80]} is not [x1, y1, x2, y2] of numbers with x2 > x1 and y2 > y1"
    w, h = size
    if w > 0 and h > 0 and (min(b[0], b[1]) < -BOX_SLACK or b[2] > w + BOX_SLACK or b[3] > h + BOX_SLACK):
        return f"{[round(v, 2) for v in b]} lies outside the {w}x{h} image"
    return None


def iou(a, b) -> float:
    """Continuous IoU of two [x1, y1, x2, y2] boxes (0 for degenerate ones)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# ----------------------------------------------------------------------------------------------------
# Readers


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
        if box_problem(sol, (w, h)):
            bad(f"'solution' {box_problem(sol, (w, h))}")
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
            if box_problem(o["bbox"], (w, h)):
                bad(f"objects[{j}] 'bbox' {box_problem(o['bbox'], (w, h))}")
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


def write_samples(samples, path: str, image_root: str = "") -> None:
    """Write samples as JSONL; image paths are made relative to image_root when given. Atomic."""
    with atomic_write(path) as f:
        for s in samples:
            row = s.to_row()
            if image_root:
                row["image"] = os.path.relpath(s.image, image_root)
            f.write(json.dumps(row) + "\n")


def coco_objects(coco_json: str) -> tuple[dict, dict]:
    """(the COCO file, image id -> its objects {"bbox": [x1, y1, x2, y2], "label"}): COCO's x, y, w, h boxes in our
    frame; crowd annotations and empty boxes are left out."""
    with open(coco_json, encoding="utf-8") as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    by_image: dict = {}
    for a in coco.get("annotations", []):
        x, y, w, h = a["bbox"]
        if not a.get("iscrowd", 0) and w > 0 and h > 0:
            by_image.setdefault(a["image_id"], []).append({"bbox": [x, y, x + w, y + h], "label": names[a["category_id"]]})
    return coco, by_image


def coco_to_samples(coco_json: str, image_root: str, task: str = "ovd", max_boxes_per_category: int = 0,
                    ) -> list[Sample]:
    """COCO detection JSON (bbox = x, y, w, h) to ovd/isr samples (bbox = x1, y1, x2, y2).

    max_boxes_per_category > 0 drops, per image, every category with more boxes than that (VLM-R1's
    COCO_filtered uses 10: "VLMs generally struggle at recall"). Crowd annotations are skipped."""
    coco, by_image = coco_objects(coco_json)
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
    coco, anns = coco_objects(coco_json)
    image_of = {os.path.basename(im["file_name"]): im["id"] for im in coco.get("images", [])}
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

IMAGE_CACHE = os.path.join(CACHE, "images")   # images embedded in datasets, written once by content hash
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
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, ValueError):
            return ""               # parse_row then reports the row's missing image
        with atomic_write(path, "wb") as f:
            image.save(f, format="PNG")
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


def warn(message: str) -> None:
    """Skipped rows and other notes go to stderr, beside the errors; stdout keeps the program's output."""
    print(message, file=sys.stderr)


def read_source(source: str, task: str, image_root: str = "", strict: bool = True, log=warn, need_images: bool = True,
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


def read_rows_or_stop(spec: str, task: str, image_root: str = "", strict: bool = False, prog: str = "",
                      **kw) -> list[Sample]:
    """read_data for a program: its bad rows are reported on stderr when some row is good; when none is (or --strict
    meets a bad one), one line says so, with how many were bad and the first reason."""
    bad = []
    try:
        samples = read_data(spec, task, image_root, strict=strict, log=bad.append, **kw)
    except DataError as e:   # --strict's first bad row, or sources that cannot be read together
        raise SystemExit(f"{prog}: {e}")
    if not samples:
        why = f": {len(bad)} bad rows, the first {bad[0].removeprefix('skipping bad row: ')}" if bad else " (empty)"
        raise SystemExit(f"{prog}: no valid {task} row in {spec}{why}")
    for b in bad:
        warn(b)
    return samples


def source_name(source: str) -> str:
    """A source's short name: its file stem (refcoco_val), or the dataset's name and split (geometry3k-test)."""
    return os.path.splitext(os.path.basename(source.rstrip("/")))[0].replace("@", "-")


def missing_sources(spec: str) -> list[str]:
    """The local sources of --data that are not there (a Hub `name@split` is looked up only when read)."""
    return [s for s in split_list(spec) if not hub_name(s) and not os.path.exists(s)]


def read_data(spec: str, task: str, image_root: str = "", strict: bool = True, log=warn, need_images: bool = True,
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
# Data pool (Syn-GRPO §3.3: "synthesize new data to replace the old data"). One slot per original sample; a
# synthesized sample replaces the current occupant of its source's slot. Every sample ever placed is kept, so
# the lineage of each slot can be read back (eval.py's gallery).


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
        with atomic_write(path) as f:
            json.dump(self.state_dict(), f)

    @classmethod
    def load(cls, path: str) -> "DataPool":
        with open(path, encoding="utf-8") as f:
            return cls.from_state_dict(json.load(f))


# ----------------------------------------------------------------------------------------------------
# CLI


def command_line() -> ArgumentParser:
    """data.py's subcommands and their flags."""
    p = ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("shapes", help="write the synthetic shapes dataset", formatter_class=HelpFormatter)
    sp.add_argument("--task", choices=TASKS, default="rec", help="the task whose format the rows take")
    sp.add_argument("--n", type=int, default=2000, help="number of images")
    sp.add_argument("--seed", type=int, default=0, help="the dataset is a function of (task, seed, split, index)")
    sp.add_argument("--split", default="train", help="train, or any other name for a disjoint held-out split")
    sp.add_argument("--objects", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"),
                    help=f"number of shapes per image (at most {GRID * GRID}, one per grid cell)")
    sp.add_argument("--background", choices=BACKGROUNDS, default="pale",
                    help="pale (training's), or an out-of-domain family for evaluation: stripes (pale, no harder), "
                         "near (the procedural synthesizer's families at parameters no description chooses), far "
                         "(saturated stripes, which nothing here draws)")
    sp.add_argument("--out", required=True, help="folder for the JSONL file and images/")
    cp = sub.add_parser("check", help="validate data of any format and report every bad row", formatter_class=HelpFormatter)
    cp.add_argument("file", help="the data: one source or several comma-separated, any format of README \"Data\"")
    cp.add_argument("--task", choices=TASKS, required=True, help="the task whose format the rows must have")
    cp.add_argument("--image-root", default="", help="image paths are relative to this folder, or one per source "
                    "('' = each source's)")
    cv = sub.add_parser("convert", help="rewrite data of any format as our JSONL (embedded images saved beside it)",
                        formatter_class=HelpFormatter)
    cv.add_argument("file", help="the data: one source or several comma-separated, any format of README \"Data\"")
    cv.add_argument("--task", choices=TASKS, required=True, help="the task of the rows")
    cv.add_argument("--image-root", default="", help="image paths are relative to this folder, or one per source "
                    "('' = each source's)")
    cv.add_argument("--out", required=True, help="the JSONL file to write (image paths relative to its folder)")
    co = sub.add_parser("coco", help="convert COCO detection JSON to the ovd JSONL format", formatter_class=HelpFormatter)
    co.add_argument("coco_json", help="COCO instances JSON (bbox as x, y, w, h)")
    co.add_argument("--image-root", required=True, help="the folder of the COCO images")
    co.add_argument("--out", required=True, help="the JSONL file to write")
    co.add_argument("--task", choices=("ovd", "isr"), default="ovd", help="the task of the rows")
    co.add_argument("--max-boxes-per-category", type=int, default=0,
                    help="drop, per image, categories with more boxes than this (VLM-R1's COCO filtered: 10; 0 = keep all)")
    cx = sub.add_parser("context", help="give COCO-based REC rows the other annotated objects of their image as "
                        "context_objects (kept by the outpainting keep-mask)", formatter_class=HelpFormatter)
    cx.add_argument("file", help="the REC JSONL file (RefCOCO / RefCOCO+ / RefCOCOg rows)")
    cx.add_argument("--coco", required=True, help="the COCO instances JSON its images come from (instances_train2014.json)")
    cx.add_argument("--image-root", default="", help="image paths are relative to this folder ('' = the file's)")
    cx.add_argument("--out", required=True, help="the JSONL file to write")
    return p


def main(argv=None) -> None:
    a = command_line().parse_args(argv)
    missing = missing_sources(a.file) if a.cmd in ("check", "convert") else [
        path for path in [getattr(a, "file", None), getattr(a, "coco_json", None), getattr(a, "coco", None)]
        if path is not None and not os.path.isfile(path)]
    if missing:
        raise SystemExit(f"data.py {a.cmd}: {', '.join(missing)}: no such file")
    out = getattr(a, "out", None)
    stop_at_first(f"data.py {a.cmd}", [out and output_problem("--out", out, folder=a.cmd == "shapes")])
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
        if not samples:
            raise DataError(f"no valid rec row in {a.file}: nothing written")
        n = add_context_objects(samples, a.coco)
        write_samples(samples, a.out, image_root=a.image_root or os.path.dirname(os.path.abspath(a.file)))
        print(f"{a.out}: {n} of {len(samples)} rows have context objects")
    elif a.cmd in ("check", "convert"):
        bad = []
        out_dir = os.path.dirname(os.path.abspath(a.out)) if a.cmd == "convert" else ""
        good = read_data(a.file, a.task, a.image_root, strict=False, log=bad.append,
                         image_dir=os.path.join(out_dir, "images") if out_dir else IMAGE_CACHE)
        for b in bad:
            print(b)
        if a.cmd == "convert":
            if not good:
                raise DataError(f"no valid {a.task} row in {a.file}: nothing written")
            write_samples(good, a.out, image_root=out_dir)
            print(f"{a.out}: {len(good)} rows written, {len(bad)} bad rows skipped")
            return
        print(f"{len(good)} valid rows, {len(bad)} bad rows")
        sys.exit(1 if bad else 0)
    else:
        samples = coco_to_samples(a.coco_json, a.image_root, a.task, a.max_boxes_per_category)
        if not samples:
            raise DataError(f"no image of {a.coco_json} keeps an annotated object: nothing written")
        write_samples(samples, a.out, image_root=a.image_root)
        print(a.out)


if __name__ == "__main__":
    main()