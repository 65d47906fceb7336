#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md, in one command on a CUDA machine, from the repo root:
#   bash benchmarks/gpu.sh bench    the suite on CUDA (demo and paper profiles), torch.compile and batch variants
#   bash benchmarks/gpu.sh study    paper-profile data, then the timed paper study (12 runs x 99 epochs)
# Results go to $OUT (default /tmp/grainlab-gpu). Where grainlab's dependencies are not installed,
# wheels in .whl/ are installed into /tmp/site first (for a machine without a package index).
set -euo pipefail
OUT=${OUT:-/tmp/grainlab-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
nvidia-smi dmon -s um -d 1 >"$OUT/dmon.txt" 2>&1 &
DMON=$!
trap 'kill $DMON 2>/dev/null || true' EXIT

case "${1:-bench}" in
bench)
    python3 -m benchmarks --device cuda --profiles demo paper --sections train infer memory recognition \
        --real-data none --steps 40 --out "$OUT/results-gpu.json" 2>&1 | tee "$OUT/bench.log"
    python3 -m benchmarks --device cuda --profiles paper --sections train --steps 40 --batch 64 \
        --out "$OUT/results-gpu-batch64.json" 2>&1 | tee -a "$OUT/bench.log"
    python3 -m benchmarks --device cuda --profiles paper --sections train --steps 40 --batch 64 \
        --set boundaries.compile=true --out "$OUT/results-gpu-compile.json" 2>&1 | tee -a "$OUT/bench.log"
    ;;
study)
    shift
    start=$(date +%s)
    python3 -m grainlab.cli data synth --profile paper --only grain_boundaries --workers "$(nproc)" "$@" \
        2>&1 | tail -5 | tee -a "$OUT/study.log"
    synth=$(date +%s)
    python3 -m grainlab.cli boundaries study --profile paper "$@" 2>&1 | tee -a "$OUT/study.log"
    end=$(date +%s)
    echo "paper data synth: $((synth - start)) s; paper study: $((end - synth)) s" | tee -a "$OUT/study.log"
    cp reports/boundaries/study.md "$OUT/" 2>/dev/null || true
    ;;
esac
