#!/usr/bin/env bash
# Times a CI run as a fresh machine makes it: `.ci/run` on a clean clone of a commit, with every
# cache the test command fills pointed at an empty folder, so that everything is fetched and built
# from nothing: the Go tools and node tools (GOPATH, GOMODCACHE, GOCACHE), the model servers and
# Python venvs (XDG_CACHE_HOME, which also holds pip's cache and modelpool's own caches), the
# crates (CARGO_HOME: the registry index and the downloaded crates) and the Rust build
# (CARGO_TARGET_DIR). What a fresh machine already has is used as it is: the Rust toolchain
# (rustup), Go, Python, the Debian package lists and the machine's package mirrors.
#
# Usage: scripts/fresh-ci.sh [commit]   (default HEAD)
#   MODELPOOL_FRESH_DIR   where the clone and the caches go (default: a new folder under /tmp);
#                         removed at the end unless MODELPOOL_FRESH_KEEP=1
#
# It prints the CI output (each step's heading carries the wall and CPU seconds so far, from
# scripts/test.sh), the load average once a minute (other work on the machine makes a run slower
# without making it do more), and at the end the wall time, the CPU time and the disk the caches
# took.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rev=$(git -C "$root" rev-parse "${1:-HEAD}")
dir=${MODELPOOL_FRESH_DIR:-$(mktemp -d /tmp/modelpool-fresh.XXXXXX)}
mkdir -p "$dir"
log() { printf 'fresh-ci: %s\n' "$*"; }

git clone -q "$root" "$dir/clone"
git -C "$dir/clone" checkout -q "$rev"
mkdir -p "$dir/cache" "$dir/cargo-home" "$dir/go"
# The registry settings (mirrors) of this machine's Cargo, if any: a fresh machine has its own.
for f in config.toml config; do
  if [[ -f "${CARGO_HOME:-$HOME/.cargo}/$f" ]]; then
    cp "${CARGO_HOME:-$HOME/.cargo}/$f" "$dir/cargo-home/"
  fi
done

(
  while sleep 60; do log "$(date -u +%H:%M:%S) load average $(cut -d' ' -f1-3 /proc/loadavg)"; done
) &
sampler=$!
trap 'kill "$sampler" 2>/dev/null || true' EXIT

log "commit $rev, caches under $dir, $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
started=$(date +%s)
rc=0
env XDG_CACHE_HOME="$dir/cache" \
  CARGO_HOME="$dir/cargo-home" \
  CARGO_TARGET_DIR="$dir/target" \
  GOPATH="$dir/go" GOMODCACHE="$dir/go/pkg/mod" GOCACHE="$dir/cache/go-build" \
  RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" \
  PATH="$dir/cargo-home/bin:$PATH" \
  bash -c 'cd "$1" && exec .ci/run' _ "$dir/clone" || rc=$?
wall=$(($(date +%s) - started))
log "exit status $rc after $wall s ($((wall / 60)) min) of wall clock, load average now $(cut -d' ' -f1-3 /proc/loadavg)"
log "disk: $(du -sh "$dir/cache" "$dir/go" "$dir/cargo-home" "$dir/target" 2>/dev/null | tr '\t\n' ' ')"
if [[ "${MODELPOOL_FRESH_KEEP:-0}" != 1 ]]; then
  chmod -R u+w "$dir" 2>/dev/null || true
  rm -rf "$dir"
fi
exit "$rc"
