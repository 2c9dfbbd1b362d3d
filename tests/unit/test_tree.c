/* Unit tests for the mount tree's name index (fs/tree.c): with thousands of
 * VM disks, their snapshots and dozens of base versions, every name is found
 * under its own directory and nowhere else; removed VMs vanish from lookups
 * and their names can be taken again; adding a VM twice adds nothing; the
 * directory listing and the lookups agree. */
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "test_files.h"
#include "publish.h"
#include "repo.h"
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

    tree_destroy(tree);
    repo_close(repo);
    for (int i = 0; i < VMS; i++)
        free_vm(vms[i]);
    free_vm(again);
    remove_tree(tmp);
    return check_summary();
}
