/*
 * One handle, several threads: each thread writes, zeroes (with and without
 * MAY_UNMAP) and reads its own disjoint range while another thread polls
 * stats and flushes. Afterwards the content is checked through the library
 * and through qemu-img, and the image must pass qemu-img check.
 */
#include "harness.h"

#include <pthread.h>

#define MiB (1024u * 1024u)
#define KiB 1024u
#define NTHREADS 6
#define REGION (2 * MiB)
#define CHUNK (96 * KiB) /* not cluster aligned: exercises partial clusters */
#define ROUNDS 12

typedef struct {
    Qcow2Image *img;
    int id;
    uint64_t base;
    uint8_t *model; /* expected content of the region */
    int errors;
    char msg[256];
} worker_t;

static volatile int stop_poller;

static uint64_t rng_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void fail(worker_t *w, const char *what, int rc, uint64_t off) {
    if (w->errors++ == 0)
        snprintf(w->msg, sizeof w->msg, "thread %d: %s at %" PRIu64 " returned %d (%s)", w->id, what,
                 off, rc, qcow2_strerror(rc));
}

static void *worker(void *arg) {
    worker_t *w = arg;
    uint64_t seed = 0x9e3779b97f4a7c15ull * (uint64_t)(w->id + 1);
    uint8_t *buf = malloc(CHUNK);
    if (!buf) {
        w->errors++;
        return NULL;
    }
    for (int round = 0; round < ROUNDS; round++) {
        for (int op = 0; op < 8; op++) {
            uint64_t off = (rng_next(&seed) % (REGION - CHUNK)) & ~(uint64_t)511;
            uint64_t len = CHUNK - ((rng_next(&seed) % 4) * 16 * KiB);
            int kind = (int)(rng_next(&seed) % 4);
            int rc;
            if (kind <= 1) {
                uint8_t v = (uint8_t)(w->id * 16 + round + op + 1);
                memset(buf, v, len);
                rc = qcow2_write(w->img, w->base + off, buf, len, op == 3 ? QCOW2_REQ_FUA : 0);
                if (rc)
                    fail(w, "write", rc, off);
                else
                    memset(w->model + off, v, len);
            } else {
                uint32_t flags = kind == 3 ? QCOW2_REQ_MAY_UNMAP : 0;
                rc = qcow2_write_zeroes(w->img, w->base + off, len, flags);
                if (rc)
                    fail(w, "write_zeroes", rc, off);
                else
                    memset(w->model + off, 0, len);
            }
            /* Read back a random window of the region and check it. */
            uint64_t roff = (rng_next(&seed) % (REGION - CHUNK)) & ~(uint64_t)511;
            rc = qcow2_read(w->img, w->base + roff, buf, CHUNK);
            if (rc)
                fail(w, "read", rc, roff);
            else if (memcmp(buf, w->model + roff, CHUNK) != 0)
                fail(w, "content check", 0, roff);
        }
        if (round % 4 == 3) {
            int rc = qcow2_flush(w->img);
            if (rc)
                fail(w, "flush", rc, 0);
        }
    }
    free(buf);
    return NULL;
}

static void *poller(void *arg) {
    Qcow2Image *img = arg;
    long n = 0;
    while (!stop_poller) {
        Qcow2Stats s;
        uint64_t vs;
        Qcow2Extent e[16];
        size_t ne;
        if (qcow2_get_stats(img, &s) != 0 || qcow2_get_virtual_size(img, &vs) != 0)
            return (void *)1;
        if (qcow2_block_status(img, 0, vs, e, 16, &ne) != 0)
            return (void *)1;
        if (++n % 64 == 0 && qcow2_flush(img) != 0)
            return (void *)1;
    }
    return NULL;
}

int main(int argc, char **argv) {
    h_init(argc, argv);
    char path[4200];
    h_path(path, sizeof path, "threads.qcow2");
    CHECK(h_sh("qemu-img create -q -f qcow2 '%s' %u", path, NTHREADS * REGION) == 0);
    /* Some pre-existing data so that zeroing hits allocated clusters too. */
    CHECK(h_sh("qemu-io -c 'write -P 0x5a 0 %u' '%s' >/dev/null", NTHREADS * REGION / 2, path) == 0);

    Qcow2Image *img = NULL;
    CHECK_RC(qcow2_open(path, QCOW2_OPEN_RDWR | QCOW2_OPEN_UNMAP, &img), 0);
    if (!img)
        return h_finish();

    worker_t w[NTHREADS];
    pthread_t t[NTHREADS], pt;
    for (int i = 0; i < NTHREADS; i++) {
        w[i].img = img;
        w[i].id = i;
        w[i].base = (uint64_t)i * REGION;
        w[i].model = malloc(REGION);
        w[i].errors = 0;
        w[i].msg[0] = '\0';
        if (!w[i].model)
            return 2;
        memset(w[i].model, w[i].base < NTHREADS * REGION / 2 ? 0x5a : 0, REGION);
    }
    stop_poller = 0;
    CHECK(pthread_create(&pt, NULL, poller, img) == 0);
    for (int i = 0; i < NTHREADS; i++)
        CHECK(pthread_create(&t[i], NULL, worker, &w[i]) == 0);
    for (int i = 0; i < NTHREADS; i++)
        CHECK(pthread_join(t[i], NULL) == 0);
    stop_poller = 1;
    void *pres = NULL;
    CHECK(pthread_join(pt, &pres) == 0);
    CHECK(pres == NULL);

    for (int i = 0; i < NTHREADS; i++) {
        if (w[i].errors)
            H_FAIL("%s (%d errors)", w[i].msg, w[i].errors);
        else
            H_PASS();
    }

    /* Whole content through the library. */
    uint8_t *buf = malloc(REGION);
    if (!buf)
        return 2;
    for (int i = 0; i < NTHREADS; i++) {
        CHECK_RC(qcow2_read(img, w[i].base, buf, REGION), 0);
        CHECK(memcmp(buf, w[i].model, REGION) == 0);
    }
    free(buf);
    Qcow2Stats s;
    CHECK_RC(qcow2_get_stats(img, &s), 0);
    CHECK_U64(s.data_bytes_written, >, 0);
    CHECK_RC(qcow2_close(img), 0);

    /* And through qemu. */
    CHECK(h_qemu_check(path));
    size_t clen = 0;
    uint8_t *c = h_qemu_content(path, &clen);
    CHECK(c != NULL && clen == (size_t)NTHREADS * REGION);
    if (c && clen == (size_t)NTHREADS * REGION)
        for (int i = 0; i < NTHREADS; i++)
            CHECK(memcmp(c + w[i].base, w[i].model, REGION) == 0);
    free(c);
    for (int i = 0; i < NTHREADS; i++)
        free(w[i].model);
    return h_finish();
}
