/*
 * Persistent dirty bitmap management through the C ABI (qcow2_bitmap_add,
 * _remove, _clear, _set_enabled, _merge), judged by QEMU: qemu-img info
 * lists the bitmaps with the expected names, granularities and flags,
 * qemu-img check finds the image clean, and the bits merged show up as
 * dirty in qemu-nbd's export when nbdinfo is installed.
 */
#include "harness.h"

#include <stdbool.h>

/* `qemu-img info --output=json` of `path` contains `needle` (a JSON fragment
 * without spaces: the output is compacted first). */
static int info_has(const char *path, const char *needle) {
    return h_sh("qemu-img info --output=json '%s' | tr -d ' \\n' | grep -qF -- '%s'", path,
                needle) == 0;
}

int main(int argc, char **argv) {
    h_init(argc, argv);
    char img_path[8192], src_path[8192], v2[8192];
    h_path(img_path, sizeof img_path, "img.qcow2");
    h_path(src_path, sizeof src_path, "src.qcow2");
    h_path(v2, sizeof v2, "v2.qcow2");
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 64M", img_path) == 0);
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 64M", src_path) == 0);
    CHECK(h_sh("qemu-img create -q -f qcow2 -o compat=0.10 '%s' 64M", v2) == 0);
    CHECK(h_sh("qemu-img bitmap --add -g 4k '%s' s && qemu-io -c 'write 1M 8k' '%s' >/dev/null",
               src_path, src_path) == 0);

    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(img_path, QCOW2_OPEN_RDWR, &img), 0);
    if (!img)
        return h_finish();
    CHECK_RC(qcow2_bitmap_add(img, "a", 0, true), 0);
    CHECK_RC(qcow2_bitmap_add(img, "b", 512, false), 0);
    CHECK_RC(qcow2_bitmap_add(img, "c", 1u << 20, true), 0);
    /* Errors: duplicate, bad granularity, unknown names, NULL arguments. */
    CHECK_RC(qcow2_bitmap_add(img, "a", 0, true), -EINVAL);
    CHECK(strstr(qcow2_last_error(), "Bitmap already exists: a") != NULL);
    CHECK_RC(qcow2_bitmap_add(img, "g", 3000, true), -EINVAL);
    CHECK_RC(qcow2_bitmap_add(img, "", 0, true), -EINVAL);
    CHECK_RC(qcow2_bitmap_add(img, NULL, 0, true), -EINVAL);
    CHECK_RC(qcow2_bitmap_add(NULL, "x", 0, true), -EINVAL);
    CHECK_RC(qcow2_bitmap_remove(img, "nope"), -EINVAL);
    CHECK(strstr(qcow2_last_error(), "Dirty bitmap 'nope' not found") != NULL);
    CHECK_RC(qcow2_bitmap_clear(img, "nope"), -EINVAL);
    CHECK_RC(qcow2_bitmap_set_enabled(img, "nope", true), -EINVAL);
    CHECK_RC(qcow2_bitmap_merge(img, "a", "nope", NULL), -EINVAL);
    CHECK_RC(qcow2_bitmap_merge(img, "a", NULL, NULL), -EINVAL);

    /* Writes are recorded by the enabled bitmaps added while open. */
    uint8_t buf[65536];
    memset(buf, 0x5a, sizeof buf);
    CHECK_RC(qcow2_write(img, 4u << 20, buf, sizeof buf, 0), 0);
    CHECK_RC(qcow2_bitmap_merge(img, "b", "a", NULL), 0);
    CHECK_RC(qcow2_bitmap_set_enabled(img, "a", false), 0);
    CHECK_RC(qcow2_bitmap_set_enabled(img, "b", true), 0);
    CHECK_RC(qcow2_bitmap_clear(img, "c"), 0);
    CHECK_RC(qcow2_bitmap_remove(img, "c"), 0);

    /* Merge from another image (opened read-only). */
    Qcow2Image *src = NULL;
    CHECK_RC(qcow2_open(src_path, 0, &src), 0);
    if (src) {
        CHECK_RC(qcow2_bitmap_merge(img, "a", "s", src), 0);
        CHECK_RC(qcow2_bitmap_merge(img, "a", "nope", src), -EINVAL);
        /* Read-only images refuse management. */
        CHECK_RC(qcow2_bitmap_add(src, "x", 0, true), -EROFS);
        CHECK_RC(qcow2_close(src), 0);
    }
    CHECK_RC(qcow2_close(img), 0);

    CHECK(h_qemu_check(img_path));
    CHECK(info_has(img_path, "\"flags\":[],\"name\":\"a\",\"granularity\":65536"));
    CHECK(info_has(img_path, "\"flags\":[\"auto\"],\"name\":\"b\",\"granularity\":512"));
    CHECK(!info_has(img_path, "\"name\":\"c\""));
    if (h_sh("command -v nbdinfo >/dev/null && command -v qemu-nbd >/dev/null") == 0) {
        /* a: 1M..1M+64k (merged from s at 4k, rounded to 64k) and 4M..4M+64k. */
        CHECK(h_sh("nbdinfo --map=qemu:dirty-bitmap:a -- [ qemu-nbd -r -B a -f qcow2 '%s' ] | "
                   "awk '$3==1{print $1,$2}' | tr '\\n' ' ' | grep -qx '1048576 65536 4194304 65536 '",
                   img_path) == 0);
        CHECK(h_sh("nbdinfo --map=qemu:dirty-bitmap:b -- [ qemu-nbd -r -B b -f qcow2 '%s' ] | "
                   "awk '$3==1{print $1,$2}' | tr '\\n' ' ' | grep -qx '4194304 65536 '",
                   img_path) == 0);
    } else {
        printf("note: nbdinfo/qemu-nbd not installed, dirty maps not compared\n");
    }

    /* Version 2 images cannot hold bitmaps. */
    Qcow2Image *old = NULL;
    CHECK_RC(qcow2_open(v2, QCOW2_OPEN_RDWR, &old), 0);
    if (old) {
        CHECK_RC(qcow2_bitmap_add(old, "b", 0, true), -EINVAL);
        CHECK(strstr(qcow2_last_error(), "Cannot store dirty bitmaps in qcow2 v2 files") != NULL);
        CHECK_RC(qcow2_close(old), 0);
    }
    return h_finish();
}
