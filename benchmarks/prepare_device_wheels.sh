#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the Python 3.12 manylinux x86_64 wheels that the GPU
# machine lacks (see the device tool's KINDS.md package list): this project's install_requires
# that are not there, with their missing dependencies, at the exact pins of
# requirements/py3.12.txt, plus jax-linear-attention (jla) and flash-linear-attention (fla) for
# the comparison columns of benchmarks/device_check.py. Run here, online, from the repo root;
# then carry ".whl" to the device (benchmarks/device_check.sh installs them there).
#
#   bash benchmarks/prepare_device_wheels.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-${PYTHON:-python3}}
# Missing there, with the dependencies that are missing too (array_record, portpicker: grain's;
# ml_collections needs absl-py and PyYAML, tensorboardX numpy / packaging / protobuf: all there).
PINNED=(grain array_record portpicker ml_collections tensorboardX)
# Not pinned by this project: the comparison kernels. jla needs jax==0.11.2 (the device's),
# equinox, optax, safetensors; fla-core needs einops, torch, triton: all there.
EXTRA=(jax-linear-attention==0.1.0 fla-core==0.6.0 flash-linear-attention==0.6.0)

specs=()
for name in "${PINNED[@]}"; do
    pin=$(grep -i -E "^${name}==" requirements/py3.12.txt) || {
        echo "prepare_device_wheels: $name is not pinned in requirements/py3.12.txt" >&2
        exit 1
    }
    specs+=("$pin")
done
specs+=("${EXTRA[@]}")

rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
for spec in "${specs[@]}"; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d .whl "$spec"
done
ls -l .whl
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "prepare_device_wheels: $(ls .whl/*.whl | wc -l) wheels, $((total / 1024)) KiB in .whl/" \
    "(the working tree and carried paths travel within 64 MiB)"
