#!/usr/bin/env bash
# Seed corpus for the fuzz targets, made by qemu-img / qemu-io (QEMU 10):
# small images (512 B - 64 KiB clusters) with data, compressed, zero and
# discarded clusters, v2 and v3, every refcount width, extended L2, lazy
# refcounts, zstd, backing file names. Writes fuzz/corpus/{image_ops,codecs}.
#
#   bash fuzz/make-corpus.sh [OUT_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/corpus}"
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || {
    echo "make-corpus: qemu-img/qemu-io not found (apt-get install qemu-utils)" >&2
    exit 1
}
mkdir -p "$out/image_ops" "$out/codecs"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

n=0
mk() { # mk NAME SIZE OPTIONS [qemu-io commands...]
    local name="$1" size="$2" opts="$3"
    shift 3
    local f="$tmp/$name.qcow2"
    qemu-img create -q -f qcow2 -o "$opts" "$f" "$size"
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    if ((${#args[@]})); then
        qemu-io -f qcow2 "${args[@]}" "$f" >/dev/null
    fi
    cp "$f" "$out/image_ops/$name"
    n=$((n + 1))
}

io_mix=("write -P 0xaa 0 4k" "write -z 8k 8k" "write -c -P 0x55 64k 64k" "discard 128k 64k" "write -P 0x11 200k 1k")

for cs in 512 4096 65536; do
    for compat in 0.10 1.1; do
        mk "plain-$cs-$compat" 1M "cluster_size=$cs,compat=$compat"
        mk "data-$cs-$compat" 1M "cluster_size=$cs,compat=$compat" "${io_mix[@]}"
    done
done
for rb in 1 2 4 8 32 64; do
    mk "refbits-$rb" 1M "cluster_size=4096,refcount_bits=$rb" "${io_mix[@]}"
done
mk "extl2-16k" 1M "cluster_size=16384,extended_l2=on" "write -P 0xaa 0 1k" "write -z 4k 1k" "write -P 1 16k 16k" "write -z 32k 16k" "write -c -P 2 64k 16k"
mk "extl2-64k" 1M "cluster_size=65536,extended_l2=on" "write -P 0xaa 2k 2k" "write -z 64k 4k" "discard 128k 64k"
mk "lazy" 1M "cluster_size=4096,lazy_refcounts=on" "${io_mix[@]}"
mk "zstd" 1M "cluster_size=4096,compression_type=zstd" "write -c -P 0x42 0 4k" "write -c -P 0x43 64k 64k"
mk "big-virtual" 1T "cluster_size=65536" "write -P 1 0 512" "write -z 512G 1G"
mk "tiny" 512 "cluster_size=512"
qemu-img create -q -f qcow2 "$tmp/base.qcow2" 1M
qemu-io -f qcow2 -c "write -P 0x77 0 64k" "$tmp/base.qcow2" >/dev/null
mk "backing-qcow2" 1M "cluster_size=4096,backing_file=base.qcow2,backing_fmt=qcow2" "write -P 0x12 4k 4k" "write -z 64k 8k"
mk "backing-raw-name" 1M "cluster_size=512,backing_file=some/dir/base.raw,backing_fmt=raw" 2>/dev/null || true
mk "backing-v2" 1M "cluster_size=4096,compat=0.10,backing_file=base.qcow2,backing_fmt=qcow2" "write -P 0x12 4k 4k"
mk "prealloc-meta" 256k "cluster_size=4096,preallocation=metadata"

# The header cluster of every image, plus raw entry/refcount patterns, for codecs.
for f in "$out/image_ops/"*; do
    head -c 4096 "$f" >"$out/codecs/$(basename "$f")"
done
printf '\x00\x00\x00\x00\x00\x00\x00\x80\xff\xff\xff\xff\x00\x00\x00\x00' >"$out/codecs/entry-copied"
printf '\xff\xff\xff\xff\xff\xff\xff\x7f\xff\xff\xff\xff\xff\xff\xff\xff' >"$out/codecs/entry-compressed-max"
echo "make-corpus: $n images in $out/image_ops, headers in $out/codecs"
