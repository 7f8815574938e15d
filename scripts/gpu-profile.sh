#!/usr/bin/env bash
# On a CUDA machine with Nsight Compute: which instructions the Triton kernels compile to
# (their PTX), and ncu's sections for a few representative layers, ours and cuDNN's
# (scripts/gpu_profile.py names them). Results under $OUT.
#
#   OUT=/tmp/gpu-profile bash scripts/gpu-profile.sh
set -u
OUT=${OUT:-/tmp/gpu-profile}
mkdir -p "$OUT"
TRITON_CACHE_DIR=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_CACHE_DIR
SECTIONS=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
          --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis)
# --clock-control none: measure the card as it is (never change its clocks).
timeout 150 ncu --clock-control none -k regex:_conv "${SECTIONS[@]}" \
    python3 scripts/gpu_profile.py >"$OUT/ncu-triton.txt" 2>&1
echo "ncu triton rc=$?"
timeout 80 ncu --clock-control none -k 'regex:(?i)(conv|gemm|xmma|sm90|implicit|cutlass|fprop)' \
    "${SECTIONS[@]}" python3 scripts/gpu_profile.py --cudnn >"$OUT/ncu-cudnn.txt" 2>&1
echo "ncu cudnn rc=$?"
for f in $(find "$TRITON_CACHE_DIR" -name '_conv*.ptx'); do
    echo "$(basename "$(dirname "$f")")/$(basename "$f"): $(grep -c wgmma "$f") wgmma," \
         "$(grep -c 'mma.sync' "$f") mma.sync, $(grep -c cp.async "$f") cp.async," \
         "$(grep -c 'ld.global.v4' "$f") ld.global.v4, $(grep -c 'ld.global' "$f") ld.global (all widths)"
done >"$OUT/ptx-summary.txt"
tar czf "$OUT/triton-cache.tgz" -C "$TRITON_CACHE_DIR" .
cat "$OUT/ptx-summary.txt"
grep -E "^  [a-zA-Z_].*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Stall|One or More|No Eligible" \
    "$OUT/ncu-triton.txt" "$OUT/ncu-cudnn.txt" | head -150
