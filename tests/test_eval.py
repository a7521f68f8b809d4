import json
import os
import random

import numpy as np
import pytest
from PIL import Image

import eval as E
from data import DataPool, Sample, read_data
from shapes import make_shapes
from test_rewards import pycoco_map_multi, random_case


def test_dataset_map_equals_pycocotools_on_randomized_sets():
    rng = random.Random(1)
    for _ in range(60):
        cases = [random_case(rng) for _ in range(rng.randint(1, 5))]
        gts, dts = [c[0] for c in cases], [c[1] for c in cases]
        if rng.random() < 0.3:
            dts[0] = []                                     # an image with no prediction at all
        assert E.R.coco_map_dataset(gts, dts) == pytest.approx(pycoco_map_multi(gts, dts), abs=1e-6)


def _ovd(i, objects):
    return Sample(id=str(i), task="ovd", image="", width=100, height=100, categories=sorted({o["label"] for o in objects}),
                  objects=objects)


def test_gp_gr_pooled_hand_case():
    s = [_ovd(0, [{"bbox": [0, 0, 10, 10], "label": "a"}, {"bbox": [20, 0, 30, 10], "label": "b"}]),
         _ovd(1, [{"bbox": [0, 0, 10, 10], "label": "a"}])]
    preds = {"0": [{"bbox": [0, 0, 10, 10], "label": "a"}, {"bbox": [20, 0, 30, 10], "label": "a"}],   # 1 of 2
             "1": [{"bbox": [1, 1, 10, 10], "label": "a"}, {"bbox": [0, 0, 10, 10], "label": "a"},
                   {"bbox": [50, 50, 60, 60], "label": "a"}]}                                        # 1 of 3
    m = E.score_split("ovd", s, preds)
    assert m["GP"] == pytest.approx(2 / 5) and m["GR"] == pytest.approx(2 / 3)


def test_rec_accuracy_is_strict_iou_over_half():
    s = [Sample(id=str(i), task="rec", image="", width=100, height=100, problem="q", solution=[0, 0, 10, 10]) for i in range(3)]
    preds = {"0": [0, 0, 10, 10], "1": [0, 0, 20, 10]}      # IoU 1 and exactly 0.5; "2" missing
    m = E.score_split("rec", s, preds)
    assert m["accuracy"] == pytest.approx(1 / 3) and m["mean_iou"] == pytest.approx(0.5)


def test_math_choice_normalisation():
    assert [E.normalise_choice(x) for x in ["(B)", "B.", "b", "B) 5", "option c", "12"]] == ["B", "B", "B", "B", "C", "12"]
    s = [Sample(id="0", task="math", image="", problem="q", answer="B"), Sample(id="1", task="math", image="", problem="q", answer="0.5")]
    assert E.score_split("math", s, {"0": "(B)", "1": "\\frac{1}{2}"})["accuracy"] == 1.0


def test_score_command_on_hostile_predictions(tmp_path, shapes_dir):
    gold = make_shapes("ovd", 6, shapes_dir)
    samples = read_data(gold, "ovd")
    rows = ['{"id": "%s", "completion": "<answer>[{\\"bbox_2d\\": [1, 2, 3]}]</answer>"}' % samples[0].id,
            json.dumps({"id": samples[1].id, "boxes": [[5, 5, 1, 1], "x", [0, 0, 10, 10]], "labels": ["circle", 3]}),
            json.dumps({"id": samples[2].id, "completion": None}), "not json", json.dumps({"no": "id"}),
            json.dumps({"id": samples[3].id, "boxes": [o["bbox"] for o in samples[3].objects],
                        "labels": [o["label"] for o in samples[3].objects]}),
            json.dumps({"id": samples[4].id, "completion": "<answer>" + "[" * 10000 + "</answer>"})]
    pred = tmp_path / "p.jsonl"
    pred.write_text("\n".join(rows) + "\n")
    res = E.score_command("ovd", gold, str(pred), out_dir=str(tmp_path / "o"), allow_partial=True)   # 1 row missing
    (m,) = res.values()
    assert 0 < m["mAP"] < 1 and 0 < m["GR"] < 1
    assert (tmp_path / "o" / "results.md").read_text().startswith("| split | mAP")


def test_parse_prediction_rescales_raw_completions_from_their_box_frame():
    s = Sample(id="0", task="rec", image="", width=200, height=100, problem="q", solution=[20, 10, 100, 50])
    row = {"id": "0", "completion": "<answer>[10, 5, 50, 25]</answer>", "frame_size": [100, 50]}
    assert E.parse_prediction(row, s) == [20, 10, 100, 50]
    legacy = {"id": "0", "completion": row["completion"], "input_size": [100, 50]}    # rows saved before frame_size
    assert E.parse_prediction(legacy, s) == [20, 10, 100, 50]
    other = {"id": "0", "completion": "<answer>[100, 100, 500, 500]</answer>"}          # another system's, no size
    assert E.parse_prediction(other, s, box_frame="rel1000") == [20, 10, 100, 50]     # 0-1000 of the image


@pytest.mark.slow
def test_evaluate_tiny_model_end_to_end_both_backends(tmp_path, shapes_dir, tiny, vllm_engine, monkeypatch):
    data = make_shapes("rec", 6, shapes_dir, split="test")
    res = E.evaluate(E.EvalConfig(model="tiny", task="rec", data=(data,), out_dir=str(tmp_path / "hf"), max_new_tokens=16,
                              batch_size=4))
    (m,) = res.values()
    assert m["n"] == 6 and 0 <= m["accuracy"] <= 1
    preds = [json.loads(l) for l in open(tmp_path / "hf" / f"predictions_{os.path.basename(data)[:-6]}.jsonl")]
    assert len(preds) == 6 and all("frame_size" in p for p in preds)
    # re-scoring the saved predictions gives the same numbers
    again = E.score_command("rec", data, str(tmp_path / "hf" / f"predictions_{os.path.basename(data)[:-6]}.jsonl"))
    assert list(again.values())[0] == m
    # vLLM backend: reuse the session's engine instead of starting a second one in this process
    import rollout
    monkeypatch.setattr(rollout, "VLLMRollout", lambda *a, **k: vllm_engine)
    monkeypatch.setattr(rollout, "load_policy", lambda *a, **k: pytest.fail("the vLLM path loaded the HF weights"))
    res = E.evaluate(E.EvalConfig(model="tiny", task="rec", data=(data,), out_dir=str(tmp_path / "v"), backend="vllm",
                              max_new_tokens=16))
    assert list(res.values())[0]["n"] == 6


def test_evaluation_asks_in_the_math_format_the_model_was_trained_with(tmp_path, shapes_dir, monkeypatch):
    data = make_shapes("math", 2, shapes_dir, split="test")
    seen = []

    def predict(engine, processor, samples, algo, max_new_tokens, batch_size=16, math_format="boxed", template=""):
        seen.append(math_format)
        return [{"id": s.id, "completion": "\\boxed{1}"} for s in samples]
    monkeypatch.setattr(E, "predict", predict)
    E.main(["--task", "math", "--data", data, "--math-format", "think", "--out-dir", str(tmp_path)])
    E.main(["--task", "math", "--data", data, "--out-dir", str(tmp_path)])
    assert seen == ["think", "boxed"]


def test_plot_and_gallery(tmp_path, shapes_dir):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(30):
            f.write(json.dumps({"step": s, "reward": s / 30, "entropy": 1 - s / 60, "diversity": 0.3, "diversity_smoothed": 0.2}) + "\n")
    paths = E.plot_command(str(run))
    assert {os.path.basename(p) for p in paths} == {"curve_reward.png", "curve_entropy.png", "curve_diversity.png",
                                                    "curve_diversity_smoothed.png"}
    # what is plotted: the values per step, and a trailing mean that a constant leaves constant at both ends (the
    # zero-padded mean it replaced drew 0.2 at the ends of a constant 0.3)
    curves = E.curves(E.read_jsonl(str(run / "metrics.jsonl")))
    x, y, smooth = curves["diversity"]
    assert list(x) == list(range(30)) and np.allclose(y, 0.3) and np.allclose(smooth, 0.3)
    x, y, smooth = curves["reward"]   # k = 30 // 20 = 1: the values themselves
    assert np.allclose(smooth, np.arange(30) / 30)
    assert np.allclose(E.trailing_mean([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    samples = read_data(make_shapes("rec", 3, shapes_dir), "rec")
    pool = DataPool(samples)
    for gen in range(2):                       # two synthesized generations of the first sample
        src = pool.get(0)
        img = Image.open(src.image).convert("RGB").rotate(180)
        path = str(tmp_path / f"syn{gen}.png")
        img.save(path)
        pool.replace(src.id, Sample(id=f"syn{gen}", task="rec", image=path, width=src.width, height=src.height,
                                    problem=src.problem, solution=src.solution, meta={"step": 10 * (gen + 1)}))
    pool.save(str(run / "pool.json"))
    g = E.gallery_command(str(run))
    assert os.path.getsize(g) > 3000
    assert Image.open(g).size[0] > Image.open(g).size[1]     # one row, three columns
    wide = Image.open(g).size[0]
    assert Image.open(E.gallery_command(str(run), cols=2)).size[0] < wide   # the original and its first generation


def test_score_reports_its_coverage_and_stops_below_full_unless_asked(tmp_path, shapes_dir, capsys):
    gold = make_shapes("rec", 6, shapes_dir)
    samples = read_data(gold, "rec")
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps({"id": samples[0].id, "boxes": [samples[0].solution]}) + "\n"
                    + json.dumps({"id": "stranger", "boxes": [[0, 0, 1, 1]]}) + "\n")
    with pytest.raises(SystemExit) as e:
        E.main(["score", "--task", "rec", "--data", gold, "--predictions", str(pred)])
    assert "predictions for 1 of 6 gold rows: 5 missing" in str(e.value) and "1 ids not in the gold file" in str(e.value)
    (m,) = E.main(["score", "--task", "rec", "--data", gold, "--predictions", str(pred), "--allow-partial"]).values()
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(1 / 6)        # the missing rows count as wrong
    assert "coverage: 1 of 6 gold rows have a prediction; 5 missing, 1 unknown ids" in capsys.readouterr().err


def test_score_needs_no_image_when_rows_give_their_size_and_refuses_an_unscorable_split(tmp_path, shapes_dir):
    """Predictions in original pixels are scored without the images when the gold rows carry width and height;
    a gold file with no scorable row, or predictions that match no row, stop with one line instead of n = 0."""
    gold = make_shapes("ovd", 6, shapes_dir)
    samples = read_data(gold, "ovd")
    pred = tmp_path / "p.jsonl"
    pred.write_text("".join(json.dumps({"id": s.id, "boxes": [o["bbox"] for o in s.objects][:1],
                                        "labels": [o["label"] for o in s.objects][:1]}) + "\n" for s in samples))
    expected = E.score_command("ovd", gold, str(pred))
    moved = tmp_path / "elsewhere" / "gold.jsonl"      # the same rows, their images not next to them
    moved.parent.mkdir()
    moved.write_text("".join(json.dumps({**s.to_row(), "image": f"gone/{i}.png"}) + "\n" for i, s in enumerate(samples)))
    (m,) = E.score_command("ovd", str(moved), str(pred)).values()
    assert m == list(expected.values())[0] and m["n"] == 6 and m["mAP"] > 0
    sizeless = tmp_path / "elsewhere" / "sizeless.jsonl"
    sizeless.write_text("".join(json.dumps({k: v for k, v in {**s.to_row(), "image": "gone.png"}.items()
                                            if k not in ("width", "height")}) + "\n" for s in samples))
    with pytest.raises(SystemExit, match="no valid ovd row in .*6 bad rows, the first .*image not found"):
        E.score_command("ovd", str(sizeless), str(pred))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "nobody", "boxes": []}) + "\n")
    with pytest.raises(SystemExit, match="has the id of a row"):
        E.score_command("ovd", gold, str(other))
    with pytest.raises(SystemExit, match="no such file"):
        E.main(["score", "--task", "ovd", "--data", str(tmp_path / "nope.jsonl"), "--predictions", str(pred)])


def test_a_four_tag_answer_is_not_cut_off_by_the_default_length(tmp_path, shapes_dir, monkeypatch):
    """A Syn-GRPO model answers after <think>, <score> and <description>: with VLM-R1's 256 tokens a long description
    leaves its answer out, where a GRPO model's fits; the default budget is the same for both formats and holds it."""
    from prompts import format_output
    from models import load_processor
    from rollout import Completion
    data = make_shapes("rec", 2, shapes_dir, split="test", objects=(1, 1))

    class Engine:      # writes the gold box after a 300-word description, one "token" a word, cut at max_tokens
        def generate(self, prompts, sampling, seeds=None):
            out = []
            for p in prompts:
                box = [round(v * s / o) for v, s, o in zip(p.sample.solution, p.frame_size * 2,
                                                          (p.sample.width, p.sample.height) * 2)]
                words = format_output("syn-grpo", think="t", score="0.50", description=" ".join(["sky"] * 300),
                                      answer=json.dumps({"bbox_2d": box})).split(" ")
                out.append([Completion(text=" ".join(words[:sampling.max_tokens]), token_ids=[], logprobs=[])])
            return out
    monkeypatch.setattr(E, "load_engine", lambda *a, **k: (Engine(), load_processor("tiny")))
    full = E.evaluate(E.EvalConfig(task="rec", data=(data,), algo="syn-grpo", out_dir=str(tmp_path / "a")))
    cut = E.evaluate(E.EvalConfig(task="rec", data=(data,), algo="syn-grpo", out_dir=str(tmp_path / "b"),
                                  max_new_tokens=256))
    assert list(full.values())[0]["accuracy"] == 1.0 and list(cut.values())[0]["accuracy"] == 0.0
