"""Checkpoints: everything an exact resume needs, and the model dirs users open.

  * `OUT/checkpoint.pt`, the newest exact-resume state (weights, optimizer, scheduler, step, data pool, diversity
    smoother, the data-server client's cursor, every rank's RNG), written atomically (`save_checkpoint`,
    `load_checkpoint`); `OUT/pool.json` beside it, the pool's lineage in plain JSON (eval.py gallery).
  * `OUT/checkpoint-<step>/` and `OUT/final/`: Hugging Face model dirs (LoRA merged, lm_head stored once when tied)
    that eval.py, train.py --model and vLLM load directly (`save_hf`), the oldest removed past --save-total-limit.
  * `trim_logs`: on resume, the log lines written after the checkpoint go (they will be written again);
    `holds_run`: whether a folder holds a run; `clear_run`: with --overwrite, what an earlier run wrote goes.
Sharded (FSDP2) runs save full, unsharded states, so a checkpoint is the same for any number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict

import numpy as np
import torch

from common import Dist, all_gather, append_jsonl, atomic_write
from data import DataPool
from models import save_pretrained


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


def save_checkpoint(path, model, optimizer, sched, step, pool, smoother, cfg, synthesis, d: Dist = Dist()):
    """Sharded runs save full (unsharded) model and optimizer states, so the file is the same for any world size."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_sd, opt_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        model_sd, opt_sd = dict(model.state_dict()), optimizer.state_dict()
    rngs = all_gather(rng_state(), d)
    if not d.main:
        return
    state = {"model": model_sd, "optimizer": opt_sd,
             "scheduler": sched.state_dict(), "step": step, "pool": pool.state_dict(),
             "smoother": smoother.state_dict(), "config": asdict(cfg),
             "server_client": synthesis.state_dict(), "rng": rngs[0], "rng_ranks": rngs}
    with atomic_write(path, "wb") as f:   # a kill during the save leaves the previous checkpoint intact
        torch.save(state, f)
    pool.save(os.path.join(os.path.dirname(path), "pool.json"))   # readable lineage for eval.py gallery


def load_checkpoint(path, model, optimizer, sched, smoother, synthesis, d: Dist = Dist()) -> tuple[int, DataPool]:
    """Restores everything in place; returns (the step to continue from, the data pool)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    synthesis.load_state_dict(state.get("server_client"))
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
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
            save_pretrained(model, path, state_dict=sd)
            processor.save_pretrained(path)
        torch.distributed.barrier()
        return digests
    if hasattr(model, "get_base_model"):   # LoRA: the merged weights under their plain HF names
        save_pretrained(model.get_base_model(), path, state_dict=untied(model, policy_state(model)))
    else:
        save_pretrained(model, path)
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


RUN_OUTPUTS = ("config.json", "metrics.jsonl", "completions.jsonl", "checkpoint.pt", "pool.json", "wandb_run_id", "final",
               "reference", "synth", "server", "tensorboard", "wandb")


RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "final")   # any of them: the folder holds a run


def holds_run(out_dir: str) -> bool:
    return any(os.path.exists(os.path.join(out_dir, f)) for f in RUN_FILES)


def clear_run(out_dir: str) -> None:
    """Remove what a training run wrote in out_dir (--overwrite): its logs, checkpoints, models, synthesized images,
    local server state and tracker files. Anything else in the folder stays."""
    names = [n for n in os.listdir(out_dir) if n in RUN_OUTPUTS or re.fullmatch(r"checkpoint-\d+", n)]
    for name in names:
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def trim_logs(out_dir: str, step: int) -> None:
    """On resume from `step`: drop what metrics.jsonl and completions.jsonl logged after the checkpoint (training
    rows of step >= `step`, validation rows of a later update); the resumed run logs them again. Atomic: a kill
    during the rewrite leaves the whole log."""
    for name in ("metrics.jsonl", "completions.jsonl"):
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            keep = [line for line in f if _before(json.loads(line), step)]
        with atomic_write(path) as f:
            f.writelines(keep)


def _before(row: dict, step: int) -> bool:
    return row.get("step", -1) < step and row.get("eval_step", -1) <= step
