#!/bin/bash
# The paper protocol's runs of one dataset on one GPU, all at once, as separate processes.
#
#   bash benchmarks/gpu/paper_runs.sh DATASET [WAIT_S]
#   env: SEEDS ("0 1 2"), DATA (a folder holding DATASET/; default ../shared/data),
#        RUNS (run folder, /tmp/paper_runs), OUT (where the gathered state goes; RUNS),
#        DEVICE (cuda), EXTRA (more `bench paper` options, e.g. --smoke for a CPU check)
#
# Why: a lease is short, and one run (batch 4 at 224 x 224) is too small to keep an H100 busy;
# six or ten at once kept it 93-100 % busy (nvidia-smi) and finished in 2.5-3 min. Each run
# is the unchanged `python -m napari_selfreg.bench paper` with its own state file; setsid
# lets the runs outlive the calling command while the machine is held. A run whose log
# exists is not started again. The script waits up to WAIT_S seconds, shows each run's
# epoch, then gathers every finished run into $OUT/gpu_runs.state.jsonl, which
# benchmarks/gpu/merge_paper_runs.py adds to the result files.
dataset=$1; wait_s=${2:-500}; seeds=${SEEDS:-0 1 2}; device=${DEVICE:-cuda}
runs=${RUNS:-/tmp/paper_runs}; out=${OUT:-$runs}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python=${PYTHON:-python3}
mkdir -p "$runs" "$out"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
for seed in $seeds; do for model in unet selfreg_unet; do
  run=${dataset}_${model}_$seed
  [ -e "$runs/$run.log" ] && continue
  # shellcheck disable=SC2086  # EXTRA is a list of options
  setsid nohup "$python" -m napari_selfreg.bench paper --dataset "$dataset" --seeds "$seed" --models $model \
    --device "$device" ${DATA:+--data "$DATA"} --out "$runs/$run.json" --state "$runs/$run.state.jsonl" $EXTRA \
    > "$runs/$run.log" 2>&1 < /dev/null &
  echo $! > "$runs/$run.pid"
  echo "started $run at $(date +%T)"
done; done
start=$(date +%s)
while true; do
  running=0
  for pid in "$runs"/*.pid; do kill -0 "$(cat "$pid")" 2>/dev/null && running=$((running + 1)); done
  elapsed=$(( $(date +%s) - start ))
  usage=$(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)
  echo "--- ${elapsed}s, $running running${usage:+, GPU $usage}"
  for f in "$runs"/*.log; do
    printf '%s: %s\n' "$(basename "$f" .log)" "$(tr '\r' '\n' < "$f" | grep -v '^\s*$' | tail -n 1 | cut -c1-150)"
  done
  if [ "$running" -eq 0 ] || [ "$elapsed" -ge "$wait_s" ]; then break; fi
  sleep "${POLL_S:-30}"
done
cat "$runs"/*.state.jsonl > "$out/gpu_runs.state.jsonl" 2>/dev/null
echo "$(wc -l < "$out/gpu_runs.state.jsonl") finished runs in $out/gpu_runs.state.jsonl"
