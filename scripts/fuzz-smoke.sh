#!/usr/bin/env bash
# Runs each cargo-fuzz target of fuzz/ briefly (default 20 s each).
#
#   bash scripts/fuzz-smoke.sh                  # image_ops and codecs, 20 s each
#   FUZZ_SECONDS=300 bash scripts/fuzz-smoke.sh image_ops
#   FUZZ_LENIENT=1 bash scripts/fuzz-smoke.sh   # image_ops: writes far past EOF
#                                               # fail with EFBIG instead of crashing
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

status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "=== fuzz-smoke: $t for ${secs}s"
    log="$(mktemp)"
    set +e
    cargo fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=60 -rss_limit_mb=4096 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    set -e
    # cargo-fuzz prints the crashing input with {:?}: drop such huge lines.
    awk 'length($0) < 2000' "$log" | grep -E '^(#[0-9]+ +(INITED|DONE)|stat::|==[0-9]+==|SUMMARY|thread .* panicked|artifact_prefix|Test unit written|Failing input|	artifacts/|Reproduce|	cargo fuzz)|panicked at|assertion' || true
    if ((rc != 0)); then
        echo "=== fuzz-smoke: $t FAILED (exit $rc); full log: $log" >&2
        status=1
    else
        echo "=== fuzz-smoke: $t ok"
        rm -f "$log"
    fi
done
exit $status
