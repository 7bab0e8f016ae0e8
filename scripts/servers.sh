#!/usr/bin/env bash
# Installs the pinned model servers the server drivers' tests run against (sidecar/tests/
# kserve.rs, ollama.rs), cached outside the tree so that CI pays the install once:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/modelpool/servers/<server>-<stamp>
# where <stamp> hashes the pins (changing a pin installs anew). An install that did not
# finish (no .complete marker) is removed and done again.
#
#   scripts/servers.sh mlserver   MLServer 1.7.1 in a venv (tests/servers/mlserver/*.txt);
#                                 prints the venv's bin folder (…/bin/mlserver)
#   scripts/servers.sh ollama     Ollama v0.17.4 built from its Go module with cgo
#                                 (tests/servers/ollama/go.mod; llama.cpp's vendor headers from
#                                 the pins in pins.txt; ≈5 min cold on 2 cores) and a tiny
#                                 llama GGUF written by tiny_gguf.py; prints the folder holding
#                                 bin/ollama and tiny.gguf
#
# Progress goes to stderr; the only line on stdout is the folder, so callers can do
#   bin=$(scripts/servers.sh mlserver | tail -n1)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/modelpool/servers"
mkdir -p "$cache"
log() { printf 'servers: %s\n' "$*" >&2; }

mlserver() {
  local pins="$root/tests/servers/mlserver"
  local stamp
  stamp=$(cat "$pins/requirements.txt" "$pins/constraints.txt" | sha256sum | cut -c1-16)
  local venv="$cache/mlserver-$stamp"
  exec 9>"$cache/mlserver.lock"
  flock 9
  if [[ -f "$venv/.complete" ]]; then
    log "mlserver: cached ($venv)"
  else
    log "mlserver: installing into $venv (a few minutes the first time)"
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      -r "$pins/requirements.txt" -c "$pins/constraints.txt" >&2
    "$venv/bin/mlserver" --version >&2
    touch "$venv/.complete"
  fi
  echo "$venv/bin"
}

ollama() {
  local pins="$root/tests/servers/ollama"
  local stamp
  stamp=$(cd "$pins" && cat go.mod go.sum pins.txt tiny_gguf.py | sha256sum | cut -c1-16)
  local dir="$cache/ollama-$stamp"
  exec 9>"$cache/ollama.lock"
  flock 9
  if [[ -f "$dir/.complete" ]]; then
    log "ollama: cached ($dir)"
    echo "$dir"
    return
  fi
  local started=$SECONDS
  rm -rf "$dir"
  mkdir -p "$dir/src" "$dir/include/miniaudio" "$dir/bin"
  local kind spec
  while read -r kind spec; do
    case "$kind" in
      deb)
        log "ollama: apt-get download $spec"
        if ! (cd "$dir/src" && apt-get download -q "$spec" >&2); then
          log "apt-get download $spec failed; running apt-get update once"
          apt-get update -q >&2
          (cd "$dir/src" && apt-get download -q "$spec" >&2)
        fi
        ;;
      sdist)
        log "ollama: pip download $spec (sdist)"
        "${PYTHON:-python3}" -m pip download --quiet --disable-pip-version-check \
          --no-binary :all: --no-deps -d "$dir/src" "$spec" >&2
        ;;
    esac
  done < <(grep -E '^(deb|sdist) ' "$pins/pins.txt")
  local deb
  for deb in "$dir/src"/*.deb; do
    dpkg-deb -x "$deb" "$dir/src/debs"
  done
  tar -xzf "$dir/src"/miniaudio-*.tar.gz -C "$dir/src"
  cp "$(find "$dir/src" -path '*/miniaudio/miniaudio.h' | head -n 1)" "$dir/include/miniaudio/"
  local include="$dir/include:$dir/src/debs/usr/include"
  log "ollama: go build github.com/ollama/ollama (cgo: llama.cpp; a few minutes)"
  (
    cd "$pins"
    # -O1 without -g for cgo's C/C++ (Go's default is "-O2 -g"): 2.5x less compiler CPU on
    # llama.cpp's files, for a server that only ever runs a tiny test model. ggml's CPU kernels
    # keep the -O3 their own #cgo line sets (it comes after these flags).
    GOTOOLCHAIN=local GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=1 \
      CGO_CFLAGS="-O1" CGO_CXXFLAGS="-O1" \
      CPLUS_INCLUDE_PATH="$include" C_INCLUDE_PATH="$include" \
      nice -n 5 go build -trimpath -o "$dir/bin/ollama" github.com/ollama/ollama
  )
  "$dir/bin/ollama" --version >&2 || true
  log "ollama: the tiny GGUF model (tiny_gguf.py)"
  "${PYTHON:-python3}" -m venv "$dir/venv"
  grep -E '^pip ' "$pins/pins.txt" | cut -d' ' -f2 >"$dir/src/requirements.txt"
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    -r "$dir/src/requirements.txt" >&2
  "$dir/venv/bin/python" "$pins/tiny_gguf.py" "$dir/tiny.gguf"
  rm -rf "$dir/src"
  touch "$dir/.complete"
  log "ollama: done in $((SECONDS - started)) s"
  echo "$dir"
}

case "${1:-}" in
  mlserver) mlserver ;;
  ollama) ollama ;;
  *)
    echo "usage: $0 mlserver|ollama" >&2
    exit 2
    ;;
esac
