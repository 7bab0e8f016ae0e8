#!/usr/bin/env bash
# Installs the pinned model servers the server drivers' tests run against (sidecar/tests/
# kserve.rs, ollama.rs), cached outside the tree so that CI pays the install once:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/modelpool/servers/<server>-<stamp>
# where <stamp> hashes the pins (changing a pin installs anew). An install that did not
# finish (no .complete marker) is removed and done again.
#
#   scripts/servers.sh mlserver   MLServer 1.7.1 in a venv (tests/servers/mlserver/*.txt);
#                                 prints the venv's bin folder (…/bin/mlserver)
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

case "${1:-}" in
  mlserver) mlserver ;;
  *)
    echo "usage: $0 mlserver" >&2
    exit 2
    ;;
esac
