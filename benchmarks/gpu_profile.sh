#!/usr/bin/env bash
# One prepared GPU measurement (issue 11), for one device call of at most 10 minutes. Not yet run on a GPU: no
# session so far was lent one.
#
#   tests    the Triton kernels against the torch path on CUDA (tests/test_triton_kernels.py runs on CUDA tensors
#            with compiled kernels when a GPU is present)
#   kernels  benchmarks/gpu_kernels.py: correctness at realistic sizes (fp32/fp16/bf16, NCHW/channels_last),
#            bitwise determinism, per-layer step and peak memory (Triton vs torch vs LeakyReLU+Conv2d, fp16 autocast)
#   p2d p3d  AllUKAN vs PlainConvUNet on nnU-Net-default-sized plans (2D 512x512 batch 12; 3d_fullres 128^3 batch
#            2), fp16 autocast + GradScaler as nnU-Net trains: step eager and compiled, peak VRAM; spline on the
#            Triton kernels (the default for CUDA tensors)
#   torch    the same networks eager with the spline on the torch path (ALLUKAN_SPLINE_BACKEND=torch)
#
# Every part has a timeout; together at most ~560 s. PARTS selects parts (default: all, in this order).
# Results: $OUT/gpu_report.md and $OUT/gpu_report.json (benchmarks/gpu_report.py: targets, ratios, every table) and
# $OUT/gpu_log.txt; per-run folders under $WORK (default: a temporary folder), so that few files land in $OUT.
# Plumbing check without a GPU (tiny sizes, CPU, kernels in Triton's interpreter; numbers mean nothing):
#   DEVICE=cpu QUICK=1 TRITON_INTERPRET=1 PARTS="kernels p2d torch" bash benchmarks/gpu_profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_profile}
WORK=${WORK:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PARTS=${PARTS:-tests kernels p2d p3d torch}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_log.txt"
: > "$LOG"
export PYTHONUNBUFFERED=1

SLOW=$([[ $QUICK == 1 ]] && echo 4 || echo 1)  # the CPU plumbing check is slower than a GPU at full size
part() {  # part SECONDS COMMAND...: run with a time limit, log everything, never stop the script
    echo "### $(date +%T) $*" | tee -a "$LOG"
    timeout "$(( $1 * SLOW ))" "${@:2}" 2>&1 | tee -a "$LOG"
    echo "### exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}
wants() { [[ " $PARTS " == *" $1 "* ]]; }

if [[ $DEVICE == cuda* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
fi
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"

if [[ $QUICK == 1 ]]; then
    P2D=(--dim 2 --patch 64 64 --batch 2 --repeats 1)
    P3D=(--dim 3 --patch 32 32 32 --batch 1 --repeats 1)
    COMPILE=()
    KERNELS=(--quick)
else
    P2D=(--dim 2 --patch 512 512 --batch 12 --repeats 5)
    P3D=(--dim 3 --patch 128 128 128 --batch 2 --repeats 5)
    COMPILE=(--compile)
    KERNELS=()
fi
PROFILE=(nnunetv2-allukan profile --device "$DEVICE" --max-seconds 60)

wants tests && part 150 python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py
wants kernels && part 60 python benchmarks/gpu_kernels.py --device "$DEVICE" --out "$WORK/kernels" "${KERNELS[@]}"
wants p2d && part 120 "${PROFILE[@]}" "${P2D[@]}" --rows cnn,free,exact "${COMPILE[@]}" --out "$WORK/p2d_triton"
wants p3d && part 120 "${PROFILE[@]}" "${P3D[@]}" --rows cnn,free,exact "${COMPILE[@]}" --out "$WORK/p3d_triton"
if wants torch; then
    wants p2d && part 50 env ALLUKAN_SPLINE_BACKEND=torch "${PROFILE[@]}" "${P2D[@]}" --rows cnn,free --out "$WORK/p2d_torch"
    wants p3d && part 50 env ALLUKAN_SPLINE_BACKEND=torch "${PROFILE[@]}" "${P3D[@]}" --rows cnn,free --out "$WORK/p3d_torch"
fi
python benchmarks/gpu_report.py "$WORK" "$OUT" 2>&1 | tee -a "$LOG"
echo "per-run folders: $WORK" | tee -a "$LOG"
