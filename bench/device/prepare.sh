#!/usr/bin/env bash
# Builds what the proxy check on a many-core machine runs, here, in release, and puts it in
# bench/device/bin/ (git-ignored) for the device machine, which has no Rust toolchain:
#
#   bench/device/prepare.sh
#   then, on the device machine: bash bench/device/proxy.sh   (carry bench/device/bin along)
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/release-bins.sh bench/device/bin modelpool-sidecar modelpool-bench
echo "==> ready: run bench/device/proxy.sh on the device machine with bench/device/bin carried along"
