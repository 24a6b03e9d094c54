/*
 * Tiny test harness shared by the C programs in ffi-tests/.
 *
 * Every program takes a scratch directory as argv[1] (it makes one under
 * /tmp when run without arguments), counts checks, and ends with the line
 * "N passed, N failed"; the exit status is non-zero when a check failed.
 * qemu-img / qemu-io (QEMU 10) are the oracle and are run through system().
 */
#ifndef QCOW2_FFI_HARNESS_H
#define QCOW2_FFI_HARNESS_H

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow2.h"

static int h_passed;
static int h_failed;
static char h_dir[4096];

#define H_PASS() (h_passed++)
#define H_FAIL(...)                                                                                \
    do {                                                                                           \
        h_failed++;                                                                                \
        fprintf(stderr, "%s:%d: FAIL: ", __FILE__, __LINE__);                                      \
        fprintf(stderr, __VA_ARGS__);                                                              \
        fputc('\n', stderr);                                                                       \
    } while (0)

/* A boolean check. */
#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (cond)                                                                                  \
            H_PASS();                                                                              \
        else                                                                                       \
            H_FAIL("%s", #cond);                                                                   \
    } while (0)

/* A useful last-error message after a failed call that returned `rc`: the
 * thread's qcow2_last_errno() is `rc` and qcow2_last_error() names the
 * function ("qcow2_...: ") and says more than the errno text. */
static inline int h_useful_error(int rc) {
    const char *m = qcow2_last_error();
    return m != NULL && qcow2_last_errno() == rc && strncmp(m, "qcow2_", 6) == 0 &&
           strchr(m, ':') != NULL && strlen(m) > strlen(strchr(m, ':')) &&
           strlen(strchr(m, ':') + 1) > 2;
}

/* A call returning a qcow2 status code, compared with the expected one. An
 * expected failure must also leave a useful message (h_useful_error). */
#define CHECK_RC(expr, want)                                                                       \
    do {                                                                                           \
        int h_rc_ = (expr);                                                                        \
        int h_want_ = (want);                                                                      \
        if (h_rc_ != h_want_)                                                                      \
            H_FAIL("%s returned %d (%s), expected %d (%s); last error: %s", #expr, h_rc_,          \
                   qcow2_strerror(h_rc_), h_want_, qcow2_strerror(h_want_),                         \
                   h_rc_ < 0 ? qcow2_last_error() : "-");                                          \
        else if (h_rc_ < 0 && !h_useful_error(h_rc_))                                              \
            H_FAIL("%s failed as expected but left no useful message: errno %d, \"%s\"", #expr,     \
                   qcow2_last_errno(), qcow2_last_error());                                        \
        else                                                                                       \
            H_PASS();                                                                              \
    } while (0)

/* Two unsigned 64-bit values, compared with `op`. */
#define CHECK_U64(a, op, b)                                                                        \
    do {                                                                                           \
        uint64_t h_a_ = (uint64_t)(a);                                                             \
        uint64_t h_b_ = (uint64_t)(b);                                                             \
        if (h_a_ op h_b_)                                                                          \
            H_PASS();                                                                              \
        else                                                                                       \
            H_FAIL("%s %s %s: %" PRIu64 " vs %" PRIu64, #a, #op, #b, h_a_, h_b_);                  \
    } while (0)

/* Prints the final line and gives the exit status. */
static inline int h_finish(void) {
    printf("%d passed, %d failed\n", h_passed, h_failed);
    fflush(stdout);
    return h_failed ? 1 : 0;
}

/* Sets up the scratch directory from argv. */
static inline void h_init(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1) {
        snprintf(h_dir, sizeof h_dir, "%s", argv[1]);
    } else {
        char tmpl[] = "/tmp/qcow2-ffi-XXXXXX";
        if (!mkdtemp(tmpl)) {
            perror("mkdtemp");
            exit(2);
        }
        snprintf(h_dir, sizeof h_dir, "%s", tmpl);
    }
}

/* Path of `name` inside the scratch directory (a static buffer per call site is the caller's). */
static inline void h_path(char *out, size_t cap, const char *name) {
    snprintf(out, cap, "%s/%s", h_dir, name);
}

/* Runs a shell command built from a format; returns its exit status (-1 if it did not exit). */
static inline int h_sh(const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int st = system(cmd);
    if (st == -1)
        return -1;
    if ((st & 0x7f) != 0)
        return -1; /* killed by a signal */
    return (st >> 8) & 0xff;
}

/* qemu-img check passes (no corruption, no leaks, no errors). */
static inline int h_qemu_check(const char *path) {
    return h_sh("qemu-img check -q '%s' >/dev/null 2>&1", path) == 0;
}

/* The output of `qemu-img map --output=json`, with host offsets removed,
 * written to `out_file`. Returns 0 on success. */
static inline int h_qemu_map(const char *path, const char *out_file, int keep_offsets) {
    if (keep_offsets)
        return h_sh("qemu-img map --output=json '%s' >'%s' 2>&1", path, out_file);
    return h_sh("qemu-img map --output=json '%s' | sed -e 's/, \"offset\": [0-9]*//' >'%s' 2>&1",
                path, out_file);
}

/* The guest content of an image, read by qemu-img (convert to raw). Returns a
 * malloc'd buffer of *len bytes, or NULL. */
static inline uint8_t *h_qemu_content(const char *path, size_t *len) {
    char raw[8192];
    snprintf(raw, sizeof raw, "%s.raw", path);
    if (h_sh("qemu-img convert -U -O raw '%s' '%s' >/dev/null 2>&1", path, raw) != 0)
        return NULL;
    FILE *f = fopen(raw, "rb");
    if (!f)
        return NULL;
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
        fclose(f);
        return NULL;
    }
    uint8_t *buf = malloc((size_t)st.st_size + 1);
    size_t got = buf ? fread(buf, 1, (size_t)st.st_size, f) : 0;
    fclose(f);
    unlink(raw);
    if (!buf || got != (size_t)st.st_size) {
        free(buf);
        return NULL;
    }
    *len = got;
    return buf;
}

/* Files are equal byte for byte. */
static inline int h_same_file(const char *a, const char *b) {
    return h_sh("cmp -s '%s' '%s'", a, b) == 0;
}

/* Prints a file to stderr (for diagnostics). */
static inline void h_show(const char *label, const char *file) {
    fprintf(stderr, "--- %s (%s):\n", label, file);
    h_sh("cat '%s' >&2", file);
}

/* All bytes of buf[0..len) equal `v`. */
static inline int h_all(const uint8_t *buf, size_t len, uint8_t v) {
    for (size_t i = 0; i < len; i++)
        if (buf[i] != v)
            return 0;
    return 1;
}

#endif /* QCOW2_FFI_HARNESS_H */
