"""The training run's configuration: `Config` (every flag of train.py, with its --help), the defaults that depend on
the device (`resolve_defaults`: the paper's settings on GPU, measured small ones for the tiny models on CPU), the
checks a run must pass before anything is written (`check_config`), and train.py's command line.

    python train.py --print-config [--device cuda] [flags]    # the resolved config, no model loaded
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, fields, replace

import torch

from checkpoint import holds_run
from common import ArgumentParser, Dist, config_parser, device_exists, opt, output_problem, split_list, stop_at_first
from data import TASKS, DataError, missing_sources, read_template
from outpaint import HUB_PIPELINES, SEGMENTERS, TINY_PIPELINES, default_steps
from verify import VERIFIERS, VERIFY_THRESHOLD
from prompts import MATH_FORMATS, TEMPLATES
from models import FAMILIES, TINY_MODELS, model_problem, pixel_limit_problem, vllm_push_problem
from shapes import GRID
from tracking import tracker_problem

FAMILY_NAMES = [f.name for f in FAMILIES]


@dataclass
class Config:
    # what to train
    algo: str = opt("grpo", "sft: supervised fine-tuning on the gold answers; grpo: VLM-R1-style GRPO; syn-grpo: "
                            "GRPO with <score>, <description>, the diversity reward and online image synthesis",
                    choices=("sft", "grpo", "syn-grpo"))
    task: str = opt("rec", "rec (one box), ovd (boxes + labels), isr (OVD on top-view rooms), math (\\boxed{} answer)",
                    choices=TASKS)
    model: str = opt("", f"hub id or checkpoint dir of a model of a supported family ({', '.join(FAMILY_NAMES)}; "
                         f"docs/models.md), or a tiny one: {', '.join(TINY_MODELS)} ('' = tiny on CPU, "
                         "Qwen2.5-VL-3B on GPU)",
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
    overwrite: bool = opt(False, "train into an --out-dir that holds a run, replacing it (its metrics, checkpoints and "
                                 "models are removed once every check has passed); without it such a start stops")
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
    sft_weight_decay: float = opt(0.01, "AdamW weight decay of SFT (torch's AdamW default, and verl's; "
                                        "--weight-decay is GRPO's)")
    sft_format: str | None = opt(None, "output format of the SFT targets (default: that of --algo; grpo for --algo "
                                       "sft): syn-grpo trains a model for a later Syn-GRPO run; both alternates the two, "
                                       "so that one model answers in the format its prompt asks for",
                                 choices=("grpo", "syn-grpo", "both"))
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
    prompt_template: str = opt("", "a file whose text replaces the built-in prompt (prompts.TEMPLATES), with {problem} "
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
    pipeline: str | None = opt(None, "outpainting pipeline of the local data server: sdxl-union (SDXL + ControlNet-"
                                     "Union in inpaint mode), sdxl (SDXL + the canny ControlNet), tiny / tiny-union "
                                     "(their random-weight twins), procedural (a background drawn from the description's "
                                     "words: procedural.py) or a pipeline dir (default: sdxl-union on GPU, the paper's "
                                     "'ControlNet based on SDXL' as diffusers documents it for inpainting; procedural "
                                     "on CPU)")
    pipeline_steps: int | None = opt(None, "denoising steps of the local data server (default: 20 for sdxl and "
                                           "sdxl-union, diffusers' recipe for the canny ControlNet; 2 for the "
                                           "random-weight tiny ones; 1 for procedural)")
    pipeline_size: int | None = opt(None, "side in pixels the local server's pipeline runs at (default: 64 for the "
                                          "tiny pipelines, which draw noise at any size; else the image's size)")
    max_pending_jobs: int | None = opt(None, "jobs in flight at most; a step submits no more while this many are "
                                             "unfinished (default: 0 = no limit on GPU; 2 x batch size on CPU)")
    segmenter: str | None = opt(None, "foreground matte of the local data server's keep-mask: '' (the boxes alone), "
                                      "palette, color, ben2, sam (box-prompted SAM from transformers) or tiny-sam "
                                      "(default: palette for the built-in shapes data; ben2, the paper's, with the sdxl "
                                      "pipeline; else '')", choices=SEGMENTERS)
    verify_synthesis: str = opt("", "the local data server drops an image whose new background holds a confident "
                                    "detection of one of the sample's categories outside the kept boxes (OVD/ISR; "
                                    "ours, beyond the paper): '' (off), owlv2 or tiny-owlv2 (random weights); a remote "
                                    "server checks with its own --verify-synthesis", choices=VERIFIERS)
    verify_threshold: float = opt(VERIFY_THRESHOLD, "the verifier's detection score that counts (sigmoid, 0-1)")
    server_device: str | None = opt(None, "device of the local data server (default: cpu on CPU; on GPU the first GPU "
                                          "after the training processes', cuda:N for N = LOCAL_WORLD_SIZE, as the paper "
                                          "gives the server a GPU of its own; cuda:0 shares the trainer's)")
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
    shared_prefix: bool = opt(True, "encode each prompt once for its G completions: in the trainer's log-prob "
                                    "passes (its completions in a micro-batch packed after it: Prefix Grouper, arXiv "
                                    "2506.05433; the same log-probs and gradients) and in HF generation (one prefill, "
                                    "its cache repeated G times); --no-shared-prefix: one row, one prefill a sequence "
                                    "(docs/speed.md)")
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

    @property
    def entropy_in_loss(self) -> bool:
        """--entropy-coef > 0: the loss differentiates the token entropy ('GRPO + Entropy Loss'), so the log-prob
        pass keeps it in autograd (and --plan counts the memory); otherwise it is a logged value."""
        return self.entropy_coef > 0


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
    syn = cfg.algo == "syn-grpo" or cfg.sft_format in ("syn-grpo", "both")
    cfg.pipeline = cfg.pipeline or ("sdxl-union" if gpu else "procedural")   # docs/syn-grpo.md "Which image model"
    d = dict(batch_size=20 if gpu else 4, num_generations=6, lr=1e-6 if gpu else 2e-4,
             sft_steps=(1200 if syn else 600) if random_init else 0, sft_lr=1e-5 if gpu else 1e-3,
             beta=0.01 if gpu else 0.0, weight_decay=0.01 if gpu else 0.0,
             freeze_vision=not gpu, max_new_tokens=1024 if gpu else (112 if syn else 64),
             rollout_backend="vllm" if gpu else "hf", max_steps=0 if gpu else 100,
             shapes_objects="1-1" if cfg.task == "rec" else "1-2", shapes_n=128 if syn and not gpu else 512,
             segmenter="palette" if not cfg.data else "ben2" if cfg.pipeline in HUB_PIPELINES else "",
             pipeline_steps=default_steps(cfg.pipeline),
             pipeline_size=64 if cfg.pipeline in TINY_PIPELINES else 0,
             max_model_len=4096 if gpu else 1024, vllm_sleep_mode=gpu, micro_batch=4 if gpu else 16,
             gradient_checkpointing=gpu)
    for k, v in d.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.max_pending_jobs is None:
        cfg.max_pending_jobs = 0 if gpu else 2 * cfg.batch_size
    if cfg.server_device is None:   # torchrun's ranks take cuda:0 .. cuda:N-1 (LOCAL_RANK): the server the next one
        cfg.server_device = f"cuda:{os.environ.get('LOCAL_WORLD_SIZE', '1')}" if gpu else "cpu"
    return cfg


def check_config(cfg: Config, files: bool = True) -> None:
    """A config that cannot run as asked stops here with one line, before anything is written. files=False skips what
    depends on this machine (files, a GPU): --print-config describes a run for another machine too."""
    values = [message for bad, message in value_problems(cfg) if bad]
    stop_at_first("train.py", (machine_problems(cfg) if files else []) + values)


def machine_problems(cfg: Config) -> list[str | None]:
    """What this machine must have, each None or the reason it does not: the model, the files named, the output
    folder, the devices asked for, the trackers' credentials, a readable prompt template."""
    missing = missing_sources(cfg.data)
    model_bad = model_problem(cfg.model)   # the checks below read the model's config, which must then be there
    return [
        cfg.device == "cuda" and not torch.cuda.is_available() and "--device cuda: no CUDA device is visible",
        model_bad,
        cfg.rollout_backend == "vllm" and not model_bad and vllm_push_problem(cfg.model, cfg.device == "cuda"),
        not model_bad and pixel_limit_problem(cfg.model, cfg.min_pixels, cfg.max_pixels),
        output_problem("--out-dir", cfg.out_dir, folder=True),
        missing and f"--data {cfg.data}: no such file or dataset dir: {', '.join(missing)}",
        any(not os.path.isdir(r) for r in split_list(cfg.image_root)) and f"--image-root {cfg.image_root}: no such "
                                                                          "directory",
        cfg.descriptions and not os.path.isfile(cfg.descriptions) and f"--descriptions {cfg.descriptions}: no such file",
        any(missing_sources(s) for s in cfg.eval_data) and f"--eval-data {' '.join(cfg.eval_data)}: no such file or "
                                                           "dataset dir",
        tracker_problem(cfg.report_to),
        starts_local_server(cfg) and not device_exists(cfg.server_device) and (
            f"--server-device {cfg.server_device}: no such device for the local data server (the training processes "
            f"take the first GPUs); give --server-device cuda:0 to share one, or --server-url of a server started "
            f"with server.py --device"),
        template_problem(cfg.prompt_template, cfg.task),
    ]


def template_problem(path: str, task: str) -> str | None:
    try:
        read_template(path, task)
    except DataError as e:
        return str(e)
    return None


def value_problems(cfg: Config) -> list[tuple]:
    """(bad, message) of every value out of its range, and of the combinations that cannot run."""
    objects = re.fullmatch(r"(\d+)-(\d+)", cfg.shapes_objects or "")
    return [
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
        (cfg.lr <= 0 or cfg.sft_lr <= 0 or min(cfg.weight_decay, cfg.sft_weight_decay) < 0,
         "--lr and --sft-lr must be positive, --weight-decay and --sft-weight-decay >= 0"),
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
        (cfg.algo == "syn-grpo" and cfg.task == "math", "--algo syn-grpo regenerates the background around the "
                                                        "labelled boxes: tasks rec, ovd and isr"),
        (cfg.reward == "majority" and cfg.task not in ("rec", "math"), "--reward majority votes on rec boxes or math "
                                                                       "answers: tasks rec and math"),
        (cfg.offline_synthesis and (cfg.algo != "grpo" or not cfg.descriptions or cfg.task == "math"),
         "--offline-synthesis is the 'GRPO + Offline Generation' baseline: --algo grpo, --descriptions FILE, a task "
         "with boxes"),
        (cfg.verify_synthesis and not (starts_local_server(cfg) and cfg.task in ("ovd", "isr")),
         "--verify-synthesis checks the local data server's images for new instances of an OVD/ISR sample's "
         "categories: --task ovd or isr, synthesis on, no --server-url (start a remote server.py with "
         "--verify-synthesis instead)"),
        (not 0 <= cfg.verify_threshold <= 1, "--verify-threshold must be in [0, 1]"),
    ]


# What a resumed run may change: how long it runs, how it is validated, logged and saved, where its data servers are.
# Everything else is the run's own: a resume continues the same experiment.
RESUME_MAY_CHANGE = ("max_steps", "eval_data", "eval_image_root", "eval_every", "eval_limit", "eval_before_train",
                     "report_to", "run_name", "log_completions", "log_completions_every", "save_every",
                     "save_total_limit", "server_url", "server_token")


def resumed_config(cfg: Config, saved: dict) -> Config:
    """The run's saved config, with the flags given now that a resume may change applied (and said); any other flag
    given with a value other than the run's stops the start with one line naming them. A flag counts as given when
    its value is not Config's default."""
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}   # JSON has no tuples
    default, out = Config(), Config(**{**saved, "resume": cfg.resume, "out_dir": cfg.resume})
    given = [f.name for f in fields(Config) if f.name not in ("resume", "out_dir", "overwrite")
             and getattr(cfg, f.name) != getattr(default, f.name)]
    refused = [k for k in given if k not in RESUME_MAY_CHANGE and getattr(cfg, k) != saved.get(k)]
    if refused:
        flags = ", ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)} (the run's: {saved.get(k)})" for k in refused)
        raise SystemExit(f"train.py: --resume {cfg.resume} continues the run with its own config; {flags} would change "
                         f"it: give another --out-dir for a new run")
    applied = [k for k in given if k in RESUME_MAY_CHANGE and getattr(cfg, k) != saved.get(k)]
    for k in applied:
        setattr(out, k, getattr(cfg, k))
    if applied and os.environ.get("RANK", "0") == "0":
        print("resume: " + ", ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)} (was {saved.get(k)})" for k in applied))
    return out


def starts_local_server(cfg: Config) -> bool:
    """Whether train.py starts a data server of its own (Syn-GRPO with synthesis, or offline synthesis, and no URL)."""
    synthesizes = (cfg.algo == "syn-grpo" and cfg.synthesize) or cfg.offline_synthesis
    return synthesizes and not cfg.server_url


def _is_number(v: str) -> bool:
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


def prepare_config(cfg: Config, files: bool = True) -> Config:
    """The run's config: on --resume the run's own (only --max-steps may change), then defaults, then checks."""
    if cfg.resume == "auto":       # TRL's resume_from_checkpoint=True: the newest checkpoint of this out dir
        found = os.path.isfile(os.path.join(cfg.out_dir, "checkpoint.pt"))
        # no checkpoint yet: a run killed before its first one starts again (what a preemptible job asks for)
        restart = not found and not os.path.exists(os.path.join(cfg.out_dir, "final"))
        cfg = replace(cfg, resume=cfg.out_dir if found else "", overwrite=cfg.overwrite or restart)
    if files and not cfg.resume and not cfg.overwrite and holds_run(cfg.out_dir):
        raise SystemExit(f"train.py: --out-dir {cfg.out_dir} holds a run; continue it with --resume auto, replace it "
                         "with --overwrite, or give another --out-dir")
    if cfg.resume:
        path = os.path.join(cfg.resume, "config.json")
        if not os.path.isdir(cfg.resume):
            raise SystemExit(f"train.py: --resume {cfg.resume}: no such directory")
        if not os.path.isfile(path):
            raise SystemExit(f"train.py: --resume {cfg.resume}: no config.json there (not a run directory)")
        with open(path) as f:
            saved = json.load(f)
        unknown = sorted(set(saved) - {f.name for f in fields(Config)})
        if unknown:
            raise SystemExit(f"train.py: {path} has fields this version does not know: {', '.join(unknown)}")
        cfg = resumed_config(cfg, saved)
    cfg = resolve_defaults(cfg)
    check_config(cfg, files=files)
    return cfg


def command_line(description: str = "") -> ArgumentParser:
    """train.py's command line: a flag per Config field, --config FILE, and the actions --print-config and --plan."""
    templates = "\n".join(f"  {k}: {v}" for k, v in TEMPLATES.items())
    p = config_parser(Config, description=description, epilog="The built-in prompts, as --prompt-template files "
                      "(prompts.TEMPLATES; {problem} is the row's question, for ovd and isr the detection question "
                      "with the row's categories):\n" + templates)
    p.add_argument("--print-config", action="store_true", help="print the resolved config (the defaults of --device "
                   "filled in) as JSON and exit, without loading a model")
    p.add_argument("--preflight", action="store_true", help="check what the run needs of this machine (data, writable "
                   "folders, segmenter, the pipeline's weights, data servers, GPU assignment, --plan's verdict) without "
                   "loading a model; a table, then one line per failure and exit status 1 (every run does it too)")
    p.add_argument("--plan", action="store_true", help="print the memory one step of this run needs per training GPU "
                   "(no weights loaded; with --device cuda on any machine), whether it fits and what would make it fit")
    p.add_argument("--json", action="store_true", help="with --plan: one JSON object instead of the table")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="with --plan: memory of each GPU")
    p.add_argument("--plan-gpus", type=int, default=1, help="with --plan and --preflight: training GPUs (torchrun "
                   "processes, FSDP)")
    p.add_argument("--plan-image-size", default="640x480", help="with --plan: WIDTHxHEIGHT of a typical image")
    return p


def check_distributed(cfg: Config, d: Dist) -> None:
    if d.world > 1 and (cfg.lora_r or cfg.drop_zero_std or cfg.batch_size % d.world):
        raise SystemExit("train.py: under torchrun --batch-size must be a multiple of the number of processes; "
                         "--lora-r and --drop-zero-std are single-process only")


def reward_weights(cfg: Config) -> tuple[float, float, float, float]:
    """--reward-weights as (accuracy, format, diversity, custom): a missing format or diversity weight is 0 (SynthRL's
    0.9,0.1), a missing custom one 1 (a --reward-function counts unless weighed otherwise). Checked in check_config."""
    w = [float(v) for v in cfg.reward_weights.split(",")]
    return tuple(w + [0.0] * (3 - len(w)) + [1.0] * (4 - max(3, len(w))))

