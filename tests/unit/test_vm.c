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
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

static struct vm *create_blank(struct vm_registry *reg, const char *name)
{
    char err[256];
    struct vm *vm = NULL;
    if (vm_create(reg, name, NULL, 0, DISK_SIZE, &vm, err, sizeof(err)) != 0)
        fprintf(stderr, "vm_create %s: %s\n", name, err);
    return vm;
}

/* The name index: every VM is found by its name and only by it, past the
 * index's growth (64 slots, then doubling), after removals, after a name is
 * made again, and after the registry reopens from the state directory. */
#define INDEX_VMS 300

static void test_find_by_name(const char *state)
{
    char err[256], name[32];
    struct vm_registry *reg;
    CHECK(vm_registry_open(state, no_base, NULL, &reg, err, sizeof(err)) == 0);
    if (!reg)
        return;
    struct vm *made[INDEX_VMS] = {0};
    for (int i = 0; i < INDEX_VMS; i++) {
        snprintf(name, sizeof(name), "find%d", i);
        made[i] = create_blank(reg, name);
        CHECK(made[i] != NULL);
    }
    int found = 0;
    for (int i = 0; i < INDEX_VMS; i++) {
        snprintf(name, sizeof(name), "find%d", i);
        found += vm_find(reg, name) == made[i] && made[i];
    }
    CHECK(found == INDEX_VMS);
    CHECK(vm_find(reg, "find") == NULL);
    CHECK(vm_find(reg, "find3000") == NULL);
    CHECK(vm_find(reg, "") == NULL);
    /* Every third goes; the others stay found. */
    for (int i = 0; i < INDEX_VMS; i += 3)
        CHECK(made[i] && vm_remove(reg, made[i], err, sizeof(err)) == 0);
    int gone = 0, kept = 0;
    for (int i = 0; i < INDEX_VMS; i++) {
        snprintf(name, sizeof(name), "find%d", i);
        struct vm *vm = vm_find(reg, name);
        if (i % 3 == 0)
            gone += vm == NULL;
        else
            kept += vm == made[i];
    }
    CHECK(gone == (INDEX_VMS + 2) / 3);
    CHECK(kept == INDEX_VMS - (INDEX_VMS + 2) / 3);
    /* A removed name can be made again: the new VM is the one found. */
    struct vm *again = create_blank(reg, "find0");
    CHECK(again != NULL && again != made[0]);
    CHECK(vm_find(reg, "find0") == again);
    struct vm *dup = NULL;
    CHECK(vm_create(reg, "find1", NULL, 0, DISK_SIZE, &dup, err, sizeof(err)) == -EEXIST);
    vm_registry_close(reg);

    CHECK(vm_registry_open(state, no_base, NULL, &reg, err, sizeof(err)) == 0);
    if (!reg)
        return;
    int reloaded = 0;
    for (int i = 0; i < INDEX_VMS; i++) {
        snprintf(name, sizeof(name), "find%d", i);
        struct vm *vm = vm_find(reg, name);
        reloaded += (i == 0 || i % 3 != 0) ? vm && strcmp(vm_name(vm), name) == 0 : vm == NULL;
    }
    CHECK(reloaded == INDEX_VMS);
    vm_registry_close(reg);
}

/* Finds on two threads while a third makes and removes VMs, which grows
 * the index under them: a VM that exists throughout is always found, and a
 * removed one never. */
#define CHURN_VMS 200

struct find_race {
    struct vm_registry *reg;
    struct vm *stable;
    atomic_bool done;
    int misses;      /* finds of the stable VM that returned something else */
    int ghost_found; /* finds of a removed VM that found one */
};

static void *race_find(void *arg)
{
    struct find_race *r = arg;
    while (!atomic_load(&r->done)) {
        if (vm_find(r->reg, "stable") != r->stable)
            r->misses++;
        if (vm_find(r->reg, "ghost") != NULL)
            r->ghost_found++;
    }
    return NULL;
}

static void test_find_during_churn(const char *state)
{
    char err[256], name[32];
    struct find_race r = {0};
    CHECK(vm_registry_open(state, no_base, NULL, &r.reg, err, sizeof(err)) == 0);
    if (!r.reg)
        return;
    r.stable = create_blank(r.reg, "stable");
    struct vm *ghost = create_blank(r.reg, "ghost");
    CHECK(r.stable && ghost && vm_remove(r.reg, ghost, err, sizeof(err)) == 0);
    pthread_t threads[2];
    for (int t = 0; t < 2; t++)
        CHECK(pthread_create(&threads[t], NULL, race_find, &r) == 0);
    for (int i = 0; i < CHURN_VMS; i++) {
        snprintf(name, sizeof(name), "churn%d", i);
        struct vm *vm = create_blank(r.reg, name);
        CHECK(vm != NULL);
        if (vm && i % 2)
            CHECK(vm_remove(r.reg, vm, err, sizeof(err)) == 0);
    }
    atomic_store(&r.done, true);
    for (int t = 0; t < 2; t++)
        pthread_join(threads[t], NULL);
    CHECK(r.misses == 0);
    CHECK(r.ghost_found == 0);
    vm_registry_close(r.reg);
}

/* A write in flight (past its size check, waiting for its blocks) while an
 * ftruncate shrinks the blank disk under it: it fails as any write past the
 * end does, with ENOSPC (vm.h). */
enum shrunk_op {
    SHRUNK_WRITE,
    SHRUNK_DISCARD,      /* a discard of the last two blocks instead */
    SHRUNK_DISCARD_EDGES /* one of a block's length at 512 into them: two partial edges */
};

struct shrink_race {
    struct vm *vm;
    enum shrunk_op op;
    int write_rc;
};

static void *write_last_block(void *arg)
{
    struct shrink_race *r = arg;
    static const char block[4096] = {2};
    uint64_t two = 2 * sizeof(block);
    r->write_rc = r->op == SHRUNK_DISCARD         ? vm_discard(r->vm, NULL, DISK_SIZE - two, two)
                  : r->op == SHRUNK_DISCARD_EDGES ? vm_discard(r->vm, NULL, DISK_SIZE - two + 512, sizeof(block))
                                                  : vm_write(r->vm, NULL, block, sizeof(block), DISK_SIZE - sizeof(block));
    return NULL;
}

/* The same with a discard under way: past the new end it discards
 * nothing, as a discard past the end does (not EINVAL from the layer),
 * whether its blocks are whole or its partial edge blocks are zeroed by
 * writes (not ENOSPC from them). */
static void test_shrink_under_write(const char *state, enum shrunk_op op)
{
    static const char *const names[] = {"shrunk", "shrunk-discard", "shrunk-discard-edges"};
    bool discard = op != SHRUNK_WRITE;
    char err[256];
    struct vm_registry *reg = NULL;
    struct vm *vm = NULL;
    CHECK(vm_registry_open(state, no_base, NULL, &reg, err, sizeof(err)) == 0);
    if (!reg)
        return;
    CHECK(vm_create_empty(reg, names[op], 0600, 0, 0, &vm, err, sizeof(err)) == 0);
    CHECK(vm && vm_resize_blank(reg, vm, DISK_SIZE, err, sizeof(err)) == 0);
    if (vm) {
        struct shrink_race r = {.vm = vm, .op = op};
        struct range_held all;
        range_lock_acquire(&vm->write_ranges, &all, 0, UINT64_MAX); /* the write waits here */
        pthread_t writer;
        CHECK(pthread_create(&writer, NULL, write_last_block, &r) == 0);
        while (range_lock_waiting(&vm->write_ranges) == 0)
            sched_yield();
        CHECK(vm_resize_blank(reg, vm, DISK_SIZE / 2, err, sizeof(err)) == 0);
        range_lock_release(&vm->write_ranges, &all);
        pthread_join(writer, NULL);
        int want = discard ? 0 : -ENOSPC;
        if (r.write_rc != want)
            fprintf(stderr, "the %s past the shrunk end returned %d (%s)\n", discard ? "discard" : "write", r.write_rc,
                    strerror(-r.write_rc));
        CHECK(r.write_rc == want);
        CHECK(vm_size(vm) == DISK_SIZE / 2);
    }
    vm_registry_close(reg);
}

/* A snapshot is the origin of a clone exactly while a VM other than its
 * own reads through its top layer, whether the VM's own later snapshots
 * and live disk share that layer or not; an implicit snapshot (a clone of
 * the live VM) goes with its last clone. */
static void test_clone_origins(const char *state)
{
    char err[256];
    struct vm_registry *reg;
    CHECK(vm_registry_open(state, no_base, NULL, &reg, err, sizeof(err)) == 0);
    if (!reg)
        return;
    struct vm *a = create_blank(reg, "origin"), *c = NULL, *d = NULL;
    CHECK(a && vm_snapshot(reg, a, "s1", err, sizeof(err)) == 0);
    CHECK(a && vm_snapshot(reg, a, "s2", err, sizeof(err)) == 0);
    CHECK(a && vm_snapshot(reg, a, "s3", err, sizeof(err)) == 0);
    CHECK(a && vm_clone(reg, a, "s1", "from-s1", &c, err, sizeof(err)) == 0);
    if (!a || !c) {
        vm_registry_close(reg);
        return;
    }
    /* s2's top is in a's live chain and in s3's: a's own, so it may go. */
    CHECK(vm_remove_snapshot(reg, a, "s2", err, sizeof(err)) == 0);
    CHECK(vm_remove_snapshot(reg, a, "s1", err, sizeof(err)) == -EBUSY);
    CHECK(vm_remove(reg, c, err, sizeof(err)) == 0);
    CHECK(vm_remove_snapshot(reg, a, "s1", err, sizeof(err)) == 0);
    /* A clone of the live VM: its implicit snapshot stays while it lives. */
    CHECK(vm_clone(reg, a, NULL, "from-live", &d, err, sizeof(err)) == 0);
    static struct vm_snapshot *snaps[VM_MAX_SNAPSHOTS];
    CHECK(vm_snapshot_list(a, snaps) == 2);
    char implicit[65];
    snprintf(implicit, sizeof(implicit), "%s", vm_snapshot_list(a, snaps) == 2 ? vm_snapshot_name(snaps[1]) : "");
    CHECK(vm_remove_snapshot(reg, a, implicit, err, sizeof(err)) == -EBUSY);
    CHECK(d && vm_remove(reg, d, err, sizeof(err)) == 0);
    CHECK(vm_snapshot_list(a, snaps) == 1); /* s3 stays, the implicit one went with its clone */
    CHECK(vm_remove_snapshot(reg, a, "s3", err, sizeof(err)) == 0 && vm_snapshot_list(a, snaps) == 0);
    vm_registry_close(reg);
}

/* vm_remove looks only at the VMs that own layers of the removed VM's
 * chains for implicit snapshots left without a clone, and must find them
 * all: an origin two clones up (its layer deep in the chain, not the top of
 * the snapshot cloned), after the registry reopened, and an implicit
 * snapshot left unused by a VM file removed while no daemon ran (the first
 * removal after opening looks at every VM). Unrelated clones keep theirs. */
/* The registry of state, or NULL (a check failed). */
static struct vm_registry *open_registry(const char *state)
{
    char err[256];
    struct vm_registry *reg = NULL;
    CHECK(vm_registry_open(state, no_base, NULL, &reg, err, sizeof(err)) == 0);
    return reg;
}

static unsigned snapshots_of(struct vm *vm)
{
    static struct vm_snapshot *snaps[VM_MAX_SNAPSHOTS];
    return vm ? vm_snapshot_list(vm, snaps) : 0;
}

static void test_implicit_shared_chains(const char *state)
{
    char err[256], name[32];
    struct vm_registry *reg = open_registry(state);
    if (!reg)
        return;
    struct vm *other[20], *o0c = NULL, *a = create_blank(reg, "a"), *b = NULL, *c = NULL, *d = NULL;
    for (int i = 0; i < 20; i++) {
        snprintf(name, sizeof(name), "other%d", i);
        other[i] = create_blank(reg, name);
        CHECK(other[i] != NULL);
    }
    CHECK(other[0] && vm_clone(reg, other[0], NULL, "other0-clone", &o0c, err, sizeof(err)) == 0);
    /* a -> b (live clone: implicit on a), b@bs -> c, c -> d (implicit on c). */
    CHECK(a && vm_clone(reg, a, NULL, "b", &b, err, sizeof(err)) == 0);
    CHECK(b && vm_snapshot(reg, b, "bs", err, sizeof(err)) == 0);
    CHECK(b && vm_clone(reg, b, "bs", "c", &c, err, sizeof(err)) == 0);
    CHECK(c && vm_clone(reg, c, NULL, "d", &d, err, sizeof(err)) == 0);
    if (!a || !b || !c || !d || !o0c) {
        vm_registry_close(reg);
        return;
    }
    CHECK(snapshots_of(a) == 1 && snapshots_of(c) == 1);
    CHECK(vm_remove(reg, other[1], err, sizeof(err)) == 0); /* the sweep after opening */
    CHECK(vm_remove(reg, b, err, sizeof(err)) == 0);
    CHECK(snapshots_of(a) == 1); /* c and d still read through it */
    CHECK(vm_remove(reg, d, err, sizeof(err)) == 0);
    CHECK(snapshots_of(c) == 0 && snapshots_of(a) == 1);
    CHECK(vm_remove(reg, c, err, sizeof(err)) == 0);
    CHECK(snapshots_of(a) == 0); /* a's layer was c's bottom one */
    CHECK(snapshots_of(other[0]) == 1);

    /* Owners known from the VM files after a reopen. */
    struct vm *a2 = create_blank(reg, "a2"), *b2 = NULL, *a3 = create_blank(reg, "a3"), *b3 = NULL;
    CHECK(a2 && vm_clone(reg, a2, NULL, "b2", &b2, err, sizeof(err)) == 0);
    CHECK(a3 && vm_clone(reg, a3, NULL, "b3", &b3, err, sizeof(err)) == 0);
    vm_registry_close(reg);
    if (!(reg = open_registry(state)))
        return;
    CHECK(vm_remove(reg, vm_find(reg, "other2"), err, sizeof(err)) == 0);
    CHECK(snapshots_of(vm_find(reg, "a2")) == 1 && snapshots_of(vm_find(reg, "a3")) == 1);
    CHECK(vm_remove(reg, vm_find(reg, "b2"), err, sizeof(err)) == 0);
    CHECK(snapshots_of(vm_find(reg, "a2")) == 0);

    /* b3's VM file goes while no daemon runs: a3's implicit snapshot has no
     * clone, and the first removal after opening, of any VM, drops it. */
    vm_registry_close(reg);
    char path[4096];
    snprintf(path, sizeof(path), "%s/vms/b3.vm", state);
    CHECK(unlink(path) == 0);
    if (!(reg = open_registry(state)))
        return;
    CHECK(snapshots_of(vm_find(reg, "a3")) == 1);
    CHECK(vm_remove(reg, vm_find(reg, "other3"), err, sizeof(err)) == 0);
    CHECK(snapshots_of(vm_find(reg, "a3")) == 0);
    CHECK(snapshots_of(vm_find(reg, "other0")) == 1);
    vm_registry_close(reg);
}

/* layer_syscalls.open that fails every call after the first opens_left. */
static int (*real_open_saved)(const char *, int, mode_t);
static int opens_seen, opens_left = -1;

static int counting_open(const char *path, int flags, mode_t mode)
{
    opens_seen++;
    if (opens_left >= 0 && opens_left-- == 0) {
        opens_left = 0;
        errno = EIO;
        return -1;
    }
    return real_open_saved(path, flags, mode);
}

/* A clone of a live VM that fails after freezing it (here the clone's own
 * layer cannot be created) leaves the implicit snapshot without a clone;
 * the next removal of any VM drops it. */
static void test_failed_clone_drops_implicit(const char *state)
{
    char err[256];
    struct vm_registry *reg = open_registry(state);
    if (!reg)
        return;
    struct vm *a = create_blank(reg, "a"), *other = create_blank(reg, "other"), *spare = create_blank(reg, "spare");
    struct vm *b = NULL;
    CHECK(a && other && spare);
    if (!a || !other || !spare) {
        vm_registry_close(reg);
        return;
    }
    CHECK(vm_remove(reg, spare, err, sizeof(err)) == 0); /* the sweep after opening */
    real_open_saved = layer_syscalls.open;
    layer_syscalls.open = counting_open;
    opens_seen = 0;
    CHECK(vm_snapshot(reg, other, "s", err, sizeof(err)) == 0); /* what a freeze opens */
    opens_left = opens_seen;
    CHECK(vm_clone(reg, a, NULL, "b", &b, err, sizeof(err)) != 0 && !b);
    layer_syscalls.open = real_open_saved;
    opens_left = -1;
    CHECK(snapshots_of(a) == 1);
    CHECK(vm_remove(reg, other, err, sizeof(err)) == 0);
    CHECK(snapshots_of(a) == 0);
    vm_registry_close(reg);
}

/* A write that spans several blocks with partial ones at its edges (three
 * pieces: copy-up of each edge, the whole blocks between) whose data write
 * fails for the blocks between (ENOMEM injected through layer_syscalls)
 * fails whole: no block changed, none of the edge blocks either. */
static ssize_t (*real_pwrite_saved)(int fd, const void *buf, size_t len, off_t off);
static atomic_bool fail_big_pwrites;
static ssize_t failing_big_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    if (atomic_load(&fail_big_pwrites) && len > 4096) {
        errno = ENOMEM;
        return -1;
    }
    return real_pwrite_saved(fd, buf, len, off);
}

static int no_base_read(void *ctx, const struct vm_base *base, uint64_t index, void *buf, size_t len, uint64_t off)
{
    (void)ctx, (void)base, (void)index, (void)buf, (void)len, (void)off;
    return -EIO;
}

static bool disk_reads(struct vm *vm, const char *want, size_t len)
{
    static char got[6 * 4096];
    struct base_source src = {no_base_read, NULL};
    const struct disk *disk = vm_read_begin(vm, NULL, NULL);
    int rc = disk_read(disk, &src, got, len, 0);
    vm_read_end(vm);
    return rc == 0 && memcmp(got, want, len) == 0;
}

static void test_failed_write_changes_nothing(const char *state)
{
    struct vm_registry *reg = open_registry(state);
    if (!reg)
        return;
    struct vm *vm = create_blank(reg, "torn");
    static char old[6 * 4096], new[6 * 4096];
    memset(old, 'o', sizeof(old));
    memset(new, 'n', sizeof(new));
    CHECK(vm && vm_write(vm, NULL, old, sizeof(old), 0) == 0);
    real_pwrite_saved = layer_syscalls.pwrite;
    layer_syscalls.pwrite = failing_big_pwrite;
    atomic_store(&fail_big_pwrites, true);
    /* 512 into block 0 to 512 into block 4: blocks 0 and 4 partial. */
    int rc = vm ? vm_write(vm, NULL, new, 4 * 4096, 512) : 0;
    atomic_store(&fail_big_pwrites, false);
    layer_syscalls.pwrite = real_pwrite_saved;
    CHECK(rc == -ENOMEM);
    CHECK(vm && disk_reads(vm, old, sizeof(old)));
    /* And the same write, once it can be done, is done whole. */
    CHECK(vm && vm_write(vm, NULL, new, 4 * 4096, 512) == 0);
    memcpy(old + 512, new, 4 * 4096);
    CHECK(vm && disk_reads(vm, old, sizeof(old)));
    vm_registry_close(reg);
}

/* Runs test in a state directory of its own, made and removed here. */
static int in_fresh_state(void (*test)(const char *state))
{
    char state[] = "/tmp/imgfs-vm-test.XXXXXX";
    if (!mkdtemp(state)) {
        fprintf(stderr, "mkdtemp: %s\n", strerror(errno));
        return -1;
    }
    test(state);
    remove_tree(state);
    return 0;
}

static void test_shrinks(const char *state)
{
    test_size_across_threads(state);
    test_shrink_under_write(state, SHRUNK_WRITE);
    test_shrink_under_write(state, SHRUNK_DISCARD);
    test_shrink_under_write(state, SHRUNK_DISCARD_EDGES);
}

int main(void)
{
    void (*const tests[])(const char *) = {test_shrinks, test_find_by_name, test_find_during_churn,
                                           test_clone_origins, test_implicit_shared_chains,
                                           test_failed_write_changes_nothing, test_failed_clone_drops_implicit};
    for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++)
        if (in_fresh_state(tests[i]) != 0)
            return 1;
    return check_summary();
}
