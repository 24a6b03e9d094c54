/*
 * Compressed writes through the C API (QCOW2_REQ_COMPRESSED on qcow2_write),
 * checked against QEMU 10: the same requests replayed with qemu-io on a copy,
 * then qemu-img check, map (with compressed extents) and compare.
 */
#include "harness.h"

#define KiB 1024u
#define CL (64u * KiB)

static char ours[4200], ref[4200];

static void run(const char *name, const char *opts) {
    h_path(ours, sizeof ours, name);
    strcat(ours, ".qcow2");
    h_path(ref, sizeof ref, name);
    strcat(ref, ".ref.qcow2");
    if (h_sh("cd '%s' && qemu-img create -q -f qcow2 -o %s '%s' 4M && "
             "qemu-io -c 'write -P 0x44 256k 64k' '%s' >/dev/null && cp '%s' '%s'",
             h_dir, opts, ours, ours, ours, ref) != 0) {
        H_FAIL("preparing %s failed", name);
        return;
    }
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(ours, QCOW2_OPEN_RDWR, &img), 0);
    uint8_t *b = malloc(4 * CL);
    if (!b)
        return;
    memset(b, 0x11, 4 * CL);
    CHECK_RC(qcow2_write(img, 0, b, 4 * CL, QCOW2_REQ_COMPRESSED), 0);
    /* Partial clusters: -EINVAL; over an allocated cluster: -EIO (as QEMU). */
    CHECK_RC(qcow2_write(img, 8 * CL, b, 4096, QCOW2_REQ_COMPRESSED), -EINVAL);
    CHECK_RC(qcow2_write(img, 8 * CL + 512, b, CL, QCOW2_REQ_COMPRESSED), -EINVAL);
    CHECK_RC(qcow2_write(img, 0, b, CL, QCOW2_REQ_COMPRESSED), -EIO);
    CHECK_RC(qcow2_write(img, 4 * CL, b, CL, QCOW2_REQ_COMPRESSED), -EIO);
    CHECK_RC(qcow2_write(img, 5 * CL, b, CL, QCOW2_REQ_COMPRESSED | QCOW2_REQ_FUA), 0);
    memset(b, 0, CL);
    CHECK_RC(qcow2_read(img, CL, b, CL), 0);
    CHECK(h_all(b, CL, 0x11));
    /* Unknown flags are still refused. */
    CHECK_RC(qcow2_write(img, 6 * CL, b, CL, 0x40), -EINVAL);
    CHECK_RC(qcow2_close(img), 0);
    free(b);
    if (h_sh("cd '%s' && qemu-io -c 'write -c -P 0x11 0 256k' -c 'write -c -P 0x11 320k 64k' "
             "'%s' >/dev/null",
             h_dir, ref) != 0)
        H_FAIL("qemu-io on %s failed", ref);
    char m1[8192], m2[8192];
    snprintf(m1, sizeof m1, "%s.map", ours);
    snprintf(m2, sizeof m2, "%s.map", ref);
    CHECK(h_qemu_check(ours));
    CHECK(h_qemu_map(ours, m1, 0) == 0);
    CHECK(h_qemu_map(ref, m2, 0) == 0);
    CHECK(h_same_file(m1, m2));
    CHECK(h_sh("grep -q '\"compressed\": true' '%s'", m1) == 0);
    CHECK(h_sh("qemu-img compare -q '%s' '%s'", ours, ref) == 0);
}

int main(int argc, char **argv) {
    h_init(argc, argv);
    run("zlib", "compression_type=zlib");
    run("zstd", "compression_type=zstd");
    run("v2", "compat=0.10");
    run("ext", "extended_l2=on");
    return h_finish();
}
