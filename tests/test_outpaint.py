import numpy as np
import pytest
from PIL import Image, ImageFilter

from shapes import shapes_sample
from outpaint import keep_mask, load_pipeline, outpaint, zoom_boxes


def test_keep_mask_is_the_dilated_union_of_boxes():
    m = np.asarray(keep_mask((50, 40), [[10, 10, 20, 20], [30, 5, 35, 8]], dilate=2)) > 0
    assert m[8:22, 8:22].all() and not m[7, 10] and not m[22, 10]
    assert m[3:10, 28:37].all() and m.sum() == 14 * 14 + 9 * 7
    seg = Image.new("L", (50, 40), 0)
    seg.paste(255, (12, 12, 16, 16))
    refined = np.asarray(keep_mask((50, 40), [[10, 10, 20, 20]], dilate=2, segment=seg)) > 0
    assert refined[12:16, 12:16].all() and not refined[19, 19] and refined.sum() < m.sum()


def test_zoom_boxes():
    boxes, (s, ox, oy) = zoom_boxes([[0, 0, 100, 50]], (100, 50), 2.0)
    assert s == 0.5 and ox == 25 and oy in (12, 13)
    assert boxes[0][2] - boxes[0][0] == 50 and boxes[0][3] - boxes[0][1] == 25


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


@pytest.mark.parametrize("task,index", [("ovd", 0), ("rec", 1), ("isr", 2)])
def test_pixels_inside_every_gold_box_are_unchanged(pipe, task, index):
    img, row = shapes_sample(task, index)
    boxes = [o["bbox"] for o in row["objects"]] if "objects" in row else [row["solution"]] + [
        o["bbox"] for o in row["meta"]["context_objects"]]
    out, new_boxes = outpaint(pipe, img, boxes, "a snowy forest at night", seed=3, steps=2)
    a, b = np.asarray(img), np.asarray(out)
    assert out.size == img.size and new_boxes == [list(map(float, x)) for x in boxes]
    for x1, y1, x2, y2 in boxes:
        assert np.array_equal(a[y1:y2, x1:x2], b[y1:y2, x1:x2])
    keep = np.asarray(keep_mask(img.size, boxes)) > 0
    assert (a[~keep] != b[~keep]).any(-1).mean() > 0.5          # the background was regenerated


def test_zoom_out_transforms_boxes_and_keeps_objects(pipe):
    img, row = shapes_sample("ovd", 4)
    boxes = [o["bbox"] for o in row["objects"]]
    out, new_boxes = outpaint(pipe, img, boxes, "a beach", seed=0, steps=2, zoom_out=2.0)
    assert out.size == img.size
    for b, nb in zip(boxes, new_boxes):
        assert nb[2] - nb[0] == pytest.approx((b[2] - b[0]) / 2)
    # the shrunk source is pasted exactly: compare with the same resize the function performs
    w, h = img.size
    small = img.resize((round(w / 2), round(h / 2)), Image.LANCZOS)
    ox, oy = round((w - small.width) / 2), round((h - small.height) / 2)
    x1, y1, x2, y2 = (int(v) for v in new_boxes[0])
    assert np.array_equal(np.asarray(out)[y1 + 1:y2 - 1, x1 + 1:x2 - 1],
                          np.asarray(small)[y1 + 1 - oy:y2 - 1 - oy, x1 + 1 - ox:x2 - 1 - ox])


def test_same_seed_same_image(pipe):
    img, row = shapes_sample("ovd", 5)
    boxes = [o["bbox"] for o in row["objects"]]
    a, _ = outpaint(pipe, img, boxes, "a desert", seed=7, steps=2)
    b, _ = outpaint(pipe, img, boxes, "a desert", seed=7, steps=2)
    c, _ = outpaint(pipe, img, boxes, "a desert", seed=8, steps=2)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))


def test_segmenter_refines_the_mask_inside_boxes(pipe):
    from outpaint import load_segmenter
    img, row = shapes_sample("ovd", 6)
    boxes = [o["bbox"] for o in row["objects"]]
    seg = load_segmenter("color")
    out, _ = outpaint(pipe, img, boxes, "a city", seed=1, steps=2, segmenter=seg)
    a, b = np.asarray(img), np.asarray(out)
    box_only = np.asarray(keep_mask(img.size, boxes)) > 0
    fg = (np.asarray(seg(img)) > 0) & box_only
    assert fg.any() and np.array_equal(a[fg], b[fg])    # every pixel of a labelled object kept
    refined = np.asarray(keep_mask(img.size, boxes, segment=seg(img))) > 0
    assert refined.sum() < box_only.sum()               # background inside the boxes is regenerated too
    with pytest.raises(ValueError):
        load_segmenter("nope")


def test_the_union_pipeline_sees_the_kept_pixels_in_inpaint_mode_and_keeps_them_exactly():
    """`tiny-union`: StableDiffusionXLControlNetUnionInpaintPipeline with a random ControlNetUnionModel, called as
    diffusers documents its inpainting (control mode 7, the source blacked out where it is regenerated); the canny
    pipeline gets its edge map instead, and both paste the kept pixels back bit for bit."""
    from outpaint import UNION_INPAINT_MODE, control_inputs, load_pipeline, union_control
    img, row = shapes_sample("ovd", 4)
    boxes = [o["bbox"] for o in row["objects"]]
    gen = Image.fromarray(255 - np.asarray(keep_mask(img.size, boxes)))
    ctrl = np.asarray(union_control(img, gen))
    assert not ctrl[np.asarray(gen) > 127].any() and np.array_equal(ctrl[np.asarray(gen) == 0],
                                                                     np.asarray(img)[np.asarray(gen) == 0])
    union, canny = load_pipeline("tiny-union"), load_pipeline("tiny")
    assert control_inputs(union, img, gen)["control_mode"] == [UNION_INPAINT_MODE]
    assert "control_mode" not in control_inputs(canny, img, gen)
    out, new_boxes = outpaint(union, img, boxes, "a beach", seed=1, steps=2, work_size=64)
    keep = np.asarray(keep_mask(img.size, boxes)) > 0
    assert new_boxes == [list(map(float, b)) for b in boxes]
    assert np.array_equal(np.asarray(out)[keep], np.asarray(img)[keep]) and (np.asarray(out)[~keep] != np.asarray(img)[~keep]).any()


def test_the_sam_segmenter_is_prompted_with_the_boxes_and_its_matte_refines_them():
    """`tiny-sam`: transformers' SamModel with random weights, built offline, prompted with each gold box; the matte
    is the union of the boxes' masks, deterministic, empty without a box, and outpaint keeps its pixels exactly."""
    from outpaint import load_pipeline, load_segmenter
    seg = load_segmenter("tiny-sam")
    img, row = shapes_sample("ovd", 6)
    boxes = [o["bbox"] for o in row["objects"]]
    m = seg(img, boxes)
    assert m.mode == "L" and m.size == img.size and np.array_equal(np.asarray(m), np.asarray(seg(img, boxes)))
    assert not np.asarray(seg(img, [])).any()
    assert not np.array_equal(np.asarray(m), np.asarray(seg(img, boxes[:1])))     # each box prompts its own mask
    out, new_boxes = outpaint(load_pipeline("procedural"), img, boxes, "a busy market", seed=1, steps=1, segmenter=seg)
    keep = np.asarray(keep_mask(img.size, boxes, segment=m, matte_grow=seg.grow)) > 0
    assert new_boxes == [list(map(float, b)) for b in boxes]
    assert np.array_equal(np.asarray(out)[keep], np.asarray(img)[keep])


def test_palette_matte_regenerates_the_box_around_a_shape_and_keeps_the_shape(pipe):
    """No cue to the answer: with the matte, pixels inside the box but outside the object change; the object's own
    pixels are kept exactly, in the next generation too (the matte of a synthesized image is as clean)."""
    from outpaint import load_segmenter
    seg = load_segmenter("palette")
    img, row = next((im, r) for im, r in (shapes_sample("rec", i, objects=(1, 1)) for i in range(50))
                    if "square" not in r["meta"]["expression"])
    x1, y1, x2, y2 = row["solution"]
    obj = np.asarray(seg(img))[y1:y2, x1:x2] > 0
    assert 0.3 < obj.mean() < 1.0                                   # a circle or triangle, not its box
    gen1, _ = outpaint(pipe, img, [row["solution"]], "a beach", seed=1, steps=2, segmenter=seg)
    gen2, _ = outpaint(pipe, gen1, [row["solution"]], "a forest", seed=2, steps=2, segmenter=seg)
    for before, after in ((img, gen1), (gen1, gen2)):
        a, b = np.asarray(before)[y1:y2, x1:x2], np.asarray(after)[y1:y2, x1:x2]
        assert np.array_equal(a[obj], b[obj])
        ring = ~(np.asarray(Image.fromarray(obj.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0)
        assert (a[ring] != b[ring]).any(-1).mean() > 0.5           # the box's background is new
    assert (np.asarray(seg(gen2))[y1:y2, x1:x2] > 0).sum() == obj.sum()


def test_a_box_the_matte_misses_keeps_its_pixels():
    seg = Image.new("L", (40, 40), 0)
    seg.paste(255, (2, 2, 8, 8))                          # covers the first box, not the second
    m = np.asarray(keep_mask((40, 40), [[2, 2, 8, 8], [20, 20, 30, 30]], dilate=1, segment=seg)) > 0
    assert m[20:30, 20:30].all() and not m[0, 0]


def test_control_image_is_the_canny_edge_map_of_the_kept_region():
    from outpaint import canny_control
    img, row = shapes_sample("rec", 3, objects=(1, 1))
    gen = Image.new("L", img.size, 255)
    x1, y1, x2, y2 = row["solution"]
    gen.paste(0, (x1 - 2, y1 - 2, x2 + 2, y2 + 2))            # keep the object, regenerate the rest
    edges = np.asarray(canny_control(img, gen))[..., 0] > 0
    assert edges[y1 - 2:y2 + 2, x1 - 2:x2 + 2].any()            # the object's outline is there
    outside = edges.copy()
    outside[y1 - 2:y2 + 2, x1 - 2:x2 + 2] = False
    assert not outside.any()                                     # nothing of the old background's layout


def test_one_rule_for_the_denoising_steps_of_train_py_and_server_py():
    """server.py --pipeline sdxl alone ran 8 steps where train.py's local server ran 20: both now ask default_steps."""
    from config import Config, prepare_config
    from outpaint import default_steps
    from server import ServerConfig
    assert [default_steps(p) for p in ("tiny", "tiny-union", "procedural", "sdxl", "sdxl-union", "/a/dir")] == \
        [2, 2, 1, 20, 20, 20]
    assert ServerConfig().steps is None     # resolved by serve() from --pipeline
    for pipeline in ("tiny", "tiny-union", "sdxl", "sdxl-union"):
        cfg = prepare_config(Config(algo="syn-grpo", pipeline=pipeline, device="cpu"), files=False)
        assert cfg.pipeline_steps == default_steps(pipeline)
