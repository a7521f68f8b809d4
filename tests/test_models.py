"""models.py: the tiny models' tokenizers (the real Qwen ids; the small vocabulary's fixed corpus and the token
lengths the warm start relies on) and building them offline."""
import hashlib

import torch

from models import QWEN_ADDED, QWEN_SPECIAL, _corpus, build_tiny, build_tokenizer


def test_qwen_vocab_tokenizer_has_qwen25vl_ids():
    tok = build_tokenizer("qwen")
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL + QWEN_ADDED]
    assert ids == list(range(151643, 151665))
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 151643
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")


def test_building_a_tiny_model_leaves_the_global_rng_alone(tmp_path):
    """The first run after a fresh clone builds the tiny model inside `load_policy`, after the run's seeds are set:
    the build must not reseed the run (it did, and that run then differed from every later one)."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build_tiny(str(tmp_path / "tiny"))
    assert torch.equal(torch.get_rng_state(), before)


def test_the_small_vocabulary_keeps_the_warm_start_targets_of_equal_length():
    """Built afresh (as on a clean machine): every warm-start description is 9 tokens and every `<score>0.dd</score>`
    9 with its tags, the lengths prompts.DESCRIPTIONS and the score format were chosen for (with the tiny model's RoPE base 10 the answer must sit at a
    fixed distance). A corpus change that moves them would silently undo the four-tag warm start."""
    from prompts import DESCRIPTIONS
    tok = build_tokenizer("small")
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    assert {n(d) for d in DESCRIPTIONS} == {9}
    assert {n(f"<score>{i / 100:.2f}</score>") for i in range(100)} == {9}


def test_the_small_vocabularys_corpus_is_fixed():
    """A changed corpus is a new tiny model (its hash is in the cache key) and moves every number measured on `tiny`:
    prompts and sentences added later stay out of it (models.LATER_PROMPTS, LATER_TEXT)."""
    assert hashlib.sha256("\n".join(_corpus()).encode()).hexdigest()[:8] == "4b9df3a9"
