"""The preflight: what a run needs of this machine, checked before any model loads, as one table.

    python train.py --preflight [the run's flags]     # the table; one line per failure and exit 1 if any

Every real run (train.py's `main`) runs it too, after its config checks and before the policy loads, so that a
first GPU run stops in seconds with the reason instead of after the policy and vLLM have loaded:
  data        --data (and --eval-data) parse, and their first image opens
  out dir     --out-dir can be written (a file is created and removed)
  server dir  the local data server's state dir (OUT/server) can be written
  segmenter   the keep-mask's segmenter can be imported (BEN2 is not on PyPI: the line gives its install command)
  pipeline    the image model's weights are in the local cache, or the Hub answers (a local server or offline synthesis)
  verifier    with --verify-synthesis owlv2: OWLv2's weights are in the local cache, or the Hub answers
  data server --server-url's servers answer GET /health
  devices     the training processes' GPUs, vLLM's share of them, and the data server's device, never a training one
  memory      --plan's verdict for this run on this machine's GPUs
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass

import torch

from common import device_exists, split_list
from config import Config, starts_local_server
from data import DataError, load_image, read_data
from outpaint import BEN2_INSTALL, BEN2_WEIGHTS, HUB_PIPELINES, SAM_CHECKPOINT, TINY_PIPELINES
from verify import OWLV2_CHECKPOINT
from plan import PlanSetting, count_parameters, plan_memory, plan_model_config

HUB_TIMEOUT = 10        # seconds for the Hub or a data server to answer


@dataclass
class Check:
    name: str
    ok: bool
    detail: str           # what was found, or why it fails and what to do


def data_check(flag: str, spec: str, task: str, image_root: str) -> Check:
    try:
        rows = read_data(spec, task, image_root, log=lambda *a, **k: None)
        if rows and rows[0].image:
            load_image(rows[0].image)
    except DataError as e:
        return Check(flag, False, str(e))
    return Check(flag, bool(rows), f"{len(rows)} rows, the first image opens" if rows else f"{spec}: no rows")


def writable_check(name: str, path: str) -> Check:
    """The folder (or, before it exists, its nearest existing parent) takes a new file."""
    where = os.path.abspath(path)
    while not os.path.isdir(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    try:
        with tempfile.NamedTemporaryFile(dir=where):
            pass
    except OSError as e:
        return Check(name, False, f"{path}: cannot write in {where} ({e.strerror})")
    shown = os.path.relpath(where) if not os.path.relpath(where).startswith("..") else where
    return Check(name, True, f"{path} writable" + ("" if where == os.path.abspath(path) else f" (created in {shown})"))


def segmenter_check(cfg: Config) -> Check:
    if cfg.segmenter == "ben2" and importlib.util.find_spec("ben2") is None:
        return Check("segmenter", False, f"--segmenter ben2: the ben2 package is not installed; run `{BEN2_INSTALL}`, "
                                         "or give --segmenter sam")
    if cfg.segmenter in ("ben2", "sam"):   # their weights come from the Hub
        return hub_check("segmenter", cfg.segmenter, [BEN2_WEIGHTS if cfg.segmenter == "ben2" else SAM_CHECKPOINT])
    return Check("segmenter", True, cfg.segmenter or "none (the boxes alone)")


def verifier_check(cfg: Config) -> Check:
    if cfg.verify_synthesis == "owlv2":   # its weights come from the Hub
        return hub_check("verifier", "owlv2", [OWLV2_CHECKPOINT])
    return Check("verifier", True, cfg.verify_synthesis or "off")


def pipeline_check(cfg: Config) -> Check:
    """A pipeline dir holds model_index.json; the Hub pipelines are in the local cache or the Hub answers."""
    name = cfg.pipeline
    if name in TINY_PIPELINES or name == "procedural":
        return Check("pipeline", True, f"{name} (built here, no download)")
    if os.path.isdir(name):
        ok = os.path.isfile(os.path.join(name, "model_index.json"))
        return Check("pipeline", ok, f"{name}" + ("" if ok else ": no model_index.json (not a diffusers pipeline dir)"))
    return hub_check("pipeline", name, HUB_PIPELINES.get(name, ()))


def hub_check(check: str, name: str, repos) -> Check:
    """The repos' weights are in the local Hugging Face cache, or the Hub answers for them."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    missing = [r for r in repos if not isinstance(try_to_load_from_cache(r, "model_index.json"), str)
               and not isinstance(try_to_load_from_cache(r, "config.json"), str)]
    if not missing:
        return Check(check, True, f"{name}: weights in the local cache")
    if constants.HF_HUB_OFFLINE:
        return Check(check, False, f"{name}: {', '.join(missing)} not in the local cache, and HF_HUB_OFFLINE=1 "
                                   "forbids a download")
    try:
        for repo in missing:
            model_info(repo, timeout=HUB_TIMEOUT)
    except Exception as e:   # any failure to reach the Hub is this check's answer, never a traceback
        return Check(check, False, f"{name}: {repo} is not in the local cache and the Hub does not answer "
                                   f"({type(e).__name__}); download it first (huggingface-cli download {repo})")
    return Check(check, True, f"{name}: {', '.join(missing)} will download from the Hub")


def server_check(urls: str) -> Check:
    """Every --server-url answers GET /health; one that does not is a failure only when none does (a run goes on with
    the servers it has, as it does when one dies mid-run)."""
    down = []
    for url in split_list(urls):
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=HUB_TIMEOUT) as r:
                if not json.loads(r.read()).get("ok"):
                    down.append(f"{url} (no worker alive)")
        except Exception as e:   # refused, timed out, not our JSON: the server is not usable
            down.append(f"{url} ({type(e).__name__})")
    urls_given = split_list(urls)
    if not down:
        return Check("data server", True, f"{urls} healthy")
    if len(down) < len(urls_given):   # the run goes on with the others and retries these with backoff
        return Check("data server", True, f"down: {'; '.join(down)} (the run uses the others and retries it)")
    return Check("data server", False, "; ".join(down) + ": no data server answers")


def device_check(cfg: Config, world: int) -> Check:
    """Training ranks take cuda:0 .. cuda:N-1 (torchrun's LOCAL_RANK); vLLM shares each rank's GPU; the local data
    server takes a GPU of its own, never a training one while one is spare (a machine with none spare may share)."""
    if cfg.device != "cuda":
        return Check("devices", True, "cpu: training" + (", data server" if starts_local_server(cfg) else ""))
    visible = torch.cuda.device_count()
    ranks = [f"cuda:{k}" for k in range(world)]
    parts = [f"training {', '.join(ranks)}"]
    if cfg.rollout_backend == "vllm":
        parts.append(f"vLLM {cfg.vllm_gpu_memory_utilization:.0%} of each")
    problems = [] if visible >= world else [f"{world} training processes need {world} GPUs, {visible} visible"]
    if starts_local_server(cfg):
        parts.append(f"data server {cfg.server_device}")
        if not device_exists(cfg.server_device):
            problems.append(f"--server-device {cfg.server_device}: no such device")
        elif (cfg.server_device in ranks or cfg.server_device == "cuda") and visible > world:
            problems.append(f"--server-device {cfg.server_device} is a training process's GPU while cuda:{world} is "
                            f"free; give the data server a GPU of its own (--server-device cuda:{world}) or --server-url")
        elif cfg.server_device in ranks or cfg.server_device == "cuda":   # no spare GPU: sharing is the only way
            parts[-1] += " (shares a training GPU: none is spare)"
    return Check("devices", not problems, "; ".join(problems) or ", ".join(parts))


def memory_check(cfg: Config, world: int) -> Check:
    """--plan's verdict on this machine's GPUs (their memory read from the first one)."""
    if cfg.device != "cuda" or not torch.cuda.is_available():
        return Check("memory", True, "cpu: not planned")
    gb = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    try:
        config = plan_model_config(cfg.model)
    except SystemExit as e:   # no config to plan from: this check's answer
        return Check("memory", False, str(e))
    plan = plan_memory(cfg, PlanSetting(gpus=world, gpu_memory_gb=gb), count_parameters(config), config)
    need = plan["peak_bytes"] / 2 ** 30
    return Check("memory", plan["fits"], f"peak {need:.1f} GB of {gb:.0f} GB a GPU" + (
        "" if plan["fits"] else ": does not fit; `python train.py --plan` with the same flags says what would"))


def checks(cfg: Config, world: int = 1, data: bool = True) -> list[Check]:
    """Every check of the run `cfg` (resolved: config.prepare_config) with `world` training processes (data=False:
    not the data, which the caller reads next anyway)."""
    out = []
    if cfg.data and data:
        out.append(data_check("data", cfg.data, cfg.task, cfg.image_root))
    out += [data_check("eval data", s, cfg.task, cfg.eval_image_root) for s in cfg.eval_data if data]
    out.append(writable_check("out dir", cfg.out_dir))
    if starts_local_server(cfg):
        out += [writable_check("server dir", os.path.join(cfg.out_dir, "server")), segmenter_check(cfg),
                pipeline_check(cfg), *([verifier_check(cfg)] if cfg.verify_synthesis else [])]
    elif (cfg.algo == "syn-grpo" and cfg.synthesize or cfg.offline_synthesis) and cfg.server_url:
        out.append(server_check(cfg.server_url))
    return out + [device_check(cfg, world), memory_check(cfg, world)]


def table(results: list[Check]) -> str:
    width = max(len(c.name) for c in results)
    return "\n".join(f"{c.name:<{width}}  {'ok  ' if c.ok else 'FAIL'}  {c.detail}" for c in results)


def preflight(cfg: Config, world: int = 1, data: bool = True, show: bool = True, prog: str = "train.py") -> None:
    """Print the table (show) and stop with one line per failure, exit status 1."""
    results = checks(cfg, world, data)
    if show:
        print(table(results))
    failed = [c for c in results if not c.ok]
    if failed:
        raise SystemExit("\n".join(f"{prog}: preflight: {c.name}: {c.detail}" for c in failed))
