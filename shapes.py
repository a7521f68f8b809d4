"""The shapes dataset: coloured shapes on varied backgrounds for all four tasks, deterministic from a seed. It is
the embedded default (`python train.py` with no --data), the test fixture and the out-of-domain split of the
paper's Table 1 in miniature (`--background stripes`). Its palette is also what the data server's `palette`
segmenter keys on, and its words are in the tiny tokenizer's corpus.

    python data.py shapes --task rec --n 2000 --out DIR     # writes DIR/shapes<version>_...jsonl and DIR/images/
"""
from __future__ import annotations

import os
import random

import numpy as np
from PIL import Image, ImageDraw

from common import write_jsonl
from procedural import held_out, render
from prompts import REC_QUESTION

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
FURNITURE = {"bed": (150, 110, 200), "sofa": (200, 120, 60), "table": (120, 80, 40), "wardrobe": (90, 90, 90)}


# Background families. Training draws `pale`; the others are test splits out of its domain:
#   stripes  pale diagonal stripes of two tints: a new family, but no harder (the first miniature Table 1's split)
#   near     the testbed synthesizer's own families (procedural.py) at parameters its words never choose: what
#            synthesized training images can prepare a model for
#   far      diagonal stripes of two colours of any brightness and saturation: a family no synthesizer here draws
#            (procedural.py never draws stripes), defined here independently of it
BACKGROUNDS = ("pale", "stripes", "near", "far")


def _background(rng: random.Random, w: int, h: int, family: str = "pale") -> Image.Image:
    """A background of `family` (BACKGROUNDS): pale solid, gradient or noise ones (kept light so every shape colour
    stands out), or one of the out-of-domain families."""
    if family == "near":
        return render(held_out(rng), w, h, seed=rng.getrandbits(32))
    if family in ("stripes", "far"):
        lo, hi = (200, 250) if family == "stripes" else (0, 255)
        a, b = (np.array([rng.randint(lo, hi) for _ in range(3)], dtype=np.float32) for _ in range(2))
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


HELD_OUT_OFFSET = 10_000_000   # indices of any other split start here: disjoint from train's for any n below it
SHAPES_VERSION = 6   # bump when the generator (or procedural.render, which draws `near`) changes: cached files
                     # carry it in their name
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
        img, row = shapes_sample(task, i if split == "train" else HELD_OUT_OFFSET + i, seed, objects, background)
        name = f"images/v{SHAPES_VERSION}_{tag}_{i:06d}.png"
        img.save(os.path.join(out_dir, name))
        rows.append({"id": f"shapes-{task}-{split}-{seed}-{i}", "image": name, **row})
    write_jsonl(path, rows)
    return path
