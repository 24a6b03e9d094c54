/*
 * C API misuse fuzz: seeded random argument values for every qcow2_* function.
 *
 * Only what the contract allows is passed: NULL where a pointer may be NULL,
 * otherwise valid buffers with random lengths up to their capacity, random
 * offsets and lengths (including huge ones and UINT64_MAX), random flag bits,
 * random open flags and create options. Handles are never reused after
 * qcow2_close. Every call must return 0 or a negative errno (never crash);
 * out-parameters must stay untouched on failure; extents returned by
 * qcow2_block_status must be ordered and inside the request; images written
 * to must pass `qemu-img check` afterwards (leaks allowed, corruption not).
 *
 * Seed: argv[2], or $QCOW2_MISUSE_SEED, or a fixed default; printed first.
 */
#include "harness.h"

#include <limits.h>

static uint64_t rng_state;

static uint64_t rnd(void) {
    /* xorshift64* */
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }

/* An "interesting" 64-bit value around the image geometry. */
static uint64_t pick_u64(uint64_t size, uint64_t cs) {
    switch (below(18)) {
    case 0: return 0;
    case 1: return 1;
    case 2: return 511;
    case 3: return 512;
    case 4: return cs ? cs - 1 : 4095;
    case 5: return cs;
    case 6: return size ? size - 1 : 0;
    case 7: return size;
    case 8: return size + 1;
    case 9: return UINT64_MAX;
    case 10: return UINT64_MAX - 511;
    case 11: return 1ULL << 63;
    case 12: return rnd();
    case 13: return below(size + 1);
    case 14: return below(size / 512 + 1) * 512;
    case 15: return cs ? below(size / cs + 1) * cs : 0;
    case 16: return (uint64_t)1 << below(64);
    default: return below(1u << 20);
    }
}

/* Random flag bits: mostly known ones, sometimes anything. */
static uint32_t pick_req_flags(void) {
    switch (below(4)) {
    case 0: return 0;
    case 1: return (uint32_t)(rnd() & (QCOW2_REQ_MAY_UNMAP | QCOW2_REQ_FUA | QCOW2_REQ_NO_FALLBACK));
    case 2: return (uint32_t)rnd();
    default: return (uint32_t)1 << below(32);
    }
}

static uint32_t pick_open_flags(void) {
    switch (below(6)) {
    case 0: return QCOW2_OPEN_RDWR;
    case 1: return QCOW2_OPEN_RDWR | QCOW2_OPEN_UNMAP;
    case 2: return (uint32_t)rnd();
    case 3: return (uint32_t)(rnd() & QCOW2_OPEN_KNOWN);
    case 4: return 0;
    default: return QCOW2_OPEN_RDWR | (uint32_t)(rnd() & QCOW2_OPEN_KNOWN);
    }
}

/* 0 or a negative errno; anything else is a contract violation. */
#define CHECK_ERRNO(what, rc)                                                                      \
    do {                                                                                           \
        int r_ = (rc);                                                                             \
        if (r_ == 0 || (r_ < 0 && r_ > -4096 && h_useful_error(r_)))                              \
            H_PASS();                                                                              \
        else                                                                                       \
            H_FAIL("%s returned %d (seed %" PRIu64 "); last error %d \"%s\"", what, r_, seed,      \
                   qcow2_last_errno(), qcow2_last_error());                                        \
    } while (0)

static uint64_t seed;

#define BUF_CAP (1u << 20)
#define EXT_CAP 64

static uint8_t *buf;

static const char *const backing_names[] = {"", "base.qcow2", "does/not/exist.qcow2", "/dev/null",
                                             "\xff\xfe-not-utf8", "x"};
static const char *const backing_fmts[] = {"qcow2", "raw", "vmdk", "", "qcow2\xff"};

static void random_create(const char *path, uint64_t *size_out) {
    Qcow2CreateOptions o;
    memset(&o, 0, sizeof o);
    static const uint64_t sizes[] = {0, 512, 1u << 20, 4u << 20, 1ull << 40, 1ull << 62, UINT64_MAX, 12345};
    static const uint64_t css[] = {0, 512, 4096, 65536, 2u << 20, 4u << 20, 1000, 256, 1ull << 40};
    static const uint32_t rbs[] = {0, 1, 2, 4, 8, 16, 32, 64, 3, 128};
    uint64_t size = sizes[below(sizeof sizes / sizeof sizes[0])];
    if (below(3) == 0)
        size = below(64u << 20);
    o.version = (uint32_t)below(5);
    o.cluster_size = css[below(sizeof css / sizeof css[0])];
    o.refcount_bits = rbs[below(sizeof rbs / sizeof rbs[0])];
    o.extended_l2 = below(4) == 0;
    o.lazy_refcounts = below(4) == 0;
    o.compression_type = (uint32_t)below(4);
    if (below(5) == 0)
        o.backing_file = backing_names[below(sizeof backing_names / sizeof backing_names[0])];
    if (below(5) == 0)
        o.backing_format = backing_fmts[below(sizeof backing_fmts / sizeof backing_fmts[0])];
    int rc = qcow2_create(path, size, below(6) == 0 ? NULL : &o);
    CHECK_ERRNO("qcow2_create", rc);
    *size_out = size;
}

/* One random call on an open handle (or on NULL). */
static void random_call(Qcow2Image *img, uint64_t size, uint64_t cs) {
    uint64_t off = pick_u64(size, cs);
    uint64_t len = pick_u64(size, cs);
    switch (below(12)) {
    case 0: { /* read */
        size_t n = (size_t)below(below(4) == 0 ? BUF_CAP + 1 : 70000);
        uint8_t *b = below(10) == 0 ? NULL : buf + below(BUF_CAP - n + 1);
        CHECK_ERRNO("qcow2_read", qcow2_read(img, off, b, n));
        break;
    }
    case 1: { /* write */
        size_t n = (size_t)below(below(4) == 0 ? BUF_CAP + 1 : 70000);
        const uint8_t *b = below(10) == 0 ? NULL : buf + below(BUF_CAP - n + 1);
        CHECK_ERRNO("qcow2_write", qcow2_write(img, off, b, n, pick_req_flags()));
        break;
    }
    case 2:
    case 3:
        CHECK_ERRNO("qcow2_write_zeroes", qcow2_write_zeroes(img, off, len, pick_req_flags()));
        break;
    case 4:
        CHECK_ERRNO("qcow2_discard", qcow2_discard(img, off, len));
        break;
    case 5:
        CHECK_ERRNO("qcow2_flush", qcow2_flush(img));
        break;
    case 6: { /* block status */
        Qcow2Extent ext[EXT_CAP + 1];
        size_t max = (size_t)below(EXT_CAP + 1);
        size_t n = (size_t)-7;
        Qcow2Extent *out = below(10) == 0 ? NULL : ext;
        size_t *n_out = below(10) == 0 ? NULL : &n;
        memset(ext, 0xa5, sizeof ext);
        int rc = qcow2_block_status(img, off, len, out, max, n_out);
        CHECK_ERRNO("qcow2_block_status", rc);
        if (rc != 0) {
            CHECK(n == (size_t)-7);
            break;
        }
        CHECK(n <= max);
        CHECK(len == 0 || n >= 1);
        uint64_t pos = off;
        for (size_t i = 0; i < n; i++) {
            if (ext[i].start != pos || ext[i].length == 0 || ext[i].start + ext[i].length > off + len) {
                H_FAIL("extent %zu [%" PRIu64 ", +%" PRIu64 ") out of order for request [%" PRIu64
                       ", +%" PRIu64 ") (seed %" PRIu64 ")",
                       i, ext[i].start, ext[i].length, off, len, seed);
                break;
            }
            pos += ext[i].length;
            H_PASS();
        }
        /* Nothing written past `n`. */
        uint8_t pattern[sizeof(Qcow2Extent)];
        memset(pattern, 0xa5, sizeof pattern);
        CHECK(memcmp(&ext[n], pattern, sizeof pattern) == 0);
        break;
    }
    case 7: {
        uint64_t u = 0x5151;
        int rc = qcow2_get_virtual_size(img, below(10) == 0 ? NULL : &u);
        CHECK_ERRNO("qcow2_get_virtual_size", rc);
        if (rc != 0)
            CHECK(u == 0x5151);
        break;
    }
    case 8: {
        uint64_t u = 0x5151;
        int rc = qcow2_get_cluster_size(img, below(10) == 0 ? NULL : &u);
        CHECK_ERRNO("qcow2_get_cluster_size", rc);
        if (rc != 0)
            CHECK(u == 0x5151);
        else
            CHECK(u >= 512 && u <= (2u << 20) && (u & (u - 1)) == 0);
        break;
    }
    case 9: {
        Qcow2Stats st;
        memset(&st, 0x77, sizeof st);
        Qcow2Stats before = st;
        int rc = qcow2_get_stats(img, below(10) == 0 ? NULL : &st);
        CHECK_ERRNO("qcow2_get_stats", rc);
        if (rc != 0)
            CHECK(memcmp(&st, &before, sizeof st) == 0);
        break;
    }
    case 10:
        CHECK_ERRNO("qcow2_reset_stats", qcow2_reset_stats(img));
        break;
    default: {
        int e = (int)rnd();
        if (below(2))
            e = -(int)below(200);
        const char *s = qcow2_strerror(e);
        CHECK(s != NULL && s[0] != '\0');
        break;
    }
    }
}

/* qemu-img check: 0 clean, 3 leaks only are fine; corruption (2) is not. */
static int qemu_check_ok(const char *path) {
    int st = h_sh("qemu-img check -q '%s' >/dev/null 2>&1", path);
    return st == 0 || st == 3;
}

int main(int argc, char **argv) {
    h_init(argc, argv);
    seed = 0x51ed2a11c0ffeeULL;
    const char *env = getenv("QCOW2_MISUSE_SEED");
    if (argc > 2)
        seed = strtoull(argv[2], NULL, 0);
    else if (env && *env)
        seed = strtoull(env, NULL, 0);
    rng_state = seed ? seed : 1;
    printf("seed %" PRIu64 "\n", seed);
    int rounds = 40, calls = 60;
    const char *r = getenv("QCOW2_MISUSE_ROUNDS");
    if (r && *r)
        rounds = atoi(r);

    buf = malloc(BUF_CAP);
    if (!buf) {
        perror("malloc");
        return 2;
    }
    for (size_t i = 0; i < BUF_CAP; i++)
        buf[i] = (uint8_t)(i * 131 + 7);

    /* A backing file some create options name. */
    char base[4200];
    h_path(base, sizeof base, "base.qcow2");
    CHECK_RC(qcow2_create(base, 4u << 20, NULL), 0);

    /* NULL handle: every function, random other arguments. */
    for (int i = 0; i < 200; i++)
        random_call(NULL, 1u << 20, 65536);
    CHECK_RC(qcow2_close(NULL), 0);

    for (int round = 0; round < rounds; round++) {
        char path[4200];
        h_path(path, sizeof path, "fuzz.qcow2");
        uint64_t size = 0;
        /* Mostly valid images (so calls go deep), sometimes random options. */
        if (below(3) == 0) {
            random_create(path, &size);
        } else {
            Qcow2CreateOptions o;
            memset(&o, 0, sizeof o);
            static const uint64_t css[] = {512, 4096, 65536};
            o.cluster_size = css[below(3)];
            o.version = below(4) == 0 ? 2 : 3;
            o.refcount_bits = o.version == 2 ? 16 : (uint32_t)1 << below(7);
            o.extended_l2 = o.version == 3 && o.cluster_size >= 16384 && below(2);
            size = (below(16384) + 1) * 512;
            if (below(2) && o.version == 3) {
                o.backing_file = "base.qcow2";
                o.backing_format = "qcow2";
            }
            CHECK_RC(qcow2_create(path, size, &o), 0);
        }
        Qcow2Image *sentinel = (Qcow2Image *)&sentinel;
        Qcow2Image *img = sentinel;
        uint32_t flags = pick_open_flags();
        int rc = qcow2_open(below(20) == 0 ? NULL : path, flags, below(20) == 0 ? NULL : &img);
        CHECK_ERRNO("qcow2_open", rc);
        if (rc != 0) {
            CHECK(img == sentinel);
            continue;
        }
        CHECK(img != NULL && img != sentinel);
        uint64_t vs = 0, cs = 0;
        CHECK_RC(qcow2_get_virtual_size(img, &vs), 0);
        CHECK_RC(qcow2_get_cluster_size(img, &cs), 0);
        for (int i = 0; i < calls; i++)
            random_call(img, vs, cs);
        CHECK_ERRNO("qcow2_close", qcow2_close(img));
        img = NULL;
        if (flags & QCOW2_OPEN_RDWR) {
            if (qemu_check_ok(path)) {
                H_PASS();
            } else {
                H_FAIL("qemu-img check finds corruption after round %d (seed %" PRIu64 ", flags %#x)", round,
                       seed, flags);
                h_sh("qemu-img check '%s' >&2", path);
            }
        }
    }
    free(buf);
    return h_finish();
}
