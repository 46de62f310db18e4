#!/usr/bin/env bash
# One prepared GPU measurement for the profile issue: nnU-Net-default-sized plans on one CUDA device, every
# network eager and compiled (fp16 autocast as nnU-Net trains), plus the layer benchmark. Not yet run: no
# session so far was lent a GPU. Budget: well under 10 minutes on an H200; StackedKAN falls back to a smaller
# size by itself. Results land in ${OUT:-gpu_profile}/ (profile.md/.csv/.json/.png per run, bench.txt).
set -euo pipefail
OUT=${OUT:-gpu_profile}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
P="nnunetv2-allukan profile --device cuda --repeats 5 --max-seconds 60"
# 2D: nnU-Net's planner gives 512x512 patches and batch 12 for typical 2D data at 1 mm; 3d_fullres 128^3, batch 2.
timeout 200 $P --dim 2 --patch 512 512 --batch 12 --rows cnn,free,exact,free-unfused,ukan --compile --out "$OUT/p2d" || true
timeout 200 $P --dim 3 --patch 128 128 128 --batch 2 --rows cnn,free,exact,free-unfused,ukan --compile --out "$OUT/p3d" || true
timeout 120 $P --dim 2 --patch 512 512 --batch 12 --rows cnn,free,stacked,dense --no-fallback --out "$OUT/p2d_stacked" || true
timeout 60 python -m nnunetv2_allukan.bench_layers --device cuda --repeats 5 | tee "$OUT/bench.txt" || true
