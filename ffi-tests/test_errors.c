/*
 * Error messages for C callers: each kind of failure the library reports,
 * triggered on purpose, with the message qcow2_last_error() gives for it
 * printed and checked (it names the function, the image where there is one,
 * and the problem; qcow2_last_errno() is the value the call returned).
 */
#include "harness.h"

#include <fcntl.h>
#include <pthread.h>

/* The call returned `want`, and the thread's last error is that failure,
 * its message containing each of the NULL-terminated `needles`. */
static void expect_error(const char *what, int rc, int want, ...) {
    const char *msg = qcow2_last_error();
    printf("%-34s -> %d (%s): %s\n", what, rc, qcow2_strerror(rc), msg);
    if (rc != want) {
        H_FAIL("%s returned %d, expected %d", what, rc, want);
        return;
    }
    CHECK(h_useful_error(rc));
    va_list ap;
    va_start(ap, want);
    for (const char *n = va_arg(ap, const char *); n; n = va_arg(ap, const char *)) {
        if (strstr(msg, n))
            H_PASS();
        else
            H_FAIL("%s: message \"%s\" lacks \"%s\"", what, msg, n);
    }
    va_end(ap);
}

/* Writes `len` bytes of `data` at `off` of `path`. */
static int poke(const char *path, off_t off, const void *data, size_t len) {
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        return -1;
    ssize_t n = pwrite(fd, data, len, off);
    close(fd);
    return n == (ssize_t)len ? 0 : -1;
}

/* The message is per thread: another thread's failure does not replace ours. */
static void *other_thread(void *arg) {
    (void)arg;
    int rc = qcow2_open("/nonexistent/other-thread.qcow2", 0, NULL);
    return (void *)(intptr_t)rc;
}

int main(int argc, char **argv) {
    h_init(argc, argv);
    char img_path[8192], v2[8192], missing[8192], notq[8192], bad[8192];
    h_path(img_path, sizeof img_path, "img.qcow2");
    h_path(v2, sizeof v2, "v2.qcow2");
    h_path(missing, sizeof missing, "missing.qcow2");
    h_path(notq, sizeof notq, "not-qcow2.raw");
    h_path(bad, sizeof bad, "bad-l1.qcow2");

    /* Nothing failed on this thread yet. */
    CHECK(strcmp(qcow2_last_error(), "") == 0);
    CHECK(qcow2_last_errno() == 0);

    CHECK_RC(qcow2_create(img_path, 1u << 20, NULL), 0);
    Qcow2CreateOptions o2;
    memset(&o2, 0, sizeof o2);
    o2.version = 2;
    CHECK_RC(qcow2_create(v2, 1u << 20, &o2), 0);

    Qcow2Image *img = NULL;
    uint8_t buf[4096] = {0};

    /* -EINVAL: caller errors. */
    expect_error("open(NULL path)", qcow2_open(NULL, 0, &img), -EINVAL, "qcow2_open",
                 "path is NULL", NULL);
    expect_error("open(bad flags)", qcow2_open(img_path, 0x8000, &img), -EINVAL, "qcow2_open",
                 "unknown flag bits 0x8000", NULL);
    expect_error("open(two cache modes)",
                 qcow2_open(img_path, QCOW2_OPEN_CACHE_UNSAFE | QCOW2_OPEN_CACHE_WRITETHROUGH, &img),
                 -EINVAL, "QCOW2_OPEN_CACHE_", NULL);
    Qcow2CreateOptions bad_opts;
    memset(&bad_opts, 0, sizeof bad_opts);
    bad_opts.version = 7;
    expect_error("create(version 7)", qcow2_create(bad, 1u << 20, &bad_opts), -EINVAL,
                 "qcow2_create", "version 7", NULL);
    memset(&bad_opts, 0, sizeof bad_opts);
    bad_opts.cluster_size = 1000;
    expect_error("create(cluster size 1000)", qcow2_create(bad, 1u << 20, &bad_opts), -EINVAL,
                 "qcow2_create", "cluster size", NULL);

    /* -ENOENT: no such file. */
    expect_error("open(missing file)", qcow2_open(missing, 0, &img), -ENOENT, "qcow2_open",
                 "missing.qcow2", NULL);

    /* -EINVAL: not a qcow2 image. */
    CHECK(h_sh("head -c 65536 /dev/zero > '%s'", notq) == 0);
    expect_error("open(not qcow2)", qcow2_open(notq, 0, &img), -EINVAL, "not-qcow2.raw",
                 "not a qcow2 image", NULL);

    /* -EIO: damaged metadata, named with the image and the offending value. */
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-io -f qcow2 -c 'write 0 4k' '%s' "
               ">/dev/null",
               bad, bad) == 0);
    {
        /* L1 table at 0x30000 (64 KiB clusters): an L2 offset not cluster aligned. */
        uint8_t e[8] = {0x80, 0, 0, 0, 0, 0x04, 0x02, 0x00};
        CHECK(poke(bad, 0x30000, e, sizeof e) == 0);
    }
    expect_error("open(unaligned L2 offset)", qcow2_open(bad, 0, &img), -EIO, "bad-l1.qcow2",
                 "not cluster aligned", NULL);

    /* Requests on an open image. */
    CHECK_RC(qcow2_open(img_path, 0, &img), 0);
    expect_error("read(NULL buf)", qcow2_read(img, 0, NULL, 512), -EINVAL, "qcow2_read",
                 "buf is NULL", NULL);
    expect_error("read(past the end)", qcow2_read(img, 1u << 20, buf, 512), -EINVAL, "qcow2_read",
                 "past the end", "img.qcow2", NULL);
    /* -EROFS: a write on a read-only handle. */
    expect_error("write(read-only)", qcow2_write(img, 0, buf, 512, 0), -EROFS, "qcow2_write",
                 "img.qcow2", NULL);
    CHECK_RC(qcow2_close(img), 0);

    CHECK_RC(qcow2_open(img_path, QCOW2_OPEN_RDWR, &img), 0);
    expect_error("write(unknown flags)", qcow2_write(img, 0, buf, 512, 0x4), -EINVAL,
                 "qcow2_write", "flags", NULL);
    expect_error("write_zeroes(unknown flags)", qcow2_write_zeroes(img, 0, 512, 0x1000), -EINVAL,
                 "qcow2_write_zeroes", "flags", NULL);
    expect_error("discard(past the end)", qcow2_discard(img, 0, 2u << 20), -EINVAL,
                 "qcow2_discard", "past the end", NULL);
    Qcow2Extent ext[2];
    size_t n = 0;
    expect_error("block_status(max 0)", qcow2_block_status(img, 0, 4096, ext, 0, &n), -EINVAL,
                 "qcow2_block_status", "max", NULL);
    expect_error("get_stats(NULL out)", qcow2_get_stats(img, NULL), -EINVAL, "qcow2_get_stats",
                 "out is NULL", NULL);
    CHECK_RC(qcow2_close(img), 0);

    /* -ENOTSUP: NO_FALLBACK where zero data would have to be written (v2). */
    CHECK_RC(qcow2_open(v2, QCOW2_OPEN_RDWR, &img), 0);
    expect_error("write_zeroes(v2, NO_FALLBACK)",
                 qcow2_write_zeroes(img, 0, 65536, QCOW2_REQ_NO_FALLBACK), -ENOTSUP,
                 "qcow2_write_zeroes", NULL);
    CHECK_RC(qcow2_close(img), 0);

    /* A success leaves the message; another thread's failure does not touch it. */
    const char *before = qcow2_last_error();
    char saved[1024];
    snprintf(saved, sizeof saved, "%s", before);
    CHECK_RC(qcow2_open(img_path, 0, &img), 0);
    CHECK(strcmp(qcow2_last_error(), saved) == 0);
    pthread_t t;
    void *trc = NULL;
    CHECK(pthread_create(&t, NULL, other_thread, NULL) == 0);
    CHECK(pthread_join(t, &trc) == 0);
    CHECK((int)(intptr_t)trc == -EINVAL);
    CHECK(strcmp(qcow2_last_error(), saved) == 0);
    CHECK_RC(qcow2_close(img), 0);

    return h_finish();
}
