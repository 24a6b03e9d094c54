/*
 * The C API surface: argument checking and errno values, create options,
 * open flags, read/write round trips, block status, stats, strerror.
 * Images are checked with qemu-img.
 */
#include "harness.h"

#include <limits.h>

#define MiB (1024u * 1024u)
#define KiB 1024u

static void test_strerror(void) {
    const int codes[] = {0, -EINVAL, -ENOENT, -ENOTSUP, -EIO, -ENOSPC, -EROFS, EINVAL, -99999, 12345, INT_MIN, INT_MAX};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        const char *s = qcow2_strerror(codes[i]);
        CHECK(s != NULL && s[0] != '\0');
    }
    CHECK(strcmp(qcow2_strerror(-EINVAL), qcow2_strerror(-ENOENT)) != 0);
    CHECK(strcmp(qcow2_strerror(-ENOTSUP), qcow2_strerror(-EROFS)) != 0);
}

static void test_null_arguments(void) {
    Qcow2Stats st;
    Qcow2Extent ext[4];
    size_t n = 77;
    uint64_t u = 77;
    uint8_t buf[512] = {0};
    char path[4200];
    h_path(path, sizeof path, "null.qcow2");

    CHECK_RC(qcow2_close(NULL), 0);
    CHECK_RC(qcow2_flush(NULL), -EINVAL);
    CHECK_RC(qcow2_read(NULL, 0, buf, sizeof buf), -EINVAL);
    CHECK_RC(qcow2_write(NULL, 0, buf, sizeof buf, 0), -EINVAL);
    CHECK_RC(qcow2_write_zeroes(NULL, 0, 512, 0), -EINVAL);
    CHECK_RC(qcow2_discard(NULL, 0, 512), -EINVAL);
    CHECK_RC(qcow2_get_stats(NULL, &st), -EINVAL);
    CHECK_RC(qcow2_reset_stats(NULL), -EINVAL);
    CHECK_RC(qcow2_get_virtual_size(NULL, &u), -EINVAL);
    CHECK_RC(qcow2_get_cluster_size(NULL, &u), -EINVAL);
    CHECK(u == 77);
    CHECK_RC(qcow2_block_status(NULL, 0, 512, ext, 4, &n), -EINVAL);
    CHECK(n == 77);
    CHECK_RC(qcow2_create(NULL, MiB, NULL), -EINVAL);

    Qcow2Image *img = (Qcow2Image *)&u; /* sentinel: must stay untouched on failure */
    CHECK_RC(qcow2_open(NULL, 0, &img), -EINVAL);
    CHECK(img == (Qcow2Image *)&u);
    CHECK_RC(qcow2_create(path, MiB, NULL), 0);
    CHECK_RC(qcow2_open(path, 0, NULL), -EINVAL);
}

static void test_open_errors(void) {
    char path[4200], missing[4200];
    h_path(path, sizeof path, "flags.qcow2");
    h_path(missing, sizeof missing, "does-not-exist.qcow2");
    CHECK_RC(qcow2_create(path, 4 * MiB, NULL), 0);

    Qcow2Image *sentinel = (Qcow2Image *)&sentinel;
    Qcow2Image *img = sentinel;
    CHECK_RC(qcow2_open(missing, 0, &img), -ENOENT);
    CHECK_RC(qcow2_open(missing, QCOW2_OPEN_RDWR, &img), -ENOENT);
    CHECK(img == sentinel);
    CHECK_RC(qcow2_open(path, 0x80000000u, &img), -EINVAL);
    CHECK_RC(qcow2_open(path, QCOW2_OPEN_RDWR | 0x8u, &img), -EINVAL);
    CHECK_RC(qcow2_open(path, QCOW2_OPEN_CACHE_UNSAFE | QCOW2_OPEN_CACHE_WRITETHROUGH, &img), -EINVAL);
    CHECK_RC(qcow2_open(path, QCOW2_OPEN_CACHE_NONE | QCOW2_OPEN_CACHE_UNSAFE, &img), -EINVAL);
    CHECK(img == sentinel);

    /* Not a qcow2 file: a zero-filled file. */
    char junk[4200];
    h_path(junk, sizeof junk, "junk.bin");
    FILE *f = fopen(junk, "wb");
    if (f) {
        static const uint8_t zeros[4096];
        fwrite(zeros, 1, sizeof zeros, f);
        fclose(f);
    }
    int rc = qcow2_open(junk, 0, &img);
    CHECK(rc < 0);
    CHECK(img == sentinel);

    /* Every known flag combination with one cache mode opens. */
    const uint32_t modes[] = {0, QCOW2_OPEN_CACHE_WRITETHROUGH, QCOW2_OPEN_CACHE_UNSAFE,
                              QCOW2_OPEN_CACHE_NONE,
                              QCOW2_OPEN_CACHE_NONE | QCOW2_OPEN_CACHE_WRITETHROUGH};
    for (size_t i = 0; i < 5; i++) {
        img = NULL;
        CHECK_RC(qcow2_open(path, QCOW2_OPEN_RDWR | QCOW2_OPEN_UNMAP | modes[i], &img), 0);
        CHECK(img != NULL);
        if (img) {
            uint8_t buf[4096];
            memset(buf, 0x5a, sizeof buf);
            CHECK_RC(qcow2_write(img, 65536 * (uint64_t)i, buf, sizeof buf, 0), 0);
            CHECK_RC(qcow2_flush(img), 0);
        }
        CHECK_RC(qcow2_close(img), 0);
    }
    img = NULL;
    CHECK_RC(qcow2_open(path, QCOW2_OPEN_NO_BACKING, &img), 0);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(h_qemu_check(path));
}

/* qemu-img info --output=json of `path` contains `needle`. */
static int info_has(const char *path, const char *needle) {
    return h_sh("qemu-img info --output=json '%s' | grep -q -- '%s'", path, needle) == 0;
}

static void test_create_options(void) {
    char path[4200];

    h_path(path, sizeof path, "defaults-null.qcow2");
    CHECK_RC(qcow2_create(path, 16 * MiB, NULL), 0);
    CHECK(h_qemu_check(path));
    CHECK(info_has(path, "\"cluster-size\": 65536"));
    CHECK(info_has(path, "\"compat\": \"1.1\""));
    CHECK(info_has(path, "\"refcount-bits\": 16"));
    CHECK(info_has(path, "\"virtual-size\": 16777216"));

    Qcow2CreateOptions o;
    memset(&o, 0, sizeof o);
    h_path(path, sizeof path, "defaults-zero.qcow2");
    CHECK_RC(qcow2_create(path, 16 * MiB, &o), 0);
    CHECK(h_qemu_check(path));
    CHECK(info_has(path, "\"cluster-size\": 65536"));
    CHECK(info_has(path, "\"compat\": \"1.1\""));
    CHECK(info_has(path, "\"refcount-bits\": 16"));
    CHECK(info_has(path, "\"lazy-refcounts\": false"));
    CHECK(info_has(path, "\"extended-l2\": false"));

    memset(&o, 0, sizeof o);
    o.version = 2;
    h_path(path, sizeof path, "v2.qcow2");
    CHECK_RC(qcow2_create(path, 16 * MiB, &o), 0);
    CHECK(h_qemu_check(path));
    CHECK(info_has(path, "\"compat\": \"0.10\""));

    memset(&o, 0, sizeof o);
    o.version = 3;
    o.cluster_size = 4096;
    o.refcount_bits = 8;
    o.lazy_refcounts = true;
    h_path(path, sizeof path, "small.qcow2");
    CHECK_RC(qcow2_create(path, 16 * MiB, &o), 0);
    CHECK(h_qemu_check(path));
    CHECK(info_has(path, "\"cluster-size\": 4096"));
    CHECK(info_has(path, "\"refcount-bits\": 8"));
    CHECK(info_has(path, "\"lazy-refcounts\": true"));

    memset(&o, 0, sizeof o);
    o.extended_l2 = true;
    h_path(path, sizeof path, "ext.qcow2");
    CHECK_RC(qcow2_create(path, 16 * MiB, &o), 0);
    CHECK(h_qemu_check(path));
    CHECK(info_has(path, "\"extended-l2\": true"));

    memset(&o, 0, sizeof o);
    o.compression_type = QCOW2_COMPRESSION_ZSTD;
    h_path(path, sizeof path, "zstd.qcow2");
    CHECK_RC(qcow2_create(path, 16 * MiB, &o), 0);
    CHECK(h_qemu_check(path));
    CHECK(info_has(path, "\"compression-type\": \"zstd\""));

    /* An empty image (qemu-img create ... 0 makes a clean one). */
    h_path(path, sizeof path, "empty.qcow2");
    CHECK_RC(qcow2_create(path, 0, NULL), 0);
    CHECK(h_qemu_check(path));
    CHECK(info_has(path, "\"virtual-size\": 0"));

    /* Bad options. */
    h_path(path, sizeof path, "bad.qcow2");
    memset(&o, 0, sizeof o);
    o.version = 4;
    CHECK_RC(qcow2_create(path, MiB, &o), -EINVAL);
    memset(&o, 0, sizeof o);
    o.version = 1;
    CHECK_RC(qcow2_create(path, MiB, &o), -EINVAL);
    memset(&o, 0, sizeof o);
    o.compression_type = 7;
    CHECK_RC(qcow2_create(path, MiB, &o), -EINVAL);
    memset(&o, 0, sizeof o);
    o.cluster_size = 3000;
    CHECK_RC(qcow2_create(path, MiB, &o), -EINVAL);
    memset(&o, 0, sizeof o);
    o.cluster_size = 256;
    CHECK_RC(qcow2_create(path, MiB, &o), -EINVAL);
    memset(&o, 0, sizeof o);
    o.refcount_bits = 3;
    CHECK_RC(qcow2_create(path, MiB, &o), -EINVAL);
    char nodir[4200];
    h_path(nodir, sizeof nodir, "no-such-dir/x.qcow2");
    CHECK_RC(qcow2_create(nodir, MiB, NULL), -ENOENT);
}

static void test_backing(void) {
    char base[4200], top[4200];
    h_path(base, sizeof base, "base.qcow2");
    h_path(top, sizeof top, "top.qcow2");
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 4M && qemu-io -c 'write -P 0x11 0 1M' '%s' >/dev/null",
               base, base) == 0);

    Qcow2CreateOptions o;
    memset(&o, 0, sizeof o);
    o.backing_file = "base.qcow2"; /* relative to the overlay's directory */
    o.backing_format = "qcow2";
    CHECK_RC(qcow2_create(top, 4 * MiB, &o), 0);
    CHECK(h_qemu_check(top));
    CHECK(info_has(top, "\"backing-filename\": \"base.qcow2\""));
    CHECK(info_has(top, "\"backing-filename-format\": \"qcow2\""));

    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(top, QCOW2_OPEN_RDWR, &img), 0);
    uint8_t *buf = malloc(MiB);
    if (!buf)
        return;
    memset(buf, 0, MiB);
    CHECK_RC(qcow2_read(img, 0, buf, 128 * KiB), 0);
    CHECK(h_all(buf, 128 * KiB, 0x11));
    CHECK_RC(qcow2_read(img, 2 * MiB, buf, 128 * KiB), 0);
    CHECK(h_all(buf, 128 * KiB, 0x00));

    /* Partial write over the backing file: copy-on-write keeps the rest. */
    memset(buf, 0x22, 4096);
    CHECK_RC(qcow2_write(img, 8192, buf, 4096, 0), 0);
    CHECK_RC(qcow2_read(img, 0, buf, 64 * KiB), 0);
    CHECK(h_all(buf, 8192, 0x11) && h_all(buf + 8192, 4096, 0x22) &&
          h_all(buf + 12288, 64 * KiB - 12288, 0x11));

    Qcow2Extent e[8];
    size_t n = 0;
    CHECK_RC(qcow2_block_status(img, 0, 4 * MiB, e, 8, &n), 0);
    CHECK(n >= 2);
    if (n >= 2) {
        CHECK(e[0].start == 0 && e[0].length == 64 * KiB && e[0].depth == 0);
        CHECK((e[0].flags & (QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_DATA)) ==
              (QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_DATA));
        CHECK(e[1].start == 64 * KiB && e[1].length == MiB - 64 * KiB && e[1].depth == 1);
        CHECK(e[1].flags & QCOW2_EXTENT_DATA);
    }

    /* Without the backing chain, unallocated clusters read as zeroes. */
    CHECK_RC(qcow2_close(img), 0);
    img = NULL;
    CHECK_RC(qcow2_open(top, QCOW2_OPEN_NO_BACKING, &img), 0);
    CHECK_RC(qcow2_read(img, 128 * KiB, buf, 64 * KiB), 0);
    CHECK(h_all(buf, 64 * KiB, 0));
    CHECK_RC(qcow2_close(img), 0);
    free(buf);
    CHECK(h_qemu_check(top));
    CHECK(h_qemu_check(base));

    /* Backing file names are bytes: not necessarily UTF-8. */
    char odd[4200], top2[4200];
    h_path(odd, sizeof odd, "base\xff\xfe.qcow2");
    h_path(top2, sizeof top2, "top2.qcow2");
    CHECK(h_sh("cp '%s' '%s'", base, odd) == 0);
    o.backing_file = "base\xff\xfe.qcow2";
    CHECK_RC(qcow2_create(top2, 4 * MiB, &o), 0);
    CHECK(info_has(top2, "\"backing-filename\": \"base\\\\uFFFD\\\\uFFFD.qcow2\""));
    img = NULL;
    CHECK_RC(qcow2_open(top2, 0, &img), 0);
    uint8_t b2[4096];
    CHECK_RC(qcow2_read(img, 0, b2, sizeof b2), 0);
    CHECK(h_all(b2, sizeof b2, 0x11));
    CHECK_RC(qcow2_close(img), 0);
    CHECK(h_qemu_check(top2));
}

static void test_read_write(void) {
    char path[4200];
    h_path(path, sizeof path, "rw.qcow2");
    CHECK_RC(qcow2_create(path, 4 * MiB, NULL), 0);

    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(path, QCOW2_OPEN_RDWR, &img), 0);
    uint64_t vs = 0, cs = 0;
    CHECK_RC(qcow2_get_virtual_size(img, &vs), 0);
    CHECK_RC(qcow2_get_cluster_size(img, &cs), 0);
    CHECK_U64(vs, ==, 4 * MiB);
    CHECK_U64(cs, ==, 65536);
    CHECK_RC(qcow2_get_virtual_size(img, NULL), -EINVAL);
    CHECK_RC(qcow2_get_cluster_size(img, NULL), -EINVAL);

    /* Counters start at zero after a reset. */
    Qcow2Stats st, zero;
    memset(&zero, 0, sizeof zero);
    CHECK_RC(qcow2_reset_stats(img), 0);
    memset(&st, 0xff, sizeof st);
    CHECK_RC(qcow2_get_stats(img, &st), 0);
    CHECK(memcmp(&st, &zero, sizeof st) == 0);
    CHECK_RC(qcow2_get_stats(img, NULL), -EINVAL);

    size_t len = 200000;
    uint8_t *w = malloc(len), *r = malloc(len);
    if (!w || !r)
        return;
    for (size_t i = 0; i < len; i++)
        w[i] = (uint8_t)(i * 7 + 3);
    CHECK_RC(qcow2_write(img, 100000, w, len, 0), 0);
    memset(r, 0xee, len);
    CHECK_RC(qcow2_read(img, 100000, r, len), 0);
    CHECK(memcmp(w, r, len) == 0);
    CHECK_RC(qcow2_read(img, 3 * MiB, r, 4096), 0);
    CHECK(h_all(r, 4096, 0));
    CHECK_RC(qcow2_write(img, 4 * MiB - 512, w, 512, QCOW2_REQ_FUA), 0);
    CHECK_RC(qcow2_get_stats(img, &st), 0);
    CHECK_U64(st.data_bytes_written, >=, len + 512);
    CHECK_U64(st.file_syncs, >=, 1); /* FUA */

    /* Misuse. */
    memset(r, 0xee, 512);
    CHECK_RC(qcow2_read(img, 0, NULL, 512), -EINVAL);
    CHECK_RC(qcow2_write(img, 0, NULL, 512, 0), -EINVAL);
    CHECK_RC(qcow2_write(img, 0, w, 512, 0x1), -EINVAL);
    CHECK_RC(qcow2_write(img, 0, w, 512, QCOW2_REQ_MAY_UNMAP), -EINVAL);
    CHECK_RC(qcow2_write(img, 0, w, 512, 0x80000000u), -EINVAL);
    CHECK_RC(qcow2_write_zeroes(img, 0, 512, 0x8), -EINVAL);
    CHECK_RC(qcow2_write_zeroes(img, 0, 512, 0x200), -EINVAL);
    CHECK_RC(qcow2_read(img, 4 * MiB - 512, r, 1024), -EINVAL);
    CHECK_RC(qcow2_read(img, 4 * MiB, r, 1), -EINVAL);
    CHECK_RC(qcow2_read(img, UINT64_MAX, r, 512), -EINVAL);
    CHECK_RC(qcow2_read(img, UINT64_MAX - 100, r, 512), -EINVAL);
    CHECK_RC(qcow2_write(img, 4 * MiB - 512, w, 1024, 0), -EINVAL);
    CHECK_RC(qcow2_write(img, UINT64_MAX - 100, w, 512, 0), -EINVAL);
    CHECK_RC(qcow2_write_zeroes(img, 4 * MiB, 65536, 0), -EINVAL);
    CHECK_RC(qcow2_write_zeroes(img, UINT64_MAX - 100, 65536, 0), -EINVAL);
    CHECK_RC(qcow2_write_zeroes(img, 0, UINT64_MAX, 0), -EINVAL);
    CHECK_RC(qcow2_discard(img, 4 * MiB - 65536, 2 * 65536), -EINVAL);
    CHECK_RC(qcow2_discard(img, UINT64_MAX, 1), -EINVAL);
    CHECK(h_all(r, 512, 0xee)); /* out-parameters untouched */

    /* Block status. */
    Qcow2Extent e[8];
    memset(e, 0, sizeof e);
    size_t n = 99;
    CHECK_RC(qcow2_block_status(img, 0, 4 * MiB, e, 0, &n), -EINVAL);
    CHECK_RC(qcow2_block_status(img, 0, 4 * MiB, NULL, 8, &n), -EINVAL);
    CHECK_RC(qcow2_block_status(img, 0, 4 * MiB, e, 8, NULL), -EINVAL);
    CHECK_RC(qcow2_block_status(img, 0, 4 * MiB + 1, e, 8, &n), -EINVAL);
    CHECK(n == 99);
    CHECK_RC(qcow2_block_status(img, 0, 4 * MiB, e, 8, &n), 0);
    /* data at [64K, 320K) (clusters 1..4), then zeroes, then the last cluster. */
    CHECK(n == 4);
    if (n == 4) {
        CHECK(e[0].start == 0 && e[0].length == 65536);
        CHECK(e[0].flags == QCOW2_EXTENT_ZERO);
        CHECK(e[1].start == 65536 && e[1].length == 4 * 65536);
        CHECK(e[1].flags == (QCOW2_EXTENT_ALLOCATED | QCOW2_EXTENT_DATA | QCOW2_EXTENT_OFFSET_VALID));
        CHECK(e[1].host_offset != 0 && e[1].host_offset % 65536 == 0 && e[1].depth == 0);
        CHECK(e[2].start == 5 * 65536 && e[2].start + e[2].length == 4 * MiB - 65536);
        CHECK(e[3].start == 4 * MiB - 65536 && e[3].length == 65536);
        CHECK(e[3].flags & QCOW2_EXTENT_DATA);
    }
    memset(e, 0, sizeof e);
    CHECK_RC(qcow2_block_status(img, 0, 4 * MiB, e, 1, &n), 0);
    CHECK(n == 1 && e[0].start == 0 && e[0].length == 65536 && e[1].length == 0);
    CHECK_RC(qcow2_block_status(img, 100000, 1000, e, 8, &n), 0);
    CHECK(n == 1 && e[0].start == 100000 && e[0].length == 1000);
    CHECK_RC(qcow2_block_status(img, 0, 0, e, 8, &n), 0);
    CHECK(n == 0);

    /* Discard and write-zeroes round trips. */
    CHECK_RC(qcow2_write_zeroes(img, 100000, 1000, 0), 0);
    CHECK_RC(qcow2_read(img, 99000, r, 3000), 0);
    CHECK(h_all(r, 2000, 0)); /* [99000, 100000) never written, [100000, 101000) zeroed */
    CHECK(memcmp(r + 2000, w + 1000, 1000) == 0);
    CHECK_RC(qcow2_flush(img), 0);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(h_qemu_check(path));

    /* The content as qemu sees it. */
    size_t clen = 0;
    uint8_t *c = h_qemu_content(path, &clen);
    CHECK(c != NULL && clen == 4 * MiB);
    if (c && clen == 4 * MiB) {
        CHECK(h_all(c, 100000, 0));
        CHECK(memcmp(c + 101000, w + 1000, len - 1000) == 0);
        CHECK(h_all(c + 100000, 1000, 0));
        CHECK(memcmp(c + 4 * MiB - 512, w, 512) == 0);
    }
    free(c);

    /* Read-only handle: reads work, writes are -EROFS. */
    img = NULL;
    CHECK_RC(qcow2_open(path, 0, &img), 0);
    CHECK_RC(qcow2_read(img, 101000, r, 1000), 0);
    CHECK(memcmp(r, w + 1000, 1000) == 0);
    CHECK_RC(qcow2_write(img, 0, w, 512, 0), -EROFS);
    CHECK_RC(qcow2_write_zeroes(img, 0, 65536, 0), -EROFS);
    CHECK_RC(qcow2_write_zeroes(img, 0, 65536, QCOW2_REQ_MAY_UNMAP), -EROFS);
    CHECK_RC(qcow2_flush(img), 0);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(h_qemu_check(path));

    /* Discard with unmap: whole clusters read as zeroes afterwards. */
    img = NULL;
    CHECK_RC(qcow2_open(path, QCOW2_OPEN_RDWR | QCOW2_OPEN_UNMAP, &img), 0);
    CHECK_RC(qcow2_discard(img, 65536, 2 * 65536), 0);
    CHECK_RC(qcow2_read(img, 65536, r, 2 * 65536), 0);
    CHECK(h_all(r, 2 * 65536, 0));
    CHECK_RC(qcow2_discard(img, 0, 0), 0);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(h_qemu_check(path));
    free(w);
    free(r);
}

/* The cache-mode flags reach the engine: writethrough syncs after every
 * write, unsafe never syncs, writeback syncs on flush. */
static void test_cache_modes(void) {
    char path[4200];
    h_path(path, sizeof path, "cache.qcow2");
    CHECK_RC(qcow2_create(path, 4 * MiB, NULL), 0);
    uint8_t buf[4096];
    memset(buf, 0x42, sizeof buf);
    Qcow2Stats st;
    Qcow2Image *img = NULL;

    CHECK_RC(qcow2_open(path, QCOW2_OPEN_RDWR | QCOW2_OPEN_CACHE_WRITETHROUGH, &img), 0);
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write(img, 0, buf, sizeof buf, 0), 0);
    memset(&st, 0, sizeof st);
    CHECK_RC(qcow2_get_stats(img, &st), 0);
    CHECK_U64(st.file_syncs, >=, 1);
    CHECK_RC(qcow2_close(img), 0);

    img = NULL;
    CHECK_RC(qcow2_open(path, QCOW2_OPEN_RDWR | QCOW2_OPEN_CACHE_UNSAFE, &img), 0);
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write(img, 65536, buf, sizeof buf, 0), 0);
    CHECK_RC(qcow2_flush(img), 0);
    memset(&st, 0xff, sizeof st);
    CHECK_RC(qcow2_get_stats(img, &st), 0);
    CHECK_U64(st.file_syncs, ==, 0);
    CHECK_U64(st.l2_writebacks, >=, 1);
    CHECK_RC(qcow2_close(img), 0);

    img = NULL;
    CHECK_RC(qcow2_open(path, QCOW2_OPEN_RDWR, &img), 0);
    CHECK_RC(qcow2_reset_stats(img), 0);
    CHECK_RC(qcow2_write(img, 2 * 65536, buf, sizeof buf, 0), 0);
    memset(&st, 0xff, sizeof st);
    CHECK_RC(qcow2_get_stats(img, &st), 0);
    CHECK_U64(st.file_syncs, ==, 0);
    CHECK_RC(qcow2_flush(img), 0);
    CHECK_RC(qcow2_get_stats(img, &st), 0);
    CHECK_U64(st.file_syncs, >=, 1);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(h_qemu_check(path));

    size_t clen = 0;
    uint8_t *c = h_qemu_content(path, &clen);
    CHECK(c != NULL && clen == 4 * MiB);
    if (c && clen == 4 * MiB)
        for (int i = 0; i < 3; i++)
            CHECK(memcmp(c + i * 65536, buf, sizeof buf) == 0);
    free(c);
}

/* The first byte of the incompatible-feature bits' low end (bit 0: dirty). */
static int header_dirty(const char *path) {
    uint8_t b[80];
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    size_t n = fread(b, 1, sizeof b, f);
    fclose(f);
    return n == sizeof b ? (b[79] & 1) : -1;
}

static uint64_t be64_at(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

/* QCOW2_OPEN_LAZY_REFCOUNTS / _NO_LAZY_REFCOUNTS as QEMU's lazy-refcounts
 * option (the dirty bit on disk while open, clean after close, v3 only),
 * QCOW2_OPEN_OVERLAP_INACTIVE_L2 as overlap-check.inactive-l2=on (a
 * snapshot L1 table that cannot be read fails writes with -EINVAL, and
 * nothing reaches the file). */
static void test_open_flags_lazy_and_overlap(void) {
    char path[4200], v2[4200], lazy[4200], snap[4200], copy[4200];
    uint8_t buf[4096];
    memset(buf, 0x6b, sizeof buf);
    Qcow2Image *img = NULL;

    h_path(path, sizeof path, "lazy-flag.qcow2");
    CHECK_RC(qcow2_create(path, 4 * MiB, NULL), 0);
    CHECK_RC(qcow2_open(path, QCOW2_OPEN_RDWR | QCOW2_OPEN_LAZY_REFCOUNTS |
                                  QCOW2_OPEN_NO_LAZY_REFCOUNTS, &img), -EINVAL);
    img = NULL;
    CHECK_RC(qcow2_open(path, QCOW2_OPEN_RDWR | QCOW2_OPEN_LAZY_REFCOUNTS, &img), 0);
    CHECK_RC(qcow2_write(img, 0, buf, sizeof buf, 0), 0);
    CHECK(header_dirty(path) == 1);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(header_dirty(path) == 0);
    CHECK(h_qemu_check(path));
    CHECK(info_has(path, "\"lazy-refcounts\": false"));

    Qcow2CreateOptions o;
    memset(&o, 0, sizeof o);
    o.version = 2;
    h_path(v2, sizeof v2, "lazy-flag-v2.qcow2");
    CHECK_RC(qcow2_create(v2, 4 * MiB, &o), 0);
    img = NULL;
    CHECK_RC(qcow2_open(v2, QCOW2_OPEN_RDWR | QCOW2_OPEN_LAZY_REFCOUNTS, &img), -EINVAL);

    memset(&o, 0, sizeof o);
    o.version = 3;
    o.lazy_refcounts = true;
    h_path(lazy, sizeof lazy, "lazy-header.qcow2");
    CHECK_RC(qcow2_create(lazy, 4 * MiB, &o), 0);
    img = NULL;
    CHECK_RC(qcow2_open(lazy, QCOW2_OPEN_RDWR | QCOW2_OPEN_NO_LAZY_REFCOUNTS, &img), 0);
    CHECK_RC(qcow2_write(img, 0, buf, sizeof buf, 0), 0);
    CHECK(header_dirty(lazy) == 0);
    CHECK_RC(qcow2_close(img), 0);
    img = NULL;
    CHECK_RC(qcow2_open(lazy, QCOW2_OPEN_RDWR, &img), 0);
    CHECK_RC(qcow2_write(img, 65536, buf, sizeof buf, 0), 0);
    CHECK(header_dirty(lazy) == 1);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(h_qemu_check(lazy));

    /* A snapshot whose L1 table offset is not cluster aligned. */
    h_path(snap, sizeof snap, "inactive-l2.qcow2");
    h_path(copy, sizeof copy, "inactive-l2-before.qcow2");
    CHECK_RC(qcow2_create(snap, 4 * MiB, NULL), 0);
    img = NULL;
    CHECK_RC(qcow2_open(snap, QCOW2_OPEN_RDWR, &img), 0);
    CHECK_RC(qcow2_write(img, 0, buf, sizeof buf, 0), 0);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(h_sh("qemu-img snapshot -c s1 '%s'", snap) == 0);
    FILE *f = fopen(snap, "r+b");
    CHECK(f != NULL);
    if (f) {
        uint8_t h[72], e[8];
        CHECK(fread(h, 1, sizeof h, f) == sizeof h);
        uint64_t table = be64_at(h + 64);
        CHECK(fseek(f, (long)table, SEEK_SET) == 0 && fread(e, 1, 8, f) == 8);
        uint64_t l1 = be64_at(e) + 512;
        for (int i = 0; i < 8; i++)
            e[i] = (uint8_t)(l1 >> (56 - 8 * i));
        CHECK(fseek(f, (long)table, SEEK_SET) == 0 && fwrite(e, 1, 8, f) == 8);
        fclose(f);
    }
    CHECK(h_sh("cp '%s' '%s'", snap, copy) == 0);
    img = NULL;
    CHECK_RC(qcow2_open(snap, QCOW2_OPEN_RDWR | QCOW2_OPEN_OVERLAP_INACTIVE_L2, &img), 0);
    CHECK_RC(qcow2_write(img, 0, buf, sizeof buf, 0), -EINVAL);
    CHECK_RC(qcow2_write(img, 2 * MiB, buf, sizeof buf, 0), -EINVAL);
    uint8_t back[4096];
    CHECK_RC(qcow2_read(img, 0, back, sizeof back), 0);
    CHECK(memcmp(back, buf, sizeof buf) == 0);
    qcow2_close(img);
    CHECK(h_same_file(snap, copy));
    /* Without the flag the write goes through (QEMU's default checks). */
    img = NULL;
    CHECK_RC(qcow2_open(snap, QCOW2_OPEN_RDWR, &img), 0);
    CHECK_RC(qcow2_write(img, 2 * MiB, buf, sizeof buf, 0), 0);
    CHECK_RC(qcow2_close(img), 0);
}

int main(int argc, char **argv) {
    h_init(argc, argv);
    test_strerror();
    test_null_arguments();
    test_open_errors();
    test_create_options();
    test_backing();
    test_read_write();
    test_cache_modes();
    test_open_flags_lazy_and_overlap();
    return h_finish();
}
