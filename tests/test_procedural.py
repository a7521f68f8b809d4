"""procedural.py: the testbed's image model draws what its description says, deterministically, and never the
shapes dataset's out-of-domain family; through outpaint the labelled objects stay exact."""
import random

import numpy as np
import pytest

from outpaint import default_steps, load_pipeline, load_segmenter, outpaint
from procedural import (COLOR_WORDS, CONTRAST_WORDS, FAMILIES, FAMILY_WORDS, SCALE_WORDS, Background, describe,
                        held_out, render)
from shapes import BACKGROUNDS, COLORS, shapes_sample


def test_the_words_choose_family_colour_contrast_and_scale():
    assert describe("a bold red brick wall, large") == Background("checker", COLOR_WORDS["red"], 1.0, 24)
    assert describe("a faint snowy road with fine grain").family == "noise"
    assert describe("a frozen lake") == describe("a frozen lake")              # a pure function of the text
    near = lambda a, b: max(abs(x - y) for x, y in zip(a, b)) <= 10           # a target's own colour: harder
    assert all(near(describe(f"a {c} field").color, COLORS[c]) for c in COLORS)
    unknown = [describe(f"zq{i} wvx") for i in range(40)]                      # words it does not know still choose
    assert {b.family for b in unknown} == set(FAMILIES) and len({b.color for b in unknown}) > 5


def test_the_image_is_a_function_of_description_and_seed_and_the_families_differ():
    a = np.asarray(render(describe("grainy noise"), 64, 48, seed=3))
    assert a.shape == (48, 64, 3) and np.array_equal(a, np.asarray(render(describe("grainy noise"), 64, 48, seed=3)))
    assert not np.array_equal(a, np.asarray(render(describe("grainy noise"), 64, 48, seed=4)))
    images = {f: np.asarray(render(describe(f"{FAMILY_WORDS[f][0]} blue"), 64, 64, seed=0)) for f in FAMILIES}
    assert all(not np.array_equal(images[f], images[g]) for f in FAMILIES for g in FAMILIES if f < g)
    assert (images["solid"] == images["solid"][0, 0]).all() and images["checker"].reshape(-1, 3).std(0).max() > 20


def test_it_never_draws_the_far_out_of_domain_families():
    far = {"stripes", "far"}                                                  # stripes: only the test splits have them
    assert far <= set(BACKGROUNDS) and not far & set(FAMILIES)
    assert not any("stripe" in w for ws in FAMILY_WORDS.values() for w in ws)


def test_the_near_out_of_domain_split_draws_its_families_at_parameters_no_description_chooses():
    rng = random.Random(0)
    held = [held_out(rng) for _ in range(200)]
    assert {b.family for b in held} == set(FAMILIES)
    assert not {b.scale for b in held} & ({10} | set(SCALE_WORDS))
    assert not {b.contrast for b in held} & ({0.6} | set(CONTRAST_WORDS))
    assert not {b.color for b in held} & set(COLOR_WORDS.values())
    (img, row), (pale, pale_row) = (shapes_sample("rec", 3, objects=(1, 1), background=b) for b in ("near", "pale"))
    assert row == pale_row and img.size == pale.size and (np.asarray(img) != np.asarray(pale)).any()   # a new ground


@pytest.mark.parametrize("description", ["a red brick wall", "busy cluttered market", "blue polka dots", "qq zz"])
def test_through_outpaint_the_objects_stay_exact(description):
    img, row = shapes_sample("ovd", 4)
    boxes = [o["bbox"] for o in row["objects"]]
    out, new_boxes = outpaint(load_pipeline("procedural"), img, boxes, description, seed=1, steps=default_steps(
        "procedural"), segmenter=load_segmenter("palette"))
    src, new = np.asarray(img), np.asarray(out)
    matte = np.asarray(load_segmenter("palette")(img)) > 0
    assert new_boxes == boxes and out.size == img.size
    assert np.array_equal(new[matte], src[matte]) and (new[~matte] != src[~matte]).any()
