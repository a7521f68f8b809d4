"""procedural.py: the testbed's image model draws what its description says, deterministically, and never the
shapes dataset's out-of-domain family; through outpaint the labelled objects stay exact."""
import numpy as np
import pytest

from outpaint import default_steps, load_pipeline, load_segmenter, outpaint
from procedural import FAMILIES, FAMILY_WORDS, Background, describe, render
from shapes import BACKGROUNDS, COLORS, shapes_sample


def test_the_words_choose_family_colour_contrast_and_scale():
    assert describe("a bold red brick wall, large") == Background("checker", COLORS["red"], 1.0, 24)
    assert describe("a faint snowy road with fine grain").family == "noise"
    assert describe("a frozen lake") == describe("a frozen lake")              # a pure function of the text
    assert describe("a green field").color == COLORS["green"]                  # a target's own colour: harder
    unknown = [describe(f"zq{i} wvx") for i in range(40)]                      # words it does not know still choose
    assert {b.family for b in unknown} == set(FAMILIES) and len({b.color for b in unknown}) > 5


def test_the_image_is_a_function_of_description_and_seed_and_the_families_differ():
    a = np.asarray(render(describe("grainy noise"), 64, 48, seed=3))
    assert a.shape == (48, 64, 3) and np.array_equal(a, np.asarray(render(describe("grainy noise"), 64, 48, seed=3)))
    assert not np.array_equal(a, np.asarray(render(describe("grainy noise"), 64, 48, seed=4)))
    images = {f: np.asarray(render(describe(f"{FAMILY_WORDS[f][0]} blue"), 64, 64, seed=0)) for f in FAMILIES}
    assert all(not np.array_equal(images[f], images[g]) for f in FAMILIES for g in FAMILIES if f < g)
    assert (images["solid"] == images["solid"][0, 0]).all() and images["checker"].reshape(-1, 3).std(0).max() > 20


def test_it_never_draws_the_out_of_domain_family():
    far = set(BACKGROUNDS) - {"pale"}                                          # stripes: only the test splits have it
    assert far and not far & set(FAMILIES) and not any(w in FAMILY_WORDS[f] for f in FAMILIES for w in far)


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
