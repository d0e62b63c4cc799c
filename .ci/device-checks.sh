#!/usr/bin/env bash
# The GPU checks of issues 3, 4 and 5, sized for a drawn task's lease: 15 device-minutes in
# all, start-up (1-2 min), idle waits and every retry included. So they run as TWO calls of
# at most 5.5 minutes each (about 13 minutes with the start), and a call that fails early
# can be fixed and run again in what is left:
#
#   run(command="bash .ci/device-checks.sh bench", carry=[".dev"], timeout_s=345)
#   run(command="bash .ci/device-checks.sh e2e", carry=[".whl-ray"], timeout_s=330)
#   give_back()
#
# bench = tests (the CUDA ones), baselines (plain torch, in the same call as the benches so
# ratios compare like with like), kernels (Triton vs torch vs floor), fill (bench fill at
# 600k and 1M x 1M); e2e = the synthetic-600k job end to end (.ci/e2e-600k.sh: torchrun
# nproc 1, then Ray Train use_gpu + Ray fill actors, then the ALS recipe through torchrun). Stage names may be given one by one
# (`bash .ci/device-checks.sh tests fill`); no argument runs every stage.
#
# The device machine has torch, triton, numpy, pyarrow, tqdm and pytest but no network and no
# Ray, and ../shared does not travel: copy what is needed into an ignored folder and carry it:
#   mkdir -p .dev && cp ../shared/tools/torch-baselines.py .dev/     (.dev/ is git-ignored)
#   bash ../shared/tools/ray-gpu-carry.sh                 (.whl-ray/, git-ignored, 43 MiB)
#
# Only 8 files of at most 16 MiB come back from $OUT, so the stages log into a scratch folder
# and $OUT holds a fixed few, refreshed after every stage (a call cut at its limit still
# returns what finished): summary.txt (what each stage ran, its rc, time and last lines),
# the figures as JSON lines (kernels.jsonl, anchor.jsonl) and text (e2e.txt), and logs.tgz
# (every log, whole).
set -uo pipefail
RESULTS=${OUT:-/tmp/svdfill-device}
LOGS=${LOGS:-${TMPDIR:-/tmp}/svdfill-device-logs}
FIGURES="kernels.jsonl anchor.jsonl e2e.txt"
mkdir -p "$RESULTS" "$LOGS"
export PYTHONUNBUFFERED=1
# the stages' own scripts write their files under $OUT: point them at the scratch folder
export OUT=$LOGS
# the checkout root is the package `svdfill`: import it through a link instead of installing
mkdir -p /tmp/pk && ln -sfn "$PWD" /tmp/pk/svdfill && export PYTHONPATH=/tmp/pk${PYTHONPATH:+:$PYTHONPATH}

declare -A CAP=([tests]=90 [baselines]=80 [kernels]=100 [fill]=60 [e2e]=300)
ALL="tests baselines kernels fill e2e"
WANT=()
for a in "${@:-all}"; do
  case $a in
    all) WANT+=($ALL) ;;
    bench) WANT+=(tests baselines kernels fill) ;;
    tests|baselines|kernels|fill|e2e) WANT+=("$a") ;;
    *) echo "device-checks.sh: unknown stage '$a' (stages: $ALL; groups: bench, all)" >&2
       exit 2 ;;
  esac
done

collect() {  # the fixed few files of $RESULTS, from what the stages wrote so far
  cp "$LOGS/summary.txt" "$RESULTS/summary.txt"
  for f in $FIGURES; do [[ -f $LOGS/$f ]] && cp "$LOGS/$f" "$RESULTS/$f"; done
  tar -czf "$RESULTS/logs.tgz.part" -C "$LOGS" . && mv "$RESULTS/logs.tgz.part" "$RESULTS/logs.tgz"
}
stage() {  # stage NAME CMD...: run under its cap, log to NAME.log, keep going
  local name=$1; shift
  local cap=${CAP[$name]}
  echo "== $name (cap ${cap}s): $*" | tee -a "$LOGS/summary.txt"
  local t0=$SECONDS
  timeout "$cap" "$@" > "$LOGS/$name.log" 2>&1
  echo "   rc=$? in $((SECONDS - t0)) s" | tee -a "$LOGS/summary.txt"
  tail -n 25 "$LOGS/$name.log" | tee -a "$LOGS/summary.txt"
  collect
}

# compiled Triton builds its launcher with a C compiler and Python.h the first time: say
# whether they are there, since every fused kernel depends on it
{ date -u; echo "stages: ${WANT[*]}"; nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  echo "cc: $(command -v gcc cc clang | tr '\n' ' ')"
  python3 -c 'import os, sysconfig; h = os.path.join(sysconfig.get_paths()["include"], "Python.h"); print("Python.h:", h if os.path.exists(h) else "MISSING")'
} >> "$LOGS/summary.txt" 2>&1
cat "$LOGS/summary.txt"
collect

for s in "${WANT[@]}"; do
  case $s in
    # the ahead-of-time sm_90 compile tests are left to CI, which runs them under the
    # device's triton too
    tests) stage tests python3 -m pytest -q -p no:cacheprovider \
      -k "cuda and not compiles_for_hopper" \
      tests/test_fill.py tests/test_gibbs.py tests/test_triton_fill.py tests/test_triton_sgd.py \
      tests/test_triton_row_optim.py tests/test_row_optim.py tests/test_triton_util.py \
      tests/test_sgd.py tests/test_world.py tests/test_csr.py tests/test_als.py \
      tests/test_dispatch.py tests/test_topk.py ;;
    baselines) stage baselines python3 .dev/torch-baselines.py ;;
    # training shapes first (seconds each), then the 1M x 1M fill in the two tensor-core
    # dtypes only (fp32-ieee has no tensor-core path: ~10 s a run, it would eat the cap),
    # 2 timed runs each; every figure is a JSON line as soon as it is measured
    kernels) stage kernels python3 -m svdfill.launch.cli bench kernels \
      --out "$LOGS/kernels.jsonl" --shapes train-100m,train-ml1m,fill-1m \
      --fill-dtypes bfloat16,tf32 --repeat 2 ;;
    # the fills alone: a 60M-row Parquet export in two processes says nothing about the GPU
    # (the e2e stage times the export of the whole job)
    fill) stage fill bash -c "python3 -m svdfill.launch.cli bench fill --device cuda \
      --shape 600k --dtype bfloat16 --no-export && python3 -m svdfill.launch.cli bench fill \
      --device cuda --shape 1m --dtype bfloat16 --no-export" ;;
    e2e) stage e2e bash .ci/e2e-600k.sh ;;
  esac
done
exit 0
