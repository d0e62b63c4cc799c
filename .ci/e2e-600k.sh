#!/usr/bin/env bash
# Issue 4's must-show on one GPU: the configs/synthetic-600k.toml job end to end (100M planted
# ratings, generated once to Parquet and read by every job — the "data" lines time that —
# train to within 5% of σ, fill every user's top-100, Parquet), once
# through torchrun (nproc 1) and once through Ray Train (use_gpu) + Ray fill actors, each
# phase timed. Writes $OUT/e2e.txt (one line per phase) and the runs' summary.json.
#
#   bash .ci/e2e-600k.sh [torchrun] [ray] [als]   (default: all three; ray needs .whl-ray
#                                                  carried: bash ../shared/tools/ray-gpu-carry.sh)
#
# als: the same job with ALS (configs/synthetic-600k-als.toml, CONFIG_ALS) through torchrun,
# the solver measured against SparseAdam on the same data.
set -uo pipefail
OUT=${OUT:-/tmp/svdfill-device}
mkdir -p "$OUT"
RES="$OUT/e2e.txt"
ENGINES=${*:-torchrun ray als}
PY=${PY:-python3}           # the interpreter with svdfill importable
CONFIG=${CONFIG:-synthetic-600k}   # CONFIG=demo DEVICE=cpu tries the script on a laptop
CONFIG_ALS=${CONFIG_ALS:-synthetic-600k-als}
DEVICE=${DEVICE:-cuda}
SIGMA=${SIGMA:-0.5}                # the config's data.synthetic.noise
GPU_FLAG=$([[ $DEVICE == cuda* ]] && echo --use-gpu)
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
phase() {  # phase ENGINE NAME CMD...: time one command, log under $OUT
  local engine=$1 name=$2; shift 2
  local t0; t0=$(now)
  "$@" > "$OUT/e2e-$engine-$name.log" 2>&1
  local rc=$?
  printf '%-9s %-6s rc=%d %7s s\n' "$engine" "$name" "$rc" "$(since "$t0")" | tee -a "$RES"
  [[ $rc == 0 ]] || tail -n 20 "$OUT/e2e-$engine-$name.log"
  return $rc
}
report() {  # report ENGINE RUN_DIR START: total wall, RMSE vs σ, Parquet rows
  printf '%-9s total  %13s s\n' "$1" "$(since "$3")" | tee -a "$RES"
  cp "$2/summary.json" "$OUT/summary-$1.json" 2>/dev/null
  $PY - "$2" "$SIGMA" <<'PY' | tee -a "$RES"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
s = json.loads((run / "summary.json").read_text())
sigma = float(sys.argv[2])
print(f"          val RMSE {s['val_rmse']:.4f} = {s['val_rmse'] / sigma:.3f}σ "
      f"(goal ≤ 1.05σ), {s['epochs_run']} epochs, fit {s['train_seconds']:.1f} s, "
      f"kernel {s.get('kernel')}, device {s.get('device')}")
try:
    import pyarrow.parquet as pq
    md = pq.ParquetFile(run / "recs.parquet").metadata
    print(f"          recs.parquet: {md.num_rows:,} rows in {md.num_row_groups} row groups")
except Exception as e:  # the phase's rc says what failed
    print(f"          recs.parquet: unreadable ({e})")
PY
}

data_for() {  # data_for CONFIG: a Parquet file of its synthetic data, generated once per
  # distinct [data.synthetic] (100M ratings take ~15 s of CPU to generate; the jobs share them)
  local key; key=$($PY -c 'import hashlib, json, sys
from svdfill.config import load_config, to_dict
s = to_dict(load_config(sys.argv[1]).data.synthetic)
print(hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:12])' "$1")
  local f=${TMPDIR:-/tmp}/e2e-data-$key.parquet
  [[ -f $f ]] || phase data "synth-$key" $PY -m svdfill.launch.cli synth --config "$1" \
    --out "$f" --overwrite --quiet
  DATA=$f
}

torchrun_job() {  # torchrun_job ENGINE CONFIG: train (nproc 1), then fill, then report
  local R=${TMPDIR:-/tmp}/e2e-$1; rm -rf "$R"; data_for "$2"; local T0; T0=$(now)
  phase "$1" train $PY -m torch.distributed.run --standalone --nproc_per_node=1 \
    --rdzv-endpoint=127.0.0.1:0 -m svdfill.launch.torchrun_train --config "$2" \
    --ratings "$DATA" --out "$R" --device "$DEVICE" --quiet \
  && phase "$1" fill $PY -m svdfill.launch.cli fill --model "$R" --out "$R/recs.parquet" \
    --device "$DEVICE" --quiet
  report "$1" "$R" "$T0"
  rm -rf "$R"  # 600k users' top-100 and a model: the disk is not ours to fill
}

date -u | tee "$RES"
if [[ " $ENGINES " == *" torchrun "* ]]; then
  torchrun_job torchrun "$CONFIG"
fi
if [[ " $ENGINES " == *" ray "* ]]; then
  if ls .whl-ray/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-ray/*.whl \
      > "$OUT/e2e-ray-install.log" 2>&1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if $PY -c "import ray.train" > /dev/null 2>&1; then
    # Ray's traffic on loopback (see README, "Ray")
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled
    R=${TMPDIR:-/tmp}/e2e-ray; rm -rf "$R"; data_for "$CONFIG"; T0=$(now)
    phase ray train $PY -m svdfill.launch.ray_job train --config "$CONFIG" --ratings "$DATA" --out "$R" \
      --device "$DEVICE" $GPU_FLAG --num-workers 1 --max-failures 0 --quiet \
    && phase ray fill $PY -m svdfill.launch.ray_job fill --model "$R" --out "$R/recs.parquet" \
      --device "$DEVICE" $GPU_FLAG --num-actors 1 --quiet
    report ray "$R" "$T0"
    rm -rf "$R"
    $PY -m ray.scripts.scripts stop --force > /dev/null 2>&1
    rm -f /tmp/ray/ray_current_cluster
  else
    echo "ray       skipped: no Ray here and no .whl-ray/ carried (bash ../shared/tools/ray-gpu-carry.sh)" \
      | tee -a "$RES"
  fi
fi
if [[ " $ENGINES " == *" als "* ]]; then
  torchrun_job als "$CONFIG_ALS"
fi
rm -f "${TMPDIR:-/tmp}"/e2e-data-*.parquet
exit 0
