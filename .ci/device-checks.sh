#!/usr/bin/env bash
# The GPU checks of issues 3, 4 and 5 in ONE device call (a drawn task has ~15 device-minutes,
# start-up included): CUDA tests, then the benches, each with its own time cap, logs under $OUT.
#
# The device machine has torch, triton, numpy, pyarrow, tqdm and pytest but no network and no
# Ray, and ../shared does not travel: copy what is needed into an ignored folder and carry it:
#   mkdir -p .dev && cp ../shared/tools/torch-baselines.py .dev/     (.dev/ is git-ignored)
#   bash ../shared/tools/ray-gpu-carry.sh                 (.whl-ray/, git-ignored, 43 MiB)
#   run(command="bash .ci/device-checks.sh", carry=[".dev", ".whl-ray"], timeout_s=590)
# Stages, capped at 570 s together (one call may run 600 s): CUDA tests, the plain-torch
# baselines (BENCHMARKS.md reports ratios against them, so they run in the same call), the
# kernels bench, the fill bench (600k, 1m), and the synthetic-600k job end to end
# (.ci/e2e-600k.sh: torchrun nproc 1, then Ray Train use_gpu when .whl-ray is carried).
# SKIP="tests e2e" (stage names, space separated) leaves stages out.
set -uo pipefail
OUT=${OUT:-/tmp/svdfill-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the checkout root is the package `svdfill`: import it through a link instead of installing
mkdir -p /tmp/pk && ln -sfn "$PWD" /tmp/pk/svdfill && export PYTHONPATH=/tmp/pk${PYTHONPATH:+:$PYTHONPATH}
SKIP=${SKIP:-}
want() { [[ " $SKIP " != *" $1 "* ]]; }
stage() {  # stage NAME SECONDS CMD...: run with a cap, log to $OUT/NAME.log, keep going
  local name=$1 cap=$2; shift 2
  want "$name" || return 0
  echo "== $name (cap ${cap}s): $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
  'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } \
  > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"

stage tests 100 python3 -m pytest -q -p no:cacheprovider -k "cuda or compile" \
  tests/test_fill.py tests/test_gibbs.py tests/test_triton_fill.py tests/test_triton_sgd.py \
  tests/test_triton_row_optim.py tests/test_row_optim.py tests/test_triton_util.py \
  tests/test_sgd.py tests/test_world.py tests/test_csr.py
stage baselines 80 python3 .dev/torch-baselines.py
# the fill first: if the cap cuts the stage, the figures already written (one JSON line each)
# hold the headline one
stage kernels 130 python3 -m svdfill.launch.cli bench kernels --out "$OUT/kernels.jsonl" \
  --shapes fill-1m,train-100m,train-ml1m
stage fill 60 python3 -m svdfill.launch.cli bench fill --device cuda --shape 600k --shape 1m \
  --dtype bfloat16
stage e2e 200 bash .ci/e2e-600k.sh
exit 0
