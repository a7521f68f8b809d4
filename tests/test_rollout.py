import copy
import dataclasses

import pytest
import torch

from data import read_data
from shapes import make_shapes
from models import load_policy, vision_token_ids
from rollout import HFRollout, Sampling, completion_logprobs, encode_prompt, make_batch


@pytest.fixture(scope="module")
def prompts(tiny, shapes_dir):
    samples = read_data(make_shapes("rec", 4, shapes_dir), "rec")
    return [encode_prompt(tiny[1], s) for s in samples]


def test_tiny_model_saves_reloads_identically(tiny, tmp_path, prompts):
    model, proc = tiny
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    m2, p2 = load_policy(str(tmp_path))          # the same code path as a hub id or checkpoint dir
    p = prompts[0]
    ids = torch.tensor([p.input_ids])
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw).logits
        b = m2(input_ids=ids, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw).logits
    assert torch.equal(a, b)
    assert p2.tokenizer.convert_tokens_to_ids("<|image_pad|>") == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.text_config.num_attention_heads and model.config.text_config.hidden_size // 4 == 32   # head_dim


def test_prompt_keeps_every_image_token(tiny, prompts):
    model, proc = tiny
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for p in prompts:
        t, h, w = p.image_grid_thw[0].tolist()
        assert p.input_ids.count(pad) == t * h * w // 4          # merge 2x2
        assert p.input_size == (w * 14, h * 14)


def check_groups(groups, proc, n, prompts):
    banned = set(vision_token_ids(proc))
    assert len(groups) == len(prompts) and all(len(g) == n for g in groups)
    for i, g in enumerate(groups):
        for c in g:
            assert not banned & set(c.token_ids)
            assert len(c.logprobs) == len(c.token_ids) > 0
            assert all(lp <= 0 for lp in c.logprobs)


def test_hf_generate_groups_and_logprob_parity(tiny, prompts):
    model, proc = tiny
    groups = HFRollout(model, proc).generate(prompts, Sampling(n=3, max_tokens=16, seed=0))
    check_groups(groups, proc, 3, prompts)
    seqs = [(i, c.token_ids) for i, g in enumerate(groups) for c in g]
    with torch.no_grad():
        lp, _ = completion_logprobs(model, make_batch(prompts, seqs, proc.tokenizer.pad_token_id), vision_token_ids(proc))
    for r, (i, toks) in enumerate(seqs):
        sampled = torch.tensor(groups[i][r % 3].logprobs)
        assert torch.allclose(lp[r, :len(toks)], sampled, atol=1e-4)


def _gap(trainer, proc, prompts, groups):
    seqs = [(i, c.token_ids) for i, g in enumerate(groups) for c in g]
    n = len(groups[0])
    with torch.no_grad():
        lp, _ = completion_logprobs(trainer, make_batch(prompts, seqs, proc.tokenizer.pad_token_id), vision_token_ids(proc))
    return max((lp[r, :len(t)] - torch.tensor(groups[i][r % n].logprobs)).abs().max().item() for r, (i, t) in enumerate(seqs))


@pytest.mark.slow
def test_vllm_generates_and_follows_weight_pushes(tiny, vllm_engine, prompts):
    model, proc = tiny
    from vllm import SamplingParams
    torch.manual_seed(0)
    trainer = copy.deepcopy(model)
    with torch.no_grad():
        for p in trainer.parameters():          # tied embeddings stay tied: perturb parameters, not state-dict keys
            p.add_(0.05 * torch.randn_like(p))
    # text-only prompt: after a push the engine's sampling log-probs equal the trainer's (fp32 on CPU)
    text = proc.apply_chat_template([{"role": "user", "content": "Name a shape."}], add_generation_prompt=True,
                                    tokenize=False)
    ids = proc.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_gap(m):
        o = vllm_engine.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=12, logprobs=0, seed=3),
                                     use_tqdm=False)[0].outputs[0]
        toks = list(o.token_ids)
        with torch.no_grad():
            lg = m(input_ids=torch.tensor([ids + toks])).logits[0, len(ids) - 1:-1]
        lp = lg.log_softmax(-1).gather(-1, torch.tensor(toks)[:, None])[:, 0]
        return (lp - torch.tensor([d[t].logprob for d, t in zip(o.logprobs, toks)])).abs().max().item()

    vllm_engine.push_weights(trainer.state_dict())
    assert text_gap(trainer) < 1e-4                 # measured 5e-7
    assert text_gap(model) > 1e-2                   # ... and the push did change the engine
    # image prompts: grouped completions, no vision token, seeded sampling reproducible
    groups = vllm_engine.generate(prompts, Sampling(n=4, max_tokens=16, seed=1))
    check_groups(groups, proc, 4, prompts)
    # image prompts too: the engine's sampling log-probs equal the trainer's recomputed ones after the push
    # (measured 5e-7; before mm_token_type_ids reached transformers, image tokens got 1D positions: 4e-3 gap)
    assert _gap(trainer, proc, prompts, groups) < 1e-4
    assert _gap(model, proc, prompts, groups) > 1e-2
    vllm_engine.push_weights(model.state_dict())   # leave the shared engine as the fixture made it
    assert text_gap(model) < 1e-4
    a = vllm_engine.generate(prompts[:1], Sampling(n=2, max_tokens=8, seed=5))
    b = vllm_engine.generate(prompts[:1], Sampling(n=2, max_tokens=8, seed=5))
    assert [c.token_ids for c in a[0]] == [c.token_ids for c in b[0]]
    greedy = vllm_engine.generate(prompts[:2], Sampling(greedy=True, max_tokens=8))
    assert all(len(g) == 1 for g in greedy)


def test_image_tokens_get_3d_mrope_positions(tiny, prompts):
    """transformers computes Qwen2.5-VL's (t, h, w) positions only when it gets mm_token_type_ids; without them
    image tokens silently get 1D text positions. Our batches carry them: the logits depend on the 2D layout."""
    model, proc = tiny
    p = prompts[0]
    assert sum(p.mm_token_type_ids) == int(p.image_grid_thw.prod()) // 4       # one 1 per merged image token
    batch = make_batch([p], [(0, [5, 6, 7])], proc.tokenizer.pad_token_id)
    no_types = dataclasses.replace(batch, mm_token_type_ids=torch.zeros_like(batch.mm_token_type_ids))
    with torch.no_grad():
        a, _ = completion_logprobs(model, batch, [])
        b, _ = completion_logprobs(model, no_types, [])
    assert (a - b).abs().max() > 1e-4


def test_engine_settings_differ_between_gpu_and_cpu_only_where_vllm_needs_it():
    from rollout import engine_kwargs
    assert engine_kwargs(True, 4096, 64, 0.5, True) == dict(enforce_eager=False, gpu_memory_utilization=0.5,
                                                            enable_sleep_mode=True)   # CUDA graphs on a GPU
    assert engine_kwargs(False, 1024, 32, 0.5, True) == dict(enforce_eager=True, max_num_batched_tokens=1024 * 32)


def test_sleep_is_a_no_op_on_cpu_and_generation_goes_on(vllm_engine, prompts):
    """vLLM has no sleep mode on CPU: the trainer's sleep() after each rollout must leave the engine as it was."""
    assert vllm_engine.sleep_mode is False
    before = vllm_engine.generate(prompts[:1], Sampling(greedy=True, max_tokens=8))
    vllm_engine.sleep()
    assert vllm_engine.asleep is False
    after = vllm_engine.generate(prompts[:1], Sampling(greedy=True, max_tokens=8))
    assert [c.token_ids for c in after[0]] == [c.token_ids for c in before[0]]


def test_pixel_limits_set_the_frame_the_boxes_are_read_in(tiny, shapes_dir):
    """--min-pixels / --max-pixels reach the processor; the prompt's input size follows them (Qwen2.5-VL's resize
    rule), and a gold answer written in that frame scores IoU 1 there, not in the other setting's frame."""
    from data import gold_completion, smart_resize
    from rewards import rec_accuracy
    from models import load_processor
    sample = next(s for s in read_data(make_shapes("rec", 8, shapes_dir), "rec") if s.width == 224)
    sizes = {}
    for limits in (dict(), dict(min_pixels=28 * 28 * 16, max_pixels=28 * 28 * 64)):
        p = encode_prompt(load_processor("tiny", **limits), sample)
        h, w = smart_resize(sample.height, sample.width, 28, limits.get("min_pixels", 3136),
                            limits.get("max_pixels", 12544))
        assert p.input_size == (w, h) and p.image_grid_thw[0].tolist() == [1, h // 14, w // 14]
        sizes[len(limits)] = p.input_size
    assert sizes == {0: (112, 112), 2: (224, 224)}
    answer = gold_completion(sample, sizes[2])
    assert rec_accuracy(answer, sample, sizes[2]) == 1.0 and rec_accuracy(answer, sample, sizes[0]) < 0.5


@pytest.mark.slow
def test_the_vllm_engine_sees_images_at_the_trainers_pixel_limits(vllm_engine, shapes_dir, keep_engine):
    """A second engine with --max-pixels raised: vLLM expands each image into as many tokens as the HF processor
    (so its boxes are in the trainer's frame); the shared engine, at the default limits, into fewer."""
    from models import load_processor
    from rollout import VLLMRollout
    sample = next(s for s in read_data(make_shapes("rec", 8, shapes_dir), "rec") if s.width == 224)
    limits = dict(min_pixels=28 * 28 * 16, max_pixels=28 * 28 * 64)
    processor = load_processor("tiny", **limits)
    engine = VLLMRollout("tiny", processor, max_model_len=1024, max_num_seqs=4, **limits)
    keep_engine(engine)
    p = encode_prompt(processor, sample)

    def engine_prompt_len(e):
        req = {"prompt_token_ids": e._vllm_prompt_ids(p), "multi_modal_data": {"image": p.image}}
        return len(e.llm.generate([req], use_tqdm=False)[0].prompt_token_ids)
    assert engine_prompt_len(engine) == len(p.input_ids)
    assert engine_prompt_len(vllm_engine) < len(p.input_ids)
    out = engine.generate([p], Sampling(n=2, max_tokens=4, seed=1))
    assert [len(g) for g in out] == [2]


def test_a_step_runs_in_one_vllm_wave():
    """vLLM's default of 64 running sequences split the paper's B * G = 120 in two waves."""
    from rollout import max_num_seqs
    assert max_num_seqs(20, 6) == 120 and max_num_seqs(10, 6) == 64 and max_num_seqs(4, 6) == 64


# ----------------------------------------------------------------------------------------------------
# The shared-prefix forward (Prefix Grouper): the same log-probs, entropies and gradients as one row a sequence


def test_shared_prefix_mask_lets_a_completion_see_the_prompt_and_itself_only():
    from rollout import shared_prefix_mask
    seg = torch.tensor([[-1, 0, 0, 1, 1, 2, -1]])          # pad, prompt (2), completion 1 (2), completion 2 (1), pad
    m = shared_prefix_mask(seg)[0, 0].int()
    assert m.tolist() == [[1, 0, 0, 0, 0, 0, 0],           # a pad sees itself only (no all-masked row: NaN)
                          [0, 1, 0, 0, 0, 0, 0],
                          [0, 1, 1, 0, 0, 0, 0],
                          [0, 1, 1, 1, 0, 0, 0],
                          [0, 1, 1, 1, 1, 0, 0],
                          [0, 1, 1, 0, 0, 1, 0],           # completion 2 skips completion 1
                          [0, 0, 0, 0, 0, 0, 1]]


def _mixed_prompts(proc, shapes_dir, tmp_path):
    """Three prompts of different lengths: images of 150x90, 224x224 and the shapes' own size."""
    from PIL import Image
    samples = read_data(make_shapes("rec", 3, shapes_dir), "rec")
    for k, size in enumerate([(150, 90), (224, 224)]):
        path = str(tmp_path / f"r{k}.png")
        Image.open(samples[k].image).convert("RGB").resize(size).save(path)
        samples[k] = dataclasses.replace(samples[k], image=path)
    return [encode_prompt(proc, s) for s in samples]


# a micro-batch as train.py cuts one: groups of unequal completion lengths, the last group split off
SEQ_LENGTHS = [(0, 5), (0, 1), (0, 8), (1, 3), (1, 7), (2, 2), (2, 6), (2, 4)]


def _logprobs_and_grads(model, proc, prompts, shared_prefix):
    g = torch.Generator().manual_seed(0)
    seqs = [(i, torch.randint(10, 200, (n,), generator=g).tolist()) for i, n in SEQ_LENGTHS]
    b = make_batch(prompts, seqs, proc.tokenizer.pad_token_id, shared_prefix=shared_prefix)
    model.zero_grad(set_to_none=True)
    lp, ent = completion_logprobs(model, b, vision_token_ids(proc), temperature=0.9, with_entropy=True,
                                  entropy_grad=True)                # the entropy's gradient (--entropy-coef) too
    weights = torch.arange(1, len(seqs) + 1.0)[:, None]      # a different weight a sequence: no symmetry hides a swap
    ((lp + 0.1 * ent) * b.completion_mask * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach() * b.completion_mask, ent.detach() * b.completion_mask, grads, b


def test_the_entropy_enters_autograd_only_when_a_loss_differentiates_it(tiny, shapes_dir, tmp_path):
    """Logged or shaping an advantage, the entropy is a value: carrying it through the backward with a 0 coefficient
    cost 2-3x the pass at the real vocabulary. Its values are the same either way."""
    model, proc = tiny
    prompts = _mixed_prompts(proc, shapes_dir, tmp_path)
    b = make_batch(prompts, [(0, [11, 12, 13])], proc.tokenizer.pad_token_id)
    lp, ent = completion_logprobs(model, b, vision_token_ids(proc), with_entropy=True)
    lp2, ent2 = completion_logprobs(model, b, vision_token_ids(proc), with_entropy=True, entropy_grad=True)
    assert lp.requires_grad and not ent.requires_grad and ent2.requires_grad
    assert torch.equal(ent, ent2.detach()) and torch.equal(lp, lp2)


@pytest.mark.parametrize("name,attn", [("tiny", "sdpa"), ("tiny", "eager"), ("tiny-qwen2-vl", "sdpa"),
                                       ("tiny-qwen3-vl", "sdpa"), ("tiny-glm4v", "sdpa"),
                                       ("tiny-internvl", "sdpa")])
def test_shared_prefix_forward_equals_one_row_a_sequence(name, attn, tiny, shapes_dir, tmp_path):
    """Float32 on CPU: log-probs and entropies within 5e-6, every parameter's gradient within 1e-5 of its largest
    entry (measured: 1e-6 and 1.2e-6 on tiny), vision tower included (trained here)."""
    model, proc = copy.deepcopy(tiny) if name == "tiny" else load_policy(name)
    model.config._attn_implementation = attn
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn
    prompts = _mixed_prompts(proc, shapes_dir, tmp_path)
    assert len({len(p.input_ids) for p in prompts}) > 1                     # the prompts are left-padded
    lp_a, ent_a, grads_a, _ = _logprobs_and_grads(model, proc, prompts, False)
    lp_b, ent_b, grads_b, packed = _logprobs_and_grads(model, proc, prompts, True)
    assert packed.input_ids.shape[0] == 3 and len(packed.image_grids) == 3        # one row, one image a prompt
    assert packed.pixel_values.shape[0] == sum(p.pixel_values.shape[0] for p in prompts)
    assert (lp_a - lp_b).abs().max() < 5e-6 and (ent_a - ent_b).abs().max() < 5e-6
    assert grads_a.keys() == grads_b.keys() and any(".visual." in n or ".vision_tower." in n for n in grads_a)
    for n, ga in grads_a.items():
        assert (ga - grads_b[n]).abs().max() <= 1e-5 * ga.abs().max() + 1e-9, n


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-glm4v", "tiny-internvl"])
def test_one_prefill_samples_what_one_prefill_a_sample_does(name, tiny, shapes_dir, tmp_path):
    """HF generation with each prompt's prefill run once and its cache repeated n times draws the same tokens from
    the same seeds (batched and per-prompt seeded), with log-probs within 1e-5 (measured: 1e-6), on prompts of
    different lengths."""
    model, proc = tiny if name == "tiny" else load_policy(name)
    prompts = _mixed_prompts(proc, shapes_dir, tmp_path)
    for seeds in (None, [11, 12, 13]):
        out = {}
        for one in (False, True):
            torch.manual_seed(0)
            out[one] = HFRollout(model, proc, one_prefill=one).generate(prompts, Sampling(n=4, max_tokens=20), seeds)
        for ga, gb in zip(out[False], out[True]):
            for a, b in zip(ga, gb):
                assert a.token_ids == b.token_ids
                assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


def test_the_shared_prefix_needs_an_attention_that_takes_a_custom_mask():
    from types import SimpleNamespace

    from rollout import attention_mask_for
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"), dtype=torch.float32)
    with pytest.raises(SystemExit, match="--no-shared-prefix"):
        attention_mask_for(flash, torch.ones(1, 1, 2, 2, dtype=torch.bool))
