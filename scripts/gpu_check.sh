#!/usr/bin/env bash
# The device-machine run of benchmarks/gpu_check.py (issue #7; see docs/gpu-check.md).
# First, here: scripts/fetch_device_wheels.sh. Then one call of the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Arguments pass through to the check, e.g. `bash scripts/gpu_check.sh --rounds 16`.
# The line below is also the literal command (under 2000 characters) if the file is not used.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; set -o pipefail; nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,temperature.gpu,clocks.sm --format=csv; PYTHONUNBUFFERED=1 timeout -k 10 480 python3 benchmarks/gpu_check.py --json "$OUT/gpu_check.json" "$@" 2>&1 | tee "$OUT/gpu_check.log"
