#!/usr/bin/env bash
# The issue-9 training table in ONE call of the GPU machine (H100/H200, <= 9 min): crv-ray's CogPO step in its
# variants (optimizer, packing, kernels, activation checkpointing, fsdp2 vs deepspeed) and TRL's DPOTrainer at its
# best settings, Qwen2.5-0.5B shape, random init. Prepare .whl/ here first with jobs/gpu_bench_wheels.sh, then
#   run(command="bash jobs/gpu_bench_train.sh", carry=[".whl"], timeout_s=560)
# Results: $OUT/bench_*.json and $OUT/bench_train.log (tables with tokens/s, peak GiB, padding, MFU).
set -uo pipefail
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=$PWD/.site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_BUILD_OPS=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
model=/tmp/bench_model_qwen05b
deadline=$((SECONDS + 520))
bench() {  # name, then bench_train.py arguments; skipped when the call's time is nearly spent
  local name=$1; shift
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 45 ]; then echo "== $name: skipped (time)"; return; fi
  echo "== $name"
  timeout "$left" python3 jobs/bench_train.py --shape qwen2.5-0.5b --device cuda --steps 3 --model-dir "$model" \
    --timeout 150 --json "$OUT/bench_$name.json" "$@" 2>&1 | grep -v -E "Warning|warn|^\s*$|Writing|Loading"
}
{
  # The targets first: 4 x 1024 against TRL at its best (padding-free, Liger), MFU at 16 x 1024 and 4 x 2048.
  bench 4x1024_vs_trl --pairs 4 --length 1024 --variants "crv+crv-best+trl+trl-best"
  bench 16x1024 --pairs 16 --length 1024 --variants "crv+crv-packed+crv-liger+crv-ac-sel+crv-best+crv-deepspeed"
  bench 4x2048 --pairs 4 --length 2048 --variants "crv+crv-best"
  bench mixed_16x1024 --pairs 16 --length 1024 --lengths mixed --variants "crv+crv-packed+crv-best"
  bench options_4x1024 --pairs 4 --length 1024 --variants "crv-foreach+crv-compile+crv-ac-full+crv-ac-sel-mm"
} 2>&1 | tee "$OUT/bench_train.log"
