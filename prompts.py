"""What the model is asked and the exact form its answer must take: one home for the output format.

  * The questions: VLM-R1's REC and OVD wording, MM-UPT's and SynthRL's math instructions (`PROMPTS` lists every
    template; `build_prompt` makes a sample's user text, or fills a user's --prompt-template).
  * `OUTPUT_TAGS`: the tags each algorithm's answer holds, in order (GRPO: <think> <answer>; Syn-GRPO §3.3.2 adds
    <score> and <description>). The prompts ask for them, `format_output` writes them (the SFT targets) and
    rewards.format_reward checks them: none of the three spells the format on its own.
  * `DESCRIPTIONS`: the backgrounds the tiny models' Syn-GRPO warm start writes.

A leaf module: strings and pure functions of a sample's fields (task, problem, categories).
"""
from __future__ import annotations

import json

# ----------------------------------------------------------------------------------------------------
# Prompts (VLM-R1's REC and OVD questions; Syn-GRPO §3.3.2 adds <score> and <description>; MM-UPT's math suffix).
# The format reward checks exactly the tags that the chosen algorithm asks for.


REC_QUESTION = "Please provide the bounding box coordinate of the region this sentence describes: {expression}."
OVD_QUESTION = (
    "Please carefully check the image and detect the following objects: {categories}. "
    "Output the bbox coordinates of detected objects in <answer></answer>. The bbox coordinates in JSON format "
    'should be: [{{"bbox_2d": [x1, y1, x2, y2], "label": "object name"}}]. '
    'If no targets are detected in the image, simply respond with "None".'
)
THINK_ANSWER = (
    " First output the thinking process in <think> </think> tags and then output the final answer in "
    "<answer> </answer> tags."
)
# What the description is for, in Syn-GRPO §3.3.2's words ("a text description for generating a new high-quality
# image (with diverse responses) from the input image"): for a zero-shot model the only pressure on what it writes.
SYN_PURPOSE = " The description is for generating a new high-quality image (with diverse responses) from the input image."
SYN_TAGS = (
    " First output the thinking process in <think> </think> tags, then in <score> </score> tags a number "
    "between 0 and 1 predicting how diverse your answers to this input would be, then in "
    "<description> </description> tags a description of a new image made from this one (same foreground "
    "objects, new background), and finally the answer in <answer> </answer> tags." + SYN_PURPOSE
)
JSON_ANSWER = " Output the final answer in JSON format."
MATH_SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."
# SynthRL's solver instruction (its math format reward then requires <think> ... </think> before the \boxed{} answer)
MATH_THINK = (" You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
              "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in "
              "\\boxed{}.")
MATH_FORMATS = ("boxed", "think")

PROMPTS = {
    "rec": REC_QUESTION + THINK_ANSWER + JSON_ANSWER,
    "ovd": OVD_QUESTION + THINK_ANSWER,
    "rec/syn-grpo": REC_QUESTION + SYN_TAGS + JSON_ANSWER,
    "ovd/syn-grpo": OVD_QUESTION + SYN_TAGS,
    "math": "{problem}" + MATH_SUFFIX,
    "math/think": "{problem}" + MATH_THINK,
}


def build_prompt(sample, algo: str = "grpo", math_format: str = "boxed", template: str = "") -> str:
    """The user text for a sample. rec `problem` already holds VLM-R1's full question. math_format: boxed (MM-UPT's
    instruction) or think (SynthRL's). template (--prompt-template): the whole text instead, with {problem} (rec/math:
    the row's question; ovd/isr: the detection question) and {categories} (ovd/isr: the JSON list) filled in."""
    syn = algo == "syn-grpo"
    question = sample.problem
    if sample.task in ("ovd", "isr"):
        question = OVD_QUESTION.format(categories=json.dumps(sample.categories))
    if template:
        return template.format(problem=question, categories=json.dumps(sample.categories))
    if sample.task == "rec":
        return question + (SYN_TAGS if syn else THINK_ANSWER) + JSON_ANSWER
    if sample.task in ("ovd", "isr"):
        return question + (SYN_TAGS if syn else THINK_ANSWER)
    return question + (MATH_THINK if math_format == "think" else MATH_SUFFIX)

TEMPLATE_FIELDS = ("problem", "categories")   # what a --prompt-template may use (data.read_template checks it)

# The built-in prompts as a --prompt-template file writes them ({problem}: rec and math, the row's question, e.g.
# REC_QUESTION filled in; ovd and isr, OVD_QUESTION with the row's {categories}): what train.py --help shows
_literal = lambda text: text.replace("{", "{{").replace("}", "}}")   # a template file writes braces twice
TEMPLATES = {
    "rec": "{problem}" + _literal(THINK_ANSWER + JSON_ANSWER),
    "rec/syn-grpo": "{problem}" + _literal(SYN_TAGS + JSON_ANSWER),
    "ovd, isr": "{problem}" + _literal(THINK_ANSWER),
    "ovd, isr/syn-grpo": "{problem}" + _literal(SYN_TAGS),
    "math": "{problem}" + _literal(MATH_SUFFIX),
    "math/think": "{problem}" + _literal(MATH_THINK),
}


# ----------------------------------------------------------------------------------------------------
# The answer's tags

OUTPUT_TAGS = {"grpo": ("think", "answer"), "syn-grpo": ("think", "score", "description", "answer")}


def format_output(algo: str, **content: str) -> str:
    """An answer in the format of `algo` ("grpo" or "syn-grpo"): each tag of OUTPUT_TAGS[algo] around its content,
    in order, one space apart."""
    return " ".join(f"<{t}>{content[t]}</{t}>" for t in OUTPUT_TAGS[algo])


# Descriptions of the warm start's Syn-GRPO targets: eight backgrounds of exactly 9 tokens each in the tiny model's
# vocabulary, and scores written with two decimals (always 4 tokens). The tiny model (RoPE base 10) finds the image
# from the answer only at a fixed distance: with descriptions of 7 to 15 tokens, or "0.5" next to "0.25", the
# answer moves and 600 warm-start steps left greedy IoU at 0.19, where equal lengths give 0.90 after 1,200 steps
# (README, "Syn-GRPO on a CPU").
DESCRIPTIONS = ("a sunny beach", "a grassy park", "a green field", "a red brick wall", "a sandy desert",
                "a frozen lake", "a snowy road", "a white room")
