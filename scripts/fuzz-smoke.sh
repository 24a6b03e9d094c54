#!/usr/bin/env bash
# Runs each cargo-fuzz target of fuzz/ briefly (default 20 s each).
#
#   bash scripts/fuzz-smoke.sh                  # image_ops and codecs, 20 s each
#   FUZZ_SECONDS=300 bash scripts/fuzz-smoke.sh image_ops
#   FUZZ_LENIENT=1 bash scripts/fuzz-smoke.sh   # image_ops: writes far past EOF
#                                               # fail with EFBIG instead of crashing
#
# Each target first runs its committed regression inputs (fuzz/regress/<target>,
# made by fuzz/make-regress.py and added from fuzz findings), then fuzzes. Both
# run under an RSS limit well below libFuzzer's 4 GiB default (FUZZ_RSS_MB,
# default 512, for the regression inputs; FUZZ_FUZZ_RSS_MB, default 1024, while
# fuzzing, where libFuzzer's own corpus grows the process; any single allocation
# above FUZZ_MALLOC_MB, default 256, fails the input) and a per-input time
# limit (FUZZ_TIMEOUT seconds, default 25): an input whose tables claim
# gigabytes must not make any command use them. ASan's quarantine of freed
# memory is kept small so that it does not count against that limit.
#
# Works on a stable toolchain: cargo-fuzz needs nightly-only rustc flags
# (-Zsanitizer=address ...), which RUSTC_BOOTSTRAP=1 unlocks. Installs
# cargo-fuzz if missing (set FUZZ_NO_INSTALL=1 to fail instead). The seed
# corpus is made by fuzz/make-corpus.sh (needs qemu-img/qemu-io) when
# fuzz/corpus is missing. Exit status: 0 when no target crashed or hung;
# crashing inputs are left in fuzz/artifacts/<target>/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"
secs="${FUZZ_SECONDS:-20}"
rss_mb="${FUZZ_RSS_MB:-512}"
# While fuzzing, libFuzzer's own corpus and ASan's bookkeeping grow the
# process over thousands of inputs (an empty input was reported at 516 MB):
# the fuzzing phase gets more room for the process, and any single
# allocation above FUZZ_MALLOC_MB (default 256) fails the input at once.
fuzz_rss_mb="${FUZZ_FUZZ_RSS_MB:-1024}"
malloc_mb="${FUZZ_MALLOC_MB:-256}"
timeout="${FUZZ_TIMEOUT:-25}"
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}quarantine_size_mb=32"
targets=("$@")
((${#targets[@]})) || targets=(image_ops codecs)
export RUSTC_BOOTSTRAP=1
if [[ "${FUZZ_LENIENT:-0}" == 1 ]]; then
    export QCOW2_FUZZ_LENIENT=1
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    if [[ "${FUZZ_NO_INSTALL:-0}" == 1 ]]; then
        echo "fuzz-smoke: cargo-fuzz not installed (cargo install cargo-fuzz --locked)" >&2
        exit 1
    fi
    cargo install cargo-fuzz --locked
fi
if [[ ! -d corpus/image_ops ]]; then
    bash ./make-corpus.sh
fi

limits=(-rss_limit_mb="$rss_mb" -malloc_limit_mb="$malloc_mb" -timeout="$timeout")
fuzz_limits=(-rss_limit_mb="$fuzz_rss_mb" -malloc_limit_mb="$malloc_mb" -timeout="$timeout")

status=0
# run_fuzz NAME TARGET ARGS...: runs cargo fuzz, prints the interesting lines.
run_fuzz() {
    local what="$1" t="$2"
    shift 2
    local log rc
    log="$(mktemp)"
    set +e
    cargo fuzz run "$t" "$@" >"$log" 2>&1
    rc=$?
    set -e
    # cargo-fuzz prints the crashing input with {:?}: drop such huge lines.
    awk 'length($0) < 2000' "$log" | grep -E '^(#[0-9]+ +(INITED|DONE)|stat::|==[0-9]+==|SUMMARY|thread .* panicked|artifact_prefix|Test unit written|Failing input|	artifacts/|Reproduce|	cargo fuzz|Executed )|panicked at|assertion|out-of-memory|Slowest unit|timeout' || true
    if ((rc != 0)); then
        echo "=== fuzz-smoke: $what FAILED (exit $rc); full log: $log" >&2
        status=1
    else
        echo "=== fuzz-smoke: $what ok"
        rm -f "$log"
    fi
}
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    seeds=()
    if [[ -d "regress/$t" ]]; then
        # Listing the files (not the directory) runs each once and writes nothing.
        mapfile -t inputs < <(find "regress/$t" -type f | sort)
        echo "=== fuzz-smoke: $t regression inputs (${#inputs[@]})"
        run_fuzz "$t regression inputs" "$t" "${inputs[@]}" -- "${limits[@]}"
        seeds=("regress/$t")
    fi
    echo "=== fuzz-smoke: $t for ${secs}s"
    # New inputs go to the first directory (corpus/), never to regress/.
    run_fuzz "$t" "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" "${fuzz_limits[@]}" -print_final_stats=1
done
exit $status
