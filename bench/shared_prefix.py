"""`--shared-prefix` against one row a sequence, at a perception task's proportions (an image of several hundred
tokens, completions of 60-120 tokens): the trainer's log-prob pass (forward + backward of one micro-batch) and HF
generation (one prefill a prompt against one a sample).
Prints a table of time ratios measured side by side in this run (median of --repeats, interleaved), and how each
mode's time grows with G and with the prompt's length; writes bench/shared_prefix.json and .png.

    python bench/shared_prefix.py            # tiny-qwen-vocab (the real 151,643-token vocabulary), ~10 min
    python bench/shared_prefix.py --quick    # fewer points and repeats

Both modes compute the same log-probs and gradients (tests/test_rollout.py); only the work differs: one row a
sequence encodes the image and the prompt G times, the shared prefix once (Prefix Grouper, arXiv 2506.05433).
The tiny model is small, so its vision tower and layers are cheap beside the vocabulary's projection, which both
modes pay alike: on a real 3B model the prompt's share of the work, and so the saving, is larger.
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import code_commit  # noqa: E402  (after the path: bench/ runs as a script)

HERE = os.path.dirname(os.path.abspath(__file__))


def setup(model_name: str, side: int):
    """The policy, and one prompt on a side x side shapes image at pixel limits that keep its size."""
    from data import read_data
    from models import load_policy
    from rollout import encode_prompt
    from shapes import make_shapes
    model, proc = load_policy(model_name, min_pixels=side * side, max_pixels=side * side)
    model.train()
    sample = read_data(make_shapes("rec", 1, os.path.join(ROOT, ".cache", "bench", "shapes_sp"), seed=0), "rec")[0]
    path = os.path.join(ROOT, ".cache", "bench", f"sp_{side}.png")
    Image.open(sample.image).convert("RGB").resize((side, side)).save(path)
    return model, proc, encode_prompt(proc, dataclasses.replace(sample, image=path))


def completions(G: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 500, (int(n),), generator=g).tolist() for n in torch.randint(60, 121, (G,), generator=g)]


def pass_time(model, proc, prompts, G: int, shared: bool) -> float:
    """Seconds of one forward + backward over B prompts x G completions, one micro-batch."""
    from models import vision_token_ids
    from rollout import completion_logprobs, make_batch
    seqs = [(i, c) for i in range(len(prompts)) for c in completions(G, i)]
    t = time.perf_counter()
    b = make_batch(prompts, seqs, proc.tokenizer.pad_token_id, shared_prefix=shared)
    logp, _ = completion_logprobs(model, b, vision_token_ids(proc))
    (logp * b.completion_mask).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def measure(model, proc, prompt, G: int, B: int, repeats: int) -> dict:
    pass_time(model, proc, [prompt] * B, G, True)                         # warm-up, both paths
    pass_time(model, proc, [prompt] * B, G, False)
    times = {True: [], False: []}
    for _ in range(repeats):                                              # interleaved: drift hits both alike
        for shared in (False, True):
            times[shared].append(pass_time(model, proc, [prompt] * B, G, shared))
    per_seq, shared = statistics.median(times[False]), statistics.median(times[True])
    return {"G": G, "B": B, "prompt_tokens": len(prompt.input_ids), "per_sequence_s": per_seq, "shared_prefix_s": shared,
            "speedup": per_seq / shared}


def generation(model, proc, prompt, G: int, B: int, repeats: int, tokens: int = 64) -> dict:
    """Seconds of HFRollout.generate for B prompts x G samples of `tokens` new tokens (stop tokens suppressed, so
    both modes generate the same count), one prefill a prompt against one a sample."""
    from rollout import HFRollout, Sampling
    model.eval()
    times = {False: [], True: []}
    for k in range(repeats + 1):                                         # the first round warms up
        for one in (False, True):
            ro = HFRollout(model, proc, one_prefill=one)
            ro.banned = ro.banned + ro.stops                            # never sampled: every sample is full length
            t = time.perf_counter()
            ro.generate([prompt] * B, Sampling(n=G, max_tokens=tokens), seeds=None)
            if k:
                times[one].append(time.perf_counter() - t)
    model.train()
    a, b = statistics.median(times[False]), statistics.median(times[True])
    return {"G": G, "B": B, "prompt_tokens": len(prompt.input_ids), "new_tokens": tokens, "one_prefill_a_sample_s": a,
            "one_prefill_a_prompt_s": b, "speedup": a / b}


def vllm_worker(model_name: str, side: int, G: int, B: int, repeats: int, caching: bool, tokens: int = 64) -> None:
    """(subprocess) Seconds of vLLM generation for B prompts x G samples, its prefix cache on or off, the cache
    emptied before each call as every weight push empties it in training; prints one JSON line."""
    from models import load_processor
    from rollout import Sampling, VLLMRollout
    model, proc, prompt = setup(model_name, side)
    eng = VLLMRollout(model_name, load_processor(model_name, side * side, side * side), max_model_len=1024,
                      min_pixels=side * side, max_pixels=side * side, prefix_caching=caching)
    eng.banned = eng.banned + eng.stops                                # every sample is full length
    eng.stops = []
    times = []
    for k in range(repeats + 1):                                      # the first call warms up
        eng.llm.reset_prefix_cache()
        eng.llm.reset_mm_cache()
        eng.llm.llm_engine.reset_encoder_cache()
        t = time.perf_counter()
        eng.generate([prompt] * B, Sampling(n=G, max_tokens=tokens, seed=k))
        if k:
            times.append(time.perf_counter() - t)
    print(json.dumps({"caching": caching, "times": times}))


def vllm_prefix_caching(model_name: str, side: int, G: int, B: int, repeats: int) -> dict:
    """vLLM's prefix caching on against off, each in a fresh process (one in-process engine at a time)."""
    out = {}
    for caching in (False, True):
        code = (f"import sys; sys.path.insert(0, {HERE!r}); import shared_prefix as s; "
                f"s.vllm_worker({model_name!r}, {side}, {G}, {B}, {repeats}, {caching})")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        lines = [l for l in r.stdout.splitlines() if l.startswith('{"caching"')]
        if r.returncode or not lines:
            raise SystemExit("bench/shared_prefix.py: the vLLM probe failed:\n" + r.stderr[-2000:])
        out["on" if caching else "off"] = statistics.median(json.loads(lines[-1])["times"])
    return {"G": G, "B": B, "side": side, "off_s": out["off"], "on_s": out["on"], "speedup": out["off"] / out["on"]}


def peak_rss_mb(model_name: str, side: int, G: int, B: int, shared: bool) -> float:
    """Peak RSS of a fresh process doing one pass (the model and data loaded alike in both)."""
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import shared_prefix as s; "
            f"m, p, q = s.setup({model_name!r}, {side}); s.pass_time(m, p, [q] * {B}, {G}, {shared})")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"bench/shared_prefix.py: the memory probe failed ({'shared' if shared else 'per-sequence'})")
    return usage.ru_maxrss / 1024


def slope(points: list[dict], x: str, y: str) -> float:
    """Least-squares slope of y against x."""
    xs, ys = [p[x] for p in points], [p[y] for p in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def plot(by_g, by_len, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, pts, x, label in ((axes[0], by_g, "G", "G (completions a prompt)"),
                              (axes[1], by_len, "prompt_tokens", "prompt tokens (image + text)")):
        ax.plot([p[x] for p in pts], [p["per_sequence_s"] for p in pts], "o-", label="one row a sequence")
        ax.plot([p[x] for p in pts], [p["shared_prefix_s"] for p in pts], "o-", label="shared prefix")
        ax.set_xlabel(label)
        ax.set_ylabel("forward + backward (s)")
    axes[0].legend()
    fig.suptitle("The trainer's log-prob pass, one micro-batch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-qwen-vocab", help="the policy (a tiny one on CPU)")
    p.add_argument("--quick", action="store_true", help="fewer points, 3 repeats")
    p.add_argument("--repeats", type=int, default=5, help="timed passes a mode and point (median kept)")
    p.add_argument("--B", type=int, default=2, help="prompts in the micro-batch")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    repeats = 3 if a.quick else a.repeats
    gs = (2, 6, 16) if a.quick else (2, 4, 6, 8, 12, 16)
    sides = (224, 448) if a.quick else (224, 336, 448, 560)
    model, proc, prompt = setup(a.model, 448)
    by_g = [measure(model, proc, prompt, G, a.B, repeats) for G in gs]
    by_len = []
    for side in sides:
        model, proc, prompt = setup(a.model, side)
        by_len.append(measure(model, proc, prompt, 6, a.B, repeats))
    gen = generation(model, proc, prompt, 6, a.B, repeats)                # the last (largest) prompt
    prefix_cache = vllm_prefix_caching(a.model, 448, 6, a.B, repeats)
    memory = {mode: peak_rss_mb(a.model, 448, 6, a.B, mode == "shared_prefix") for mode in ("per_sequence", "shared_prefix")}
    result = {"commit": code_commit(), "model": a.model, "B": a.B, "by_G": by_g, "by_prompt_length": by_len,
              "peak_rss_mb_G6_448px": memory, "generation": gen, "vllm_prefix_caching": prefix_cache,
              "slope_ratio_G": slope(by_g, "G", "per_sequence_s") / slope(by_g, "G", "shared_prefix_s"),
              "slope_ratio_prompt": slope(by_len, "prompt_tokens", "per_sequence_s")
              / slope(by_len, "prompt_tokens", "shared_prefix_s")}
    print(f"commit {result['commit']}, {a.model}, B = {a.B} prompts, completions of 60-120 tokens; "
          f"median of {repeats}, seconds of forward + backward")
    print("| G | prompt tokens | one row a sequence | shared prefix | ratio |\n|---|---|---|---|---|")
    for r in by_g + by_len:
        print(f"| {r['G']} | {r['prompt_tokens']} | {r['per_sequence_s']:.3f} | {r['shared_prefix_s']:.3f} | "
              f"{r['speedup']:.2f} |")
    print(f"time per added completion (slope against G), one row a sequence / shared prefix: "
          f"{result['slope_ratio_G']:.2f}; per added prompt token (G = 6): {result['slope_ratio_prompt']:.2f}")
    print(f"HF generation, G = 6, {gen['prompt_tokens']} prompt tokens, {gen['new_tokens']} new tokens: one prefill a "
          f"sample {gen['one_prefill_a_sample_s']:.3f} s, one a prompt {gen['one_prefill_a_prompt_s']:.3f} s, ratio "
          f"{gen['speedup']:.2f}")
    print(f"vLLM generation, G = 6, 448 px, 64 new tokens, the cache emptied before each call: prefix caching off "
          f"{prefix_cache['off_s']:.3f} s, on {prefix_cache['on_s']:.3f} s, ratio {prefix_cache['speedup']:.2f}")
    print(f"peak RSS, G = 6, 448 px: one row a sequence {memory['per_sequence']:.0f} MB, "
          f"shared prefix {memory['shared_prefix']:.0f} MB")
    with open(os.path.join(HERE, "shared_prefix.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(by_g, by_len, os.path.join(HERE, "shared_prefix.png"))
    return result


if __name__ == "__main__":
    main()
