#include "rangelock.h"

#include <stdbool.h>

void range_lock_init(struct range_lock *rl)
{
    pthread_mutex_init(&rl->mutex, NULL);
    pthread_cond_init(&rl->released, NULL);
    rl->held = NULL;
    rl->waiting = 0;
}

void range_lock_destroy(struct range_lock *rl)
{
    pthread_mutex_destroy(&rl->mutex);
    pthread_cond_destroy(&rl->released);
}

static bool overlaps(const struct range_lock *rl, uint64_t first, uint64_t end)
{
    for (const struct range_held *h = rl->held; h; h = h->next)
        if (h->first < end && first < h->end)
            return true;
    return false;
}

void range_lock_acquire(struct range_lock *rl, struct range_held *h, uint64_t first, uint64_t end)
{
    h->first = first;
    h->end = end;
    pthread_mutex_lock(&rl->mutex);
    rl->waiting++;
    while (overlaps(rl, first, end))
        pthread_cond_wait(&rl->released, &rl->mutex);
    rl->waiting--;
    h->next = rl->held;
    rl->held = h;
    pthread_mutex_unlock(&rl->mutex);
}

void range_lock_release(struct range_lock *rl, struct range_held *h)
{
    pthread_mutex_lock(&rl->mutex);
    for (struct range_held **p = &rl->held; *p; p = &(*p)->next)
        if (*p == h) {
            *p = h->next;
            break;
        }
    pthread_cond_broadcast(&rl->released);
    pthread_mutex_unlock(&rl->mutex);
}

unsigned range_lock_waiting(struct range_lock *rl)
{
    pthread_mutex_lock(&rl->mutex);
    unsigned n = rl->waiting;
    pthread_mutex_unlock(&rl->mutex);
    return n;
}
