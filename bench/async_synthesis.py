"""Syn-GRPO's asynchronous data synthesis vs GRPO (paper Table 5: 6.10 h GRPO, 13.16 h synchronous,
6.45 h asynchronous on Qwen2.5-VL-3B REC, i.e. ratios 2.16 and 1.057).

    python bench/async_synthesis.py [--steps 12] [--pipeline-steps 8]

Four runs of the same N steps on the tiny model, measured side by side in one invocation: grpo; syn-grpo
--no-synthesize (the four-tag outputs and rewards, no data server); syn-grpo with the data server working in the
background (async); syn-grpo --synchronous-synthesis (each step waits for its images). The data server is a separate process with
the real tiny SDXL + ControlNet pipeline. As in the paper, trainer and server get separate devices: here one CPU
core each (taskset), one thread each. Reported: the sum of per-step times (metrics.jsonl `time_step`, start-up
excluded) relative to grpo, and relative to syn-grpo without synthesis. On the tiny model the four-tag
completions are about twice as long as GRPO's, so the second ratio is the cost of synthesis itself.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def start_server(state, pipeline_steps):
    port_file = os.path.join(state, "port")
    os.makedirs(state, exist_ok=True)
    p = subprocess.Popen(["taskset", "-c", "1", sys.executable, os.path.join(ROOT, "server.py"), "--port", "0",
                          "--port-file", port_file, "--state-dir", state, "--steps", str(pipeline_steps)],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(port_file):
        time.sleep(0.1)
    url = f"http://127.0.0.1:{open(port_file).read()}"
    from urllib.request import urlopen
    while True:   # wait until the worker has its pipeline (a first job would otherwise pay for loading it)
        try:
            with urlopen(url + "/health", timeout=5) as r:
                json.load(r)
            break
        except OSError:
            time.sleep(0.2)
    return p, url


def run(out, steps, *extra):
    cmd = ["taskset", "-c", "0", sys.executable, os.path.join(ROOT, "train.py"), "--out-dir", out, "--sft-steps", "100",
           "--max-steps", str(steps), "--shapes-n", "64", "--save-every", "0", "--log-completions", "0", *extra]
    subprocess.run(cmd, check=True, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "step" in r]
    return sum(r["time_step"] for r in rows), rows


def measure(steps: int, pipeline_steps: int) -> dict:
    """Seconds of per-step time of the four runs (and images absorbed by the synthesis runs)."""
    tmp = tempfile.mkdtemp(prefix="bench-async-")
    desc = os.path.join(tmp, "descriptions.txt")
    with open(desc, "w") as f:   # fixed descriptions: every step submits B jobs whatever the tiny model writes
        f.write("a snowy forest\na sunny beach\na busy street\n")
    res = {"grpo": run(os.path.join(tmp, "grpo"), steps)[0],
           "nosyn": run(os.path.join(tmp, "nosyn"), steps, "--algo", "syn-grpo", "--no-synthesize")[0]}
    for mode in ("async", "sync"):
        server, url = start_server(os.path.join(tmp, f"server-{mode}"), pipeline_steps)
        try:
            res[mode], rows = run(os.path.join(tmp, mode), steps, "--algo", "syn-grpo", "--server-url", url,
                                  "--descriptions", desc, *(["--synchronous-synthesis"] if mode == "sync" else []))
        finally:
            server.terminate()
            server.wait()
        res[mode + "_absorbed"] = sum(r["jobs_absorbed"] for r in rows)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--pipeline-steps", type=int, default=2)
    a = p.parse_args()
    res = measure(a.steps, a.pipeline_steps)
    base, nosyn = res["grpo"], res["nosyn"]
    print(f"steps {a.steps}, pipeline steps {a.pipeline_steps}, seconds of per-step time (start-up excluded)")
    print(f"{'run':10s} {'seconds':>8s} {'/ grpo':>7s} {'/ no-synth':>10s} {'images in pool':>15s}")
    print(f"{'grpo':10s} {base:8.1f} {1.0:7.3f} {'-':>10s} {'-':>15s}")
    print(f"{'no-synth':10s} {nosyn:8.1f} {nosyn / base:7.3f} {1.0:10.3f} {'-':>15s}")
    for mode in ("async", "sync"):
        print(f"{mode:10s} {res[mode]:8.1f} {res[mode] / base:7.3f} {res[mode] / nosyn:10.3f} {res[mode + '_absorbed']:15d}")
    print("paper (Qwen2.5-VL-3B, GPUs): async 1.057, sync 2.16")


if __name__ == "__main__":
    main()
