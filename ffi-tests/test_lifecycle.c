/*
 * Image lifecycle operations through the C ABI, judged by QEMU:
 *  - qcow2_set_backing: the header qemu-img rebase -u writes on a copy is
 *    the same, byte for byte; qemu-img info reports the new name and
 *    format; reads go through the new chain at once;
 *  - qcow2_make_empty: qemu-io's `alloc` finds nothing allocated in the
 *    image, reads go through the backing file, as after qemu-img commit;
 *  - qcow2_amend: compat, lazy refcounts and refcount width as qemu-img
 *    info reports them, content equal to a copy amended by qemu-img amend;
 *  - every function: NULL arguments, bad values, read-only handles, each
 *    with its message; qemu-img check finds every image clean.
 */
#include "harness.h"

/* `qemu-img info --output=json` of `path` contains `needle` (a grep -F pattern). */
static int qemu_info_has(const char *path, const char *needle) {
    return h_sh("qemu-img info -U --output=json '%s' | grep -qF -- '%s'", path, needle) == 0;
}

/* qemu-io (through the image's own backing chain) reads `pattern` at [off, off+len). */
static int qemu_reads(const char *path, unsigned pattern, uint64_t off, uint64_t len) {
    return h_sh("qemu-io -r -U -c 'read -P %u %" PRIu64 " %" PRIu64 "' '%s' | grep -q '^read'",
                pattern, off, len, path) == 0;
}

/* Our library reads bytes equal to `v` at [off, off+len) (len <= 64 KiB). */
static int lib_reads(Qcow2Image *img, uint8_t v, uint64_t off, size_t len) {
    static uint8_t buf[65536];
    if (len > sizeof buf || qcow2_read(img, off, buf, len) != 0)
        return 0;
    return h_all(buf, len, v);
}

static void test_set_backing(void) {
    char b1[8192], b2[8192], top[8192], ref[8192];
    h_path(b1, sizeof b1, "base1.qcow2");
    h_path(b2, sizeof b2, "base2.qcow2");
    h_path(top, sizeof top, "sb-top.qcow2");
    h_path(ref, sizeof ref, "sb-ref.qcow2");
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-io -c 'write -P 0x11 0 64k' '%s' "
               ">/dev/null && qemu-img create -q -f raw '%s' 1M && "
               "qemu-io -f raw -c 'write -P 0x22 0 64k' '%s' >/dev/null",
               b1, b1, b2, b2) == 0);
    Qcow2CreateOptions o;
    memset(&o, 0, sizeof o);
    o.backing_file = b1;
    o.backing_format = "qcow2";
    CHECK_RC(qcow2_create(top, 1u << 20, &o), 0);
    CHECK(h_sh("cp '%s' '%s'", top, ref) == 0);

    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(top, QCOW2_OPEN_RDWR, &img), 0);
    if (!img)
        return;
    CHECK(lib_reads(img, 0x11, 0, 65536));
    /* Absolute name and a format: reads go through the new chain at once. */
    CHECK_RC(qcow2_set_backing(img, b2, "raw"), 0);
    CHECK(lib_reads(img, 0x22, 0, 65536));
    CHECK_RC(qcow2_close(img), 0);
    CHECK(h_sh("qemu-img rebase -q -u -b '%s' -F raw '%s'", b2, ref) == 0);
    CHECK(h_same_file(top, ref));
    CHECK(qemu_info_has(top, "\"backing-filename-format\": \"raw\""));
    CHECK(h_qemu_check(top));
    CHECK(qemu_reads(top, 0x22, 0, 65536));

    /* A relative name without a format (probed on open), then none at all. */
    img = NULL;
    CHECK_RC(qcow2_open(top, QCOW2_OPEN_RDWR, &img), 0);
    if (!img)
        return;
    CHECK_RC(qcow2_set_backing(img, "base1.qcow2", NULL), 0);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(qemu_info_has(top, "\"backing-filename\": \"base1.qcow2\""));
    CHECK(!qemu_info_has(top, "backing-filename-format"));
    CHECK(qemu_reads(top, 0x11, 0, 65536));
    CHECK(h_qemu_check(top));

    img = NULL;
    CHECK_RC(qcow2_open(top, QCOW2_OPEN_RDWR, &img), 0);
    if (!img)
        return;
    CHECK_RC(qcow2_set_backing(img, NULL, NULL), 0);
    CHECK(lib_reads(img, 0, 0, 65536));
    /* "" is no backing file too. */
    CHECK_RC(qcow2_set_backing(img, "", NULL), 0);
    /* Argument errors, with the handle left as it was. */
    CHECK_RC(qcow2_set_backing(NULL, b1, "qcow2"), -EINVAL);
    CHECK_RC(qcow2_set_backing(img, NULL, "qcow2"), -EINVAL);
    CHECK(strstr(qcow2_last_error(), "qcow2_set_backing") != NULL);
    CHECK_RC(qcow2_set_backing(img, "", "qcow2"), -EINVAL);
    char longname[1100];
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = 0;
    CHECK_RC(qcow2_set_backing(img, longname, NULL), -EINVAL);
    CHECK_RC(qcow2_set_backing(img, b1, "\xff\xfe"), -EINVAL);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(h_sh("qemu-img rebase -q -u -b '' '%s'", ref) == 0);
    CHECK(h_same_file(top, ref));
    CHECK(!qemu_info_has(top, "backing-filename"));
    CHECK(h_qemu_check(top));

    /* Read-only handle. */
    img = NULL;
    CHECK_RC(qcow2_open(top, 0, &img), 0);
    if (!img)
        return;
    CHECK_RC(qcow2_set_backing(img, b1, "qcow2"), -EROFS);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(!qemu_info_has(top, "backing-filename"));
}

static void test_make_empty(void) {
    char base[8192], top[8192], ref_base[8192], ref_top[8192], lone[8192];
    h_path(base, sizeof base, "me-base.qcow2");
    h_path(top, sizeof top, "me-top.qcow2");
    h_path(ref_base, sizeof ref_base, "me-ref-base.qcow2");
    h_path(ref_top, sizeof ref_top, "me-ref-top.qcow2");
    h_path(lone, sizeof lone, "me-lone.qcow2");
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-io -c 'write -P 0x11 0 128k' '%s' "
               ">/dev/null && qemu-img create -q -f qcow2 -b '%s' -F qcow2 '%s' && "
               "qemu-io -c 'write -P 0x33 64k 64k' -c 'write -P 0x44 512k 128k' "
               "-c 'write -z 768k 64k' '%s' >/dev/null && "
               "cp '%s' '%s' && qemu-img create -q -f qcow2 -b '%s' -F qcow2 '%s' && "
               "qemu-io -c 'write -P 0x33 64k 64k' -c 'write -P 0x44 512k 128k' "
               "-c 'write -z 768k 64k' '%s' >/dev/null",
               base, base, base, top, top, base, ref_base, ref_base, ref_top, ref_top) == 0);
    struct stat before, after;
    CHECK(stat(top, &before) == 0);

    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(top, QCOW2_OPEN_RDWR, &img), 0);
    if (!img)
        return;
    CHECK(lib_reads(img, 0x33, 65536, 65536));
    CHECK_RC(qcow2_make_empty(img), 0);
    /* Reads fall through to the backing file at once. */
    CHECK(lib_reads(img, 0x11, 0, 65536));
    CHECK(lib_reads(img, 0x11, 65536, 65536));
    CHECK(lib_reads(img, 0, 512 * 1024, 65536));
    /* Usable afterwards. */
    uint8_t buf[4096];
    memset(buf, 0x55, sizeof buf);
    CHECK_RC(qcow2_write(img, 900 * 1024, buf, sizeof buf, 0), 0);
    CHECK_RC(qcow2_make_empty(img), 0);
    CHECK_RC(qcow2_make_empty(NULL), -EINVAL);
    CHECK_RC(qcow2_close(img), 0);

    /* qemu-img commit empties the reference top image: same allocation
     * (none, in the top image alone), same reads through the chain. */
    CHECK(h_sh("qemu-img commit -q '%s'", ref_top) == 0);
    CHECK(h_sh("qemu-io -r -c 'alloc 0 1M' '%s' | grep -q '^0/1048576 bytes allocated'", top) ==
          0);
    CHECK(h_sh("qemu-io -r -c 'alloc 0 1M' '%s' | grep -q '^0/1048576 bytes allocated'",
               ref_top) == 0);
    CHECK(qemu_reads(top, 0x11, 0, 131072));
    CHECK(qemu_reads(top, 0, 131072, 917504));
    CHECK(h_qemu_check(top));
    CHECK(stat(top, &after) == 0);
    CHECK_U64(after.st_size, <, before.st_size);

    /* Without a backing file the image reads as zeroes. */
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-io -c 'write -P 0x66 0 1M' '%s' "
               ">/dev/null",
               lone, lone) == 0);
    img = NULL;
    CHECK_RC(qcow2_open(lone, QCOW2_OPEN_RDWR, &img), 0);
    if (!img)
        return;
    CHECK_RC(qcow2_make_empty(img), 0);
    CHECK(lib_reads(img, 0, 0, 65536));
    CHECK(lib_reads(img, 0, 1048576 - 65536, 65536));
    CHECK_RC(qcow2_close(img), 0);
    CHECK(qemu_reads(lone, 0, 0, 1048576));
    CHECK(h_qemu_check(lone));

    /* Read-only handle: refused, nothing changes. */
    CHECK(h_sh("qemu-io -c 'write -P 0x66 0 64k' '%s' >/dev/null", lone) == 0);
    img = NULL;
    CHECK_RC(qcow2_open(lone, 0, &img), 0);
    if (!img)
        return;
    CHECK_RC(qcow2_make_empty(img), -EROFS);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(qemu_reads(lone, 0x66, 0, 65536));
}

/* Amends `ours` with the C ABI and `ref` with qemu-img amend (`qemu_opts`),
 * then compares what qemu-img sees. */
static void amend_like_qemu(const char *ours, const char *ref, Qcow2AmendOptions o,
                            const char *qemu_opts) {
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR, &img), 0);
    if (!img)
        return;
    CHECK_RC(qcow2_amend(img, &o), 0);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(h_sh("qemu-img amend -q -o %s '%s'", qemu_opts, ref) == 0);
    CHECK(h_qemu_check(ours));
    CHECK(h_sh("qemu-img compare -q '%s' '%s'", ours, ref) == 0);
    /* The format-specific data qemu-img reports is the same. */
    CHECK(h_sh("a=$(qemu-img info --output=json '%s' | sed -n '/\"type\": \"qcow2\"/,/}/p'); "
               "b=$(qemu-img info --output=json '%s' | sed -n '/\"type\": \"qcow2\"/,/}/p'); "
               "[ -n \"$a\" ] && [ \"$a\" = \"$b\" ]",
               ours, ref) == 0);
}

static void test_amend(void) {
    char a[8192], r[8192], bm[8192];
    h_path(a, sizeof a, "am.qcow2");
    h_path(r, sizeof r, "am-ref.qcow2");
    h_path(bm, sizeof bm, "am-bm.qcow2");
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-io -c 'write -P 0x21 0 128k' "
               "-c 'write -z 256k 64k' -c 'write -P 0x22 320k 64k' -c 'write -z -u 320k 64k' '%s' "
               ">/dev/null && cp '%s' '%s'",
               a, a, a, r) == 0);
    Qcow2AmendOptions o;

    /* A zero-filled struct changes nothing. */
    memset(&o, 0, sizeof o);
    amend_like_qemu(a, r, o, "compat=1.1");
    CHECK(qemu_info_has(a, "\"compat\": \"1.1\""));

    memset(&o, 0, sizeof o);
    o.lazy_refcounts = QCOW2_AMEND_LAZY_ON;
    amend_like_qemu(a, r, o, "lazy_refcounts=on");
    CHECK(qemu_info_has(a, "\"lazy-refcounts\": true"));

    memset(&o, 0, sizeof o);
    o.lazy_refcounts = QCOW2_AMEND_LAZY_OFF;
    o.refcount_bits = 64;
    amend_like_qemu(a, r, o, "lazy_refcounts=off,refcount_bits=64");
    CHECK(qemu_info_has(a, "\"refcount-bits\": 64"));
    CHECK(qemu_info_has(a, "\"lazy-refcounts\": false"));

    /* Downgrade (zero clusters expanded), back to 16-bit refcounts. */
    memset(&o, 0, sizeof o);
    o.version = 2;
    o.refcount_bits = 16;
    amend_like_qemu(a, r, o, "compat=0.10,refcount_bits=16");
    CHECK(qemu_info_has(a, "\"compat\": \"0.10\""));
    CHECK(qemu_reads(a, 0x21, 0, 131072));
    CHECK(qemu_reads(a, 0, 256 * 1024, 131072));

    /* Argument errors and refusals; the image is left as it was. */
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(a, QCOW2_OPEN_RDWR, &img), 0);
    if (!img)
        return;
    memset(&o, 0, sizeof o);
    CHECK_RC(qcow2_amend(NULL, &o), -EINVAL);
    CHECK_RC(qcow2_amend(img, NULL), -EINVAL);
    CHECK(strstr(qcow2_last_error(), "opts") != NULL);
    o.version = 4;
    CHECK_RC(qcow2_amend(img, &o), -EINVAL);
    o.version = 1;
    CHECK_RC(qcow2_amend(img, &o), -EINVAL);
    memset(&o, 0, sizeof o);
    o.lazy_refcounts = 3;
    CHECK_RC(qcow2_amend(img, &o), -EINVAL);
    memset(&o, 0, sizeof o);
    o.refcount_bits = 3;
    CHECK_RC(qcow2_amend(img, &o), -EINVAL);
    o.refcount_bits = 128;
    CHECK_RC(qcow2_amend(img, &o), -EINVAL);
    /* v2 image: no lazy refcounts, no other refcount width. */
    memset(&o, 0, sizeof o);
    o.lazy_refcounts = QCOW2_AMEND_LAZY_ON;
    CHECK_RC(qcow2_amend(img, &o), -EINVAL);
    memset(&o, 0, sizeof o);
    o.refcount_bits = 8;
    CHECK_RC(qcow2_amend(img, &o), -EINVAL);
    /* Upgrade with lazy refcounts in one call, then a width too narrow. */
    memset(&o, 0, sizeof o);
    o.version = 3;
    o.lazy_refcounts = QCOW2_AMEND_LAZY_ON;
    CHECK_RC(qcow2_amend(img, &o), 0);
    CHECK(lib_reads(img, 0x21, 0, 65536));
    CHECK_RC(qcow2_snapshot_create(img, "s1", NULL), 0);
    CHECK_RC(qcow2_snapshot_create(img, "s2", NULL), 0);
    memset(&o, 0, sizeof o);
    o.refcount_bits = 1; /* refcount 3 in use */
    CHECK_RC(qcow2_amend(img, &o), -EINVAL);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(qemu_info_has(a, "\"compat\": \"1.1\""));
    CHECK(qemu_info_has(a, "\"lazy-refcounts\": true"));
    CHECK(qemu_info_has(a, "\"refcount-bits\": 16"));
    CHECK(h_qemu_check(a));

    /* Read-only handle. */
    img = NULL;
    CHECK_RC(qcow2_open(a, 0, &img), 0);
    if (!img)
        return;
    memset(&o, 0, sizeof o);
    o.lazy_refcounts = QCOW2_AMEND_LAZY_OFF;
    CHECK_RC(qcow2_amend(img, &o), -EROFS);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(qemu_info_has(a, "\"lazy-refcounts\": true"));

    /* A downgrade keeps persistent bitmaps in the v2 header, as QEMU 10
     * does; a v2 reader cannot vouch for them, so qemu-img check calls
     * their clusters leaked (exit 3), as after qemu-img amend. */
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-img bitmap --add '%s' b0", bm,
               bm) == 0);
    img = NULL;
    CHECK_RC(qcow2_open(bm, QCOW2_OPEN_RDWR, &img), 0);
    if (!img)
        return;
    memset(&o, 0, sizeof o);
    o.version = 2;
    CHECK_RC(qcow2_amend(img, &o), 0);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(qemu_info_has(bm, "\"compat\": \"0.10\""));
    CHECK(h_sh("qemu-img check -q '%s' >/dev/null 2>&1; test $? -eq 3", bm) == 0);
}

int main(int argc, char **argv) {
    h_init(argc, argv);
    test_set_backing();
    test_make_empty();
    test_amend();
    return h_finish();
}
