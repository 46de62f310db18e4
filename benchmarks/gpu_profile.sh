#!/usr/bin/env bash
# One prepared GPU measurement (issue 11), for one device call of at most 10 minutes.
#
#   tests     the Triton kernels against the torch path on CUDA (tests/test_triton_kernels.py runs on CUDA tensors
#             with compiled kernels when a GPU is present)
#   kernels   benchmarks/gpu_kernels.py: correctness at realistic sizes (fp32/fp16/bf16, NCHW/channels_last),
#             bitwise determinism, per-layer step and peak memory (Triton vs torch vs LeakyReLU+Conv2d, fp16 autocast)
#   p2d p3d   AllUKAN vs PlainConvUNet on nnU-Net-default-sized plans (2D 512x512 batch 12; 3d_fullres 128^3 batch
#             2), fp16 autocast + GradScaler as nnU-Net trains: step eager, peak VRAM; spline on the Triton kernels
#             (the default for CUDA tensors)
#   torch     the same networks eager with the spline on the torch path (ALLUKAN_SPLINE_BACKEND=torch)
#   compiled  the same networks under torch.compile, in their own runs (a compilation cut off by its time limit
#             loses only these numbers)
#   syncs     benchmarks/gpu_syncs.py: host-device synchronisations in one training step, AllUKAN and the CNN
#   sass      benchmarks/kernel_sass.py: the kernels' machine code (instructions per value, barriers, registers) of
#             this triton version, next to the timings it should explain
#
# Every part has a time limit, and all parts together stop BUDGET seconds (default 540) after the start, keeping
# the last REPORT_S (20) for the report, which is therefore always written. PARTS selects parts (default: all, in
# this order). Results: $OUT/gpu_report.md and $OUT/gpu_report.json (benchmarks/gpu_report.py: targets, ratios,
# every table) and $OUT/gpu_log.txt; per-run folders under $WORK (default: a temporary folder), so that few files
# land in $OUT.
# Plumbing check without a GPU (tiny sizes, CPU, kernels in Triton's interpreter; numbers mean nothing):
#   DEVICE=cpu QUICK=1 TRITON_INTERPRET=1 bash benchmarks/gpu_profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_profile}
WORK=${WORK:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PARTS=${PARTS:-tests kernels syncs p2d p3d torch compiled sass}
BUDGET=${BUDGET:-540}
REPORT_S=${REPORT_S:-20}
DEADLINE=$(( SECONDS + BUDGET - REPORT_S ))
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_log.txt"
: > "$LOG"
export PYTHONUNBUFFERED=1

SLOW=$([[ $QUICK == 1 ]] && echo 4 || echo 1)  # the CPU plumbing check is slower than a GPU at full size
part() {  # part SECONDS COMMAND...: run with a time limit (cut to the time left), log everything, never stop
    local limit=$(( $1 * SLOW )) left=$(( DEADLINE - SECONDS ))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then
        echo "### $(date +%T) skipped (${left} s left of BUDGET): ${*:2}" | tee -a "$LOG"
        return
    fi
    echo "### $(date +%T) [${limit} s] ${*:2}" | tee -a "$LOG"
    timeout "$limit" "${@:2}" 2>&1 | tee -a "$LOG"
    echo "### exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}
wants() { [[ " $PARTS " == *" $1 "* ]]; }

if [[ $DEVICE == cuda* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"

if [[ $QUICK == 1 ]]; then
    P2D=(--dim 2 --patch 64 64 --batch 2 --repeats 1)
    P3D=(--dim 3 --patch 32 32 32 --batch 1 --repeats 1)
    COMPILE=()  # inductor on the CPU takes minutes: the plumbing check runs the compiled parts eager
    KERNELS=(--quick)
else
    P2D=(--dim 2 --patch 512 512 --batch 12 --repeats 5)
    P3D=(--dim 3 --patch 128 128 128 --batch 2 --repeats 5)
    COMPILE=(--compile)
    KERNELS=()
fi
PROFILE=(nnunetv2-allukan profile --device "$DEVICE" --max-seconds 60)

wants tests && part 110 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py
wants kernels && part 50 python3 benchmarks/gpu_kernels.py --device "$DEVICE" --out "$WORK/kernels" "${KERNELS[@]}"
wants syncs && part 40 python3 benchmarks/gpu_syncs.py --device "$DEVICE" --json "$OUT/gpu_syncs.json"
wants p2d && part 60 "${PROFILE[@]}" "${P2D[@]}" --rows cnn,free,exact --out "$WORK/p2d_triton"
wants p3d && part 75 "${PROFILE[@]}" "${P3D[@]}" --rows cnn,free,exact --out "$WORK/p3d_triton"
if wants torch; then
    wants p2d && part 45 env ALLUKAN_SPLINE_BACKEND=torch "${PROFILE[@]}" "${P2D[@]}" --rows cnn,free --out "$WORK/p2d_torch"
    wants p3d && part 45 env ALLUKAN_SPLINE_BACKEND=torch "${PROFILE[@]}" "${P3D[@]}" --rows cnn,free --out "$WORK/p3d_torch"
fi
wants sass && part 40 env -u TRITON_INTERPRET python3 benchmarks/kernel_sass.py --arch 90 80 --json "$OUT/kernel_sass.json"
if wants compiled; then
    wants p2d && part 90 "${PROFILE[@]}" "${P2D[@]}" --rows cnn,free "${COMPILE[@]}" --out "$WORK/p2d_triton_compiled"
    wants p3d && part 90 "${PROFILE[@]}" "${P3D[@]}" --rows cnn,free "${COMPILE[@]}" --out "$WORK/p3d_triton_compiled"
fi
python3 benchmarks/gpu_report.py "$WORK" "$OUT" 2>&1 | tee -a "$LOG"
echo "per-run folders: $WORK" | tee -a "$LOG"
