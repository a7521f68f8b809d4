import json
import os

import numpy as np
import pytest
from PIL import Image

from data import (BOX_FRAMES, DataError, DataPool, Sample, coco_to_samples, frame_size, from_frame, read_data,
                  smart_resize, to_frame, write_samples)


def write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(p)


@pytest.fixture
def img(tmp_path):
    Image.new("RGB", (64, 48), "white").save(tmp_path / "a.png")
    return "a.png"


# -- readers reject malformed rows, naming file and line ----------------------------------------------------------

BAD = {
    "rec": [{"problem": "q", "solution": [1, 2, 3, 4]},                       # no image
            {"image": "a.png", "solution": [1, 2, 3, 4]},                     # no problem
            {"image": "a.png", "problem": "q", "solution": [5, 2, 3, 4]},     # x2 < x1
            {"image": "a.png", "problem": "q", "solution": [1, 2, 3]},
            {"image": "a.png", "problem": "q", "solution": [1, 2, "x", 4]},
            {"image": "missing.png", "problem": "q", "solution": [1, 2, 3, 4]},
            "{not json", "[1, 2]"],
    "ovd": [{"image": "a.png", "categories": [], "objects": []},
            {"image": "a.png", "categories": ["a"], "objects": [{"bbox": [1, 2, 3, 4]}]},
            {"image": "a.png", "categories": ["a"], "objects": [{"bbox": [1, 2, 1, 4], "label": "a"}]},
            {"image": "a.png", "categories": ["a"], "objects": "x"}],
    "math": [{"image": "a.png", "answer": "3"},
             {"image": "a.png", "problem": "q", "answer": {"x": 1}}],
}


@pytest.mark.parametrize("task", ["rec", "ovd", "math"])
def test_readers_reject_each_bad_row_with_file_and_line(tmp_path, img, task):
    good = {"rec": {"image": img, "problem": "q", "solution": [1, 2, 30, 40]},
            "ovd": {"image": img, "categories": ["a"], "objects": [{"bbox": [1, 2, 30, 40], "label": "a"}]},
            "math": {"image": img, "problem": "q", "answer": "3"}}[task]
    for bad in BAD[task]:
        path = write(tmp_path, [good, good, bad])
        with pytest.raises(DataError, match=r"d\.jsonl:3: "):
            read_data(path, task)
        logged = []
        assert len(read_data(path, task, strict=False, log=logged.append)) == 2
        assert len(logged) == 1 and "d.jsonl:3" in logged[0]


def test_corrupt_image_is_a_data_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    path = write(tmp_path, [{"image": "bad.png", "problem": "q", "solution": [1, 2, 3, 4]}])
    with pytest.raises(DataError, match="d.jsonl:1: unreadable image"):
        read_data(path, "rec")


def test_ids_are_stable_and_unique(tmp_path, img):
    row = {"image": img, "problem": "q", "solution": [1, 2, 30, 40]}
    path = write(tmp_path, [row, row, dict(row, id="x")])
    assert [s.id for s in read_data(path, "rec")] == ["d-1", "d-2", "x"]
    with pytest.raises(DataError, match="duplicate id"):
        read_data(write(tmp_path, [dict(row, id="x"), dict(row, id="x")]), "rec")


def test_write_then_read_roundtrip(tmp_path, img):
    path = write(tmp_path, [{"image": img, "categories": ["a", "b"], "objects": [{"bbox": [1, 2, 30, 40], "label": "a"}]}])
    s = read_data(path, "ovd")
    out = str(tmp_path / "out.jsonl")
    write_samples(s, out, image_root=str(tmp_path))
    s2 = read_data(out, "ovd")
    assert [(x.categories, x.objects, x.width, x.height) for x in s] == [(x.categories, x.objects, x.width, x.height) for x in s2]


def test_coco_conversion_xywh_and_filter(tmp_path, img):
    coco = {"images": [{"id": 7, "file_name": img, "width": 64, "height": 48}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [{"image_id": 7, "category_id": 1, "bbox": [10, 5, 20, 10], "iscrowd": 0}]
            + [{"image_id": 7, "category_id": 2, "bbox": [i, 0, 2, 2], "iscrowd": 0} for i in range(3)]
            + [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1}]}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(coco))
    s = coco_to_samples(str(p), str(tmp_path))
    assert s[0].objects[0] == {"bbox": [10, 5, 30, 15], "label": "cat"} and len(s[0].objects) == 4
    s = coco_to_samples(str(p), str(tmp_path), max_boxes_per_category=2)
    assert [o["label"] for o in s[0].objects] == ["cat"] and s[0].categories == ["cat"]


# -- box frames ----------------------------------------------------------------------------------------------------

def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as ref
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(20, 3000, 2))
        for lo, hi in ((28 * 28 * 4, 28 * 28 * 16), (3136, 12845056), (256 * 28 * 28, 1280 * 28 * 28)):
            assert smart_resize(h, w, 28, lo, hi) == ref(h, w, 28, lo, hi)


def test_box_frame_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(2000):
        W, H = (int(v) for v in rng.integers(50, 4000, 2))
        h, w = smart_resize(H, W)
        box = sorted(rng.uniform(0, W, 2).tolist()) + sorted(rng.uniform(0, H, 2).tolist())
        box = [box[0], box[2], box[1], box[3]]
        for frame in BOX_FRAMES:          # each frame's round trip through the one pair of functions
            extent = frame_size(frame, (w, h))
            assert np.allclose(from_frame(to_frame(box, (W, H), extent), extent, (W, H)), box, rtol=0, atol=1e-9)
    # the direction matters: a box of a 2x larger original is halved in the input frame
    assert to_frame([20, 20, 40, 40], (200, 100), (100, 50)) == [10, 10, 20, 20]
    assert frame_size("rel1000", (100, 50)) == (1000, 1000)                      # relative: any input size
    assert to_frame([20, 20, 40, 40], (200, 100), frame_size("rel1000", (100, 50))) == [100, 200, 200, 400]


# -- shapes -----------------------------------------------------------------------------------------------------------

# -- data pool -----------------------------------------------------------------------------------------------------

def _pool():
    return DataPool([Sample(id=f"s{i}", task="rec", image=f"/x/{i}.png", width=10, height=10, problem="q",
                            solution=[1, 1, 5, 5]) for i in range(3)])


def test_pool_replace_lineage_and_state(tmp_path):
    pool = _pool()
    new = pool.replace("s1", Sample(id="g1", task="rec", image="/syn/1.png", width=10, height=10, problem="q",
                                    solution=[1, 1, 5, 5], meta={"description": "a beach"}))
    assert pool.get(1).id == "g1" and new.source_id == "s1" and new.generation == 1
    new2 = pool.replace("g1", Sample(id="g2", task="rec", image="/syn/2.png", width=10, height=10, problem="q",
                                     solution=[1, 1, 5, 5]))
    assert pool.get(1) is new2 and new2.parent_id == "g1" and new2.generation == 2 and new2.source_id == "s1"
    assert pool.lineage["s1"] == ["s1", "g1", "g2"]
    assert pool.stats()["pool_synth_frac"] == pytest.approx(1 / 3)
    path = str(tmp_path / "pool.json")
    pool.save(path)
    loaded = DataPool.load(path)
    assert loaded.get(1) == new2 and loaded.lineage == pool.lineage and len(loaded) == 3
    assert loaded.samples["g1"].image == "/syn/1.png"     # history is kept: every sample ever placed
    with pytest.raises(ValueError):
        pool.replace("s0", Sample(id="g1", task="rec", image="", problem="q", solution=[1, 1, 2, 2]))


def test_cli_bad_input_gets_one_line(tmp_path):
    from data import main
    with pytest.raises(SystemExit, match="no such file"):
        main(["check", str(tmp_path / "missing.jsonl"), "--task", "rec"])
    with pytest.raises(SystemExit, match="shapes per image"):
        main(["shapes", "--objects", "3", "9", "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()


def test_coco_rec_rows_get_the_other_objects_of_their_image_as_context(tmp_path):
    from data import main
    Image.new("RGB", (100, 100), "white").save(tmp_path / "COCO_train2014_000000000001.jpg")
    coco = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 100, "height": 100}],
            "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "plate"}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0},
                            {"image_id": 1, "category_id": 2, "bbox": [50, 50, 30, 30], "iscrowd": 0},
                            {"image_id": 1, "category_id": 2, "bbox": [0, 0, 99, 99], "iscrowd": 1}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    (tmp_path / "rec.jsonl").write_text(json.dumps({"image": "COCO_train2014_000000000001.jpg",
                                                    "problem": "the cup left of the plate", "solution": [10, 10, 30, 30]}) + "\n")
    main(["context", str(tmp_path / "rec.jsonl"), "--coco", str(tmp_path / "instances.json"), "--out", str(tmp_path / "ctx.jsonl")])
    (s,) = read_data(str(tmp_path / "ctx.jsonl"), "rec")
    assert s.meta["context_objects"] == [{"bbox": [50, 50, 80, 80], "label": "plate"}]      # not the referent, not crowd
    assert s.gold_boxes() == [[10, 10, 30, 30], [50, 50, 80, 80]]                         # both kept when outpainting


# -- the formats users have: VLM-R1's JSONL, Hugging Face datasets, several sources ---------------------------------

def vlm_r1(img, question, answer, **kw):
    return {"image": img, "conversations": [{"from": "human", "value": "<image>" + question},
                                            {"from": "gpt", "value": answer}], **kw}


def test_vlm_r1_jsonl_maps_each_task_as_vlm_r1_defines_it(tmp_path, img):
    rec = write(tmp_path, [vlm_r1(img, "Please provide the bounding box coordinate of the region this sentence "
                                       "describes: the cat.", "[1.5, 2, 30, 40]", id=7),
                           vlm_r1([img], "q", '<answer>{"bbox_2d": [3, 4, 5, 6]}</answer>')], "rec.jsonl")
    a, b = read_data(rec, "rec")
    assert (a.id, a.problem, a.solution) == ("7", "Please provide the bounding box coordinate of the region this "
                                                  "sentence describes: the cat.", [1.5, 2.0, 30.0, 40.0])
    assert (b.id, b.solution) == ("rec-2", [3.0, 4.0, 5.0, 6.0])
    listed = 'Please carefully check the image and detect the following objects: ["cat", "dog"]. Output ...'
    ovd = write(tmp_path, [
        vlm_r1(img, listed, '```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "cat"}]\n```'),
        vlm_r1(img, "Find things.", '[{"bbox_2d": [1, 2, 30, 40], "label": "bird"}]'),
        vlm_r1(img, listed, "None")], "ovd.jsonl")
    listed_cats, unlisted, empty = read_data(ovd, "ovd")
    assert listed_cats.categories == ["cat", "dog"] and listed_cats.objects == [{"bbox": [1.0, 2.0, 30.0, 40.0], "label": "cat"}]
    assert unlisted.categories == ["bird"] and empty.objects == [] and empty.categories == ["cat", "dog"]
    (m,) = read_data(write(tmp_path, [vlm_r1(img, "How many?", "<answer>3</answer>")], "m.jsonl"), "math")
    assert (m.problem, m.answer) == ("How many?", "3")


def test_bad_vlm_r1_rows_get_file_and_line(tmp_path, img):
    good = vlm_r1(img, "q", "[1, 2, 30, 40]")
    for bad in ({"image": img, "conversations": [{"from": "human", "value": "q"}]},    # no answer turn
                vlm_r1(img, "q", "a box"), vlm_r1([img, img], "q", "[1, 2, 30, 40]"),   # no box; two images
                vlm_r1(img, "q", "[30, 2, 1, 40]")):
        with pytest.raises(DataError, match=r"d\.jsonl:2: "):
            read_data(write(tmp_path, [good, bad]), "rec")
    with pytest.raises(DataError, match=r"d\.jsonl:2: the answer must be a JSON list"):
        read_data(write(tmp_path, [vlm_r1(img, "detect the following objects: [\"cat\"].", "[]"),
                                   vlm_r1(img, "q", "cat at left")]), "ovd")


def hf_dataset(tmp_path):
    """EasyR1's columns (images embedded as `datasets` stores them, problem, answer), as a saved dataset dir."""
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (40 + 8 * i, 32), (30 * i, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"images": [[im] for im in images], "problem": ["<image>How many?"] * 3,
                                     "answer": ["1", "2", "3"]},
                                    features=datasets.Features({"images": datasets.Sequence(datasets.Image()),
                                                                "problem": datasets.Value("string"),
                                                                "answer": datasets.Value("string")}))
    return ds


def test_hugging_face_datasets_load_from_disk_parquet_and_arrow(tmp_path):
    ds = hf_dataset(tmp_path)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "geo.parquet"))
    cache = str(tmp_path / "img")
    (arrow,) = [str(p) for p in (tmp_path / "saved").glob("*.arrow")]    # save_to_disk's shard: an arrow file
    sources = [str(tmp_path / "saved"), str(tmp_path / "geo.parquet"), arrow]
    for source in sources:
        samples = read_data(source, "math", image_dir=cache)
        assert [(s.problem, s.answer, s.width) for s in samples] == [("How many?", str(i + 1), 40 + 8 * i) for i in range(3)]
        assert all(os.path.dirname(s.image) == cache for s in samples)
    assert len(os.listdir(cache)) == 3            # embedded images are written once, named by their content


def test_hub_dataset_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"nobody/nothing@train: cannot load the dataset: .*offline"):
        read_data("nobody/nothing@train", "math", image_dir=str(tmp_path))


def test_several_sources_with_their_image_roots(tmp_path):
    for d in ("A", "B"):
        (tmp_path / d).mkdir()
        Image.new("RGB", (20, 20)).save(tmp_path / d / "x.png")
    rows = [vlm_r1("x.png", "q", "[1, 2, 10, 12]", id=1)]
    a, b = write(tmp_path, rows, "a.jsonl"), write(tmp_path, rows, "b.jsonl")
    samples = read_data(f"{a},{b}", "rec", image_root=f"{tmp_path / 'A'},{tmp_path / 'B'}")
    assert [s.id for s in samples] == ["a/1", "b/1"]
    assert [s.image for s in samples] == [str(tmp_path / "A" / "x.png"), str(tmp_path / "B" / "x.png")]
    with pytest.raises(DataError, match="3 folders for 2 data sources"):
        read_data(f"{a},{b}", "rec", image_root=f"{tmp_path},{tmp_path},{tmp_path}")


def test_data_py_check_and_convert_take_every_format(tmp_path, img, capsys):
    from data import main
    src = write(tmp_path, [vlm_r1(img, "q", "[1, 2, 30, 40]"), "{torn"], "v.jsonl")
    with pytest.raises(SystemExit) as e:
        main(["check", src, "--task", "rec"])
    assert e.value.code == 1 and "v.jsonl:2: invalid JSON" in capsys.readouterr().out
    out = str(tmp_path / "conv" / "ours.jsonl")
    os.makedirs(os.path.dirname(out))
    main(["convert", src, "--task", "rec", "--out", out])
    (s,) = read_data(out, "rec")
    assert s.solution == [1.0, 2.0, 30.0, 40.0] and os.path.samefile(s.image, tmp_path / img)
    hf_dataset(tmp_path).save_to_disk(str(tmp_path / "saved"))
    main(["convert", str(tmp_path / "saved"), "--task", "math", "--out", out])
    assert len(read_data(out, "math")) == 3 and len(os.listdir(tmp_path / "conv" / "images")) == 3
    with pytest.raises(SystemExit, match="nope.jsonl: no such file"):
        main(["check", "nope.jsonl", "--task", "rec"])


# -- --prompt-template ---------------------------------------------------------------------------------------------


def test_a_box_outside_its_image_is_a_bad_row_everywhere_data_enters(tmp_path, img):
    """The same rule (data.box_problem) in data.py check, in training's reader and at the data server's door."""
    from data import box_problem
    src = write(tmp_path, [{"image": img, "problem": "q", "solution": [1, 1, 30, 40]},
                           {"image": img, "problem": "q", "solution": [150, 150, 900, 900]},
                           {"image": img, "categories": ["a"], "objects": [{"bbox": [-20, 0, 5, 5], "label": "a"}]}])
    rows = read_data(src, "rec", strict=False, log=(bad := []).append)
    assert len(rows) == 1 and "lies outside the" in bad[0] and ":2:" in bad[0]
    assert box_problem([0, 0, 100.5, 64], (100, 64)) is None                 # COCO's rounding past the edge
    assert box_problem([5, 5, 4, 9], (0, 0)).endswith("with x2 > x1 and y2 > y1")
