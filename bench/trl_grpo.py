"""TRL's GRPOTrainer on the same model, shapes REC data, batch, G, completion length, pixel limits and rewards as
`train.py`, for bench/run.py. Prints one JSON line: per-step seconds and mean completion lengths.

    python bench/trl_grpo.py --model DIR --steps 6 --batch-size 4 --num-generations 6 --max-new-tokens 48
    python bench/trl_grpo.py --model tiny-qwen-vocab --min-pixels 200704 --max-pixels 200704 --use-vllm

--use-vllm is TRL's colocated vLLM mode (the engine in the trainer's process), its best mode on one machine.
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-generations", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-pixels", type=int, default=0, help="the image processor's pixel floor (0: the model's own)")
    p.add_argument("--max-pixels", type=int, default=0, help="the image processor's pixel budget (0: the model's own)")
    p.add_argument("--use-vllm", action="store_true", help="TRL's colocated vLLM generation instead of HF generate")
    return p.parse_args()


def rec_data(processor):
    """train.py's built-in shapes REC data as TRL's dataset, and our two rewards on it as TRL's reward functions,
    each completion scored in the model's box frame as train.py scores it."""
    from datasets import Dataset

    import rewards as R
    from data import load_image, read_data
    from prompts import build_prompt
    from rollout import encode_prompt
    from shapes import make_shapes
    samples = read_data(make_shapes("rec", 512, os.path.join(ROOT, ".cache", "shapes"), objects=(1, 2)), "rec")
    sizes = [encode_prompt(processor, s).frame_size for s in samples]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                                     {"type": "text", "text": build_prompt(s)}]}],
                             "image": load_image(s.image), "idx": i} for i, s in enumerate(samples)])
    text = lambda c: c[0]["content"] if isinstance(c, list) else c

    def accuracy(prompts, completions, idx, **kw):
        return [R.score_completion(text(c), samples[i], sizes[i]).accuracy for c, i in zip(completions, idx)]

    def fmt(prompts, completions, idx, **kw):
        return [R.format_reward(text(c), "rec") for c in completions]
    return ds, [accuracy, fmt]


def step_clock(times: list):
    """A TrainerCallback appending each step's seconds to `times`."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
    return Clock()


def main(callbacks=()):
    a = parse_args()
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from models import load_processor, resolve_model
    torch.manual_seed(0)
    processor = load_processor(a.model, a.min_pixels, a.max_pixels)
    ds, reward_funcs = rec_data(processor)
    times = []
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-"), use_cpu=True, bf16=False,
                     per_device_train_batch_size=a.batch_size * a.num_generations, num_generations=a.num_generations,
                     max_completion_length=a.max_new_tokens, temperature=1.0, beta=0.0, learning_rate=a.lr,
                     max_steps=a.steps, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                     loss_type="grpo", epsilon_high=0.28, seed=0, use_vllm=a.use_vllm, vllm_mode="colocate",
                     vllm_max_model_length=4096, vllm_gpu_memory_utilization=0.3)   # the CPU backend reserves this share of RAM
    trainer = GRPOTrainer(model=resolve_model(a.model), processing_class=processor, reward_funcs=reward_funcs, args=cfg,
                          train_dataset=ds, callbacks=[step_clock(times), *callbacks])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    print(json.dumps({"step_times": times, "completion_len": lengths}))


if __name__ == "__main__":
    main()
