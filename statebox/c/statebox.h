/*
 * State Boxes for C applications (ABI v1, see ../ABI.md).
 *
 * A process exports each session's essential state into a "box" of one memory region mapped at
 * the fixed address 0x3bd000000000, locked in RAM, so that a monitor can read it through the
 * process's page tables without the help of the guest's CPU or OS.
 *
 * Every function returns 0 (or a length) on success and a negative errno on failure.
 *
 * Thread rules:
 *  - One region per process: a second statebox_open fails with -EEXIST.
 *  - statebox_create, statebox_delete and statebox_find may be called from any thread: they are
 *    serialized by a mutex inside the region.
 *  - A box has ONE writer at a time: statebox_export of a box must not run concurrently with
 *    another statebox_export or the statebox_delete of the SAME box. Exports of different boxes
 *    may run concurrently without any lock (each box is its own slot).
 *  - statebox_import may run at any time, also during an export of the same box: it retries
 *    until it reads a whole copy (or returns -EAGAIN).
 *  - statebox_close must not run concurrently with anything else on the region.
 *  - After fork() the child has no region (MADV_DONTFORK): it may only statebox_close() it.
 *
 * Memory: the region (4096 + slots * slot size, at most 8 MiB) is mlock()ed, so it counts
 * against RLIMIT_MEMLOCK (8 MiB by default on Linux >= 5.16; raise it with `ulimit -l`).
 */
#ifndef STATEBOX_H
#define STATEBOX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The fixed user virtual address of the region. */
#define STATEBOX_VA 0x3bd000000000ULL
/* Limits of statebox_open's arguments. */
#define STATEBOX_MAX_SLOTS 4096u
#define STATEBOX_MAX_CAPACITY (1u << 20)
#define STATEBOX_MAX_REGION_BYTES (8u << 20)

/* The process's region (opaque). */
typedef struct statebox_region statebox_region;

/* A box: its slot and which box (id, generation) the slot must still hold. */
typedef struct {
    uint32_t slot;
    uint64_t id;
    uint64_t generation;
} statebox_box;

/*
 * Maps the process's region of slot_count boxes (1..4096) of at most capacity bytes each (a
 * multiple of 8, 8..1 MiB; the whole region at most 8 MiB).
 * Errors: -EINVAL bad geometry, -EEXIST a region (or anything) is already mapped at STATEBOX_VA,
 * -EADDRNOTAVAIL the kernel ignores MAP_FIXED_NOREPLACE (Linux < 4.17),
 * -ENOMEM/-EPERM/-EAGAIN mlock refused (raise RLIMIT_MEMLOCK), others from mmap/madvise.
 */
int statebox_open(uint32_t slot_count, uint32_t capacity, statebox_region **out);

/*
 * Creates an empty box for session id (nonzero) in a free slot.
 * Errors: -EINVAL id 0 or NULL argument, -EEXIST id in use, -ENOSPC no free slot.
 */
int statebox_create(statebox_region *r, uint64_t id, statebox_box *out);

/*
 * Publishes len bytes of data as the box's state (the previous state stays readable until the
 * new one is whole).
 * Errors: -EINVAL NULL argument, -EMSGSIZE len > capacity, -ESTALE the box was deleted.
 */
int statebox_export(statebox_region *r, const statebox_box *b, const void *data, size_t len);

/*
 * Reads the box's state back into buf (validated as a monitor would). Returns its length.
 * Errors: -EINVAL NULL argument, -ENOBUFS cap is smaller than the state, -ESTALE the box was
 * deleted, -EAGAIN no whole copy after many retries, -EIO the region no longer holds what was
 * published (something wrote over it).
 */
long statebox_import(statebox_region *r, const statebox_box *b, void *buf, size_t cap);

/*
 * Deletes the box: its slot is published free and may be reused by a new box. *b is zeroed.
 * Errors: -EINVAL NULL argument, -ESTALE the box was already deleted.
 */
int statebox_delete(statebox_region *r, statebox_box *b);

/* Finds the box of session id. Errors: -ENOENT no such box, -EINVAL NULL argument or id 0. */
int statebox_find(statebox_region *r, uint64_t id, statebox_box *out);

/* Unmaps the region and frees r (NULL is ignored). Every box handle becomes invalid. */
void statebox_close(statebox_region *r);

/* The State Box check of (id, generation, data[..len]) as the ABI defines it. */
uint64_t statebox_check(uint64_t id, uint64_t generation, const void *data, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* STATEBOX_H */
