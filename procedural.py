"""A testbed image model whose output follows its description: `--pipeline procedural`.

On a CPU the random-weight diffusion pipeline draws the same speckle whatever it is told, so a description cannot
change what the policy next trains on, and Syn-GRPO's loop (Eq. 8 chooses a description; its image joins the pool)
has nothing to act through. This model draws a background from the words of its description, deterministically in
(description, seed), in milliseconds: the family of the pattern (solid, gradient, noise, clutter, checker, dots),
its colour, contrast and scale. Words it does not know still choose, by a hash, so whatever the policy writes gives
an image. Some descriptions make the task harder (a background in a target's own colour, busy clutter) and some
easier (a plain pale one): a description changes difficulty, which is what the paper's method needs to matter.

It never draws stripes: the shapes dataset's far out-of-domain families (shapes.BACKGROUNDS) stay ones the
synthesizer cannot make; its near out-of-domain family is this model's families at parameters its words never
choose (`held_out`). It is called exactly as the diffusers pipelines are (outpaint.outpaint pastes the kept pixels
back). A leaf module: its colour words carry their own RGB (near the shapes' palette: a red wall hides a red shape).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from PIL import Image, ImageDraw

FAMILIES = ("solid", "gradient", "noise", "clutter", "checker", "dots")

# word -> what it sets; the first word of a description that sets an attribute decides it
FAMILY_WORDS = {
    "solid": ("plain", "solid", "room", "wall", "field", "lake", "empty", "clear"),
    "gradient": ("gradient", "sky", "beach", "desert", "sunset", "dawn", "fading", "horizon"),
    "noise": ("noise", "noisy", "grainy", "snowy", "snow", "sand", "sandy", "gravel", "grassy", "grass", "fog", "road"),
    "clutter": ("clutter", "cluttered", "busy", "crowded", "market", "street", "messy", "toys", "city"),
    "checker": ("checker", "checkered", "tiles", "tiled", "brick", "chess", "grid", "mosaic"),
    "dots": ("dots", "dotted", "spotted", "confetti", "polka", "bubbles", "stars", "leaves"),
}
COLOR_WORDS = {"red": (215, 45, 45), "green": (45, 165, 65), "blue": (45, 85, 215), "yellow": (230, 195, 35),
               "white": (245, 245, 245), "snowy": (240, 242, 246), "frozen": (205, 225, 240), "grey": (150, 150, 150),
               "gray": (150, 150, 150), "dark": (45, 45, 50), "black": (20, 20, 20), "night": (25, 30, 60),
               "pink": (240, 170, 200), "brown": (130, 90, 60), "brick": (165, 70, 50), "purple": (140, 80, 170),
               "orange": (240, 150, 50), "sunny": (250, 225, 140), "sandy": (225, 205, 160), "grassy": (90, 160, 80),
               "pale": (225, 225, 215), "sky": (150, 195, 240)}
CONTRAST_WORDS = {0.25: ("faint", "soft", "subtle", "calm", "smooth", "quiet"),
                  1.0: ("bold", "vivid", "busy", "bright", "harsh", "sharp", "strong", "chaotic")}
SCALE_WORDS = {4: ("fine", "tiny", "small", "thin", "dense"), 24: ("large", "big", "wide", "huge", "coarse")}


@dataclass(frozen=True)
class Background:
    family: str
    color: tuple          # RGB of the ground
    contrast: float       # 0..1: how far the pattern's second colour is from the ground
    scale: int            # pixels of the pattern's unit


def describe(description: str) -> Background:
    """What a description draws: each attribute from its first word that sets it, else (family, colour) by a hash of
    the whole description, contrast 0.6, scale 10. A pure function: the same text, the same background."""
    words = re.findall(r"[a-z]+", description.lower())
    pick = lambda table: next((key for w in words for key, ws in table.items() if w in ws), None)
    digest = int(hashlib.sha256(description.encode()).hexdigest(), 16)
    family = pick(FAMILY_WORDS) or FAMILIES[digest % len(FAMILIES)]
    color = next((COLOR_WORDS[w] for w in words if w in COLOR_WORDS), None)
    if color is None:
        palette = sorted(COLOR_WORDS.values())
        color = palette[(digest // len(FAMILIES)) % len(palette)]
    return Background(family, tuple(color), pick(CONTRAST_WORDS) or 0.6, pick(SCALE_WORDS) or 10)


HELD_OUT_SCALES = (6, 14, 18)  # pattern units no description chooses (SCALE_WORDS give 4 or 24, else 10)


def held_out(rng) -> Background:
    """A background of this model's families at parameters no description chooses (the near out-of-domain split):
    any RGB colour (its words name 24 fixed ones), a contrast in [0.3, 0.9] (its words give 0.25, 0.6 or 1.0) and a
    scale of HELD_OUT_SCALES. rng: a random.Random."""
    color = tuple(rng.randint(0, 255) for _ in range(3))
    return Background(rng.choice(FAMILIES), color, round(rng.uniform(0.3, 0.9), 3), rng.choice(HELD_OUT_SCALES))


def render(bg: Background, width: int, height: int, seed: int) -> Image.Image:
    """The background as an RGB image, deterministic in (bg, size, seed)."""
    rng = np.random.default_rng(seed)
    ground = np.array(bg.color, dtype=np.float32)
    away = np.where(ground > 127, -1.0, 1.0)                        # the second colour: lighter or darker
    second = np.clip(ground + away * bg.contrast * 170 + rng.normal(0, 20, 3), 0, 255)
    arr = np.broadcast_to(ground, (height, width, 3)).copy()
    yy, xx = np.mgrid[0:height, 0:width]
    if bg.family == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx / max(1, width) + np.sin(angle) * yy / max(1, height))
        t = (t - t.min()) / max(1e-6, t.max() - t.min())
        arr = ground + (second - ground) * t[..., None]
    elif bg.family == "noise":
        coarse = rng.normal(0, 1, (height // bg.scale + 2, width // bg.scale + 2, 1))
        cells = coarse[yy // bg.scale, xx // bg.scale]
        arr = ground + cells * bg.contrast * 60
    elif bg.family == "checker":
        arr = np.where((((xx // bg.scale) + (yy // bg.scale)) % 2 == 0)[..., None], ground, second)
    if bg.family in ("clutter", "dots"):
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        n = int(width * height / (bg.scale * bg.scale * (3 if bg.family == "dots" else 6)))
        for _ in range(min(n, 400)):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            r = bg.scale / 2 if bg.family == "dots" else rng.uniform(0.5, 2.0) * bg.scale
            fill = second if bg.family == "dots" or rng.random() < 0.5 else rng.integers(0, 256, 3)
            shape = draw.ellipse if bg.family == "dots" or rng.random() < 0.5 else draw.rectangle
            shape([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in fill))
        return image
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


class ProceduralPipeline:
    """Called as the diffusers inpainting pipelines are (outpaint.outpaint): the whole canvas is drawn from the
    prompt, the generator's seed picks the pattern's randomness; the mask, control image, steps and guidance are
    accepted and unused (outpaint pastes the kept pixels back over the result)."""

    def __call__(self, prompt: str, height: int, width: int, generator=None, **unused):
        seed = generator.initial_seed() if generator is not None else 0
        return SimpleNamespace(images=[render(describe(prompt), width, height, seed)])

    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def to(self, device):
        return self
