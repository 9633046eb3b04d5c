#!/usr/bin/env bash
# One command that proves distgan's GPU path on a machine with one or more NVIDIA GPUs and no network:
#
#   bash bench/gpu_check.sh                # from anywhere; its stages stop at the limits --dry-run lists
#   bash bench/gpu_check.sh --dry-run      # the stages, their time limits and the pre-flight; runs nothing
#   bash bench/gpu_check.sh --rehearse     # every stage's plumbing on a CPU machine, as the GPU image has it
#
# First a pre-flight (bench/_preflight.py, one line, seconds): every module the stages import, the NVIDIA
# driver the torch build needs, a C compiler and Python.h for Triton's launcher, free space in /tmp and
# /dev/shm. If anything is missing it names it and exits 1 before any stage spends device time. Then the
# stages, in this order, each under its own `timeout` (a hang costs its stage, not the whole check). Their
# limits add up to the overall budget (GPU_CHECK_BUDGET_S, default 470 s, so the check stays under 8 minutes;
# another budget scales every limit with it); a stage left less than its minimum is skipped, saying so:
#   versions   GPU, driver, CUDA, torch, triton, ray (distgan/provenance.py)
#   pytest     python -m pytest -o addopts= -m gpu -q over the test files that hold GPU tests
#   kernels    bench/kernels.py --gpu-check: eager vs torch.compile vs triton, forward/backward/full, fp32 and
#              bf16, do_bench medians, GB/s against the copy bandwidth measured in the same run
#   faults     python -m distgan.train --use-gpu --num-workers 1 through a local Ray instance, checkpointing
#              every 10 steps; rank 0 is SIGKILLed at step 25 (DISTGAN_TEST_* hooks), --max-failures 1; the run
#              must resume ("resumed from") and finish
#   train      bench/train.py --gpu-check: plain loop vs distgan (1 GPU worker), eager vs triton kernels, the
#              precision the default run would use first; median images/s
#   report     bench/_gpu_report.py: the results below, PASS/FAIL per stage
# Each stage's PASS is bench/_gpu_report.py's check of what it wrote (tests/test_gpu_check.py feeds each check
# failing input). After every stage the results are rewritten, so a check cut short still leaves them:
#   $OUT/gpu-<date>.json         the benches' records, machine, versions, git commit, every stage's outcome
#   $OUT/gpu-<date>.md           the same as tables
#   $OUT/gpu-<date>-logs.tar.gz  every stage's log and JSON
# Three files, directly under $OUT (a device machine returns at most 8, at most two folders down). OUT
# defaults to bench/results (git-ignored there: commit one with `git add -f`). Prints a one-screen summary
# and exits non-zero if any stage failed.
#
# The machine needs CPython with torch, triton, torchvision, torchmetrics preinstalled; what else distgan
# needs (a slimmed Ray without its dashboard, pydantic, mlxtend, ...) comes from .gpu-bundle/, which
# `bash bench/make_gpu_bundle.sh` builds on a networked machine (from the repo root); a device run carries it.
# The repo is not pip-installed: PYTHONPATH. Without an NVIDIA GPU it says so and exits 0 within seconds.
#
# --rehearse runs the same stages, order, budgets and $OUT files on a CPU machine, in the environment the GPU
# image will have: the modules it lacks hidden (.gpu-bundle/manifest.json's list, else bench/_bundle.py's),
# Ray's dashboard among them; the GPU-only pieces in their CPU forms: interpreted Triton at the smoke preset's
# small shapes, gloo for NCCL, the CPU's fault run, the GPU tests collected and skipped, distgan's training runs
# without the plain loop's.
set -uo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/_script_args.sh"
parse_script_args gpu_check "$@"

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
T0=$SECONDS
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
# name:limit:minimum (seconds) at the default budget, in the order they run; the limits add up to 470
STAGE_TABLE=(versions:20:10 pytest:90:30 kernels:130:60 faults:100:60 train:110:60 report:20:10)

HAVE_GPU=1
if ! command -v nvidia-smi >/dev/null 2>&1 && ! compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
  HAVE_GPU=0
  if [ "$DRY_RUN" = 0 ] && [ "$REHEARSE" = 0 ]; then
    echo "gpu_check: no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidia*): nothing to check, exiting 0"
    echo "gpu_check: bash bench/gpu_check.sh --rehearse runs every stage's plumbing on this CPU instead"
    exit 0
  fi
fi

PY=${PYTHON:-$(command -v python || command -v python3)}
export WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1
unset TRITON_INTERPRET RAY_ADDRESS
if [ -f .gpu-bundle/activate.sh ] && [ "$REHEARSE" = 0 ]; then
  # shellcheck disable=SC1091
  . .gpu-bundle/activate.sh   # unpacks Ray + wheels into /tmp/distgan-site once; sets PYTHONPATH
elif [ "$REHEARSE" = 0 ]; then
  echo "gpu_check: no .gpu-bundle/ here (bash bench/make_gpu_bundle.sh builds one); Ray and friends must already be importable"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

WORK=/tmp/gpucheck.dry-run
if [ "$DRY_RUN" = 0 ]; then
  WORK=$(mktemp -d /tmp/gpucheck.XXXXXX)
  trap 'rm -rf "$WORK"' EXIT
fi
MODE_FLAG=()
if [ "$REHEARSE" = 1 ]; then
  MODE_FLAG=(--rehearse)
  # the GPU image's environment: what it lacks, hidden from every process (Ray's workers inherit PYTHONPATH)
  mapfile -t HIDDEN < <("$PY" bench/_bundle.py hidden --manifest .gpu-bundle/manifest.json)
  if [ "$DRY_RUN" = 0 ]; then
    "$PY" bench/_hide.py "$WORK/hide" "${HIDDEN[@]}" || exit 2
    export PYTHONPATH=$WORK/hide:$PYTHONPATH
  fi
  echo "gpu_check --rehearse: on this CPU, hiding what the GPU image lacks: ${HIDDEN[*]}"
fi

PREFLIGHT=$(timeout 120 "$PY" bench/_preflight.py "${MODE_FLAG[@]}" 2>&1)
PREFLIGHT_RC=$?
[ "$PREFLIGHT_RC" -eq 124 ] && PREFLIGHT="preflight: FAIL: timed out after 120 s importing the stages' modules"
echo "${PREFLIGHT:-preflight: FAIL: $PY bench/_preflight.py printed nothing (exit $PREFLIGHT_RC)}" | tail -n 1

if [ "$DRY_RUN" = 0 ] && [ "$PREFLIGHT_RC" -ne 0 ]; then
  echo "gpu_check: FAIL before any stage ran: the pre-flight above names what is missing"
  exit 1
fi
if [ "$DRY_RUN" = 0 ] && [ "$REHEARSE" = 0 ] && \
   ! timeout 120 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)'; then
  echo "gpu_check: an NVIDIA device is present but torch cannot use CUDA (torch $("$PY" -c \
    'import torch; print(torch.__version__, "built for CUDA", torch.version.cuda)' 2>/dev/null)): FAIL"
  exit 1
fi

# Each stage's limit and minimum at this budget: the default table scaled, so the limits still add up to it
declare -A LIMIT MINIMUM
TOTAL=0
for row in "${STAGE_TABLE[@]}"; do
  IFS=: read -r name limit minimum <<< "$row"
  LIMIT[$name]=$((limit * BUDGET_S / 470))
  MINIMUM[$name]=$minimum
  TOTAL=$((TOTAL + LIMIT[$name]))
done

OUT_DIR=${OUT:-$ROOT/bench/results}
STAMP=$(date -u +%Y%m%d-%H%M%S)
LOGS=$WORK/logs
RESULT=$OUT_DIR/gpu-$STAMP
if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check --dry-run: overall budget ${BUDGET_S} s (GPU_CHECK_BUDGET_S); the stages, in order:"
else
  mkdir -p "$LOGS" "$OUT_DIR" || exit 2
  : > "$LOGS/stages.tsv"
fi

# publish: the report and the logs' archive under $OUT, rewritten after every stage
publish() {
  timeout "${LIMIT[report]}" "$PY" bench/_gpu_report.py --logs "$LOGS" --json "$RESULT.json" --md "$RESULT.md" \
    --wall-s $((SECONDS - T0)) "${MODE_FLAG[@]}" "$@"
  local rc=$?
  tar -C "$WORK" -czf "$RESULT-logs.tar.gz.tmp" logs && mv "$RESULT-logs.tar.gz.tmp" "$RESULT-logs.tar.gz"
  return $rc
}

# stage NAME CMD...: runs CMD under `timeout`, at most the stage's limit and never past the overall budget;
# bench/_gpu_report.py --check NAME must pass on what it wrote; appends a row to stages.tsv.
stage() {
  local name=$1; shift
  local cmd="$*"
  cmd=${cmd%%$'\n'*}
  if [ "$DRY_RUN" = 1 ]; then
    printf '  %-9s limit %4s s  minimum %3s s  %s\n' "$name" "${LIMIT[$name]}" "${MINIMUM[$name]}" "${cmd:0:90}"
    return
  fi
  local left=$((BUDGET_S - (SECONDS - T0)))
  local t=$((LIMIT[$name] < left ? LIMIT[$name] : left)) log=$LOGS/$name.log start=$SECONDS rc status why
  if [ "$t" -lt "${MINIMUM[$name]}" ]; then
    why="skipped: ${t} s of the ${BUDGET_S} s budget left, it needs at least ${MINIMUM[$name]} s"
    printf '%s\tSKIP\t-\t0\t%s\t%s\n' "$name" "$t" "$why" >> "$LOGS/stages.tsv"
    echo "== $name: $why"
    publish > /dev/null
    return
  fi
  echo "== $name (limit ${t}s): ${cmd:0:110}"
  echo "\$ $*" > "$log"
  STAGE_LIMIT=$t timeout -k 5 "$t" "$@" >> "$log" 2>&1
  rc=$?
  status=PASS
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=FAIL; why="timed out after ${t}s"
  elif [ "$rc" -ne 0 ]; then status=FAIL; why="exit $rc"
  elif ! why=$(timeout 30 "$PY" bench/_gpu_report.py --check "$name" --logs "$LOGS" --work "$WORK" \
                 "${MODE_FLAG[@]}" 2>&1); then status=FAIL
  fi
  why=${why//$'\t'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" "$t" "${why//$'\n'/; }" \
    >> "$LOGS/stages.tsv"
  echo "   $status in $((SECONDS - start))s ($why)"
  if [ "$status" = FAIL ]; then tail -n 15 "$log" | sed 's/^/   | /'; fi
  publish > /dev/null
}

stage versions "$PY" -c '# provenance
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
# and one collection error would fail the stage before a GPU test ran. One process (-o addopts= drops
# pyproject's `-n 2`): a GPU is not shared.
mapfile -t GPU_TEST_FILES < <(grep -lE "pytest\.mark\.gpu|@requires_gpu" tests/test_*.py)
stage pytest "$PY" -m pytest -o addopts= -m gpu -q -rs -p no:cacheprovider "${GPU_TEST_FILES[@]}"

# The bench starts no case it cannot finish (a torch.compile case needs its compile time) and rewrites its
# JSON after every case, so a stage cut short still leaves what it measured. On a CPU, the interpreter runs the
# Triton kernels at the smoke preset's shapes.
if [ "$REHEARSE" = 1 ]; then KERNELS_PRESET=--smoke; KERNELS_ENV=(TRITON_INTERPRET=1); else
  KERNELS_PRESET=--gpu-check; KERNELS_ENV=(); fi
stage kernels env "${KERNELS_ENV[@]}" bash -c '"$0" bench/kernels.py "$1" --time-budget-s $((STAGE_LIMIT - 15)) \
  --output "$2"' "$PY" "$KERNELS_PRESET" "$LOGS/kernels.json"

if [ "$REHEARSE" = 1 ]; then DEVICE_FLAG=(); else DEVICE_FLAG=(--use-gpu); fi
stage faults env DISTGAN_TEST_MARKER_DIR="$WORK" DISTGAN_TEST_KILL_AT_STEP=25 DISTGAN_TEST_KILL_RANK=0 \
  "$PY" -m distgan.train "${DEVICE_FLAG[@]}" --num-workers 1 --batch-size 64 --epochs 1 --max-steps 40 \
  --checkpoint-every-steps 10 --eval-every 0 --max-failures 1 --storage-path "$WORK/runs" --name gpu-check

# On a CPU a plain-loop run costs as much as distgan's: the rehearsal measures distgan's runs only.
if [ "$REHEARSE" = 1 ]; then TRAIN_CONFIGS=(--configs ray); else TRAIN_CONFIGS=(); fi
# --allow-busy: the check's own stages ran just before (the load average remembers them); its file says so
stage train bash -c '"$0" bench/train.py --gpu-check --allow-busy "${@:2}" --time-budget-s $((STAGE_LIMIT - 20)) \
  --output "$1"' "$PY" "$LOGS/train.json" "${TRAIN_CONFIGS[@]}"

if [ "$DRY_RUN" = 1 ]; then
  printf '  %-9s limit %4s s  minimum %3s s  %s\n' report "${LIMIT[report]}" "${MINIMUM[report]}" \
    "bench/_gpu_report.py -> \$OUT/gpu-<date>.json, .md, -logs.tar.gz"
  echo "gpu_check --dry-run: the limits add up to ${TOTAL} s of the ${BUDGET_S} s budget"
  if [ "$HAVE_GPU" = 0 ] && [ "$REHEARSE" = 0 ]; then
    echo "gpu_check --dry-run: no NVIDIA GPU on this machine: the check itself would exit 0 here"
    exit 0
  fi
  exit "$PREFLIGHT_RC"
fi
publish --final
exit $?
