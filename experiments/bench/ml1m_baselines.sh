#!/usr/bin/env bash
# GPU run of the ML-1M baselines through the Trainer (pessimistic ranking), all three configs at once on one
# card (each small model leaves the GPU mostly idle), plus the trainer-state memory table.
# Usage (device machine, repo root): bash experiments/bench/ml1m_baselines.sh OUTDIR [DEADLINE_S]
# Needs RECJAX_DATA_DIR with ml-1m/ and, on the GPU image, ml_collections/tensorboardX on PYTHONPATH.
set -u
out=${1:?outdir}; deadline=${2:-540}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.22 PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jaxcache}
git rev-parse --short HEAD > "$out/commit.txt" 2>/dev/null; nvidia-smi --query-gpu=name --format=csv,noheader >> "$out/commit.txt"
pids=()
for m in sasrec hstu hstu_large; do
  timeout "$deadline" python3 -m experiments.run --config=experiments/configs/${m}_ml1m.py \
    --workdir=/tmp/runs/$m --config.data.pipeline=numpy --config.train.progress=False \
    > "$out/$m.log" 2>&1 &
  pids+=($!)
done
timeout 120 python3 experiments/bench/train_state_memory.py > "$out/memory.md" 2>&1
wait "${pids[@]}"
for m in sasrec hstu hstu_large; do
  cp /tmp/runs/$m/results.json "$out/$m.json" 2>/dev/null
  echo "== $m"; tail -n 8 "$out/$m.log"
done
cat "$out/memory.md"
