"""Training: SFT, GRPO and Syn-GRPO for Qwen2.5-VL on visual perception (and math) tasks, in one visible loop.

    python train.py                                   # embedded default: tiny model, shapes REC, SFT warm start + GRPO
    python train.py --algo grpo --task rec --model Qwen/Qwen2.5-VL-3B-Instruct --data refcoco_train.jsonl \\
        --image-root /data/coco --rollout-backend vllm   # the paper's setting: B=20, G=6, lr 1e-6, 5 epochs
    python train.py --resume runs/default             # continue a killed run exactly where its checkpoint was

The step, top to bottom (the `for step` loop at the end of `main`): take B samples from the data pool ->
generate G completions each (rollout.py) -> score them (rewards.py; Syn-GRPO adds the diversity reward) ->
group advantages (Eq. 1) -> `mu` optimizer steps of the clipped surrogate (+ k3 KL, + entropy terms) ->
push the new weights into vLLM -> log one line of metrics.jsonl -> checkpoint every --save-every steps.

Deliberate choices: the std in Eq. 1 is torch's unbiased std, as VLM-R1 and TRL; old log-probs for the ratio
are recomputed by the trainer (not taken from the engine) so that the ratio is exactly 1 at the first of the
mu updates; the engine's log-probs are only compared with them (`logp_engine_gap`).
"""
from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from tqdm import tqdm

import rewards as R
from data import DataPool, gold_completion, load_image, make_shapes, read_jsonl
from server import DataServerClient
from rollout import (TINY_MODELS, HFRollout, Sampling, VLLMRollout, encode_prompt, left_pad, load_policy,
                     resolve_model, vision_token_ids)


@dataclass
class Config:
    # what to train
    algo: str = "grpo"                  # sft | grpo | syn-grpo
    task: str = "rec"                   # rec | ovd | isr | math
    model: str = ""                     # hub id, checkpoint dir, tiny, tiny-qwen-vocab ("" = tiny on CPU, 3B on GPU)
    data: str = ""                      # task JSONL ("" = the built-in shapes dataset)
    image_root: str = ""                # image paths in --data are relative to this (default: the file's folder)
    strict: bool = False                # stop at the first bad data row instead of skipping it
    shapes_n: int = 512                 # size of the shapes training set when --data is empty
    shapes_objects: str | None = None   # shapes per image (min-max) in that set (rec: 1-1, else 1-2)
    out_dir: str = "runs/default"
    resume: str = ""                    # a run dir to continue from its last checkpoint
    seed: int = 0
    # schedule (None = a default that depends on the device, see resolve_defaults)
    max_steps: int | None = None        # GRPO steps (0 = epochs * pool size / batch size)
    epochs: int = 5
    batch_size: int | None = None       # B prompts per step (paper: 20)
    num_generations: int | None = None  # G completions per prompt (paper: 6)
    lr: float | None = None             # paper: 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    sft_steps: int | None = None        # SFT warm-start steps before GRPO (tiny models start from random weights)
    sft_lr: float | None = None
    # GRPO objective
    beta: float = 0.0                   # KL(pi || pi_ref) coefficient, k3 estimator; 0 = no reference model
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28          # clip-higher (DAPO); set = epsilon_low for symmetric clipping
    mu: int = 1                         # optimizer steps per batch of rollouts (ratio != 1 only when mu > 1)
    loss_type: str = "grpo"             # grpo (per-sequence mean) | dapo (token mean) | dr_grpo (/ G*max_len)
    adv_eps: float = 1e-4
    drop_zero_std: bool = False         # drop groups whose rewards are all equal (they carry no gradient)
    entropy_coef: float = 0.0           # "GRPO + Entropy Loss": minus coef * mean token entropy
    entropy_adv: float = 0.0            # "GRPO + Entropy Adv." (Cheng et al. 2025): A + min(alpha*H, |A|/kappa)
    entropy_adv_kappa: float = 2.0
    flip_advantage: bool = False        # debugging / tests: negate advantages (reward must then fall)
    reward: str = "gold"                # gold | majority (MM-UPT: agreement with the group's majority answer)
    # Syn-GRPO (§3.3)
    gamma: float = 0.7                  # diversity smoothing EMA weight
    server_url: str = ""                # data server URL(s), comma-separated ("": train.py starts a local one)
    server_token: str = ""
    pipeline: str = "tiny"              # outpainting pipeline of the local data server (tiny | sdxl | DIR)
    pipeline_steps: int = 8             # its denoising steps
    sync: bool = False                  # wait for each step's images (only to reproduce the paper's Table 5)
    descriptions: str = ""              # a file of fixed descriptions, one a line: the offline-generation baseline
    synthesize: bool = True             # --no-synthesize: Syn-GRPO's outputs and rewards, but no data server
    # sampling
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    rollout_backend: str | None = None  # hf | vllm (default: vllm on GPU, hf on CPU)
    micro_batch: int = 16               # sequences per forward/backward
    prompt_seeds: bool = False          # each prompt's G samples from its own seed (step, slot): rollouts do not
                                        # depend on how the batch is split (torchrun == one process; HF: 1 prompt/call)
    vllm_tp: int = 1                    # vLLM tensor parallel size (GPU)
    # model
    lora_r: int = 0                     # > 0: train LoRA adapters on the language model only
    lora_alpha: int = 32
    freeze_vision: bool | None = None   # None: trained on GPU, frozen on CPU (see resolve_defaults)
    gradient_checkpointing: bool = False
    # logging and checkpoints
    save_every: int = 50
    log_completions: int = 1            # completions printed to completions.jsonl per step


def resolve_defaults(cfg: Config) -> Config:
    """Paper defaults on GPU; small, fast ones for the tiny models on CPU (learning is visible in minutes)."""
    gpu = torch.cuda.is_available()
    cfg.model = cfg.model or ("Qwen/Qwen2.5-VL-3B-Instruct" if gpu else "tiny")
    random_init = cfg.model in TINY_MODELS   # built with random weights: needs the supervised warm start
    # CPU values measured on the tiny model (README, "What the tiny model learns on a CPU"): SFT at lr 1e-3 with
    # the random vision tower frozen (training it collapses its output); GRPO at lr 2e-4 (1e-3 undid the warm
    # start's localisation, IoU 0.46 -> 0.17); 64 new tokens (at 48 GRPO learned to cut boxes short, IoU 0); one
    # shape per REC image (the tiny model learns to localise a lone shape in CPU minutes, not yet to pick the
    # described one of two).
    d = dict(batch_size=20 if gpu else 4, num_generations=6, lr=1e-6 if gpu else 2e-4,
             sft_steps=600 if random_init else 0, sft_lr=1e-5 if gpu else 1e-3, freeze_vision=not gpu,
             max_new_tokens=1024 if gpu else (112 if cfg.algo == "syn-grpo" else 64),
             rollout_backend="vllm" if gpu else "hf", max_steps=0 if gpu else 100,
             shapes_objects="1-1" if cfg.task == "rec" else "1-2")
    for k, v in d.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    return cfg


# ----------------------------------------------------------------------------------------------------
# Pure math (shapes: B prompts, G completions, N = B*G sequences, T completion tokens)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Eq. 1: (r - mean) / (std + eps) within each group. rewards (B, G) -> (B, G)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Token entropy H = logsumexp(z) - sum softmax(z) z. (..., V) -> (...)."""
    p = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (p * logits).sum(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token (Schulman 2020): exp(r - l) - (r - l) - 1 >= 0. (N, T)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def entropy_shaped_advantage(adv: torch.Tensor, ent: torch.Tensor, alpha: float, kappa: float) -> torch.Tensor:
    """Cheng et al. 2025 (arXiv 2506.14758): A_t + min(alpha * H_t (detached), |A_t| / kappa). (N, T)."""
    return adv + torch.minimum(alpha * ent.detach(), adv.abs() / kappa)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, norm: float) -> torch.Tensor:
    """Token losses (N, T) -> scalar. grpo: mean over each sequence, then over sequences (norm = N in the batch);
    dapo: sum over tokens / norm (= tokens in the batch); dr_grpo: sum / norm (= N * max_new_tokens). The
    normaliser is the whole batch's, so micro-batches add up to the full-batch loss."""
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / norm
    if loss_type in ("dapo", "dr_grpo"):
        return (per_token * mask).sum() / norm
    raise ValueError(f"unknown loss_type {loss_type!r}")


def clipped_surrogate(logp, old_logp, adv, eps_low: float, eps_high: float):
    """min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) per token, and where clipping was active. (N, T)."""
    ratio = torch.exp(logp - old_logp)
    s1, s2 = ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    return torch.minimum(s1, s2), (s2 < s1)


# ----------------------------------------------------------------------------------------------------
# Model forward on (prompt, completion) pairs


def make_batch(prompts, seqs, pad_id: int):
    """Left-pad prompts and right-pad completions so that every completion starts at the same column; the
    model then only needs logits for the last T+1 positions (logits_to_keep), not over the long image prompt.
    seqs: list of (prompt_idx, completion token ids)."""
    P = max(len(prompts[i].input_ids) for i, _ in seqs)
    T = max(1, max(len(c) for _, c in seqs))
    p_ids, p_attn, p_mm = left_pad([prompts[i] for i, _ in seqs], P, pad_id)     # (N, P) each
    c_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T)
    for r, (_, c) in enumerate(seqs):
        c_ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[r, :len(c)] = 1
    ids = torch.cat([p_ids, c_ids], 1)                                          # (N, P+T)
    attn = torch.cat([p_attn, mask.long()], 1)
    mm = torch.cat([p_mm, torch.zeros_like(c_ids)], 1)                           # completions are text
    pixel_values = torch.cat([prompts[i].pixel_values for i, _ in seqs])
    grid = torch.cat([prompts[i].image_grid_thw for i, _ in seqs])
    return ids, attn, mask, pixel_values, grid, T, mm


def logp_device(model) -> torch.device:
    return next(model.parameters()).device


def engine_gap(logp: torch.Tensor, engine: list[list[float]]) -> list[float]:
    """Max |trainer - engine| log-prob per sequence, over the tokens the engine reported. logp: (n, T)."""
    return [(logp[r, :len(e)].cpu() - torch.tensor(e)).abs().max().item() for r, e in enumerate(engine) if e]


def completion_logprobs(model, batch, banned: list[int], temperature: float = 1.0, with_entropy: bool = False):
    """Per-token log-probs (N, T) of the completion tokens (and entropies), the sampler's view: logits divided by
    the temperature (trl#4159) and the suppressed vision tokens removed, as at sampling time."""
    ids, attn, mask, pv, grid, T, mm = batch
    dev = logp_device(model)
    out = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), mm_token_type_ids=mm.to(dev),
                pixel_values=pv.to(dev, model.dtype),
                image_grid_thw=grid.to(dev), logits_to_keep=T + 1, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature                    # (N, T, V): position t predicts token t
    logits[..., banned] = -float("inf")
    logp = logits.log_softmax(-1).gather(-1, ids[:, -T:].to(dev).unsqueeze(-1)).squeeze(-1)
    ent = entropy_from_logits(logits.masked_fill(torch.isinf(logits), -1e9)) if with_entropy else None
    return logp, ent


# ----------------------------------------------------------------------------------------------------
# Distributed: `torchrun --nproc_per_node N train.py ...` runs N copies of this file, FSDP2-sharded (gloo on CPU,
# nccl on GPU). Rank r takes a contiguous 1/N of each step's B prompts with all their G completions, so groups never
# straddle ranks and rewards / advantages need no communication; FSDP averages the gradients. Rank 0 alone logs,
# checkpoints and talks to the data server(s), and broadcasts pool updates.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), world)


def shard_policy(model) -> None:
    """FSDP2: one unit per vision block and per decoder layer, then the root (patch embedding, merger, embeddings,
    lm_head). `generate` is registered as a forward of the root: HF runs the vision tower from inside generate,
    outside the model's forward, to precompute image features."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for block in model.model.visual.blocks:
        fully_shard(block)
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, "generate")


def rank_share(n: int, d: Dist) -> range:
    """The contiguous part of n items that rank d.rank handles (n must divide evenly)."""
    return range(d.rank * n // d.world, (d.rank + 1) * n // d.world)


def mean_over_ranks(row: dict, d: Dist) -> dict:
    """Metrics of one step, averaged over ranks (each rank holds the same number of prompts)."""
    if d.world == 1:
        return row
    import torch.distributed as dist
    rows = [None] * d.world
    dist.all_gather_object(rows, row)
    return {k: float(np.mean([r[k] for r in rows if k in r])) if isinstance(v, (int, float)) and k != "step" else v
            for k, v in row.items()}


def broadcast(obj, d: Dist):
    """Rank 0's object on every rank."""
    if d.world == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------------
# Checkpoints: one file, written atomically, holding everything an exact resume needs


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def policy_state(model) -> dict:
    """HF-named full weights (LoRA merged) for vLLM pushes and final saves (on every rank when sharded)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if hasattr(model, "merge_adapter"):
        with torch.no_grad():
            model.merge_adapter()
            sd = {k.replace("base_model.model.", "").replace(".base_layer", ""): v.detach().clone()
                  for k, v in model.state_dict().items() if "lora_" not in k}
            model.unmerge_adapter()
        return sd
    return model.state_dict()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def save_checkpoint(path, model, opt, sched, step, pool, smoother, cfg, client=None, d: Dist = Dist()):
    """Sharded runs save full (unsharded) model and optimizer states, so the file is the same for any world size."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_sd, opt_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rngs = [None] * d.world
        torch.distributed.all_gather_object(rngs, rng_state())
    else:
        model_sd, opt_sd, rngs = dict(model.state_dict()), opt.state_dict(), [rng_state()]
    if not d.main:
        return
    state = {"model": model_sd, "optimizer": opt_sd,
             "scheduler": sched.state_dict(), "step": step, "pool": pool.state_dict(),
             "smoother": smoother.state_dict(), "config": asdict(cfg),
             "server_client": client.state_dict() if client else None, "rng": rngs[0], "rng_ranks": rngs}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)   # a kill during the save leaves the previous checkpoint intact
    pool.save(os.path.join(os.path.dirname(path), "pool.json"))   # readable lineage for eval.py gallery


def load_checkpoint(path, model, opt, sched, smoother, client=None, d: Dist = Dist()):
    state = torch.load(path, map_location="cpu", weights_only=False)
    if client and state.get("server_client"):
        client.load_state_dict(state["server_client"])
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    smoother.load_state_dict(state["smoother"])
    rngs = state.get("rng_ranks") or [state["rng"]]
    rng = rngs[d.rank] if len(rngs) == d.world else state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return state["step"], DataPool.from_state_dict(state["pool"])


# ----------------------------------------------------------------------------------------------------
# Pieces of the loop


def load_data(cfg: Config) -> DataPool:
    if cfg.data:
        path = cfg.data
    else:   # the built-in shapes dataset, written once next to the runs
        lo, hi = (int(v) for v in cfg.shapes_objects.split("-"))
        path = make_shapes(cfg.task, cfg.shapes_n, os.path.join(os.path.dirname(os.path.abspath(cfg.out_dir)), "data"),
                           seed=cfg.seed, objects=(lo, hi))
    samples = read_jsonl(path, cfg.task, cfg.image_root, strict=cfg.strict)
    if not samples:
        raise SystemExit(f"no valid samples in {path}")
    return DataPool(samples)


def batch_slots(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Slots for a step: a fresh seeded permutation each epoch, so the data order is a function of the step
    (resume needs no sampler state). Batches wrap across epoch boundaries."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n)
        out.append(random.Random(seed * 1_000_003 + epoch).sample(range(n), n)[i])
    return out


def majority_rewards(groups, prompts, task) -> tuple[list[list[float]], list]:
    """MM-UPT: per prompt (never by position), 1 for answers equivalent to the group's majority answer."""
    out, labels = [], []
    for g, p in zip(groups, prompts):
        if task == "math":
            answers = [R.extract_boxed(c.text) for c in g]
            r, lab = R.majority_vote_rewards(answers, R.math_equal)
        else:   # rec: boxes cluster when IoU >= 0.5 (consensus box = the largest cluster's first member)
            answers = [R.predicted_box(c.text, p.sample, p.input_size) for c in g]
            r, lab = R.majority_vote_rewards(answers, lambda a, b: R.iou(a, b) >= 0.5)
        out.append(r)
        labels.append(lab)
    return out, labels


def pseudo_label_correct(label, sample) -> bool:
    """A majority answer (math string or rec box in the original frame) against the gold label."""
    if label is None:
        return False
    if sample.task == "math":
        return sample.answer is not None and R.math_equal(label, sample.answer)
    return sample.solution is not None and R.iou(label, sample.solution) > 0.5


def score_groups(cfg, groups, prompts, smoother):
    """Rewards of every completion, (B, G) tensors by component, plus the Syn-GRPO statistics and descriptions."""
    parts = [[R.score_completion(c.text, p.sample, p.input_size, cfg.algo) for c in g] for g, p in zip(groups, prompts)]
    acc = torch.tensor([[x.accuracy for x in g] for g in parts])
    fmt = torch.tensor([[x.format for x in g] for g in parts])
    stats = {"diversity": float(np.mean([R.diversity(a.tolist()) for a in acc]))}   # Eq. 4, batch mean
    if cfg.reward == "majority":
        maj, labels = majority_rewards(groups, prompts, cfg.task)
        gold_acc = acc
        acc = torch.tensor(maj)
        # MM-UPT's reward is agreement alone (no format term); the format rate is still logged
        stats["format_rate"] = fmt.mean().item()
        fmt = torch.zeros_like(fmt)
        # how often the pseudo-label is right, where gold labels exist (TTRL's "reward acc"); never used as reward
        gold = [b for b, p in enumerate(prompts) if (p.sample.answer if cfg.task == "math" else p.sample.solution) is not None]
        if gold:
            stats["majority_acc"] = float(np.mean([pseudo_label_correct(labels[b], prompts[b].sample) for b in gold]))
            stats["gold_accuracy"] = gold_acc[gold].mean().item()
    div = torch.zeros_like(acc)
    descriptions = [None] * len(groups)
    if cfg.algo == "syn-grpo":
        v = [R.diversity(a.tolist()) for a in acc]
        v_s, v_batch, v_global = smoother(v)
        for b, g in enumerate(groups):
            div[b] = torch.tensor([R.diversity_reward(R.parse_score(c.text), v_s[b]) for c in g])
            descriptions[b] = R.select_description([c.text for c in g], div[b].tolist())
        stats.update(diversity_smoothed=float(np.mean(v_s)), diversity_global=v_global)
    return acc, fmt, div, stats, descriptions


def sft_phase(cfg, model, processor, pool, log, d: Dist = Dist()):
    """Supervised warm start on the gold answers (cross-entropy on completion tokens only); ranks split each batch."""
    if cfg.sft_steps <= 0:
        return
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.sft_lr)
    banned = vision_token_ids(processor)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    rng = random.Random(cfg.seed)
    labelled = [i for i in range(len(pool)) if pool.get(i).task != "math" or pool.get(i).answer is not None]
    if not labelled:
        print("sft: no labelled samples (unlabelled math data): skipping the warm start")
        return
    bar = tqdm(range(cfg.sft_steps), desc="sft", dynamic_ncols=True, disable=not d.main)
    for step in bar:
        idx = [labelled[rng.randrange(len(labelled))] for _ in range(cfg.batch_size * 2)]
        idx = [idx[k] for k in rank_share(len(idx), d)]
        prompts = [encode_prompt(processor, pool.get(i), cfg.algo) for i in idx]
        seqs = [(k, processor.tokenizer(gold_completion(p.sample, p.input_size, cfg.algo, idx[k]),
                                        add_special_tokens=False)["input_ids"] + [eos]) for k, p in enumerate(prompts)]
        batch = make_batch(prompts, seqs, processor.tokenizer.pad_token_id)
        logp, _ = completion_logprobs(model, batch, banned)
        loss = -(logp * batch[2]).sum() / batch[2].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 20 == 0 or step == cfg.sft_steps - 1:
            log({"phase": "sft", "sft_step": step, "sft_loss": loss.item()})


def start_local_server(cfg: Config):
    """The embedded default needs no second terminal: a data server process on a free loopback port."""
    state = os.path.join(cfg.out_dir, "server")
    os.makedirs(state, exist_ok=True)
    port_file = os.path.join(state, "port")
    if os.path.exists(port_file):
        os.remove(port_file)
    device = "cuda:1" if torch.cuda.device_count() > 1 else ("cuda:0" if torch.cuda.is_available() else "cpu")
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "server.py"),
                             "--port", "0", "--port-file", port_file, "--state-dir", state, "--pipeline", cfg.pipeline,
                             "--steps", str(cfg.pipeline_steps), "--device", device, "--parent-pid", str(os.getpid())],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(state, "server.log"), "a"))
    deadline = time.time() + 300
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the local data server did not start; see {state}/server.log")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{open(port_file).read().strip()}"


def synthesis_job(sample, description: str, seed: int, key: str) -> dict:
    """A data-server job: the source image, every gold box (the keep-mask) and the selected description."""
    with open(sample.image, "rb") as f:
        image_b64 = base64.b64encode(f.read()).decode()
    return {"sample_id": sample.id, "image_b64": image_b64, "boxes": sample.gold_boxes(), "description": description,
            "seed": seed, "key": key}


def absorb_result(r: dict, pool: DataPool, out_dir: str, step: int):
    """Put a finished synthesized image into the pool in place of its source (same labels, new image)."""
    if r.get("status") != "done" or r.get("sample_id") not in pool.samples or "image_b64" not in r:
        return None
    parent = pool.samples[r["sample_id"]]
    new_id = f"{parent.root}~{str(r['job_id'])[:12]}"
    boxes = r.get("boxes") or []
    if new_id in pool.samples or len(boxes) != len(parent.gold_boxes()):
        return None            # already absorbed, or not the labels we sent: keep the pool as it is
    path = os.path.join(out_dir, "synth", new_id.replace("/", "_") + ".png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path, "wb") as f:
            f.write(base64.b64decode(r["image_b64"]))
        load_image(path)
    except (ValueError, OSError):   # a corrupt result is dropped, never a crash of the run
        return None
    new = copy.deepcopy(parent)
    new.id, new.image = new_id, path
    if new.task == "rec":
        new.solution = boxes[0]
        new.meta["context_objects"] = [dict(o, bbox=b) for o, b in zip(parent.meta.get("context_objects", []), boxes[1:])]
    else:
        new.objects = [dict(o, bbox=b) for o, b in zip(parent.objects, boxes)]
    new.meta.update(description=r.get("description", ""), step=step, job_id=r["job_id"])
    return pool.replace(parent.id, new)


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        name = "--" + f.name.replace("_", "-")
        t = {"int | None": int, "float | None": float, "str | None": str}.get(str(f.type), None)
        if str(f.type) in ("bool", "bool | None"):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(name, type=t or type(f.default), default=f.default)
    p.epilog = "Prompt templates (data.PROMPTS):\n" + "\n".join(
        f"  {k}: {v}" for k, v in __import__("data").PROMPTS.items())
    return Config(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    resume_dir = cfg.resume
    if resume_dir:   # the run's own config wins; only the step budget may be extended
        saved = json.load(open(os.path.join(resume_dir, "config.json")))
        max_steps = cfg.max_steps
        cfg = Config(**{**saved, "resume": resume_dir, "out_dir": resume_dir})
        cfg.max_steps = max_steps if max_steps is not None else cfg.max_steps
    cfg = resolve_defaults(cfg)
    d = setup_distributed()
    os.makedirs(cfg.out_dir, exist_ok=True)
    if d.main:
        json.dump(asdict(cfg), open(os.path.join(cfg.out_dir, "config.json"), "w"), indent=1)
    seed = cfg.seed + 1_000_003 * d.rank      # rank 0 = a single-process run; other ranks sample other streams
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        if d.world > 1:   # N ranks share the machine's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world))

    # -- model, reference, optimizer ------------------------------------------------------------------
    model, processor = load_policy(cfg.model, dtype=dtype, device=device)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if d.world > 1:
        if cfg.lora_r or cfg.drop_zero_std or cfg.batch_size % d.world:
            raise SystemExit("torchrun: --batch-size must be a multiple of the number of processes; "
                             "--lora-r and --drop-zero-std are single-process only")
        shard_policy(model)
    banned = vision_token_ids(processor)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
    resuming = bool(resume_dir) and os.path.exists(ckpt_path)

    def log(row):
        if not d.main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    pool = load_data(cfg)
    if not resuming:
        if d.main:
            open(metrics_path, "w").close()
        sft_phase(cfg, model, processor, pool, log, d)
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
    ref = None
    if cfg.beta > 0 and d.world > 1:   # a sharded module cannot be deep-copied: load and shard the reference again
        ref = load_policy(cfg.model, dtype=dtype, device=device)[0].eval().requires_grad_(False)
        shard_policy(ref)
    elif cfg.beta > 0:   # with LoRA the reference is the base model (adapters disabled), no second copy
        ref = None if cfg.lora_r > 0 else copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    smoother = R.DiversitySmoother(cfg.gamma)
    server_proc, client, fixed_descriptions = None, None, None
    if cfg.algo == "syn-grpo" and cfg.synthesize and d.main:
        urls = [u for u in cfg.server_url.split(",") if u]
        if not urls:
            server_proc, url = start_local_server(cfg)
            urls = [url]
        client = DataServerClient(urls, cfg.server_token, log=tqdm.write)
        if cfg.descriptions:
            with open(cfg.descriptions) as f:
                fixed_descriptions = [l.strip() for l in f if l.strip()]
    start = 0
    if resuming:
        start, pool = load_checkpoint(ckpt_path, model, opt, sched, smoother, client, d)
        if d.main:
            with open(metrics_path) as f:   # drop lines logged after the checkpoint: they will be logged again
                keep = [l for l in f if json.loads(l).get("step", -1) < start]
            open(metrics_path, "w").writelines(keep)
    if cfg.algo == "sft":
        save_final(cfg, model, processor, d)
        return {}
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * len(pool) / cfg.batch_size)

    # -- rollout engine ------------------------------------------------------------------------------------
    if cfg.rollout_backend == "vllm":
        # one engine per rank (each rank generates its own prompts); --vllm-tp K splits each engine over K GPUs
        engine = VLLMRollout(resolve_model(cfg.model), processor, dtype="bfloat16" if device != "cpu" else "float32",
                             max_model_len=4096 if device != "cpu" else 1024, tensor_parallel_size=cfg.vllm_tp)
    else:   # synced: a rank whose sequences have all ended keeps stepping until every rank's have (FSDP collectives)
        engine = HFRollout(model, processor, synced=d.world > 1)
    dirty = True   # the engine's weights differ from the policy's

    if d.main:
        print(f"training {cfg.algo} on {len(pool)} {cfg.task} samples for {max_steps} steps on {d.world} process(es); "
              f"metrics: {metrics_path}")
    bar = tqdm(range(start, max_steps), initial=start, total=max_steps, desc=cfg.algo, dynamic_ncols=True,
               disable=not d.main)
    for step in bar:
        t0 = time.time()
        # -- sync weights into vLLM --------------------------------------------------------------------------
        t_sync = 0.0
        if cfg.rollout_backend == "vllm" and dirty:
            engine.push_weights(policy_state(model))
            t_sync = time.time() - t0
        dirty = False
        # -- generate ----------------------------------------------------------------------------------------
        t1 = time.time()
        mine = rank_share(cfg.batch_size, d)      # this rank's slots of the step's B prompts
        slots = batch_slots(step, cfg.batch_size, len(pool), cfg.seed)
        samples = [pool.get(slots[k]) for k in mine]
        prompts = [encode_prompt(processor, s, cfg.algo) for s in samples]
        model.eval()
        sampling = Sampling(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_tokens=cfg.max_new_tokens, seed=cfg.seed * 1_000_003 + step)
        seeds = [(cfg.seed * 1_000_003 + step) * 1000 + k for k in mine] if cfg.prompt_seeds else None
        groups = engine.generate(prompts, sampling, seeds=seeds)
        t2 = time.time()
        # -- reward and advantages (Eq. 1, Eq. 7) ---------------------------------------------------------------
        acc, fmt, div, stats, descriptions = score_groups(cfg, groups, prompts, smoother)
        rewards = acc + fmt + div                                               # (B, G)
        adv = group_advantages(rewards, cfg.adv_eps)                            # (B, G)
        zero_std = (rewards.std(1) == 0) if rewards.shape[1] > 1 else torch.ones(len(groups), dtype=torch.bool)
        if cfg.flip_advantage:
            adv = -adv
        keep = [b for b in range(len(groups)) if not (cfg.drop_zero_std and zero_std[b])]
        seqs = [(b, c.token_ids) for b in keep for c in groups[b]]
        seq_adv = torch.tensor([adv[b, j].item() for b in keep for j in range(len(groups[b]))])
        engine_logp = [c.logprobs for b in keep for c in groups[b]]
        # -- Syn-GRPO: send the selected descriptions (Eq. 8) to the data server; take in what has finished --------
        t_server = time.time()
        server_stats = {}
        if cfg.algo == "syn-grpo" and cfg.synthesize and d.world > 1:   # rank 0 submits every rank's descriptions
            everyone = [None] * d.world
            torch.distributed.all_gather_object(everyone, [(p.sample.id, t) for p, t in zip(prompts, descriptions)])
            chosen = [(pool.samples[i], t) for part in everyone for i, t in part]
        else:
            chosen = [(p.sample, t) for p, t in zip(prompts, descriptions)]
        if client:
            ids = []
            for b, (sample, desc) in enumerate(chosen):
                desc = fixed_descriptions[(step * len(chosen) + b) % len(fixed_descriptions)] if fixed_descriptions \
                    else desc
                if desc:
                    ids.append(client.submit(synthesis_job(sample, desc, seed=cfg.seed * 1_000_003 + step * 1000 + b,
                                                           key=f"{sample.id}@{step}")))
            results = client.collect()
            deadline = time.time() + 600
            while cfg.sync and client.waiting([i for i in ids if i]) and time.time() < deadline:
                time.sleep(0.05)          # --sync: the paper's synchronous baseline waits for this step's images
                results += client.collect()
            absorbed = [absorb_result(r, pool, cfg.out_dir, step) for r in results]
            server_stats = {"jobs_submitted": sum(i is not None for i in ids), "jobs_absorbed": sum(a is not None for a in absorbed),
                            "jobs_pending": len(client.pending), "jobs_failed": client.failed}
        if cfg.algo == "syn-grpo" and cfg.synthesize and d.world > 1:   # every rank continues with rank 0's pool
            update = broadcast(pool.state_dict() if server_stats.get("jobs_absorbed") else None, d)
            if update is not None:
                pool = DataPool.from_state_dict(update)
        t3 = time.time()
        # -- policy update: mu optimizer steps on this batch ---------------------------------------------------
        model.train()
        train_stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "logp_engine_gap": 0.0}
        if seqs:
            chunks = [seqs[i:i + cfg.micro_batch] for i in range(0, len(seqs), cfg.micro_batch)]
            batches = [make_batch(prompts, ch, processor.tokenizer.pad_token_id) for ch in chunks]
            n_tok = sum(b[2].sum().item() for b in batches)
            # FSDP averages gradients over ranks, so each rank normalises by 1/N of the global batch's count
            n_tok_all = n_tok
            if d.world > 1:
                t = torch.tensor([float(n_tok)])
                torch.distributed.all_reduce(t)
                n_tok_all = t.item() / d.world
            norm = {"grpo": len(seqs), "dapo": n_tok_all, "dr_grpo": len(seqs) * cfg.max_new_tokens}[cfg.loss_type]
            # old log-probs: with mu = 1 they are the first (only) update's own, detached (ratio exactly 1, as TRL
            # does); with mu > 1 one no-grad pass fixes them before the first update
            with torch.no_grad():
                old = [completion_logprobs(model, b, banned, cfg.temperature)[0] for b in batches] if cfg.mu > 1 \
                    else [None] * len(batches)
                if cfg.beta > 0:
                    if ref is None:
                        with model.disable_adapter():
                            refs = [completion_logprobs(model, b, banned, cfg.temperature)[0] for b in batches]
                    else:
                        refs = [completion_logprobs(ref, b, banned, cfg.temperature)[0] for b in batches]
            gap = []
            for it in range(cfg.mu):
                opt.zero_grad(set_to_none=True)
                o = 0
                for k, b in enumerate(batches):
                    mask = b[2].to(logp_device(model))
                    a = seq_adv[o:o + mask.shape[0]].to(mask.device)[:, None].expand_as(mask)   # (n, T)
                    o += mask.shape[0]
                    logp, ent = completion_logprobs(model, b, banned, cfg.temperature, with_entropy=True)
                    if it == 0:
                        if old[k] is None:
                            old[k] = logp.detach()
                        gap += engine_gap(old[k], engine_logp[o - mask.shape[0]:o])
                    if cfg.entropy_adv > 0:
                        a = entropy_shaped_advantage(a, ent, cfg.entropy_adv, cfg.entropy_adv_kappa)
                    surr, clipped = clipped_surrogate(logp, old[k], a, cfg.epsilon_low, cfg.epsilon_high)
                    per_tok = -surr - cfg.entropy_coef * ent
                    if cfg.beta > 0:
                        kl = kl_k3(logp, refs[k])
                        per_tok = per_tok + cfg.beta * kl
                        train_stats["kl"] += ((kl * mask).sum() / n_tok).item() / cfg.mu
                    loss = aggregate(per_tok, mask, cfg.loss_type, norm)
                    loss.backward()
                    train_stats["loss"] += loss.item() / cfg.mu
                    train_stats["clip_frac"] += ((clipped.float() * mask).sum() / n_tok).item() / cfg.mu
                    train_stats["entropy"] += ((ent.detach() * mask).sum() / n_tok).item() / cfg.mu
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
            train_stats["logp_engine_gap"] = float(np.max(gap)) if gap else 0.0
            dirty = True
        t4 = time.time()
        # -- log ---------------------------------------------------------------------------------------------
        lens = [len(c.token_ids) for g in groups for c in g]
        row = {"step": step, "reward": rewards.mean().item(), "reward_accuracy": acc.mean().item(),
               "reward_format": fmt.mean().item(), "reward_diversity": div.mean().item(), **stats, **train_stats,
               "frac_reward_zero_std": zero_std.float().mean().item(), "completion_len": float(np.mean(lens)),
               "lr": sched.get_last_lr()[0], **pool.stats(), **server_stats,
               "batch_synth_frac": float(np.mean([s.generation > 0 for s in samples])),
               "time_generate": t2 - t1, "time_reward": t_server - t2, "time_server": t3 - t_server,
               "time_train": t4 - t3, "time_sync": t_sync, "time_step": time.time() - t0}
        row = mean_over_ranks(row, d)
        log(row)
        if cfg.log_completions and d.main:
            with open(os.path.join(cfg.out_dir, "completions.jsonl"), "a") as f:
                for g, p in list(zip(groups, prompts))[:cfg.log_completions]:
                    f.write(json.dumps({"step": step, "id": p.sample.id, "completions": [c.text for c in g],
                                        "descriptions": descriptions[0]}) + "\n")
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['reward_accuracy']:.3f}")
        # -- checkpoint --------------------------------------------------------------------------------------
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == max_steps):
            save_checkpoint(ckpt_path, model, opt, sched, step + 1, pool, smoother, cfg, client, d)
    if server_proc:
        server_proc.terminate()
        server_proc.wait()
    if d.main:
        pool.save(os.path.join(cfg.out_dir, "pool.json"))
    save_final(cfg, model, processor, d)
    if d.main:
        print(f"done: metrics {metrics_path}, checkpoint {ckpt_path}, model {os.path.join(cfg.out_dir, 'final')}")
    return row if max_steps > start else {}


def save_final(cfg, model, processor, d: Dist = Dist()):
    """An HF checkpoint dir (LoRA merged) that eval.py, train.py --model and vLLM load directly. Sharded runs
    also check that every rank holds the same full weights and log their digests."""
    final = os.path.join(cfg.out_dir, "final")
    if is_sharded(model):
        sd = policy_state(model)
        if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)   # tied to the embeddings: HF checkpoints store it once
        digest = hashlib.sha256(b"".join(sd[k].detach().cpu().contiguous().numpy().tobytes() for k in sorted(sd))).hexdigest()
        digests = [None] * d.world
        torch.distributed.all_gather_object(digests, digest)
        if d.main:
            model.save_pretrained(final, state_dict=sd)
            processor.save_pretrained(final)
            with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"phase": "final", "weights_sha256_by_rank": digests}) + "\n")
        torch.distributed.barrier()
        return
    m = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    m.save_pretrained(final)
    processor.save_pretrained(final)


if __name__ == "__main__":
    main(parse_args())
