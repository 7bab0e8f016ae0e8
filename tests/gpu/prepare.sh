#!/usr/bin/env bash
# Builds what the GPU check runs, here (x86-64, no GPU needed), in release, and puts it in
# tests/gpu/bin/ (git-ignored) for the device machine, which has no Rust toolchain:
#
#   tests/gpu/prepare.sh
#   then, on the device machine: tests/gpu/run.sh   (carry tests/gpu/bin along)
#
# The binaries are stripped (the carried tree is limited in size); they load libnvidia-ml and
# libcuda at run time, so nothing CUDA is needed to build them.
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/release-bins.sh tests/gpu/bin modelpool-sidecar modelpool-candle-host
echo "==> ready: run tests/gpu/run.sh on the GPU machine with tests/gpu/bin carried along"
