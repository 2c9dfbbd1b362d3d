/* Unit tests for rangelock.c: disjoint ranges are held at once, overlapping
 * ones exclude each other. */
#include <pthread.h>
#include <stdint.h>

#include "check.h"
#include "rangelock.h"

static struct range_lock rl;
static long counter; /* guarded only by the range [0, 8) */

static void *overlapping(void *arg)
{
    uint64_t first = (uint64_t)(uintptr_t)arg;
    for (int i = 0; i < 20000; i++) {
        struct range_held h;
        range_lock_acquire(&rl, &h, first, first + 5); /* every range covers block 4 */
        counter++;
        range_lock_release(&rl, &h);
    }
    return NULL;
}

static void *disjoint(void *arg)
{
    struct range_held h;
    range_lock_acquire(&rl, &h, 100, 200);
    *(int *)arg = 1;
    range_lock_release(&rl, &h);
    return NULL;
}

int main(void)
{
    range_lock_init(&rl);
    /* Held [0, 100): a thread locks [100, 200) without waiting for it (this
     * join would hang otherwise). */
    struct range_held outer;
    range_lock_acquire(&rl, &outer, 0, 100);
    int done = 0;
    pthread_t t;
    pthread_create(&t, NULL, disjoint, &done);
    pthread_join(t, NULL);
    CHECK(done == 1);
    range_lock_release(&rl, &outer);

    pthread_t ts[4];
    for (uintptr_t i = 0; i < 4; i++)
        pthread_create(&ts[i], NULL, overlapping, (void *)i);
    for (int i = 0; i < 4; i++)
        pthread_join(ts[i], NULL);
    CHECK(counter == 4 * 20000);
    CHECK(rl.held == NULL);
    range_lock_destroy(&rl);
    return check_summary();
}
