#include "vm.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "prefetch.h"
#include "util.h"

#define STATE_MARKER "imgfs-state 1\n"
#define VM_CONF_MAX (1u << 20)

/* A chained hash table by name: nslots (a power of two, or 0) heads of
 * chains linked through the entries' name_link, grown to keep the chains
 * short, so that finding one of N entries costs the same as one of 10. The
 * VMs by name and the open layers by ID. */
struct name_table {
    struct name_link **slots;
    size_t nslots;
    size_t count;
};

/* The entry of type that holds link as its member. */
#define LINK_OWNER(link, type, member) ((type *)(void *)((char *)(link) - offsetof(type, member)))

/* A layer shared by the disks that reference it. */
struct layer_ref {
    struct layer *layer;
    unsigned refs;
    /* The VM that wrote the layer: it was made as that VM's live top, or
     * loaded as the top of its live disk or of one of its snapshots. The
     * snapshot that freezes a layer is always its owner's (a snapshot
     * freezes its VM's own top), so the VMs whose implicit snapshots a
     * removal may leave unused are the owners of the removed chains'
     * layers (vm_remove). NULL until set; may be a removed VM. */
    struct vm *owner;
    struct name_link link; /* in the layer table, by layer_id() */
};

struct vm_registry {
    char state_dir[PATH_MAX - 128];
    char layer_dir[PATH_MAX];
    vm_base_lookup_fn lookup;
    void *lookup_ctx;
    /* Everything below is guarded by lock. VMs are never freed before
     * vm_registry_close(): removed ones are marked deleted. */
    pthread_mutex_t lock;
    struct vm **vms; /* every VM loaded or made since the mount, removed ones too */
    size_t vm_count;
    struct name_table by_name; /* the VMs that are not removed */
    struct name_table layers;  /* the open layers by ID (loading N disks costs N, not N^2) */
    /* Layers named by VM files that did not load: never deleted, since the
     * VM comes back once its base does. */
    char (*kept)[LAYER_ID_LEN + 1];
    size_t kept_count;
    /* An implicit snapshot may be left without a clone by something other
     * than the removal at hand (a crash before its VM file was saved, as
     * the registry opens; a save that failed), so the next vm_remove looks
     * at every VM, as one with no owners to go by would. */
    bool implicit_sweep;
    char errors[2048];
};

/* The slot of key in a table of nslots (a power of two) chains. */
static size_t slot_of(const char *key, size_t nslots)
{
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)key; *p; p++)
        h = (h ^ *p) * 0x100000001b3ull;
    return (size_t)(h ^ h >> 29) & (nslots - 1);
}

static struct name_link *table_find(const struct name_table *t, const char *name)
{
    if (!t->nslots)
        return NULL;
    for (struct name_link *l = t->slots[slot_of(name, t->nslots)]; l; l = l->next)
        if (strcmp(l->name, name) == 0)
            return l;
    return NULL;
}

/* Adds link (its name set); nothing changes on -ENOMEM. */
static int table_add(struct name_table *t, struct name_link *link)
{
    if (t->count + 1 > t->nslots) {
        size_t nslots = t->nslots ? t->nslots * 2 : 64;
        struct name_link **grown = calloc(nslots, sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        for (size_t i = 0; i < t->nslots; i++)
            for (struct name_link *l = t->slots[i], *next; l; l = next) {
                next = l->next;
                struct name_link **at = &grown[slot_of(l->name, nslots)];
                l->next = *at;
                *at = l;
            }
        free(t->slots);
        t->slots = grown;
        t->nslots = nslots;
    }
    struct name_link **at = &t->slots[slot_of(link->name, t->nslots)];
    link->next = *at;
    *at = link;
    t->count++;
    return 0;
}

static void table_remove(struct name_table *t, struct name_link *link)
{
    for (struct name_link **at = &t->slots[slot_of(link->name, t->nslots)]; *at; at = &(*at)->next)
        if (*at == link) {
            *at = link->next;
            t->count--;
            return;
        }
}

/* ---- layer table (registry->lock held) ------------------------------------- */

static struct layer_ref *find_layer_ref(struct vm_registry *reg, const char *id)
{
    struct name_link *l = table_find(&reg->layers, id);
    return l ? LINK_OWNER(l, struct layer_ref, link) : NULL;
}

/* Adds layer to the table with no refs. */
static int track_layer(struct vm_registry *reg, struct layer *layer, struct layer_ref **out)
{
    struct layer_ref *ref = malloc(sizeof(*ref));
    if (!ref)
        return -ENOMEM;
    *ref = (struct layer_ref){.layer = layer, .link.name = layer_id(layer)};
    if (table_add(&reg->layers, &ref->link) != 0) {
        free(ref);
        return -ENOMEM;
    }
    *out = ref;
    return 0;
}

/* Takes ref out of the table and frees it (not its layer). */
static void untrack_layer(struct vm_registry *reg, struct layer_ref *ref)
{
    table_remove(&reg->layers, &ref->link);
    free(ref);
}

/* Returns the shared layer ID (opening it if needed) with one more ref. */
static int get_layer(struct vm_registry *reg, const char *id, uint64_t size, struct layer **out)
{
    struct layer_ref *ref = find_layer_ref(reg, id);
    if (!ref) {
        struct layer *layer;
        int err = layer_open(reg->layer_dir, id, size, &layer);
        if (err)
            return err;
        if ((err = track_layer(reg, layer, &ref)) != 0) {
            layer_close(layer);
            return err;
        }
    }
    if (layer_size(ref->layer) != size)
        return -EBADMSG;
    ref->refs++;
    *out = ref->layer;
    return 0;
}

/* Makes a layer for owner's live top (see layer_ref.owner). */
static int new_layer(struct vm_registry *reg, struct vm *owner, uint64_t size, struct layer **out)
{
    struct layer *layer;
    struct layer_ref *ref;
    int err = layer_create(reg->layer_dir, size, &layer);
    if (err)
        return err;
    if ((err = track_layer(reg, layer, &ref)) != 0) {
        layer_close(layer);
        layer_remove(reg->layer_dir, layer_id(layer));
        return err;
    }
    ref->refs = 1;
    ref->owner = owner;
    *out = layer;
    return 0;
}

/* Records vm as the owner of the tops of its chains (loaded from its file). */
static void own_tops(struct vm_registry *reg, struct vm *vm)
{
    find_layer_ref(reg, layer_id(vm->live.layers[vm->live.depth - 1]))->owner = vm;
    for (unsigned s = 0; s < vm->snapshot_count; s++) {
        const struct disk *d = &vm->snapshots[s]->disk;
        find_layer_ref(reg, layer_id(d->layers[d->depth - 1]))->owner = vm;
    }
}

static bool is_kept(const struct vm_registry *reg, const char *id)
{
    for (size_t i = 0; i < reg->kept_count; i++)
        if (strcmp(reg->kept[i], id) == 0)
            return true;
    return false;
}

/* Remembers every layer ID that a VM file names (it failed to load). */
static void keep_layers_of(struct vm_registry *reg, const char *text)
{
    for (const char *p = text; *p; p++) {
        if ((p != text && p[-1] != ' ') || strspn(p, "0123456789abcdef") != LAYER_ID_LEN ||
            (p[LAYER_ID_LEN] != ' ' && p[LAYER_ID_LEN] != '\n' && p[LAYER_ID_LEN] != '\0'))
            continue;
        char id[LAYER_ID_LEN + 1];
        snprintf(id, sizeof(id), "%.*s", LAYER_ID_LEN, p);
        if (is_kept(reg, id))
            continue;
        char(*grown)[LAYER_ID_LEN + 1] = realloc(reg->kept, (reg->kept_count + 1) * sizeof(*grown));
        if (!grown)
            return;
        reg->kept = grown;
        snprintf(reg->kept[reg->kept_count++], LAYER_ID_LEN + 1, "%s", id);
    }
}

/* Drops one ref; the files of a layer nothing references any more are
 * deleted, unless a VM that did not load names it. */
static void put_layer(struct vm_registry *reg, struct layer *layer)
{
    struct layer_ref *ref = find_layer_ref(reg, layer_id(layer));
    if (!ref || --ref->refs > 0)
        return;
    char id[LAYER_ID_LEN + 1];
    snprintf(id, sizeof(id), "%s", layer_id(layer));
    untrack_layer(reg, ref);
    layer_close(layer);
    if (!is_kept(reg, id) && layer_remove(reg->layer_dir, id) == 0)
        fsync_dir(reg->layer_dir);
}

static void put_disk(struct vm_registry *reg, struct disk *disk)
{
    for (unsigned i = 0; i < disk->depth; i++)
        put_layer(reg, disk->layers[i]);
    disk->depth = 0;
}

/* ---- VM configuration files ------------------------------------------------ */

static int conf_path(const struct vm_registry *reg, const char *name, char *out, size_t len)
{
    return path_join(out, len, "%s/vms/%s.vm", reg->state_dir, name);
}

static size_t append(char *buf, size_t cap, size_t pos, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static size_t append(char *buf, size_t cap, size_t pos, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = pos < cap ? vsnprintf(buf + pos, cap - pos, fmt, ap) : 0;
    va_end(ap);
    return pos + (n > 0 ? (size_t)n : 0);
}

static size_t append_chain(char *buf, size_t cap, size_t pos, const struct disk *disk)
{
    for (unsigned i = 0; i < disk->depth; i++)
        pos = append(buf, cap, pos, " %s", layer_id(disk->layers[i]));
    return append(buf, cap, pos, "\n");
}

/* Writes vm's configuration atomically. Caller holds registry->lock. */
static int save_vm(struct vm_registry *reg, const struct vm *vm)
{
    size_t cap = 4096 + (size_t)(vm->snapshot_count + 1) * (VM_MAX_DEPTH * (LAYER_ID_LEN + 1) + 96);
    char *buf = malloc(cap);
    if (!buf)
        return -ENOMEM;
    size_t pos = append(buf, cap, 0, "imgfs-vm 1\nname %s\nsize %" PRIu64 "\n", vm->name, vm->live.size);
    if (vm->has_base) {
        char hex[CHUNK_HASH_HEX + 1];
        chunk_hash_to_hex(&vm->base_id, hex);
        pos = append(buf, cap, pos, "base %s %" PRIu64 " %s\n", vm->base_name, vm->base_version, hex);
    } else {
        pos = append(buf, cap, pos, "base none\n");
    }
    pos = append(buf, cap, pos, "owner %u %u %o\nlive", (unsigned)vm->uid, (unsigned)vm->gid,
                 (unsigned)(vm->mode & 07777));
    pos = append_chain(buf, cap, pos, &vm->live);
    for (unsigned s = 0; s < vm->snapshot_count; s++) {
        pos = append(buf, cap, pos, "snapshot %s", vm->snapshots[s]->name);
        pos = append_chain(buf, cap, pos, &vm->snapshots[s]->disk);
        if (vm->snapshots[s]->implicit)
            pos = append(buf, cap, pos, "implicit %s\n", vm->snapshots[s]->name);
    }
    struct chunk_hash sum;
    char hex[CHUNK_HASH_HEX + 1];
    chunk_hash_compute(buf, pos, &sum);
    chunk_hash_to_hex(&sum, hex);
    pos = append(buf, cap, pos, "end %s\n", hex);
    int err = pos >= cap ? -ENOMEM : 0;
    char path[PATH_MAX];
    if (!err)
        err = conf_path(reg, vm->name, path, sizeof(path));
    if (!err)
        err = write_file_atomic_mode(path, buf, pos, 0600);
    free(buf);
    return err;
}

/* Sets the live disk's size and its lock-free copy (vm.h); write_lock and
 * chain_lock held, or vm not yet shared. */
static void set_live_size(struct vm *vm, uint64_t size)
{
    vm->live.size = size;
    atomic_store(&vm->size, size);
}

static struct vm *vm_alloc(const char *name, uint64_t size)
{
    struct vm *vm = calloc(1, sizeof(*vm));
    if (!vm)
        return NULL;
    snprintf(vm->name, sizeof(vm->name), "%.64s", name);
    set_live_size(vm, size);
    vm->mode = VM_DEFAULT_MODE;
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&vm->write_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    range_lock_init(&vm->write_ranges);
    pthread_rwlock_init(&vm->chain_lock, NULL);
    pthread_mutex_init(&vm->attr_lock, NULL);
    return vm;
}

/* The snapshot table, made with the first snapshot (most VMs have none):
 * VM_MAX_SNAPSHOTS entries, never moved, so that readers need no more than
 * they did. Set before snapshot_count grows past 0. */
static int snapshot_room(struct vm *vm)
{
    if (!vm->snapshots && !(vm->snapshots = calloc(VM_MAX_SNAPSHOTS, sizeof(*vm->snapshots))))
        return -ENOMEM;
    return 0;
}

static void vm_free(struct vm *vm)
{
    for (unsigned s = 0; s < vm->snapshot_count; s++)
        free(vm->snapshots[s]);
    free(vm->snapshots);
    while (vm->removed_snapshots) {
        struct vm_snapshot *next = vm->removed_snapshots->next_removed;
        free(vm->removed_snapshots);
        vm->removed_snapshots = next;
    }
    pthread_rwlock_destroy(&vm->write_lock);
    range_lock_destroy(&vm->write_ranges);
    pthread_rwlock_destroy(&vm->chain_lock);
    pthread_mutex_destroy(&vm->attr_lock);
    free(vm);
}

static struct vm_snapshot *find_snapshot(struct vm *vm, const char *snap)
{
    for (unsigned s = 0; s < vm->snapshot_count; s++)
        if (strcmp(vm->snapshots[s]->name, snap) == 0)
            return vm->snapshots[s];
    return NULL;
}

/* Reads the layer IDs after a keyword into disk (registry->lock held). */
static int load_chain(struct vm_registry *reg, char *ids, struct disk *disk)
{
    char *save = NULL;
    for (char *id = strtok_r(ids, " ", &save); id; id = strtok_r(NULL, " ", &save)) {
        if (strlen(id) != LAYER_ID_LEN || strspn(id, "0123456789abcdef") != LAYER_ID_LEN ||
            disk->depth >= VM_MAX_DEPTH)
            return -EBADMSG;
        int err = get_layer(reg, id, disk->size, &disk->layers[disk->depth]);
        if (err)
            return err;
        disk->depth++;
    }
    return disk->depth ? 0 : -EBADMSG;
}

#define LOAD_FAIL(...)                                                                          \
    do {                                                                                        \
        snprintf(err, errlen, __VA_ARGS__);                                                     \
        goto fail;                                                                              \
    } while (0)

/* Parses and opens one VM (registry->lock held). */
static int load_vm(struct vm_registry *reg, const char *name, struct vm **out, char *err, size_t errlen)
{
    char path[PATH_MAX];
    char *text = NULL;
    size_t len;
    struct vm *vm = NULL;
    int rc = conf_path(reg, name, path, sizeof(path));
    if (!rc)
        rc = read_file(path, VM_CONF_MAX, &text, &len);
    if (rc) {
        snprintf(err, errlen, "VM %s: cannot read its VM file: %s", name, strerror(-rc));
        return rc;
    }
    rc = -EBADMSG;
    char *original = strdup(text); /* the parse below cuts text up */
    if (!original) {
        free(text);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    /* Checksum first: everything before the "end" line. */
    char *end_line = len > 0 ? memmem(text, len, "end ", 4) : NULL;
    while (end_line && end_line != text && end_line[-1] != '\n')
        end_line = memmem(end_line + 1, len - (size_t)(end_line + 1 - text), "end ", 4);
    struct chunk_hash want, got;
    if (!end_line || strlen(end_line) != 4 + CHUNK_HASH_HEX + 1 || chunk_hash_from_hex(end_line + 4, &want) < 0)
        LOAD_FAIL("VM %s: its VM file is truncated (no end line)", name);
    chunk_hash_compute(text, (size_t)(end_line - text), &got);
    if (!chunk_hash_equal(&got, &want))
        LOAD_FAIL("VM %s: its VM file is damaged (checksum mismatch)", name);
    *end_line = '\0';

    char *save = NULL;
    char *line = strtok_r(text, "\n", &save);
    if (!line || strcmp(line, "imgfs-vm 1") != 0)
        LOAD_FAIL("VM %s: its VM file is not a VM file", name);
    uint64_t size = 0;
    char base_name[65] = "", base_hex[CHUNK_HASH_HEX + 1] = "";
    uint64_t base_version = 0;
    bool has_base = false;
    unsigned uid = 0, gid = 0, mode = VM_DEFAULT_MODE;
    while ((line = strtok_r(NULL, "\n", &save))) {
        char value[80];
        if (sscanf(line, "name %64s", value) == 1) {
            if (strcmp(value, name) != 0)
                LOAD_FAIL("VM %s: its VM file names another VM", name);
        } else if (sscanf(line, "size %63s", value) == 1) {
            /* 0: a disk created as a file whose size was never set */
            if (parse_u64(value, &size) < 0 || size > VM_MAX_SIZE)
                LOAD_FAIL("VM %s: bad size in its VM file", name);
            vm = vm_alloc(name, size);
            if (!vm)
                LOAD_FAIL("out of memory");
        } else if (strcmp(line, "base none") == 0) {
            has_base = false;
        } else if (sscanf(line, "base %64s %" SCNu64 " %32s", base_name, &base_version, base_hex) == 3) {
            has_base = true;
        } else if (sscanf(line, "owner %u %u %o", &uid, &gid, &mode) == 3) {
        } else if (vm && strncmp(line, "live ", 5) == 0) {
            if (vm->live.depth || (rc = load_chain(reg, line + 5, &vm->live)) != 0)
                LOAD_FAIL("VM %s: its live layers are missing or damaged (%s)", name,
                          rc == -ENOENT ? "layer file missing" : "bad layer");
        } else if (vm && strncmp(line, "snapshot ", 9) == 0 && vm->snapshot_count < VM_MAX_SNAPSHOTS) {
            struct vm_snapshot *snap = snapshot_room(vm) == 0 ? calloc(1, sizeof(*snap)) : NULL;
            char *ids = strchr(line + 9, ' ');
            if (!snap || !ids) {
                free(snap);
                LOAD_FAIL("VM %s: bad snapshot line in its VM file", name);
            }
            *ids++ = '\0';
            snprintf(snap->name, sizeof(snap->name), "%s", line + 9);
            snap->disk.size = size;
            vm->snapshots[vm->snapshot_count++] = snap;
            if (!name_is_valid(snap->name) || load_chain(reg, ids, &snap->disk) != 0)
                LOAD_FAIL("VM %s: snapshot %s has missing or damaged layers", name, snap->name);
        } else if (vm && sscanf(line, "implicit %64s", value) == 1 && find_snapshot(vm, value)) {
            find_snapshot(vm, value)->implicit = true;
        } else {
            LOAD_FAIL("VM %s: unexpected line in its VM file", name);
        }
    }
    if (!vm || !vm->live.depth)
        LOAD_FAIL("VM %s: its VM file lacks its size or layers", name);
    vm->uid = uid;
    vm->gid = gid;
    vm->mode = mode & 07777;
    if (has_base) {
        vm->has_base = true;
        snprintf(vm->base_name, sizeof(vm->base_name), "%s", base_name);
        vm->base_version = base_version;
        if (chunk_hash_from_hex(base_hex, &vm->base_id) < 0)
            LOAD_FAIL("VM %s: bad base identity in its VM file", name);
        const struct vm_base *base = reg->lookup(reg->lookup_ctx, base_name, base_version);
        if (!base)
            LOAD_FAIL("VM %s: its base %s@%" PRIu64 " is not in the repository", name, base_name, base_version);
        if (!chunk_hash_equal(&base->manifest->id, &vm->base_id))
            LOAD_FAIL("VM %s: base %s@%" PRIu64 " in the repository is not the one the VM was created on "
                      "(manifest differs)", name, base_name, base_version);
        if (base->manifest->size != size)
            LOAD_FAIL("VM %s: size differs from its base", name);
        vm->live.base = base;
        for (unsigned s = 0; s < vm->snapshot_count; s++)
            vm->snapshots[s]->disk.base = base;
    }
    free(text);
    free(original);
    *out = vm;
    return 0;
fail:
    /* Its layers stay on disk: the VM loads again once its base is back. */
    keep_layers_of(reg, original);
    free(original);
    if (vm) {
        put_disk(reg, &vm->live);
        for (unsigned s = 0; s < vm->snapshot_count; s++)
            put_disk(reg, &vm->snapshots[s]->disk);
        vm_free(vm);
    }
    free(text);
    return rc ? rc : -EBADMSG;
}

/* ---- the VMs by name (registry->lock held) ---------------------------------------- */

/* Adds vm to the registry and its name index; nothing changes on -ENOMEM. */
static int add_vm(struct vm_registry *reg, struct vm *vm)
{
    struct vm **grown = realloc(reg->vms, (reg->vm_count + 1) * sizeof(*grown));
    if (!grown)
        return -ENOMEM;
    reg->vms = grown;
    vm->by_name.name = vm->name;
    if (table_add(&reg->by_name, &vm->by_name) != 0)
        return -ENOMEM;
    reg->vms[reg->vm_count++] = vm;
    return 0;
}

/* Takes a removed VM out of the name index (it stays in vms until the
 * registry closes: tree nodes may still point at it). */
static void unindex_vm(struct vm_registry *reg, struct vm *vm) { table_remove(&reg->by_name, &vm->by_name); }

static struct vm *find_locked(struct vm_registry *reg, const char *name)
{
    struct name_link *l = table_find(&reg->by_name, name);
    return l ? LINK_OWNER(l, struct vm, by_name) : NULL;
}

int vm_registry_open(const char *state_dir, vm_base_lookup_fn lookup, void *lookup_ctx,
                     struct vm_registry **out, char *err, size_t errlen)
{
    struct vm_registry *reg = calloc(1, sizeof(*reg));
    if (!reg || strlen(state_dir) >= sizeof(reg->state_dir)) {
        free(reg);
        snprintf(err, errlen, "state directory path is too long");
        return -ENAMETOOLONG;
    }
    snprintf(reg->state_dir, sizeof(reg->state_dir), "%s", state_dir);
    snprintf(reg->layer_dir, sizeof(reg->layer_dir), "%s/layers", state_dir);
    reg->lookup = lookup;
    reg->lookup_ctx = lookup_ctx;
    pthread_mutex_init(&reg->lock, NULL);

    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/imgfs-state", state_dir);
    int rc = check_marker_file(path, STATE_MARKER);
    if (rc == -EBADMSG) {
        snprintf(err, errlen, "state directory %s has an unsupported imgfs-state marker", state_dir);
        vm_registry_close(reg);
        return rc;
    } else if (rc) {
        char vms[PATH_MAX];
        snprintf(vms, sizeof(vms), "%s/vms", state_dir);
        rc = mkdir_p(vms);
        if (!rc)
            rc = mkdir_p(reg->layer_dir);
        if (!rc)
            rc = write_file_atomic(path, STATE_MARKER, strlen(STATE_MARKER));
        if (rc) {
            snprintf(err, errlen, "cannot set up state directory %s: %s", state_dir, strerror(-rc));
            vm_registry_close(reg);
            return rc;
        }
    }
    snprintf(path, sizeof(path), "%s/vms", state_dir);
    DIR *d = opendir(path);
    if (!d) {
        rc = -errno;
        snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
        vm_registry_close(reg);
        return rc;
    }
    struct dirent *de;
    pthread_mutex_lock(&reg->lock);
    while ((de = readdir(d))) {
        size_t n = strlen(de->d_name);
        if (n < 4 || strcmp(de->d_name + n - 3, ".vm") != 0)
            continue;
        char name[80];
        snprintf(name, sizeof(name), "%.*s", (int)(n - 3), de->d_name);
        if (!name_is_valid(name))
            continue;
        struct vm *vm;
        char why[512];
        if (load_vm(reg, name, &vm, why, sizeof(why)) != 0 || add_vm(reg, vm) != 0) {
            log_error("%s", why);
            size_t used = strlen(reg->errors);
            snprintf(reg->errors + used, sizeof(reg->errors) - used, "%s%s", used ? "; " : "", why);
        } else {
            own_tops(reg, vm);
        }
    }
    reg->implicit_sweep = true;
    pthread_mutex_unlock(&reg->lock);
    closedir(d);
    *out = reg;
    return 0;
}

void vm_registry_close(struct vm_registry *reg)
{
    if (!reg)
        return;
    for (size_t i = 0; i < reg->vm_count; i++)
        vm_free(reg->vms[i]);
    for (size_t i = 0; i < reg->layers.nslots; i++)
        for (struct name_link *l = reg->layers.slots[i], *next; l; l = next) {
            next = l->next;
            struct layer_ref *r = LINK_OWNER(l, struct layer_ref, link);
            layer_flush(r->layer);
            layer_close(r->layer);
            free(r);
        }
    free(reg->vms);
    free(reg->by_name.slots);
    free(reg->layers.slots);
    free(reg->kept);
    pthread_mutex_destroy(&reg->lock);
    free(reg);
}

void vm_registry_errors(struct vm_registry *reg, char *out, size_t len)
{
    pthread_mutex_lock(&reg->lock);
    snprintf(out, len, "%s", reg->errors);
    pthread_mutex_unlock(&reg->lock);
}

void vm_registry_each(struct vm_registry *reg, void (*fn)(void *ctx, struct vm *vm), void *ctx)
{
    pthread_mutex_lock(&reg->lock);
    for (size_t i = 0; i < reg->vm_count; i++)
        if (!reg->vms[i]->deleted)
            fn(ctx, reg->vms[i]);
    pthread_mutex_unlock(&reg->lock);
}

/* A VM file that did not load still owns its name. */
static bool name_taken(struct vm_registry *reg, const char *name)
{
    char path[PATH_MAX];
    return conf_path(reg, name, path, sizeof(path)) != 0 || access(path, F_OK) == 0;
}

struct vm *vm_find(struct vm_registry *reg, const char *name)
{
    pthread_mutex_lock(&reg->lock);
    struct vm *vm = find_locked(reg, name);
    pthread_mutex_unlock(&reg->lock);
    return vm;
}

/* ---- commands ------------------------------------------------------------------- */

static int create_disk(struct vm_registry *reg, const char *name, const struct vm_base *base, const char *base_name,
                       uint64_t base_version, uint64_t size, struct vm **out, char *err, size_t errlen);

int vm_create(struct vm_registry *reg, const char *name, const char *base_name, uint64_t base_version,
              uint64_t size, struct vm **out, char *err, size_t errlen)
{
    if (!name_is_valid(name)) {
        snprintf(err, errlen, "invalid VM name '%s': use 1-64 letters, digits, '.', '_' or '-'", name);
        return -EINVAL;
    }
    const struct vm_base *base = NULL;
    if (base_name) {
        base = reg->lookup(reg->lookup_ctx, base_name, base_version);
        if (!base) {
            snprintf(err, errlen, "base %s@%" PRIu64 " does not exist", base_name, base_version);
            return -ENOENT;
        }
        size = base->manifest->size;
        if (size > VM_MAX_SIZE) {
            snprintf(err, errlen, "base %s@%" PRIu64 " is larger than the 16T a VM disk may have", base_name,
                     base_version);
            return -EFBIG;
        }
    } else if (size == 0 || size > VM_MAX_SIZE || size % 512) {
        snprintf(err, errlen, "disk size must be a multiple of 512 bytes between 512 and 16T");
        return -EINVAL;
    }
    return create_disk(reg, name, base, base_name, base_version, size, out, err, errlen);
}

/* vm_create after its checks: base (NULL for a blank disk) is found. */
static int create_disk(struct vm_registry *reg, const char *name, const struct vm_base *base, const char *base_name,
                       uint64_t base_version, uint64_t size, struct vm **out, char *err, size_t errlen)
{
    pthread_mutex_lock(&reg->lock);
    int rc = 0;
    struct vm *vm = NULL;
    if (find_locked(reg, name) || name_taken(reg, name)) {
        snprintf(err, errlen, "VM %s already exists", name);
        rc = -EEXIST;
        goto out;
    }
    vm = vm_alloc(name, size);
    if (!vm) {
        rc = -ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    if (base) {
        vm->has_base = true;
        snprintf(vm->base_name, sizeof(vm->base_name), "%s", base_name);
        vm->base_version = base_version;
        vm->base_id = base->manifest->id;
        vm->live.base = base;
    }
    rc = new_layer(reg, vm, size, &vm->live.layers[0]);
    if (rc) {
        snprintf(err, errlen, "cannot create a layer for VM %s: %s", name, strerror(-rc));
        goto out;
    }
    vm->live.depth = 1;
    rc = save_vm(reg, vm);
    if (!rc)
        rc = add_vm(reg, vm);
    if (rc)
        snprintf(err, errlen, "cannot save VM %s: %s", name, strerror(-rc));
out:
    if (rc && vm) {
        put_disk(reg, &vm->live);
        char path[PATH_MAX];
        if (rc != -EEXIST && conf_path(reg, name, path, sizeof(path)) == 0)
            unlink(path);
        vm_free(vm);
        vm = NULL;
    }
    pthread_mutex_unlock(&reg->lock);
    if (!rc)
        *out = vm;
    return rc;
}

/* Freezes vm's top layer as snapshot snap and continues in a new layer.
 * Caller holds registry->lock. */
static int snapshot_locked(struct vm_registry *reg, struct vm *vm, const char *snap, bool implicit, char *err,
                           size_t errlen)
{
    if (!name_is_valid(snap)) {
        snprintf(err, errlen, "invalid snapshot name '%s'", snap);
        return -EINVAL;
    }
    if (find_snapshot(vm, snap)) {
        snprintf(err, errlen, "VM %s already has a snapshot %s", vm->name, snap);
        return -EEXIST;
    }
    if (vm->live.depth >= VM_MAX_DEPTH || vm->snapshot_count >= VM_MAX_SNAPSHOTS) {
        snprintf(err, errlen, "VM %s has reached %d layers or %d snapshots", vm->name, VM_MAX_DEPTH,
                 VM_MAX_SNAPSHOTS);
        return -EMLINK;
    }
    struct vm_snapshot *s = calloc(1, sizeof(*s));
    if (!s || snapshot_room(vm) != 0) {
        free(s);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    snprintf(s->name, sizeof(s->name), "%s", snap);
    s->implicit = implicit;
    /* No write may land in the top layer once it is frozen. */
    pthread_rwlock_wrlock(&vm->write_lock);
    struct layer *top = vm->live.layers[vm->live.depth - 1];
    struct layer *fresh = NULL;
    int rc = layer_flush(top);
    if (!rc)
        rc = new_layer(reg, vm, vm->live.size, &fresh);
    struct timespec times[2];
    /* A snapshot changes no byte of the disk: its time carries over. */
    if (!rc && layer_get_times(top, &times[0], &times[1]) == 0)
        layer_set_times(fresh, times);
    if (rc) {
        pthread_rwlock_unlock(&vm->write_lock);
        free(s);
        snprintf(err, errlen, "cannot snapshot VM %s: %s", vm->name, strerror(-rc));
        return rc;
    }
    s->disk = vm->live;
    for (unsigned i = 0; i < s->disk.depth; i++)
        find_layer_ref(reg, layer_id(s->disk.layers[i]))->refs++;
    pthread_rwlock_wrlock(&vm->chain_lock);
    vm->live.layers[vm->live.depth++] = fresh;
    vm->snapshots[vm->snapshot_count++] = s;
    pthread_rwlock_unlock(&vm->chain_lock);
    rc = save_vm(reg, vm);
    if (rc) {
        /* Roll back: the VM file still describes the old chain. */
        pthread_rwlock_wrlock(&vm->chain_lock);
        vm->live.depth--;
        vm->snapshot_count--;
        pthread_rwlock_unlock(&vm->chain_lock);
        put_layer(reg, fresh);
        put_disk(reg, &s->disk);
        free(s);
        snprintf(err, errlen, "cannot save VM %s: %s", vm->name, strerror(-rc));
    }
    pthread_rwlock_unlock(&vm->write_lock);
    return rc;
}

int vm_snapshot(struct vm_registry *reg, struct vm *vm, const char *snap, char *err, size_t errlen)
{
    pthread_mutex_lock(&reg->lock);
    int rc = snapshot_locked(reg, vm, snap, false, err, errlen);
    pthread_mutex_unlock(&reg->lock);
    return rc;
}

int vm_clone(struct vm_registry *reg, struct vm *src, const char *snap, const char *dst, struct vm **out,
             char *err, size_t errlen)
{
    if (!name_is_valid(dst)) {
        snprintf(err, errlen, "invalid VM name '%s'", dst);
        return -EINVAL;
    }
    pthread_mutex_lock(&reg->lock);
    int rc = 0;
    struct vm *vm = NULL;
    char implicit[65];
    if (find_locked(reg, dst) || name_taken(reg, dst)) {
        snprintf(err, errlen, "VM %s already exists", dst);
        rc = -EEXIST;
        goto out;
    }
    if (!snap) {
        /* Cloning a live VM freezes its current state first. */
        snprintf(implicit, sizeof(implicit), "clone-%.50s", dst);
        for (unsigned k = 2; find_snapshot(src, implicit); k++)
            snprintf(implicit, sizeof(implicit), "clone-%.50s-%u", dst, k);
        if ((rc = snapshot_locked(reg, src, implicit, true, err, errlen)) != 0)
            goto out;
        snap = implicit;
    }
    struct vm_snapshot *s = find_snapshot(src, snap);
    if (!s) {
        snprintf(err, errlen, "VM %s has no snapshot %s", src->name, snap);
        rc = -ENOENT;
        goto out;
    }
    if (s->disk.depth >= VM_MAX_DEPTH) {
        snprintf(err, errlen, "snapshot %s@%s is too deep to clone", src->name, snap);
        rc = -EMLINK;
        goto out;
    }
    vm = vm_alloc(dst, s->disk.size);
    if (!vm) {
        rc = -ENOMEM;
        goto out;
    }
    snprintf(vm->base_name, sizeof(vm->base_name), "%s", src->base_name);
    vm->base_version = src->base_version;
    vm->base_id = src->base_id;
    vm->has_base = src->has_base;
    vm->uid = src->uid;
    vm->gid = src->gid;
    vm->mode = src->mode;
    vm->live = s->disk;
    for (unsigned i = 0; i < vm->live.depth; i++)
        find_layer_ref(reg, layer_id(vm->live.layers[i]))->refs++;
    rc = new_layer(reg, vm, vm->live.size, &vm->live.layers[vm->live.depth]);
    if (!rc) {
        vm->live.depth++;
        rc = save_vm(reg, vm);
    }
    if (!rc)
        rc = add_vm(reg, vm);
    if (rc) {
        snprintf(err, errlen, "cannot create VM %s: %s", dst, strerror(-rc));
        put_disk(reg, &vm->live);
        char path[PATH_MAX];
        if (conf_path(reg, dst, path, sizeof(path)) == 0)
            unlink(path);
        vm_free(vm);
        vm = NULL;
    }
out:
    /* A clone that failed after freezing the live VM leaves that implicit
     * snapshot without a clone: the next removal looks at every VM. */
    if (rc && snap == implicit)
        reg->implicit_sweep = true;
    pthread_mutex_unlock(&reg->lock);
    if (!rc)
        *out = vm;
    return rc;
}

static void drop_unused_implicit(struct vm_registry *reg, struct vm *const *vms, size_t count);

/* The owners of the layers of vm's chains other than vm itself, each once:
 * the VMs whose implicit snapshots vm's removal may leave without a clone.
 * Their order does not matter: dropping one VM's implicit snapshot leaves
 * every layer below it in that VM's live chain, so it frees no other
 * VM's snapshot. NULL with *count 0 when none; -ENOMEM. Caller holds
 * registry->lock. */
static int sharing_vms(struct vm_registry *reg, struct vm *vm, struct vm ***out, size_t *count)
{
    struct vm **found = NULL;
    size_t n = 0, cap = 0;
    for (unsigned s = 0; s <= vm->snapshot_count; s++) {
        const struct disk *d = s < vm->snapshot_count ? &vm->snapshots[s]->disk : &vm->live;
        for (unsigned i = 0; i < d->depth; i++) {
            struct vm *owner = find_layer_ref(reg, layer_id(d->layers[i]))->owner;
            size_t k = 0;
            while (k < n && found[k] != owner)
                k++;
            if (!owner || owner == vm || k < n)
                continue;
            if (n == cap) {
                cap = cap ? cap * 2 : 8;
                struct vm **grown = realloc(found, cap * sizeof(*grown));
                if (!grown) {
                    free(found);
                    return -ENOMEM;
                }
                found = grown;
            }
            found[n++] = owner;
        }
    }
    *out = found;
    *count = n;
    return 0;
}

int vm_remove(struct vm_registry *reg, struct vm *vm, char *err, size_t errlen)
{
    pthread_mutex_lock(&reg->lock);
    pthread_mutex_lock(&vm->attr_lock);
    int rc = 0;
    if (vm->deleted) {
        snprintf(err, errlen, "VM %s does not exist", vm->name);
        rc = -ENOENT;
    } else if (vm->open_count > 0) {
        snprintf(err, errlen, "VM %s is open (%u times); close it first", vm->name, vm->open_count);
        rc = -EBUSY;
    } else {
        char path[PATH_MAX];
        rc = conf_path(reg, vm->name, path, sizeof(path));
        if (!rc && unlink(path) < 0)
            rc = -errno;
        if (!rc)
            fsync_dir_of(path);
        if (rc)
            snprintf(err, errlen, "cannot remove VM %s: %s", vm->name, strerror(-rc));
        else
            vm->deleted = true; /* no open can succeed from here on */
    }
    pthread_mutex_unlock(&vm->attr_lock);
    if (!rc) {
        /* Found before the refs go (a layer nothing else holds leaves the
         * table); with no memory for them, every VM is looked at. */
        struct vm **sharing = NULL;
        size_t count = 0;
        if (!reg->implicit_sweep && sharing_vms(reg, vm, &sharing, &count) != 0)
            reg->implicit_sweep = true;
        unindex_vm(reg, vm);
        pthread_rwlock_wrlock(&vm->chain_lock);
        put_disk(reg, &vm->live);
        for (unsigned s = 0; s < vm->snapshot_count; s++)
            put_disk(reg, &vm->snapshots[s]->disk);
        pthread_rwlock_unlock(&vm->chain_lock);
        if (reg->implicit_sweep) {
            reg->implicit_sweep = false;
            drop_unused_implicit(reg, reg->vms, reg->vm_count);
        } else {
            drop_unused_implicit(reg, sharing, count);
        }
        free(sharing);
    }
    pthread_mutex_unlock(&reg->lock);
    return rc;
}

/* Drops the "VM NAME: ..." entries from the load errors (lock held). */
static void forget_load_errors(struct vm_registry *reg, const char *name)
{
    char prefix[96], kept_text[sizeof(reg->errors)] = "";
    snprintf(prefix, sizeof(prefix), "VM %s: ", name);
    size_t used = 0;
    char *save = NULL;
    for (char *e = strtok_r(reg->errors, ";", &save); e; e = strtok_r(NULL, ";", &save)) {
        e += strspn(e, " ");
        if (strncmp(e, prefix, strlen(prefix)) == 0)
            continue;
        int n = snprintf(kept_text + used, sizeof(kept_text) - used, "%s%s", used ? "; " : "", e);
        if (n < 0 || (size_t)n >= sizeof(kept_text) - used)
            break; /* cannot happen: what is kept is shorter than what was there */
        used += (size_t)n;
    }
    snprintf(reg->errors, sizeof(reg->errors), "%s", kept_text);
}

int vm_remove_unloaded(struct vm_registry *reg, const char *name, char *err, size_t errlen)
{
    char path[PATH_MAX], *text = NULL;
    size_t len;
    if (!name_is_valid(name)) {
        snprintf(err, errlen, "VM %s does not exist", name);
        return -ENOENT;
    }
    pthread_mutex_lock(&reg->lock);
    int rc = find_locked(reg, name) ? -EBUSY : conf_path(reg, name, path, sizeof(path));
    if (!rc)
        rc = read_file(path, VM_CONF_MAX, &text, &len);
    if (!rc && unlink(path) < 0)
        rc = -errno;
    if (rc) {
        snprintf(err, errlen, rc == -ENOENT ? "VM %s does not exist" : "cannot remove VM %s: %s", name,
                 strerror(-rc));
        pthread_mutex_unlock(&reg->lock);
        free(text);
        return rc;
    }
    fsync_dir_of(path);
    forget_load_errors(reg, name);
    /* The kept set is what the remaining unloaded VM files name. */
    reg->kept_count = 0;
    char dir[PATH_MAX];
    snprintf(dir, sizeof(dir), "%s/vms", reg->state_dir);
    DIR *d = opendir(dir);
    struct dirent *de;
    while (d && (de = readdir(d))) {
        size_t n = strlen(de->d_name);
        char other[80], *other_text;
        size_t other_len;
        if (n < 4 || n - 3 >= sizeof(other) || strcmp(de->d_name + n - 3, ".vm") != 0)
            continue;
        snprintf(other, sizeof(other), "%.*s", (int)(n - 3), de->d_name);
        if (find_locked(reg, other) || conf_path(reg, other, path, sizeof(path)) != 0 ||
            read_file(path, VM_CONF_MAX, &other_text, &other_len) != 0)
            continue;
        keep_layers_of(reg, other_text);
        free(other_text);
    }
    if (d)
        closedir(d);
    /* Its layers go unless a loaded VM or another unloaded one uses them. */
    size_t before = reg->kept_count;
    keep_layers_of(reg, text);
    for (size_t i = before; i < reg->kept_count; i++)
        if (!find_layer_ref(reg, reg->kept[i]))
            layer_remove(reg->layer_dir, reg->kept[i]);
    reg->kept_count = before;
    fsync_dir(reg->layer_dir);
    pthread_mutex_unlock(&reg->lock);
    free(text);
    return 0;
}

int vm_set_attr(struct vm_registry *reg, struct vm *vm, const mode_t *mode, const uid_t *uid, const gid_t *gid)
{
    pthread_mutex_lock(&reg->lock);
    pthread_mutex_lock(&vm->attr_lock);
    mode_t old_mode = vm->mode;
    uid_t old_uid = vm->uid;
    gid_t old_gid = vm->gid;
    if (mode)
        vm->mode = *mode & 07777;
    if (uid)
        vm->uid = *uid;
    if (gid)
        vm->gid = *gid;
    int rc = save_vm(reg, vm);
    if (rc) {
        vm->mode = old_mode;
        vm->uid = old_uid;
        vm->gid = old_gid;
    }
    pthread_mutex_unlock(&vm->attr_lock);
    pthread_mutex_unlock(&reg->lock);
    return rc;
}

/* ---- disks made as files, snapshot removal, times ------------------------------------ */

int vm_create_empty(struct vm_registry *reg, const char *name, mode_t mode, uid_t uid, gid_t gid, struct vm **out,
                    char *err, size_t errlen)
{
    if (!name_is_valid(name)) {
        snprintf(err, errlen, "invalid VM name '%s': use 1-64 letters, digits, '.', '_' or '-'", name);
        return -EINVAL;
    }
    struct vm *vm;
    int rc = create_disk(reg, name, NULL, NULL, 0, 0, &vm, err, errlen);
    if (rc)
        return rc;
    rc = vm_set_attr(reg, vm, &mode, &uid, &gid);
    if (rc) {
        char ignored[64];
        vm_remove(reg, vm, ignored, sizeof(ignored));
        snprintf(err, errlen, "cannot save VM %s: %s", name, strerror(-rc));
        return rc;
    }
    *out = vm;
    return 0;
}

int vm_resize_blank(struct vm_registry *reg, struct vm *vm, uint64_t size, char *err, size_t errlen)
{
    if (size > VM_MAX_SIZE || size % 512) {
        snprintf(err, errlen, "disk size must be a multiple of 512 bytes up to 16T");
        return -EINVAL;
    }
    pthread_mutex_lock(&reg->lock);
    pthread_rwlock_wrlock(&vm->write_lock);
    struct layer *old = vm->live.layers[0], *fresh = NULL;
    int rc = 0;
    if (size == vm->live.size)
        goto out;
    if (vm->has_base || vm->snapshot_count || vm->live.depth != 1 || layer_owned_blocks(old) != 0) {
        snprintf(err, errlen, "the size of VM %s is fixed: it has a base, snapshots or data", vm->name);
        rc = -EPERM;
        goto out;
    }
    /* A layer has the size of its disk: an empty one is simply replaced. */
    rc = new_layer(reg, vm, size, &fresh);
    if (rc) {
        snprintf(err, errlen, "cannot create a layer for VM %s: %s", vm->name, strerror(-rc));
        goto out;
    }
    uint64_t old_size = vm->live.size;
    pthread_rwlock_wrlock(&vm->chain_lock);
    vm->live.layers[0] = fresh;
    set_live_size(vm, size);
    pthread_rwlock_unlock(&vm->chain_lock);
    rc = save_vm(reg, vm);
    pthread_rwlock_wrlock(&vm->chain_lock);
    if (rc) {
        vm->live.layers[0] = old;
        set_live_size(vm, old_size);
        snprintf(err, errlen, "cannot save VM %s: %s", vm->name, strerror(-rc));
    }
    pthread_rwlock_unlock(&vm->chain_lock);
    put_layer(reg, rc ? fresh : old);
out:
    pthread_rwlock_unlock(&vm->write_lock);
    pthread_mutex_unlock(&reg->lock);
    return rc;
}

static bool chain_has(const struct disk *disk, const struct layer *layer)
{
    for (unsigned i = 0; i < disk->depth; i++)
        if (disk->layers[i] == layer)
            return true;
    return false;
}

/* True when a VM other than owner (live or in a snapshot) reads through
 * layer: a clone made from the snapshot whose top it is. The layer table
 * counts every chain of every VM that holds a layer (refs; removed VMs and
 * snapshots hold none), so that is more chains than owner's own: no pass
 * over every VM. Caller holds registry->lock. */
static bool used_by_others(struct vm_registry *reg, const struct vm *owner, const struct layer *layer)
{
    const struct layer_ref *ref = find_layer_ref(reg, layer_id(layer));
    unsigned own = chain_has(&owner->live, layer);
    for (unsigned s = 0; s < owner->snapshot_count; s++)
        own += chain_has(&owner->snapshots[s]->disk, layer);
    return ref && ref->refs > own;
}

/* Caller holds registry->lock. */
static int remove_snapshot_locked(struct vm_registry *reg, struct vm *vm, struct vm_snapshot *s, char *err,
                                  size_t errlen)
{
    pthread_mutex_lock(&vm->attr_lock);
    unsigned open_count = s->open_count;
    pthread_mutex_unlock(&vm->attr_lock);
    if (open_count) {
        snprintf(err, errlen, "snapshot %s@%s is open (%u times); close it first", vm->name, s->name, open_count);
        return -EBUSY;
    }
    if (s->disk.depth == 0 || used_by_others(reg, vm, s->disk.layers[s->disk.depth - 1])) {
        snprintf(err, errlen, "snapshot %s@%s is the origin of a clone; remove the clone first", vm->name, s->name);
        return -EBUSY;
    }
    unsigned at = 0;
    while (vm->snapshots[at] != s)
        at++;
    pthread_rwlock_wrlock(&vm->chain_lock);
    memmove(&vm->snapshots[at], &vm->snapshots[at + 1], (vm->snapshot_count - at - 1) * sizeof(*vm->snapshots));
    vm->snapshot_count--;
    pthread_rwlock_unlock(&vm->chain_lock);
    int rc = save_vm(reg, vm);
    pthread_rwlock_wrlock(&vm->chain_lock);
    if (rc) {
        memmove(&vm->snapshots[at + 1], &vm->snapshots[at], (vm->snapshot_count - at) * sizeof(*vm->snapshots));
        vm->snapshots[at] = s;
        vm->snapshot_count++;
        snprintf(err, errlen, "cannot save VM %s: %s", vm->name, strerror(-rc));
    } else {
        put_disk(reg, &s->disk);
        atomic_store(&s->removed, true);
        s->next_removed = vm->removed_snapshots;
        vm->removed_snapshots = s;
    }
    pthread_rwlock_unlock(&vm->chain_lock);
    return rc;
}

int vm_remove_snapshot(struct vm_registry *reg, struct vm *vm, const char *snap, char *err, size_t errlen)
{
    pthread_mutex_lock(&reg->lock);
    struct vm_snapshot *s = find_snapshot(vm, snap);
    int rc = s ? remove_snapshot_locked(reg, vm, s, err, errlen) : -ENOENT;
    if (!s)
        snprintf(err, errlen, "VM %s has no snapshot %s", vm->name, snap);
    pthread_mutex_unlock(&reg->lock);
    return rc;
}

/* Implicit snapshots of vms[0..count) that no clone uses any more go; one
 * that cannot (its VM file not saved) makes the next removal look at every
 * VM (registry->lock held). */
static void drop_unused_implicit(struct vm_registry *reg, struct vm *const *vms, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        struct vm *vm = vms[i];
        if (vm->live.depth == 0)
            continue; /* removed: its chains are empty */
        for (unsigned k = vm->snapshot_count; k-- > 0;) {
            struct vm_snapshot *s = vm->snapshots[k];
            char err[256];
            if (s->implicit && !used_by_others(reg, vm, s->disk.layers[s->disk.depth - 1]) &&
                remove_snapshot_locked(reg, vm, s, err, sizeof(err)) != 0) {
                log_warn("implicit snapshot %s@%s stays: %s", vm->name, s->name, err);
                reg->implicit_sweep = true;
            }
        }
    }
}

int vm_get_times(struct vm *vm, const struct vm_snapshot *snapshot, struct timespec *atime, struct timespec *mtime)
{
    pthread_rwlock_rdlock(&vm->chain_lock);
    const struct disk *disk = snapshot ? &snapshot->disk : &vm->live;
    int rc = disk->depth ? layer_get_times(disk->layers[disk->depth - 1], atime, mtime) : -ENOENT;
    pthread_rwlock_unlock(&vm->chain_lock);
    return rc;
}

int vm_set_times(struct vm *vm, const struct timespec times[2])
{
    pthread_rwlock_rdlock(&vm->chain_lock);
    int rc = vm->live.depth ? layer_set_times(vm->live.layers[vm->live.depth - 1], times) : -ENOENT;
    pthread_rwlock_unlock(&vm->chain_lock);
    return rc;
}

/* ---- reading -------------------------------------------------------------------- */

/* Base chunks that a write's copy-up needs, fetched before any lock is
 * taken (see vm_write). */
struct held_chunks {
    struct fetch_ref refs[2];
    uint64_t index[2];
    int count;
};

/* The base source of copy-up: the chunks held, nothing else, since the
 * network is never waited on under a VM lock (-EAGAIN for any other). */
static int held_read(void *ctx, const struct vm_base *base, uint64_t index, void *buf, size_t len, uint64_t chunk_off)
{
    (void)base;
    const struct held_chunks *held = ctx;
    for (int k = 0; k < held->count; k++)
        if (held->index[k] == index)
            return fetch_ref_read(&held->refs[k], buf, len, chunk_off) ? -EIO : 0;
    return -EAGAIN;
}

/* ---- writing -------------------------------------------------------------------- */

/* The disk below the top layer, for copying blocks up. */
static struct disk below_top(const struct disk *live)
{
    struct disk below = *live;
    below.depth--;
    return below;
}

/* Reads block (block_len bytes: the disk's short last one may be less)
 * as the live disk has it, into out: from the top layer if it owns it,
 * else from below, the base through held. Copy-up's first half. */
static int read_for_copy_up(struct vm *vm, const struct held_chunks *held, uint64_t block, char *out,
                            size_t block_len)
{
    struct layer *top = vm->live.layers[vm->live.depth - 1];
    uint64_t start = block * LAYER_BLOCK_SIZE;
    struct disk below = below_top(&vm->live);
    struct base_source src = {held_read, (void *)held};
    return layer_owns(top, block) ? layer_read(top, out, block_len, start)
                                  : disk_read(&below, &src, out, block_len, start);
}

/* Writes one partial block through copy-up, reading what is below from
 * held. write_lock held shared, and the block's range in write_ranges. */
static int write_partial(struct vm *vm, const struct held_chunks *held, const char *buf, size_t len, uint64_t off,
                         bool through)
{
    struct layer *top = vm->live.layers[vm->live.depth - 1];
    uint64_t block = off / LAYER_BLOCK_SIZE;
    uint64_t start = block * LAYER_BLOCK_SIZE;
    size_t block_len = vm->live.size - start < LAYER_BLOCK_SIZE ? (size_t)(vm->live.size - start) : LAYER_BLOCK_SIZE;
    char tmp[LAYER_BLOCK_SIZE];
    int rc = read_for_copy_up(vm, held, block, tmp, block_len);
    if (rc)
        return rc;
    memcpy(tmp + (off - start), buf, len);
    return through ? layer_write_through(top, tmp, block_len, start) : layer_write(top, tmp, block_len, start);
}

/* The base chunks under the partial blocks at the two edges of a write that
 * no layer owns yet (at most two), noted in the trace like guest reads.
 * Blocks only ever become owned, so once the locks are taken at most these
 * are needed. */
static int edge_chunks_wanted(struct vm *vm, uint64_t off, size_t len, uint64_t wanted[2])
{
    const struct vm_base *base = vm->live.base;
    if (!base)
        return 0;
    const struct manifest *m = base->manifest;
    uint64_t end = off + len;
    uint64_t edges[2] = {off / LAYER_BLOCK_SIZE, (end - 1) / LAYER_BLOCK_SIZE};
    int count = 0;
    pthread_rwlock_rdlock(&vm->chain_lock);
    for (int e = 0; e < 2; e++) {
        uint64_t start = edges[e] * LAYER_BLOCK_SIZE;
        uint64_t stop = start + LAYER_BLOCK_SIZE < vm->live.size ? start + LAYER_BLOCK_SIZE : vm->live.size;
        bool partial = start < off || stop > end;
        uint64_t index = start / m->chunk_size;
        if (!partial || disk_owner_of(&vm->live, edges[e]) >= 0 || chunk_hash_is_null(&m->chunks[index]) ||
            (count == 1 && wanted[0] == index))
            continue;
        wanted[count++] = index;
        if (vm->trace) /* copy-up is recorded like a guest read */
            trace_note(vm->trace, index);
    }
    pthread_rwlock_unlock(&vm->chain_lock);
    return count;
}

/* Fetches the edge chunks of a write, waiting, with no VM lock held. */
static int hold_edge_chunks(struct vm *vm, struct fetcher *fetcher, uint64_t off, size_t len, struct held_chunks *held)
{
    uint64_t wanted[2];
    held->count = edge_chunks_wanted(vm, off, len, wanted);
    const struct vm_base *base = vm->live.base;
    for (int k = 0; k < held->count; k++) {
        held->index[k] = wanted[k];
        int rc = fetch_get(fetcher, &base->manifest->chunks[wanted[k]], base->manifest->chunk_size, FETCH_DEMAND,
                           base->counters, &held->refs[k]);
        if (rc) {
            for (int i = 0; i < k; i++)
                fetch_ref_release(fetcher, &held->refs[i]);
            held->count = 0;
            return rc; /* -ENOMEM or -EIO, before anything is written */
        }
    }
    return 0;
}

/* The writes themselves, with the locks held and no network: always one
 * layer write, which is done whole or not at all (layer.h), so that a
 * failed write changed no block. One that spans several blocks with a
 * partial one at an edge is copied with its edge blocks, copied up, into
 * one buffer of the whole blocks it touches. */
static int write_locked(struct vm *vm, const struct held_chunks *held, const char *buf, size_t len, uint64_t off,
                        bool through)
{
    struct layer *top = vm->live.layers[vm->live.depth - 1];
    uint64_t end = off + len, size = vm->live.size;
    uint64_t first = off / LAYER_BLOCK_SIZE, last = (end - 1) / LAYER_BLOCK_SIZE;
    /* The short last block of the disk is whole when the write reaches the end. */
    bool head = off % LAYER_BLOCK_SIZE != 0, tail = end % LAYER_BLOCK_SIZE != 0 && end != size;
    if (!head && !tail)
        return through ? layer_write_through(top, buf, len, off) : layer_write(top, buf, len, off);
    if (first == last)
        return write_partial(vm, held, buf, len, off, through);
    uint64_t start = first * LAYER_BLOCK_SIZE;
    uint64_t stop = (last + 1) * LAYER_BLOCK_SIZE < size ? (last + 1) * LAYER_BLOCK_SIZE : size;
    char *blocks = malloc((size_t)(stop - start));
    if (!blocks)
        return -ENOMEM; /* nothing written */
    int rc = head ? read_for_copy_up(vm, held, first, blocks, LAYER_BLOCK_SIZE) : 0;
    uint64_t last_start = last * LAYER_BLOCK_SIZE;
    if (!rc && tail)
        rc = read_for_copy_up(vm, held, last, blocks + (last_start - start), (size_t)(stop - last_start));
    if (!rc) {
        memcpy(blocks + (off - start), buf, len);
        rc = through ? layer_write_through(top, blocks, (size_t)(stop - start), start)
                     : layer_write(top, blocks, (size_t)(stop - start), start);
    }
    free(blocks);
    return rc;
}

/* write_held's flag (beside vm.h's) for a discard's partial edge blocks:
 * what a shrink put past the disk's end since the discard began is not
 * written, and is no error, as a local file's punch past its end. */
#define WRITE_CUT_AT_END (1u << 31)

/* Writes with the edge chunks in hand: takes the locks, writes, releases
 * the chunks (and notes them as read by the guest). */
static int write_held(struct vm *vm, struct fetcher *fetcher, struct held_chunks *chunks, const char *buf,
                      size_t len, uint64_t off, unsigned flags)
{
    /* Writes of other blocks go on in parallel; one that overlaps waits, so
     * that a copy-up never mixes two writes of one block. */
    struct range_held held;
    range_lock_acquire(&vm->write_ranges, &held, off / LAYER_BLOCK_SIZE,
                       (off + len + LAYER_BLOCK_SIZE - 1) / LAYER_BLOCK_SIZE);
    pthread_rwlock_rdlock(&vm->write_lock);
    pthread_rwlock_rdlock(&vm->chain_lock);
    /* Checked again: an ftruncate of a blank disk may have shrunk it since
     * write_fits (live.size changes only under write_lock). A discard's
     * edge is cut at the new end instead (nothing past it to zero). */
    int rc = -ENOSPC;
    if ((flags & WRITE_CUT_AT_END) && off < vm->live.size && len > vm->live.size - off)
        len = (size_t)(vm->live.size - off);
    if (off < vm->live.size && len <= vm->live.size - off)
        rc = write_locked(vm, chunks, buf, len, off, flags & VM_WRITE_THROUGH);
    else if (flags & WRITE_CUT_AT_END)
        rc = 0;
    pthread_rwlock_unlock(&vm->chain_lock);
    pthread_rwlock_unlock(&vm->write_lock);
    range_lock_release(&vm->write_ranges, &held);
    const struct vm_base *base = vm->live.base;
    for (int k = 0; k < chunks->count; k++) {
        if (base && base->marks)
            prefetch_note_read(base->marks, chunks->index[k], chunks->refs[k].hit);
        fetch_ref_release(fetcher, &chunks->refs[k]);
    }
    /* -EAGAIN (a chunk not held) cannot happen: see edge_chunks_wanted. */
    return rc == -EAGAIN ? -EIO : rc;
}

/* -ENOSPC unless a write of [off, off + len) is inside the disk. */
static int write_fits(const struct vm *vm, size_t len, uint64_t off)
{
    uint64_t size = vm_size(vm);
    return off >= size || len > size - off ? -ENOSPC : 0; /* a disk does not grow */
}

int vm_write(struct vm *vm, struct fetcher *fetcher, const char *buf, size_t len, uint64_t off)
{
    int rc = write_fits(vm, len, off);
    if (rc || len == 0)
        return rc;
    struct held_chunks chunks;
    rc = hold_edge_chunks(vm, fetcher, off, len, &chunks);
    return rc ? rc : write_held(vm, fetcher, &chunks, buf, len, off, 0);
}

/* A write waiting for its edge chunks. pending counts the fetches under way
 * plus the starter's own reference; whoever drops it to 0 writes. */
struct write_op {
    struct vm *vm;
    struct fetcher *fetcher;
    struct held_chunks chunks;
    atomic_int pending;
    atomic_int err; /* fetch_note_error */
    uint64_t off;
    size_t len;
    unsigned flags;
    vm_write_done_fn done;
    void *arg;
    char buf[]; /* a copy of the data: the caller's is gone once it returns */
};

static int write_op_finish(struct write_op *op)
{
    int err = atomic_load(&op->err);
    if (!err)
        return write_held(op->vm, op->fetcher, &op->chunks, op->buf, op->len, op->off, op->flags);
    for (int k = 0; k < op->chunks.count; k++)
        fetch_ref_release(op->fetcher, &op->chunks.refs[k]);
    return err; /* nothing was written */
}

static void write_chunk_done(void *arg, int err)
{
    struct write_op *op = arg;
    if (err)
        fetch_note_error(&op->err, err);
    if (atomic_fetch_sub(&op->pending, 1) == 1) {
        int rc = write_op_finish(op);
        op->done(op->arg, rc);
        free(op);
    }
}

int vm_write_start(struct vm *vm, struct fetcher *fetcher, const char *buf, size_t len, uint64_t off,
                   unsigned flags, vm_write_done_fn done, void *arg)
{
    int err = write_fits(vm, len, off);
    if (err || len == 0)
        return err;
    uint64_t wanted[2];
    int count = edge_chunks_wanted(vm, off, len, wanted);
    if (count == 0) {
        struct held_chunks none = {.count = 0};
        return write_held(vm, fetcher, &none, buf, len, off, flags);
    }
    struct write_op *op = malloc(sizeof(*op) + len);
    if (!op)
        return -ENOMEM;
    *op = (struct write_op){
        .vm = vm, .fetcher = fetcher, .off = off, .len = len, .flags = flags, .done = done, .arg = arg};
    memcpy(op->buf, buf, len);
    atomic_init(&op->pending, 1 + count);
    atomic_init(&op->err, 0);
    op->chunks.count = count;
    const struct vm_base *base = vm->live.base;
    uint64_t deadline = fetch_deadline(fetcher);
    for (int k = 0; k < count; k++) {
        op->chunks.index[k] = wanted[k];
        int rc = fetch_start(fetcher, &base->manifest->chunks[wanted[k]], base->manifest->chunk_size, FETCH_DEMAND,
                             deadline, base->counters, &op->chunks.refs[k], write_chunk_done, op);
        if (rc != FETCH_PENDING) {
            if (rc < 0)
                fetch_note_error(&op->err, rc);
            atomic_fetch_sub(&op->pending, 1);
        }
    }
    if (atomic_fetch_sub(&op->pending, 1) != 1)
        return VM_WRITE_PENDING;
    int rc = write_op_finish(op); /* every chunk was in hand: done here */
    free(op);
    return rc;
}

/* Zeroes [off, off + len) of a discard's partial edge block by a write, cut
 * at the disk's end as it is when the write takes its locks. */
static int zero_edge(struct vm *vm, struct fetcher *fetcher, uint64_t off, uint64_t len)
{
    static const char zeros[LAYER_BLOCK_SIZE];
    struct held_chunks chunks;
    int rc = hold_edge_chunks(vm, fetcher, off, (size_t)len, &chunks);
    return rc ? rc : write_held(vm, fetcher, &chunks, zeros, (size_t)len, off, WRITE_CUT_AT_END);
}

int vm_discard(struct vm *vm, struct fetcher *fetcher, uint64_t off, uint64_t len)
{
    uint64_t size = vm_size(vm);
    if (off >= size)
        return 0;
    if (len > size - off)
        len = size - off;
    uint64_t end = off + len;
    uint64_t first = (off + LAYER_BLOCK_SIZE - 1) / LAYER_BLOCK_SIZE;
    uint64_t last = end == size ? (end + LAYER_BLOCK_SIZE - 1) / LAYER_BLOCK_SIZE : end / LAYER_BLOCK_SIZE;
    int rc = 0;
    /* Partial blocks at the edges are zeroed by ordinary writes. */
    uint64_t head_end = first * LAYER_BLOCK_SIZE < end ? first * LAYER_BLOCK_SIZE : end;
    if (off < head_end)
        rc = zero_edge(vm, fetcher, off, head_end - off);
    uint64_t tail_start = last * LAYER_BLOCK_SIZE;
    if (!rc && tail_start < end && tail_start >= head_end && last >= first)
        rc = zero_edge(vm, fetcher, tail_start, end - tail_start);
    if (rc || last <= first)
        return rc;
    struct range_held held;
    range_lock_acquire(&vm->write_ranges, &held, first, last);
    pthread_rwlock_rdlock(&vm->write_lock);
    pthread_rwlock_rdlock(&vm->chain_lock);
    /* An ftruncate of a blank disk may have shrunk it since vm_size above
     * (live.size changes only under write_lock): past its end is nothing. */
    uint64_t blocks = (vm->live.size + LAYER_BLOCK_SIZE - 1) / LAYER_BLOCK_SIZE;
    if (last > blocks)
        last = blocks;
    struct layer *top = vm->live.layers[vm->live.depth - 1];
    if (first < last)
        rc = layer_punch(top, first, last - first); /* owned and empty: reads as zeros */
    pthread_rwlock_unlock(&vm->chain_lock);
    pthread_rwlock_unlock(&vm->write_lock);
    range_lock_release(&vm->write_ranges, &held);
    return rc;
}

int vm_flush(struct vm *vm)
{
    pthread_rwlock_rdlock(&vm->chain_lock);
    int rc = layer_flush(vm->live.layers[vm->live.depth - 1]);
    pthread_rwlock_unlock(&vm->chain_lock);
    return rc;
}

uint64_t vm_layer_bytes(struct vm *vm)
{
    uint64_t total = 0;
    pthread_rwlock_rdlock(&vm->chain_lock);
    for (unsigned i = 0; i < vm->live.depth; i++)
        total += layer_allocated_bytes(vm->live.layers[i]);
    pthread_rwlock_unlock(&vm->chain_lock);
    return total;
}

/* ---- verbs for the file system ---- */

const char *vm_name(const struct vm *vm) { return vm->name; }
uint64_t vm_size(const struct vm *vm) { return atomic_load(&vm->size); }

const struct vm_base *vm_get_base(const struct vm *vm, const struct vm_snapshot *snap)
{
    return snap ? snap->disk.base : vm->live.base;
}

unsigned vm_snapshot_list(struct vm *vm, struct vm_snapshot *out[VM_MAX_SNAPSHOTS])
{
    pthread_rwlock_rdlock(&vm->chain_lock);
    unsigned n = vm->snapshot_count;
    if (n)
        memcpy(out, vm->snapshots, n * sizeof(*out));
    pthread_rwlock_unlock(&vm->chain_lock);
    return n;
}
const char *vm_snapshot_name(const struct vm_snapshot *snap) { return snap->name; }
bool vm_snapshot_removed(const struct vm_snapshot *snap) { return atomic_load(&snap->removed); }

void vm_get_attr(struct vm *vm, struct vm_attr *out)
{
    pthread_mutex_lock(&vm->attr_lock);
    *out = (struct vm_attr){.mode = vm->mode, .uid = vm->uid, .gid = vm->gid};
    pthread_mutex_unlock(&vm->attr_lock);
}

static void count_open(struct vm *vm, struct vm_snapshot *snap, int delta)
{
    pthread_mutex_lock(&vm->attr_lock);
    vm->open_count += delta;
    if (snap)
        snap->open_count += delta;
    pthread_mutex_unlock(&vm->attr_lock);
}

int vm_open(struct vm *vm, struct vm_snapshot *snap)
{
    if (snap) {
        count_open(vm, snap, 1);
        return 0;
    }
    pthread_mutex_lock(&vm->attr_lock);
    bool gone = vm->deleted;
    if (!gone)
        vm->open_count++;
    pthread_mutex_unlock(&vm->attr_lock);
    return gone ? -ENOENT : 0;
}

void vm_close(struct vm *vm, struct vm_snapshot *snap) { count_open(vm, snap, -1); }
void vm_open_taken_over(struct vm *vm, struct vm_snapshot *snap) { count_open(vm, snap, 1); }

void vm_get_stats(struct vm *vm, struct vm_stats *out)
{
    memset(out, 0, sizeof(*out));
    out->has_base = vm->has_base;
    snprintf(out->base_name, sizeof(out->base_name), "%s", vm->base_name);
    out->base_version = vm->base_version;
    out->size = vm_size(vm);
    pthread_mutex_lock(&vm->attr_lock);
    out->open_count = vm->open_count;
    pthread_mutex_unlock(&vm->attr_lock);
    pthread_rwlock_rdlock(&vm->chain_lock);
    out->depth = vm->live.depth;
    out->snapshots = vm->snapshot_count;
    out->top_owned_blocks = layer_owned_blocks(vm->live.layers[out->depth - 1]);
    layer_stats(vm->live.layers[out->depth - 1], &out->top);
    pthread_rwlock_unlock(&vm->chain_lock);
    out->layer_bytes = vm_layer_bytes(vm); /* takes chain_lock itself */
}

int vm_trace_start(struct vm *vm, char *err, size_t errlen)
{
    if (!vm->live.base) {
        snprintf(err, errlen, "VM %s has no base to trace", vm->name);
        return -EINVAL;
    }
    struct chunk_trace *t = trace_new(vm->live.base->manifest->chunk_count);
    if (!t)
        return -ENOMEM;
    int rc = 0;
    pthread_rwlock_wrlock(&vm->chain_lock);
    if (vm->trace) {
        snprintf(err, errlen, "VM %s is already being traced", vm->name);
        rc = -EBUSY;
    } else {
        vm->trace = t;
    }
    pthread_rwlock_unlock(&vm->chain_lock);
    if (rc)
        trace_free(t);
    return rc;
}

struct chunk_trace *vm_trace_stop(struct vm *vm)
{
    pthread_rwlock_wrlock(&vm->chain_lock);
    struct chunk_trace *t = vm->trace;
    vm->trace = NULL;
    pthread_rwlock_unlock(&vm->chain_lock);
    return t;
}

const struct disk *vm_read_begin(struct vm *vm, const struct vm_snapshot *snap, struct chunk_trace **trace)
{
    pthread_rwlock_rdlock(&vm->chain_lock);
    if (trace)
        *trace = snap ? NULL : vm->trace;
    return snap ? &snap->disk : &vm->live;
}

void vm_read_end(struct vm *vm) { pthread_rwlock_unlock(&vm->chain_lock); }

int64_t vm_seek(struct vm *vm, const struct vm_snapshot *snap, uint64_t off, int whence)
{
    const struct disk *disk = vm_read_begin(vm, snap, NULL);
    int64_t pos = disk_seek(disk, off, whence);
    vm_read_end(vm);
    return pos;
}

/* ---- migration: export and import -------------------------------------------------
 *
 * An export file holds only the VM's own data and the identity of its base:
 *   text header  "imgfs-export 1\n", name, size, base (or "base none"), owner,
 *                then "data\n"
 *   records      u64 LE offset, u64 LE length, u8 kind (0 data + bytes,
 *                1 zeros); a record with offset UINT64_MAX ends them
 *   trailer      the 16-byte xxh3-128 of every byte before it
 * The trailer is checked over the whole file before anything is imported,
 * so a truncated or altered file is refused without side effects.
 */

#include <xxhash.h>

#define EXPORT_MAGIC "imgfs-export 1\n"
#define EXPORT_PIECE (1u << 20)
_Static_assert(sizeof(EXPORT_MAGIC) - 1 + 16 == VM_EXPORT_MIN_SIZE, "VM_EXPORT_MIN_SIZE is the magic and the trailer");

struct hashed_file {
    int fd;
    XXH3_state_t *state;
    int error; /* the first write error (negative errno), then nothing is written */
};

static void hf_write(struct hashed_file *hf, const void *data, size_t len)
{
    if (hf->error)
        return;
    hf->error = write_full(hf->fd, data, len);
    XXH3_128bits_update(hf->state, data, len);
}

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static void write_record(struct hashed_file *hf, uint64_t off, uint64_t len, uint8_t kind, const void *data)
{
    uint8_t head[17];
    put_le64(head, off);
    put_le64(head + 8, len);
    head[16] = kind;
    hf_write(hf, head, sizeof(head));
    if (kind == 0 && data)
        hf_write(hf, data, (size_t)len);
}

struct export_walk {
    struct hashed_file *hf;
    char *piece; /* EXPORT_PIECE bytes */
};

/* Only the VM's own data goes out: its layers' extents. */
static int export_extent(void *ctx, const struct disk_extent *e)
{
    struct export_walk *w = ctx;
    if (e->kind != DISK_EXTENT_LAYER)
        return 0;
    int rc = layer_read(e->layer, w->piece, (size_t)e->len, e->off);
    if (!rc) {
        bool zero = buffer_is_zero(w->piece, (size_t)e->len);
        write_record(w->hf, e->off, e->len, zero ? 1 : 0, zero ? NULL : w->piece);
    }
    return rc ? rc : w->hf->error;
}

int vm_export(struct vm *vm, int fd, bool (*stop)(void *ctx), void *stop_ctx, char *err, size_t errlen)
{
    struct hashed_file hf = {fd, XXH3_createState(), 0};
    char *piece = malloc(EXPORT_PIECE);
    if (!hf.state || !piece) {
        snprintf(err, errlen, "out of memory");
        XXH3_freeState(hf.state);
        free(piece);
        return -ENOMEM;
    }
    XXH3_128bits_reset(hf.state);
    pthread_rwlock_wrlock(&vm->write_lock); /* a consistent image: no writes meanwhile */
    pthread_rwlock_rdlock(&vm->chain_lock);
    char header[512];
    int n = snprintf(header, sizeof(header), EXPORT_MAGIC "name %s\nsize %" PRIu64 "\n", vm->name, vm->live.size);
    if (vm->has_base) {
        char hex[CHUNK_HASH_HEX + 1];
        chunk_hash_to_hex(&vm->base_id, hex);
        n += snprintf(header + n, sizeof(header) - (size_t)n, "base %s %" PRIu64 " %s\n", vm->base_name,
                      vm->base_version, hex);
    } else {
        n += snprintf(header + n, sizeof(header) - (size_t)n, "base none\n");
    }
    n += snprintf(header + n, sizeof(header) - (size_t)n, "owner %u %u %o\ndata\n", (unsigned)vm->uid,
                  (unsigned)vm->gid, (unsigned)vm->mode);
    hf_write(&hf, header, (size_t)n);
    int rc = hf.error;
    struct export_walk walk = {&hf, piece};
    for (uint64_t pos = 0; pos < vm->live.size && !rc; pos += EXPORT_PIECE) {
        if (stop && stop(stop_ctx))
            rc = -EINTR;
        else
            rc = disk_map(&vm->live, pos, EXPORT_PIECE, export_extent, &walk);
    }
    pthread_rwlock_unlock(&vm->chain_lock);
    pthread_rwlock_unlock(&vm->write_lock);
    write_record(&hf, UINT64_MAX, 0, 0xff, NULL);
    XXH128_canonical_t sum;
    XXH128_canonicalFromHash(&sum, XXH3_128bits_digest(hf.state));
    if (!rc && !hf.error)
        hf.error = write_full(fd, sum.digest, sizeof(sum.digest));
    if (!rc)
        rc = hf.error;
    if (rc)
        snprintf(err, errlen, "cannot export VM %s: %s", vm->name,
                 rc == -EINTR ? "interrupted" : strerror(-rc));
    XXH3_freeState(hf.state);
    free(piece);
    return rc;
}

/* Checks the trailer of an export file; leaves f positioned at the start. */
static int verify_export(FILE *f, uint64_t *payload_len)
{
    if (fseeko(f, 0, SEEK_END) < 0)
        return -errno;
    off_t size = ftello(f);
    if (size < (off_t)(strlen(EXPORT_MAGIC) + 16))
        return -EBADMSG;
    rewind(f);
    XXH3_state_t *state = XXH3_createState();
    char *buf = malloc(EXPORT_PIECE);
    if (!state || !buf) {
        XXH3_freeState(state);
        free(buf);
        return -ENOMEM;
    }
    XXH3_128bits_reset(state);
    uint64_t left = (uint64_t)size - 16;
    int rc = 0;
    while (left > 0 && !rc) {
        size_t n = left < EXPORT_PIECE ? (size_t)left : EXPORT_PIECE;
        if (fread(buf, 1, n, f) != n)
            rc = -EIO;
        XXH3_128bits_update(state, buf, n);
        left -= n;
    }
    XXH128_canonical_t want, got;
    if (!rc && fread(want.digest, 1, 16, f) != 16)
        rc = -EIO;
    XXH128_canonicalFromHash(&got, XXH3_128bits_digest(state));
    if (!rc && memcmp(want.digest, got.digest, 16) != 0)
        rc = -EBADMSG;
    XXH3_freeState(state);
    free(buf);
    rewind(f);
    *payload_len = (uint64_t)size - 16;
    return rc;
}

int vm_import(struct vm_registry *reg, int fd, const char *name, bool (*stop)(void *ctx), void *stop_ctx,
              struct vm **out, char *err, size_t errlen)
{
    /* A FILE of our own on a dup, so that the caller keeps fd. */
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    FILE *f = own < 0 ? NULL : fdopen(own, "rb");
    if (!f) {
        int rc = -errno;
        if (own >= 0)
            close(own);
        snprintf(err, errlen, "cannot read the staged export: %s", strerror(-rc));
        return rc;
    }
    uint64_t payload;
    int rc = verify_export(f, &payload);
    if (rc) {
        snprintf(err, errlen, "it is not a complete imgfs export (truncated or altered): %s",
                 rc == -EBADMSG ? "checksum mismatch" : strerror(-rc));
        fclose(f);
        return rc;
    }
    char line[256], src_name[65] = "", base_name[65] = "", base_hex[CHUNK_HASH_HEX + 1] = "";
    uint64_t size = 0, base_version = 0;
    unsigned uid = 0, gid = 0, mode = VM_DEFAULT_MODE;
    bool has_base = false, header_ok = fgets(line, sizeof(line), f) && strcmp(line, EXPORT_MAGIC) == 0;
    while (header_ok && fgets(line, sizeof(line), f) && strcmp(line, "data\n") != 0) {
        if (sscanf(line, "name %64s", src_name) == 1 || sscanf(line, "size %" SCNu64, &size) == 1 ||
            sscanf(line, "owner %u %u %o", &uid, &gid, &mode) == 3 || strcmp(line, "base none\n") == 0)
            continue;
        if (sscanf(line, "base %64s %" SCNu64 " %32s", base_name, &base_version, base_hex) == 3) {
            has_base = true;
            continue;
        }
        header_ok = false;
    }
    if (!header_ok || strcmp(line, "data\n") != 0 || !name_is_valid(src_name) || size == 0) {
        snprintf(err, errlen, "it is not an imgfs export");
        fclose(f);
        return -EBADMSG;
    }
    struct vm *vm = NULL;
    const char *new_name = name ? name : src_name;
    if (has_base) {
        struct chunk_hash want;
        const struct vm_base *base = reg->lookup(reg->lookup_ctx, base_name, base_version);
        if (chunk_hash_from_hex(base_hex, &want) < 0 || !base || !chunk_hash_equal(&want, &base->manifest->id)) {
            snprintf(err, errlen, "the export needs base %s@%" PRIu64 " with manifest %s, which this mount does not have",
                     base_name, base_version, base_hex);
            fclose(f);
            return -ENOENT;
        }
        rc = vm_create(reg, new_name, base_name, base_version, 0, &vm, err, errlen);
    } else {
        rc = vm_create(reg, new_name, NULL, 0, size, &vm, err, errlen);
    }
    if (rc) {
        fclose(f);
        return rc;
    }
    if (vm->live.size != size) {
        snprintf(err, errlen, "the export's size does not match its base");
        rc = -EBADMSG;
    }
    char *piece = malloc(EXPORT_PIECE);
    struct layer *top = vm->live.layers[0];
    while (!rc) {
        uint8_t head[17];
        if (stop && stop(stop_ctx)) {
            snprintf(err, errlen, "interrupted");
            rc = -EINTR;
            break;
        }
        if (!piece || fread(head, 1, sizeof(head), f) != sizeof(head)) {
            rc = piece ? -EBADMSG : -ENOMEM;
            break;
        }
        uint64_t off = get_le64(head), len = get_le64(head + 8);
        if (off == UINT64_MAX && head[16] == 0xff)
            break;
        if (off >= size || len == 0 || len > EXPORT_PIECE || len > size - off || off % LAYER_BLOCK_SIZE ||
            head[16] > 1) {
            rc = -EBADMSG;
            break;
        }
        if (head[16] == 0) {
            if (fread(piece, 1, (size_t)len, f) != len)
                rc = -EBADMSG;
            if (!rc)
                rc = layer_write(top, piece, (size_t)len, off);
        } else {
            rc = layer_punch(top, off / LAYER_BLOCK_SIZE, (len + LAYER_BLOCK_SIZE - 1) / LAYER_BLOCK_SIZE);
        }
    }
    free(piece);
    fclose(f);
    if (!rc)
        rc = layer_flush(top);
    /* The file's permission bits are kept, but never setuid, setgid or
     * sticky bits, nor its owner: the imported disk belongs to whoever
     * imported it (root), until the operator chowns it. */
    (void)uid, (void)gid;
    if (!rc && (mode & 0666) != VM_DEFAULT_MODE) {
        mode_t m = mode & 0666;
        rc = vm_set_attr(reg, vm, &m, NULL, NULL);
    }
    if (rc) {
        if (!err[0] || (rc != -EBADMSG && rc != -EINTR))
            snprintf(err, errlen, "%s",
                     rc == -EBADMSG  ? "its records are malformed"
                     : rc == -ENOSPC ? "the state directory has no room for the VM's data"
                                     : strerror(-rc));
        char ignored[256];
        vm_remove(reg, vm, ignored, sizeof(ignored));
        return rc;
    }
    *out = vm;
    return 0;
}
