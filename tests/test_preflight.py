"""preflight.py: each thing a first GPU run would trip on is one line and a non-zero exit before any model loads."""
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import preflight as P
from config import Config, prepare_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def gpu_config(**kw):
    return prepare_config(Config(device="cuda", algo="syn-grpo", **kw), files=False)


def test_the_embedded_default_passes_and_prints_its_table(tmp_path):
    r = run("--preflight", "--algo", "syn-grpo", "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()[:-1]] == ["out", "server", "segmenter", "pipeline",
                                                                        "devices", "memory"]
    assert r.stdout.splitlines()[-1] == "preflight: every check passed" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, env, line", [
    (["--algo", "syn-grpo", "--segmenter", "ben2"], {}, "preflight: segmenter: --segmenter ben2: the ben2 package is "
                                                       "not installed; run `pip install git+https://github.com/PramaLLC/BEN2`"),
    (["--algo", "syn-grpo", "--pipeline", "sdxl"], {"HF_HUB_OFFLINE": "1"},
     "preflight: pipeline: sdxl: stabilityai/stable-diffusion-xl-base-1.0, diffusers/controlnet-canny-sdxl-1.0 not in "
     "the local cache, and HF_HUB_OFFLINE=1 forbids a download"),
    (["--algo", "syn-grpo", "--server-url", "http://127.0.0.1:9"], {}, "preflight: data server: http://127.0.0.1:9 ("),
    (["--algo", "syn-grpo", "--task", "ovd", "--verify-synthesis", "owlv2"], {"HF_HUB_OFFLINE": "1"},
     "preflight: verifier: owlv2: google/owlv2-base-patch16-ensemble not in the local cache, and HF_HUB_OFFLINE=1 "
     "forbids a download"),
])
def test_a_run_that_would_trip_stops_before_any_model_loads(tmp_path, args, env, line):
    out = tmp_path / "run"
    for mode in (["--preflight"], ["--max-steps", "1"]):          # asked for, and at the start of every run
        r = run(*mode, *args, "--out-dir", str(out), env=env)
        assert r.returncode == 1 and line in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not out.exists() and "sft" not in r.stderr               # nothing written, nothing loaded


def test_an_unwritable_output_folder():
    check = P.writable_check("out dir", "/proc/no/such/run")
    assert not check.ok and check.detail.startswith("/proc/no/such/run: cannot write in /proc")


def test_a_data_file_that_does_not_parse(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.png", "problem": "x", "solution": [1, 2, 3, 4]}\n')
    check = P.data_check("data", str(bad), "rec", "")
    assert not check.ok and "missing.png" in check.detail


def test_the_data_server_must_not_take_a_training_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 5)
    assert P.device_check(gpu_config(server_device="cuda:4"), world=4).ok               # the paper's 4 + 1
    check = P.device_check(gpu_config(server_device="cuda:1"), world=4)
    assert not check.ok and "--server-device cuda:1 is a training process's GPU while cuda:4 is free" in check.detail
    check = P.device_check(gpu_config(server_device="cuda:7"), world=4)
    assert not check.ok and "--server-device cuda:7: no such device" in check.detail
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)                         # one GPU: sharing is the way
    check = P.device_check(gpu_config(server_device="cuda:0"), world=1)
    assert check.ok and "shares a training GPU" in check.detail
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert "4 training processes need 4 GPUs, 2 visible" in P.device_check(gpu_config(server_device="cuda:1"), 4).detail


def test_a_run_that_does_not_fit_in_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda k: SimpleNamespace(total_memory=8 * 2 ** 30))
    cfg = gpu_config(model="Qwen/Qwen2.5-VL-3B-Instruct")
    check = P.memory_check(cfg, world=1)
    assert not check.ok and "of 8 GB a GPU: does not fit" in check.detail
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda k: SimpleNamespace(total_memory=80 * 2 ** 30))
    assert P.memory_check(replace(cfg, lora_r=64, micro_batch=1), world=1).ok


def test_unreachable_pipeline_weights(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(repo, timeout):
        raise OSError("network is unreachable")
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    check = P.pipeline_check(gpu_config(pipeline="sdxl"))
    assert not check.ok and "the Hub does not answer (OSError)" in check.detail


def test_a_run_goes_on_with_the_data_servers_that_answer():
    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"ok": true}')

        def log_message(self, *args):
            pass
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    live, dead = f"http://127.0.0.1:{srv.server_port}", "http://127.0.0.1:9"
    try:
        assert P.server_check(live).ok
        one_down = P.server_check(f"{live},{dead}")
        assert one_down.ok and "down: http://127.0.0.1:9" in one_down.detail
        assert not P.server_check(dead).ok
    finally:
        srv.shutdown()
