#!/usr/bin/env bash
# The whole GPU check in one command, for the device tool (see README, "Device check"):
#
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=540)
#
# Installs the wheels that benchmarks/prepare_device_wheels.sh put in .whl/ (when carried),
# prints the GPU, then runs benchmarks/device_check.py: correctness of every Pallas GPU kernel,
# then timings within a 7-minute budget. Writes device_check.json, .md and .log to $OUT (the
# device tool's folder that comes back), else to benchmarks/results/. Extra arguments go to
# device_check.py (e.g. --cases gated_delta_rule). Exits 2 when jax sees no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
WHEELS=${DEVICE_CHECK_WHEELS:-.whl}
mkdir -p "$RESULTS"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "device_check: no wheels in $WHEELS/ (bash benchmarks/prepare_device_wheels.sh, then" \
        "carry .whl); jla / fla comparisons will be skipped"
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L
# jax takes 60% of the GPU's memory up front, leaving the rest to torch (fla's kernels).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
export PYTHONUNBUFFERED=1
# A hard stop under the device tool's 540 s: results are saved after every case.
timeout "${DEVICE_CHECK_TIMEOUT_S:-500}" "$PYTHON" -m benchmarks.device_check \
    --out "$RESULTS/device_check.json" "$@" 2>&1 | tee "$RESULTS/device_check.log"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "device_check: stopped at ${DEVICE_CHECK_TIMEOUT_S:-500} s;" \
    "$RESULTS/device_check.json holds the cases finished by then"
exit "$status"
