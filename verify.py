"""The synthesis verifier (ours, beyond the paper; opt-in: `--verify-synthesis owlv2`): an outpainted image is dropped
when its new background holds a confident detection of a labelled category outside the kept boxes.

Why: outpainting keeps the gold boxes and regenerates everything else, so for OVD and ISR a new background can add
an instance of a labelled class ("a living room" next to a kept "chair" may well draw another chair). The gold
labels then miss it, and the detection reward punishes the policy for finding it. Neither Syn-GRPO nor its peers
check; an open-vocabulary detector asked for exactly the sample's categories can.

    from verify import load_verifier
    verifier = load_verifier("owlv2")                  # or "tiny-owlv2": random weights, built offline (CPU, tests)
    reason = verifier.check(new_image, kept_boxes, ["chair", "dog"])   # "" = keep it

The data server runs it on each finished image of a job that names its categories (server.py `--verify-synthesis`);
a dropped job is reported as status "dropped" with the reason, and the trainer counts it (`jobs_dropped`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from common import CACHE, atomic_dir, built_once
from outpaint import byte_clip_tokenizer

OWLV2_CHECKPOINT = "google/owlv2-base-patch16-ensemble"   # OWLv2's smallest: 155M parameters, input side 960
VERIFIERS = ("", "owlv2", "tiny-owlv2")
# A detection counts at this sigmoid score or above (ours: OWLv2's model card lists detections from 0.1; we ask for a
# confident one, since a false drop costs an image and a false keep costs one incomplete label)
VERIFY_THRESHOLD = 0.3
OUTSIDE = 0.5   # a detection is a new instance when more than half of its area lies outside every kept box
TINY_OWLV2_VERSION = 1   # bump when the tiny OWLv2 changes: the cached one carries it in its directory name
TINY_OWLV2_SIZE = 64     # the tiny OWLv2's input side (OWLv2-base's is 960)


@dataclass
class Detection:
    label: str
    score: float
    box: list     # [x1, y1, x2, y2] in the image's pixels


# ----------------------------------------------------------------------------------------------------
# The rule (pure)


def outside_fraction(box: list, kept: list, size: tuple) -> float:
    """The share of `box`'s pixels inside the image that no box of `kept` covers (boxes [x1, y1, x2, y2] in pixels
    of an image of `size` (w, h)); 0.0 for a box with no pixel in the image (OWLv2 also detects in its padding)."""
    w, h = size
    covered = np.zeros((h, w), bool)
    for x1, y1, x2, y2 in kept:
        covered[max(0, int(y1)):max(0, int(np.ceil(y2))), max(0, int(x1)):max(0, int(np.ceil(x2)))] = True
    x1, y1, x2, y2 = (max(0, int(box[0])), max(0, int(box[1])), min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3]))))
    if x2 <= x1 or y2 <= y1:
        return 0.0
    return float(1.0 - covered[y1:y2, x1:x2].mean())


def new_instances(detections: list[Detection], kept: list, size: tuple, threshold: float = VERIFY_THRESHOLD,
                  outside: float = OUTSIDE) -> list[Detection]:
    """The detections that are confident (score >= threshold) and mostly outside the kept boxes: objects of a
    labelled category that the new background added, which the kept labels do not cover."""
    return [d for d in detections if d.score >= threshold and outside_fraction(d.box, kept, size) > outside]


def reason(found: list[Detection]) -> str:
    """One line saying why an image is dropped ("" = keep it)."""
    if not found:
        return ""
    top = max(found, key=lambda d: d.score)
    return (f"verifier: {len(found)} new unlabelled instance(s) outside the kept boxes, e.g. {top.label!r} "
            f"(score {top.score:.2f}) at {[round(v) for v in top.box]}")


# ----------------------------------------------------------------------------------------------------
# The detector: OWLv2 from transformers (no extra package), or its random-weight twin


def build_tiny_owlv2(out_dir: str, seed: int = 0) -> str:
    """A random-weight OWLv2 (transformers' Owlv2ForObjectDetection, ~60k parameters, input side TINY_OWLV2_SIZE)
    and its processor with a byte-level CLIP tokenizer, saved to out_dir (atomic): `tiny-owlv2` runs the real
    text-queried code path on a CPU, nothing downloaded."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor
    tok = byte_clip_tokenizer(max_length=16)    # OWLv2's text side holds 16 positions
    cfg = Owlv2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=TINY_OWLV2_SIZE, patch_size=16),
        projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Owlv2ForObjectDetection(cfg).eval()
    s = TINY_OWLV2_SIZE
    proc = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": s, "width": s}), tokenizer=tok)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
    return out_dir


@dataclass
class Verifier:
    """An open-vocabulary detector and the rule that turns its detections into a verdict."""
    detect: object                         # (image, categories) -> list[Detection]
    threshold: float = VERIFY_THRESHOLD

    def check(self, image: Image.Image, kept: list, categories: list[str]) -> str:
        """Why `image` must be dropped ("" = keep it): a confident detection of one of `categories` mostly outside
        the `kept` boxes. No categories: nothing to check."""
        if not categories:
            return ""
        return reason(new_instances(self.detect(image, categories), kept, image.size, self.threshold))


def owlv2_detector(name: str, device: str = "cpu"):
    """OWLv2 queried with the category names. `owlv2`: OWLV2_CHECKPOINT from the Hub; `tiny-owlv2`: random weights,
    built offline and cached."""
    from transformers import Owlv2ForObjectDetection, Owlv2Processor
    path = (built_once(os.path.join(CACHE, "verifiers", f"tiny-owlv2-v{TINY_OWLV2_VERSION}"), build_tiny_owlv2)
            if name == "tiny-owlv2" else OWLV2_CHECKPOINT)
    model, proc = Owlv2ForObjectDetection.from_pretrained(path).to(device).eval(), Owlv2Processor.from_pretrained(path)

    @torch.no_grad()
    def detect(img: Image.Image, categories: list[str]) -> list[Detection]:
        img = img.convert("RGB")
        inputs = proc(text=[list(categories)], images=img, return_tensors="pt", truncation=True).to(device)
        out = model(**inputs)
        side = max(img.size)   # OWLv2 pads the image to a square at its bottom right: boxes are in that square's frame
        r = proc.image_processor.post_process_object_detection(out, threshold=0.0, target_sizes=[(side, side)])[0]
        return [Detection(categories[int(k)], float(s), [float(v) for v in b])
                for s, k, b in zip(r["scores"].cpu(), r["labels"].cpu(), r["boxes"].cpu())]
    return detect


def load_verifier(name: str = "", device: str = "cpu", threshold: float = VERIFY_THRESHOLD) -> Verifier | None:
    """The synthesis verifier, or None when `name` is ''."""
    if not name:
        return None
    if name in ("owlv2", "tiny-owlv2"):
        return Verifier(owlv2_detector(name, device), threshold)
    raise ValueError(f"unknown verifier {name!r}; expected one of {', '.join(map(repr, VERIFIERS))}")
