/* rangelock: waits for overlapping ranges only.
 *
 * A holder locks [first, end) of some numbered space (the blocks of a VM
 * disk); it waits while another holder has a range that overlaps it, and
 * never for one that does not. Holders need no allocation: each passes its
 * own struct range_held, which stays in the list until released.
 *
 * Thread-safe. The mutex inside is held only to look at the list, never
 * while a holder does its work.
 */
#ifndef IMGFS_RANGELOCK_H
#define IMGFS_RANGELOCK_H

#include <pthread.h>
#include <stdint.h>

struct range_held {
    uint64_t first, end;
    struct range_held *next;
};

struct range_lock {
    pthread_mutex_t mutex;
    pthread_cond_t released;
    struct range_held *held; /* guarded by mutex */
    unsigned waiting;        /* holders waiting in acquire; guarded by mutex */
};

void range_lock_init(struct range_lock *rl);
void range_lock_destroy(struct range_lock *rl);
/* Locks [first, end) with h, waiting while an overlapping range is held. */
void range_lock_acquire(struct range_lock *rl, struct range_held *h, uint64_t first, uint64_t end);
void range_lock_release(struct range_lock *rl, struct range_held *h);
/* How many holders wait for a range (for tests, to know one got there). */
unsigned range_lock_waiting(struct range_lock *rl);

#endif
