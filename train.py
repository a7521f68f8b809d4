"""Training: SFT, GRPO and Syn-GRPO for Qwen2.5-VL (and the other families of models.py) on visual perception (and math)
tasks, in one visible loop.

    python train.py                                   # embedded default: tiny model, shapes REC, SFT warm start + GRPO
    python train.py --algo grpo --task rec --model Qwen/Qwen2.5-VL-3B-Instruct --data refcoco_train.jsonl \\
        --image-root /data/coco --rollout-backend vllm   # the paper's setting: B=20, G=6, lr 1e-6, 5 epochs
    python train.py --resume runs/default             # continue a killed run exactly where its checkpoint was
    python train.py --plan --device cuda --plan-gpus 4   # memory per GPU of a run, without loading its weights

The step is the `for step` loop at the end of `main`, one function per phase, small records between them:
  push_weights        the rollout engine samples from the policy's current weights (vLLM holds a copy)
  rollout             B prompts from the data pool, G completions each (rollout.py)             -> Rollout
  score               rewards by component and their sum (Eq. 1-7, rewards.score_groups), group
                      advantages (Eq. 1)                                                         -> Scored
  synthesis.exchange  Syn-GRPO: each prompt's selected description (Eq. 8) to the data server, finished images
                      into the pool in place of their sources (`NoSynthesis` for the other algorithms)
  update_policy       mu optimizer steps of the clipped surrogate (+ beta * k3 KL, entropy terms) on MicroBatches
  log_step            one line of metrics.jsonl (and completions.jsonl), and the trackers of --report-to
  validate            every --eval-every updates: eval.py's greedy evaluation of --eval-data
  save_checkpoint     every --save-every steps: everything an exact resume needs

Deliberate choices: the std in Eq. 1 is torch's unbiased std, as VLM-R1 and TRL; old log-probs for the ratio
are recomputed by the trainer (not taken from the engine) so that the ratio is exactly 1 at the first of the
mu updates; the engine's log-probs are only compared with them (`logp_engine_gap`).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

import rewards as R
from checkpoint import (clear_run, load_checkpoint, policy_state, rotate_checkpoints, save_checkpoint, save_final, save_hf,
                        trim_logs)
from common import (CACHE, SEED_STRIDE, Dist, Stream, all_gather, all_reduce_sum, append_jsonl, atomic_write, config_from,
                    derive_seed, mean_over_ranks, rank_share, setup_distributed)
from config import Config, check_distributed, command_line, prepare_config, reward_weights
from data import DataPool, gold_completion, read_rows_or_stop, read_template, source_name
from eval import load_split, predict, score_rows
from plan import plan_command
from preflight import preflight
from models import (LORA_TARGETS, UnsupportedModel, family_of, load_policy, resolve_model, stop_token_ids,
                    vision_blocks, vision_modules, vision_token_ids)
from rollout import (Completion, HFRollout, MicroBatch, Prompt, Sampling, VLLMRollout, completion_logprobs,
                     encode_prompt, engine_gap, make_batch, max_num_seqs)
from shapes import make_shapes
from synthesis import NoSynthesis, Synthesis, synthesize_offline
from tracking import Trackers

__all__ = ["Config", "main", "parse_args"]   # train.Config, train.main and train.parse_args: the run as a library


def parse_args(argv=None) -> Config:
    return config_from(Config, command_line(__doc__).parse_args(argv))


# ----------------------------------------------------------------------------------------------------
# Pure math (shapes: B prompts, G completions, N = B*G sequences, T completion tokens)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Eq. 1: (r - mean) / (std + eps) within each group. rewards (B, G) -> (B, G)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


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
# Data order: a function of (--seed, step), so that a resumed run needs no sampler state


def batch_slots(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Slots for a step: a fresh seeded permutation each epoch, so the data order is a function of the step
    (resume needs no sampler state). Batches wrap across epoch boundaries."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n)
        out.append(random.Random(derive_seed(seed, Stream.DATA_ORDER, epoch)).sample(range(n), n)[i])
    return out


# ----------------------------------------------------------------------------------------------------
# Phases of a step, in order (torchrun: each rank takes a contiguous share of the B prompts; common.py's collectives)


def push_weights(engine, model) -> None:
    """The engine samples from the policy's current weights: vLLM holds its own copy, replaced after every update
    (HF generates with the policy itself)."""
    if engine.copies_weights:
        engine.push_weights(policy_state(model))


@dataclass
class Rollout:
    prompts: list[Prompt]             # this rank's share of the step's B prompts; each holds its Sample
    groups: list[list[Completion]]    # G completions per prompt


def rollout(engine, processor, model, pool: DataPool, cfg: Config, step: int, d: Dist, template: str = "") -> Rollout:
    """G completions for each of this rank's prompts of the step."""
    mine = rank_share(cfg.batch_size, d)      # this rank's slots of the step's B prompts
    slots = batch_slots(step, cfg.batch_size, len(pool), cfg.seed)
    prompts = [encode_prompt(processor, pool.get(slots[k]), cfg.algo, math_format=cfg.math_format, template=template)
               for k in mine]
    sampling = Sampling(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                        max_tokens=cfg.max_new_tokens, seed=derive_seed(cfg.seed, Stream.SAMPLING, step))
    seeds = [derive_seed(cfg.seed, Stream.PROMPT_SAMPLING, step, k) for k in mine] if cfg.prompt_seeds else None
    model.eval()
    groups = engine.generate(prompts, sampling, seeds=seeds)
    engine.sleep()                            # its GPU memory goes to the update (vLLM sleep mode; else a no-op)
    return Rollout(prompts, groups)


def step_smoother(smoother: R.DiversitySmoother, d: Dist):
    """Diversity smoothing (§3.3.2) over the step's whole batch: V_batch and V_global are taken over every rank's
    prompts, so every rank holds the same smoother and a run gives the same rewards for any number of processes
    (each rank holds the same number of prompts, in rank order)."""
    def smooth(v: list[float]):
        everyone = [x for part in all_gather(v, d) for x in part]
        v_smoothed, v_batch, v_global = smoother(everyone)
        return v_smoothed[d.rank * len(v):(d.rank + 1) * len(v)], v_batch, v_global
    return smooth


@dataclass
class Scored:
    rewards: R.GroupRewards           # (B, G) by component; .total is Eq. 7
    advantages: torch.Tensor          # (B, G) Eq. 1 (negated under --flip-advantage)
    zero_std: torch.Tensor            # (B,) True where the group's rewards are all equal: no gradient


def score(cfg: Config, ro: Rollout, smoother: R.DiversitySmoother, d: Dist, custom=None) -> Scored:
    """Rewards of every completion (Eq. 2-7, plus a --reward-function's term) and the group advantages (Eq. 1)."""
    try:
        rw = R.score_groups([[c.text for c in g] for g in ro.groups], [p.sample for p in ro.prompts],
                            [p.frame_size for p in ro.prompts], algo=cfg.algo, reward=cfg.reward,
                            smooth=step_smoother(smoother, d), with_diversity_reward=cfg.diversity_reward,
                            weights=reward_weights(cfg), math_format=cfg.math_format, custom=custom)
    except R.RewardFunctionError as e:   # passed the start-up check, failed on this step's completions
        raise SystemExit(f"train.py: {e} (the newest checkpoint is in {cfg.out_dir})")
    total = rw.total                                                        # (B, G)
    adv = group_advantages(total, cfg.adv_eps)                              # (B, G)
    return Scored(rewards=rw, advantages=-adv if cfg.flip_advantage else adv, zero_std=total.std(1) == 0)


def micro_batches(ro: Rollout, scored: Scored, cfg: Config, pad_id: int) -> list[MicroBatch]:
    """The step's sequences, --micro-batch at a time, each with its group advantage and the engine's log-probs
    (under --drop-zero-std, the groups whose rewards are all equal are left out)."""
    keep = [b for b in range(len(ro.groups)) if not (cfg.drop_zero_std and scored.zero_std[b])]
    seqs = [(b, j, c) for b in keep for j, c in enumerate(ro.groups[b])]
    out = []
    for i in range(0, len(seqs), cfg.micro_batch):
        chunk = seqs[i:i + cfg.micro_batch]
        mb = make_batch(ro.prompts, [(b, c.token_ids) for b, _, c in chunk], pad_id, cfg.shared_prefix)
        mb.advantages = torch.tensor([scored.advantages[b, j].item() for b, j, _ in chunk])     # (n,)
        mb.engine_logprobs = [c.logprobs for _, _, c in chunk]
        out.append(mb)
    return out


def grpo_loss(logp, ent, old_logp, ref_logp, batch: MicroBatch, cfg: Config, norm: float):
    """The objective of one micro-batch (§3.1): clipped surrogate, minus the entropy bonus, plus beta * k3 KL.
    logp, ent, old_logp, ref_logp: (n, T). Returns (loss, per-token KL or None, clipped mask)."""
    mask = batch.completion_mask.to(logp.device)
    adv = batch.advantages.to(mask.device)[:, None].expand_as(mask)                       # (n, T)
    if cfg.entropy_adv > 0:
        adv = entropy_shaped_advantage(adv, ent, cfg.entropy_adv, cfg.entropy_adv_kappa)
    surr, clipped = clipped_surrogate(logp, old_logp, adv, cfg.epsilon_low, cfg.epsilon_high)
    per_tok = -surr - cfg.entropy_coef * ent if cfg.entropy_in_loss else -surr
    kl = None
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        per_tok = per_tok + cfg.beta * kl
    return aggregate(per_tok, mask, cfg.loss_type, norm), kl, clipped


@torch.no_grad()
def fixed_logprobs(model, ref, batches: list[MicroBatch], cfg: Config, banned: list[int]):
    """Log-probs that stay fixed over the mu updates: old (one pass when mu > 1; with mu = 1 the update's own,
    detached, are used: the ratio is exactly 1, as in TRL) and the reference's when beta > 0 (with LoRA the
    reference is the base model, adapters disabled)."""
    lp = lambda m, b: completion_logprobs(m, b, banned, cfg.temperature)[0]
    old = [lp(model, b) for b in batches] if cfg.mu > 1 else [None] * len(batches)
    if cfg.beta <= 0:
        return old, [None] * len(batches)
    if ref is None:
        with model.disable_adapter():
            return old, [lp(model, b) for b in batches]
    return old, [lp(ref, b) for b in batches]


def loss_normaliser(batches: list[MicroBatch], cfg: Config, d: Dist) -> tuple[float, float]:
    """(this rank's completion tokens, the aggregation's normaliser). FSDP averages gradients over ranks, so each
    rank normalises by 1/N of the global batch's token count."""
    n_tok = sum(b.completion_mask.sum().item() for b in batches)
    n_tok_all = all_reduce_sum(n_tok, d) / d.world if d.world > 1 else n_tok
    n_seq = sum(len(b.completion_mask) for b in batches)
    return n_tok, {"grpo": n_seq, "dapo": n_tok_all, "dr_grpo": n_seq * cfg.max_new_tokens}[cfg.loss_type]


def update_policy(model, ref, optimizer, sched, batches: list[MicroBatch], cfg: Config, d: Dist,
                  banned: list[int]) -> dict:
    """mu optimizer steps on the step's micro-batches; returns the mean loss, KL, clip fraction, entropy and the
    largest trainer-vs-engine log-prob gap."""
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "entropy_per_completion": 0.0,
             "logp_engine_gap": 0.0}
    if not batches:
        return stats
    model.train()
    n_tok, norm = loss_normaliser(batches, cfg, d)
    n_seq = sum(len(b.completion_mask) for b in batches)
    old, refs = fixed_logprobs(model, ref, batches, cfg, banned)
    gap = []
    for it in range(cfg.mu):
        optimizer.zero_grad(set_to_none=True)
        for k, b in enumerate(batches):
            logp, ent = completion_logprobs(model, b, banned, cfg.temperature, with_entropy=True,
                                            entropy_grad=cfg.entropy_in_loss)
            if it == 0:
                old[k] = logp.detach() if old[k] is None else old[k]
                gap += engine_gap(old[k], b.engine_logprobs)
            loss, kl, clipped = grpo_loss(logp, ent, old[k], refs[k], b, cfg, norm)
            loss.backward()
            mask = b.completion_mask.to(logp.device)
            stats["loss"] += loss.item() / cfg.mu
            if kl is not None:
                stats["kl"] += ((kl * mask).sum() / n_tok).item() / cfg.mu
            stats["clip_frac"] += ((clipped.float() * mask).sum() / n_tok).item() / cfg.mu
            stats["entropy"] += ((ent.detach() * mask).sum() / n_tok).item() / cfg.mu
            # the paper's H(q) (Fig. 2): each completion's mean token entropy, then the mean over completions
            stats["entropy_per_completion"] += aggregate(ent.detach(), mask, "grpo", n_seq).item() / cfg.mu
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        sched.step()
    stats["logp_engine_gap"] = float(np.max(gap)) if gap else 0.0
    return stats


class NoSignal:
    """A run that cannot learn says so: when every group's rewards have been equal (no advantage, no gradient) for
    STEPS steps in a row, one warning names the likely causes."""
    STEPS = 5

    def __init__(self):
        self.streak, self.warned = 0, False

    def see(self, frac_zero_std: float, d: Dist) -> None:
        self.streak = self.streak + 1 if frac_zero_std >= 1.0 else 0
        if self.streak == self.STEPS and not self.warned and d.main:
            self.warned = True
            tqdm.write(f"warning: every group's rewards were equal for {self.STEPS} steps in a row, so GRPO learns "
                       "nothing (loss 0). Likely causes: a warm start too short for the model to answer in the format "
                       "(--sft-steps; the tiny models need 600), a reward that does not fit the data (--task, "
                       "--reward, --reward-weights), or answers in another box frame (--min-pixels / --max-pixels)",
                       file=sys.stderr)


class PhaseTimer:
    """Seconds spent in each phase of one step, logged as time_<phase> and time_step."""

    def __init__(self):
        self.start, self.seconds = time.time(), {}

    @contextmanager
    def __call__(self, phase: str):
        t = time.time()
        yield
        self.seconds[f"time_{phase}"] = time.time() - t

    def row(self) -> dict:
        return {**self.seconds, "time_step": time.time() - self.start}


def step_metrics(step: int, ro: Rollout, scored: Scored, update: dict, jobs: dict, pool: DataPool,
                 lr: float, timer: PhaseTimer) -> dict:
    """One line of metrics.jsonl (README "Training outputs" lists the keys)."""
    rw = scored.rewards
    lens = [len(c.token_ids) for g in ro.groups for c in g]
    custom = {} if rw.custom is None else {"reward_custom": rw.custom.mean().item()}
    return {"step": step, "reward": rw.total.mean().item(), "reward_accuracy": rw.accuracy.mean().item(),
            "reward_format": rw.format.mean().item(), "reward_diversity": rw.diversity.mean().item(), **custom,
            **rw.stats, **update, "frac_reward_zero_std": scored.zero_std.float().mean().item(),
            "completion_len": float(np.mean(lens)), "lr": lr,
            "completions_clipped": float(np.mean([not c.finished for g in ro.groups for c in g])),
            **pool.stats(), **jobs,
            "batch_synth_frac": float(np.mean([p.sample.generation > 0 for p in ro.prompts])),
            **variance_by_origin(ro, scored), **timer.row()}


def variance_by_origin(ro: Rollout, scored: Scored) -> dict:
    """Eq. 4's V(q), the mean over this step's synthesized prompts and over its original ones (None where there
    are none): do synthesized images keep the groups' answers diverse (Fig. 2)?"""
    v = [R.diversity(a.tolist()) / 4 for a in scored.rewards.accuracy]
    synth = [p.sample.generation > 0 for p in ro.prompts]
    mean = lambda xs: float(np.mean(xs)) if xs else None
    return {"variance_synth": mean([x for x, s in zip(v, synth) if s]),
            "variance_original": mean([x for x, s in zip(v, synth) if not s])}


def log_step(row: dict, ro: Rollout, scored: Scored, sent: list, cfg: Config, d: Dist) -> dict:
    """metrics.jsonl (averaged over ranks, written by rank 0) and the first prompts' completions, each with the
    description Eq. 8 selected and the one sent to the data server (None: none was; --descriptions sends its own)."""
    row = mean_over_ranks(row, d)
    if d.main:
        append_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"), [row])
        append_jsonl(os.path.join(cfg.out_dir, "completions.jsonl"), [
            {"step": row["step"], "id": p.sample.id, "prompt": p.text, "completions": [c.text for c in g],
             "description": scored.rewards.descriptions[b], "description_sent": sent[b]}
            for b, (p, g) in enumerate(zip(ro.prompts[:cfg.log_completions], ro.groups))])
    return row



# ----------------------------------------------------------------------------------------------------
# Supervised fine-tuning: the warm start before RL, and the whole of --algo sft


def sft_phase(cfg, model, processor, pool, d: Dist = Dist(), template: str = "") -> int:
    """Supervised fine-tuning on the gold answers (cross-entropy on completion tokens only): the warm start before RL,
    or the whole of --algo sft (--sft-steps, or --epochs over the data when 0). 2B samples a step, drawn uniformly;
    ranks split them, micro-batched, and the loss is normalised by every rank's tokens together, so the gradient is
    that of one process. template: --prompt-template's text, as in the rollouts. Returns the steps trained."""
    labelled = [i for i in range(len(pool)) if pool.get(i).task != "math" or pool.get(i).answer is not None]
    n = 2 * cfg.batch_size
    steps = cfg.sft_steps or (math.ceil(cfg.epochs * len(labelled) / n) if cfg.algo == "sft" else 0)
    if cfg.algo == "sft" and not labelled:   # a run that trains nothing must not save the model as if trained
        raise SystemExit("train.py: --algo sft needs labelled samples; every row of the data lacks its answer")
    if steps and not labelled:
        print("sft: no labelled samples (unlabelled math data): skipping the warm start")
        return 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.sft_lr,
                                  weight_decay=cfg.sft_weight_decay) if steps else None
    banned, eos = vision_token_ids(processor), stop_token_ids(processor)[0]     # eos: the end of the model's turn
    fmt = cfg.sft_format or ("grpo" if cfg.algo == "sft" else cfg.algo)
    formats = ("grpo", "syn-grpo") if fmt == "both" else (fmt,)   # both: a step's k-th sequence in formats[k % 2]
    rng = random.Random(cfg.seed)   # the warm start's draws, as measured (the tiny models' warm starts depend on them)
    for step in tqdm(range(steps), desc="sft", dynamic_ncols=True, disable=not d.main):
        idx = [labelled[rng.randrange(len(labelled))] for _ in range(n)]
        mine = rank_share(len(idx), d)
        idx, fmts = [idx[k] for k in mine], [formats[k % len(formats)] for k in mine]
        prompts = [encode_prompt(processor, pool.get(i), f, math_format=cfg.math_format, template=template)
                   for i, f in zip(idx, fmts)]
        seqs = [(k, processor.tokenizer(gold_completion(p.sample, p.frame_size, fmts[k], idx[k], cfg.math_format),
                                        add_special_tokens=False)["input_ids"] + [eos]) for k, p in enumerate(prompts)]
        batches = [make_batch(prompts, seqs[i:i + cfg.micro_batch], processor.tokenizer.pad_token_id)
                   for i in range(0, len(seqs), cfg.micro_batch)]
        _, norm = loss_normaliser(batches, replace(cfg, loss_type="dapo"), d)
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for b in batches:
            logp, _ = completion_logprobs(model, b, banned)
            part = -(logp * b.completion_mask).sum() / norm
            part.backward()
            loss += part.item() / d.world
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        if step % 20 == 0 or step == steps - 1:   # the mean token loss over every rank's sequences
            row = {"phase": "sft", "sft_step": step, "sft_loss": sum(all_gather(loss, d))}
            if d.main:
                append_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"), [row])
    return steps


# ----------------------------------------------------------------------------------------------------
# Set-up: data, model, warm start, reference, optimizer, resume, rollout engine

def shard_policy(model) -> None:
    """FSDP2: one unit per vision block and per decoder layer, then the root (patch embedding, merger, embeddings,
    lm_head). `generate` is registered as a forward of the root: HF runs the vision tower from inside generate,
    outside the model's forward, to precompute image features."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for block in vision_blocks(model):
        fully_shard(block)
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, "generate")



def load_data(cfg: Config) -> DataPool:
    if cfg.data:
        path = cfg.data
    else:   # the built-in shapes dataset, written once into the cache (a start that stops leaves no run folder)
        lo, hi = (int(v) for v in cfg.shapes_objects.split("-"))
        path = make_shapes(cfg.task, cfg.shapes_n, os.path.join(CACHE, "shapes"), seed=cfg.seed, objects=(lo, hi))
    samples = read_rows_or_stop(path, cfg.task, cfg.image_root, cfg.strict, "train.py")
    if cfg.max_samples and cfg.max_samples < len(samples):   # a seeded subset, in the file's order
        keep = sorted(random.Random(derive_seed(cfg.seed, Stream.SUBSET)).sample(range(len(samples)), cfg.max_samples))
        samples = [samples[i] for i in keep]
    return DataPool(samples)


def epoch_steps(pool: DataPool, epochs: int, batch_size: int) -> int:
    """Steps of --epochs over the original samples: slots that offline synthesis added do not lengthen the run (the
    'GRPO + Offline Generation' row trained twice the samples of every other row when they did)."""
    originals = sum(pool.samples[slot].generation == 0 for slot in pool.slots)
    return math.ceil(epochs * originals / batch_size)


def load_model(cfg: Config, d: Dist, device: str, dtype: torch.dtype):
    """The policy: vision tower frozen or not, gradient checkpointing, FSDP2 under torchrun."""
    try:
        model, processor = load_policy(cfg.model, dtype=dtype, device=device, min_pixels=cfg.min_pixels,
                                       max_pixels=cfg.max_pixels)
    except UnsupportedModel as e:   # a hub id whose config was not here before the download
        raise SystemExit(f"train.py: --model {cfg.model}: {e}")
    if cfg.freeze_vision:
        for part in vision_modules(model):
            part.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if d.world > 1:
        shard_policy(model)
    return model, processor


def add_lora(cfg: Config, model):
    """LoRA adapters on the language model's projections, if asked (after the warm start, which trains the model)."""
    if cfg.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model
    experts = list(family_of(model.config.model_type).experts) or None      # MoE: the fused experts too
    return get_peft_model(model, LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
        target_modules=rf".*language_model.*\.({'|'.join(LORA_TARGETS)})", target_parameters=experts))


def make_reference(cfg: Config, model, processor, d: Dist, device: str, dtype: torch.dtype, warm_started: bool,
                   resuming: bool):
    """The KL term's reference: the model RL starts from, i.e. after any warm start. The warm start is saved as
    OUT/reference, which a resumed run and every rank under torchrun load. None when beta = 0, and with LoRA (the
    reference is then the base model with the adapters disabled: the warm-started weights themselves)."""
    if cfg.beta <= 0 or cfg.lora_r > 0:
        return None
    path = os.path.join(cfg.out_dir, "reference")
    if warm_started:
        save_hf(model, processor, path, d)
    if d.world == 1 and not resuming:
        return copy.deepcopy(model).eval().requires_grad_(False)
    ref = load_policy(path if os.path.isdir(path) else cfg.model, dtype=dtype, device=device)[0]
    ref.eval().requires_grad_(False)
    if d.world > 1:   # a sharded module cannot be deep-copied: load and shard the reference again
        shard_policy(ref)
    return ref


def make_engine(cfg: Config, model, processor, d: Dist, device: str):
    if cfg.rollout_backend == "vllm":
        # one engine per rank (each rank generates its own prompts); --vllm-tp K splits each engine over K GPUs
        return VLLMRollout(resolve_model(cfg.model), processor, dtype="bfloat16" if device != "cpu" else "float32",
                           max_model_len=cfg.max_model_len, tensor_parallel_size=cfg.vllm_tp,
                           max_num_seqs=max_num_seqs(cfg.batch_size // d.world, cfg.num_generations),
                           gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, sleep_mode=cfg.vllm_sleep_mode,
                           min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return HFRollout(model, processor, synced_gpus=d.world > 1, one_prefill=cfg.shared_prefix)


@dataclass
class Run:
    """Everything the loop works with, made by `set_up`."""
    model: torch.nn.Module
    processor: object
    ref: torch.nn.Module | None       # the KL term's reference (None: beta = 0, or LoRA's base model)
    optimizer: torch.optim.Optimizer
    sched: object
    pool: DataPool
    smoother: R.DiversitySmoother
    synthesis: Synthesis | NoSynthesis
    start: int                        # the step to begin at (after a resume)
    max_steps: int
    template: str = ""                # --prompt-template's text ('' = the built-in prompts)
    custom_reward: object = None      # --reward-function, checked (rewards.load_reward_function)
    eval_splits: dict = field(default_factory=dict)   # --eval-data: split name -> samples


def set_up(cfg: Config, d: Dist) -> Run:
    # each process's global streams (HF generation samples from torch's): rank 0's is a single process's
    seed = cfg.seed + SEED_STRIDE * d.rank
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    device = f"cuda:{torch.cuda.current_device()}" if cfg.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        if d.world > 1:   # N ranks share the machine's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world))
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
    resuming = bool(cfg.resume) and os.path.exists(ckpt_path)
    # the data, the custom reward and the validation splits before the model: a broken one stops the start at once
    eval_splits, pool, warm_started = load_eval_splits(cfg), load_data(cfg), False
    custom_reward = load_custom_reward(cfg, pool)
    template = read_template(cfg.prompt_template, cfg.task)       # checked in check_config
    model, processor = load_model(cfg, d, device, dtype)
    if d.main:   # only now, every check passed: a start that stops earlier leaves --out-dir as it was
        start_run_dir(cfg, resuming)
    if not resuming:
        warm_started = sft_phase(cfg, model, processor, pool, d, template) > 0
        if cfg.offline_synthesis:
            pool = synthesize_offline(cfg, pool, d)
    model = add_lora(cfg, model)
    ref = make_reference(cfg, model, processor, d, device, dtype, warm_started, resuming)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    smoother = R.DiversitySmoother(cfg.gamma)
    synthesis = Synthesis(cfg, d) if cfg.algo == "syn-grpo" and cfg.synthesize else NoSynthesis()
    start = 0
    if resuming:
        start, pool = load_checkpoint(ckpt_path, model, optimizer, sched, smoother, synthesis, d)
        if d.main:
            trim_logs(cfg.out_dir, start)   # lines logged after the checkpoint will be logged again
    max_steps = cfg.max_steps or epoch_steps(pool, cfg.epochs, cfg.batch_size)
    return Run(model, processor, ref, optimizer, sched, pool, smoother, synthesis, start, max_steps,
               template=template, custom_reward=custom_reward, eval_splits=eval_splits)


def start_run_dir(cfg: Config, resuming: bool) -> None:
    """The run's folder: an earlier run's outputs removed (a fresh start here was allowed: --overwrite, or --resume
    auto before any checkpoint), config.json written, metrics.jsonl started."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    if not resuming:
        clear_run(cfg.out_dir)
    with atomic_write(os.path.join(cfg.out_dir, "config.json")) as f:
        json.dump(asdict(cfg), f, indent=1)
    if not resuming:
        open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w").close()


def load_custom_reward(cfg: Config, pool: DataPool):
    """--reward-function, imported and called once on gold answers of the first samples: a broken one stops the
    run here, before the first step."""
    if not cfg.reward_function:
        return None
    samples = [pool.get(i) for i in range(min(2, len(pool)))]
    probe = [gold_completion(s, (s.width, s.height), cfg.algo, math_format=cfg.math_format) for s in samples]
    try:
        return R.load_reward_function(cfg.reward_function, (probe, samples))
    except R.RewardFunctionError as e:
        raise SystemExit(f"train.py: {e}")


def load_eval_splits(cfg: Config) -> dict:
    """--eval-data as eval.py reads benchmark splits: name -> samples (a seeded subset under --eval-limit)."""
    splits = {}
    for source in cfg.eval_data:
        splits[source_name(source)] = load_split(source, cfg.task, cfg.eval_image_root, limit=cfg.eval_limit,
                                                 prog="train.py --eval-data")
    return splits


def validate(engine, run: Run, cfg: Config, d: Dist, updates: int) -> dict:
    """eval.py's greedy evaluation of --eval-data with the current policy, every rank generating its share (padded to
    equal counts: generation under FSDP is collective); one metrics.jsonl row {"phase": "eval", "eval_step": updates,
    "eval/<split>/<metric>": value}."""
    push_weights(engine, run.model)
    run.model.eval()
    row = {"phase": "eval", "eval_step": updates}
    for split, samples in run.eval_splits.items():
        share = samples[d.rank::d.world]
        width = math.ceil(len(samples) / d.world)
        padded = share + [samples[0]] * (width - len(share))
        rows = predict(engine, run.processor, padded, cfg.algo, cfg.max_new_tokens, batch_size=cfg.micro_batch,
                       math_format=cfg.math_format, template=run.template)[:len(share)]
        everyone = [r for part in all_gather(rows, d) for r in part]
        row.update({f"eval/{split}/{k}": v for k, v in score_rows(cfg.task, samples, everyone).items()})
    engine.sleep()
    if d.main:
        append_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"), [row])
    return row


def finish(cfg: Config, run: Run, d: Dist) -> None:
    run.synthesis.close()
    if d.main:
        run.pool.save(os.path.join(cfg.out_dir, "pool.json"))
    save_final(cfg, run.model, run.processor, d)
    if d.main:
        print(f"done: metrics {os.path.join(cfg.out_dir, 'metrics.jsonl')}, model {os.path.join(cfg.out_dir, 'final')}")

# ----------------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    cfg = prepare_config(cfg)                 # resume's saved config, device defaults, checks (nothing written yet)
    d = setup_distributed()
    check_distributed(cfg, d)
    preflight(cfg, world=int(os.environ.get("LOCAL_WORLD_SIZE", d.world)), data=False, show=False)   # set_up reads data
    run = set_up(cfg, d)                      # data, model, SFT warm start, reference, optimizer, resume
    if cfg.algo == "sft":
        finish(cfg, run, d)
        return {}
    engine = make_engine(cfg, run.model, run.processor, d, cfg.device)
    banned, pad_id = vision_token_ids(run.processor), run.processor.tokenizer.pad_token_id
    if d.main:
        print(f"training {cfg.algo} on {len(run.pool)} {cfg.task} samples for {run.max_steps} steps on {d.world} "
              f"process(es); metrics: {os.path.join(cfg.out_dir, 'metrics.jsonl')}")
    trackers = Trackers(cfg, d, run.start)
    if run.eval_splits and cfg.eval_before_train and run.start == 0:
        trackers.scalars(validate(engine, run, cfg, d, updates=0), step=0)
    bar = tqdm(range(run.start, run.max_steps), initial=run.start, total=run.max_steps, desc=cfg.algo,
               dynamic_ncols=True, disable=not d.main)
    row, flat = {}, NoSignal()
    for step in bar:
        timer = PhaseTimer()
        with timer("weight_push"):        # the engine samples from the current policy
            push_weights(engine, run.model)
        with timer("generate"):           # G completions for each of the step's prompts
            ro = rollout(engine, run.processor, run.model, run.pool, cfg, step, d, run.template)
        with timer("score"):              # Eq. 1-7: rewards by component, their sum, group advantages
            scored = score(cfg, ro, run.smoother, d, run.custom_reward)
        with timer("synthesis"):          # Eq. 8 and the pool update (Syn-GRPO; a no-op otherwise)
            exchanged = run.synthesis.exchange(step, [p.sample for p in ro.prompts], scored.rewards.descriptions,
                                               run.pool)
            run.pool = exchanged.pool
        with timer("update"):             # mu steps of the clipped surrogate (+ KL, entropy terms)
            batches = micro_batches(ro, scored, cfg, pad_id)
            update = update_policy(run.model, run.ref, run.optimizer, run.sched, batches, cfg, d, banned)
        row = step_metrics(step, ro, scored, update, exchanged.stats, run.pool, run.sched.get_last_lr()[0], timer)
        row = log_step(row, ro, scored, exchanged.sent, cfg, d)
        trackers.log(row, ro, scored, run.pool)
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['reward_accuracy']:.3f}")
        flat.see(row["frac_reward_zero_std"], d)
        last = step + 1 == run.max_steps
        if run.eval_splits and (last or cfg.eval_every and (step + 1) % cfg.eval_every == 0):   # --eval-data
            trackers.scalars(validate(engine, run, cfg, d, updates=step + 1), step=step + 1)
        if cfg.save_every and (last or (step + 1) % cfg.save_every == 0):
            save_checkpoint(os.path.join(cfg.out_dir, "checkpoint.pt"), run.model, run.optimizer, run.sched, step + 1,
                            run.pool, run.smoother, cfg, run.synthesis, d)
            save_hf(run.model, run.processor, os.path.join(cfg.out_dir, f"checkpoint-{step + 1}"), d)
            rotate_checkpoints(cfg.out_dir, cfg.save_total_limit, d)
    trackers.close()
    finish(cfg, run, d)
    return row


def cli(argv=None) -> None:
    """`python train.py [flags]`: --plan, --preflight, --print-config, or the run."""
    args = command_line(__doc__).parse_args(argv)
    if args.plan:
        return plan_command(config_from(Config, args), args)
    if args.preflight:   # the layout of --plan-gpus training processes: the data server's default GPU follows them
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(args.plan_gpus))
        preflight(prepare_config(config_from(Config, args)), world=args.plan_gpus)
        return print("preflight: every check passed")
    if args.print_config:
        return print(json.dumps(asdict(prepare_config(config_from(Config, args), files=False)), indent=1))
    main(config_from(Config, args))


if __name__ == "__main__":
    cli()
