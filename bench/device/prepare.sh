#!/usr/bin/env bash
# Builds what the proxy check on a many-core machine runs, here (x86-64), in release, and puts
# it in bench/device/bin/ (git-ignored) for the device machine, which has no Rust toolchain:
#
#   bench/device/prepare.sh
#   then, on the device machine: bash bench/device/proxy.sh   (carry bench/device/bin along)
#
# The binaries are stripped: the carried tree is limited in size.
set -euo pipefail
cd "$(dirname "$0")/../.."

bins=(modelpool-sidecar modelpool-bench)
echo "==> cargo build --release (${bins[*]})"
cargo build --release -p modelpool-sidecar --bin modelpool-sidecar \
    -p modelpool-bench --bin modelpool-bench

target_dir="${CARGO_TARGET_DIR:-}"
if [[ -z "$target_dir" ]]; then
    target_dir="$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
fi
mkdir -p bench/device/bin
for bin in "${bins[@]}"; do
    install -m 0755 "$target_dir/release/$bin" "bench/device/bin/$bin"
    if command -v strip >/dev/null 2>&1; then
        strip "bench/device/bin/$bin"
    fi
done
ls -l bench/device/bin
echo "==> ready: run bench/device/proxy.sh on the device machine with bench/device/bin carried along"
