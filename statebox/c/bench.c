/*
 * Cost of statebox_export and statebox_import: median and p99 in ns of 20000 single calls each,
 * for 256 B and 10 KiB of data (the same figures as ../benches/export.rs).
 */
#include "statebox.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ITERATIONS 20000

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

static void report(const char *what, size_t size, long long *ns) {
    qsort(ns, ITERATIONS, sizeof *ns, by_value);
    printf("c %s %zu B: median %lld ns, p99 %lld ns (%d iterations)\n", what, size,
           ns[ITERATIONS / 2], ns[ITERATIONS * 99 / 100], ITERATIONS);
}

int main(void) {
    static long long ns[ITERATIONS];
    static unsigned char data[16 * 1024], out[16 * 1024];
    const size_t sizes[] = {256, 10 * 1024};
    statebox_region *r;
    int rc = statebox_open(4, 16 * 1024, &r);
    if (rc != 0) {
        fprintf(stderr, "statebox_open: %s\n", strerror(-rc));
        return 1;
    }
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (unsigned char)i;
    for (size_t k = 0; k < 2; k++) {
        size_t size = sizes[k];
        statebox_box b;
        if ((rc = statebox_create(r, k + 1, &b)) != 0) {
            fprintf(stderr, "statebox_create: %s\n", strerror(-rc));
            return 1;
        }
        for (int i = 0; i < ITERATIONS; i++) {
            long long t = now_ns();
            rc = statebox_export(r, &b, data, size);
            ns[i] = now_ns() - t;
            if (rc != 0) {
                fprintf(stderr, "statebox_export: %s\n", strerror(-rc));
                return 1;
            }
        }
        report("export", size, ns);
        for (int i = 0; i < ITERATIONS; i++) {
            long long t = now_ns();
            long len = statebox_import(r, &b, out, sizeof out);
            ns[i] = now_ns() - t;
            if (len != (long)size) {
                fprintf(stderr, "statebox_import: %ld\n", len);
                return 1;
            }
        }
        if (memcmp(out, data, size) != 0) {
            fprintf(stderr, "statebox_import returned other data than exported\n");
            return 1;
        }
        report("import", size, ns);
    }
    statebox_close(r);
    return 0;
}
