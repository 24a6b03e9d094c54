/*
 * Encrypted images through the C ABI, judged by QEMU:
 *  - qcow2_create_encrypted (LUKS, defaults and a non-default cipher; legacy
 *    AES): qemu-img info reports the encryption as asked, qemu-io opens the
 *    image with the passphrase and reads what the library wrote (unaligned
 *    requests too), qemu-img check finds it clean;
 *  - qcow2_open_encrypted on images qemu-img made (LUKS aes-256-xts,
 *    aes-128-cbc-essiv, legacy AES): reads what qemu-io wrote, and writes
 *    that qemu-io reads back;
 *  - qcow2_open on an encrypted image, a wrong passphrase, NULL arguments,
 *    a bad format, a cipher this library does not implement: the errno and
 *    message of each; qcow2_get_encryption.
 */
#include "harness.h"

#define SECRET "astrochicken"
#define OBJ "--object secret,id=sec0,data=" SECRET

/* qemu-io (with the secret) succeeds at the command `cmd` on `path`. */
static int qemu_io_ok(const char *path, const char *cmd) {
    return h_sh("qemu-io " OBJ " --image-opts "
                "'driver=qcow2,file.filename=%s,encrypt.key-secret=sec0' -c '%s' 2>&1 "
                "| grep -q -e '^read' -e '^wrote' && ! qemu-io " OBJ " --image-opts "
                "'driver=qcow2,file.filename=%s,encrypt.key-secret=sec0' -c '%s' 2>&1 "
                "| grep -q -i -e fail -e error",
                path, cmd, path, cmd) == 0;
}

/* qemu-img check (with the secret) finds `path` clean. */
static int qemu_check_ok(const char *path) {
    return h_sh("qemu-img check -q " OBJ " --image-opts "
                "'driver=qcow2,file.filename=%s,encrypt.key-secret=sec0' >/dev/null 2>&1",
                path) == 0;
}

/* The library reads bytes equal to `v` at [off, off+len) (len <= 64 KiB). */
static int lib_reads(Qcow2Image *img, uint8_t v, uint64_t off, size_t len) {
    static uint8_t buf[65536];
    if (len > sizeof buf || qcow2_read(img, off, buf, len) != 0)
        return 0;
    return h_all(buf, len, v);
}

/* Writes `len` bytes of `v` at `off`. */
static int lib_write(Qcow2Image *img, uint8_t v, uint64_t off, size_t len) {
    static uint8_t buf[65536];
    if (len > sizeof buf)
        return -1;
    memset(buf, v, len);
    return qcow2_write(img, off, buf, len, 0);
}

static Qcow2EncryptOptions luks_opts(void) {
    Qcow2EncryptOptions e;
    memset(&e, 0, sizeof e);
    e.format = QCOW2_ENCRYPT_LUKS;
    e.secret = (const uint8_t *)SECRET;
    e.secret_len = strlen(SECRET);
    e.iter_time_ms = 10;
    return e;
}

/* Images made by the library, used by QEMU. */
static void test_create(void) {
    char p[8192], q[8192], a[8192];
    h_path(p, sizeof p, "enc-luks.qcow2");
    h_path(q, sizeof q, "enc-cbc.qcow2");
    h_path(a, sizeof a, "enc-aes.qcow2");
    Qcow2EncryptOptions e = luks_opts();
    CHECK_RC(qcow2_create_encrypted(p, 4u << 20, NULL, &e), 0);
    CHECK(h_sh("qemu-img info --output=json '%s' | grep -q '\"encrypted\": true'", p) == 0);
    CHECK(h_sh("qemu-img info '%s' | grep -q 'cipher alg: aes-256'", p) == 0);
    CHECK(h_sh("qemu-img info '%s' | grep -q 'cipher mode: xts'", p) == 0);

    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open_encrypted(p, QCOW2_OPEN_RDWR, (const uint8_t *)SECRET, strlen(SECRET), &img),
             0);
    if (!img)
        return;
    uint32_t how = 99;
    CHECK_RC(qcow2_get_encryption(img, &how), 0);
    CHECK_U64(how, ==, QCOW2_ENCRYPT_LUKS);
    CHECK_RC(lib_write(img, 0x5a, 0, 65536), 0);
    CHECK_RC(lib_write(img, 0x6b, 100, 200), 0); /* inside one sector pair, unaligned */
    CHECK_RC(lib_write(img, 0x7c, 65536 + 4096, 8192), 0);
    CHECK(lib_reads(img, 0x6b, 100, 200));
    CHECK(lib_reads(img, 0x5a, 0, 100));
    CHECK(lib_reads(img, 0x5a, 300, 65536 - 300));
    CHECK_RC(qcow2_close(img), 0);
    CHECK(qemu_io_ok(p, "read -P 0x5a 0 100"));
    CHECK(qemu_io_ok(p, "read -P 0x6b 100 200"));
    CHECK(qemu_io_ok(p, "read -P 0x5a 300 65236"));
    CHECK(qemu_io_ok(p, "read -P 0 65536 4096"));
    CHECK(qemu_io_ok(p, "read -P 0x7c 69632 8192"));
    CHECK(qemu_check_ok(p));

    /* A non-default LUKS cipher. */
    e.cipher_alg = "aes-128";
    e.cipher_mode = "cbc";
    e.ivgen_alg = "essiv";
    e.ivgen_hash_alg = "sha256";
    e.hash_alg = "sha1";
    CHECK_RC(qcow2_create_encrypted(q, 1u << 20, NULL, &e), 0);
    CHECK(h_sh("qemu-img info '%s' | grep -q 'cipher alg: aes-128'", q) == 0);
    CHECK(h_sh("qemu-img info '%s' | grep -q 'ivgen alg: essiv'", q) == 0);
    img = NULL;
    CHECK_RC(qcow2_open_encrypted(q, QCOW2_OPEN_RDWR, (const uint8_t *)SECRET, strlen(SECRET), &img),
             0);
    if (img) {
        CHECK_RC(lib_write(img, 0x31, 512, 1024), 0);
        CHECK_RC(qcow2_close(img), 0);
    }
    CHECK(qemu_io_ok(q, "read -P 0x31 512 1024"));
    CHECK(qemu_io_ok(q, "read -P 0 0 512"));
    CHECK(qemu_check_ok(q));

    /* Legacy AES. */
    Qcow2EncryptOptions la = luks_opts();
    la.format = QCOW2_ENCRYPT_AES;
    CHECK_RC(qcow2_create_encrypted(a, 1u << 20, NULL, &la), 0);
    CHECK(h_sh("qemu-img info '%s' | grep -q 'format: aes'", a) == 0);
    img = NULL;
    CHECK_RC(qcow2_open_encrypted(a, QCOW2_OPEN_RDWR, (const uint8_t *)SECRET, strlen(SECRET), &img),
             0);
    if (img) {
        CHECK_RC(lib_write(img, 0x42, 4096, 4096), 0);
        CHECK_RC(qcow2_close(img), 0);
    }
    CHECK(qemu_io_ok(a, "read -P 0x42 4096 4096"));
    CHECK(qemu_check_ok(a));
}

/* Images made by qemu-img, used by the library. */
static void test_open_qemu_images(void) {
    const char *variants[] = {
        "encrypt.format=luks",
        "encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,"
        "encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512",
        "encrypt.format=aes",
    };
    for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++) {
        char p[8192];
        char name[64];
        snprintf(name, sizeof name, "qemu-enc-%zu.qcow2", i);
        h_path(p, sizeof p, name);
        CHECK(h_sh("qemu-img create -q -f qcow2 " OBJ " -o %s,encrypt.key-secret=sec0,"
                   "encrypt.iter-time=10 '%s' 1M 2>/dev/null || qemu-img create -q -f qcow2 " OBJ
                   " -o %s,encrypt.key-secret=sec0 '%s' 1M",
                   variants[i], p, variants[i], p) == 0);
        CHECK(qemu_io_ok(p, "write -P 0x99 65536 65536"));
        Qcow2Image *img = NULL;
        CHECK_RC(qcow2_open_encrypted(p, QCOW2_OPEN_RDWR, (const uint8_t *)SECRET, strlen(SECRET),
                                      &img),
                 0);
        if (!img)
            continue;
        uint32_t how = 99;
        CHECK_RC(qcow2_get_encryption(img, &how), 0);
        CHECK_U64(how, ==, i == 2 ? QCOW2_ENCRYPT_AES : QCOW2_ENCRYPT_LUKS);
        CHECK(lib_reads(img, 0x99, 65536, 65536));
        CHECK(lib_reads(img, 0, 0, 65536));
        /* A copy-on-write of half a cluster: the rest is re-encrypted for its new place. */
        CHECK_RC(lib_write(img, 0x21, 65536 + 1536, 512), 0);
        CHECK_RC(qcow2_close(img), 0);
        CHECK(qemu_io_ok(p, "read -P 0x99 65536 1536"));
        CHECK(qemu_io_ok(p, "read -P 0x21 67072 512"));
        CHECK(qemu_io_ok(p, "read -P 0x99 67584 63488"));
        CHECK(qemu_check_ok(p));
    }
}

static void test_errors(void) {
    char p[8192], plain[8192];
    h_path(p, sizeof p, "enc-luks.qcow2");
    h_path(plain, sizeof plain, "enc-plain.qcow2");
    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(p, 0, &img), -EACCES);
    CHECK(strstr(qcow2_last_error(), "encrypt.key-secret") != NULL);
    CHECK_RC(qcow2_open_encrypted(p, 0, (const uint8_t *)"platypus", 8, &img), -EACCES);
    CHECK(strstr(qcow2_last_error(), "Invalid password") != NULL);
    CHECK_RC(qcow2_open_encrypted(p, 0, NULL, 0, &img), -EINVAL);
    CHECK_RC(qcow2_open_encrypted(NULL, 0, (const uint8_t *)"x", 1, &img), -EINVAL);
    CHECK_RC(qcow2_open_encrypted(p, 0, (const uint8_t *)SECRET, strlen(SECRET), NULL), -EINVAL);
    CHECK(img == NULL);

    Qcow2EncryptOptions e = luks_opts();
    CHECK_RC(qcow2_create_encrypted(plain, 1u << 20, NULL, NULL), -EINVAL);
    e.format = 7;
    CHECK_RC(qcow2_create_encrypted(plain, 1u << 20, NULL, &e), -EINVAL);
    e = luks_opts();
    e.cipher_alg = "serpent-256";
    CHECK_RC(qcow2_create_encrypted(plain, 1u << 20, NULL, &e), -ENOTSUP);
    e = luks_opts();
    e.secret = NULL;
    CHECK_RC(qcow2_create_encrypted(plain, 1u << 20, NULL, &e), -EINVAL);

    /* A plain image: no encryption, and a passphrase does not hurt. */
    CHECK_RC(qcow2_create(plain, 1u << 20, NULL), 0);
    CHECK_RC(qcow2_open_encrypted(plain, 0, (const uint8_t *)"x", 1, &img), 0);
    if (img) {
        uint32_t how = 99;
        CHECK_RC(qcow2_get_encryption(img, &how), 0);
        CHECK_U64(how, ==, QCOW2_ENCRYPT_NONE);
        CHECK_RC(qcow2_get_encryption(img, NULL), -EINVAL);
        CHECK_RC(qcow2_close(img), 0);
    }
    CHECK_RC(qcow2_get_encryption(NULL, NULL), -EINVAL);
}

int main(int argc, char **argv) {
    h_init(argc, argv);
    test_create();
    test_open_qemu_images();
    test_errors();
    return h_finish();
}
