# Recipes for the qcow2 engine. `just --list` shows them.
set shell := ["bash", "-euo", "pipefail", "-c"]

PREFIX := "/usr/local"

# Build everything (release: the C library lands in target/release/libqcow2.so)
build:
    cargo build --workspace --release

# Run every test, the C harness included
test:
    cargo test --workspace

# What CI runs
ci:
    bash .ci/run

# Model-check the data path's range locks and tickets with loom (own target dir: other cfg)
loom:
    RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p qcow2-inflight --release

# --- C library (crates/qcow2-capi) -------------------------------------------

# cbindgen pinned for include/qcow2.h
CBINDGEN_VERSION := "0.29.4"

# Regenerate include/qcow2.h with the pinned cbindgen
header:
    #!/usr/bin/env bash
    set -euo pipefail
    cbindgen="$(command -v cbindgen || echo "$HOME/.cargo/bin/cbindgen")"
    if [ ! -x "$cbindgen" ]; then
        echo "cbindgen not found: cargo install cbindgen --version {{CBINDGEN_VERSION}} --locked" >&2
        exit 1
    fi
    if ! "$cbindgen" --version | grep -qF "{{CBINDGEN_VERSION}}"; then
        echo "warning: $("$cbindgen" --version) is not the pinned cbindgen {{CBINDGEN_VERSION}}" >&2
    fi
    "$cbindgen" --quiet --config crates/qcow2-capi/cbindgen.toml --output include/qcow2.h crates/qcow2-capi

# Fail if include/qcow2.h differs from what cbindgen generates
header-check: header
    #!/usr/bin/env bash
    set -euo pipefail
    if ! git diff --exit-code -- include/qcow2.h; then
        echo "include/qcow2.h is stale: run 'just header' and commit it" >&2
        exit 1
    fi

# Build libqcow2 (release) and run the C harness (ffi-tests/) against it: static, ASan+UBSan, valgrind
ctest:
    #!/usr/bin/env bash
    set -euo pipefail
    for tool in cc qemu-img qemu-io nm; do
        command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install build-essential qemu-utils)" >&2; exit 1; }
    done
    command -v valgrind >/dev/null || echo "note: valgrind not found, the valgrind runs are skipped" >&2
    cargo build -p qcow2-capi --release
    QCOW2_LIB_DIR="$PWD/target/release" cargo test -p qcow2-capi --release --test c_harness --test symbols -- --nocapture

# Install libqcow2.so.X.Y.Z (+ .so.X and .so links), libqcow2.a, qcow2.h and qcow2.pc under PREFIX (just install PREFIX=/opt/qcow2)
install prefix=PREFIX:
    #!/usr/bin/env bash
    set -euo pipefail
    # Accepts `just install PREFIX=/x`, `just install /x` and `just PREFIX=/x install`.
    prefix="{{prefix}}"
    prefix="${prefix#PREFIX=}"
    case "$prefix" in /*) ;; *) prefix="$PWD/$prefix" ;; esac
    cargo build -p qcow2-capi --release
    version="$(cargo pkgid -p qcow2-capi | sed -e 's/.*[#@]//')"
    install -d "$prefix/lib/pkgconfig" "$prefix/include"
    major="${version%%.*}"
    install -m 0755 target/release/libqcow2.so "$prefix/lib/libqcow2.so.$version"
    ln -sfn "libqcow2.so.$version" "$prefix/lib/libqcow2.so.$major"
    ln -sfn "libqcow2.so.$major" "$prefix/lib/libqcow2.so"
    install -m 0644 target/release/libqcow2.a "$prefix/lib/libqcow2.a"
    install -m 0644 include/qcow2.h "$prefix/include/qcow2.h"
    sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" crates/qcow2-capi/qcow2.pc.in > "$prefix/lib/pkgconfig/qcow2.pc"
    chmod 0644 "$prefix/lib/pkgconfig/qcow2.pc"
    echo "installed libqcow2 $version under $prefix (PKG_CONFIG_PATH=$prefix/lib/pkgconfig)"

# --- benchmarks (benches/, scripts/dashboard.py) ------------------------------

# Criterion benchmarks of the core paths (in-memory and file backend); churn per op in target/criterion/churn.json. `just bench skip` runs one area
bench *args:
    cargo bench -p qcow2-bench --bench bench -- {{args}}

# The data path over NBD: fio's nbd engine against the plugin and qemu-nbd (O_DIRECT and writeback) + raw ceiling. `just fio-nbd --runtime 3`
fio-nbd *args:
    python3 scripts/fio_nbd.py {{args}}

# ours vs qemu-io, whole process, writeback: target/dashboard/{results.json,index.html} (+ screenshot.png with chromium). `just dashboard --rounds 5`
dashboard *args:
    #!/usr/bin/env bash
    set -euo pipefail
    for tool in qemu-io qemu-img strace python3 /usr/bin/time; do
        command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install qemu-utils strace time python3)" >&2; exit 1; }
    done
    cargo build --release -q -p qcow2-cli
    python3 scripts/dashboard.py {{args}}
    browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
    if [ -n "$browser" ]; then
        profile="$(mktemp -d)"
        timeout 60 "$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
            --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
            --screenshot="$PWD/target/dashboard/screenshot.png" --window-size=1280,2000 \
            "file://$PWD/target/dashboard/index.html" >/dev/null 2>&1 || echo "note: screenshot failed" >&2
        rm -rf "$profile"
        [ -f target/dashboard/screenshot.png ] && echo "screenshot: target/dashboard/screenshot.png"
    else
        echo "note: chromium not found, no screenshot (apt-get install chromium)" >&2
    fi

# --- nbdkit plugin (plugins/nbdkit) --------------------------------------------

# Build the nbdkit plugin on libqcow2 (release): `just plugin` links libqcow2.so (rpath), `just plugin static` embeds libqcow2.a
plugin link="shared":
    #!/usr/bin/env bash
    set -euo pipefail
    [ -f /usr/include/nbdkit-plugin.h ] || { echo "nbdkit-plugin.h missing: apt-get install -y nbdkit nbdkit-plugin-dev libnbd-bin" >&2; exit 1; }
    cargo build -p qcow2-capi --release
    ln -sfn libqcow2.so target/release/libqcow2.so.0   # the SONAME
    out=target/release/nbdkit-qcow2-plugin.so
    cflags=(-std=c11 -Wall -Wextra -Wpedantic -Werror -fPIC -shared -O2 -g -I include)
    case "{{link}}" in
        shared) cc "${cflags[@]}" plugins/nbdkit/nbdkit-qcow2-plugin.c -o "$out" \
                    -L target/release -Wl,-rpath,"$PWD/target/release" -lqcow2 ;;
        static) cc "${cflags[@]}" plugins/nbdkit/nbdkit-qcow2-plugin.c -o "$out" \
                    target/release/libqcow2.a -Wl,--exclude-libs,ALL -Wl,--gc-sections -lpthread -ldl -lm ;;
        *) echo "just plugin [shared|static]" >&2; exit 1 ;;
    esac
    echo "built $out: nbdkit -U /tmp/qcow2.sock -f $out file=IMAGE [cache=...] [discard=...] [readonly=true]"
