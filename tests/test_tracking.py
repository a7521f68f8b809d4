"""tracking.py: metrics.jsonl keys under TRL's names, and the image pairs the trackers show."""
import base64

from synthesis import absorb_result
from test_synthesis import one_sample_pool, red_png
from tracking import newest_synthesized, tracker_name


def test_tracker_names_follow_trl():
    assert [tracker_name(k) for k in ("reward", "reward_accuracy", "completion_len", "clip_frac", "kl", "lr",
                                      "time_generate", "pool_size", "eval/val/accuracy")] == [
        "reward", "rewards/accuracy/mean", "completions/mean_length", "clip_ratio/region_mean", "kl",
        "learning_rate", "timing/generate", "syn/pool_size", "eval/val/accuracy"]


def test_the_trackers_show_a_synthesized_image_beside_its_source(tmp_path):
    pool = one_sample_pool(tmp_path)
    absorb_result({"status": "done", "job_id": "j1", "sample_id": "s0", "boxes": [[1, 1, 9, 9]], "description": "d",
                   "image_b64": base64.b64encode(red_png()).decode()}, pool, str(tmp_path), 3)
    (pair,) = newest_synthesized(pool)
    image, caption = pair
    assert image.size == (324, 160) and image.getpixel((304, 150)) == (255, 0, 0)      # right: the new image
    assert image.getpixel((140, 150)) == (255, 255, 255)                              # left: its source
    assert caption.startswith("s0~j1") and caption.endswith("step 3): d")
