"""verify.py: the rule (which detections are new instances) as pure functions, and the tiny OWLv2 through the real
transformers code path, its boxes in the image's frame. server.py's use of it: test_server."""
import pytest
from PIL import Image

from verify import Detection, Verifier, load_verifier, new_instances, outside_fraction, reason


def test_outside_fraction_counts_the_pixels_no_kept_box_covers():
    size = (100, 100)
    assert outside_fraction([10, 10, 20, 20], [[0, 0, 50, 50]], size) == 0.0          # inside a kept box
    assert outside_fraction([60, 60, 80, 80], [[0, 0, 50, 50]], size) == 1.0          # nowhere near one
    assert outside_fraction([40, 0, 60, 10], [[0, 0, 50, 50]], size) == pytest.approx(0.5)
    assert outside_fraction([40, 0, 60, 10], [[0, 0, 50, 50], [50, 0, 60, 5]], size) == pytest.approx(0.25)
    assert outside_fraction([90, 90, 140, 140], [], size) == 1.0                       # clipped to the image
    assert outside_fraction([120, 0, 140, 10], [], size) == 0.0                        # in OWLv2's padding only


def test_new_instances_are_confident_and_mostly_outside_the_kept_boxes():
    kept, size = [[0, 0, 50, 50]], (100, 100)
    dets = [Detection("dog", 0.9, [60, 60, 90, 90]),     # new: confident, outside
            Detection("dog", 0.9, [5, 5, 45, 45]),       # the kept dog itself
            Detection("dog", 0.1, [60, 0, 90, 30]),      # outside but not confident
            Detection("cat", 0.5, [30, 30, 70, 70])]     # a quarter of it in the kept box: mostly outside
    assert [d.box for d in new_instances(dets, kept, size, threshold=0.3)] == [[60, 60, 90, 90], [30, 30, 70, 70]]
    assert new_instances(dets, kept, size, threshold=0.95) == []
    assert reason([]) == "" and "'dog' (score 0.90)" in reason(new_instances(dets, kept, size))


def test_a_verifier_checks_only_the_categories_it_is_given():
    calls = []
    v = Verifier(lambda img, cats: calls.append(cats) or [Detection(cats[0], 0.8, [0, 0, 10, 10])])
    img = Image.new("RGB", (32, 32))
    assert v.check(img, [[16, 16, 32, 32]], []) == "" and calls == []                # rec: nothing to check
    assert v.check(img, [[16, 16, 32, 32]], ["chair"]).startswith("verifier: 1 new") and calls == [["chair"]]
    assert v.check(img, [[0, 0, 16, 16]], ["chair"]) == ""                           # the detection is the kept one


def test_the_tiny_owlv2_detects_in_the_images_frame_with_the_categories_asked():
    """OWLv2 pads an image to a square at its bottom right; the boxes come back in pixels of the image (scaled by its
    longer side), each labelled with one of the categories queried."""
    v = load_verifier("tiny-owlv2", threshold=0.0)
    img = Image.new("RGB", (120, 60), (200, 120, 40))
    dets = v.detect(img, ["red circle", "a much longer category name than sixteen characters"])
    assert len(dets) == (64 // 16) ** 2 and {d.label for d in dets} <= {"red circle",
                                                                      "a much longer category name than sixteen characters"}
    centres = [((d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2) for d in dets]
    assert all(0 <= x <= 120 and 0 <= y <= 120 for x, y in centres)   # the padded square of side 120
    assert all(0 <= d.score <= 1 for d in dets)
    with pytest.raises(ValueError, match="unknown verifier 'owl'"):
        load_verifier("owl")
