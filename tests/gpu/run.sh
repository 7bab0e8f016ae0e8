#!/usr/bin/env bash
# The GPU check: real VRAM on a real GPU, in under 5 minutes (see tests/gpu/README.md).
#
#   tests/gpu/prepare.sh        # on the build machine: release binaries -> tests/gpu/bin/
#   tests/gpu/run.sh            # on the GPU machine (needs python3 with torch on CUDA)
#
# Inputs (environment):
#   OUT                    where summary.json, timeline.jsonl and the logs go (default ./gpu-out)
#   MODELPOOL_SIDECAR_BIN  the sidecar binary      (default tests/gpu/bin/modelpool-sidecar)
#   CANDLE_HOST_BIN        the reference host      (default tests/gpu/bin/modelpool-candle-host)
#   PYTHON                 the interpreter with torch (default python3)
#   GPU_CHECK_BUDGET_S     seconds for all phases but vllm (default 270)
#   GPU_CHECK_VLLM_BUDGET_S seconds for the vllm phase, used only where vLLM is installed
#                          (default 240; a hard stop at both budgets + 20)
#   MODELPOOL_NVIDIA_SMI   nvidia-smi to probe with (default nvidia-smi; tests point it elsewhere)
#   MODELPOOL_LIBCUDA_DIRS colon-separated dirs to look for libcuda.so.1 in, instead of the
#                          usual ones and ldconfig (tests use it)
#
# Exit codes:
#   0   every check passed
#   1   a check failed (each check prints PASS or FAIL; details in $OUT/summary.json)
#   2   setup problem: a binary, the Python SDK or torch with CUDA is missing, or the run was cut
#   77  no GPU here ("no GPU: <reason>" on stderr): nothing was checked. 77 is the "skipped" code
#       of automake and ctest.
#
# Until a GPU is found this script uses only bash builtins (tests run it with an empty PATH).
set -uo pipefail

here="${BASH_SOURCE[0]%/*}"
[[ "$here" == "${BASH_SOURCE[0]}" ]] && here=.
out="${OUT:-./gpu-out}"

json_escape() {
    local text="${1//\\/\\\\}"
    text="${text//\"/\\\"}"
    text="${text//$'\n'/ }"
    text="${text//$'\r'/ }"
    text="${text//$'\t'/ }"
    printf '%s' "$text"
}

# Writes a summary for a run that could not start, where mkdir exists (best effort).
early_summary() { # code reason skipped
    if command -v mkdir >/dev/null 2>&1 && mkdir -p "$out" 2>/dev/null; then
        printf '{"ok": false, "skipped": %s, "exit_code": %s, "reason": "%s", "checks": []}\n' \
            "$3" "$1" "$(json_escape "$2")" >"$out/summary.json" 2>/dev/null || true
    fi
}

no_gpu() {
    printf 'no GPU: %s\n' "$1" >&2
    early_summary 77 "no GPU: $1" true
    exit 77
}

setup_error() {
    printf 'gpu check setup error: %s\n' "$1" >&2
    early_summary 2 "$1" false
    exit 2
}

# --- is there a GPU? -----------------------------------------------------------------------
smi="${MODELPOOL_NVIDIA_SMI:-nvidia-smi}"
if ! command -v "$smi" >/dev/null 2>&1; then
    no_gpu "nvidia-smi not found in PATH (no NVIDIA driver installed)"
fi
smi_out="$("$smi" -L 2>&1)"
smi_rc=$?
if ((smi_rc != 0)); then
    first_line="${smi_out%%$'\n'*}"
    no_gpu "nvidia-smi failed (exit $smi_rc): ${first_line:-no output}"
fi
if [[ "$smi_out" != *"GPU "* ]]; then
    no_gpu "nvidia-smi lists no GPU"
fi

libcuda=""
if [[ -n "${MODELPOOL_LIBCUDA_DIRS+set}" ]]; then
    IFS=: read -r -a dirs <<<"$MODELPOOL_LIBCUDA_DIRS"
else
    IFS=: read -r -a dirs <<<"${LD_LIBRARY_PATH:-}"
    dirs+=(/usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /lib/x86_64-linux-gnu /lib64
        /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/wsl/lib /usr/local/cuda/compat)
    for ldconfig in ldconfig /sbin/ldconfig /usr/sbin/ldconfig; do
        if command -v "$ldconfig" >/dev/null 2>&1; then
            cache="$("$ldconfig" -p 2>/dev/null)"
            if [[ "$cache" == *"libcuda.so.1 "* ]]; then
                libcuda="ldconfig"
            fi
            break
        fi
    done
fi
if [[ -z "$libcuda" ]]; then
    for dir in "${dirs[@]}"; do
        if [[ -n "$dir" && -e "$dir/libcuda.so.1" ]]; then
            libcuda="$dir/libcuda.so.1"
            break
        fi
    done
fi
if [[ -z "$libcuda" ]]; then
    searched="${dirs[*]}"
    no_gpu "libcuda.so.1 (the driver's CUDA library) not found (searched: ${searched:-nothing})"
fi

# --- what the run needs --------------------------------------------------------------------
root="$(cd "$here/../.." && pwd)" || setup_error "cannot find the repository root from $here"
sidecar="${MODELPOOL_SIDECAR_BIN:-$root/tests/gpu/bin/modelpool-sidecar}"
host="${CANDLE_HOST_BIN:-$root/tests/gpu/bin/modelpool-candle-host}"
for bin in "$sidecar" "$host"; do
    [[ -x "$bin" ]] || setup_error "missing binary $bin: run tests/gpu/prepare.sh on the build machine and carry tests/gpu/bin (or set MODELPOOL_SIDECAR_BIN / CANDLE_HOST_BIN)"
done
python="${PYTHON:-python3}"
command -v "$python" >/dev/null 2>&1 || setup_error "$python not found"
torch_check="$("$python" -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>&1)"
if [[ "$torch_check" != *" True" ]]; then
    setup_error "torch with CUDA is not usable by $python: ${torch_check##*$'\n'}"
fi
if ! "$python" -c 'import modelpool' >/dev/null 2>&1; then
    for candidate in "$root/sdk/python/src" "$root/sdk/python"; do
        if [[ -d "$candidate/modelpool" ]]; then
            export PYTHONPATH="$candidate${PYTHONPATH:+:$PYTHONPATH}"
            break
        fi
    done
    "$python" -c 'import modelpool' >/dev/null 2>&1 ||
        setup_error "the Python SDK (package modelpool) is not importable: pip install --no-deps -e sdk/python, or put sdk/python/src on PYTHONPATH"
fi

mkdir -p "$out" || setup_error "cannot create $out"
budget="${GPU_CHECK_BUDGET_S:-270}"
vllm_budget="${GPU_CHECK_VLLM_BUDGET_S:-240}"
echo "gpu check: $smi_out" | head -n 2
echo "gpu check: libcuda $libcuda; sidecar $sidecar; host $host; python $python ($torch_check); out $out"
limit=()
hard_limit=$((budget + vllm_budget + 20))
command -v timeout >/dev/null 2>&1 && limit=(timeout --kill-after=5 "$hard_limit")
"${limit[@]}" "$python" "$root/tests/gpu/run_gpu.py" \
    --out "$out" --sidecar "$sidecar" --candle-host "$host" --budget "$budget" --vllm-budget "$vllm_budget"
rc=$?
if ((rc == 124 || rc == 137)); then
    echo "FAIL: the GPU check ran past its $hard_limit s limit" >&2
    exit 2
fi
exit "$rc"
