/* Unit tests for the mount tree's name index (fs/tree.c): with thousands of
 * VM disks, their snapshots and dozens of base versions, every name is found
 * under its own directory and nowhere else; removed VMs vanish from lookups
 * and their names can be taken again; adding a VM twice adds nothing; the
 * directory listing and the lookups agree. Nodes handed from one FUSE
 * thread to another with only the kernel's ordering between them (threads
 * ordered here by relaxed flags, which ThreadSanitizer does not count as
 * synchronisation); the placeholders of a takeover are never served; a
 * VM added while its snapshots are made and removed. */
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "test_files.h"
#include "publish.h"
#include "repo.h"
#include "takeover.h"
#include "tree.h"
#include "util.h"

#define VMS 3000
#define BASES 4
#define VERSIONS 10

static struct vm *new_vm(const char *name, const char *snap)
{
    struct vm *vm = calloc(1, sizeof(*vm));
    if (!vm)
        abort();
    snprintf(vm->name, sizeof(vm->name), "%s", name);
    pthread_rwlock_init(&vm->chain_lock, NULL);
    if (snap) {
        vm->snapshots = calloc(VM_MAX_SNAPSHOTS, sizeof(*vm->snapshots)); /* as vm.c makes it */
        if (!vm->snapshots || !(vm->snapshots[0] = calloc(1, sizeof(*vm->snapshots[0]))))
            abort();
        snprintf(vm->snapshots[0]->name, sizeof(vm->snapshots[0]->name), "%s", snap);
        vm->snapshot_count = 1;
    }
    return vm;
}

static void free_vm(struct vm *vm)
{
    if (vm->snapshot_count)
        free(vm->snapshots[0]);
    free(vm->snapshots);
    pthread_rwlock_destroy(&vm->chain_lock);
    free(vm);
}

static int count_child(void *ctx, const struct node *n)
{
    (void)n;
    (*(int *)ctx)++;
    return 0;
}

static int children(struct tree *tree, fuse_ino_t parent)
{
    int n = 0;
    tree_for_each_child(tree, parent, 0, count_child, &n);
    return n;
}

/* A getattr that found the node of a VM while, on another thread, vm rm
 * detached it: the getattr reads the node's parent (live_node in fs/ops.c)
 * after tree_get has let go of the lock. */
struct remove_relay {
    struct tree *tree;
    struct vm *vm;
    fuse_ino_t ino;
    atomic_int stage; /* 1: found, 2: removed */
    fuse_ino_t parent_seen;
};

static void wait_stage(atomic_int *stage, int want)
{
    while (atomic_load_explicit(stage, memory_order_relaxed) < want)
        sched_yield();
}

static void *relay_getattr(void *arg)
{
    struct remove_relay *r = arg;
    struct node *n = tree_get(r->tree, r->ino);
    atomic_store_explicit(&r->stage, 1, memory_order_relaxed);
    wait_stage(&r->stage, 2);
    r->parent_seen = n ? n->parent : (fuse_ino_t)-1;
    return NULL;
}

static void *relay_remove(void *arg)
{
    struct remove_relay *r = arg;
    wait_stage(&r->stage, 1);
    tree_remove_vm(r->tree, r->vm);
    atomic_store_explicit(&r->stage, 2, memory_order_relaxed);
    return NULL;
}

static void test_remove_across_threads(struct tree *tree)
{
    struct vm *vm = new_vm("relayed", NULL);
    CHECK(tree_add_vm(tree, vm) == 0);
    struct node *n = tree_lookup(tree, INO_VMS, "relayed.raw");
    CHECK(n != NULL);
    if (!n)
        return;
    struct remove_relay r = {.tree = tree, .vm = vm, .ino = n->ino};
    pthread_t threads[2];
    CHECK(pthread_create(&threads[0], NULL, relay_remove, &r) == 0);
    CHECK(pthread_create(&threads[1], NULL, relay_getattr, &r) == 0);
    for (int i = 0; i < 2; i++)
        pthread_join(threads[i], NULL);
    CHECK(r.parent_seen == 0); /* detached: the getattr answers ENOENT */
    free_vm(vm); /* the node stays, detached, and is never used again */
}

/* After a takeover, the numbers an earlier server gave are placeholders
 * until the node is seen again; a request for one (a handle or an inode the
 * kernel kept) finds nothing, and never a node whose kind and VM a claim
 * is about to write. */
static void test_placeholders_not_served(struct repo *repo)
{
    int fd;
    struct takeover *t = takeover_create(&fd);
    CHECK(t != NULL);
    if (!t)
        return;
    fuse_ino_t ino = INO_FIRST_DYNAMIC;
    t->inodes[ino - 1] = (struct takeover_inode){.parent = INO_VMS, .kind = NODE_VM_FILE};
    snprintf(t->inodes[ino - 1].name, sizeof(t->inodes[ino - 1].name), "kept.raw");
    t->inode_count = ino;
    struct tree *tree = NULL;
    CHECK(tree_create(repo, 3600, &tree) == 0);
    if (tree) {
        tree_use_inode_map(tree, t);
        CHECK(tree_get(tree, ino) == NULL);
        CHECK(tree_lookup(tree, INO_VMS, "kept.raw") == NULL);
        struct vm *vm = new_vm("kept", NULL);
        CHECK(tree_add_vm(tree, vm) == 0);
        struct node *n = tree_get(tree, ino);
        CHECK(n && n->kind == NODE_VM_FILE && n->vm == vm && n->parent == INO_VMS);
        CHECK(n && tree_lookup(tree, INO_VMS, "kept.raw") == n);
        tree_destroy(tree);
        free_vm(vm);
    }
    close(fd);
}

/* Snapshots of a real VM made and removed on one thread (imgfsctl vm
 * snapshot and snapshot rm) while another adds the VM to the tree (a
 * create, a clone or a lookup after a takeover): the list is read under its
 * lock (ThreadSanitizer sees a race otherwise), and each snapshot that
 * stays gets its node. */
struct snapshot_churn {
    struct vm_registry *reg;
    struct vm *vm;
    atomic_bool done;
    int failures;
};

enum { CHURN_ROUNDS = 40 };

static void *churn_snapshots(void *arg)
{
    struct snapshot_churn *c = arg;
    char err[256], name[32];
    for (int i = 0; i < CHURN_ROUNDS; i++) {
        snprintf(name, sizeof(name), "churn%d", i);
        if (vm_snapshot(c->reg, c->vm, name, err, sizeof(err)) != 0) {
            fprintf(stderr, "vm_snapshot: %s\n", err);
            c->failures++;
        }
        snprintf(name, sizeof(name), "churn%d", i - 1);
        if (i % 2 == 1 && vm_remove_snapshot(c->reg, c->vm, name, err, sizeof(err)) != 0) {
            fprintf(stderr, "vm_remove_snapshot: %s\n", err);
            c->failures++;
        }
    }
    atomic_store(&c->done, true);
    return NULL;
}

static const struct vm_base *no_base(void *ctx, const char *name, uint64_t version)
{
    (void)ctx, (void)name, (void)version;
    return NULL;
}

static void test_add_during_snapshots(struct tree *tree, const char *tmp)
{
    char state[PATH_MAX], err[256];
    path_join(state, sizeof(state), "%s/state", tmp);
    struct snapshot_churn c = {0};
    CHECK(vm_registry_open(state, no_base, NULL, &c.reg, err, sizeof(err)) == 0);
    if (!c.reg)
        return;
    CHECK(vm_create_empty(c.reg, "churned", 0600, 0, 0, &c.vm, err, sizeof(err)) == 0);
    CHECK(c.vm && vm_resize_blank(c.reg, c.vm, 1 << 20, err, sizeof(err)) == 0);
    if (c.vm) {
        pthread_t churner;
        CHECK(pthread_create(&churner, NULL, churn_snapshots, &c) == 0);
        int adds = 0;
        while (!atomic_load(&c.done) && tree_add_vm(tree, c.vm) == 0)
            adds++;
        pthread_join(churner, NULL);
        CHECK(c.failures == 0);
        CHECK(tree_add_vm(tree, c.vm) == 0);
        for (int i = 0; i < CHURN_ROUNDS; i += 2) { /* the odd ones stay */
            char name[48];
            snprintf(name, sizeof(name), "churned@churn%d.raw", i + 1);
            struct node *n = tree_lookup(tree, INO_VMS, name);
            CHECK(n && n->kind == NODE_VM_SNAPSHOT && n->vm == c.vm);
        }
        printf("tree_add_vm ran %d times during %d snapshots\n", adds, CHURN_ROUNDS);
        tree_remove_vm(tree, c.vm);
    }
    vm_registry_close(c.reg);
}

/* A repository with BASES bases of VERSIONS versions each. */
static struct repo *make_repo(const char *tmp)
{
    char image[PATH_MAX], repo_path[PATH_MAX], err[512];
    path_join(image, sizeof(image), "%s/img.raw", tmp);
    path_join(repo_path, sizeof(repo_path), "%s/repo", tmp);
    FILE *f = fopen(image, "w");
    CHECK(f && fputs("a tiny disk\n", f) >= 0 && fclose(f) == 0);
    for (int b = 0; b < BASES; b++) {
        char name[16];
        snprintf(name, sizeof(name), "base%d", b);
        for (int v = 0; v < VERSIONS; v++) {
            struct publish_options opts = {
                .image_path = image, .repo_path = repo_path, .name = name, .chunk_size = 4096, .threads = 1};
            struct publish_result r;
            if (publish_image(&opts, &r, err, sizeof(err)) != 0) {
                fprintf(stderr, "publish: %s\n", err);
                CHECK(!"publish failed");
                return NULL;
            }
        }
    }
    struct repo *repo = NULL;
    CHECK(repo_open(repo_path, &repo, err, sizeof(err)) == 0);
    return repo;
}

int main(void)
{
    char tmp[] = "/tmp/imgfs-test-tree-XXXXXX";
    CHECK(mkdtemp(tmp) != NULL);
    struct repo *repo = make_repo(tmp);
    struct tree *tree = NULL;
    if (!repo || tree_create(repo, 3600, &tree) != 0) {
        CHECK(!"no tree");
        return check_summary();
    }
    char err[512];
    CHECK(tree_refresh(tree, true, err, sizeof(err)) == 0);

    static struct vm *vms[VMS];
    for (int i = 0; i < VMS; i++) {
        char name[32], snap[32];
        snprintf(name, sizeof(name), "vm%d", i);
        snprintf(snap, sizeof(snap), "s%d", i);
        vms[i] = new_vm(name, i % 3 == 0 ? snap : NULL);
        CHECK(tree_add_vm(tree, vms[i]) == 0);
    }
    int vm_nodes = VMS + (VMS + 2) / 3;
    CHECK(children(tree, INO_VMS) == vm_nodes);
    CHECK(children(tree, INO_BASES) == BASES * (VERSIONS + 1));
    CHECK(tree_add_vm(tree, vms[7]) == 0); /* again: nothing new */
    CHECK(children(tree, INO_VMS) == vm_nodes);

    int wrong = 0;
    for (int i = 0; i < VMS; i++) {
        char name[40];
        snprintf(name, sizeof(name), "vm%d.raw", i);
        struct node *n = tree_lookup(tree, INO_VMS, name);
        wrong += !n || n->vm != vms[i] || n->kind != NODE_VM_FILE || n->parent != INO_VMS || tree_get(tree, n->ino) != n;
        wrong += tree_lookup(tree, INO_BASES, name) != NULL; /* only under its own directory */
        snprintf(name, sizeof(name), "vm%d@s%d.raw", i, i);
        n = tree_lookup(tree, INO_VMS, name);
        wrong += i % 3 == 0 ? !n || n->kind != NODE_VM_SNAPSHOT || n->snapshot != vms[i]->snapshots[0] : n != NULL;
    }
    CHECK(wrong == 0);
    for (int b = 0; b < BASES; b++)
        for (int v = 1; v <= VERSIONS; v++) {
            char name[16];
            snprintf(name, sizeof(name), "base%d", b);
            struct base_version *bv = tree_find_version(tree, name, (uint64_t)v);
            CHECK(bv && bv->manifest->version == (uint64_t)v && strcmp(bv->manifest->name, name) == 0);
        }
    CHECK(tree_find_version(tree, "base0", VERSIONS + 1) == NULL);
    struct node *link = tree_lookup(tree, INO_BASES, "base1.raw");
    char target[80] = "";
    if (link)
        tree_read_link(tree, link, target, sizeof(target));
    CHECK(link && link->kind == NODE_BASE_LINK && strcmp(target, "base1@10.raw") == 0);
    CHECK(tree_lookup(tree, INO_STATUS_DIR, "stats") && tree_lookup(tree, INO_ROOT, "vms"));
    CHECK(tree_lookup(tree, INO_ROOT, "") == NULL && tree_lookup(tree, INO_VMS, "nothing.raw") == NULL);

    /* Removed VMs vanish; their names can be taken by new VMs. */
    for (int i = 0; i < VMS; i += 2)
        tree_remove_vm(tree, vms[i]);
    wrong = 0;
    for (int i = 0; i < VMS; i++) {
        char name[40];
        snprintf(name, sizeof(name), "vm%d.raw", i);
        struct node *n = tree_lookup(tree, INO_VMS, name);
        wrong += i % 2 == 0 ? n != NULL : !n || n->vm != vms[i];
    }
    CHECK(wrong == 0);
    struct vm *again = new_vm("vm0", "s0");
    CHECK(tree_add_vm(tree, again) == 0);
    struct node *n = tree_lookup(tree, INO_VMS, "vm0.raw");
    CHECK(n && n->vm == again);
    n = tree_lookup(tree, INO_VMS, "vm0@s0.raw");
    CHECK(n && n->vm == again);

    test_remove_across_threads(tree);
    test_placeholders_not_served(repo);
    test_add_during_snapshots(tree, tmp);

    tree_destroy(tree);
    repo_close(repo);
    for (int i = 0; i < VMS; i++)
        free_vm(vms[i]);
    free_vm(again);
    remove_tree(tmp);
    return check_summary();
}
