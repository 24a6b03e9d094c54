/*
 * Internal snapshots through the C ABI (qcow2_snapshot_create, _apply,
 * _delete, _list), judged by QEMU: qemu-img snapshot -l lists what was
 * made, qemu-io reads each snapshot's content after qemu-img applies it,
 * qemu-img check finds the image clean, and snapshots made by qemu-img are
 * listed, applied and deleted through the library.
 */
#include "harness.h"

#include <stdbool.h>

int main(int argc, char **argv) {
    h_init(argc, argv);
    char img_path[8192], copy[8192];
    h_path(img_path, sizeof img_path, "img.qcow2");
    h_path(copy, sizeof copy, "copy.qcow2");
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 16M", img_path) == 0);
    CHECK(h_sh("qemu-io -c 'write -P 0x11 0 1M' '%s' >/dev/null", img_path) == 0);
    CHECK(h_sh("qemu-img snapshot -c byqemu '%s'", img_path) == 0);

    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(img_path, QCOW2_OPEN_RDWR, &img), 0);
    if (!img)
        return h_finish();
    size_t n = 99;
    CHECK_RC(qcow2_snapshot_list(img, NULL, 0, &n), 0);
    CHECK(n == 1);

    uint8_t buf[65536];
    memset(buf, 0x22, sizeof buf);
    CHECK_RC(qcow2_write(img, 0, buf, sizeof buf, 0), 0);
    Qcow2SnapshotInfo info;
    CHECK_RC(qcow2_snapshot_create(img, "first", &info), 0);
    CHECK(strcmp(info.id, "2") == 0);
    CHECK(strcmp(info.name, "first") == 0);
    CHECK(info.disk_size == 16u << 20);
    CHECK(info.vm_state_size == 0);
    memset(buf, 0x33, sizeof buf);
    CHECK_RC(qcow2_write(img, 0, buf, sizeof buf, 0), 0);
    CHECK_RC(qcow2_snapshot_create(img, "second", NULL), 0);
    memset(buf, 0x44, sizeof buf);
    CHECK_RC(qcow2_write(img, 65536, buf, sizeof buf, 0), 0);

    /* Errors: missing snapshots, NULL arguments. */
    CHECK_RC(qcow2_snapshot_apply(img, "nope"), -ENOENT);
    CHECK(strstr(qcow2_last_error(), "nope") != NULL);
    CHECK_RC(qcow2_snapshot_delete(img, "nope"), -ENOENT);
    CHECK_RC(qcow2_snapshot_delete(img, "2"), -ENOENT); /* by name only */
    CHECK_RC(qcow2_snapshot_create(img, NULL, NULL), -EINVAL);
    CHECK_RC(qcow2_snapshot_create(NULL, "x", NULL), -EINVAL);
    CHECK_RC(qcow2_snapshot_list(img, NULL, 1, &n), -EINVAL);
    CHECK_RC(qcow2_snapshot_list(img, NULL, 0, NULL), -EINVAL);

    /* The list: a buffer too small is filled and tells the total. */
    Qcow2SnapshotInfo list[4];
    CHECK_RC(qcow2_snapshot_list(img, list, 2, &n), 0);
    CHECK(n == 3);
    CHECK(strcmp(list[0].name, "byqemu") == 0 && strcmp(list[0].id, "1") == 0);
    CHECK(strcmp(list[1].name, "first") == 0);
    CHECK_RC(qcow2_snapshot_list(img, list, 4, &n), 0);
    CHECK(n == 3 && strcmp(list[2].name, "second") == 0 && strcmp(list[2].id, "3") == 0);

    /* Apply by id, then by name; reads follow. */
    CHECK_RC(qcow2_snapshot_apply(img, "2"), 0);
    CHECK_RC(qcow2_read(img, 0, buf, sizeof buf), 0);
    CHECK(h_all(buf, sizeof buf, 0x22));
    CHECK_RC(qcow2_read(img, 65536, buf, sizeof buf), 0);
    CHECK(h_all(buf, sizeof buf, 0x11));
    CHECK_RC(qcow2_snapshot_apply(img, "byqemu"), 0);
    CHECK_RC(qcow2_read(img, 0, buf, sizeof buf), 0);
    CHECK(h_all(buf, sizeof buf, 0x11));
    memset(buf, 0x55, sizeof buf);
    CHECK_RC(qcow2_write(img, 0, buf, sizeof buf, 0), 0);
    CHECK_RC(qcow2_snapshot_delete(img, "first"), 0);
    CHECK_RC(qcow2_close(img), 0);

    /* QEMU sees the same. */
    CHECK(h_qemu_check(img_path));
    CHECK(h_sh("qemu-img snapshot -l '%s' | grep -q ' byqemu '", img_path) == 0);
    CHECK(h_sh("qemu-img snapshot -l '%s' | grep -q ' second '", img_path) == 0);
    CHECK(h_sh("qemu-img snapshot -l '%s' | grep -q ' first '", img_path) != 0);
    CHECK(h_sh("qemu-io -c 'read -P 0x55 0 64k' -c 'read -P 0x11 64k 64k' '%s' >/dev/null",
               img_path) == 0);
    CHECK(h_sh("cp '%s' '%s' && qemu-img snapshot -a second '%s'", img_path, copy, copy) == 0);
    CHECK(h_sh("qemu-io -c 'read -P 0x33 0 64k' -c 'read -P 0x11 64k 64k' '%s' >/dev/null",
               copy) == 0);
    CHECK(h_qemu_check(copy));

    /* Read-only handles list but do not change. */
    CHECK_RC(qcow2_open(img_path, 0, &img), 0);
    if (img) {
        CHECK_RC(qcow2_snapshot_list(img, list, 4, &n), 0);
        CHECK(n == 2);
        CHECK_RC(qcow2_snapshot_create(img, "ro", NULL), -EROFS);
        CHECK_RC(qcow2_snapshot_delete(img, "second"), -EROFS);
        CHECK_RC(qcow2_close(img), 0);
    }
    return h_finish();
}
