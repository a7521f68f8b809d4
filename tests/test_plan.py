"""plan.py: the memory plan's counts against the instantiated models, its formulas against a measured forward of the
tiny model, and `train.py --plan` on the command line."""
import copy
import json
from dataclasses import replace

import pytest
import torch

import plan
from config import Config, prepare_config
from test_train import run_train
from train import add_lora


def _plan(**kw):
    setting = {k: kw.pop(k) for k in ("gpus", "gpu_memory_gb") if k in kw}
    cfg = prepare_config(Config(**{"device": "cuda", **kw}), files=False)
    config = plan.plan_model_config(cfg.model)
    return plan.plan_memory(cfg, plan.PlanSetting(**setting), plan.count_parameters(config), config)


def test_plan_counts_the_parameters_of_the_instantiated_model_exactly(tiny):
    model = tiny[0]
    counts = plan.count_parameters(model.config)
    assert counts["params_total"] == sum(p.numel() for p in model.parameters())
    assert counts["params_vision"] == sum(p.numel() for p in model.model.visual.parameters())
    lora = add_lora(Config(lora_r=8), copy.deepcopy(model))
    assert 8 * counts["params_lora_per_rank"] == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    # the shipped configs of the Hub's models: their published sizes (3.75B, 8.29B, 33.5B, 73.4B)
    sizes = {m: plan.count_parameters(plan.plan_model_config(f"Qwen/Qwen2.5-VL-{m}-Instruct"))["params_total"]
             for m in ("3B", "7B", "32B", "72B")}
    assert [round(v / 1e9, 2) for v in sizes.values()] == [3.75, 8.29, 33.45, 73.41]
    # Qwen3-VL's (2.13B, 4.44B, 8.77B, 33.4B on the Hub), read as each checkpoint's config.json gives them
    sizes = {m: plan.count_parameters(plan.plan_model_config(f"Qwen/Qwen3-VL-{m}-Instruct"))["params_total"]
             for m in ("2B", "4B", "8B", "32B")}
    assert [round(v / 1e9, 2) for v in sizes.values()] == [2.13, 4.44, 8.77, 33.36]


def test_plan_counts_a_tiny_qwen3_vl_exactly_and_sees_its_image_at_its_own_patch_size():
    from models import load_policy
    model, _ = load_policy("tiny-qwen3-vl")
    counts = plan.count_parameters(model.config)
    assert counts["params_total"] == sum(p.numel() for p in model.parameters())
    assert counts["params_vision"] == sum(p.numel() for p in model.model.visual.parameters())
    cfg = prepare_config(Config(model="Qwen/Qwen3-VL-8B-Instruct", device="cuda"), files=False)
    config = plan.plan_model_config(cfg.model)
    p = plan.plan_memory(cfg, plan.PlanSetting(image_size=(640, 480)), plan.count_parameters(config), config)
    assert p["image_tokens"] == (640 // 32) * (480 // 32)      # patch 16, 2 x 2 merged: one token per 32 pixels


def test_plan_counts_a_tiny_qwen3_vl_moe_exactly():
    """Experts included (4 experts of width 32 a layer; the activations still count a dense MLP: not yet MoE's); the
    shipped 30B-A3B config gives the Hub's size (31.1B)."""
    from models import load_policy
    model, _ = load_policy("tiny-qwen3-vl-moe")
    counts = plan.count_parameters(model.config)
    assert counts["params_total"] == sum(p.numel() for p in model.parameters())
    lora = add_lora(Config(lora_r=8), copy.deepcopy(model))             # the experts' adapters included
    assert any(".experts." in n for n, _ in lora.named_parameters() if "lora_" in n)
    assert 8 * counts["params_lora_per_rank"] == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    config = plan.plan_model_config("Qwen/Qwen3-VL-30B-A3B-Instruct")
    assert round(plan.count_parameters(config)["params_total"] / 1e9, 2) == 31.07


def test_plan_counts_a_tiny_glm4v_and_its_lora_exactly_and_the_9b_at_its_published_size():
    """GLM-4.1V fuses its MLP's gate and up projections (gate_up_proj), which LoRA adapts too; the shipped
    GLM-4.1V-9B-Thinking config gives the Hub's 10.3B (9.4B of them the GLM-4-9B language model)."""
    from models import load_policy
    model, _ = load_policy("tiny-glm4v")
    counts = plan.count_parameters(model.config)
    assert counts["params_total"] == sum(p.numel() for p in model.parameters())
    assert counts["params_vision"] == sum(p.numel() for p in model.model.visual.parameters())
    lora = add_lora(Config(lora_r=8), copy.deepcopy(model))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in lora.named_parameters() if "lora_" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert 8 * counts["params_lora_per_rank"] == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    nine = plan.count_parameters(plan.plan_model_config("zai-org/GLM-4.1V-9B-Thinking"))
    assert round(nine["params_total"] / 1e9, 2) == 10.29 and round(nine["params_language"] / 1e9, 2) == 9.40


@pytest.mark.parametrize("size", [(224, 224), (150, 90), (112, 112)])
def test_plan_counts_a_tiny_internvl_and_the_tokens_its_crops_give(size, tmp_path):
    """A tiling family: the plan's image tokens are those the processor gives the image (1 to 4 crops of 112 pixels
    and a thumbnail when more than one, 16 tokens each), and its parameters and vision side are counted exactly."""
    from PIL import Image

    from data import Sample
    from models import load_policy, vision_modules
    from rollout import encode_prompt
    model, proc = load_policy("tiny-internvl")
    counts = plan.count_parameters(model.config)
    assert counts["params_total"] == sum(p.numel() for p in model.parameters())
    assert counts["params_vision"] == sum(p.numel() for m in vision_modules(model) for p in m.parameters())
    Image.new("RGB", size, (90, 90, 90)).save(tmp_path / "i.png")
    p = encode_prompt(proc, Sample(id="i", task="rec", image=str(tmp_path / "i.png"), width=size[0], height=size[1],
                                   problem="the square", solution=[1, 1, 9, 9]))
    cfg = prepare_config(Config(model="tiny-internvl"), files=False)
    planned = plan.plan_memory(cfg, plan.PlanSetting(image_size=size), counts, model.config)["image_tokens"]
    assert planned == p.input_ids.count(proc.tokenizer.context_image_token_id) == 16 * p.pixel_values.shape[0]


def test_plan_counts_internvl3_5_8b_as_its_model_card_does():
    """The shipped InternVL3_5-8B-HF config, assembled from its parts' published configs (Qwen3-8B, InternViT-300M):
    8.5B in all, 8.2B of language model, as the card gives them (to its 0.1B); a 640 x 480 image is 4 x 3 crops (its
    exact aspect ratio within 12) and a thumbnail: 13 x 256 = 3328 tokens, where Qwen3-VL gives it 300."""
    cfg = prepare_config(Config(model="OpenGVLab/InternVL3_5-8B-HF", device="cuda"), files=False)
    config = plan.plan_model_config(cfg.model)
    counts = plan.count_parameters(config)
    assert (round(counts["params_total"] / 1e9, 1), round(counts["params_language"] / 1e9, 1)) == (8.5, 8.2)
    p = plan.plan_memory(cfg, plan.PlanSetting(image_size=(640, 480)), counts, config)
    assert p["image_tokens"] == 13 * 256


def test_plan_grows_with_batch_generations_lengths_and_pixels_and_shrinks_with_ranks_and_lora():
    base = _plan(model="Qwen/Qwen2.5-VL-3B-Instruct")
    for change in (dict(batch_size=40, micro_batch=64), dict(num_generations=12, micro_batch=64),
                   dict(max_new_tokens=2048), dict(min_pixels=28 * 28 * 1024), dict(gradient_checkpointing=False)):
        bigger = _plan(model="Qwen/Qwen2.5-VL-3B-Instruct", **change)      # the update phase's memory grows
        assert sum(bigger["per_gpu_bytes"].values()) > sum(base["per_gpu_bytes"].values()), change
    two = _plan(model="Qwen/Qwen2.5-VL-3B-Instruct", gpus=2)
    for part in ("weights", "gradients", "optimizer", "reference"):          # FSDP shards these ...
        assert two["per_gpu_bytes"][part] == base["per_gpu_bytes"][part] // 2
    for part in ("activations", "logits"):                                   # ... not a micro-batch's activations
        assert two["per_gpu_bytes"][part] == base["per_gpu_bytes"][part]
    lora = _plan(model="Qwen/Qwen2.5-VL-3B-Instruct", lora_r=64)
    assert lora["per_gpu_bytes"]["optimizer"] < base["per_gpu_bytes"]["optimizer"] / 20   # rank 64: 3 % of the weights
    assert lora["per_gpu_bytes"]["reference"] == 0                           # the base model is the reference


def measured_activation_bytes(model, batch, banned):
    """What one micro-batch's forward keeps for its backward, measured: every tensor autograd saves, by storage,
    parameters left out."""
    from rollout import completion_logprobs
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        completion_logprobs(model, batch, banned, with_entropy=True)
    return sum(saved.values())


@pytest.mark.parametrize("train_vision,completion", [(False, 20), (False, 60), (True, 20)])
def test_plan_activations_match_a_measured_micro_batch_of_the_tiny_model(tiny, shapes_dir, train_vision, completion):
    """The planner's formula against the tensors autograd keeps in a real forward of the tiny model (float32): within
    2 % with the vision tower frozen (the CPU default), 6 % with it trained (docs/gpu.md)."""
    from data import read_data
    from shapes import make_shapes
    from models import vision_token_ids
    from rollout import encode_prompt, make_batch
    model = copy.deepcopy(tiny[0]).train()
    model.model.visual.requires_grad_(train_vision)
    samples = read_data(make_shapes("rec", 2, shapes_dir, objects=(1, 1)), "rec")
    prompts = [encode_prompt(tiny[1], s) for s in samples]
    seqs = [(k, list(range(10, 10 + completion))) for k in range(2)]
    batch = make_batch(prompts, seqs, tiny[1].tokenizer.pad_token_id)
    measured = measured_activation_bytes(model, batch, vision_token_ids(tiny[1]))
    patches = int(prompts[0].image_grid_thw[0].prod())
    est = plan.activation_bytes(model.config, 2, batch.input_ids.shape[1] - completion, completion, patches,
                                 train_vision, False, act_bytes=4)
    ratio = (est["activations"] + est["logits"]) / measured
    print(f"activation estimate / measured: {ratio:.3f}")
    assert abs(ratio - 1) < (0.06 if train_vision else 0.02), ratio


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-qwen3-vl-moe", "tiny-glm4v", "tiny-internvl"])
def test_plan_activations_match_a_measured_micro_batch_of_each_family(name, shapes_dir):
    """Each family's decoder layer keeps its own tensors (Qwen3's q/k norms, GLM's extra norms, MoE's routed
    experts): the planner's count against a real forward of its tiny model, vision frozen, within 3 % (measured
    0.5-1.1 %). InternVL's language model also keeps a float L x L attention mask a sequence, which the planner leaves
    out: 9 % of this tiny model's 2 layers of 128, under 0.1 % of a real model's."""
    from data import read_data
    from models import load_policy, vision_modules, vision_token_ids
    from rollout import encode_prompt, make_batch
    from shapes import make_shapes
    model, proc = load_policy(name)
    model.train()
    for part in vision_modules(model):
        part.requires_grad_(False)
    prompts = [encode_prompt(proc, s) for s in read_data(make_shapes("rec", 2, shapes_dir, objects=(1, 1)), "rec")]
    batch = make_batch(prompts, [(k, list(range(10, 30))) for k in range(2)], proc.tokenizer.pad_token_id)
    measured = measured_activation_bytes(model, batch, vision_token_ids(proc))
    est = plan.activation_bytes(model.config, 2, batch.input_ids.shape[1] - 20, 20, 0, False, False, act_bytes=4)
    ratio = (est["activations"] + est["logits"]) / measured
    print(f"{name}: activation estimate / measured {ratio:.3f}")
    assert abs(ratio - 1) < (0.12 if name == "tiny-internvl" else 0.03), ratio


def test_plan_activations_match_a_measured_shared_prefix_micro_batch(tiny, shapes_dir):
    """Under a shared prefix the planner counts each prompt (and its image) once: 2 prompts x 3 completions against
    the tensors autograd keeps, within 8 % (its 4D mask included, which SDPA keeps as a float in every layer); and
    it keeps less than the same sequences one row a sequence (measured: 0.55 of it)."""
    from data import read_data
    from shapes import make_shapes
    from models import vision_token_ids
    from rollout import encode_prompt, make_batch
    model = copy.deepcopy(tiny[0]).train()
    model.model.visual.requires_grad_(True)
    samples = read_data(make_shapes("rec", 2, shapes_dir, objects=(1, 1)), "rec")
    prompts = [encode_prompt(tiny[1], s) for s in samples]
    completion = 40
    seqs = [(k, list(range(10, 10 + completion))) for k in range(2) for _ in range(3)]
    patches = int(prompts[0].image_grid_thw[0].prod())
    P = max(len(p.input_ids) for p in prompts)
    measured, est = {}, {}
    for shared in (False, True):
        batch = make_batch(prompts, seqs, tiny[1].tokenizer.pad_token_id, shared_prefix=shared)
        measured[shared] = measured_activation_bytes(model, batch, vision_token_ids(tiny[1]))
        e = plan.activation_bytes(model.config, 6, P, completion, patches, True, False, act_bytes=4,
                                  prompts=2 if shared else None)
        est[shared] = e["activations"] + e["logits"]
    print(f"shared prefix: estimate / measured {est[True] / measured[True]:.3f}; measured shared / per sequence "
          f"{measured[True] / measured[False]:.3f}")
    assert abs(est[True] / measured[True] - 1) < 0.08
    assert measured[True] < 0.8 * measured[False] and est[True] < est[False]


def test_plan_counts_what_the_shared_prefix_saves():
    on, off = (_plan(model="Qwen/Qwen2.5-VL-3B-Instruct", shared_prefix=s) for s in (True, False))
    assert on["shared_prefix"] and not off["shared_prefix"]
    assert on["per_gpu_bytes"]["activations"] < off["per_gpu_bytes"]["activations"]
    assert on["activations_one_row_a_sequence"] == off["per_gpu_bytes"]["activations"]


def test_plan_on_the_command_line_offline_as_json_and_as_a_table():
    r = run_train("--plan", "--json", "--device", "cuda", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--plan-gpus", "4",
                  timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(r.stdout)
    assert plan["params_total"] == 8292166656 and plan["fits"] is True and set(plan["per_gpu_bytes"]) >= {
        "weights", "gradients", "optimizer", "activations", "logits"}
    r = run_train("--plan", "--device", "cuda", "--gpu-memory-gb", "24", "--gradient-checkpointing", "--micro-batch",
                  "16", timeout=300)
    assert r.returncode == 0 and "does NOT fit" in r.stdout and "--lora-r 64" in r.stdout, r.stdout + r.stderr[-2000:]
    r = run_train("--plan", "--model", "no/such-model", timeout=120)
    assert r.returncode == 1 and r.stderr.strip().startswith("train.py --plan: no config for --model no/such-model")


def test_the_plan_lists_only_remedies_that_lower_the_peak_and_that_the_code_supports():
    """At 24 GB, --max-pixels 401408 and --rollout-backend hf changed nothing (43.27 -> 43.27) and 'all of these'
    combined LoRA with 2 training GPUs, which the code does not support."""
    cfg = prepare_config(Config(device="cuda"), files=False)
    setting = plan.PlanSetting(gpus=1, gpu_memory_gb=24)
    config = plan.plan_model_config(cfg.model)
    counts = plan.count_parameters(config)
    now = plan.plan_memory(cfg, setting, counts, config)
    remedies = plan.plan_remedies(cfg, setting, counts, config)
    flags = [r["flags"] for r in remedies]
    assert all(r["peak_bytes"] < now["peak_bytes"] for r in remedies)
    assert "--lora-r 64" in flags and "2 training GPUs (torchrun)" in flags and flags[-1] == "all of these"
    assert "--max-pixels 401408" not in flags
    assert ("--rollout-backend hf" in flags) == (now["peak_phase"] == "rollout")   # only where vLLM's share peaks
    listed = {k: v for f, c in plan.PLAN_REMEDIES if f in flags for k, v in c.items()}
    single = plan.plan_memory(replace(cfg, **listed), setting, counts, config)
    assert remedies[-1]["peak_bytes"] == single["peak_bytes"]      # LoRA's "all of these" stays on one GPU
    # every part of the peak is shown: the rollout phase is weights + optimizer + reference + vLLM's share
    parts = now["per_gpu_bytes"]
    assert now["phase_bytes"]["rollout"] == pytest.approx(parts["weights"] + parts["optimizer"] + parts["reference"]
                                                          + parts["vllm"], abs=4)
    assert now["peak_bytes"] == max(now["phase_bytes"].values()) and now["vllm_asleep_in_update"]
