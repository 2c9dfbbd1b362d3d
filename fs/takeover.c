#include "takeover.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Not in the uapi header of every build machine (it came with 7.40). */
#ifndef FUSE_NOTIFY_RESEND
#define FUSE_NOTIFY_RESEND 7
#endif
#define INIT_FLAG_EXT (1u << 30)       /* FUSE_INIT_EXT: flags2 is valid */
#define INIT_FLAG2_HAS_RESEND (1u << 7) /* FUSE_HAS_RESEND is 1 << 39 */
#define INIT_FLAG2_PASSTHROUGH (1u << 5) /* FUSE_PASSTHROUGH is 1 << 37 */

/* Adding the passthrough word used padding: the layout did not change. */
_Static_assert(offsetof(struct takeover, inode_count) == 2776, "struct takeover's layout 1 moved");

struct takeover *takeover_create(int *fd)
{
    int mfd = memfd_create("imgfs-takeover", MFD_CLOEXEC);
    if (mfd < 0)
        return NULL;
    if (ftruncate(mfd, sizeof(struct takeover)) < 0) {
        int e = errno;
        close(mfd);
        errno = e;
        return NULL;
    }
    struct takeover *t = mmap(NULL, sizeof(*t), PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (t == MAP_FAILED) {
        int e = errno;
        close(mfd);
        errno = e;
        return NULL;
    }
    t->magic = TAKEOVER_MAGIC;
    t->layout = TAKEOVER_LAYOUT;
    *fd = mfd;
    return t;
}

struct takeover *takeover_attach(int fd)
{
    struct takeover *t = mmap(NULL, sizeof(*t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (t == MAP_FAILED)
        return NULL;
    if (t->magic != TAKEOVER_MAGIC || t->layout != TAKEOVER_LAYOUT) {
        munmap(t, sizeof(*t));
        errno = EPROTO;
        return NULL;
    }
    return t;
}

/* The flags2 word of an INIT request of protocol 7.minor or later with
 * FUSE_INIT_EXT, or 0. */
static uint32_t init_flags2(const void *bytes, size_t len, uint32_t minor)
{
    struct fuse_in_header in;
    struct {
        uint32_t major, minor, max_readahead, flags, flags2;
    } init = {0};
    if (len < sizeof(in) + sizeof(init))
        return 0;
    memcpy(&in, bytes, sizeof(in));
    memcpy(&init, (const char *)bytes + sizeof(in), sizeof(init));
    if (in.opcode != FUSE_INIT || init.major != 7 || init.minor < minor || !(init.flags & INIT_FLAG_EXT))
        return 0;
    return init.flags2;
}

bool takeover_init_has_resend(const void *bytes, size_t len)
{
    return (init_flags2(bytes, len, 40) & INIT_FLAG2_HAS_RESEND) != 0;
}

bool takeover_init_has_passthrough(const void *bytes, size_t len)
{
    return (init_flags2(bytes, len, 40) & INIT_FLAG2_PASSTHROUGH) != 0;
}

void takeover_note_request(struct takeover *t, const void *bytes, size_t len)
{
    uint32_t opcode;
    if (len < sizeof(struct fuse_in_header))
        return;
    memcpy(&opcode, (const char *)bytes + offsetof(struct fuse_in_header, opcode), sizeof(opcode));
    if (opcode != FUSE_INIT || t->init_len || len > sizeof(t->init))
        return; /* the kernel sends INIT once; a re-sent one changes nothing */
    memcpy(t->init, bytes, len);
    t->has_resend = takeover_init_has_resend(bytes, len);
    t->init_len = (uint32_t)len;
}

uint64_t takeover_handle_open(struct takeover *t, uint64_t ino, bool vm_disk)
{
    for (size_t i = 0; i < TAKEOVER_MAX_HANDLES; i++) {
        uint64_t expected = 0;
        if (atomic_load_explicit(&t->handles[i].ino, memory_order_relaxed) == 0 &&
            atomic_compare_exchange_strong(&t->handles[i].ino, &expected, ino)) {
            atomic_store_explicit(&t->handles[i].vm_disk, vm_disk, memory_order_relaxed);
            atomic_store_explicit(&t->handles[i].backing_id, 0, memory_order_relaxed);
            return i + 1;
        }
    }
    return 0;
}

void takeover_handle_set_backing(struct takeover *t, uint64_t fh, uint32_t backing_id)
{
    if (fh && fh <= TAKEOVER_MAX_HANDLES)
        atomic_store_explicit(&t->handles[fh - 1].backing_id, backing_id, memory_order_relaxed);
}

uint32_t takeover_handle_backing(struct takeover *t, uint64_t fh)
{
    return fh && fh <= TAKEOVER_MAX_HANDLES ? atomic_load_explicit(&t->handles[fh - 1].backing_id, memory_order_relaxed)
                                            : 0;
}

bool takeover_handle_release(struct takeover *t, uint64_t fh, uint64_t ino)
{
    if (fh == 0 || fh > TAKEOVER_MAX_HANDLES)
        return false;
    struct takeover_handle *h = &t->handles[fh - 1];
    /* The id goes before the slot does: a slot seen free (or taken by the
     * next open, before it sets its own) never carries a stale id that a
     * new server would restore. The slot is ours while it holds ino. */
    if (atomic_load(&h->ino) != ino)
        return false;
    atomic_store(&h->backing_id, 0);
    uint64_t expected = ino;
    return atomic_compare_exchange_strong(&h->ino, &expected, 0);
}

int takeover_notify_resend(int fuse_fd)
{
    struct fuse_out_header out = {.len = sizeof(out), .error = FUSE_NOTIFY_RESEND, .unique = 0};
    return write(fuse_fd, &out, sizeof(out)) == (ssize_t)sizeof(out) ? 0 : -errno;
}
