#!/bin/bash
# The paper protocol's runs of one dataset on one GPU, all at once, as separate processes.
#
#   bash benchmarks/gpu/paper_runs.sh DATASET [WAIT_S]     (env: SEEDS="0 1 2", DATA, RUNS, OUT)
#
# Why: a lease is short, and one run (batch 4 at 224 x 224) is too small to keep an H100 busy;
# six or ten at once kept it 93-100 % busy (nvidia-smi) and finished in 2.5-3 min. Each run is the unchanged
# `python -m napari_selfreg.bench paper` with its own state file; setsid lets the runs outlive
# the calling command while the machine is held. The script waits up to WAIT_S seconds, shows
# each run's epoch, then gathers the finished runs into $OUT/gpu_runs.state.jsonl, which
# benchmarks/gpu/merge_paper_runs.py adds to the result files. DATA is a folder holding
# DATASET/ (benchmarks/gpu/pack_device_data.py makes one small enough to carry).
dataset=$1; wait_s=${2:-500}; seeds=${SEEDS:-0 1 2}
data=${DATA:-/tmp/data}; runs=${RUNS:-/tmp/paper_runs}; out=${OUT:-$runs}
export PYTHONPATH=$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
mkdir -p "$runs" "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1
if ! ls "$runs"/"${dataset}"_*.log >/dev/null 2>&1; then
  for seed in $seeds; do for model in unet selfreg_unet; do
    run=${dataset}_${model}_$seed
    setsid nohup python3 -m napari_selfreg.bench paper --dataset "$dataset" --seeds "$seed" --models $model \
      --device cuda --data "$data" --out "$runs/$run.json" --state "$runs/$run.state.jsonl" \
      > "$runs/$run.log" 2>&1 < /dev/null &
  done; done
  echo "launched $dataset, seeds $seeds, at $(date +%T)"
fi
start=$(date +%s)
while true; do
  running=$(pgrep -f "napari_selfreg.bench paper" | wc -l)
  elapsed=$(( $(date +%s) - start ))
  echo "--- ${elapsed}s, $running running, GPU $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
  for f in "$runs"/*.log; do
    printf '%s: %s\n' "$(basename "$f" .log)" "$(tr '\r' '\n' < "$f" | grep -v '^\s*$' | tail -n 1 | cut -c1-150)"
  done
  [ "$running" -eq 0 ] || [ "$elapsed" -ge "$wait_s" ] && break
  sleep 30
done
cat "$runs"/*.state.jsonl > "$out/gpu_runs.state.jsonl" 2>/dev/null
echo "$(wc -l < "$out/gpu_runs.state.jsonl") finished runs in $out/gpu_runs.state.jsonl"
