/* Unit tests for vm.c below the mount, on a temporary state directory:
 * what one FUSE thread changes in a VM and the next request reads on
 * another thread, with only the kernel's ordering of the two requests
 * between them. The threads here are ordered only by relaxed flags, which
 * ThreadSanitizer (like the kernel's ordering) does not count as
 * synchronisation, so a field that is read with no lock must be atomic. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "test_files.h"
#include "util.h"
#include "vm.h"

#define DISK_SIZE (1u << 20)

static const struct vm_base *no_base(void *ctx, const char *name, uint64_t version)
{
    (void)ctx, (void)name, (void)version;
    return NULL;
}

/* create (O_CREAT: a blank disk of size 0) on one thread, ftruncate on a
 * second, then a stat and a write on a third, as the kernel passes them. */
struct size_relay {
    struct vm_registry *reg;
    struct vm *vm;
    atomic_int stage; /* 1: sized */
    uint64_t seen_size;
    int write_rc;
    int resize_rc;
};

static void wait_stage(struct size_relay *r, int stage)
{
    while (atomic_load_explicit(&r->stage, memory_order_relaxed) < stage)
        sched_yield();
}

static void *relay_resize(void *arg)
{
    struct size_relay *r = arg;
    char err[256];
    r->resize_rc = vm_resize_blank(r->reg, r->vm, DISK_SIZE, err, sizeof(err));
    if (r->resize_rc)
        fprintf(stderr, "vm_resize_blank: %s\n", err);
    atomic_store_explicit(&r->stage, 1, memory_order_relaxed);
    return NULL;
}

static void *relay_stat_and_write(void *arg)
{
    struct size_relay *r = arg;
    wait_stage(r, 1);
    r->seen_size = vm_size(r->vm); /* getattr, then the write's own check */
    static const char block[4096] = {1};
    r->write_rc = vm_write(r->vm, NULL, block, sizeof(block), DISK_SIZE - sizeof(block));
    return NULL;
}

static void test_size_across_threads(const char *state)
{
    char err[256];
    struct size_relay r = {0};
    CHECK(vm_registry_open(state, no_base, NULL, &r.reg, err, sizeof(err)) == 0);
    if (!r.reg)
        return;
    CHECK(vm_create_empty(r.reg, "blank", 0600, 0, 0, &r.vm, err, sizeof(err)) == 0);
    if (r.vm) {
        CHECK(vm_size(r.vm) == 0);
        pthread_t threads[2];
        CHECK(pthread_create(&threads[0], NULL, relay_stat_and_write, &r) == 0);
        CHECK(pthread_create(&threads[1], NULL, relay_resize, &r) == 0);
        for (int i = 0; i < 2; i++)
            pthread_join(threads[i], NULL);
        CHECK(r.resize_rc == 0);
        CHECK(r.seen_size == DISK_SIZE);
        CHECK(r.write_rc == 0);
        CHECK(vm_size(r.vm) == DISK_SIZE);
    }
    vm_registry_close(r.reg);
}

/* A write in flight (past its size check, waiting for its blocks) while an
 * ftruncate shrinks the blank disk under it: it fails as any write past the
 * end does, with ENOSPC (vm.h). */
struct shrink_race {
    struct vm *vm;
    int write_rc;
};

static void *write_last_block(void *arg)
{
    struct shrink_race *r = arg;
    static const char block[4096] = {2};
    r->write_rc = vm_write(r->vm, NULL, block, sizeof(block), DISK_SIZE - sizeof(block));
    return NULL;
}

static void test_shrink_under_write(const char *state)
{
    char err[256];
    struct vm_registry *reg = NULL;
    struct vm *vm = NULL;
    CHECK(vm_registry_open(state, no_base, NULL, &reg, err, sizeof(err)) == 0);
    if (!reg)
        return;
    CHECK(vm_create_empty(reg, "shrunk", 0600, 0, 0, &vm, err, sizeof(err)) == 0);
    CHECK(vm && vm_resize_blank(reg, vm, DISK_SIZE, err, sizeof(err)) == 0);
    if (vm) {
        struct shrink_race r = {.vm = vm};
        struct range_held all;
        range_lock_acquire(&vm->write_ranges, &all, 0, UINT64_MAX); /* the write waits here */
        pthread_t writer;
        CHECK(pthread_create(&writer, NULL, write_last_block, &r) == 0);
        while (range_lock_waiting(&vm->write_ranges) == 0)
            sched_yield();
        CHECK(vm_resize_blank(reg, vm, DISK_SIZE / 2, err, sizeof(err)) == 0);
        range_lock_release(&vm->write_ranges, &all);
        pthread_join(writer, NULL);
        if (r.write_rc != -ENOSPC)
            fprintf(stderr, "the write past the shrunk end returned %d (%s)\n", r.write_rc, strerror(-r.write_rc));
        CHECK(r.write_rc == -ENOSPC);
        CHECK(vm_size(vm) == DISK_SIZE / 2);
    }
    vm_registry_close(reg);
}

int main(void)
{
    char state[] = "/tmp/imgfs-vm-test.XXXXXX";
    if (!mkdtemp(state)) {
        fprintf(stderr, "mkdtemp: %s\n", strerror(errno));
        return 1;
    }
    test_size_across_threads(state);
    test_shrink_under_write(state);
    remove_tree(state);
    return check_summary();
}
