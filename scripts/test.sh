#!/usr/bin/env bash
# Runs every test of the project, building what the tests need first: the pinned Go tools
# (kube-apiserver, etcd, helm, promtool, prometheus; cached outside the tree after the first
# build), the Rust workspace, and the Python SDK's virtualenv. This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
# Each step's heading says how long the run has taken so far (wall clock) and how much CPU the
# steps before used (user + system of the finished children: fields 16 and 17 of
# /proc/<this shell>/stat, in clock ticks), so that a slow CI run shows where its minutes went,
# and a run on a loaded machine can be told apart from one that does more work.
ticks=$(getconf CLK_TCK)
cpu_s() { awk -v hz="$ticks" '{ printf "%d", ($16 + $17) / hz }' "/proc/$$/stat"; }
step() { printf '\n==> [%d s, %d s CPU] %s\n' "$(($(date +%s) - started))" "$(cpu_s)" "$*"; }

# Ollama's first build (cgo: llama.cpp, ≈ 5–10 min) compiles one C++ file at a time, so it
# leaves a core idle: it starts here, in the background, beside the Go tools' and the Rust
# builds, and is waited for before the tests that need it. Cached, it returns at once.
background=$(mktemp -d)
# In a session of its own, so that a run that stops early takes the build's compilers with it.
setsid -w scripts/servers.sh ollama >"$background/ollama.out" 2>"$background/ollama.err" &
ollama_job=$!
trap 'kill -- -"$ollama_job" 2>/dev/null || true; rm -rf "$background"' EXIT
# Waits for a background install (in this shell: only it can wait for its jobs). On failure it
# shows what the install printed and stops the run.
wait_for_background() { # <name> <pid>
  if ! wait "$2"; then
    printf '%s failed to install; what it printed:\n' "$1" >&2
    cat "$background/$1.err" "$background/$1.out" >&2
    exit 1
  fi
  cat "$background/$1.err" >&2
}

step "formatting (cargo fmt --check)"
cargo fmt --all -- --check

step "pinned tools (scripts/build-tools.sh)"
MODELPOOL_TOOLS_BIN=$(scripts/build-tools.sh | tail -n 1)
export MODELPOOL_TOOLS_BIN
echo "tools: $MODELPOOL_TOOLS_BIN"

step "node tools (scripts/build-tools.sh node: kubelet, controllers, containerd, runc, CNI)"
MODELPOOL_NODE_TOOLS_BIN=$(scripts/build-tools.sh node | tail -n 1)
export MODELPOOL_NODE_TOOLS_BIN
echo "node tools: $MODELPOOL_NODE_TOOLS_BIN"

step "MLServer for the driver tests (scripts/servers.sh mlserver; cached after the first time)"
MODELPOOL_MLSERVER_BIN="$(scripts/servers.sh mlserver | tail -n 1)/mlserver"
export MODELPOOL_MLSERVER_BIN
echo "mlserver: $MODELPOOL_MLSERVER_BIN"

# A run stopped while Cargo writes (CI cancelled, kill -9) can leave half-written artifacts of
# the workspace's own crates in a kept target dir, and every later run then fails to link
# ("undefined hidden symbol"). A marker lives there from the first compile to the last; found
# at the start, the workspace's crates are cleaned (their dependencies are kept) and rebuilt. A
# run that fails a compile leaves it too: the next one rebuilds our crates, a few minutes.
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
compiling="$target_dir/.modelpool-compiling"
if [[ -e "$compiling" ]]; then
  echo "a previous run stopped while compiling ($compiling): cleaning the workspace's crates"
  for package in $(cargo metadata --no-deps --format-version 1 --locked |
    python3 -c 'import json, sys; print(*(p["name"] for p in json.load(sys.stdin)["packages"]))'); do
    cargo clean --locked -p "$package"
  done
fi
mkdir -p "$target_dir"
touch "$compiling"

step "lint (cargo clippy --all-targets -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Rust tests (unit, property: ${PROPTEST_CASES:=10000} cases, integration, e2e on a real apiserver)"
export PROPTEST_CASES
cargo build --workspace --bins --locked
# The images for the node test (tests/tests/node.rs), from the binaries just built (debug: the
# release build would add minutes; `scripts/build-images.sh` alone builds release images),
# twice, the second time without the layer cache: the digests must be equal.
MODELPOOL_IMAGES_DIR="$target_dir/images"
export MODELPOOL_IMAGES_DIR
images() { MODELPOOL_IMAGE_PROFILE=debug MODELPOOL_SKIP_CARGO_BUILD=1 scripts/build-images.sh "$@"; }
first=$(images | cut -d' ' -f1-2)
second=$(MODELPOOL_IMAGE_NO_CACHE=1 images 2>/dev/null | cut -d' ' -f1-2)
if [[ "$first" != "$second" ]]; then
  printf 'the images are not reproducible:\n%s\n---\n%s\n' "$first" "$second" >&2
  exit 1
fi
cargo test --workspace --locked --no-run
rm -f "$compiling"

step "Ollama for the driver tests (scripts/servers.sh ollama, built in the background since the start)"
wait_for_background ollama "$ollama_job"
MODELPOOL_OLLAMA_DIR=$(tail -n 1 "$background/ollama.out")
export MODELPOOL_OLLAMA_DIR
echo "ollama: $MODELPOOL_OLLAMA_DIR"

step "cargo test --workspace"
cargo test --workspace --locked

step "Python SDK tests (sdk/python, against the real sidecar)"
MODELPOOL_SIDECAR_BIN="$target_dir/debug/modelpool-sidecar" \
MODELPOOL_REQUIRE_SIDECAR=1 MODELPOOL_SKIP_CARGO_BUILD=1 \
  sdk/python/run_tests.sh -q

step "weights estimates against real writers and loaders (weights/tests/py: gguf, safetensors)"
MODELPOOL_WEIGHTS_BIN="$target_dir/debug/modelpool-weights" \
  target/py-venv/bin/python -m pytest -q weights/tests/py

# libFuzzer runs (nightly + cargo-fuzz, built once) are opt-in until their cold build is timed
# on a fresh CI machine: MODELPOOL_FUZZ_SECONDS=10 scripts/test.sh fuzzes each target 10 s.
step "fuzz targets (fuzz/: corpus replay on stable; ${MODELPOOL_FUZZ_SECONDS:=0} s each under libFuzzer)"
MODELPOOL_FUZZ_SECONDS="$MODELPOOL_FUZZ_SECONDS" scripts/fuzz.sh

step "GPU script logic, without a GPU (tests/gpu)"
target/py-venv/bin/python -m pytest -q tests/gpu

echo
echo "all tests passed in $(( $(date +%s) - started )) s ($(cpu_s) s CPU; load average now: $(cut -d' ' -f1-3 /proc/loadavg))"
