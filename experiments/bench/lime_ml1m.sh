#!/usr/bin/env bash
# GPU runs of LIME beside HSTU on MovieLens-1M through the Trainer, all at once on one card.
# Usage (device machine, repo root): bash experiments/bench/lime_ml1m.sh OUTDIR DEADLINE_S RUN...
#   RUN = name:config:seed[:override,override...]   e.g. xor8:lime_ml1m:0:task.cuts_per_sequence=8
# Needs RECJAX_DATA_DIR with ml-1m/ and, on the GPU image, ml_collections/tensorboardX on PYTHONPATH.
set -u
out=${1:?outdir}; deadline=${2:?deadline_s}; shift 2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.12}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jaxcache}
{ git rev-parse --short HEAD; nvidia-smi --query-gpu=name --format=csv,noheader; } > "$out/commit.txt" 2>/dev/null
pids=(); names=()
for run in "$@"; do
  IFS=: read -r name cfg seed extra <<< "$run"
  args=()
  IFS=, read -ra overrides <<< "${extra:-}"
  for o in "${overrides[@]}"; do [ -n "$o" ] && args+=("--config.$o"); done
  timeout "$deadline" python3 -m experiments.run --config=experiments/configs/${cfg}.py \
    --workdir=/tmp/runs/$name --config.data.pipeline=numpy --config.train.progress=False \
    --config.train.seed=$seed "${args[@]}" > "$out/$name.log" 2>&1 &
  pids+=($!); names+=("$name")
done
wait "${pids[@]}"
for name in "${names[@]}"; do
  cp /tmp/runs/$name/results.json "$out/$name.json" 2>/dev/null
  echo "== $name"; tail -n 6 "$out/$name.log"
done
