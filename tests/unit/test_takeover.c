/* Unit tests of the pieces of takeover that need no mount: the INIT offer
 * parser, the handle table, the owner lock and its refusal sentence, and
 * the mountinfo path unescaping, and the directory that lives as long as
 * its owner (and those older versions left). */
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "owner.h"
#include "passthrough.h"
#include "takeover.h"
#include "tree.h"

static int failures;
#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                                       \
            fprintf(stderr, __VA_ARGS__);                                                                              \
            fputc('\n', stderr);                                                                                       \
            failures++;                                                                                                \
        }                                                                                                              \
    } while (0)

/* An INIT request as the kernel sends it: header, then major, minor,
 * max_readahead, flags, flags2 and padding. */
static size_t make_init(unsigned char *buf, uint32_t minor, uint32_t flags, uint32_t flags2)
{
    struct fuse_in_header in = {.len = sizeof(in) + 64, .opcode = FUSE_INIT, .unique = 2};
    uint32_t body[16] = {7, minor, 1u << 20, flags, flags2};
    memcpy(buf, &in, sizeof(in));
    memcpy(buf + sizeof(in), body, sizeof(body));
    return sizeof(in) + sizeof(body);
}

static void test_init_offer(void)
{
    unsigned char buf[256];
    size_t len = make_init(buf, 40, 1u << 30, 1u << 7);
    CHECK(takeover_init_has_resend(buf, len), "7.40 with FUSE_INIT_EXT and FUSE_HAS_RESEND offers resend");
    len = make_init(buf, 40, 0, 1u << 7);
    CHECK(!takeover_init_has_resend(buf, len), "without FUSE_INIT_EXT flags2 means nothing");
    len = make_init(buf, 39, 1u << 30, 1u << 7);
    CHECK(!takeover_init_has_resend(buf, len), "protocol 7.39 has no resend");
    len = make_init(buf, 40, 1u << 30, 0);
    CHECK(!takeover_init_has_resend(buf, len), "no FUSE_HAS_RESEND, no resend");
    CHECK(!takeover_init_has_resend(buf, 20), "a short buffer is no INIT");

    int fd;
    struct takeover *t = takeover_create(&fd);
    CHECK(t != NULL, "takeover_create: %s", strerror(errno));
    if (!t)
        return;
    len = make_init(buf, 41, 1u << 30, 1u << 7);
    struct fuse_in_header other = {.len = 40, .opcode = FUSE_LOOKUP, .unique = 4};
    takeover_note_request(t, &other, sizeof(other));
    CHECK(t->init_len == 0, "a LOOKUP is not kept as the INIT");
    takeover_note_request(t, buf, len);
    CHECK(t->init_len == len && memcmp(t->init, buf, len) == 0 && t->has_resend, "the INIT is kept, with its offer");
    unsigned char second[256];
    size_t len2 = make_init(second, 40, 0, 0);
    takeover_note_request(t, second, len2);
    CHECK(t->init_len == len && t->has_resend, "a second INIT changes nothing");

    struct takeover *again = takeover_attach(fd);
    CHECK(again && again->init_len == len, "a server maps the same region");
    t->layout++;
    CHECK(takeover_attach(fd) == NULL && errno == EPROTO, "another layout is refused with EPROTO");
    t->layout--;
    close(fd);
}

static void test_handles(void)
{
    int fd;
    struct takeover *t = takeover_create(&fd);
    if (!t)
        return;
    uint64_t a = takeover_handle_open(t, 11, true), b = takeover_handle_open(t, 12, false);
    CHECK(a && b && a != b, "two opens get two handles (%llu, %llu)", (unsigned long long)a, (unsigned long long)b);
    CHECK(t->handles[a - 1].vm_disk == 1 && t->handles[b - 1].vm_disk == 0, "the VM disk flag is kept");
    CHECK(!takeover_handle_release(t, a, 12), "a release names the inode it opened");
    CHECK(takeover_handle_release(t, a, 11), "the release of handle a frees it");
    CHECK(!takeover_handle_release(t, a, 11), "a handle is released once");
    CHECK(!takeover_handle_release(t, 0, 11) && !takeover_handle_release(t, TAKEOVER_MAX_HANDLES + 1, 11),
          "handles out of range are not in the table");
    CHECK(takeover_handle_open(t, 13, false) == a, "a freed slot is used again");
    unsigned opened = 2;
    while (takeover_handle_open(t, 14, false))
        opened++;
    CHECK(opened == TAKEOVER_MAX_HANDLES, "the table holds %d handles (%u)", TAKEOVER_MAX_HANDLES, opened);
    close(fd);
}

static void test_owner_lock(void)
{
    char dir[] = "/tmp/imgfs-owner-test.XXXXXX";
    if (!mkdtemp(dir)) {
        CHECK(0, "mkdtemp: %s", strerror(errno));
        return;
    }
    char err[512];
    struct owner_lock first = OWNER_LOCK_INIT, second = OWNER_LOCK_INIT;
    CHECK(owner_lock(&first, "state directory", dir, "/mnt/one", err, sizeof(err)) == 0, "first lock: %s", err);
    CHECK(owner_lock(&second, "state directory", dir, "/mnt/two", err, sizeof(err)) != 0,
          "a second lock of the same directory is refused");
    char want[512];
    snprintf(want, sizeof(want), "the state directory %s is in use by imgfs pid %d mounted on /mnt/one", dir,
             (int)getpid());
    CHECK(strstr(err, want) != NULL, "the refusal names the directory, the pid and the mount: '%s'", err);
    /* A live pid (a dead one would make the second lock wait for it). */
    CHECK(owner_set_pid(&first, getppid(), "/mnt/three") == 0, "owner_set_pid");
    char now[64];
    snprintf(now, sizeof(now), "pid %d mounted on /mnt/three", (int)getppid());
    CHECK(owner_lock(&second, "state directory", dir, "/mnt/two", err, sizeof(err)) != 0 && strstr(err, now),
          "the refusal names the new owner: '%s'", err);
    owner_unlock(&first);
    CHECK(owner_lock(&second, "state directory", dir, "/mnt/two", err, sizeof(err)) == 0,
          "after the owner lets go the directory can be locked: %s", err);
    owner_unlock(&second);
    char path[600];
    snprintf(path, sizeof(path), "%s/imgfs.lock", dir);
    unlink(path);
    rmdir(dir);
}

static void test_unescape(void)
{
    char path[] = "/var/lib/my\\040images\\011x\\134y";
    owner_unescape_mount_path(path);
    CHECK(strcmp(path, "/var/lib/my images\tx\\y") == 0, "mountinfo escapes: '%s'", path);
}

/* One handle slot passed from thread to thread the way the kernel passes
 * it: an open on one, the release on a second, the next open on a third,
 * ordered only by relaxed flags, which TSan (like the kernel's ordering of
 * FUSE requests) does not count as synchronisation. */
struct handle_relay {
    struct takeover *t;
    _Atomic uint64_t fh;
    atomic_int stage; /* 1: opened, 2: released, 3: opened again */
};

static void wait_stage(struct handle_relay *r, int stage)
{
    while (atomic_load_explicit(&r->stage, memory_order_relaxed) < stage)
        sched_yield();
}

static void *relay_open_first(void *arg)
{
    struct handle_relay *r = arg;
    atomic_store_explicit(&r->fh, takeover_handle_open(r->t, 21, true), memory_order_relaxed);
    atomic_store_explicit(&r->stage, 1, memory_order_relaxed);
    return NULL;
}

static void *relay_release(void *arg)
{
    struct handle_relay *r = arg;
    wait_stage(r, 1);
    uint64_t fh = atomic_load_explicit(&r->fh, memory_order_relaxed);
    if (!takeover_handle_release(r->t, fh, 21))
        fprintf(stderr, "the relayed handle was not released\n");
    atomic_store_explicit(&r->stage, 2, memory_order_relaxed);
    return NULL;
}

static void *relay_open_again(void *arg)
{
    struct handle_relay *r = arg;
    wait_stage(r, 2);
    takeover_handle_open(r->t, 22, false);
    atomic_store_explicit(&r->stage, 3, memory_order_relaxed);
    return NULL;
}

/* Under TSan, a plain write of the slot's fields by two opens on two
 * threads is a reported race (it was, in CI). */
static void test_handles_across_threads(void)
{
    int fd;
    struct handle_relay r = {.t = takeover_create(&fd)};
    CHECK(r.t != NULL, "the shared region is made: %s", strerror(errno));
    if (!r.t)
        return;
    pthread_t threads[3];
    void *(*steps[3])(void *) = {relay_open_again, relay_release, relay_open_first};
    for (int i = 0; i < 3; i++)
        CHECK(pthread_create(&threads[i], NULL, steps[i], &r) == 0, "thread %d starts", i);
    for (int i = 0; i < 3; i++)
        pthread_join(threads[i], NULL);
    CHECK(r.fh && atomic_load(&r.t->handles[r.fh - 1].ino) == 22 && !atomic_load(&r.t->handles[r.fh - 1].vm_disk),
          "the slot passed on holds the second open's inode and flag");
    munmap(r.t, sizeof(*r.t));
    close(fd);
}

static bool exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* Runs fn(arg) as pid 1 of a new PID namespace, where no pid of this one is
 * seen; returns its exit status, or 77 when namespaces are refused. */
static int run_in_pid_namespace(int (*fn)(void *), void *arg)
{
    pid_t child = fork();
    if (child == 0) {
        if (unshare(CLONE_NEWPID) < 0)
            _exit(77);
        pid_t grandchild = fork();
        if (grandchild == 0)
            _exit(fn(arg));
        int status;
        bool ok = grandchild > 0 && waitpid(grandchild, &status, 0) == grandchild && WIFEXITED(status);
        _exit(ok ? WEXITSTATUS(status) : 99);
    }
    int status;
    if (child < 0 || waitpid(child, &status, 0) != child || !WIFEXITED(status))
        return 99;
    return WEXITSTATUS(status);
}

struct owner_dir_case {
    const char *parent;
    int pipe_fd; /* where a dying owner tells its directory */
};

static int sweep_in(void *arg)
{
    owner_dir_sweep(((struct owner_dir_case *)arg)->parent);
    return 0;
}

/* Makes an owner directory, tells its path on the pipe and dies with it. */
static int die_owning(void *arg)
{
    struct owner_dir_case *c = arg;
    char path[256];
    struct owner_lock lock = OWNER_LOCK_INIT;
    if (owner_dir_create(c->parent, path, sizeof(path), &lock) != 0)
        return 1;
    size_t n = strlen(path) + 1;
    return write(c->pipe_fd, path, n) == (ssize_t)n ? 0 : 1;
}

/* Runs die_owning (in a PID namespace or not) and returns the directory it
 * left in path ("" on failure). */
static void dead_owner_dir(struct owner_dir_case *c, bool in_namespace, char *path, size_t len)
{
    int p[2];
    path[0] = 0;
    if (pipe(p) < 0)
        return;
    c->pipe_fd = p[1];
    int rc;
    if (in_namespace) {
        rc = run_in_pid_namespace(die_owning, c);
    } else {
        pid_t child = fork();
        if (child == 0)
            _exit(die_owning(c));
        int status = 0;
        rc = child > 0 && waitpid(child, &status, 0) == child && WIFEXITED(status) ? WEXITSTATUS(status) : 99;
    }
    close(p[1]);
    ssize_t n = rc == 0 ? read(p[0], path, len - 1) : -1;
    path[n > 0 ? n : 0] = 0;
    close(p[0]);
}

static void test_owner_dir(void)
{
    char parent[] = "/dev/shm/test_takeover.XXXXXX";
    CHECK(mkdtemp(parent) != NULL, "mkdtemp: %s", strerror(errno));
    struct owner_dir_case c = {.parent = parent};

    /* Two owners at once (here in one process) get two directories. */
    char mine[256], other[256], lockpath[300];
    struct owner_lock lock = OWNER_LOCK_INIT, other_lock = OWNER_LOCK_INIT;
    CHECK(owner_dir_create(parent, mine, sizeof(mine), &lock) == 0, "create");
    CHECK(owner_dir_create(parent, other, sizeof(other), &other_lock) == 0, "create a second");
    CHECK(strcmp(mine, other) != 0 && exists(mine) && exists(other), "two owners share %s", mine);

    /* A sweeper that cannot see this process (another PID namespace) keeps
     * its directory, and so does one that can. */
    int rc = run_in_pid_namespace(sweep_in, &c);
    if (rc == 77)
        printf("owner_dir: skipped the PID namespace cases (unshare refused: not root?)\n");
    else
        CHECK(rc == 0 && exists(mine) && exists(other), "a sweep in another PID namespace removed a live directory");
    owner_dir_sweep(parent);
    CHECK(exists(mine) && exists(other), "a sweep removed a live directory");

    /* A dead owner's directory goes, whether its pid is gone or, seen from
     * here, names a live process (it was pid 1 of its namespace). */
    char dead[256], dead_in_ns[256] = "";
    dead_owner_dir(&c, false, dead, sizeof(dead));
    CHECK(dead[0] && exists(dead), "the dying owner made no directory");
    if (rc != 77) {
        dead_owner_dir(&c, true, dead_in_ns, sizeof(dead_in_ns));
        CHECK(dead_in_ns[0] && exists(dead_in_ns), "the dying owner in a PID namespace made no directory");
    }
    owner_dir_sweep(parent);
    CHECK(dead[0] && !exists(dead), "a dead owner's directory %s was kept", dead);
    CHECK(!dead_in_ns[0] || !exists(dead_in_ns), "a dead owner's directory %s was kept", dead_in_ns);
    snprintf(lockpath, sizeof(lockpath), "%s.lock", dead);
    CHECK(!exists(lockpath), "a dead owner's lock file %s was kept", lockpath);
    CHECK(exists(mine) && exists(other), "a sweep removed a live directory");

    CHECK(owner_dir_remove(mine, &lock) == 0 && !exists(mine) && lock.fd < 0, "remove");
    snprintf(lockpath, sizeof(lockpath), "%s.lock", mine);
    CHECK(!exists(lockpath), "the lock file %s was kept", lockpath);
    CHECK(owner_dir_remove(other, &other_lock) == 0 && !exists(other), "remove the second");
    CHECK(rmdir(parent) == 0, "%s is not empty after the owners removed theirs", parent);
}

/* Makes parent/imgfs-PID as older versions did, with one pending file
 * (left open read-write in *held when hold). */
static void old_owner_dir(const char *parent, long pid, bool hold, int *held, char *path, size_t len)
{
    snprintf(path, len, "%s/imgfs-%ld", parent, pid);
    char file[400];
    snprintf(file, sizeof(file), "%s/0123456789abcdef.pending", path);
    int fd = mkdir(path, 0700) == 0 ? open(file, O_RDWR | O_CREAT | O_CLOEXEC, 0600) : -1;
    CHECK(fd >= 0, "cannot make %s: %s", file, strerror(errno));
    if (hold)
        *held = fd;
    else if (fd >= 0)
        close(fd);
}

/* Directories of older versions (imgfs-PID, no lock): the sweep removes one
 * whose pid is gone and whose files nobody has open, and keeps one whose
 * pid lives (a supervisor, also between its servers) or whose file a
 * process has open (a server, seen from any PID namespace), and names that
 * only look alike. */
static void test_old_owner_dirs(void)
{
    char parent[] = "/dev/shm/test_takeover_old.XXXXXX";
    CHECK(mkdtemp(parent) != NULL, "mkdtemp: %s", strerror(errno));
    pid_t child = fork();
    if (child == 0)
        _exit(0);
    CHECK(child > 0 && waitpid(child, NULL, 0) == child, "fork");
    pid_t gone = child; /* reaped: no process has its pid (for now) */
    char dead[300], live[300], open_dead[300], lookalike[300];
    int held = -1;
    old_owner_dir(parent, gone, false, NULL, dead, sizeof(dead));
    old_owner_dir(parent, getpid(), false, NULL, live, sizeof(live));
    snprintf(lookalike, sizeof(lookalike), "%s/imgfs-%ldx", parent, (long)gone);
    CHECK(mkdir(lookalike, 0700) == 0, "mkdir %s", lookalike);
    /* The same dead pid's directory again, under another parent name: a
     * file in it is open, as a live server of another namespace keeps it. */
    char parent2[] = "/dev/shm/test_takeover_old2.XXXXXX";
    CHECK(mkdtemp(parent2) != NULL, "mkdtemp: %s", strerror(errno));
    old_owner_dir(parent2, gone, true, &held, open_dead, sizeof(open_dead));
    if (kill(gone, 0) == 0) {
        printf("owner_dir: skipped the old directories (pid %ld was reused at once)\n", (long)gone);
    } else {
        owner_dir_sweep(parent);
        owner_dir_sweep(parent2);
        CHECK(!exists(dead), "an old dead owner's directory %s was kept", dead);
        CHECK(exists(live), "an old directory of a live pid %s was removed", live);
        CHECK(exists(open_dead), "an old directory with a file open %s was removed", open_dead);
        CHECK(exists(lookalike), "%s is no imgfs directory, and was removed", lookalike);
    }
    if (held >= 0)
        close(held);
    owner_dir_sweep(parent2); /* nobody has it open now */
    CHECK(!exists(open_dead), "an old dead owner's directory %s was kept once closed", open_dead);
    char cmd[700];
    snprintf(cmd, sizeof(cmd), "rm -rf %s %s", parent, parent2);
    CHECK(system(cmd) == 0, "rm");
}

/* A released slot carries no backing id: a server killed after the slot is
 * freed, or after the next open took it but before that open set its own
 * id, must not leave a new server a stale id to restore (passthrough.h). */
static void test_released_slot_has_no_backing(void)
{
    int fd;
    struct takeover *t = takeover_create(&fd);
    if (!t)
        return;
    uint64_t a = takeover_handle_open(t, 21, false);
    takeover_handle_set_backing(t, a, 9);
    CHECK(takeover_handle_release(t, a, 21), "the release frees the slot");
    CHECK(atomic_load(&t->handles[a - 1].backing_id) == 0, "a freed slot keeps backing id %u",
          (unsigned)atomic_load(&t->handles[a - 1].backing_id));
    uint64_t b = takeover_handle_open(t, 22, false);
    takeover_handle_set_backing(t, b, 9);
    CHECK(!takeover_handle_release(t, b, 21) && takeover_handle_backing(t, b) == 9,
          "a release naming another inode leaves the slot as it is");

    /* Two passthrough opens share one id: releasing one clears its slot
     * before the slot is freed, though the id stays open for the other. */
    struct passthrough *pt = NULL;
    char err[200];
    CHECK(passthrough_create(false, NULL, NULL, t, -1, &pt, err, sizeof(err)) == 0, "passthrough_create: %s", err);
    struct manifest m = {.name = "b", .version = 1};
    struct base_version v = {.manifest = &m};
    passthrough_version_init(&v.pt);
    uint64_t h1 = takeover_handle_open(t, 30, false), h2 = takeover_handle_open(t, 30, false);
    takeover_handle_set_backing(t, h1, 5);
    takeover_handle_set_backing(t, h2, 5);
    passthrough_restore(pt, &v, 5);
    passthrough_restore(pt, &v, 5);
    passthrough_release(pt, &v, h1);
    CHECK(takeover_handle_backing(t, h1) == 0, "a released passthrough open keeps backing id %u in its slot",
          takeover_handle_backing(t, h1));
    CHECK(v.pt.pt_opens == 1 && v.pt.backing_id == 5, "the other open keeps the id (%u opens, id %d)",
          v.pt.pt_opens, v.pt.backing_id);
    CHECK(takeover_handle_backing(t, h2) == 5, "the other open's slot keeps its id");
    passthrough_version_destroy(&v.pt);
    passthrough_destroy(pt);
    close(fd);
}

int main(void)
{
    test_init_offer();
    test_handles();
    test_released_slot_has_no_backing();
    test_handles_across_threads();
    test_owner_lock();
    test_unescape();
    test_owner_dir();
    test_old_owner_dirs();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("test_takeover: all checks passed\n");
    return 0;
}
