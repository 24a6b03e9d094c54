/*
 * Resize through the C ABI (qcow2_resize), judged by QEMU: the same resize
 * done by qemu-img on a copy gives an image qemu-img compare finds equal,
 * with the same virtual size and map (without host offsets, where the host
 * layouts cannot split extents differently), and qemu-img
 * check finds ours clean. Also: grow across an L1 move (512 B clusters),
 * shrink with and without QCOW2_RESIZE_SHRINK, metadata preallocation,
 * argument errors with their messages, I/O at the new end.
 */
#include "harness.h"

/* Virtual size as qemu-img info reports it equals `want`. */
static int qemu_size_is(const char *path, uint64_t want) {
    return h_sh("qemu-img info --output=json '%s' | grep -q '\"virtual-size\": %" PRIu64 "'",
                path, want) == 0;
}

/* Resizes `ours` with the C ABI and `ref` with qemu-img, then compares. */
static void same_as_qemu(const char *ours, const char *ref, uint64_t size, uint32_t prealloc,
                         uint32_t flags, const char *qemu_args, int compare_map) {
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR, &img), 0);
    if (!img)
        return;
    CHECK_RC(qcow2_resize(img, size, prealloc, flags), 0);
    uint64_t vs = 0;
    CHECK_RC(qcow2_get_virtual_size(img, &vs), 0);
    CHECK_U64(vs, ==, size);
    /* The new end is usable at once. */
    uint8_t buf[512], back[512];
    memset(buf, 0xc5, sizeof buf);
    CHECK_RC(qcow2_write(img, size - 512, buf, sizeof buf, 0), 0);
    CHECK_RC(qcow2_read(img, size - 512, back, sizeof back), 0);
    CHECK(memcmp(buf, back, sizeof buf) == 0);
    CHECK_RC(qcow2_close(img), 0);
    CHECK(h_sh("qemu-img resize -q %s '%s' %" PRIu64, qemu_args, ref, size) == 0);
    CHECK(h_sh("qemu-io -c 'write -P 0xc5 %" PRIu64 " 512' '%s' >/dev/null", size - 512, ref) ==
          0);
    CHECK(h_qemu_check(ours));
    CHECK(qemu_size_is(ours, size));
    CHECK(h_sh("qemu-img compare -q '%s' '%s'", ours, ref) == 0);
    if (!compare_map)
        return; /* extents split where the host layouts differ */
    char m1[8192], m2[8192];
    snprintf(m1, sizeof m1, "%s.map", ours);
    snprintf(m2, sizeof m2, "%s.map", ref);
    CHECK(h_qemu_map(ours, m1, 0) == 0 && h_qemu_map(ref, m2, 0) == 0);
    CHECK(h_same_file(m1, m2));
}

int main(int argc, char **argv) {
    h_init(argc, argv);
    char a[8192], b[8192], c[8192], d[8192];
    h_path(a, sizeof a, "a.qcow2");
    h_path(b, sizeof b, "b.qcow2");
    h_path(c, sizeof c, "c.qcow2");
    h_path(d, sizeof d, "d.qcow2");

    /* Grow across an L1 move, then shrink allocated data. */
    CHECK(h_sh("qemu-img create -q -f qcow2 -o cluster_size=512 '%s' 64k && "
               "qemu-io -c 'write -P 0x11 0 8k' -c 'write -P 0x12 56k 8k' '%s' >/dev/null && "
               "cp '%s' '%s'",
               a, a, a, b) == 0);
    same_as_qemu(a, b, 8u << 20, QCOW2_PREALLOC_OFF, 0, "", 1);
    CHECK(h_sh("qemu-io -c 'write -P 0x13 6M 64k' '%s' >/dev/null && "
               "qemu-io -c 'write -P 0x13 6M 64k' '%s' >/dev/null",
               a, b) == 0);
    same_as_qemu(a, b, 1u << 20, QCOW2_PREALLOC_OFF, QCOW2_RESIZE_SHRINK, "--shrink", 1);

    /* Metadata preallocation. */
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && cp '%s' '%s'", c, c, d) == 0);
    same_as_qemu(c, d, 3u << 20, QCOW2_PREALLOC_METADATA, 0, "--preallocation=metadata", 1);
    same_as_qemu(c, d, 5u << 20, QCOW2_PREALLOC_FULL, 0, "--preallocation=full", 0);

    /* Persistent bitmaps are resized with the image (as qemu-img does). */
    char e[8192], f[8192];
    h_path(e, sizeof e, "e.qcow2");
    h_path(f, sizeof f, "f.qcow2");
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-img bitmap --add '%s' bm && "
               "qemu-io -c 'write 0 64k' '%s' >/dev/null && cp '%s' '%s'",
               e, e, e, e, f) == 0);
    same_as_qemu(e, f, 4u << 20, QCOW2_PREALLOC_OFF, 0, "", 1);
    same_as_qemu(e, f, 512u << 10, QCOW2_PREALLOC_OFF, QCOW2_RESIZE_SHRINK, "--shrink", 1);
    CHECK(h_sh("qemu-img info --output=json '%s' | grep -q '\"name\": \"bm\"'", e) == 0);

    /* Errors leave the image as it was. */
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(c, QCOW2_OPEN_RDWR, &img), 0);
    if (img) {
        CHECK_RC(qcow2_resize(img, 1u << 20, QCOW2_PREALLOC_OFF, 0), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "shrink") != NULL);
        CHECK_RC(qcow2_resize(img, (6u << 20) + 100, QCOW2_PREALLOC_OFF, 0), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "multiple of 512") != NULL);
        CHECK_RC(qcow2_resize(img, 0, QCOW2_PREALLOC_OFF, QCOW2_RESIZE_SHRINK), -EINVAL);
        CHECK_RC(qcow2_resize(img, 6u << 20, 99, 0), -EINVAL);
        CHECK_RC(qcow2_resize(img, 6u << 20, QCOW2_PREALLOC_OFF, 0x80), -EINVAL);
        CHECK_RC(qcow2_resize(img, 1u << 20, QCOW2_PREALLOC_METADATA, QCOW2_RESIZE_SHRINK),
                 -EINVAL);
        CHECK_RC(qcow2_resize(NULL, 6u << 20, QCOW2_PREALLOC_OFF, 0), -EINVAL);
        CHECK_RC(qcow2_close(img), 0);
    }
    CHECK(qemu_size_is(c, 5u << 20));
    CHECK(h_qemu_check(c));
    /* Read-only handle. */
    img = NULL;
    CHECK_RC(qcow2_open(c, 0, &img), 0);
    if (img) {
        CHECK_RC(qcow2_resize(img, 6u << 20, QCOW2_PREALLOC_OFF, 0), -EROFS);
        CHECK_RC(qcow2_close(img), 0);
    }
    return h_finish();
}
