#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (and TensorRT, where it can be installed): one command that builds the
# tiny preset's engine, validates it and prints parity and latency. See tensorrt_device_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/tensorrt_device_check.py "$@"
