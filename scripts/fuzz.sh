#!/usr/bin/env bash
# The fuzz targets (fuzz/): replays the committed corpus through every target on stable Rust,
# then, when a nightly toolchain is there, runs each target under libFuzzer (cargo-fuzz, pinned,
# installed once under ~/.cache/modelpool) for MODELPOOL_FUZZ_SECONDS seconds (default 20; the test command: 0;
# 0 = replay only). New inputs go to a scratch corpus, never into the tree; a crash fails the
# run and names its input.
#   scripts/fuzz.sh [TARGET...]      (default: all targets)
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds="${MODELPOOL_FUZZ_SECONDS:-20}"
cache="${MODELPOOL_CACHE:-$HOME/.cache/modelpool}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(pool_yaml quantity duration pod_report safetensors gguf)
fi

echo "fuzz: replaying fuzz/corpus through every target (stable)"
cargo test --manifest-path fuzz/Cargo.toml --no-default-features --locked -q

if [ "$seconds" = 0 ]; then
  echo "fuzz: MODELPOOL_FUZZ_SECONDS=0: corpus replay only"
  exit 0
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: no nightly toolchain here: corpus replay only (libFuzzer needs nightly)"
  exit 0
fi
fuzz_bin="$cache/cargo-fuzz-$CARGO_FUZZ_VERSION/bin"
if [ ! -x "$fuzz_bin/cargo-fuzz" ]; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION into $fuzz_bin"
  cargo install --locked --quiet cargo-fuzz --version "=$CARGO_FUZZ_VERSION" --root "${fuzz_bin%/bin}"
fi
export PATH="$fuzz_bin:$PATH"

# Its own target dir: instrumented builds must not evict the workspace's.
fuzz_target_dir="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# No sanitizer: the code under test is safe Rust (unsafe_code = "deny"); coverage guidance and
# panics are what count, and an uninstrumented-for-ASan build is twice as fast.
for target in "${targets[@]}"; do
  cargo +nightly fuzz build --sanitizer none --target-dir "$fuzz_target_dir" "$target"
done
total=0
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target" "$scratch/artifacts/$target"
  echo "fuzz: $target for ${seconds}s"
  if ! cargo +nightly fuzz run --sanitizer none --target-dir "$fuzz_target_dir" "$target" \
      "$scratch/$target" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=1024 -timeout=10 \
      -artifact_prefix="$scratch/artifacts/$target/" -print_final_stats=1 2>"$scratch/$target.log"; then
    tail -n 40 "$scratch/$target.log"
    mkdir -p fuzz/artifacts/"$target"
    cp "$scratch/artifacts/$target"/* fuzz/artifacts/"$target"/ 2>/dev/null || true
    echo "fuzz: $target FAILED; its input is under fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E "stat::number_of_executed_units|stat::new_units_added" "$scratch/$target.log" | sed "s/^/  $target /"
  total=$((total + seconds))
done
echo "fuzz: ${#targets[@]} targets, ${total}s of libFuzzer in all, no failure"
