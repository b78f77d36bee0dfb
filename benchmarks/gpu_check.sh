#!/usr/bin/env bash
# One-shot GPU run of the four benchmarks (benchmarks/README.md) on a lent GPU machine with no internet, in <= 7 min.
#
#   OUT=dir bash benchmarks/gpu_check.sh              # the GPU run: --device cuda, sizes below, python3
#   OUT=dir bash benchmarks/gpu_check.sh --dry-run    # CPU check of this script: --device cpu --quick, toy sizes
#
# Writes into $OUT (flat, <= 9 files, plus a hybrid run's NAME.json.partial if it was cut short): hybrid.json
# (batch 1), hybrid_b16.json, sae_grid.json, extractor.json, steering.json, gpu_check.log and, when time is left,
# hybrid256.json (N=256, the rest of the issue's settings), hybrid_profile.json (a short `--profile` run: forward
# counts, cProfile, torch ops on the GPU) and hybrid_shared.json (shared drafts and speculative steps, in sentence
# and token mode, against their defaults). Ends with summarize.py's markdown table.
#
# Packages the GPU machine lacks (hydra-core/omegaconf/antlr4, transformers 5.23.0, sae-lens and what it imports)
# travel as wheels in .whl/ (a carried, git-ignored folder); they are installed to $SITE (default /tmp/site) and put
# first on PYTHONPATH, in front of the machine's own transformers. wandb's wheel in .whl/ is the PyPI wheel without
# its wandb/bin/ executables (wandb-core, wandb-symon, a Rust .so: 19 of its 20 MiB): sae-lens imports wandb but the
# benchmark never logs to it (SAETrainerConfig's log_to_wandb=False).
#
# Building .whl/ (on a machine with the package index; the GPU machine has none), from the repo root:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     hydra-core==1.3.8 omegaconf==2.3.1 transformers==5.23.0 sae-lens==6.54.12 transformer-lens==3.9.0 \
#     datasets==5.2.0 wandb==0.31.0 pydantic==2.14.4 pydantic-core==2.50.5 jaxtyping==0.3.11 better-abc==0.0.3 \
#     simple-parsing==0.1.9 docstring-parser==0.18.0 dill==0.4.1 multiprocess==0.70.19 platformdirs==4.14.8 \
#     opentelemetry-api==1.45.2 typing-extensions==4.16.0 typing-inspection==0.4.5 annotated-types==0.8.0 \
#     wadler-lindig==0.1.8
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3     # only an sdist on PyPI; pure Python
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi abi3 \
#     --platform manylinux2014_x86_64 -d .whl/fallback protobuf==7.36.2
# then repack the wandb wheel without wandb/bin/ (19 of its 20 MiB; the benchmarks never log to W&B) to stay well
# inside a 64 MiB transfer. Versions: those of requirements/constraints.txt where it pins them.
#
# Time: a global budget (BUDGET_S, default 420 s for the GPU run) — every benchmark runs under `timeout`, capped at
# its own limit and at what is left of the budget; an optional run starts only if its whole limit still fits.
# Environment knobs: OUT (required), PYTHON, SITE, BUDGET_S, THREADS (torch/OpenMP CPU threads, default 8 on GPU),
# PARTS (the runs to make, default all: "hybrid hybrid_b16 sae_grid extractor steering hybrid256 hybrid_profile
# hybrid_shared"; a lease too short for all of them is split into two commands, e.g. PARTS="sae_grid extractor
# steering" then PARTS=hybrid). The hybrid's figures, the ones still missing on a GPU, fit one 15-minute lease:
#   OUT=$OUT BUDGET_S=570 PARTS="hybrid hybrid_b16 hybrid_shared" bash benchmarks/gpu_check.sh   (timeout_s 595)
# (estimated at 25 ms a model call: ~130 s + ~150 s + ~170 s with its call counts, plus ~25 s of wheel install;
# hybrid_shared starts only if its 200 s still fit). Session 10's batched k-means init (the grid's total ratio at
# 5 epochs) needs PARTS=sae_grid (session 5: ~70 s with the init unbatched); with the hybrid in one lease:
#   OUT=$OUT BUDGET_S=570 PARTS="sae_grid hybrid hybrid_shared" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    *) echo "usage: OUT=dir bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
  esac
done
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"

export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled WANDB_SILENT=true

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}; [ -x "$PY" ] || PY=python3
  DEV=cpu; THREADS=${THREADS:-1}; BUDGET=${BUDGET_S:-900}; SITE=${SITE:-}
else
  PY=${PYTHON:-python3}
  DEV=cuda; THREADS=${THREADS:-8}; BUDGET=${BUDGET_S:-420}; SITE=${SITE:-/tmp/site}
fi
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS  # also sklearn's k-means (SAE data init)
COMMON=(--device "$DEV" --threads "$THREADS")
PARTS=" ${PARTS:-hybrid hybrid_b16 sae_grid extractor steering hybrid256 hybrid_profile hybrid_shared} "
FAILS=0

main() {
  echo "== gpu_check $([ "$DRY" = 1 ] && echo DRY RUN) $(date -u +%Y-%m-%dT%H:%M:%SZ) budget ${BUDGET}s, repo $REPO, python $PY"

  # ---- packages: the carried wheels -> $SITE (no-op when the command line already installed them)
  if [ -n "$SITE" ]; then
    if [ ! -d "$SITE/transformers" ] && compgen -G ".whl/*.whl" > /dev/null; then
      echo "== installing .whl/*.whl -> $SITE"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "!! wheel install failed"; FAILS=$((FAILS + 1)); }
    fi
    export PYTHONPATH="$REPO:$SITE"
    # wandb (imported by sae-lens) needs protobuf 5-7; the machine's is used unless it is older or missing
    if ! "$PY" -c 'import sys, google.protobuf as p; sys.exit(int(p.__version__.split(".")[0]) < 5)' 2> /dev/null \
        && compgen -G ".whl/fallback/protobuf-*.whl" > /dev/null; then
      echo "== protobuf missing or < 5: installing .whl/fallback/protobuf-*.whl -> $SITE"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/fallback/protobuf-*.whl || echo "!! protobuf install failed"
    fi
  else
    export PYTHONPATH="$REPO"
  fi

  # ---- machine and versions
  if command -v nvidia-smi > /dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
  echo "nproc --all $(nproc --all); PYTHONPATH=$PYTHONPATH; OMP_NUM_THREADS=$OMP_NUM_THREADS"
  "$PY" - << 'EOF' || { echo "!! imports failed: nothing can run"; return 1; }
import platform, sys
from importlib import metadata
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import transformers, sae_lens
import sae_reasoning.hybrid, sae_reasoning.activations, sae_reasoning.sae, sae_reasoning.steering
from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
print("transformers", transformers.__version__, transformers.__file__)
print("sae_lens", metadata.version("sae-lens"), sae_lens.__file__)
for n in ("transformer-lens", "huggingface-hub", "tokenizers", "safetensors", "numpy", "hydra-core", "omegaconf",
          "protobuf", "wandb", "pydantic", "datasets", "scikit-learn"):
    try:
        print(" ", n, metadata.version(n))
    except metadata.PackageNotFoundError:
        print(" ", n, "MISSING")
EOF

  # ---- the benchmarks (mandatory: run with what is left of the budget as their timeout)
  if [ "$DRY" = 1 ]; then
    Q=(--quick --random-models)
    run hybrid bench_hybrid 300 "${Q[@]}" --tokens 32 --batches 1 --no-diag --ref-checkpoints 3 --ref-live 2 --no-profile
    run hybrid_b16 bench_hybrid 300 "${Q[@]}" --tokens 32 --batches 2 --no-diag --ref-checkpoints 3 --ref-live 0 --no-profile
    run sae_grid bench_sae_grid 200 --quick --data synthetic --n-vectors 2000 --d-in 64 --layers 2 --epochs 2
    run extractor bench_extractor 200 "${Q[@]}" --n-traces 8 --repeats 1
    run steering bench_steering 200 "${Q[@]}" --n-train 8 --n-val 4 --epochs 1 --repeats 1
    optional hybrid256 bench_hybrid 200 "${Q[@]}" --tokens 16 --batches 1,2 --no-diag --ref-checkpoints 2 --ref-live 1 --no-profile
    optional hybrid_profile bench_hybrid 200 "${Q[@]}" --tokens 16 --batches 2 --no-diag --ref-checkpoints 2 --ref-live 1 --profile
    optional hybrid_shared bench_hybrid 200 "${Q[@]}" --tokens 16 --batches 2 --diag shared_drafts,token_shared_drafts,no_speculative,token_no_speculative --ref-checkpoints 2 --ref-live 0 --no-profile
  else
    # hybrid at the targets' N (512) at batch 1, then batch 16 (two runs: a slow batch 16 cannot cost the batch-1
    # figures; each leaves NAME.json.partial after every setting), without the automatic profile (it re-runs the
    # hybrid). Session 9 (H200): neither finished in 150 / 200 s. Batch 1 needs ~160 s once warm (load, warm-ups,
    # the 512-token continuation, the reference probe twice, 4 methods x 512 tokens at ~20-25 ms a call). Batch 16
    # then drafted serially (1,633 calls for 64 tokens); with shared drafts, now on by default on CUDA in both
    # modes, expect ~4 calls a token (the organism's count), ~40 s a hybrid run
    run hybrid bench_hybrid 240 --tokens 512 --batches 1 --no-diag --no-profile
    run hybrid_b16 bench_hybrid 240 --tokens 512 --batches 16 --no-diag --ref-checkpoints 3 --ref-live 0 --no-profile
    # the paper's grid: 6 layers x 10 sizes (k = 3), one train_grid stack per layer
    run sae_grid bench_sae_grid 220 --n-vectors 30000 --layers 6 --epochs 5
    run extractor bench_extractor 90 --n-traces 64 --repeats 3
    run steering bench_steering 90 --n-train 48 --n-val 16 --epochs 2 --repeats 2
    optional hybrid256 bench_hybrid 120 --tokens 256 --batches 1,16 --no-diag --ref-checkpoints 3 --ref-live 0 --no-profile
    optional hybrid_profile bench_hybrid 75 --tokens 64 --batches 16 --no-diag --ref-checkpoints 2 --ref-live 0 --profile
    # the untested-on-GPU knobs: shared drafts (on by default on CUDA: against unshared, batch 16, both modes; and
    # with their drafts verified) and speculative steps off vs on (batch 1)
    # (64 tokens: unshared drafts at batch 16 made 1,633 calls for 64 tokens in session 9, ~40 s a run)
    optional hybrid_shared bench_hybrid 200 --tokens 64 --batches 1,16 --diag unshared_drafts,token_unshared_drafts,shared_drafts_verified,no_speculative,token_no_speculative --ref-checkpoints 2 --ref-live 0 --no-profile
  fi

  # ---- summary
  echo "== summary at +${SECONDS}s ($FAILS failed or skipped)"
  local files=()
  for f in hybrid hybrid_b16 hybrid256 hybrid_shared sae_grid extractor steering; do [ -s "$OUT/$f.json" ] && files+=("$OUT/$f.json"); done
  if [ ${#files[@]} -gt 0 ]; then "$PY" benchmarks/summarize.py "${files[@]}" || FAILS=$((FAILS + 1)); fi
  if [ -s "$OUT/hybrid_profile.json" ]; then
    "$PY" - "$OUT/hybrid_profile.json" << 'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
p = r.get("profile", {}).get("hybrid", {})
for s in r["settings"]:
    print(f"hybrid_profile N={s['new_tokens']} batch={s['batch']}: tokens/s",
          {k: round(v, 1) for k, v in s["tokens_per_s"].items()})
print("forward calls:", json.dumps(p.get("forward_calls")))
ops = next((v for k, v in p.items() if k.startswith("torch_ops")), {})
for o in ops.get("top_ops", [])[:8]:
    print(f"  {o['share']:6.1%} {o['self_ms']:10.1f} ms {o['calls']:7d}x {o['op']}")
EOF
  fi
  echo "== done at +${SECONDS}s; files: $(cd "$OUT" && ls | tr '\n' ' ')"
  [ "$FAILS" = 0 ]  # exit status: 0 only when every mandatory run produced its JSON
}

# run NAME SCRIPT CAP_S ARGS...: benchmarks/SCRIPT.py under timeout min(CAP_S, time left); JSON -> $OUT/NAME.json
run() {
  local name=$1 script=$2 cap=$3
  shift 3
  [[ "$PARTS" == *" $name "* ]] || return 0
  local left=$((BUDGET - SECONDS - 20))  # 20 s: a killed run's grace period and the summary
  local t=$((cap < left ? cap : left))
  if [ "$t" -lt 15 ]; then
    echo "== SKIP $name: ${left}s of the budget left"; FAILS=$((FAILS + 1)); return
  fi
  echo "== $name at +${SECONDS}s, timeout ${t}s: benchmarks/$script.py ${COMMON[*]} $*"
  rm -f "$OUT/$name.json"
  local t0=$SECONDS rc=0
  timeout -k 10 "$t" "$PY" "benchmarks/$script.py" "${COMMON[@]}" "$@" --out "$OUT/$name.json" > /dev/null || rc=$?
  if [ "$rc" = 0 ] && [ -s "$OUT/$name.json" ]; then
    echo "== $name ok in $((SECONDS - t0))s"
  else
    echo "!! $name FAILED rc=$rc after $((SECONDS - t0))s$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ' (timeout)')"
    FAILS=$((FAILS + 1))
  fi
}

# optional NAME SCRIPT CAP_S ARGS...: as run, but only if the whole CAP_S still fits in the budget
optional() {
  [[ "$PARTS" == *" $1 "* ]] || return 0
  local left=$((BUDGET - SECONDS - 20)) fails=$FAILS
  if [ "$left" -lt "$3" ]; then echo "== optional $1 not run: ${left}s left, needs $3s"; return; fi
  run "$@"
  FAILS=$fails  # an optional run's failure does not change the exit status
}

main 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
exit "$rc"
