/*
 * Tests of the C library: the pinned check vectors (the Rust tests pin the same numbers), the
 * region's bytes as the ABI lays them out, round trips, every error, and exports racing imports.
 */
#include "statebox.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);   \
            failures++;                                                                \
        }                                                                              \
    } while (0)

static uint64_t u64_at(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint32_t u32_at(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static void test_vectors(void) {
    CHECK(statebox_check(1, 1, "", 0) == 0x430745c1c6fa3d5aULL);
    CHECK(statebox_check(0x1122334455667788ULL, 7, "hello, state box", 16) ==
          0xed76f211762fb694ULL);
    CHECK(statebox_check(5, 9, "abc", 3) == 0x2e28465757ed8cc1ULL);
    CHECK(statebox_check(5, 9, "abc", 3) != statebox_check(5, 9, "abc\0", 4));
}

static void test_layout_and_round_trip(void) {
    statebox_region *r;
    CHECK(statebox_open(4, 100 * 8, &r) == 0);
    const unsigned char *base = (const unsigned char *)(uintptr_t)STATEBOX_VA;
    CHECK(memcmp(base, "BDSTBOX1", 8) == 0);
    CHECK(u32_at(base + 0x08) == 1);
    CHECK(u32_at(base + 0x0c) == 4096);
    CHECK(u32_at(base + 0x10) == 4);
    uint32_t slot_size = u32_at(base + 0x14);
    uint32_t copy_size = (32 + 800 + 63) / 64 * 64;
    CHECK(slot_size == 64 + 2 * copy_size);
    CHECK(u32_at(base + 0x18) == 800);
    CHECK(u64_at(base + 0x20) != 0);
    CHECK(u64_at(base + 0x28) == 1);

    statebox_box a, b;
    CHECK(statebox_create(r, 77, &a) == 0);
    CHECK(a.id == 77 && a.generation == 1 && a.slot == 0);
    CHECK(u64_at(base + 0x28) == 2);
    CHECK(statebox_create(r, 78, &b) == 0);
    CHECK(b.slot == 1 && b.generation == 2);

    const char *msg = "hello, state box";
    CHECK(statebox_export(r, &a, msg, 16) == 0);
    /* Slot 0: created (seq 2, copy 1), exported (seq 4, copy 0). */
    const unsigned char *slot = base + 4096;
    CHECK(u64_at(slot) == 4);
    const unsigned char *c0 = slot + 64, *c1 = slot + 64 + copy_size;
    CHECK(u64_at(c0) == 77 && u64_at(c0 + 8) == 1 && u32_at(c0 + 0x10) == 16);
    CHECK(u64_at(c0 + 0x18) == statebox_check(77, 1, msg, 16));
    CHECK(memcmp(c0 + 32, msg, 16) == 0);
    /* The previous state (empty box) is whole in the inactive copy. */
    CHECK(u64_at(c1) == 77 && u32_at(c1 + 0x10) == 0 && u64_at(c1 + 0x18) == statebox_check(77, 1, "", 0));

    char buf[800];
    CHECK(statebox_import(r, &a, buf, sizeof buf) == 16);
    CHECK(memcmp(buf, msg, 16) == 0);
    CHECK(statebox_import(r, &b, buf, sizeof buf) == 0);
    CHECK(statebox_import(r, &a, buf, 15) == -ENOBUFS);

    statebox_box f;
    CHECK(statebox_find(r, 78, &f) == 0 && f.slot == b.slot && f.generation == b.generation);
    CHECK(statebox_find(r, 79, &f) == -ENOENT);
    CHECK(statebox_find(r, 0, &f) == -EINVAL);

    /* Errors. */
    statebox_box x;
    CHECK(statebox_create(r, 0, &x) == -EINVAL);
    CHECK(statebox_create(r, 77, &x) == -EEXIST);
    char big[801] = {0};
    CHECK(statebox_export(r, &a, big, 801) == -EMSGSIZE);
    CHECK(statebox_export(r, &a, big, 800) == 0);
    statebox_box forged = a;
    forged.generation += 100;
    CHECK(statebox_export(r, &forged, "x", 1) == -ESTALE);
    forged = a;
    forged.slot = 99;
    CHECK(statebox_import(r, &forged, buf, sizeof buf) == -ESTALE);

    /* Delete: published free ({0, 0, len 0}), slot reused with a new generation. */
    statebox_box old = a;
    CHECK(statebox_delete(r, &a) == 0);
    CHECK(a.id == 0 && a.generation == 0);
    uint64_t seq = u64_at(slot);
    const unsigned char *active = slot + 64 + ((seq >> 1) & 1) * copy_size;
    CHECK(u64_at(active) == 0 && u64_at(active + 8) == 0 && u32_at(active + 0x10) == 0);
    CHECK(u64_at(active + 0x18) == statebox_check(0, 0, "", 0));
    CHECK(statebox_delete(r, &old) == -ESTALE);
    CHECK(statebox_export(r, &old, "x", 1) == -ESTALE);
    CHECK(statebox_find(r, 77, &f) == -ENOENT);
    statebox_box c, d;
    CHECK(statebox_create(r, 80, &c) == 0);
    CHECK(c.slot == old.slot && c.generation != old.generation);
    CHECK(statebox_create(r, 81, &d) == 0);
    CHECK(statebox_create(r, 82, &d) == 0);
    CHECK(statebox_create(r, 83, &d) == -ENOSPC);

    /* One region per process. */
    statebox_region *r2;
    CHECK(statebox_open(1, 8, &r2) == -EEXIST);
    statebox_close(r);
    CHECK(statebox_open(1, 8, &r2) == 0);
    statebox_close(r2);

    /* Bad geometry. */
    CHECK(statebox_open(0, 8, &r2) == -EINVAL);
    CHECK(statebox_open(4097, 8, &r2) == -EINVAL);
    CHECK(statebox_open(1, 12, &r2) == -EINVAL);
    CHECK(statebox_open(1, (1u << 20) + 8, &r2) == -EINVAL);
    CHECK(statebox_open(4, 1u << 20, &r2) == -EINVAL);
    CHECK(statebox_open(1, 8, NULL) == -EINVAL);
}

/* Exports racing imports: every import returns a whole state (all bytes equal to its length's
 * low byte), never a mix of two. */
#define RACE_BOXES 3
#define RACE_ROUNDS 20000

struct race {
    statebox_region *r;
    statebox_box box;
    int bad;
};

static void *exporter(void *arg) {
    struct race *t = arg;
    unsigned char data[512];
    for (int i = 0; i < RACE_ROUNDS; i++) {
        size_t len = 1 + (size_t)i % 511;
        memset(data, (int)(len & 0xff), len);
        if (statebox_export(t->r, &t->box, data, len) != 0)
            t->bad++;
    }
    return NULL;
}

static void *importer(void *arg) {
    struct race *t = arg;
    unsigned char buf[512];
    for (int i = 0; i < RACE_ROUNDS; i++) {
        long len = statebox_import(t->r, &t->box, buf, sizeof buf);
        if (len == -EAGAIN)
            continue;
        if (len < 0) {
            t->bad++;
            continue;
        }
        for (long k = 0; k < len; k++)
            if (buf[k] != (unsigned char)(len & 0xff)) {
                t->bad++;
                break;
            }
    }
    return NULL;
}

static void test_exports_race_imports(void) {
    statebox_region *r;
    CHECK(statebox_open(RACE_BOXES, 512, &r) == 0);
    struct race ex[RACE_BOXES], im[RACE_BOXES];
    pthread_t th[2 * RACE_BOXES];
    for (int i = 0; i < RACE_BOXES; i++) {
        ex[i].r = r;
        ex[i].bad = 0;
        CHECK(statebox_create(r, (uint64_t)i + 1, &ex[i].box) == 0);
        im[i] = ex[i];
    }
    for (int i = 0; i < RACE_BOXES; i++) {
        CHECK(pthread_create(&th[2 * i], NULL, exporter, &ex[i]) == 0);
        CHECK(pthread_create(&th[2 * i + 1], NULL, importer, &im[i]) == 0);
    }
    for (int i = 0; i < 2 * RACE_BOXES; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < RACE_BOXES; i++)
        CHECK(ex[i].bad == 0 && im[i].bad == 0);
    statebox_close(r);
}

/* Writes the bytes of a region with known boxes to path, for the Rust test that parses them:
 * box 1 "second" (exported "first" before), box 2 deleted, box 3 "c state". */
static int dump(const char *path) {
    statebox_region *r;
    statebox_box b1, b2, b3;
    if (statebox_open(4, 64, &r) != 0 || statebox_create(r, 1, &b1) != 0 ||
        statebox_export(r, &b1, "first", 5) != 0 || statebox_export(r, &b1, "second", 6) != 0 ||
        statebox_create(r, 2, &b2) != 0 || statebox_delete(r, &b2) != 0 ||
        statebox_create(r, 3, &b3) != 0 || statebox_export(r, &b3, "c state", 7) != 0) {
        fprintf(stderr, "dump: building the region failed\n");
        return 1;
    }
    const unsigned char *base = (const unsigned char *)(uintptr_t)STATEBOX_VA;
    size_t len = 4096 + 4 * (size_t)u32_at(base + 0x14);
    FILE *f = fopen(path, "wb");
    if (f == NULL || fwrite(base, 1, len, f) != len || fclose(f) != 0) {
        perror(path);
        return 1;
    }
    statebox_close(r);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--dump") == 0)
        return dump(argv[2]);
    test_vectors();
    test_layout_and_round_trip();
    test_exports_race_imports();
    if (failures != 0) {
        fprintf(stderr, "statebox C test: %d checks failed\n", failures);
        return 1;
    }
    printf("statebox C test: all checks passed\n");
    return 0;
}
