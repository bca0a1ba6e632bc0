#!/usr/bin/env bash
# Run HERE (a machine with PyPI), from the project root, before jobs/gpu_bench_train.sh goes to the GPU machine:
# builds .whl/ with ../shared/device/gpu-wheels.sh (Ray, TRL, datasets, ...) and adds what the training table also
# needs there: deepspeed (a pure-Python wheel built with DS_BUILD_OPS=0), liger-kernel and their small
# dependencies. Then carry .whl to the GPU machine (run tool: carry [".whl"]).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
shared=${SHARED:-/work/shared}  # the workplace's shared/ (../shared from the main checkout)
# Its .git/info/exclude line fails in a git worktree (.git is a file); .gitignore already ignores /.whl/.
sed '/info\/exclude/d' "$shared/device/gpu-wheels.sh" | bash
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl liger-kernel==0.8.5 hjson py-cpuinfo msgpack ninja nvidia-ml-py einops
du -sh .whl
