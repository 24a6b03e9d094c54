#!/usr/bin/env python3
"""Hand-made hostile qcow2 images for fuzz/regress/image_ops: small files
whose tables claim far more than the file holds (shared L2 tables, entries
far past the end of the file, snapshot L1 tables of 32 MiB, refcount blocks
at terabyte offsets). Every command must stay bounded in memory and time by
the file on them. `cmp-*` are small versions that qemu-img checks in well
under a second, for comparing the check's counts with QEMU's.

    python3 fuzz/make-regress.py [OUT_DIR]

The images are committed; rerun only to change them (and the tests in
crates/qcow2-cli/tests/bounded.rs and crates/qcow2-ops/tests/bounded.rs
that name them). The `fuzz-*` files beside them are inputs the fuzzer
found (slow or out of memory), copied as they were. `cmp-bitmaps` starts
from an image made by QEMU, so it is made separately:

    qemu-img create -f qcow2 -o cluster_size=4096 B 64M
    qemu-img bitmap --add -g 512 B b0
    qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 32M 4k' -c 'write -P 3 60M 4k' B
    python3 fuzz/make-regress.py --bitmap-copies B 300   # 300 bitmaps, one table
"""
import os
import struct
import sys


def header(cb, size, l1_size, l1_off, rt_off, nb_snap=0, snap_off=0, order=4):
    h = struct.pack('>4sIQIIQIIQQIIQ', b'QFI\xfb', 3, 0, 0, cb, size, 0,
                    l1_size, l1_off, rt_off, 1, nb_snap, snap_off)
    h += struct.pack('>QQQII', 0, 0, 0, order, 104)
    return h + b'\0' * 8  # end of header extensions


def put(b, off, data):
    b[off:off + len(data)] = data


def image(cb, clusters, l1_entries, order=4, nb_snap=0, snap_off=0):
    """Header, refcount table (cluster 1), one refcount block (cluster 2)
    giving every cluster of the file refcount 1, L1 table at cluster 3."""
    cs = 1 << cb
    b = bytearray(cs * clusters)
    size = l1_entries * (cs // 8) * cs
    put(b, 0, header(cb, size, l1_entries, 3 * cs, cs, nb_snap, snap_off, order))
    put(b, cs, struct.pack('>Q', 2 * cs))
    width = 1 << order
    for i in range(clusters):
        put(b, 2 * cs + i * width // 8, (1).to_bytes(width // 8, 'big'))
    return b


def be64s(b, off, values):
    for i, v in enumerate(values):
        put(b, off + 8 * i, struct.pack('>Q', v))


def snapshot(l1_off, l1_size, i):
    sid = str(i).encode()
    name = b's%d' % i
    e = struct.pack('>QIHHIIQII', l1_off, l1_size, len(sid), len(name), 0, 0, 0, 0, 16)
    e += struct.pack('>QQ', 0, 0) + sid + name
    return e + b'\0' * ((-len(e)) % 8)


def l2_is_l1(cb, n, order=4):
    """Every L1 entry points at the L1 table itself: n*n references to one
    cluster, past the largest refcount."""
    cs = 1 << cb
    b = image(cb, 4, n, order)
    be64s(b, 3 * cs, [3 * cs] * n)
    return b


def far_refs(cb, n):
    """Every L1 entry points at one L2 table whose n entries point past
    2^55: n*n references beyond the end of the file."""
    cs = 1 << cb
    b = image(cb, 5, n)
    be64s(b, 3 * cs, [4 * cs] * n)
    be64s(b, 4 * cs, [(1 << 55) + i * cs for i in range(n)])
    return b


def unaligned(cb, n):
    """L1 entries with reserved bits, all sharing an L2 table of unaligned
    preallocated zero clusters (copied flag set)."""
    cs = 1 << cb
    b = image(cb, 5, n)
    be64s(b, 3 * cs, [4 * cs | (i % 2) for i in range(n)])
    be64s(b, 4 * cs, [(1 << 63) | (2 * cs + 512) | 1] * (cs // 8))
    return b


def snapshots(cb, n):
    """n snapshots: a third claim a 32 MiB L1 table at the one real L1
    table, a third share that table at its real size, a third put it at
    1 TiB."""
    cs = 1 << cb
    table = b''
    for i in range(n):
        l1 = [(3 * cs, 1 << 22), (3 * cs, cs // 8), (1 << 40, 1 << 20)][i % 3]
        table += snapshot(l1[0], l1[1], i)
    sc = (len(table) + cs - 1) // cs
    b = image(cb, 6 + sc, 1, nb_snap=n, snap_off=6 * cs)
    be64s(b, 3 * cs, [4 * cs | (1 << 63)])
    be64s(b, 4 * cs, [5 * cs | (1 << 63)] * (cs // 8))
    put(b, 6 * cs, table)
    return b


def refblocks_far(cb, n):
    """Refcount table entries 1..n point at refcount blocks 1 GiB apart,
    all past the end of the file."""
    cs = 1 << cb
    b = image(cb, 4, 1)
    be64s(b, cs + 8, [i << 30 for i in range(1, n)])
    return b


IMAGES = {
    # Bounded: each made the check of the starting commit use gigabytes.
    'overflow-storm': l2_is_l1(14, 2048),
    'far-refs': far_refs(14, 2048),
    'unaligned-refs': unaligned(12, 512),
    'snapshot-l1s': snapshots(12, 300),
    'refblocks-far': refblocks_far(12, 512),
    # Small enough for qemu-img to check quickly: counts must agree.
    'cmp-overflow': l2_is_l1(12, 64, order=3),
    'cmp-far-refs': far_refs(12, 64),
    'cmp-unaligned': unaligned(12, 64),
    'cmp-snapshots': snapshots(12, 30),
    'cmp-refblocks-far': refblocks_far(12, 8),
}

def bitmap_copies(path, n):
    """Rewrites the bitmap directory of the qcow2 image at `path` (4 KiB
    clusters) as `n` bitmaps that all share the first bitmap's table; the
    new directory goes at the end of the file."""
    b = bytearray(open(path, 'rb').read())
    p = struct.unpack('>I', b[100:104])[0]
    ext_at = None
    while True:
        t, length = struct.unpack('>II', b[p:p + 8])
        if t == 0:
            break
        if t == 0x23852875:
            ext_at = p
        p += 8 + ((length + 7) & ~7)
    _, _, _, doff = struct.unpack('>IIQQ', b[ext_at + 8:ext_at + 32])
    toff, tsize, flags, typ, gran, _, _ = struct.unpack('>QIIBBHI', b[doff:doff + 24])
    entries = bytearray()
    for i in range(n):
        name = b'b%d' % i
        e = struct.pack('>QIIBBHI', toff, tsize, flags, typ, gran, len(name), 0) + name
        entries += e + b'\0' * ((-len(e)) % 8)
    cs = 4096
    at = (len(b) + cs - 1) // cs * cs
    b += b'\0' * (at - len(b)) + entries
    b += b'\0' * ((-len(b)) % cs)
    struct.pack_into('>IIQQ', b, ext_at + 8, n, 0, len(entries), at)
    open(path, 'wb').write(b)


if __name__ == '__main__':
    if len(sys.argv) == 4 and sys.argv[1] == '--bitmap-copies':
        bitmap_copies(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, 'regress', 'image_ops')
    os.makedirs(out, exist_ok=True)
    for name, data in IMAGES.items():
        with open(os.path.join(out, name), 'wb') as f:
            f.write(data)
    print(f'make-regress: {len(IMAGES)} images in {out}')
