/*
 * State Boxes for C applications: the writer side of ABI v1 (../ABI.md). See statebox.h for the
 * API and its thread rules.
 *
 * Publishing: write the INACTIVE copy of the slot whole, then release-store seq + 2. The active
 * copy is never written, so a reader that catches the process (or the whole guest) mid-update
 * still finds the previous state whole.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include "statebox.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the State Box ABI is little-endian; this library writes native integers"
#endif

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define SB_MAGIC 0x31584f4254534442ULL /* "BDSTBOX1" little-endian */
#define SB_VERSION 1u
#define SB_HEADER_BYTES 4096u
#define SB_SLOT_HEADER 64u
#define SB_COPY_HEADER 32u
#define SB_PAGE 4096u
#define SB_IMPORT_RETRIES 64

/* Header offsets. */
#define H_MAGIC 0x00
#define H_VERSION 0x08
#define H_HEADER_BYTES 0x0c
#define H_SLOT_COUNT 0x10
#define H_SLOT_SIZE 0x14
#define H_CAPACITY 0x18
#define H_REGION_GENERATION 0x20
#define H_NEXT_GENERATION 0x28

/* Copy offsets. */
#define C_ID 0x00
#define C_GENERATION 0x08
#define C_LEN 0x10
#define C_CHECK 0x18

struct statebox_region {
    unsigned char *base;
    size_t len;
    uint32_t slot_count;
    uint32_t slot_size;
    uint32_t capacity;
    uint32_t copy_size;
    pthread_mutex_t lock;      /* serializes create, delete, find */
    uint64_t next_generation;  /* under lock */
    uint64_t *ids;             /* slot -> id (0 = free); written under lock, atomic access */
    uint64_t *generations;     /* slot -> generation; written under lock, atomic access */
    uint32_t *free_slots;      /* stack of free slots, lowest on top; under lock */
    uint32_t free_count;
};

static inline uint64_t rotl64(uint64_t x, unsigned r) { return (x << r) | (x >> (64u - r)); }

uint64_t statebox_check(uint64_t id, uint64_t generation, const void *data, size_t len) {
    const unsigned char *p = data;
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ id ^ rotl64(generation, 32) ^ (uint64_t)len;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = rotl64((h ^ w) * 0x00000100000001B3ULL, 29);
    }
    if (i < len) {
        uint64_t w = 0;
        memcpy(&w, p + i, len - i);
        h = rotl64((h ^ w) * 0x00000100000001B3ULL, 29);
    }
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ULL;
    h ^= h >> 29;
    return h;
}

static void put32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static uint64_t *seq_of(statebox_region *r, uint32_t slot) {
    /* 8-aligned: the mapping is page aligned and slot_size is a multiple of 64. */
    return (uint64_t *)(void *)(r->base + SB_HEADER_BYTES + (size_t)slot * r->slot_size);
}

static unsigned char *copy_of(statebox_region *r, uint32_t slot, unsigned copy) {
    return r->base + SB_HEADER_BYTES + (size_t)slot * r->slot_size + SB_SLOT_HEADER +
           (size_t)copy * r->copy_size;
}

/* Publishes {id, generation, data} into slot; the caller is the slot's only writer. */
static void publish(statebox_region *r, uint32_t slot, uint64_t id, uint64_t generation,
                    const void *data, size_t len) {
    uint64_t *seq = seq_of(r, slot);
    uint64_t s = __atomic_load_n(seq, __ATOMIC_RELAXED);
    unsigned inactive = (unsigned)((s >> 1) & 1u) ^ 1u;
    unsigned char *c = copy_of(r, slot, inactive);
    put64(c + C_ID, id);
    put64(c + C_GENERATION, generation);
    put32(c + C_LEN, (uint32_t)len);
    put32(c + C_LEN + 4, 0);
    put64(c + C_CHECK, statebox_check(id, generation, data, len));
    if (len > 0)
        memcpy(c + SB_COPY_HEADER, data, len);
    __atomic_store_n(seq, s + 2, __ATOMIC_RELEASE);
}

static int random_nonzero(uint64_t *out) {
    uint64_t v = 0;
    while (v == 0) {
        ssize_t n = getrandom(&v, sizeof v, 0);
        if (n == (ssize_t)sizeof v)
            continue;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != ENOSYS)
            return -errno;
        /* No getrandom(2): /dev/urandom. */
        int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return -errno;
        n = read(fd, &v, sizeof v);
        int e = errno;
        close(fd);
        if (n != (ssize_t)sizeof v)
            return n < 0 ? -e : -EIO;
    }
    *out = v;
    return 0;
}

/* Geometry of the ABI: 0 or -EINVAL. */
static int geometry(uint32_t slot_count, uint32_t capacity, uint32_t *copy_size,
                    uint32_t *slot_size, size_t *region_bytes) {
    if (slot_count == 0 || slot_count > STATEBOX_MAX_SLOTS)
        return -EINVAL;
    if (capacity < 8 || capacity > STATEBOX_MAX_CAPACITY || capacity % 8 != 0)
        return -EINVAL;
    *copy_size = (SB_COPY_HEADER + capacity + 63u) / 64u * 64u;
    *slot_size = SB_SLOT_HEADER + 2u * *copy_size;
    uint64_t raw = (uint64_t)SB_HEADER_BYTES + (uint64_t)slot_count * *slot_size;
    uint64_t bytes = (raw + SB_PAGE - 1) / SB_PAGE * SB_PAGE;
    if (bytes > STATEBOX_MAX_REGION_BYTES)
        return -EINVAL;
    *region_bytes = (size_t)bytes;
    return 0;
}

static void free_region(statebox_region *r) {
    free(r->ids);
    free(r->generations);
    free(r->free_slots);
    free(r);
}

int statebox_open(uint32_t slot_count, uint32_t capacity, statebox_region **out) {
    if (out == NULL)
        return -EINVAL;
    *out = NULL;
    uint32_t copy_size, slot_size;
    size_t len;
    int rc = geometry(slot_count, capacity, &copy_size, &slot_size, &len);
    if (rc != 0)
        return rc;
    uint64_t region_generation = 0;
    rc = random_nonzero(&region_generation);
    if (rc != 0)
        return rc;

    statebox_region *r = calloc(1, sizeof *r);
    if (r == NULL)
        return -ENOMEM;
    r->ids = calloc(slot_count, sizeof *r->ids);
    r->generations = calloc(slot_count, sizeof *r->generations);
    r->free_slots = calloc(slot_count, sizeof *r->free_slots);
    if (r->ids == NULL || r->generations == NULL || r->free_slots == NULL) {
        free_region(r);
        return -ENOMEM;
    }
    rc = pthread_mutex_init(&r->lock, NULL);
    if (rc != 0) {
        free_region(r);
        return -rc;
    }

    void *want = (void *)(uintptr_t)STATEBOX_VA;
    void *p = mmap(want, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == MAP_FAILED) {
        rc = -errno;
        goto fail;
    }
    if (p != want) {
        /* A kernel before 4.17 took the address as a hint only. */
        munmap(p, len);
        rc = -EADDRNOTAVAIL;
        goto fail;
    }
    if (madvise(p, len, MADV_DONTFORK) != 0 || madvise(p, len, MADV_DONTDUMP) != 0 ||
        mlock(p, len) != 0) {
        rc = -errno;
        munmap(p, len);
        goto fail;
    }

    r->base = p;
    r->len = len;
    r->slot_count = slot_count;
    r->slot_size = slot_size;
    r->capacity = capacity;
    r->copy_size = copy_size;
    r->next_generation = 1;
    for (uint32_t i = 0; i < slot_count; i++)
        r->free_slots[i] = slot_count - 1 - i;
    r->free_count = slot_count;

    /* The header, magic last: a reader never takes a half-written header for a valid one. */
    unsigned char *h = r->base;
    put32(h + H_VERSION, SB_VERSION);
    put32(h + H_HEADER_BYTES, SB_HEADER_BYTES);
    put32(h + H_SLOT_COUNT, slot_count);
    put32(h + H_SLOT_SIZE, slot_size);
    put32(h + H_CAPACITY, capacity);
    put64(h + H_REGION_GENERATION, region_generation);
    put64(h + H_NEXT_GENERATION, r->next_generation);
    __atomic_store_n((uint64_t *)(void *)(h + H_MAGIC), SB_MAGIC, __ATOMIC_RELEASE);

    *out = r;
    return 0;

fail:
    pthread_mutex_destroy(&r->lock);
    free_region(r);
    return rc;
}

/* Is b a live box of r? Reads the slot tables atomically (they change under the lock only). */
static int live(statebox_region *r, const statebox_box *b) {
    if (b->slot >= r->slot_count || b->id == 0)
        return 0;
    return __atomic_load_n(&r->ids[b->slot], __ATOMIC_ACQUIRE) == b->id &&
           __atomic_load_n(&r->generations[b->slot], __ATOMIC_ACQUIRE) == b->generation;
}

/* The slot holding id, or -1; call with the lock held. */
static long slot_of(statebox_region *r, uint64_t id) {
    for (uint32_t i = 0; i < r->slot_count; i++)
        if (r->ids[i] == id)
            return (long)i;
    return -1;
}

int statebox_create(statebox_region *r, uint64_t id, statebox_box *out) {
    if (r == NULL || out == NULL || id == 0)
        return -EINVAL;
    pthread_mutex_lock(&r->lock);
    int rc = 0;
    if (slot_of(r, id) >= 0) {
        rc = -EEXIST;
    } else if (r->free_count == 0) {
        rc = -ENOSPC;
    } else {
        uint32_t slot = r->free_slots[--r->free_count];
        uint64_t generation = r->next_generation++;
        if (r->next_generation == 0)
            r->next_generation = 1;
        __atomic_store_n((uint64_t *)(void *)(r->base + H_NEXT_GENERATION), r->next_generation,
                         __ATOMIC_RELEASE);
        publish(r, slot, id, generation, NULL, 0);
        __atomic_store_n(&r->generations[slot], generation, __ATOMIC_RELEASE);
        __atomic_store_n(&r->ids[slot], id, __ATOMIC_RELEASE);
        out->slot = slot;
        out->id = id;
        out->generation = generation;
    }
    pthread_mutex_unlock(&r->lock);
    return rc;
}

int statebox_export(statebox_region *r, const statebox_box *b, const void *data, size_t len) {
    if (r == NULL || b == NULL || (data == NULL && len > 0))
        return -EINVAL;
    if (len > r->capacity)
        return -EMSGSIZE;
    if (!live(r, b))
        return -ESTALE;
    publish(r, b->slot, b->id, b->generation, data, len);
    return 0;
}

long statebox_import(statebox_region *r, const statebox_box *b, void *buf, size_t cap) {
    if (r == NULL || b == NULL || (buf == NULL && cap > 0))
        return -EINVAL;
    if (!live(r, b))
        return -ESTALE;
    uint64_t *seq = seq_of(r, b->slot);
    for (int attempt = 0; attempt < SB_IMPORT_RETRIES; attempt++) {
        uint64_t s1 = __atomic_load_n(seq, __ATOMIC_ACQUIRE);
        const unsigned char *c = copy_of(r, b->slot, (unsigned)((s1 >> 1) & 1u));
        uint64_t id = get64(c + C_ID);
        uint64_t generation = get64(c + C_GENERATION);
        uint32_t len = get32(c + C_LEN);
        uint64_t check = get64(c + C_CHECK);
        int fits = len <= r->capacity && len <= cap;
        if (fits && len > 0)
            memcpy(buf, c + SB_COPY_HEADER, len);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (s1 % 2 != 0)
            return -EIO;
        if (__atomic_load_n(seq, __ATOMIC_RELAXED) != s1)
            continue; /* republished while we read: read again */
        if (id != b->id || generation != b->generation || len > r->capacity)
            return -EIO;
        if (len > cap)
            return -ENOBUFS;
        if (statebox_check(id, generation, buf, len) != check)
            return -EIO;
        return (long)len;
    }
    return -EAGAIN;
}

int statebox_delete(statebox_region *r, statebox_box *b) {
    if (r == NULL || b == NULL)
        return -EINVAL;
    pthread_mutex_lock(&r->lock);
    int rc = 0;
    if (!live(r, b)) {
        rc = -ESTALE;
    } else {
        publish(r, b->slot, 0, 0, NULL, 0);
        __atomic_store_n(&r->ids[b->slot], 0, __ATOMIC_RELEASE);
        __atomic_store_n(&r->generations[b->slot], 0, __ATOMIC_RELEASE);
        r->free_slots[r->free_count++] = b->slot;
        memset(b, 0, sizeof *b);
    }
    pthread_mutex_unlock(&r->lock);
    return rc;
}

int statebox_find(statebox_region *r, uint64_t id, statebox_box *out) {
    if (r == NULL || out == NULL || id == 0)
        return -EINVAL;
    pthread_mutex_lock(&r->lock);
    long slot = slot_of(r, id);
    int rc = -ENOENT;
    if (slot >= 0) {
        out->slot = (uint32_t)slot;
        out->id = id;
        out->generation = r->generations[slot];
        rc = 0;
    }
    pthread_mutex_unlock(&r->lock);
    return rc;
}

void statebox_close(statebox_region *r) {
    if (r == NULL)
        return;
    munmap(r->base, r->len);
    pthread_mutex_destroy(&r->lock);
    free_region(r);
}
