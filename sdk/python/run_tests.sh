#!/usr/bin/env bash
# The Python SDK's tests: creates (or reuses) a venv at target/py-venv, installs the pinned dev
# dependencies and the SDK (editable), then runs pytest. Arguments go to pytest.
#   MODELPOOL_SIDECAR_BIN=PATH      test against this sidecar binary instead of building one
#   MODELPOOL_REQUIRE_SIDECAR=1     fail (instead of skip) the sidecar tests when none can be had
#   MODELPOOL_SKIP_CARGO_BUILD=1    use target/debug/modelpool-sidecar as it is
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${MODELPOOL_PY_VENV:-$repo/target/py-venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.modelpool-dev-stamp"
want="$(cat "$here/requirements-dev.txt" "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements-dev.txt"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e "$here"
  echo "$want" > "$stamp"
fi

cd "$here"
exec "$venv/bin/python" -m pytest "$@"
