#!/usr/bin/env bash
# Fetch into .whl/ the wheels the device machine lacks for benchmarks/gpu_check.py and
# benchmarks/gpu_check2.py.
#
# Why: the lent GPU machine (Python 3.12, torch 2.11+cu130, transformers, accelerate,
# nvidia-ml-py, rich, psutil, imageio... see /work/.library/device/KINDS.md) cannot reach a
# package index, and lacks diffusers, msgspec and structlog, which the check imports, and this
# project. The device tool carries `.whl` (git-ignored) with the working tree, and the command in
# scripts/gpu_check.sh installs it into /tmp/site there.
#
# Which: exactly what the check imports and the machine lacks, pinned to this venv's versions so
# the GPU runs the code the CPU tests ran:
#   diffusers (pure Python), msgspec (compiled: cp312 manylinux x86_64), structlog (pure Python),
#   for the real `wantel serve` of gpu_check2: starlette, uvicorn, websockets (cp312) and the
#   OpenTelemetry API, SDK and semantic conventions (pure Python; anyio, click, h11 and
#   prometheus-client are on the device), and a pure-Python wheel of this project (wantel,
#   telemetry, inference, exporters, dashboards).
# Left out on purpose: ftfy (+ wcwidth) -- WanPipeline imports it only if present and cleans
# prompts without it (only WanImageToVideoPipeline calls it unguarded); imageio-ffmpeg (a ~30 MB
# wheel) -- the check never encodes a video. Add names with EXTRA="ftfy wcwidth" if a later
# check needs them.
#
# Usage: scripts/fetch_device_wheels.sh   (network to PyPI needed here; about 10 MB fetched)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
PACKAGES=(diffusers msgspec structlog starlette uvicorn websockets opentelemetry-api
          opentelemetry-sdk opentelemetry-semantic-conventions ${EXTRA:-})
# The README's recipe: cp312 for x86-64 manylinux; pip matches each manylinux tag exactly.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)

rm -rf .whl
mkdir -p .whl
platform_args=()
for platform in "${PLATFORMS[@]}"; do
    platform_args+=(--platform "$platform")
done

for name in "${PACKAGES[@]}"; do
    version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
    if [[ -z "$version" ]]; then
        echo "error: $name is not installed in $PY's environment: cannot pin its version" >&2
        exit 1
    fi
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platform_args[@]}" -d .whl "$name==$version"
done

# This project, as a pure-Python wheel (no dependencies: the machine has or gets them above).
# Built from a copy of the working tree without setup.py, which only adds the optional C
# accelerator: with it the wheel is tagged for this venv's CPython (cp311) and pip on the
# device's Python 3.12 refuses it; without it wantel uses the same pure-Python framing check.
# Copied from the working tree, not from a commit: the device runs the code as it is here.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp pyproject.toml README.md "$stage"/
for package in wantel telemetry inference exporters dashboards; do
    (git ls-files -co --exclude-standard -- "$package"; true) | grep -v '\.so$' | \
        while read -r file; do [[ -f "$file" ]] && install -D -m 0644 "$file" "$stage/$file"; done
done
"$PY" -m pip wheel -q --no-deps -w .whl "$stage"
ls .whl/wan_telemetry-*-py3-none-any.whl >/dev/null  # pure, or stop here

echo "fetched into .whl/:"
ls -l .whl | awk 'NR > 1 {printf "  %10d  %s\n", $5, $9}'
total=$(du -sb .whl | cut -f1)
echo "  total $total bytes ($((total / 1024 / 1024)) MiB); the tree that travels must stay under 64 MiB"
