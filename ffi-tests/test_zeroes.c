/*
 * write-zeroes through the C API: metadata churn measured with
 * qcow2_get_stats, semantics checked against QEMU 10. Each scenario starts
 * from an image prepared by qemu-img/qemu-io, copies it, replays the same
 * requests on the copy with qemu-io, and compares `qemu-img map` of both.
 */
#include "harness.h"

#define MiB (1024u * 1024u)
#define KiB 1024u
#define CL (64u * KiB)

static char ours[4200], ref[4200];

/* Makes `<name>.qcow2` (ours) and `<name>.ref.qcow2` (the oracle's copy) from
 * the same qemu-built base. `setup` is a shell snippet run with $IMG set. */
static int prepare(const char *name, const char *setup) {
    h_path(ours, sizeof ours, name);
    strcat(ours, ".qcow2");
    h_path(ref, sizeof ref, name);
    strcat(ref, ".ref.qcow2");
    int rc = h_sh("cd '%s' && IMG='%s' && (%s) >/dev/null && cp '%s' '%s'", h_dir, ours, setup, ours,
                  ref);
    if (rc != 0)
        H_FAIL("preparing %s failed (%d)", name, rc);
    return rc == 0;
}

/* Replays requests on the reference copy with qemu-io. */
static void oracle(const char *discard_mode, const char *cmds) {
    int rc = h_sh("cd '%s' && qemu-io -d %s %s '%s' >/dev/null", h_dir, discard_mode, cmds, ref);
    if (rc != 0)
        H_FAIL("qemu-io %s failed (%d)", cmds, rc);
}

/* qemu-img check passes on both images and their maps (with host offsets when
 * `offsets`) and contents are equal. */
static void compare_with_oracle(int offsets) {
    char m1[8192], m2[8192];
    snprintf(m1, sizeof m1, "%s.map", ours);
    snprintf(m2, sizeof m2, "%s.map", ref);
    CHECK(h_qemu_check(ours));
    CHECK(h_qemu_check(ref));
    CHECK(h_qemu_map(ours, m1, offsets) == 0);
    CHECK(h_qemu_map(ref, m2, offsets) == 0);
    int same = h_same_file(m1, m2);
    CHECK(same);
    if (!same) {
        h_show("map of our image", m1);
        h_show("map of qemu's image", m2);
    }
    CHECK(h_sh("qemu-img compare -q '%s' '%s'", ours, ref) == 0);
}

static Qcow2Stats stats(Qcow2Image *img) {
    Qcow2Stats s;
    memset(&s, 0, sizeof s);
    CHECK_RC(qcow2_get_stats(img, &s), 0);
    return s;
}

/* One extent covering [off, off+len) with exactly `flags`. */
static void check_extent(Qcow2Image *img, uint64_t off, uint64_t len, uint32_t flags) {
    Qcow2Extent e[4];
    size_t n = 0;
    memset(e, 0, sizeof e);
    CHECK_RC(qcow2_block_status(img, off, len, e, 4, &n), 0);
    CHECK(n >= 1);
    CHECK(e[0].start == off);
    CHECK(e[0].length >= len || n > 1);
    if (e[0].flags != flags)
        H_FAIL("extent at %" PRIu64 ": flags 0x%x, expected 0x%x", off, e[0].flags, flags);
    else
        H_PASS();
}

static void check_content(Qcow2Image *img, uint64_t off, size_t len, uint8_t v) {
    uint8_t *b = malloc(len);
    if (!b)
        return;
    memset(b, v ^ 0xff, len);
    CHECK_RC(qcow2_read(img, off, b, len), 0);
    if (h_all(b, len, v))
        H_PASS();
    else
        H_FAIL("[%" PRIu64 ", +%zu) does not read as 0x%02x", off, len, v);
    free(b);
}

/* v3, discard mode ignore: data -> zero-alloc once, then nothing to do. */
static void scenario_v3_no_unmap(void) {
    if (!prepare("v3", "qemu-img create -q -f qcow2 \"$IMG\" 4M && "
                       "qemu-io -c 'write -P 0xaa 0 1M' -c 'write -P 0xbb 2M 64k' \"$IMG\""))
        return;
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR, &img), 0);
    Qcow2Stats s;

    /* Zeroing data without unmap dirties the L2 slice once, no refcounts. */
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, MiB, 0), 0);
    s = stats(img);
    CHECK_U64(s.l2_dirty_marks, ==, 1);
    CHECK_U64(s.refblock_dirty_marks, ==, 0);
    CHECK_U64(s.data_bytes_written, ==, 0);
    CHECK_U64(s.zero_entries_skipped, ==, 0);
    check_content(img, 0, MiB, 0);
    check_extent(img, 0, MiB, QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_ZERO | QCOW2_EXTENT_OFFSET_VALID);
    CHECK_RC(qcow2_flush(img), 0);
    s = stats(img);
    CHECK_U64(s.l2_writebacks, >=, 1);
    CHECK_U64(s.refblock_writebacks, ==, 0);
    CHECK_U64(s.file_syncs, >=, 1);

    /* The same again: every entry is already zero-alloc, nothing is dirtied. */
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, MiB, 0), 0);
    s = stats(img);
    CHECK_U64(s.l2_dirty_marks, ==, 0);
    CHECK_U64(s.l2_writebacks, ==, 0);
    CHECK_U64(s.refblock_dirty_marks, ==, 0);
    CHECK_U64(s.file_syncs, ==, 0);
    CHECK_U64(s.data_bytes_written, ==, 0);
    CHECK_U64(s.zero_entries_skipped, ==, MiB / CL);
    /* A flush with nothing dirty issues no write and no sync. */
    CHECK_RC(qcow2_flush(img), 0);
    s = stats(img);
    CHECK_U64(s.l2_writebacks, ==, 0);
    CHECK_U64(s.file_syncs, ==, 0);
    CHECK_U64(s.cache_flushes, ==, 0);

    /* MAY_UNMAP is cleared in discard mode ignore: still nothing to do. */
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, MiB, QCOW2_REQ_MAY_UNMAP), 0);
    s = stats(img);
    CHECK_U64(s.l2_dirty_marks, ==, 0);
    CHECK_U64(s.refblock_dirty_marks, ==, 0);
    CHECK_U64(s.zero_entries_skipped, ==, MiB / CL);
    check_extent(img, 0, MiB, QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_ZERO | QCOW2_EXTENT_OFFSET_VALID);

    /* NO_FALLBACK on part of a data cluster: -ENOTSUP, nothing written. */
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 2 * MiB + 512, 4096, QCOW2_REQ_NO_FALLBACK), -ENOTSUP);
    CHECK_RC(qcow2_write_zeroes(img, 2 * MiB + 512, 4096, QCOW2_REQ_NO_FALLBACK | QCOW2_REQ_MAY_UNMAP),
             -ENOTSUP);
    s = stats(img);
    CHECK_U64(s.data_bytes_written, ==, 0);
    CHECK_U64(s.l2_dirty_marks, ==, 0);
    check_content(img, 2 * MiB, CL, 0xbb);
    /* Without it, zero data is written. */
    CHECK_RC(qcow2_write_zeroes(img, 2 * MiB + 512, 4096, 0), 0);
    s = stats(img);
    CHECK_U64(s.data_bytes_written, >=, 4096);
    check_content(img, 2 * MiB, 512, 0xbb);
    check_content(img, 2 * MiB + 512, 4096, 0);
    check_content(img, 2 * MiB + 4608, CL - 4608, 0xbb);

    /* Part of an unallocated cluster (the rest reads as zeroes): the whole
     * cluster becomes zero-plain even with NO_FALLBACK. */
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 3 * MiB + 512, 4096, QCOW2_REQ_NO_FALLBACK), 0);
    s = stats(img);
    CHECK_U64(s.data_bytes_written, ==, 0);
    check_extent(img, 3 * MiB, CL, QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_ZERO);

    /* FUA on a request with nothing to do. */
    CHECK_RC(qcow2_write_zeroes(img, 0, MiB, QCOW2_REQ_FUA), 0);
    CHECK_RC(qcow2_close(img), 0);

    oracle("ignore", "-c 'write -z 0 1M' -c 'write -z 0 1M' -c 'write -z -u 0 1M' "
                     "-c 'write -z 2097664 4096' -c 'write -z -n 3146240 4096' "
                     "-c 'write -z -f 0 1M'");
    compare_with_oracle(1);
}

/* v3, discard mode unmap: MAY_UNMAP frees zero-alloc and data clusters. */
static void scenario_v3_unmap(void) {
    if (!prepare("v3unmap", "qemu-img create -q -f qcow2 \"$IMG\" 4M && "
                            "qemu-io -c 'write -P 0xaa 0 1M' -c 'write -z 0 1M' "
                            "-c 'write -P 0xcc 1M 1M' -c 'write -P 0xdd 3M 64k' \"$IMG\""))
        return;
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR | QCOW2_OPEN_UNMAP, &img), 0);
    Qcow2Stats s;
    check_extent(img, 0, MiB, QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_ZERO | QCOW2_EXTENT_OFFSET_VALID);

    /* zero-alloc + MAY_UNMAP: zero-plain, clusters freed and punched. */
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, MiB, QCOW2_REQ_MAY_UNMAP), 0);
    s = stats(img);
    CHECK_U64(s.l2_dirty_marks, ==, 1);
    CHECK_U64(s.data_bytes_written, ==, 0);
    CHECK_U64(s.zero_entries_skipped, ==, 0);
    check_extent(img, 0, MiB, QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_ZERO);
    CHECK_RC(qcow2_flush(img), 0);
    s = stats(img);
    CHECK_U64(s.l2_writebacks, >=, 1);
    CHECK_U64(s.refblock_writebacks, >, 0);
    CHECK_U64(s.holes_punched, >, 0);
    CHECK_U64(s.file_syncs, >=, 1);

    /* Again: all zero-plain already, nothing happens. */
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, MiB, QCOW2_REQ_MAY_UNMAP), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, MiB, 0), 0);
    s = stats(img);
    CHECK_U64(s.l2_dirty_marks, ==, 0);
    CHECK_U64(s.refblock_dirty_marks, ==, 0);
    CHECK_U64(s.zero_entries_skipped, ==, 2 * (MiB / CL));
    CHECK_RC(qcow2_flush(img), 0);
    s = stats(img);
    CHECK_U64(s.l2_writebacks, ==, 0);
    CHECK_U64(s.refblock_writebacks, ==, 0);
    CHECK_U64(s.file_syncs, ==, 0);
    CHECK_U64(s.holes_punched, ==, 0);

    /* Normal data + MAY_UNMAP: freed too. */
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, MiB, MiB, QCOW2_REQ_MAY_UNMAP), 0);
    check_content(img, MiB, MiB, 0);
    check_extent(img, MiB, MiB, QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_ZERO);
    CHECK_RC(qcow2_flush(img), 0);
    s = stats(img);
    CHECK_U64(s.refblock_writebacks, >, 0);
    CHECK_U64(s.holes_punched, >, 0);

    /* Normal data without MAY_UNMAP: zero-alloc, refcounts untouched. */
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 3 * MiB, CL, 0), 0);
    s = stats(img);
    CHECK_U64(s.refblock_dirty_marks, ==, 0);
    check_extent(img, 3 * MiB, CL, QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_ZERO | QCOW2_EXTENT_OFFSET_VALID);

    /* Unallocated -> zero-plain, whatever the flags. */
    CHECK_RC(qcow2_write_zeroes(img, 2 * MiB, 2 * CL, QCOW2_REQ_MAY_UNMAP), 0);
    check_extent(img, 2 * MiB, 2 * CL, QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_ZERO);
    CHECK_RC(qcow2_close(img), 0);

    oracle("unmap", "-c 'write -z -u 0 1M' -c 'write -z -u 0 1M' -c 'write -z 0 1M' "
                    "-c 'write -z -u 1M 1M' -c 'write -z 3M 64k' -c 'write -z -u 2M 128k'");
    compare_with_oracle(1);
}

/* v2 images cannot store the zero flag: NO_FALLBACK is never honoured. */
static void scenario_v2(void) {
    if (!prepare("v2", "qemu-img create -q -f qcow2 -o compat=0.10 \"$IMG\" 4M && "
                       "qemu-io -c 'write -P 0xaa 0 128k' \"$IMG\""))
        return;
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR | QCOW2_OPEN_UNMAP, &img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, CL, QCOW2_REQ_NO_FALLBACK), -ENOTSUP);
    CHECK_RC(qcow2_write_zeroes(img, 0, CL, QCOW2_REQ_NO_FALLBACK | QCOW2_REQ_MAY_UNMAP), -ENOTSUP);
    CHECK_RC(qcow2_write_zeroes(img, MiB, CL, QCOW2_REQ_NO_FALLBACK), -ENOTSUP);
    CHECK_RC(qcow2_write_zeroes(img, 512, 4096, QCOW2_REQ_NO_FALLBACK), -ENOTSUP);
    check_content(img, 0, 2 * CL, 0xaa);

    /* Without a backing file, whole clusters are discarded to unallocated. */
    CHECK_RC(qcow2_write_zeroes(img, 0, CL, 0), 0);
    check_content(img, 0, CL, 0);
    check_extent(img, 0, CL, QCOW2_EXTENT_ZERO);
    check_content(img, CL, CL, 0xaa);
    CHECK_RC(qcow2_close(img), 0);

    oracle("unmap", "-c 'write -z 0 64k'");
    compare_with_oracle(1);

    /* Same in discard mode ignore. */
    if (!prepare("v2ignore", "qemu-img create -q -f qcow2 -o compat=0.10 \"$IMG\" 4M && "
                             "qemu-io -c 'write -P 0xaa 0 128k' \"$IMG\""))
        return;
    img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR, &img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, CL, QCOW2_REQ_NO_FALLBACK), -ENOTSUP);
    CHECK_RC(qcow2_write_zeroes(img, CL, CL, 0), 0);
    check_content(img, CL, CL, 0);
    check_content(img, 0, CL, 0xaa);
    CHECK_RC(qcow2_close(img), 0);
    oracle("ignore", "-c 'write -z 64k 64k'");
    compare_with_oracle(1);
}

/* A backing file: partial clusters whose rest has backing data fall back. */
static void scenario_backing(void) {
    if (!prepare("overlay", "qemu-img create -q -f qcow2 base.qcow2 4M && "
                            "qemu-io -c 'write -P 0x11 0 1M' base.qcow2 && "
                            "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 \"$IMG\""))
        return;
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR, &img), 0);
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, CL, QCOW2_REQ_NO_FALLBACK), 0);
    check_content(img, 0, CL, 0);
    check_extent(img, 0, CL, QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_ZERO);
    CHECK_RC(qcow2_write_zeroes(img, CL + 512, 4096, QCOW2_REQ_NO_FALLBACK), -ENOTSUP);
    check_content(img, CL, CL, 0x11);
    CHECK_RC(qcow2_write_zeroes(img, CL + 512, 4096, 0), 0);
    check_content(img, CL, 512, 0x11);
    check_content(img, CL + 512, 4096, 0);
    check_content(img, CL + 4608, CL - 4608, 0x11);
    CHECK_RC(qcow2_close(img), 0);
    oracle("ignore", "-c 'write -z -n 0 64k' -c 'write -z 66048 4096'");
    compare_with_oracle(0);
}

/* Extended L2: subcluster-aligned zeroing of a data cluster is metadata only. */
static void scenario_extended_l2(void) {
    if (!prepare("extl2", "qemu-img create -q -f qcow2 -o extended_l2=on \"$IMG\" 4M && "
                          "qemu-io -c 'write -P 0xaa 0 64k' \"$IMG\""))
        return;
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR, &img), 0);
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, 2048, QCOW2_REQ_NO_FALLBACK), 0);
    Qcow2Stats s = stats(img);
    CHECK_U64(s.data_bytes_written, ==, 0);
    CHECK_RC(qcow2_write_zeroes(img, 4608, 512, QCOW2_REQ_NO_FALLBACK), -ENOTSUP);
    CHECK_RC(qcow2_write_zeroes(img, MiB, 2048, QCOW2_REQ_NO_FALLBACK), 0);
    check_content(img, 0, 2048, 0);
    check_content(img, 2048, CL - 2048, 0xaa);
    CHECK_RC(qcow2_close(img), 0);
    oracle("ignore", "-c 'write -z -n 0 2048' -c 'write -z -n 1M 2048'");
    compare_with_oracle(1);
}

/* Compressed clusters: zeroed whole -> zero-plain and freed; hit partially ->
 * rewritten as normal data. */
static void scenario_compressed(void) {
    if (!prepare("compressed", "qemu-img create -q -f qcow2 \"$IMG\" 4M && "
                               "qemu-io -c 'write -c -P 0xaa 0 64k' -c 'write -c -P 0xbb 64k 64k' "
                               "-c 'write -c -P 0xcc 128k 64k' \"$IMG\""))
        return;
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR, &img), 0);
    /* As qemu-img map: compressed clusters show no host offset. */
    check_extent(img, 0, CL, QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_DATA | QCOW2_EXTENT_COMPRESSED);
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, CL, 0), 0);
    check_extent(img, 0, CL, QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_ZERO);
    check_content(img, 0, CL, 0);
    CHECK_RC(qcow2_flush(img), 0);
    Qcow2Stats s = stats(img);
    CHECK_U64(s.data_bytes_written, ==, 0);
    CHECK_U64(s.refblock_writebacks, >, 0); /* the compressed cluster was freed */
    /* Same with MAY_UNMAP (discard mode ignore clears it; compressed unmaps anyway). */
    CHECK_RC(qcow2_write_zeroes(img, CL, CL, QCOW2_REQ_MAY_UNMAP), 0);
    check_extent(img, CL, CL, QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_ZERO);
    /* Partial: the cluster becomes normal data. */
    CHECK_RC(qcow2_write_zeroes(img, 2 * CL + 4096, 4096, QCOW2_REQ_NO_FALLBACK), -ENOTSUP);
    CHECK_RC(qcow2_write_zeroes(img, 2 * CL + 4096, 4096, 0), 0);
    check_content(img, 2 * CL, 4096, 0xcc);
    check_content(img, 2 * CL + 4096, 4096, 0);
    check_content(img, 2 * CL + 8192, CL - 8192, 0xcc);
    check_extent(img, 2 * CL, CL, QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_DATA | QCOW2_EXTENT_OFFSET_VALID);
    CHECK_RC(qcow2_close(img), 0);
    oracle("ignore", "-c 'write -z 0 64k' -c 'write -z -u 64k 64k' -c 'write -z 135168 4096'");
    compare_with_oracle(0);
}

/* v2 with a backing file: the zero flag is not available, zero data is written. */
static void scenario_v2_backing(void) {
    if (!prepare("v2overlay", "qemu-img create -q -f qcow2 -o compat=0.10 base2.qcow2 4M && "
                              "qemu-io -c 'write -P 0x11 0 1M' base2.qcow2 && "
                              "qemu-img create -q -f qcow2 -o compat=0.10 -b base2.qcow2 -F qcow2 "
                              "\"$IMG\" && qemu-io -c 'write -P 0x22 1M 64k' \"$IMG\""))
        return;
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR | QCOW2_OPEN_UNMAP, &img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, CL, QCOW2_REQ_NO_FALLBACK), -ENOTSUP);
    CHECK_RC(qcow2_write_zeroes(img, MiB, CL, QCOW2_REQ_NO_FALLBACK | QCOW2_REQ_MAY_UNMAP), -ENOTSUP);
    check_content(img, 0, CL, 0x11);
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, CL, 0), 0);
    Qcow2Stats s = stats(img);
    CHECK_U64(s.data_bytes_written, >=, CL);
    check_content(img, 0, CL, 0);
    check_content(img, CL, CL, 0x11);
    CHECK_RC(qcow2_write_zeroes(img, MiB, CL, QCOW2_REQ_MAY_UNMAP), 0);
    check_content(img, MiB, CL, 0);
    CHECK_RC(qcow2_close(img), 0);
    oracle("unmap", "-c 'write -z 0 64k' -c 'write -z -u 1M 64k'");
    compare_with_oracle(0);
}

/* Discard: whole clusters only; what each kind of cluster becomes. */
static void scenario_discard(void) {
    if (!prepare("discard", "qemu-img create -q -f qcow2 b3.qcow2 4M && "
                            "qemu-io -c 'write -P 0x11 0 4M' b3.qcow2 && "
                            "qemu-img create -q -f qcow2 -b b3.qcow2 -F qcow2 \"$IMG\" && "
                            "qemu-io -c 'write -P 0x22 0 512k' -c 'write -z 512k 128k' \"$IMG\""))
        return;
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR | QCOW2_OPEN_UNMAP, &img), 0);
    CHECK_RC(qcow2_discard(img, 512, 4096), 0); /* partial: no-op */
    check_content(img, 0, CL, 0x22);
    CHECK_RC(qcow2_discard(img, CL + 512, 2 * CL), 0); /* only cluster 2 is whole */
    check_content(img, CL, CL, 0x22);
    check_content(img, 2 * CL, CL, 0);
    check_content(img, 3 * CL, CL, 0x22);
    CHECK_RC(qcow2_discard(img, 512 * KiB, 128 * KiB), 0);
    CHECK_RC(qcow2_discard(img, 2 * MiB, CL), 0); /* unallocated over backing */
    check_content(img, 2 * MiB, CL, 0);
    CHECK_RC(qcow2_close(img), 0);
    oracle("unmap", "-c 'discard 512 4096' -c 'discard 66048 128k' -c 'discard 512k 128k' "
                    "-c 'discard 2M 64k'");
    compare_with_oracle(1);

    /* Discard mode ignore: discard is a no-op. */
    if (!prepare("discard-ignore", "qemu-img create -q -f qcow2 \"$IMG\" 4M && "
                                   "qemu-io -c 'write -P 0x33 0 256k' \"$IMG\""))
        return;
    img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR, &img), 0);
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_discard(img, 0, 256 * KiB), 0);
    check_content(img, 0, 256 * KiB, 0x33);
    Qcow2Stats s = stats(img);
    CHECK_U64(s.l2_dirty_marks, ==, 0);
    CHECK_RC(qcow2_close(img), 0);
    oracle("ignore", "-c 'discard 0 256k'");
    compare_with_oracle(1);
}

/* Small clusters: requests span several L2 tables and refcount blocks. */
static void scenario_small_clusters(void) {
    if (!prepare("small", "qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=1 "
                          "\"$IMG\" 16M && qemu-io -c 'write -P 0x44 0 8M' \"$IMG\""))
        return;
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR | QCOW2_OPEN_UNMAP, &img), 0);
    const uint64_t n = 6 * MiB / 4096;
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, MiB, 6 * MiB, 0), 0);
    Qcow2Stats s = stats(img);
    CHECK_U64(s.l2_dirty_marks, >=, 3); /* at least one per L2 table (2 MiB each) */
    CHECK_U64(s.refblock_dirty_marks, ==, 0);
    CHECK_RC(qcow2_flush(img), 0);
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, MiB, 6 * MiB, 0), 0);
    s = stats(img);
    CHECK_U64(s.zero_entries_skipped, ==, n);
    CHECK_U64(s.l2_dirty_marks, ==, 0);
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 2 * MiB, 4 * MiB, QCOW2_REQ_MAY_UNMAP), 0);
    CHECK_RC(qcow2_flush(img), 0);
    s = stats(img);
    CHECK_U64(s.refblock_writebacks, >, 0);
    CHECK_U64(s.holes_punched, >, 0);
    check_content(img, 0, MiB, 0x44);
    check_content(img, MiB, 6 * MiB, 0);
    check_content(img, 7 * MiB, MiB, 0x44);
    /* Partial cluster with data around it: fallback writes zeroes. */
    CHECK_RC(qcow2_write_zeroes(img, 7 * MiB + 100, 5000, QCOW2_REQ_NO_FALLBACK), -ENOTSUP);
    CHECK_RC(qcow2_write_zeroes(img, 7 * MiB + 100, 5000, QCOW2_REQ_MAY_UNMAP), 0);
    check_content(img, 7 * MiB + 100, 5000, 0);
    check_content(img, 7 * MiB + 5100, 1000, 0x44);
    CHECK_RC(qcow2_close(img), 0);
    oracle("unmap", "-c 'write -z 1M 6M' -c 'write -z 1M 6M' -c 'write -z -u 2M 4M' "
                    "-c 'write -z -u 7340132 5000'");
    compare_with_oracle(1);
}

/* Extended L2 with MAY_UNMAP and partial subclusters. */
static void scenario_extended_l2_unmap(void) {
    if (!prepare("extl2unmap", "qemu-img create -q -f qcow2 -o extended_l2=on \"$IMG\" 4M && "
                               "qemu-io -c 'write -P 0xaa 0 256k' \"$IMG\""))
        return;
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR | QCOW2_OPEN_UNMAP, &img), 0);
    CHECK_RC(qcow2_write_zeroes(img, 0, CL, QCOW2_REQ_MAY_UNMAP), 0);
    CHECK_RC(qcow2_write_zeroes(img, CL, CL, 0), 0);
    CHECK_RC(qcow2_write_zeroes(img, 2 * CL + 2048, 4096, QCOW2_REQ_MAY_UNMAP), 0);
    CHECK_RC(qcow2_write_zeroes(img, 3 * CL + 100, 300, 0), 0);
    CHECK_RC(qcow2_discard(img, 3 * CL + 8192, 8192), 0);
    check_content(img, 0, 2 * CL, 0);
    check_content(img, 2 * CL, 2048, 0xaa);
    check_content(img, 2 * CL + 2048, 4096, 0);
    check_content(img, 3 * CL + 100, 300, 0);
    CHECK_RC(qcow2_close(img), 0);
    oracle("unmap", "-c 'write -z -u 0 64k' -c 'write -z 64k 64k' -c 'write -z -u 133120 4096' "
                    "-c 'write -z 196708 300' -c 'discard 204800 8192'");
    compare_with_oracle(1);
}

int main(int argc, char **argv) {
    h_init(argc, argv);
    scenario_v3_no_unmap();
    scenario_v3_unmap();
    scenario_v2();
    scenario_backing();
    scenario_extended_l2();
    scenario_compressed();
    scenario_v2_backing();
    scenario_discard();
    scenario_small_clusters();
    scenario_extended_l2_unmap();
    return h_finish();
}
