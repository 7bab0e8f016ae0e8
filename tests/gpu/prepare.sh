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

bins=(modelpool-sidecar modelpool-candle-host)
echo "==> cargo build --release (${bins[*]})"
cargo build --release -p modelpool-sidecar --bin modelpool-sidecar \
    -p modelpool-candle-host --bin modelpool-candle-host

target_dir="${CARGO_TARGET_DIR:-}"
if [[ -z "$target_dir" ]]; then
    target_dir="$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
fi
mkdir -p tests/gpu/bin
for bin in "${bins[@]}"; do
    install -m 0755 "$target_dir/release/$bin" "tests/gpu/bin/$bin"
    if command -v strip >/dev/null 2>&1; then
        strip "tests/gpu/bin/$bin"
    fi
done
ls -l tests/gpu/bin
echo "==> ready: run tests/gpu/run.sh on the GPU machine with tests/gpu/bin carried along"
