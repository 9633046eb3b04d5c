#!/usr/bin/env bash
# One command that proves distgan's GPU path on a machine with one or more NVIDIA GPUs and no network:
#
#   bash bench/gpu_check.sh                # from anywhere; its stages stop at the limits --dry-run lists
#   bash bench/gpu_check.sh --dry-run      # the stages, their time limits and the pre-flight; runs nothing
#
# First a pre-flight (bench/_preflight.py, one line, seconds): every module the stages import, the NVIDIA
# driver the torch build needs, a C compiler and Python.h for Triton's launcher. If anything is missing it
# names it and exits 1 before any stage spends device time. Then the stages, each under its own `timeout`
# (a hang costs its stage, not the whole check), all inside one overall budget (GPU_CHECK_BUDGET_S, default
# 470 s, so the whole check stays under 8 minutes; a stage gets at most what is left of it):
#   versions   GPU, driver, CUDA, torch, triton, ray (distgan/provenance.py)
#   pytest     python -m pytest -o addopts= -m gpu -q
#   kernels    bench/kernels.py --gpu-check: eager vs torch.compile vs triton, forward/backward/full, fp32 and
#              bf16, the generator's layers at batch 64 and 256 and two large shapes, do_bench medians, GB/s
#              against the copy bandwidth measured in the same run
#   faults     python -m distgan.train --use-gpu --num-workers 1 through a local Ray instance, checkpointing
#              every 10 steps; rank 0 is SIGKILLed at step 25 (DISTGAN_TEST_* hooks), --max-failures 1; the run
#              must resume ("resumed from") and finish
#   train      bench/train.py --gpu-check: plain loop vs distgan (1 GPU worker), eager vs triton kernels,
#              fp32 and bf16; median images/s
# Writes $OUT/gpu-<date>.json (the benches' `records`, with machine, versions, git commit, and every stage's
# outcome) and $OUT/gpu-<date>.md (tables), plus each stage's log under $OUT/gpu-<date>-logs/; OUT defaults
# to bench/results (git-ignored there: commit one with `git add -f`). Prints a one-screen summary with
# PASS/FAIL per stage and exits non-zero if any stage failed.
#
# The machine needs CPython with torch, triton, torchvision, torchmetrics preinstalled; what else distgan
# needs (a slimmed Ray, pydantic, mlxtend, ...) comes from .gpu-bundle/, which `bash bench/make_gpu_bundle.sh`
# builds on a networked machine (from the repo root). The repo is not pip-installed: PYTHONPATH.
# Without an NVIDIA GPU it says so and exits 0 within seconds (with --dry-run, after the pre-flight).
set -uo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/_script_args.sh"
parse_script_args gpu_check "$@"

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
T0=$SECONDS
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}

HAVE_GPU=1
if ! command -v nvidia-smi >/dev/null 2>&1 && ! compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
  HAVE_GPU=0
  if [ "$DRY_RUN" = 0 ]; then
    echo "gpu_check: no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidia*): nothing to check, exiting 0"
    exit 0
  fi
fi

PY=${PYTHON:-$(command -v python || command -v python3)}
export WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1
unset TRITON_INTERPRET RAY_ADDRESS
if [ -f .gpu-bundle/activate.sh ]; then
  # shellcheck disable=SC1091
  . .gpu-bundle/activate.sh   # unpacks Ray + wheels into /tmp/distgan-site once; sets PYTHONPATH
else
  echo "gpu_check: no .gpu-bundle/ here (bash bench/make_gpu_bundle.sh builds one); Ray and friends must already be importable"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

PREFLIGHT=$(timeout 120 "$PY" bench/_preflight.py 2>&1)
PREFLIGHT_RC=$?
[ "$PREFLIGHT_RC" -eq 124 ] && PREFLIGHT="preflight: FAIL: timed out after 120 s importing the stages' modules"
echo "${PREFLIGHT:-preflight: FAIL: $PY bench/_preflight.py printed nothing (exit $PREFLIGHT_RC)}" | tail -n 1

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check --dry-run: overall budget ${BUDGET_S} s (GPU_CHECK_BUDGET_S); each stage gets its limit or what is left"
elif [ "$PREFLIGHT_RC" -ne 0 ]; then
  echo "gpu_check: FAIL before any stage ran: the pre-flight above names what is missing"
  exit 1
fi

if [ "$DRY_RUN" = 0 ] && ! timeout 120 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)'; then
  echo "gpu_check: an NVIDIA device is present but torch cannot use CUDA (torch $("$PY" -c \
    'import torch; print(torch.__version__, "built for CUDA", torch.version.cuda)' 2>/dev/null)): FAIL"
  exit 1
fi

OUT_DIR=${OUT:-$ROOT/bench/results}
STAMP=$(date -u +%Y%m%d-%H%M%S)
LOGS=$OUT_DIR/gpu-$STAMP-logs
WORK=/tmp/gpucheck.dry-run
if [ "$DRY_RUN" = 0 ]; then
  mkdir -p "$LOGS" || exit 2
  STAGES=$LOGS/stages.tsv
  : > "$STAGES"
  WORK=$(mktemp -d /tmp/gpucheck.XXXXXX)
  trap 'rm -rf "$WORK"' EXIT
fi

# stage NAME LIMIT_S CHECK CMD...: runs CMD under `timeout`, at most LIMIT_S and never past the overall
# budget; CHECK is a function that must also succeed on the log (or "-"); appends a row to $STAGES.
stage() {
  local name=$1 limit=$2 check=$3; shift 3
  if [ "$DRY_RUN" = 1 ]; then
    local cmd="$*"
    printf '  %-9s limit %4s s  %s\n' "$name" "$limit" "${cmd%%$'\n'*}"
    return
  fi
  local left=$((BUDGET_S - (SECONDS - T0)))
  local t=$((limit < left ? limit : left)) log=$LOGS/$name.log start=$SECONDS rc status
  if [ "$t" -lt 15 ]; then
    printf '%s\tFAIL\t-\t0\t%s\tnot run: the %s s budget was spent\n' "$name" "$t" "$BUDGET_S" >> "$STAGES"
    echo "== $name: not run (budget spent)"
    return
  fi
  local cmd="$*"
  cmd=${cmd%%$'\n'*}
  echo "== $name (limit ${t}s): ${cmd:0:110}"
  echo "\$ $*" > "$log"
  STAGE_LIMIT=$t timeout -k 15 "$t" "$@" >> "$log" 2>&1
  rc=$?
  status=PASS
  local why="exit $rc"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=FAIL; why="timed out after ${t}s"
  elif [ "$rc" -ne 0 ]; then status=FAIL
  elif [ "$check" != - ] && ! why=$("$check" "$log"); then status=FAIL
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" "$t" "$why" >> "$STAGES"
  echo "   $status in $((SECONDS - start))s ($why)"
  if [ "$status" = FAIL ]; then tail -n 15 "$log" | sed 's/^/   | /'; fi
}

check_faults() {
  grep -q "SIGKILL at step" "$1" || { echo "the worker was never killed"; return 1; }
  grep -q "resumed from" "$1" || { echo "no 'resumed from' after the kill"; return 1; }
  compgen -G "$WORK/runs/gpu-check/checkpoint_*" > /dev/null || { echo "no checkpoint written"; return 1; }
  echo "killed, resumed from a checkpoint, finished"
}

check_pytest() {
  grep -Eq "[0-9]+ passed" "$1" || { echo "no GPU test passed"; return 1; }
  tail -n 1 "$1"
}

stage versions 60 - "$PY" -c '# provenance
import json, sys
from distgan import provenance
p = provenance.collect()
json.dump(p, open(sys.argv[1], "w"), indent=1)
v = p["versions"]
print(" | ".join(f"{k} {v[k]}" for k in ("gpu", "driver", "cuda", "torch", "triton", "ray", "python")))
print("GPUs:", p["machine"]["gpu_count"], "| git:", p["git"]["commit"], "(dirty)" if p["git"]["dirty"] else "")
' "$LOGS/provenance.json"
[ "$DRY_RUN" = 1 ] || tail -n 2 "$LOGS/versions.log"

# Only the files that hold GPU tests: the others import what this image may lack (wandb, moto, jsonschema),
# and one collection error would fail the stage before a GPU test ran.
# One process (-o addopts= drops pyproject's `-n 2`): the image has no pytest-xdist, and a GPU is not shared.
mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
stage pytest 150 check_pytest "$PY" -m pytest -o addopts= -m gpu -q -p no:cacheprovider "${GPU_TEST_FILES[@]}"
# The bench stops starting new cases 45 s before its limit, so it always writes what it measured.
stage kernels 150 - bash -c '"$0" bench/kernels.py --gpu-check --time-budget-s $((STAGE_LIMIT - 45)) \
  --output "$1"' "$PY" "$LOGS/kernels.json"
stage faults 120 check_faults env DISTGAN_TEST_MARKER_DIR="$WORK" DISTGAN_TEST_KILL_AT_STEP=25 \
  DISTGAN_TEST_KILL_RANK=0 "$PY" -m distgan.train --use-gpu --num-workers 1 --batch-size 64 --epochs 1 \
  --max-steps 40 --checkpoint-every-steps 10 --eval-every 0 --max-failures 1 \
  --storage-path "$WORK/runs" --name gpu-check
stage train 150 - bash -c '"$0" bench/train.py --gpu-check --time-budget-s $((STAGE_LIMIT - 60)) \
  --output "$1"' "$PY" "$LOGS/train.json"

if [ "$DRY_RUN" = 1 ]; then
  [ "$HAVE_GPU" = 1 ] || echo "gpu_check --dry-run: no NVIDIA GPU on this machine: the check itself would exit 0 here"
  [ "$HAVE_GPU" = 1 ] && exit "$PREFLIGHT_RC"
  exit 0
fi
timeout 60 "$PY" bench/_gpu_report.py --logs "$LOGS" --json "$OUT_DIR/gpu-$STAMP.json" \
  --md "$OUT_DIR/gpu-$STAMP.md" --wall-s $((SECONDS - T0))
exit $?
