#!/usr/bin/env bash
# Builds workspace binaries in release here (x86-64) and puts stripped copies in a folder, for
# a machine without a Rust toolchain (the device machine; its carried tree is limited in size):
#
#   scripts/release-bins.sh DEST BIN...   (each BIN is a package's binary of the same name)
#
# Used by tests/gpu/prepare.sh and bench/device/prepare.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if (($# < 2)); then
    echo "usage: scripts/release-bins.sh DEST BIN..." >&2
    exit 2
fi
dest="$1"
shift
bins=("$@")
packages=()
for bin in "${bins[@]}"; do
    packages+=(-p "$bin" --bin "$bin")
done
echo "==> cargo build --release (${bins[*]})"
cargo build --release "${packages[@]}"

target_dir="${CARGO_TARGET_DIR:-}"
if [[ -z "$target_dir" ]]; then
    target_dir="$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
fi
mkdir -p "$dest"
for bin in "${bins[@]}"; do
    install -m 0755 "$target_dir/release/$bin" "$dest/$bin"
    if command -v strip >/dev/null 2>&1; then
        strip "$dest/$bin"
    fi
done
ls -l "$dest"
