#!/usr/bin/env bash
# The serving proxy where it has cores to spare: issue 13's targets (≥ 0.9 of direct
# throughput, ≤ 1 ms added p99, a loaded model, 1 and 32 clients) judged on a machine that is
# not the 2-core build machine, where 32 lock-step clients, the upstream and the proxy queue
# for the same two cores (BENCHMARKS.md, proxy, rounds 10-11). About 4.5 minutes.
#
#   bench/device/prepare.sh     # on the build machine: release binaries -> bench/device/bin/
#   bash bench/device/proxy.sh  # on the many-core machine (python3 for the summary)
#
# Runs `modelpool-bench proxy --json` (proxied against direct in alternating slices, same run):
#   shared-W   every process free to use every core, for each W in PROXY_CHECK_WORKS
#   pinned-W   the sidecar on cores 0..K-1, the bench's clients and its upstream on the rest
#              (the first W only; needs taskset and at least 2K cores, else skipped with why)
#
# Inputs (environment):
#   OUT                        where the results go (default ./proxy-out)
#   MODELPOOL_BENCH_BIN        default bench/device/bin/modelpool-bench
#   MODELPOOL_SIDECAR_BIN      default bench/device/bin/modelpool-sidecar
#   PROXY_CHECK_SECONDS        seconds per side and cell (default 8)
#   PROXY_CHECK_SLICES         alternating slices (default 16)
#   PROXY_CHECK_CLIENTS        client counts (default 1,32)
#   PROXY_CHECK_WORKS          upstream work per request in µs, space-separated (default
#                              "10000 2000 0": a small model's answer, a fast one, and a
#                              server that does nothing, where the proxy's own HTTP work shows)
#   PROXY_CHECK_SIDECAR_CORES  K, cores of the pinned run's sidecar (default 4: the proxy's
#                              default runtime uses at most 4 workers)
#
# Output: $OUT/<run>.jsonl (the bench's rows), $OUT/<run>.log (its stderr), $OUT/machine.txt,
# $OUT/summary.json (every cell with its verdicts; bench/device/summarise.py) and one line per
# cell on stdout.
#
# Exit codes: 0 every run ran (the verdicts are in summary.json: this measures, it does not
# gate), 1 a run failed, 2 setup problem (a binary or python3 missing).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-./proxy-out}"
bench="${MODELPOOL_BENCH_BIN:-$here/bin/modelpool-bench}"
sidecar="${MODELPOOL_SIDECAR_BIN:-$here/bin/modelpool-sidecar}"
seconds="${PROXY_CHECK_SECONDS:-8}"
slices="${PROXY_CHECK_SLICES:-16}"
clients="${PROXY_CHECK_CLIENTS:-1,32}"
read -r -a works <<<"${PROXY_CHECK_WORKS:-10000 2000 0}"
sidecar_cores="${PROXY_CHECK_SIDECAR_CORES:-4}"

setup_error() {
    printf 'proxy check setup error: %s\n' "$1" >&2
    exit 2
}
for bin in "$bench" "$sidecar"; do
    [[ -x "$bin" ]] || setup_error "missing binary $bin: run bench/device/prepare.sh on the build machine and carry bench/device/bin (or set MODELPOOL_BENCH_BIN / MODELPOOL_SIDECAR_BIN)"
done
command -v python3 >/dev/null 2>&1 || setup_error "python3 not found (it writes summary.json)"
((${#works[@]} > 0)) || setup_error "PROXY_CHECK_WORKS is empty: give at least one work in µs"
[[ "$sidecar_cores" =~ ^[1-9][0-9]*$ ]] ||
    setup_error "PROXY_CHECK_SIDECAR_CORES=$sidecar_cores: expected a whole number of cores ≥ 1"
mkdir -p "$out" || setup_error "cannot create $out"
# The bench's own files (pool, sidecar logs) stay inside $out, whatever the current folder.
export TMPDIR="$out/tmp"
mkdir -p "$TMPDIR"

cores="$(nproc 2>/dev/null || echo 1)"
{
    echo "cores: $cores"
    grep -m1 'model name' /proc/cpuinfo 2>/dev/null
    echo "load average at start: $(cat /proc/loadavg 2>/dev/null)"
    echo "bench: $bench"
    echo "sidecar: $sidecar"
} >"$out/machine.txt"
cat "$out/machine.txt"

# Runs one configuration: <name> <work µs> [prefix command for the bench...]
failed=0
run() {
    local name="$1" work="$2"
    shift 2
    local limit=$((4 * (2 * ${seconds%.*} + 30)))
    echo "==> $name: work ${work} µs, clients $clients, ${seconds} s per side in $slices slices"
    timeout --kill-after=5 "$limit" "$@" "$bench" proxy --json --seconds "$seconds" \
        --slices "$slices" --clients "$clients" --work-us "$work" \
        >"$out/$name.jsonl" 2>"$out/$name.log"
    local rc=$?
    if ((rc != 0)); then
        echo "FAIL: $name exited $rc; last lines of $out/$name.log:" >&2
        tail -n 5 "$out/$name.log" >&2
        failed=1
    fi
}

for work in "${works[@]}"; do
    MODELPOOL_SIDECAR_BIN="$sidecar" run "shared-$work" "$work"
done

skipped=()
work="${works[0]}"
if ! command -v taskset >/dev/null 2>&1; then
    skipped+=("pinned-$work: taskset not found")
elif ((cores < 2 * sidecar_cores)); then
    skipped+=("pinned-$work: $cores cores, fewer than twice the sidecar's $sidecar_cores")
else
    wrapper="$out/sidecar-pinned.sh"
    # The wrapper notes the cores the sidecar was given, so the summary shows the pinning held.
    {
        echo '#!/bin/sh'
        printf 'exec taskset -c 0-%d /bin/sh -c %q sh %q %q "$@"\n' "$((sidecar_cores - 1))" \
            'grep Cpus_allowed_list /proc/$$/status >"$1"; shift; exec "$@"' \
            "$out/sidecar-pinned.cores" "$sidecar"
    } >"$wrapper"
    chmod +x "$wrapper"
    MODELPOOL_SIDECAR_BIN="$wrapper" run "pinned-$work" "$work" \
        taskset -c "$sidecar_cores-$((cores - 1))"
fi
for reason in "${skipped[@]}"; do
    echo "skipped $reason"
done

echo "load average at end: $(cat /proc/loadavg 2>/dev/null)" >>"$out/machine.txt"
python3 "$here/summarise.py" "$out" "${skipped[@]}" || failed=1
exit "$failed"
