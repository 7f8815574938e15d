#!/usr/bin/env bash
# On a machine with a CUDA GPU: check the Triton kernels compiled for it (exact int32 results),
# score them against their speed goals (`nas bench kernels`), then measure the latency tables
# of the built-in spaces with `nas measure`, most important first, within a time budget.
# Tables land in cost_models/; logs and tables are also bundled into $OUT/results.tgz after
# every stage, so a run cut short still returns what it finished. One call may not finish
# every stage within a 600 s budget: STAGES="fmnist-b64 fmnist-b1 ..." runs only those.
#
#   OUT=/tmp/gpu-out BUDGET_S=560 bash scripts/gpu-measure.sh
set -u
OUT=${OUT:-/tmp/gpu-out}
BUDGET_S=${BUDGET_S:-560}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

bundle() { cp cost_models/*.json "$LOGS"/ 2>/dev/null; tar czf "$OUT/results.tgz" -C "$LOGS" .; }

# stage NAME CAP_S COMMAND...: run with the smaller of its cap and the time left.
stage() {
    local name=$1 cap=$2 left=$((BUDGET_S - SECONDS)) rc
    shift 2
    if [[ -n "${STAGES:-}" && " $STAGES " != *" $name "* ]]; then return; fi
    if ((left < 20)); then echo "== $name skipped: budget spent"; return; fi
    ((cap > left)) && cap=$left
    echo "== $(date -u +%T) $name (cap ${cap}s, ${SECONDS}s used)"
    timeout "$cap" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL:-6}" "$LOGS/$name.log"
    echo "== $name rc=$rc after ${SECONDS}s"
    bundle
}

{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
        --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$LOGS/env.log" 2>&1
cat "$LOGS/env.log"

# Every failure listed (no -x): a short device session learns all that is wrong at once.
# The tests only check results, so they run in parallel (pytest-xdist, where installed).
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${TEST_JOBS:-8}")
TAIL=30 stage kernels 210 python3 -m pytest -q -rf -p no:cacheprovider $XDIST tests/test_kernels_cuda.py
# The kernels' speed goals in one quick run (its run folder travels in the bundle). It and
# each `nas measure` first compile their candidate kernels in parallel (--compile-jobs).
TAIL=30 stage bench 150 python3 -m nas --runs-dir "$LOGS/runs" bench kernels
# Each table is checked end to end on random plans of both kinds (--validate: each layer's
# precision drawn with equal odds; --validate-mixed: each plan draws odds of its own).
V30="--validate 30 --validate-mixed 30" V10="--validate 10 --validate-mixed 10"
TAIL=16 stage resnet18-b64 170 python3 -m nas measure --space imagenet_resnet18 --batch 64 $V30
TAIL=16 stage resnet18-b1 140 python3 -m nas measure --space imagenet_resnet18 --batch 1 $V30
TAIL=8 stage fmnist-b64 75 python3 -m nas measure --space fmnist_resnet8 --batch 64 $V30
TAIL=8 stage fmnist-b1 65 python3 -m nas measure --space fmnist_resnet8 --batch 1 $V30
TAIL=8 stage mobilenetv2-b64 130 python3 -m nas measure --space imagenet_mobilenetv2 --batch 64 $V10
TAIL=8 stage mobilenetv2-b1 100 python3 -m nas measure --space imagenet_mobilenetv2 --batch 1 $V10
# An experiment, last (or alone: STAGES=mobilenetv2-b1-marginal): the same table timed without
# the graph launch's share per call, written beside the logs, not into cost_models/.
stage mobilenetv2-b1-marginal 90 python3 -m nas measure --space imagenet_mobilenetv2 --batch 1 \
    --validate 10 --timing marginal --output "$LOGS/h200-imagenet_mobilenetv2-b1-marginal.json"
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu --format=csv >>"$LOGS/env.log" 2>&1
bundle
echo "== done after ${SECONDS}s"
