#!/usr/bin/env bash
# Builds the container images here, without a Docker daemon and without pulling from an
# image registry, as OCI archives (docker/podman/skopeo/ctr can load them):
#
#   target/images/modelpool-operator.tar  ghcr.io/modelpool/modelpool-operator:<appVersion>
#   target/images/modelpool-sidecar.tar   ghcr.io/modelpool/modelpool-sidecar:<appVersion>
#   target/images/modelpool-testapp.tar   modelpool.local/modelpool-testapp:<appVersion>
#                                         (tests only: modelpool-memhog + busybox)
#
# Each is the release binary (`cargo build --release`) on a base assembled from the pinned
# Debian packages of images/base-packages.txt (the libraries a distroless "cc" base has),
# running as uid 65532 with the binary in /usr/local/bin (on PATH). images/Dockerfile builds
# the same images with Docker (what the release workflow pushes).
#
# Reproducible: the same binaries and packages give the same digests (checked by running it
# twice: the digests printed are equal). Prints each image's reference, digest and size.
#
# Environment:
#   MODELPOOL_IMAGE_PROFILE  cargo profile of the binaries (default: release; the node test
#                            may use "debug" to reuse the test command's build)
#   MODELPOOL_IMAGES_DIR     output folder (default: target/images under the repository)
#   CARGO_TARGET_DIR         where cargo builds (as cargo reads it)
#   MODELPOOL_SKIP_CARGO_BUILD=1  use the binaries already built
#   MODELPOOL_IMAGE_NO_CACHE=1    build the base layers again instead of reusing them
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

log() { printf 'build-images: %s\n' "$*" >&2; }

profile=${MODELPOOL_IMAGE_PROFILE:-release}
target_dir=${CARGO_TARGET_DIR:-$root/target}
out=${MODELPOOL_IMAGES_DIR:-$root/target/images}
version=$(awk '$1 == "appVersion:" { gsub(/"/, "", $2); print $2 }' charts/modelpool/Chart.yaml)
[[ -n "$version" ]] || { log "no appVersion in charts/modelpool/Chart.yaml"; exit 1; }
case "$(dpkg --print-architecture)" in
  amd64) arch=amd64 ;;
  arm64) arch=arm64 ;;
  *) log "unsupported architecture $(dpkg --print-architecture)"; exit 1 ;;
esac

# 1. The binaries.
bins=(modelpool-operator modelpool-sidecar modelpool-memhog)
if [[ "${MODELPOOL_SKIP_CARGO_BUILD:-}" != 1 ]]; then
  flag=()
  [[ $profile == release ]] && flag=(--release)
  [[ $profile != release && $profile != debug ]] && flag=(--profile "$profile")
  log "cargo build ${flag[*]} (operator, sidecar, memhog)"
  cargo build "${flag[@]}" --locked -p modelpool-operator -p modelpool-sidecar --bins >&2
fi
bindir="$target_dir/$profile"
for b in "${bins[@]}"; do
  [[ -x "$bindir/$b" ]] || { log "$bindir/$b is missing (cargo build failed?)"; exit 1; }
done

# 2. The pinned Debian packages (cached: a package is downloaded once).
debs="${XDG_CACHE_HOME:-$HOME/.cache}/modelpool/image-debs/$arch"
mkdir -p "$debs"
fetch() { # <package=version> -> prints the .deb path
  local pkg=$1 name=${1%%=*} ver=${1#*=}
  local file="$debs/${name}_${ver//:/%3a}_"
  local found
  found=$(ls "$file"*.deb 2>/dev/null | head -n1 || true)
  if [[ -z "$found" ]]; then
    log "apt-get download $pkg:$arch"
    if ! (cd "$debs" && apt-get download -q "$name:$arch=$ver" >&2); then
      log "apt-get download failed; apt-get update once, then again"
      apt-get update -q >&2
      (cd "$debs" && apt-get download -q "$name:$arch=$ver" >&2)
    fi
    found=$(ls "$file"*.deb | head -n1)
  fi
  echo "$found"
}
base_debs=()
extra_debs=()
while read -r pkg role; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  deb=$(fetch "$pkg")
  if [[ "${role:-base}" == testapp ]]; then
    extra_debs+=(--deb "$deb")
  else
    base_debs+=(--deb "$deb")
  fi
done <images/base-packages.txt

# 3. The images.
export SOURCE_DATE_EPOCH=0
labels=(
  --label "org.opencontainers.image.source=https://example.invalid/modelpool"
  --label "org.opencontainers.image.version=$version"
  --label "org.opencontainers.image.licenses=Apache-2.0"
  --label "org.opencontainers.image.vendor=ModelPool"
)
mkdir -p "$out"
build() { # <name> <ref> [oci_image.py args...]
  local name=$1 ref=$2
  shift 2
  python3 images/oci_image.py --out "$out/$name.tar" --ref "$ref" --arch "$arch" \
    ${layer_cache:+--layer-cache "$layer_cache"} \
    "${base_debs[@]}" "${labels[@]}" --label "org.opencontainers.image.title=$name" "$@"
}
# The base layers are cached by their inputs (MODELPOOL_IMAGE_NO_CACHE=1: compute them again).
layer_cache="$debs/../layers"
[[ "${MODELPOOL_IMAGE_NO_CACHE:-}" == 1 ]] && layer_cache=
results=()
results+=("$(build modelpool-operator "ghcr.io/modelpool/modelpool-operator:$version" \
  --label "org.opencontainers.image.description=ModelPool operator: reconciles ModelPools, injects the sidecar" \
  --file "/usr/local/bin/modelpool-operator=$bindir/modelpool-operator" \
  --entrypoint /usr/local/bin/modelpool-operator)")
results+=("$(build modelpool-sidecar "ghcr.io/modelpool/modelpool-sidecar:$version" \
  --label "org.opencontainers.image.description=ModelPool sidecar: the per-pod authority over models" \
  --file "/usr/local/bin/modelpool-sidecar=$bindir/modelpool-sidecar" \
  --entrypoint /usr/local/bin/modelpool-sidecar)")
results+=("$(build modelpool-testapp "modelpool.local/modelpool-testapp:$version" \
  "${extra_debs[@]}" \
  --label "org.opencontainers.image.description=ModelPool test app: modelpool-memhog holding real memory through the SDK protocol" \
  --file "/usr/local/bin/modelpool-memhog=$bindir/modelpool-memhog" \
  --link /bin/sh=busybox \
  --entrypoint /bin/sh)")

printf '%s\n' "${results[@]}" >"$out/images.txt"
printf '%-52s %-73s %10s\n' IMAGE DIGEST "SIZE (MB)" >&2
for r in "${results[@]}"; do
  read -r ref digest size file <<<"$r"
  printf '%-52s %-73s %10.1f\n' "$ref" "$digest" "$(awk -v s="$size" 'BEGIN { print s / 1048576 }')" >&2
  echo "$ref $digest $size $file"
done
