"""Trackers (--report-to tensorboard wandb) beside metrics.jsonl: every metrics.jsonl key each step under TRL's name
where TRL has one (`tracker_name`), a table of sample completions and, for Syn-GRPO, the newest synthesized images
beside their sources (`newest_synthesized`). Their x axis is the number of policy updates done (TRL's global_step):
metrics.jsonl's step + 1; validation rows' eval_step. Rank 0 alone logs.
"""
from __future__ import annotations

import os
from dataclasses import asdict

import numpy as np
from PIL import Image, ImageDraw

from common import Dist
from data import DataPool, load_image

TABLE_PROMPTS = 2    # prompts whose G completions go into a completions table
PAIRS = 4            # synthesized images shown beside their sources
PAIR_WIDTH = 160     # pixels of each image of a pair: small enough for a dashboard row

TRL_NAMES = {"reward_accuracy": "rewards/accuracy/mean", "reward_format": "rewards/format/mean",
             "reward_diversity": "rewards/diversity/mean", "reward_custom": "rewards/custom/mean",
             "completion_len": "completions/mean_length", "completions_clipped": "completions/clipped_ratio",
             "clip_frac": "clip_ratio/region_mean", "lr": "learning_rate"}
SYN_KEYS = ("diversity", "score_", "pool_", "jobs_", "batch_synth_frac")


def tracker_problem(report_to) -> str | None:
    """Why a tracker of --report-to cannot start here, or None: checked before the model loads (wandb without
    credentials failed only after it, with a traceback)."""
    if "wandb" not in report_to:
        return None
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return None
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")   # where `wandb login` keeps the key
    if os.path.isfile(netrc):
        with open(netrc, encoding="utf-8", errors="replace") as f:
            if "api.wandb.ai" in f.read():
                return None
    return ("--report-to wandb: no W&B credentials (WANDB_API_KEY, or `wandb login`); WANDB_MODE=offline logs "
            "without an account or a network (`wandb sync` uploads later)")


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

    def __init__(self, cfg, d: Dist, start: int):
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

    def log(self, row: dict, ro, scored, pool: DataPool) -> None:
        """A step's metrics (row); every --log-completions-every updates also the first prompts' completions with
        their rewards (ro, scored: train.py's Rollout and Scored), and the newest synthesized images beside their
        sources, gold boxes drawn."""
        step = row["step"] + 1
        self.scalars(row, step)
        if not (self.tb or self.wandb) or not self.every or step % self.every:
            return
        rows = [[step, p.sample.id, c.text, scored.rewards.total[b, j].item(), scored.advantages[b, j].item()]
                for b, (p, g) in enumerate(zip(ro.prompts[:TABLE_PROMPTS], ro.groups)) for j, c in enumerate(g)]
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


def newest_synthesized(pool: DataPool, n: int = PAIRS) -> list:
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
            pair.append(image.resize((PAIR_WIDTH, round(PAIR_WIDTH * image.height / image.width))))
        canvas = Image.new("RGB", (pair[0].width + pair[1].width + 4, max(p.height for p in pair)), "white")
        canvas.paste(pair[0], (0, 0))
        canvas.paste(pair[1], (pair[0].width + 4, 0))
        out.append((canvas, f"{s.id} (generation {s.generation}, step {s.meta.get('step')}): "
                            f"{s.meta.get('description', '')}"))
    return out

