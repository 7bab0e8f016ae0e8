#!/usr/bin/env bash
# Builds the pinned tools the end-to-end tests run against: kube-apiserver, etcd,
# helm, promtool and prometheus, from the Go modules under tests/tools/*/go.mod,
# with the machine's Go.
#
# The binaries go to a cache folder outside the repository, so a fresh clone (CI)
# reuses them:
#   ${MODELPOOL_TOOLS_BIN:-$HOME/.cache/modelpool/tools/<stamp>/bin}
# where <stamp> is a hash of the go.mod/go.sum files (changing a pin rebuilds).
# A binary that is already there is not built again.
#
# Progress goes to stderr; the only line on stdout is the bin folder, so callers
# can do: bin=$(scripts/build-tools.sh | tail -n1)
#
# Usage: scripts/build-tools.sh [--stamp]   (--stamp: print the stamp and exit)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="$root/tests/tools"

# Bump when the way binaries are built changes (flags, tags), to force a rebuild.
build_rev=1

stamp=$(
  cd "$tools"
  { echo "build_rev=$build_rev"; for f in */go.mod */go.sum; do echo "== $f"; cat "$f"; done; } |
    sha256sum | cut -c1-16
)
if [[ "${1:-}" == "--stamp" ]]; then
  echo "$stamp"
  exit 0
fi

bin="${MODELPOOL_TOOLS_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/modelpool/tools/$stamp/bin}"
mkdir -p "$bin"

log() { printf 'build-tools: %s\n' "$*" >&2; }

# The version a module is pinned at, read from go.mod.
pinned() { # <module dir> <module path>
  awk -v m="$2" '$1 == "require" && $2 == m { print $3 } $1 == m { print $2 }' "$tools/$1/go.mod" | head -n1
}

export GOTOOLCHAIN=local CGO_ENABLED=0
export GOFLAGS="-mod=mod -buildvcs=false"

# One build at a time per bin folder (test binaries may start in parallel).
exec 9>"$bin/.lock"
flock 9

build() { # <binary name> <module dir> <package> [extra ldflags...]
  local name=$1 dir=$2 pkg=$3
  shift 3
  if [[ -x "$bin/$name" ]]; then
    log "$name: cached ($bin/$name)"
    return
  fi
  log "$name: building $pkg ..."
  local start=$SECONDS tmp="$bin/.$name.tmp.$$"
  go build -C "$tools/$dir" -trimpath -tags netgo -ldflags="-s -w $*" -o "$tmp" "$pkg"
  mv -f "$tmp" "$bin/$name"
  log "$name: built in $((SECONDS - start))s"
}

total=$SECONDS

k8s=$(pinned kubernetes k8s.io/kubernetes) # v1.37.2
k8s_minor=$(echo "$k8s" | cut -d. -f2)
k8s_ld=()
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ld+=("-X $p.gitVersion=$k8s" "-X $p.gitMajor=1" "-X $p.gitMinor=$k8s_minor"
    "-X $p.gitTreeState=clean" "-X $p.buildDate=1970-01-01T00:00:00Z")
done
build kube-apiserver kubernetes k8s.io/kubernetes/cmd/kube-apiserver "${k8s_ld[@]}"

build etcd etcd go.etcd.io/etcd/server/v3

helm=$(pinned helm helm.sh/helm/v4)
build helm helm helm.sh/helm/v4/cmd/helm "-X helm.sh/helm/v4/internal/version.version=$helm"

# The Go module tags Prometheus 3.x.y as v0.3xx.y: v0.316.0 is 3.16.0.
prom=$(pinned prometheus github.com/prometheus/prometheus)
prom_minor=$(echo "$prom" | cut -d. -f2)
prom_version="$((prom_minor / 100)).$((prom_minor % 100)).$(echo "$prom" | cut -d. -f3)"
prom_ld="-X github.com/prometheus/common/version.Version=$prom_version -X github.com/prometheus/common/version.Branch=HEAD"
build promtool prometheus github.com/prometheus/prometheus/cmd/promtool "$prom_ld"
build prometheus prometheus github.com/prometheus/prometheus/cmd/prometheus "$prom_ld"

log "done in $((SECONDS - total))s"
echo "$bin"
