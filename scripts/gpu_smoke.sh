#!/usr/bin/env bash
# The first command on a new GPU box (README "First GPU run"): the stack's versions, the memory plan, the preflight of
# a Syn-GRPO run, 3 GRPO steps of Qwen2.5-VL-3B with vLLM rollouts, one SDXL outpainting job through server.py, one
# Syn-GRPO step with a local data server on a GPU of its own (cuda:1), and eval.py on 20 samples; then a pass/fail
# table with each step's time and peak memory (host RSS and, on a GPU, the most any GPU held).
#
#   bash scripts/gpu_smoke.sh            # on a CUDA machine, after `bash install.sh --gpu`
#   bash scripts/gpu_smoke.sh --tiny     # the same steps on the tiny random-weight models, on CPU (CI runs this)
#   bash scripts/gpu_smoke.sh --out DIR  # where logs and outputs go (default runs/smoke)
#
# Exit status 0 when every step passed. Each step's output is in OUT/<step>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
TINY=0
OUT=runs/smoke
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    *) echo "gpu_smoke.sh: unknown argument $1 (expected --tiny, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$TINY" = 1 ]; then   # the tiny models on CPU: the same code paths, seconds instead of minutes
  MODEL=tiny; DEVICE=cpu; PIPELINE=tiny-union; SERVER=(--device cpu --steps 2 --work-size 64 --threads 1)
  TRAIN=(--sft-steps 0 --batch-size 2 --num-generations 2 --max-new-tokens 16)
  EVAL=(--max-new-tokens 16 --max-model-len 1024)
else                       # the paper's model and pipeline, a small batch: this checks the stack, not the recipe
  MODEL=Qwen/Qwen2.5-VL-3B-Instruct; DEVICE=cuda; PIPELINE=sdxl-union; SERVER=(--device cuda:0 --steps 20)
  TRAIN=(--batch-size 4 --num-generations 4 --max-new-tokens 256)
  EVAL=(--max-new-tokens 256)
fi
rm -rf "$OUT"
mkdir -p "$OUT"
ROWS=()
FAILED=0

gpu_peak() {   # the most memory any GPU held while process $1 ran (MiB), polled from nvidia-smi
  local peak=0 used
  while kill -0 "$1" 2>/dev/null; do
    for used in $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null); do
      [ "$used" -gt "$peak" ] && peak=$used
    done
    sleep 0.5
  done
  echo "$peak"
}

step() {   # step NAME CHECK CMD...: run CMD (logged), then CHECK (a shell test); record time, peak memory, result
  local name=$1 check=$2
  shift 2
  local log="$OUT/$name.log" start end rss gpu="-"
  start=$(date +%s.%N)
  /usr/bin/time -f "%M" -o "$OUT/$name.rss" "$@" > "$log" 2>&1 &
  local pid=$!
  if [ "$TINY" = 0 ] && command -v nvidia-smi > /dev/null; then
    gpu=$(gpu_peak "$pid")
    gpu=$(awk -v m="$gpu" 'BEGIN { printf "%.1f", m / 1024 }')
  fi
  wait "$pid"
  local rc=$?
  end=$(date +%s.%N)
  rss=$(awk '/^[0-9]+$/ { printf "%.2f", $1 / 1048576 }' "$OUT/$name.rss" 2>/dev/null)
  local result=PASS
  if [ "$rc" != 0 ] || ! eval "$check" >> "$log" 2>&1; then
    result=FAIL
    FAILED=1
  fi
  ROWS+=("$(printf '| %-9s | %-6s | %8s | %11s | %11s |' "$name" "$result" \
    "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')" "${rss:--}" "$gpu")")
}

# 1. the stack: versions, and a GPU where one is expected
step versions "true" "$PY" -c "
import sys, torch, transformers, diffusers, peft, vllm
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| transformers', transformers.__version__, '| diffusers', diffusers.__version__, '| peft', peft.__version__,
      '| vllm', vllm.__version__)
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print('GPUs:', gpus or 'none')
assert $TINY or gpus, 'no CUDA device visible'
"
# 2. the memory plan of the step below (no weights loaded)
step plan "grep -q 'peak' '$OUT/plan.log'" "$PY" train.py --plan --device "$DEVICE" --model "$MODEL" --rollout-backend vllm \
  "${TRAIN[@]}"
# 3. the preflight of the Syn-GRPO step below: writable folders, segmenter, pipeline weights, GPU assignment, plan
printf 'a sunny beach\na snowy road\n' > "$OUT/descriptions.txt"
SYN=(--algo syn-grpo --pipeline "$PIPELINE" --descriptions "$OUT/descriptions.txt" --synchronous-synthesis)
step preflight "grep -q 'every check passed' '$OUT/preflight.log'" "$PY" train.py --preflight --model "$MODEL" \
  --device "$DEVICE" --rollout-backend vllm --out-dir "$OUT/syn" "${TRAIN[@]}" "${SYN[@]}"
# 4. three GRPO steps with vLLM rollouts on the built-in shapes data, a Hugging Face checkpoint at the end
step train "test -f '$OUT/train/checkpoint-3/config.json' && grep -c '\"step\"' '$OUT/train/metrics.jsonl'" \
  "$PY" train.py --model "$MODEL" --device "$DEVICE" --rollout-backend vllm --max-steps 3 --save-every 3 \
  --out-dir "$OUT/train" --overwrite "${TRAIN[@]}"
# 5. one outpainting job through the data server: submitted, generated, returned with its boxes
cat > "$OUT/server_job.py" <<'EOF'
"""Start server.py, submit one job for a shapes image, wait for its result, stop the server."""
import os, subprocess, sys, time
from data import read_data
from shapes import make_shapes
from synthesis import DataServerClient, make_job
out, pipeline, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
state, port_file = os.path.join(out, "server_state"), os.path.join(out, "server_state", "port")
os.makedirs(state, exist_ok=True)
proc = subprocess.Popen([sys.executable, "server.py", "--port", "0", "--port-file", port_file, "--state-dir", state,
                         "--pipeline", pipeline, *extra], stderr=open(os.path.join(out, "server_process.log"), "w"))
try:
    deadline = time.time() + 900
    while not os.path.exists(port_file):
        assert proc.poll() is None and time.time() < deadline, "server.py did not start (server_process.log)"
        time.sleep(0.2)
    client = DataServerClient([f"http://127.0.0.1:{open(port_file).read().strip()}"])
    sample = read_data(make_shapes("rec", 1, os.path.join(out, "data"), objects=(1, 1)), "rec")[0]
    assert client.submit(make_job(sample, "a sunny beach", seed=0, key="smoke"))
    results = []
    while not results and time.time() < deadline:
        results = client.collect()
        time.sleep(0.2)
    assert results and results[0]["status"] == "done", f"no result: {results}"
    print("job done:", results[0]["job_id"], "boxes", results[0]["boxes"])
finally:
    proc.terminate()
    proc.wait()
EOF
step server "grep -q 'job done' '$OUT/server.log'" env PYTHONPATH="$PWD" "$PY" "$OUT/server_job.py" "$OUT" "$PIPELINE" \
  "${SERVER[@]}"
# 6. one Syn-GRPO step: its description to a local data server (a GPU of its own), the image back in the pool
step syn-grpo "grep -q '\"jobs_absorbed\": [1-9]' '$OUT/syn/metrics.jsonl'" "$PY" train.py --model "$MODEL" \
  --device "$DEVICE" --rollout-backend vllm --max-steps 1 --save-every 0 --out-dir "$OUT/syn" --overwrite "${TRAIN[@]}" \
  "${SYN[@]}"
# 7. eval.py on 20 held-out samples with the checkpoint of step 3
VAL=$("$PY" data.py shapes --task rec --n 20 --split val --objects 1 1 --out "$OUT/data" 2>/dev/null | tail -n 1)
step eval "test -f '$OUT/eval/results.json'" "$PY" eval.py --model "$OUT/train/checkpoint-3" --task rec --data "$VAL" \
  --backend vllm --limit 20 --out-dir "$OUT/eval" "${EVAL[@]}"

echo
echo "gpu_smoke.sh $([ "$TINY" = 1 ] && echo '--tiny (tiny models, CPU)' || echo "($MODEL, CUDA)"): logs in $OUT/"
echo "| step      | result |  seconds | peak RSS GB | peak GPU GB |"
echo "|-----------|--------|----------|-------------|-------------|"
printf '%s\n' "${ROWS[@]}"
exit "$FAILED"
