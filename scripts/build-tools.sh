#!/usr/bin/env bash
# Builds the pinned tools the end-to-end tests run against: kube-apiserver, etcd,
# helm, promtool and prometheus, from the Go modules under tests/tools/*/go.mod,
# with the machine's Go.
#
# `scripts/build-tools.sh node` builds the parts of a real node instead (tests/tests/node.rs):
# kubelet, kube-controller-manager and kube-scheduler (tests/tools/node, the same Kubernetes
# release), containerd + its runc shim + ctr (tests/tools/containerd), a tiny static pause
# binary, and runc, the CNI plugins and busybox from pinned Debian packages
# (tests/tools/node/debian-packages.txt, fetched with apt-get download, unpacked with dpkg-deb).
# They go to their own cache folder (.../modelpool/node-tools/<stamp>/bin), so the default
# set's stamp and cache do not change when a node pin does.
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
# Usage: scripts/build-tools.sh [node] [--stamp]   (--stamp: print the stamp and exit)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="$root/tests/tools"

# Bump when the way binaries are built changes (flags, tags), to force a rebuild.
build_rev=1
# Prometheus and promtool keep only the service discoveries the tests and the runbook use
# (static, file, http always; kubernetes). The cloud SDKs of the others were most of the build:
# 151 s instead of 339 s with an empty Go build cache on 2 cores. Part of the default set's
# stamp, so changing it rebuilds that set and not the node's.
prom_tags="netgo remove_all_sd enable_kubernetes_sd"

set_name=default
if [[ "${1:-}" == "node" ]]; then
  set_name=node
  shift
fi

if [[ $set_name == default ]]; then
  files=({etcd,helm,kubernetes,prometheus}/go.mod {etcd,helm,kubernetes,prometheus}/go.sum)
else
  files=({containerd,node}/go.mod {containerd,node}/go.sum node/debian-packages.txt)
fi
stamp=$(
  cd "$tools"
  {
    echo "build_rev=$build_rev"
    [[ $set_name == default ]] && echo "prom_tags=$prom_tags"
    for f in "${files[@]}"; do echo "== $f"; cat "$f"; done
  } |
    sha256sum | cut -c1-16
)
if [[ "${1:-}" == "--stamp" ]]; then
  echo "$stamp"
  exit 0
fi

cache="${XDG_CACHE_HOME:-$HOME/.cache}/modelpool"
if [[ $set_name == default ]]; then
  bin="${MODELPOOL_TOOLS_BIN:-$cache/tools/$stamp/bin}"
else
  bin="${MODELPOOL_NODE_TOOLS_BIN:-$cache/node-tools/$stamp/bin}"
fi
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

build() { # <binary name> <module dir> <package> [extra ldflags...]   ($tags: build tags)
  local name=$1 dir=$2 pkg=$3
  shift 3
  if [[ -x "$bin/$name" ]]; then
    log "$name: cached ($bin/$name)"
    return
  fi
  log "$name: building $pkg ..."
  local start=$SECONDS tmp="$bin/.$name.tmp.$$"
  go build -C "$tools/$dir" -trimpath -tags "${tags:-netgo}" -ldflags="-s -w $*" -o "$tmp" "$pkg"
  mv -f "$tmp" "$bin/$name"
  log "$name: built in $((SECONDS - start))s"
}

# Several main packages of one module in one `go build`: each package is compiled once for all
# of them (kubelet, kube-controller-manager and kube-scheduler share most of Kubernetes) and the
# links, each single-threaded, run side by side. The binaries are named after their packages.
build_together() { # <module dir> <ldflags> <package>...   ($tags: build tags)
  local dir=$1 ld=$2
  shift 2
  local pkg name missing=() pkgs=()
  for pkg; do
    name=${pkg##*/}
    if [[ -x "$bin/$name" ]]; then
      log "$name: cached ($bin/$name)"
    else
      missing+=("$name")
      pkgs+=("$pkg")
    fi
  done
  ((${#pkgs[@]})) || return 0
  log "${missing[*]}: building together ..."
  local start=$SECONDS tmp="$bin/.together.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  go build -C "$tools/$dir" -trimpath -tags "${tags:-netgo}" -ldflags="-s -w $ld" -o "$tmp/" "${pkgs[@]}"
  for name in "${missing[@]}"; do
    mv -f "$tmp/$name" "$bin/$name"
  done
  rm -rf "$tmp"
  log "${missing[*]}: built in $((SECONDS - start))s"
}

total=$SECONDS

k8s=$(pinned kubernetes k8s.io/kubernetes) # v1.37.2
k8s_minor=$(echo "$k8s" | cut -d. -f2)
k8s_ld=()
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ld+=("-X $p.gitVersion=$k8s" "-X $p.gitMajor=1" "-X $p.gitMinor=$k8s_minor"
    "-X $p.gitTreeState=clean" "-X $p.buildDate=1970-01-01T00:00:00Z")
done

if [[ $set_name == node ]]; then
  build_together node "${k8s_ld[*]}" k8s.io/kubernetes/cmd/{kubelet,kube-controller-manager,kube-scheduler}

  ctd=$(pinned containerd github.com/containerd/containerd/v2)
  ctd_ld="-X github.com/containerd/containerd/v2/version.Version=$ctd -X github.com/containerd/containerd/v2/version.Revision=$ctd"
  tags="netgo no_btrfs no_devmapper no_zfs no_aufs" \
    build_together containerd "$ctd_ld" github.com/containerd/containerd/v2/cmd/{containerd,containerd-shim-runc-v2,ctr}
  # The sandbox ("pause") container's process: sleeps, reaps children, exits on TERM/INT.
  build pause node ./pause

  # runc, the CNI plugins and busybox: pinned Debian packages, unpacked (no install).
  debs="$bin/../debs"
  mkdir -p "$debs"
  while read -r pkg paths; do
    [[ -z "$pkg" || "$pkg" == \#* ]] && continue
    name=${pkg%%=*}
    if [[ -e "$bin/.$name.done" ]]; then
      log "$name: cached"
      continue
    fi
    log "$name: apt-get download $pkg"
    rm -f "$debs/${name}_"*.deb
    if ! (cd "$debs" && apt-get download -q "$pkg" >&2); then
      log "apt-get download $pkg failed; running apt-get update once"
      apt-get update -q >&2
      (cd "$debs" && apt-get download -q "$pkg" >&2)
    fi
    rm -rf "$debs/$name.x"
    dpkg-deb -x "$debs/${name}_"*.deb "$debs/$name.x"
    for p in $paths; do
      cp -f "$debs/$name.x/$p" "$bin/"
    done
    touch "$bin/.$name.done"
  done <"$tools/node/debian-packages.txt"
  log "done in $((SECONDS - total))s"
  echo "$bin"
  exit 0
fi

build kube-apiserver kubernetes k8s.io/kubernetes/cmd/kube-apiserver "${k8s_ld[@]}"

build etcd etcd go.etcd.io/etcd/server/v3

helm=$(pinned helm helm.sh/helm/v4)
build helm helm helm.sh/helm/v4/cmd/helm "-X helm.sh/helm/v4/internal/version.version=$helm"

# The Go module tags Prometheus 3.x.y as v0.3xx.y: v0.316.0 is 3.16.0.
prom=$(pinned prometheus github.com/prometheus/prometheus)
prom_minor=$(echo "$prom" | cut -d. -f2)
prom_version="$((prom_minor / 100)).$((prom_minor % 100)).$(echo "$prom" | cut -d. -f3)"
prom_ld="-X github.com/prometheus/common/version.Version=$prom_version -X github.com/prometheus/common/version.Branch=HEAD"
tags="$prom_tags" build_together prometheus "$prom_ld" github.com/prometheus/prometheus/cmd/{promtool,prometheus}

log "done in $((SECONDS - total))s"
echo "$bin"
