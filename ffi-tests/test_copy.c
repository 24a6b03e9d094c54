/*
 * Copying between images through the C ABI, judged by QEMU:
 *  - qcow2_convert into a target qemu-img created: qemu-img compare finds
 *    it equal to the source, qemu-img check clean; COMPRESS gives
 *    compressed clusters in qemu-img map; TOP_ONLY leaves unallocated what
 *    the source leaves to its backing file (map equal to qemu-img convert
 *    -B's); SPARSE_NONE allocates everything; the progress callback is
 *    monotone and ends at the total;
 *  - qcow2_commit: the base equals what qemu-img commit makes of a copy,
 *    the top is empty (qemu-io alloc), reads through the still-open top
 *    handle are right at once;
 *  - qcow2_rebase (safe): the content is unchanged (qemu-img compare with
 *    the image before), the map equals that of a copy rebased by qemu-img
 *    rebase, the header names the new file;
 *  - every error case with its errno and message.
 */
#include "harness.h"

typedef struct {
    uint64_t last, total;
    int calls, monotone;
} Prog;

static void on_progress(void *opaque, uint64_t done, uint64_t total) {
    Prog *p = opaque;
    if (p->calls > 0 && (done < p->last || total != p->total))
        p->monotone = 0;
    p->last = done;
    p->total = total;
    p->calls++;
}

static Prog prog_new(void) {
    Prog p = {0, 0, 0, 1};
    return p;
}

/* The callback was called, never went backwards and ended at `total`. */
#define CHECK_PROGRESS(p, want_total)                                                              \
    do {                                                                                           \
        CHECK((p).calls > 0);                                                                      \
        CHECK((p).monotone);                                                                       \
        CHECK_U64((p).total, ==, (want_total));                                                    \
        CHECK_U64((p).last, ==, (want_total));                                                     \
    } while (0)

/* qemu-img compare finds the two images equal (guest content). */
static int qemu_same(const char *a, const char *b) {
    return h_sh("qemu-img compare -U -q '%s' '%s'", a, b) == 0;
}

/* qemu-io (through the image's own chain) reads `pattern` at [off, off+len). */
static int qemu_reads(const char *path, unsigned pattern, uint64_t off, uint64_t len) {
    return h_sh("qemu-io -r -U -c 'read -P %u %" PRIu64 " %" PRIu64 "' '%s' | grep -q '^read'",
                pattern, off, len, path) == 0;
}

/* qemu-io's `alloc` over [off, off+len) of the image alone reports `want` bytes. */
static int qemu_alloc(const char *path, uint64_t off, uint64_t len, uint64_t want) {
    return h_sh("qemu-io -r -U -c 'alloc %" PRIu64 " %" PRIu64 "' '%s' | grep -q '^%" PRIu64
                "/%" PRIu64 " bytes allocated'",
                off, len, path, want, len) == 0;
}

/* The maps of two images (qemu-img map, host offsets removed) are equal. */
static int same_map(const char *a, const char *b) {
    char ma[8192], mb[8192];
    snprintf(ma, sizeof ma, "%s.map", a);
    snprintf(mb, sizeof mb, "%s.map", b);
    if (h_qemu_map(a, ma, 0) != 0 || h_qemu_map(b, mb, 0) != 0)
        return 0;
    if (h_same_file(ma, mb))
        return 1;
    h_show("ours", ma);
    h_show("qemu", mb);
    return 0;
}

/* Our library reads bytes equal to `v` at [off, off+len) (len <= 64 KiB). */
static int lib_reads(Qcow2Image *img, uint8_t v, uint64_t off, size_t len) {
    static uint8_t buf[65536];
    if (len > sizeof buf || qcow2_read(img, off, buf, len) != 0)
        return 0;
    return h_all(buf, len, v);
}

static Qcow2Image *open_img(const char *path, uint32_t flags) {
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(path, flags, &img), 0);
    return img;
}

/* base (0x11 in [0, 128k)) <- src: data, zeroes, zero data, a short run. */
static void make_source(const char *base, const char *src) {
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && "
               "qemu-io -c 'write -P 0x11 0 128k' '%s' >/dev/null && "
               "qemu-img create -q -f qcow2 -b '%s' -F qcow2 '%s' && "
               "qemu-io -c 'write -P 0x22 256k 64k' -c 'write -z 64k 32k' "
               "-c 'write -P 0 640k 64k' -c 'write -P 0x33 900k 4k' "
               "-c 'write -P 0x44 1000k 24k' '%s' >/dev/null",
               base, base, base, src, src) == 0);
}

static void convert_one(const char *src, const char *dst, const Qcow2ConvertOptions *o) {
    Qcow2Image *s = open_img(src, 0);
    Qcow2Image *d = open_img(dst, QCOW2_OPEN_RDWR | QCOW2_OPEN_UNMAP);
    if (s && d)
        CHECK_RC(qcow2_convert(s, d, o), 0);
    CHECK_RC(qcow2_close(s), 0);
    CHECK_RC(qcow2_close(d), 0);
}

static void test_convert(void) {
    char base[8192], src[8192], dst[8192], ref[8192], small[8192];
    h_path(base, sizeof base, "cv-base.qcow2");
    h_path(src, sizeof src, "cv-src.qcow2");
    h_path(dst, sizeof dst, "cv-dst.qcow2");
    h_path(ref, sizeof ref, "cv-ref.qcow2");
    h_path(small, sizeof small, "cv-small.qcow2");
    make_source(base, src);

    /* Defaults (NULL options), the whole chain. */
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M", dst) == 0);
    convert_one(src, dst, NULL);
    CHECK(qemu_same(src, dst));
    CHECK(h_qemu_check(dst));
    /* The same map as qemu-img convert -n into the same kind of target. */
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-img convert -n -O qcow2 '%s' '%s'",
               ref, src, ref) == 0);
    CHECK(same_map(dst, ref));
    /* The zero data was not written as data. */
    CHECK(qemu_alloc(dst, 640 * 1024, 65536, 0) || qemu_reads(dst, 0, 640 * 1024, 65536));

    /* With a progress callback; a bigger target keeps its tail. */
    Prog p = prog_new();
    Qcow2ConvertOptions o;
    memset(&o, 0, sizeof o);
    o.progress = on_progress;
    o.opaque = &p;
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 2M && qemu-io -c 'write -P 0x77 1536k 64k' '%s' "
               ">/dev/null",
               dst, dst) == 0);
    convert_one(src, dst, &o);
    CHECK_PROGRESS(p, 1048576);
    CHECK(qemu_reads(dst, 0x77, 1536 * 1024, 65536));
    CHECK(qemu_reads(dst, 0x22, 256 * 1024, 65536));
    CHECK(qemu_reads(dst, 0x11, 0, 65536));
    CHECK(h_sh("qemu-img compare -q -U '%s' '%s' 2>/dev/null; test $? -eq 1", src, dst) == 0);
    CHECK(h_qemu_check(dst));

    /* Compressed clusters, as qemu-img map shows them. */
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M", dst) == 0);
    memset(&o, 0, sizeof o);
    o.flags = QCOW2_CONVERT_COMPRESS;
    convert_one(src, dst, &o);
    CHECK(qemu_same(src, dst));
    CHECK(h_qemu_check(dst));
    CHECK(h_sh("qemu-img map --output=json '%s' | grep -q '\"compressed\": true'", dst) == 0);
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-img convert -n -c -O qcow2 '%s' '%s'",
               ref, src, ref) == 0);
    CHECK(same_map(dst, ref));

    /* Top only, into an overlay of the same base: as qemu-img convert -B. */
    CHECK(h_sh("qemu-img create -q -f qcow2 -b '%s' -F qcow2 '%s'", base, dst) == 0);
    memset(&o, 0, sizeof o);
    o.flags = QCOW2_CONVERT_TOP_ONLY;
    convert_one(src, dst, &o);
    CHECK(qemu_same(src, dst));
    CHECK(h_qemu_check(dst));
    CHECK(qemu_alloc(dst, 0, 65536, 0));
    CHECK(qemu_alloc(dst, 256 * 1024, 65536, 65536));
    CHECK(h_sh("rm -f '%s' && qemu-img convert -O qcow2 -B '%s' -F qcow2 '%s' '%s'", ref, base,
               src, ref) == 0);
    CHECK(same_map(dst, ref));

    /* Top only and compressed together. */
    CHECK(h_sh("qemu-img create -q -f qcow2 -b '%s' -F qcow2 '%s'", base, dst) == 0);
    o.flags = QCOW2_CONVERT_TOP_ONLY | QCOW2_CONVERT_COMPRESS;
    convert_one(src, dst, &o);
    CHECK(qemu_same(src, dst));
    CHECK(qemu_alloc(dst, 0, 65536, 0));
    CHECK(h_qemu_check(dst));

    /* Everything written (-S 0): fully allocated, as qemu-img's. */
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M", dst) == 0);
    memset(&o, 0, sizeof o);
    o.sparse_size = QCOW2_CONVERT_SPARSE_NONE;
    convert_one(src, dst, &o);
    CHECK(qemu_same(src, dst));
    CHECK(qemu_alloc(dst, 0, 1048576, 1048576));
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-img convert -n -S 0 -O qcow2 '%s' "
               "'%s'",
               ref, src, ref) == 0);
    CHECK(same_map(dst, ref));
    CHECK(h_qemu_check(dst));

    /* Target is zero, larger sparse size. */
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M", dst) == 0);
    memset(&o, 0, sizeof o);
    o.flags = QCOW2_CONVERT_TARGET_IS_ZERO;
    o.sparse_size = 65536;
    convert_one(src, dst, &o);
    CHECK(qemu_same(src, dst));
    CHECK(h_qemu_check(dst));

    /* Errors. */
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-img create -q -f qcow2 '%s' 512k",
               dst, small) == 0);
    Qcow2Image *s = open_img(src, 0);
    Qcow2Image *d = open_img(dst, QCOW2_OPEN_RDWR);
    Qcow2Image *d2 = open_img(dst, 0);
    Qcow2Image *sm = open_img(small, QCOW2_OPEN_RDWR);
    if (s && d && d2 && sm) {
        CHECK_RC(qcow2_convert(NULL, d, NULL), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "src") != NULL);
        CHECK_RC(qcow2_convert(s, NULL, NULL), -EINVAL);
        CHECK_RC(qcow2_convert(d, d, NULL), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "same") != NULL);
        CHECK_RC(qcow2_convert(d2, d, NULL), -EINVAL); /* same file */
        CHECK(strstr(qcow2_last_error(), "same file") != NULL);
        memset(&o, 0, sizeof o);
        o.flags = 0x80;
        CHECK_RC(qcow2_convert(s, d, &o), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "flags") != NULL);
        memset(&o, 0, sizeof o);
        o.sparse_size = 1000;
        CHECK_RC(qcow2_convert(s, d, &o), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "sparse_size") != NULL);
        o.sparse_size = 32u << 20;
        CHECK_RC(qcow2_convert(s, d, &o), -EINVAL);
        CHECK_RC(qcow2_convert(s, sm, NULL), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "too small") != NULL);
        CHECK_RC(qcow2_convert(s, d2, NULL), -EROFS);
        CHECK(strstr(qcow2_last_error(), "cv-dst.qcow2") != NULL);
    }
    CHECK_RC(qcow2_close(s), 0);
    CHECK_RC(qcow2_close(d), 0);
    CHECK_RC(qcow2_close(d2), 0);
    CHECK_RC(qcow2_close(sm), 0);
    /* Nothing was written by the refused calls. */
    CHECK(qemu_alloc(dst, 0, 1048576, 0));
    CHECK(qemu_alloc(small, 0, 524288, 0));
}

/* base (0x11 in [0, 256k)) <- top: data over and past the base's data,
 * zeroes over base data. */
static void make_pair(const char *base, const char *top) {
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && "
               "qemu-io -c 'write -P 0x11 0 256k' '%s' >/dev/null && "
               "qemu-img create -q -f qcow2 -b '%s' -F qcow2 '%s' && "
               "qemu-io -c 'write -P 0x22 64k 64k' -c 'write -z 128k 64k' "
               "-c 'write -P 0x33 600k 8k' '%s' >/dev/null",
               base, base, base, top, top) == 0);
}

static void test_commit(void) {
    char base[8192], top[8192], rbase[8192], rtop[8192], other[8192], lone[8192];
    h_path(base, sizeof base, "cm-base.qcow2");
    h_path(top, sizeof top, "cm-top.qcow2");
    h_path(rbase, sizeof rbase, "cm-rbase.qcow2");
    h_path(rtop, sizeof rtop, "cm-rtop.qcow2");
    h_path(other, sizeof other, "cm-other.qcow2");
    h_path(lone, sizeof lone, "cm-lone.qcow2");
    make_pair(base, top);
    make_pair(rbase, rtop);
    CHECK(h_sh("qemu-img commit -q '%s'", rtop) == 0);

    Qcow2Image *t = open_img(top, QCOW2_OPEN_RDWR);
    Qcow2Image *b = open_img(base, QCOW2_OPEN_RDWR);
    if (!t || !b)
        return;
    /* Reads through the top before: they fill its chain's caches. */
    CHECK(lib_reads(t, 0x22, 65536, 65536));
    CHECK(lib_reads(t, 0, 131072, 65536));
    CHECK(lib_reads(t, 0x33, 600 * 1024, 8192));
    CHECK(lib_reads(t, 0, 700 * 1024, 65536));
    Prog p = prog_new();
    CHECK_RC(qcow2_commit(t, b, 0, on_progress, &p), 0);
    CHECK_PROGRESS(p, 1048576);
    /* Right at once through the still-open top (its chain was reopened). */
    CHECK(lib_reads(t, 0x11, 0, 65536));
    CHECK(lib_reads(t, 0x22, 65536, 65536));
    CHECK(lib_reads(t, 0, 131072, 65536));
    CHECK(lib_reads(t, 0x11, 196608, 65536));
    CHECK(lib_reads(t, 0x33, 600 * 1024, 8192));
    CHECK(lib_reads(t, 0, 700 * 1024, 65536));
    CHECK_RC(qcow2_close(t), 0);
    CHECK_RC(qcow2_close(b), 0);
    CHECK(qemu_same(base, rbase));
    CHECK(qemu_reads(base, 0x22, 65536, 65536));
    CHECK(qemu_reads(base, 0x33, 600 * 1024, 8192));
    CHECK(qemu_reads(base, 0, 131072, 65536));
    CHECK(qemu_alloc(top, 0, 1048576, 0));
    CHECK(qemu_alloc(rtop, 0, 1048576, 0));
    CHECK(h_qemu_check(base));
    CHECK(h_qemu_check(top));

    /* KEEP_TOP (qemu-img commit -d): the top keeps its data. */
    make_pair(base, top);
    make_pair(rbase, rtop);
    CHECK(h_sh("qemu-img commit -q -d '%s'", rtop) == 0);
    t = open_img(top, QCOW2_OPEN_RDWR);
    b = open_img(base, QCOW2_OPEN_RDWR);
    if (!t || !b)
        return;
    CHECK_RC(qcow2_commit(t, b, QCOW2_COMMIT_KEEP_TOP, NULL, NULL), 0);
    CHECK(lib_reads(t, 0x22, 65536, 65536));
    CHECK_RC(qcow2_close(t), 0);
    CHECK_RC(qcow2_close(b), 0);
    CHECK(qemu_same(base, rbase));
    CHECK(qemu_alloc(top, 65536, 65536, 65536));
    CHECK(qemu_same(top, rtop));
    CHECK(h_qemu_check(base));
    CHECK(h_qemu_check(top));

    /* Errors. */
    make_pair(base, top);
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-img create -q -f qcow2 '%s' 1M", other,
               lone) == 0);
    t = open_img(top, QCOW2_OPEN_RDWR);
    b = open_img(base, QCOW2_OPEN_RDWR);
    Qcow2Image *bro = open_img(base, 0);
    Qcow2Image *o = open_img(other, QCOW2_OPEN_RDWR);
    Qcow2Image *l = open_img(lone, QCOW2_OPEN_RDWR);
    Qcow2Image *tnb = open_img(top, QCOW2_OPEN_RDWR | QCOW2_OPEN_NO_BACKING);
    if (t && b && bro && o && l && tnb) {
        CHECK_RC(qcow2_commit(NULL, b, 0, NULL, NULL), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "top") != NULL);
        CHECK_RC(qcow2_commit(t, NULL, 0, NULL, NULL), -EINVAL);
        CHECK_RC(qcow2_commit(t, t, 0, NULL, NULL), -EINVAL);
        CHECK_RC(qcow2_commit(t, b, 0x10, NULL, NULL), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "flags") != NULL);
        CHECK_RC(qcow2_commit(t, o, 0, NULL, NULL), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "not the backing file") != NULL);
        CHECK_RC(qcow2_commit(l, o, 0, NULL, NULL), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "no backing file") != NULL);
        CHECK_RC(qcow2_commit(t, bro, 0, NULL, NULL), -EROFS);
        CHECK_RC(qcow2_commit(tnb, b, 0, NULL, NULL), -ENOTSUP);
        CHECK(strstr(qcow2_last_error(), "backing chain") != NULL);
    }
    CHECK_RC(qcow2_close(tnb), 0);
    CHECK_RC(qcow2_close(t), 0);
    CHECK_RC(qcow2_close(b), 0);
    CHECK_RC(qcow2_close(bro), 0);
    CHECK_RC(qcow2_close(o), 0);
    CHECK_RC(qcow2_close(l), 0);
    /* Nothing changed. */
    CHECK(qemu_reads(base, 0x11, 65536, 65536));
    CHECK(qemu_alloc(top, 65536, 65536, 65536));
    CHECK(qemu_alloc(other, 0, 1048576, 0));
}

static void test_rebase(void) {
    char b1[8192], b2[8192], img[8192], orig[8192], ref[8192];
    h_path(b1, sizeof b1, "rb-b1.qcow2");
    h_path(b2, sizeof b2, "rb-b2.qcow2");
    h_path(img, sizeof img, "rb-img.qcow2");
    h_path(orig, sizeof orig, "rb-orig.qcow2");
    h_path(ref, sizeof ref, "rb-ref.qcow2");
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && "
               "qemu-io -c 'write -P 0x11 0 256k' -c 'write -P 0x12 512k 64k' '%s' >/dev/null && "
               "qemu-img create -q -f qcow2 '%s' 1M && "
               "qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x44 64k 64k' "
               "-c 'write -P 0x45 768k 64k' '%s' >/dev/null && "
               "qemu-img create -q -f qcow2 -b '%s' -F qcow2 '%s' && "
               "qemu-io -c 'write -P 0x22 192k 64k' '%s' >/dev/null && "
               "cp '%s' '%s' && cp '%s' '%s'",
               b1, b1, b2, b2, b1, img, img, img, orig, img, ref) == 0);
    CHECK(h_sh("qemu-img rebase -q -b '%s' -F qcow2 '%s'", b2, ref) == 0);

    Qcow2Image *i = open_img(img, QCOW2_OPEN_RDWR);
    if (!i)
        return;
    Prog p = prog_new();
    CHECK_RC(qcow2_rebase(i, b2, "qcow2", 0, on_progress, &p), 0);
    CHECK_PROGRESS(p, 1048576);
    /* Unchanged through the handle, now over the new chain. */
    CHECK(lib_reads(i, 0x11, 0, 65536));
    CHECK(lib_reads(i, 0x11, 65536, 65536));
    CHECK(lib_reads(i, 0x22, 196608, 65536));
    CHECK(lib_reads(i, 0x12, 512 * 1024, 65536));
    CHECK(lib_reads(i, 0, 768 * 1024, 65536));
    CHECK_RC(qcow2_close(i), 0);
    CHECK(qemu_same(img, orig));
    CHECK(qemu_same(img, ref));
    CHECK(same_map(img, ref));
    CHECK(h_sh("qemu-img info -U --output=json '%s' | grep -qF '\"backing-filename\": \"%s\"'",
               img, b2) == 0);
    CHECK(h_sh("qemu-img info -U --output=json '%s' | grep -qF '\"backing-filename-format\": "
               "\"qcow2\"'",
               img) == 0);
    CHECK(h_qemu_check(img));

    /* To no backing file: everything the chain gave is copied. */
    CHECK(h_sh("qemu-img rebase -q -b '' '%s'", ref) == 0);
    i = open_img(img, QCOW2_OPEN_RDWR);
    if (!i)
        return;
    CHECK_RC(qcow2_rebase(i, NULL, NULL, 0, NULL, NULL), 0);
    CHECK_RC(qcow2_close(i), 0);
    CHECK(qemu_same(img, orig));
    CHECK(same_map(img, ref));
    CHECK(h_sh("qemu-img info -U '%s' | grep -q 'backing file'", img) != 0);
    CHECK(h_qemu_check(img));

    /* Unsafe: the header only. */
    i = open_img(img, QCOW2_OPEN_RDWR);
    if (!i)
        return;
    CHECK_RC(qcow2_rebase(i, b1, "qcow2", QCOW2_REBASE_UNSAFE, NULL, NULL), 0);
    CHECK_RC(qcow2_close(i), 0);
    CHECK(h_sh("qemu-img info -U --output=json '%s' | grep -qF '\"backing-filename\": \"%s\"'",
               img, b1) == 0);
    CHECK(qemu_same(img, orig));

    /* Errors, each leaving the image as it was. */
    Qcow2Image *ro = open_img(img, 0);
    Qcow2Image *nb = open_img(orig, QCOW2_OPEN_RDWR | QCOW2_OPEN_NO_BACKING);
    i = open_img(orig, QCOW2_OPEN_RDWR);
    if (ro && nb && i) {
        char missing[8192];
        h_path(missing, sizeof missing, "rb-missing.qcow2");
        CHECK_RC(qcow2_rebase(NULL, b2, "qcow2", 0, NULL, NULL), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "qcow2_rebase") != NULL);
        CHECK_RC(qcow2_rebase(i, b2, "qcow2", 0x8, NULL, NULL), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "flags") != NULL);
        CHECK_RC(qcow2_rebase(i, NULL, "qcow2", 0, NULL, NULL), -EINVAL);
        CHECK_RC(qcow2_rebase(i, b2, "\xff", 0, NULL, NULL), -EINVAL);
        char longname[1100];
        memset(longname, 'x', sizeof longname - 1);
        longname[sizeof longname - 1] = 0;
        CHECK_RC(qcow2_rebase(i, longname, NULL, 0, NULL, NULL), -EINVAL);
        CHECK_RC(qcow2_rebase(i, missing, "qcow2", 0, NULL, NULL), -ENOENT);
        CHECK(strstr(qcow2_last_error(), "rb-missing.qcow2") != NULL);
        CHECK_RC(qcow2_rebase(i, b2, "vmdk", 0, NULL, NULL), -ENOTSUP);
        CHECK_RC(qcow2_rebase(ro, b2, "qcow2", 0, NULL, NULL), -EROFS);
        CHECK_RC(qcow2_rebase(nb, b2, "qcow2", 0, NULL, NULL), -ENOTSUP);
        CHECK(strstr(qcow2_last_error(), "backing chain") != NULL);
    }
    CHECK_RC(qcow2_close(ro), 0);
    CHECK_RC(qcow2_close(nb), 0);
    CHECK_RC(qcow2_close(i), 0);
    CHECK(h_sh("qemu-img info -U --output=json '%s' | grep -qF '\"backing-filename\": \"%s\"'",
               orig, b1) == 0);
    CHECK(qemu_alloc(orig, 0, 1048576, 65536));
    CHECK(h_qemu_check(orig));
}

int main(int argc, char **argv) {
    h_init(argc, argv);
    test_convert();
    test_commit();
    test_rebase();
    return h_finish();
}
