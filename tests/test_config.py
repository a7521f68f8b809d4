"""config.py: device defaults, the checks a run must pass before anything is written, and the weights of Eq. 7."""
import pytest
import torch

import train
from config import Config, check_config, prepare_config, reward_weights


def test_reward_weights_default_the_custom_term_to_one():
    w = lambda s: reward_weights(Config(reward_weights=s))
    assert (w("1,1,1"), w("0.9,0.1"), w("0,1,1,2")) == ((1, 1, 1, 1), (0.9, 0.1, 0, 1), (0, 1, 1, 2))


def test_the_local_data_server_gets_a_gpu_of_its_own(monkeypatch):
    """torchrun's N ranks take cuda:0 .. cuda:N-1: the local server takes cuda:N (it used to take cuda:1, rank 1's)."""
    assert prepare_config(Config(algo="syn-grpo", device="cuda"), files=False).server_device == "cuda:1"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert prepare_config(Config(algo="syn-grpo", device="cuda"), files=False).server_device == "cuda:4"
    assert prepare_config(Config(algo="syn-grpo", device="cuda", server_device="cuda:0"),
                          files=False).server_device == "cuda:0"       # sharing a GPU is asked for, not a default
    assert prepare_config(Config(algo="syn-grpo"), files=False).server_device == (
        "cuda:4" if torch.cuda.is_available() else "cpu")


def test_a_local_server_on_a_gpu_that_is_not_there_stops_the_start(tmp_path):
    cfg = prepare_config(Config(algo="syn-grpo", device="cpu", out_dir=str(tmp_path)), files=False)
    cfg.server_device = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(SystemExit, match=f"--server-device {cfg.server_device}: no such device"):
        check_config(cfg)
    cfg.server_url = "http://127.0.0.1:8000"            # a server of the user's: no local one, nothing to check
    check_config(cfg)


def test_sft_uses_its_own_weight_decay(monkeypatch, tmp_path):
    """SFT's AdamW takes --sft-weight-decay (it was fixed at 0.01 whatever the flags)."""
    seen = []

    class Stop(Exception):
        pass

    def adamw(params, lr, weight_decay):
        seen.append(weight_decay)
        raise Stop
    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    cfg = prepare_config(Config(out_dir=str(tmp_path), sft_steps=1, sft_weight_decay=0.25), files=False)
    pool = train.load_data(cfg)
    with pytest.raises(Stop):
        train.sft_phase(cfg, torch.nn.Linear(1, 1), None, pool)
    assert seen == [0.25]


def test_resume_applies_the_flags_a_resume_may_change_and_refuses_the_others(tmp_path, capsys):
    import json
    from dataclasses import asdict
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(asdict(prepare_config(Config(out_dir=str(run)), files=False))))
    cfg = prepare_config(Config(resume=str(run), max_steps=300, report_to=("tensorboard",), eval_every=5))
    assert (cfg.max_steps, cfg.report_to, cfg.eval_every, cfg.lr) == (300, ("tensorboard",), 5, 2e-4)
    assert "resume: --max-steps 300 (was 100), --report-to ('tensorboard',) (was ('none',))" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        prepare_config(Config(resume=str(run), lr=1e-3, batch_size=8, max_steps=300))
    assert str(e.value) == (f"train.py: --resume {run} continues the run with its own config; --batch-size 8 (the "
                            "run's: 4), --lr 0.001 (the run's: 0.0002) would change it: give another --out-dir for a new "
                            "run")
    assert prepare_config(Config(resume=str(run), lr=2e-4)).lr == 2e-4     # the run's own value: nothing changes
