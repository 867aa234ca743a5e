#!/usr/bin/env bash
# The device-machine run of benchmarks/gpu_check2.py (issue 21; docs/gpu-check.md, "Round two").
# First, here: scripts/fetch_device_wheels.sh (it carries starlette and uvicorn for `wantel
# serve` too). Then one call of the device tool:
#   run(command="bash benchmarks/gpu_check2.sh", carry=[".whl"], timeout_s=560)
# Arguments pass through, e.g. `bash benchmarks/gpu_check2.sh --rounds 20 --oom-size 2048`.
# The line below is also the literal command (under 2000 characters) if the file is not used.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH || exit; set -o pipefail; nvidia-smi --query-gpu=name,uuid,driver_version,memory.used,memory.total,temperature.gpu,clocks.sm --format=csv; PYTHONUNBUFFERED=1 timeout -k 10 470 python3 benchmarks/gpu_check2.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check2.log"
