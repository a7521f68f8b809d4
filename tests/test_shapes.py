"""shapes.py: the shapes dataset is deterministic, its labels match the drawn pixels, and it refuses what cannot be
drawn."""
import os

import numpy as np
import pytest

from data import read_data
from shapes import COLORS, FURNITURE, make_shapes, shapes_sample


@pytest.mark.parametrize("task", ["rec", "ovd", "isr", "math"])
def test_shapes_is_deterministic(task):
    a_img, a_row = shapes_sample(task, 5, seed=3)
    b_img, b_row = shapes_sample(task, 5, seed=3)
    assert a_row == b_row and np.array_equal(np.asarray(a_img), np.asarray(b_img))
    assert shapes_sample(task, 6, seed=3)[1] != a_row


def _box_of_color(arr, color):
    ys, xs = np.nonzero(np.all(arr == np.array(color, dtype=np.uint8), axis=-1))
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.mark.parametrize("index", range(40))
def test_shapes_labels_match_drawn_pixels(index):
    img, row = shapes_sample("ovd", index, seed=0)
    arr = np.asarray(img)
    for o in row["objects"]:
        x1, y1, x2, y2 = o["bbox"]
        assert 0 <= x1 < x2 <= img.width and 0 <= y1 < y2 <= img.height
    img, row = shapes_sample("rec", index, seed=0)
    arr = np.asarray(img)
    color = row["meta"]["expression"].split()[1]
    # the target is the only shape of its (colour, shape) pair; its colour's pixels that lie in its box give the box
    x1, y1, x2, y2 = row["solution"]
    inside = np.all(arr[y1:y2, x1:x2] == np.array(COLORS[color], dtype=np.uint8), axis=-1)
    ys, xs = np.nonzero(inside)
    assert [xs.min() + x1, ys.min() + y1, xs.max() + 1 + x1, ys.max() + 1 + y1] == row["solution"]
    img, row = shapes_sample("isr", index, seed=0)
    arr = np.asarray(img)
    for o in row["objects"]:   # furniture colours are unique per image: the colour's pixels are exactly the box
        assert _box_of_color(arr, FURNITURE[o["label"]]) == o["bbox"]


def test_shapes_math_answer_counts(tmp_path):
    for i in range(20):
        _, row = shapes_sample("math", i)
        _, ovd = shapes_sample("ovd", i)
        assert row["answer"].isdigit()


def test_make_shapes_writes_valid_jsonl(tmp_path):
    for task in ("rec", "ovd", "isr", "math"):
        path = make_shapes(task, 8, str(tmp_path), seed=1)
        samples = read_data(path, task)
        assert len(samples) == 8 and len({s.id for s in samples}) == 8


@pytest.mark.parametrize("objects", [(1, 5), (0, 1), (3, 2)])
def test_make_shapes_rejects_more_shapes_than_grid_cells(tmp_path, objects):
    with pytest.raises(ValueError, match="one per grid cell"):
        make_shapes("rec", 4, str(tmp_path), objects=objects)
    assert not any(f.endswith(".jsonl") for f in os.listdir(tmp_path))      # nothing half-written
