#!/usr/bin/env bash
# Run every benchmark: one JSON object per benchmark in benchmarks/results/<name>_<tag>.json, then a markdown
# summary on stdout (paste it into benchmarks/README.md). Extra arguments go to every script, e.g.
#     benchmarks/run_all.sh                    # CPU, organism (stories260K if missing), full settings
#     benchmarks/run_all.sh --quick            # smoke run, about a minute on CPU
#     benchmarks/run_all.sh --device cuda      # random-weight Qwen2-1.5B-shaped models on the GPU
# Set ONLY="extractor sae_grid" to run a subset, OUT=dir to write elsewhere, PYTHON=... to pick the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-benchmarks/results}
ONLY=${ONLY:-"extractor sae_grid steering hybrid"}
mkdir -p "$OUT"

tag=cpu
prev=""
for a in "$@"; do
  if [ "$prev" = "--device" ]; then tag=$a; fi
  case "$a" in --device=*) tag=${a#--device=} ;; --quick) quick=1 ;; esac
  prev=$a
done
[ "${quick:-0}" = 1 ] && tag="${tag}_quick"

files=()
for name in $ONLY; do
  echo "== bench_$name $* ($(date -u +%H:%M:%SZ))" >&2
  "$PY" "benchmarks/bench_$name.py" "$@" --out "$OUT/${name}_${tag}.json" >/dev/null
  files+=("$OUT/${name}_${tag}.json")
done
"$PY" benchmarks/summarize.py "${files[@]}"
