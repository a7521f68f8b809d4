"""Hostile and random inputs: rewards and eval's scoring never raise and stay in their documented ranges."""
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eval as E
from data import Sample
import rewards as R
from rewards import score_completion

TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<score>", "</score>", "<description>", "</description>"]
NUMS = st.one_of(st.integers(-10 ** 12, 10 ** 12), st.floats(allow_nan=True, allow_infinity=True),
                 st.sampled_from(["nan", "inf", "-inf", "1e999", "-0", "0x10", "1_000"]))


@st.composite
def completions(draw):
    """Model-like text: shuffled, duplicated, nested and missing tags around boxes, JSON, numbers and junk."""
    parts = draw(st.lists(st.one_of(
        st.sampled_from(TAGS),
        st.text(max_size=40),
        NUMS.map(str),
        st.lists(NUMS, min_size=0, max_size=6).map(lambda v: "[" + ", ".join(map(str, v)) + "]"),
        st.lists(st.fixed_dictionaries({"bbox_2d": st.lists(NUMS, max_size=5), "label": st.one_of(st.text(max_size=8), st.integers())}),
                 max_size=4).map(lambda v: json.dumps(v, allow_nan=True)),
        st.sampled_from(["```json", "```", "None", "\\boxed{", "}", "{", "\u202e", "\x00", "\ud7ff"]),
    ), max_size=25))
    text = "".join(parts)
    if draw(st.booleans()):
        text = "<think>" + text[:20] + "</think><score>0.5</score><description>d</description><answer>" + text + "</answer>"
    return text


SAMPLES = [Sample(id="r", task="rec", image="", width=640, height=480, problem="q", solution=[10, 20, 200, 300]),
           Sample(id="o", task="ovd", image="", width=640, height=480, categories=["a", "b"],
                  objects=[{"bbox": [0, 0, 50, 50], "label": "a"}, {"bbox": [100, 100, 300, 200], "label": "b"}]),
           Sample(id="i", task="isr", image="", width=64, height=64, categories=["bed"], objects=[]),
           Sample(id="m", task="math", image="", problem="q", answer="\\frac{1}{2}")]


@pytest.mark.slow
@settings(max_examples=4_000, deadline=None, suppress_health_check=list(HealthCheck))   # 10,000 took 65 s of CI
@given(text=completions(), algo=st.sampled_from(["grpo", "syn-grpo"]))
def test_rewards_are_finite_and_in_range_on_any_completion(text, algo):
    for s in SAMPLES:        # 4,000 generated completions a run, each scored for every task
        p = score_completion(text, s, (336, 252), algo)
        assert math.isfinite(p.accuracy) and 0.0 <= p.accuracy <= 1.0
        assert p.format in (0.0, 1.0)


@pytest.mark.parametrize("size", [100_000])
def test_huge_completions_are_cheap_and_zero(size, monkeypatch):
    """100 kB completions score 0 on accuracy and format, and no parser ever runs over more than MAX_PARSE_CHARS of
    them (the work is bounded: counted as the longest string handed to the box regex and to JSON, not in seconds)."""
    seen = []
    box_re = R._BOX_RE

    class Recording:
        def search(self, text, *a):
            seen.append(len(text))
            return box_re.search(text, *a)
    loads = R.json.loads
    monkeypatch.setattr(R, "_BOX_RE", Recording())
    monkeypatch.setattr(R.json, "loads", lambda text, *a, **k: seen.append(len(text)) or loads(text, *a, **k))
    texts = ("<answer>" + "[1, " * (size // 4) + "</answer>", "<think>" + "x" * size + "</think><answer>[1, 2, 3, 4]</answer>",
             "<answer>" + '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, ' * (size // 40) + "</answer>",
             "\\boxed{" * (size // 7))
    for text in texts:
        for s in SAMPLES:
            p = score_completion(text, s, (336, 252), "grpo")
            assert p.accuracy == 0.0 and p.format == 0.0, (text[:40], s.task, p)
    assert seen and max(seen) <= R.MAX_PARSE_CHARS, max(seen)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(row=st.one_of(
    st.fixed_dictionaries({"id": st.sampled_from(["r", "o", "m"]), "completion": st.one_of(completions(), st.none(), st.integers())}),
    st.fixed_dictionaries({"id": st.sampled_from(["r", "o", "m"]),
                           "boxes": st.one_of(st.lists(st.lists(NUMS, max_size=5), max_size=4), st.text(max_size=5), st.none()),
                           "labels": st.one_of(st.lists(st.one_of(st.text(max_size=4), st.integers()), max_size=4), st.none()),
                           "answer": st.one_of(st.text(max_size=10), st.integers(), st.none())})))
def test_eval_parse_and_score_never_crash(row):
    by_id = {s.id: s for s in SAMPLES}
    s = by_id[row["id"]]
    pred = E.parse_prediction(row, s)
    m = E.score_split(s.task, [s], {s.id: pred})
    assert all(math.isfinite(v) for v in m.values())
