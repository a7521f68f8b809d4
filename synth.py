"""Question synthesis for math GRPO: SynthRL's verified harder variants and MM-UPT's self-generated questions.

    python synth.py run --data seeds.jsonl --model TARGET --synthesizer MODEL --out-dir runs/synth
    python synth.py passrate|select|synthesize|verify|export ...     # the same stages one at a time
    python synth.py selfq --mode in-context|direct --model POLICY --data seeds.jsonl --out-dir runs/selfq
    python train.py --task math --data runs/synth/synth.jsonl         # train on the result

SynthRL (arXiv 2506.02096, §3 and Algorithm 1), with the target model as its own verifier:
  passrate    N rollouts per seed (16, T = 1.0) by the target model; c_ori = how many are correct.
  select      seeds with c_ori >= --select-min (12 of 16): the easy ones, which give GRPO almost no signal.
  synthesize  the synthesizer sees the image and the question, never the answer, and writes a harder variant.
  verify      the target model answers the variant N times, graded against the ORIGINAL answer: keep it iff
              c_cand >= --t-min (4: still solvable with the same answer) and c_cand <= c_ori - --delta (2: harder).
              synthesize + verify repeat for up to --attempts rounds per seed. --keep first: the first accepted
              variant wins (the paper's Algorithm 1). --keep hardest: SynthRL's released code
              (evolve_instruction_verifiable.py): every round is tried, each rewrites the latest accepted variant
              (a chain), and the accepted variant with the lowest pass count wins (ties: the earlier).
  export      train.py's math JSONL: the originals plus accepted variants (SynthRL's "A-" augmentation, which
              beat replacing the seeds), with provenance (seed id, attempts, pass counts) in each row.
MM-UPT (arXiv 2505.22453, §3.3) `selfq`: the policy writes new questions about a seed image, from the image,
question and answer (`in-context`) or from the image alone (`direct`). They carry no answer: train on them with
`--reward majority`. MM-UPT did not publish its prompts; ours are below.

Every stage appends one JSON line per finished item to a file in --out-dir and skips items already there, so a
killed run continues where it was; a half-written last line is ignored and its item done again.
"""
from __future__ import annotations

import base64
import io
import hashlib
import json
import os
import re
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

import rewards as R
from common import (append_jsonl, atomic_write, config_from, config_parser, opt, output_problem, read_jsonl,
                    stop_at_first, write_jsonl)
from data import DataError, Sample, load_image, missing_sources, read_data, write_samples
from shapes import make_shapes
from models import model_problem
from rollout import Sampling, encode_prompt, load_engine

STAGES = ("run", "passrate", "select", "synthesize", "verify", "export", "selfq")


@dataclass
class SynthConfig:
    stage: str = opt("run", "the stage to run (run = passrate, select, then synthesize + verify rounds, export)",
                     choices=STAGES)
    data: str = opt("", "seed math data in any format of train.py --data, e.g. EasyR1's name@split or VLM-R1's JSONL "
                        "('' = the built-in shapes counting questions)")
    image_root: str = opt("", "image paths in --data are relative to this folder ('' = the file's folder)")
    shapes_n: int = opt(64, "number of shapes seeds when --data is empty")
    out_dir: str = opt("runs/synth", "every stage's JSONL files, the summary and the exported training data")
    model: str = opt("tiny", "the target model (SynthRL) or the policy (MM-UPT selfq)")
    synthesizer: str = opt("", "local model that writes the variants ('' = --model); ignored with --api-url")
    api_url: str = opt("", "OpenAI-compatible endpoint for the synthesizer, e.g. http://localhost:8000/v1")
    api_model: str = opt("", "model name sent to that endpoint")
    api_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the endpoint's key (if any)")
    backend: str = opt("hf", "generation backend of the local models", choices=("hf", "vllm"))
    max_model_len: int = opt(0, "vLLM's context limit, prompt + completion (0 = 4096 on GPU, 1024 on CPU)")
    vllm_gpu_memory_utilization: float = opt(0.45, "share of the GPU's memory each vLLM engine takes (two may be "
                                                   "loaded: the target and the synthesizer)")
    min_pixels: int = opt(0, "the local models' image processor's pixel floor, as train.py's (0 = the model's own)")
    max_pixels: int = opt(0, "the local models' image processor's pixel budget, as train.py's (0 = the model's own)")
    # SynthRL's defaults (scripts/run_evolve_verifiable.sh and the paper)
    num_rollouts: int = opt(16, "N: rollouts per question for the pass counts (SynthRL: 16)")
    temperature: float = opt(1.0, "sampling temperature of those rollouts (SynthRL: 1.0)")
    max_new_tokens: int = opt(2048, "completion length limit of those rollouts")
    select_min: int = opt(12, "seeds solved at least this many times of N are synthesized from (SynthRL: 12)")
    t_min: int = opt(4, "a variant must still be solved at least this many times of N (SynthRL: 4)")
    delta: int = opt(2, "... and at least this many times fewer than its seed (SynthRL: 2)")
    attempts: int = opt(8, "synthesize + verify rounds per seed at most")
    keep: str = opt("first", "first: a seed's first accepted variant, and no more rounds (the paper's Algorithm 1); "
                             "hardest: every round, each rewriting the latest accepted variant, and the accepted one "
                             "with the lowest pass count (SynthRL's released code)", choices=("first", "hardest"))
    synth_temperature: float = opt(1.0, "sampling temperature of the synthesizer")
    synth_max_tokens: int = opt(512, "length limit of the synthesizer's reply")
    synth_prefill: str = opt("", "start the synthesizer's reply with this (e.g. 'New Question:')")
    export_mode: str = opt("augment", "augment: originals + accepted variants (SynthRL's A-); variants: variants only",
                           choices=("augment", "variants"))
    # MM-UPT selfq
    mode: str = opt("in-context", "selfq: write questions from the image, question and answer (in-context) or from "
                                  "the image alone (direct)", choices=("in-context", "direct"))
    questions_per_image: int = opt(1, "selfq: new questions per seed image")
    batch: int = opt(8, "prompts per generation call (and per flush to disk)")
    seed: int = opt(0, "seed of the sampling")


def command_line():
    """The stage (a positional) and SynthConfig's flags, --config FILE included."""
    p = config_parser(SynthConfig, description=__doc__, skip=("stage",))
    p.add_argument("stage", choices=STAGES, help="the stage to run")
    return p


def parse_args(argv=None) -> SynthConfig:
    return config_from(SynthConfig, command_line().parse_args(argv))


# ----------------------------------------------------------------------------------------------------
# Prompts and the pure rules (tested directly)

SYNTH_SYSTEM = ("You are an excellent vision-language AI assistant that generates more challenging questions "
                "while preserving the original answer.")
# SynthRL's synthesis prompt (synthrl_framework/verify_utils.py); the answer is deliberately not shown
HARDER_PROMPT = ("Given an image and the following question, transform it into a significantly more challenging "
                 "version that requires deeper reasoning but maintains the same answer.\n\nOriginal Question:\n"
                 "{question}\n\nYour Response Format:\nNew Question: [Your transformed question]")
SELFQ_PROMPTS = {
    "in-context": ("Here is a question about this image and its answer.\nQuestion: {question}\nAnswer: {answer}\n"
                   "Write a new question about the same image that is clearly different from this one, can be "
                   "answered from the image, and has one short final answer.\n\nYour Response Format:\n"
                   "New Question: [your question]"),
    "direct": ("Write one question about this image that can be answered from the image alone and has one short "
               "final answer.\n\nYour Response Format:\nNew Question: [your question]"),
}
_MARKER = re.compile(r"new\s+question\s*:", re.IGNORECASE)


def parse_new_question(text: str) -> str | None:
    """The text after the last "New Question:" up to the first blank line, markdown stars removed; None if absent
    or wordless (SynthRL's parser took the first marker; a model that restates the format first makes that wrong)."""
    if not isinstance(text, str):
        return None
    text = text.replace("*", "")
    found = list(_MARKER.finditer(text))
    if not found:
        return None
    q = re.split(r"\n\s*\n", text[found[-1].end():].strip(), maxsplit=1)[0].strip()
    return q if re.search(r"[^\W\d_]{2}", q) else None   # a question has at least one word


def same_question(a: str, b: str) -> bool:
    norm = lambda s: re.sub(r"[\W_]+", " ", s.lower()).strip()
    return norm(a) == norm(b)


def pass_count(texts: list[str], answer: str) -> int:
    """How many completions box an answer equivalent to `answer` (MathRuler's rules, rewards.math_equal)."""
    return sum(1 for t in texts if (a := R.extract_boxed(t)) is not None and R.math_equal(a, answer))


def verdict(c_cand: int, c_ori: int, t_min: int, delta: int) -> str:
    """SynthRL's acceptance rule: 'accepted', 'unsolvable' (answer changed or too hard) or 'not_harder'."""
    if c_cand < t_min:
        return "unsolvable"
    if c_cand > c_ori - delta:
        return "not_harder"
    return "accepted"


# ----------------------------------------------------------------------------------------------------
# Files: append-only JSONL, one line per finished item


def read_rows(path: str) -> list[dict]:
    """Rows of an append-only JSONL file; a torn last line (killed mid-write) is dropped and redone."""
    return read_jsonl(path, skip_bad=True) if os.path.exists(path) else []


def append_rows(path: str, rows: list[dict]) -> None:
    """Append finished rows durably (fsync): a stage killed after this call never redoes them."""
    append_jsonl(path, rows, fsync=True)


def out_path(cfg, name: str) -> str:
    return os.path.join(cfg.out_dir, name)


def load_seeds(cfg) -> list[Sample]:
    if cfg.data:
        try:
            return read_data(cfg.data, "math", cfg.image_root, strict=False, log=lambda m: tqdm.write(m))
        except DataError as e:
            raise SystemExit(f"synth.py: {e}")
    path = make_shapes("math", cfg.shapes_n, os.path.join(cfg.out_dir, "shapes"), seed=cfg.seed)
    return read_data(path, "math")


def chunks(items, n):
    return [items[i:i + n] for i in range(0, len(items), n)]


def item_seed(cfg, *parts) -> int:
    """A sampling seed for one item (a seed question, an attempt): a hash of its names, so that a resumed stage draws
    the same as an uninterrupted one whatever was done before."""
    return int(hashlib.sha1("/".join(map(str, (cfg.seed, *parts))).encode()).hexdigest()[:8], 16)


# ----------------------------------------------------------------------------------------------------
# Models: local (HF or vLLM, shared when target and synthesizer are the same) or an OpenAI-compatible API


class Models:
    """Loads each local model once, on first use."""

    def __init__(self, cfg):
        self.cfg, self.engines = cfg, {}

    def engine(self, name: str):
        if name not in self.engines:
            cfg = self.cfg
            max_model_len = cfg.max_model_len or (4096 if torch.cuda.is_available() else 1024)
            self.engines[name] = load_engine(name, cfg.backend, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                                             max_model_len=max_model_len, min_pixels=cfg.min_pixels,
                                             max_pixels=cfg.max_pixels)
        return self.engines[name]

    def answer(self, samples: list[Sample], n: int, seed: int) -> list[list[str]]:
        """n sampled solutions per question from the target model, as in training (same prompt)."""
        eng, processor = self.engine(self.cfg.model)
        prompts = [encode_prompt(processor, s) for s in samples]
        torch.manual_seed(seed)
        groups = eng.generate(prompts, Sampling(n=n, temperature=self.cfg.temperature,
                                                max_tokens=self.cfg.max_new_tokens, seed=seed))
        return [[c.text for c in g] for g in groups]

    def write(self, samples: list[Sample], texts: list[str], seed: int, model: str = "") -> list[str | None]:
        """One reply per (image, instruction); None where an API call failed (the item is retried on rerun)."""
        if self.cfg.api_url:
            return [api_chat(self.cfg, s, t) for s, t in zip(samples, texts)]
        eng, processor = self.engine(model or self.cfg.synthesizer or self.cfg.model)
        prompts = [encode_prompt(processor, s, text=t, prefill=self.cfg.synth_prefill) for s, t in zip(samples, texts)]
        torch.manual_seed(seed)
        groups = eng.generate(prompts, Sampling(n=1, temperature=self.cfg.synth_temperature,
                                                max_tokens=self.cfg.synth_max_tokens, seed=seed))
        return [self.cfg.synth_prefill + g[0].text for g in groups]


def api_chat(cfg, sample: Sample, text: str, retries: int = 3) -> str | None:
    """One chat completion with the image inlined as a data URL; None after `retries` failures."""
    buf = io.BytesIO()
    load_image(sample.image).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": cfg.api_model, "temperature": cfg.synth_temperature, "max_tokens": cfg.synth_max_tokens,
            "messages": [{"role": "system", "content": SYNTH_SYSTEM},
                         {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}]}
    headers = {"Content-Type": "application/json"}
    if os.environ.get(cfg.api_key_env):
        headers["Authorization"] = "Bearer " + os.environ[cfg.api_key_env]
    for attempt in range(retries):
        try:
            req = urllib.request.Request(cfg.api_url.rstrip("/") + "/chat/completions",
                                         data=json.dumps(body).encode(), headers=headers)
            with urllib.request.urlopen(req, timeout=300) as r:
                return json.loads(r.read())["choices"][0]["message"]["content"]
        except Exception as e:   # network, HTTP or schema error: back off, then give up on this item for now
            tqdm.write(f"synthesizer API error on {sample.id}: {e}")
            time.sleep(min(30.0, 2.0 ** attempt))
    return None


# ----------------------------------------------------------------------------------------------------
# Stages


def passrate(cfg, models, seeds) -> dict:
    """c_ori for every labelled seed -> passrate.jsonl {id, pass_count, n, answers}."""
    path = out_path(cfg, "passrate.jsonl")
    done = {r["id"]: r for r in read_rows(path)}
    todo = [s for s in seeds if s.answer is not None and s.id not in done]
    for ch in tqdm(chunks(todo, cfg.batch), desc="passrate", dynamic_ncols=True):
        groups = models.answer(ch, cfg.num_rollouts, item_seed(cfg, "passrate", ch[0].id))
        rows = [{"id": s.id, "pass_count": pass_count(g, s.answer), "n": cfg.num_rollouts,
                 "answers": [R.extract_boxed(t) for t in g]} for s, g in zip(ch, groups)]
        append_rows(path, rows)
        done.update((r["id"], r) for r in rows)
    return done


def select(cfg, seeds, rates) -> list[Sample]:
    """Seeds the target already solves at least select_min times of N -> selected.jsonl."""
    chosen = [s for s in seeds if s.id in rates and rates[s.id]["pass_count"] >= cfg.select_min]
    write_jsonl(out_path(cfg, "selected.jsonl"), [{"id": s.id, "pass_count": rates[s.id]["pass_count"]} for s in chosen])
    return chosen


def accepted_variants(cfg) -> dict:
    """seed id -> its accepted variants (verified.jsonl rows), in attempt order."""
    out = {}
    for r in sorted(read_rows(out_path(cfg, "verified.jsonl")), key=lambda r: r["attempt"]):
        if r["verdict"] == "accepted":
            out.setdefault(r["seed_id"], []).append(r)
    return out


def open_seeds(cfg, selected) -> list[tuple[Sample, int]]:
    """(seed, next attempt) for the selected seeds with attempts left (--keep first: and no accepted variant yet)."""
    tried = Counter(r["seed_id"] for r in read_rows(out_path(cfg, "candidates.jsonl")))
    done = set(accepted_variants(cfg)) if cfg.keep == "first" else set()
    return [(s, tried[s.id]) for s in selected if s.id not in done and tried[s.id] < cfg.attempts]


def kept_variant(cfg, variants: list[dict]) -> dict:
    """The accepted variant a seed keeps: the first, or (--keep hardest) the lowest pass count, the earlier on a tie."""
    return variants[0] if cfg.keep == "first" else min(variants, key=lambda r: (r["pass_count"], r["attempt"]))


def synthesize(cfg, models, selected) -> int:
    """One more attempt for every open seed -> candidates.jsonl {seed_id, attempt, text, question}."""
    path, made = out_path(cfg, "candidates.jsonl"), 0
    todo, accepted = open_seeds(cfg, selected), accepted_variants(cfg)
    # --keep hardest chains: each round rewrites the seed's latest accepted variant (the seed until there is one)
    start = lambda s: accepted[s.id][-1]["question"] if cfg.keep == "hardest" and s.id in accepted else s.problem
    for ch in tqdm(chunks(todo, cfg.batch), desc="synthesize", dynamic_ncols=True):
        texts = [HARDER_PROMPT.format(question=start(s)) for s, _ in ch]
        replies = models.write([s for s, _ in ch], texts, item_seed(cfg, "synthesize", ch[0][0].id, ch[0][1]))
        rows = [{"seed_id": s.id, "attempt": k, "text": t, "question": parse_new_question(t)}
                for (s, k), t in zip(ch, replies) if t is not None]
        append_rows(path, rows)
        made += len(rows)
    return made


def verify(cfg, models, seeds, rates) -> int:
    """Pass count of every unverified candidate against its seed's answer -> verified.jsonl."""
    path = out_path(cfg, "verified.jsonl")
    by_id = {s.id: s for s in seeds}
    seen = {(r["seed_id"], r["attempt"]) for r in read_rows(path)}
    todo = [c for c in read_rows(out_path(cfg, "candidates.jsonl"))
            if (c["seed_id"], c["attempt"]) not in seen and c["seed_id"] in by_id]
    rows = []
    for c in todo:   # candidates that need no rollouts
        seed = by_id[c["seed_id"]]
        if c["question"] is None:
            rows.append({**c, "verdict": "no_question", "pass_count": None})
        elif same_question(c["question"], seed.problem):
            rows.append({**c, "verdict": "same_as_seed", "pass_count": None})
    append_rows(path, rows)
    todo = [c for c in todo if c["question"] is not None and not same_question(c["question"], by_id[c["seed_id"]].problem)]
    for ch in tqdm(chunks(todo, cfg.batch), desc="verify", dynamic_ncols=True):
        variants = [replace(by_id[c["seed_id"]], problem=c["question"]) for c in ch]
        groups = models.answer(variants, cfg.num_rollouts, item_seed(cfg, "verify", ch[0]["seed_id"], ch[0]["attempt"]))
        rows = []
        for c, v, g in zip(ch, variants, groups):
            k = pass_count(g, v.answer)
            rows.append({**c, "pass_count": k, "seed_pass_count": rates[c["seed_id"]]["pass_count"],
                         "verdict": verdict(k, rates[c["seed_id"]]["pass_count"], cfg.t_min, cfg.delta)})
        append_rows(path, rows)
    return len(todo)


def export(cfg, seeds, rates) -> str:
    """synth.jsonl for train.py: originals (augment mode) and each seed's kept variant (--keep)."""
    kept = {seed_id: kept_variant(cfg, rows) for seed_id, rows in accepted_variants(cfg).items()}
    out = []
    for s in seeds:
        if cfg.export_mode == "augment":
            meta = {**s.meta, "pass_count": rates[s.id]["pass_count"]} if s.id in rates else s.meta
            out.append(replace(s, meta=meta))
        if s.id in kept:
            r = kept[s.id]
            out.append(replace(s, id=f"{s.id}-synthrl{r['attempt']}", problem=r["question"], parent_id=s.id,
                                    source_id=s.root, generation=s.generation + 1,
                                    meta={"synth_method": "harder", "seed_id": s.id, "attempts": r["attempt"] + 1,
                                          "pass_count": r["pass_count"], "seed_pass_count": r["seed_pass_count"],
                                          "num_rollouts": cfg.num_rollouts}))
    path = out_path(cfg, "synth.jsonl")
    write_samples(out, path)
    return path


def selfq(cfg, models, seeds) -> str:
    """MM-UPT: the policy writes questions_per_image new questions per seed image -> selfq_<mode>.jsonl."""
    path = out_path(cfg, f"selfq_{cfg.mode}.jsonl")
    done = {r.get("parent_id") for r in read_rows(path)} | {r["seed_id"] for r in read_rows(path + ".rejected")}
    todo = [s for s in seeds if s.id not in done]
    for ch in tqdm(chunks(todo, cfg.batch), desc=f"selfq {cfg.mode}", dynamic_ncols=True):
        rows, rejected = [], []
        for k in range(cfg.questions_per_image):
            texts = [SELFQ_PROMPTS[cfg.mode].format(question=s.problem, answer=s.answer) for s in ch]
            replies = models.write(ch, texts, item_seed(cfg, "selfq", cfg.mode, ch[0].id, k), model=cfg.model)
            for s, t in zip(ch, replies):
                q = parse_new_question(t) if t is not None else None
                asked = [s.problem] + [r["problem"] for r in rows if r["parent_id"] == s.id]
                if q is None or any(same_question(q, a) for a in asked):
                    rejected.append({"seed_id": s.id, "k": k, "text": t, "reason": "no_question" if q is None else "duplicate"})
                    continue
                rows.append({"id": f"{s.id}-selfq-{cfg.mode}-{k}", "image": s.image, "problem": q, "answer": None,
                             "parent_id": s.id, "source_id": s.root, "generation": s.generation + 1,
                             "meta": {"synth_method": cfg.mode, "seed_id": s.id}})
        append_rows(path + ".rejected", rejected)   # first: a seed is "done" once its questions are written
        append_rows(path, rows)
    return path


# ----------------------------------------------------------------------------------------------------
# Summary


def summary(cfg, seeds) -> dict:
    rates = {r["id"]: r for r in read_rows(out_path(cfg, "passrate.jsonl"))}
    verified = read_rows(out_path(cfg, "verified.jsonl"))
    reasons = Counter(r["verdict"] for r in verified)
    accepted = {r["seed_id"] for r in verified if r["verdict"] == "accepted"}
    sel = read_rows(out_path(cfg, "selected.jsonl"))
    s = {"seeds": len(seeds), "labelled": sum(x.answer is not None for x in seeds), "pass_counted": len(rates),
         f"selected (c_ori >= {cfg.select_min}/{cfg.num_rollouts})": len(sel),
         "candidates": len(read_rows(out_path(cfg, "candidates.jsonl"))), "verified": len(verified),
         "seeds with a variant": len(accepted), **{f"  rejected: {k}": v for k, v in sorted(reasons.items()) if k != "accepted"}}
    return s


def print_table(stats: dict) -> None:
    w = max(map(len, stats))
    print("\n| " + "item".ljust(w) + " | count |\n|" + "-" * (w + 2) + "|-------|")
    for k, v in stats.items():
        print(f"| {k.ljust(w)} | {v:5d} |")


# Settings that do not change what a stage writes: any other one changed on a rerun would mix rows made two ways
NEUTRAL = ("stage", "out_dir", "batch", "api_key_env", "max_model_len", "vllm_gpu_memory_utilization", "backend",
           "attempts", "export_mode", "mode")   # selfq's --mode writes a file of its own


def check_config(cfg: SynthConfig) -> None:
    """Files, models and counts in their meaningful range, before anything is loaded or written."""
    counts = (cfg.num_rollouts, cfg.shapes_n, cfg.max_new_tokens, cfg.synth_max_tokens, cfg.attempts, cfg.batch,
              cfg.questions_per_image)
    problems = [
        cfg.data and missing_sources(cfg.data) and f"--data {cfg.data}: no such file or dataset dir",
        output_problem("--out-dir", cfg.out_dir, folder=True),
        model_problem(cfg.model),
        cfg.synthesizer and not cfg.api_url and model_problem(cfg.synthesizer, "--synthesizer"),
        min(counts) < 1 and "--num-rollouts, --shapes-n, --max-new-tokens, --synth-max-tokens, --attempts, --batch "
                            "and --questions-per-image must be at least 1",
        (not 0 <= cfg.t_min <= cfg.num_rollouts or not 0 <= cfg.select_min <= cfg.num_rollouts or cfg.delta < 0) and
        f"--t-min and --select-min must be in [0, --num-rollouts {cfg.num_rollouts}], --delta >= 0",
        (cfg.temperature <= 0 or cfg.synth_temperature <= 0) and "--temperature and --synth-temperature must be > 0",
    ]
    stop_at_first("synth.py", problems)


def keep_settings(cfg: SynthConfig) -> None:
    """An out-dir's rows are reused by later stages and reruns: only with the settings they were made with. The first
    run writes OUT/settings.json; a later one with other settings stops with one line naming them."""
    path = out_path(cfg, "settings.json")
    now = {k: v for k, v in asdict(cfg).items() if k not in NEUTRAL}
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = [k for k in now if json.loads(json.dumps(now[k])) != before.get(k)]
        if changed:
            flags = ", ".join(f"--{k.replace('_', '-')} {now[k]} (its rows: {before.get(k)})" for k in changed)
            raise SystemExit(f"synth.py: {cfg.out_dir} holds rows made with other settings: {flags}; give another "
                             "--out-dir")
    with atomic_write(path) as f:
        json.dump(now, f, indent=1)


def main(cfg: SynthConfig) -> dict:
    check_config(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    keep_settings(cfg)
    with atomic_write(out_path(cfg, f"config_{cfg.stage}.json")) as f:
        json.dump(asdict(cfg), f, indent=1)
    seeds, models = load_seeds(cfg), Models(cfg)
    if cfg.stage == "selfq":
        path = selfq(cfg, models, seeds)
        n, bad = len(read_rows(path)), Counter(r["reason"] for r in read_rows(path + ".rejected"))
        print_table({"seed images": len(seeds), "questions": n, **{f"  rejected: {k}": v for k, v in bad.items()}})
        print(f"questions: {path}  (train with --task math --reward majority --data {path})")
        return {"questions": n, "path": path}
    rates = {r["id"]: r for r in read_rows(out_path(cfg, "passrate.jsonl"))}
    if cfg.stage in ("run", "passrate"):
        rates = passrate(cfg, models, seeds)
    selected = select(cfg, seeds, rates) if cfg.stage in ("run", "select", "synthesize") else \
        [s for s in seeds if s.id in {r["id"] for r in read_rows(out_path(cfg, "selected.jsonl"))}]
    if cfg.stage == "synthesize":
        synthesize(cfg, models, selected)
    if cfg.stage == "verify":
        verify(cfg, models, seeds, rates)
    if cfg.stage == "run":
        while open_seeds(cfg, selected):   # one attempt per open seed per round (resumes mid-round too)
            verify(cfg, models, seeds, rates)
            if not open_seeds(cfg, selected):
                break
            if synthesize(cfg, models, selected) == 0:   # the API gave nothing this round: stop, rerun later
                break
        verify(cfg, models, seeds, rates)
    if cfg.stage in ("run", "export"):
        path = export(cfg, seeds, rates)
        print(f"training data: {path}  (python train.py --task math --data {path})")
    stats = summary(cfg, seeds)
    print_table(stats)
    with atomic_write(out_path(cfg, "summary.json")) as f:
        json.dump(stats, f, indent=1)
    return stats


if __name__ == "__main__":
    main(parse_args())
