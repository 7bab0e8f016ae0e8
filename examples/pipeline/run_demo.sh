#!/usr/bin/env bash
# The seed's video pipeline (t2v -> upscale -> frame_interpolation) on ModelPool, end to end:
# starts the sidecar standalone with examples/pools/cogvideo.yaml on a temporary socket, runs the
# pipeline against it, prints the seed's memory table from measured numbers, checks that RAM
# ends within 10 % of idle, and stops the sidecar. `--help` prints the usage below.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
target="${CARGO_TARGET_DIR:-$repo/target}"
venv="${MODELPOOL_DEMO_VENV:-$target/demo-venv}"
pool="${MODELPOOL_DEMO_POOL:-$repo/examples/pools/cogvideo.yaml}"

usage() {
  cat <<'USAGE'
Usage: examples/pipeline/run_demo.sh [--local] [PIPELINE OPTIONS]

Runs the seed's video pipeline (t2v -> upscale -> frame_interpolation) on ModelPool and prints
the memory table (idle / generating / after use) from measured numbers; exits 1 unless RAM ends
within 10 % of idle.

Options:
  --local          no sidecar: the same pool's policy runs in-process
  --scale N        model sizes (1 = 64 + 160 + 96 MiB of weights)
  --frames N       frames per video (default 16)
  --jobs N         videos to generate, one after the other (default 1)
  --backend B      auto | numpy | torch
  --device D       auto | cpu | cuda
  --mode M         pool | aggressive | cache
  --report FILE    write the measurements as JSON
  -h, --help       print this help

Environment:
  MODELPOOL_SIDECAR_BIN   a prebuilt modelpool-sidecar to run (default: build it with cargo)
  MODELPOOL_DEMO_POOL     the pool file (default: examples/pools/cogvideo.yaml)
  MODELPOOL_DEMO_VENV     the Python virtualenv to use or create (default: target/demo-venv)
  PYTHON                  the Python that creates the virtualenv (default: python3)
USAGE
}

local_mode=0
args=()
for arg in "$@"; do
  case "$arg" in
    --local) local_mode=1 ;;
    -h|--help) usage; exit 0 ;;
    *) args+=("$arg") ;;
  esac
done

say() { printf '==> %s\n' "$*" >&2; }

# 1. the Python side: a venv with the SDK and the pinned numpy/safetensors
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
stamp="$venv/.modelpool-demo-stamp"
want="$(cat examples/pipeline/requirements.txt sdk/python/pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing the SDK and the demo's pinned dependencies"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r examples/pipeline/requirements.txt
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e sdk/python
  echo "$want" > "$stamp"
fi

if [ "$local_mode" = 1 ]; then
  say "local mode: no sidecar, the pool's policy runs in-process ($pool)"
  MODELPOOL_SOCKET=none MODELPOOL_POOL="$pool" \
    exec "$venv/bin/python" examples/pipeline/pipeline.py --check ${args[@]+"${args[@]}"}
fi

# 2. the sidecar, standalone on a temporary socket: a prebuilt one, or built here
if [ -n "${MODELPOOL_SIDECAR_BIN:-}" ]; then
  sidecar="$MODELPOOL_SIDECAR_BIN"
  [ -x "$sidecar" ] || { echo "error: MODELPOOL_SIDECAR_BIN=$sidecar is not an executable file" >&2; exit 1; }
  say "using the prebuilt sidecar $sidecar"
else
  command -v cargo >/dev/null || {
    echo "error: cargo is not installed: install Rust, or set MODELPOOL_SIDECAR_BIN to a prebuilt modelpool-sidecar" >&2
    exit 1
  }
  say "building the sidecar (cargo build -p modelpool-sidecar)"
  cargo build -p modelpool-sidecar
  sidecar="$target/debug/modelpool-sidecar"
  [ -x "$sidecar" ] || { echo "error: $sidecar was not built" >&2; exit 1; }
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/modelpool-demo.XXXXXX")"
sock="$tmp/sidecar.sock"
sidecar_pid=""
cleanup() {
  if [ -n "$sidecar_pid" ] && kill -0 "$sidecar_pid" 2>/dev/null; then
    kill -TERM "$sidecar_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$sidecar_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$sidecar_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

say "starting the sidecar: $sidecar --pool $pool --socket $sock"
"$sidecar" --pool "$pool" --socket "$sock" --metrics-listen 127.0.0.1:0 >"$tmp/sidecar.log" 2>&1 &
sidecar_pid=$!
ready=0
for _ in $(seq 1 600); do
  if ! kill -0 "$sidecar_pid" 2>/dev/null; then break; fi
  if [ -S "$sock" ] && "$venv/bin/python" -c 'import sys; from modelpool._http import SidecarHTTP; sys.exit(0 if SidecarHTTP(sys.argv[1]).reachable() else 1)' "$sock"; then
    ready=1; break
  fi
  sleep 0.1
done
if [ "$ready" != 1 ]; then
  echo "error: the sidecar did not come up; its log:" >&2
  cat "$tmp/sidecar.log" >&2
  exit 1
fi

# 3. the pipeline, through the sidecar
status=0
MODELPOOL_SOCKET="$sock" "$venv/bin/python" examples/pipeline/pipeline.py --check ${args[@]+"${args[@]}"} || status=$?
if [ "$status" != 0 ]; then
  echo "--- sidecar log (last 40 lines) ---" >&2
  tail -n 40 "$tmp/sidecar.log" >&2
fi
say "stopping the sidecar"
exit "$status"
