"""prompts.py: the answer's tags have one home: what the SFT targets write is exactly what the format reward takes."""
import pytest

from data import DataError, Sample, gold_completion, read_template
from prompts import OUTPUT_TAGS, PROMPTS, build_prompt, format_output
from rewards import format_reward


@pytest.mark.parametrize("algo", sorted(OUTPUT_TAGS))
def test_format_output_is_what_the_format_reward_accepts(algo):
    content = {"think": "t", "score": "0.25", "description": "a beach", "answer": "[1, 2, 3, 4]"}
    text = format_output(algo, **content)
    assert text.index("<think>") == 0 and format_reward(text, "rec", algo) == 1.0
    dropped = format_output("grpo", think="t", answer="[1, 2, 3, 4]") if algo == "syn-grpo" else text + " <score>1</score>"
    assert format_reward(dropped, "rec", algo) == 0.0          # a tag missing, or one too many
    for tag in OUTPUT_TAGS[algo]:                               # every tag is asked for in the prompt
        assert f"<{tag}>" in PROMPTS["rec/syn-grpo" if algo == "syn-grpo" else "rec"]


@pytest.mark.parametrize("algo", ["grpo", "syn-grpo"])
def test_the_sft_targets_are_in_the_format_the_reward_takes(algo):
    s = Sample(id="a", task="rec", image="", width=100, height=100, problem="q", solution=[10, 10, 50, 50])
    assert format_reward(gold_completion(s, (100, 100), algo, index=3), "rec", algo) == 1.0


def test_a_prompt_template_replaces_the_built_in_prompt_and_bad_ones_say_what_is_wrong(tmp_path):
    t = tmp_path / "t.txt"
    t.write_text('Find: {problem} Reply as {{"bbox_2d": ...}}.\n')
    s = Sample(id="a", task="rec", image="", problem="the cat")
    assert build_prompt(s, "grpo", template=read_template(str(t), "rec")) == 'Find: the cat Reply as {"bbox_2d": ...}.'
    t.write_text("Detect {categories} please.")
    o = Sample(id="b", task="ovd", image="", categories=["cat", "dog"])
    assert build_prompt(o, template=read_template(str(t), "ovd")) == 'Detect ["cat", "dog"] please.'
    assert read_template("", "rec") == ""
    for text, message in (("Find {question}.", r"unknown field\(s\) \{question\}"), ("No field.", "no field"),
                          ("Find {problem", "expected '}'"), ("Find {categories}", "only for ovd and isr")):
        t.write_text(text)
        with pytest.raises(DataError, match=message):
            read_template(str(t), "rec")
    with pytest.raises(DataError, match="No such file"):
        read_template(str(tmp_path / "none.txt"), "rec")


def test_every_template_train_py_help_shows_is_one_prompt_template_takes(tmp_path):
    from prompts import TEMPLATES
    for name, text in TEMPLATES.items():
        (tmp_path / "t.txt").write_text(text)
        for task in ("ovd", "isr") if name.startswith("ovd") else (name.split("/")[0],):
            assert read_template(str(tmp_path / "t.txt"), task) == text
    m = Sample(id="c", task="math", image="", problem="How many?")
    assert build_prompt(m, template=TEMPLATES["math"]) == build_prompt(m)          # \\boxed{} written {{}} in the file
    s = Sample(id="a", task="rec", image="", problem="Find the cat.")
    assert build_prompt(s, "grpo", template=TEMPLATES["rec"]) == build_prompt(s, "grpo")   # the same text as built in
    o = Sample(id="b", task="ovd", image="", categories=["cat"])
    assert build_prompt(o, "syn-grpo", template=TEMPLATES["ovd, isr/syn-grpo"]) == build_prompt(o, "syn-grpo")


def test_the_syn_grpo_prompt_says_what_the_description_is_for():
    """Syn-GRPO §3.3.2: the model writes "a text description for generating a new high-quality image (with diverse
    responses) from the input image"; the prompt says so (the GRPO prompt has no description to explain)."""
    from prompts import SYN_PURPOSE
    sample = Sample(id="a", task="rec", image="a.png", problem="Where is it?", solution=[0, 0, 1, 1], width=8, height=8)
    assert "new high-quality image (with diverse responses) from the input image" in SYN_PURPOSE
    assert SYN_PURPOSE in build_prompt(sample, "syn-grpo") and "description" not in build_prompt(sample, "grpo")
