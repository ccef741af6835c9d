/*
 * A State Box example: a server keeps one box per session, exports each session's state after
 * every change, reads it back, and deletes the box when the session ends.
 */
#include "statebox.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

struct session {
    uint64_t id;
    const char *user;
    statebox_box box;
};

int main(void) {
    statebox_region *r;
    int rc = statebox_open(16, 1024, &r);
    if (rc != 0) {
        fprintf(stderr, "statebox_open: %s\n", strerror(-rc));
        return 1;
    }
    printf("opened a region of 16 boxes of 1024 bytes at %#llx\n",
           (unsigned long long)STATEBOX_VA);

    struct session sessions[] = {{1001, "alice", {0}}, {1002, "bob", {0}}, {1003, "carol", {0}}};
    size_t n = sizeof sessions / sizeof sessions[0];
    for (size_t i = 0; i < n; i++) {
        struct session *s = &sessions[i];
        if ((rc = statebox_create(r, s->id, &s->box)) != 0) {
            fprintf(stderr, "statebox_create %" PRIu64 ": %s\n", s->id, strerror(-rc));
            return 1;
        }
        char state[128];
        int len = snprintf(state, sizeof state, "user=%s bids=%zu last_seq=%zu", s->user, i + 1,
                           10 * (i + 1));
        if ((rc = statebox_export(r, &s->box, state, (size_t)len)) != 0) {
            fprintf(stderr, "statebox_export: %s\n", strerror(-rc));
            return 1;
        }
        printf("session %" PRIu64 ": box in slot %" PRIu32 " (generation %" PRIu64
               "), exported \"%s\"\n",
               s->id, s->box.slot, s->box.generation, state);
    }

    char buf[1024];
    for (size_t i = 0; i < n; i++) {
        long len = statebox_import(r, &sessions[i].box, buf, sizeof buf);
        if (len < 0) {
            fprintf(stderr, "statebox_import: %s\n", strerror((int)-len));
            return 1;
        }
        printf("session %" PRIu64 ": imported \"%.*s\"\n", sessions[i].id, (int)len, buf);
    }

    statebox_box found;
    if ((rc = statebox_find(r, 1002, &found)) != 0) {
        fprintf(stderr, "statebox_find: %s\n", strerror(-rc));
        return 1;
    }
    printf("found session 1002 in slot %" PRIu32 "\n", found.slot);
    if ((rc = statebox_delete(r, &found)) != 0) {
        fprintf(stderr, "statebox_delete: %s\n", strerror(-rc));
        return 1;
    }
    printf("deleted session 1002; find now says: %s\n",
           strerror(-statebox_find(r, 1002, &found)));

    statebox_close(r);
    printf("closed the region\n");
    return 0;
}
