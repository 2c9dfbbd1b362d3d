/* extmap: file paths inside a guest's ext2/3/4 filesystem -> chunk list.
 *
 * Three layers, bottom up:
 *  - struct ext_disk: the base alone as a disk of disk.h (its one chunk
 *    walker), over a base source that reads the caller's read_fn one whole
 *    chunk at a time, with a small LRU of chunks (libext2fs reads the same
 *    inode-table and directory blocks many times); all-zero chunks are
 *    zeros without asking read_fn at all;
 *  - an io_manager for libext2fs that serves a partition of that disk;
 *  - the mapping: find the partitions that hold an ext filesystem, resolve
 *    every path in each, keep the partition where the most paths resolve.
 */
#include "extmap.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>

#include "disk.h"
#include "hash.h"

/* ---- the virtual disk: a base alone, through disk.h ---- */

/* The base source behind the disk: read_fn, one whole chunk at a time, with
 * a small LRU of chunks (libext2fs reads the same inode-table and directory
 * blocks many times). disk_map() walks the chunks of a range and answers the
 * manifest's all-zero chunks without asking read_fn at all. */

#define CHUNK_CACHE_BYTES (32u << 20)
#define CHUNK_CACHE_MAX_SLOTS 64

struct chunk_slot {
    uint64_t chunk; /* UINT64_MAX when empty */
    uint64_t used;  /* LRU clock */
    unsigned char *data;
};

struct ext_disk {
    const struct manifest *m;
    extmap_read_fn read_fn;
    void *ctx;
    struct chunk_slot *slots;
    size_t nslots;
    uint64_t clock;
    struct vm_base base;
    struct disk disk;       /* the base with no layer */
    struct base_source src; /* chunk_read on this ext_disk */
};

static int chunk_read(void *arg, const struct vm_base *base, uint64_t index, void *buf, size_t len,
                      uint64_t chunk_off);

static int ext_disk_init(struct ext_disk *d, const struct manifest *m, extmap_read_fn read_fn, void *ctx)
{
    memset(d, 0, sizeof(*d));
    d->m = m;
    d->read_fn = read_fn;
    d->ctx = ctx;
    size_t n = CHUNK_CACHE_BYTES / m->chunk_size;
    d->nslots = n < 2 ? 2 : n > CHUNK_CACHE_MAX_SLOTS ? CHUNK_CACHE_MAX_SLOTS : n;
    d->slots = calloc(d->nslots, sizeof(*d->slots));
    if (!d->slots)
        return -ENOMEM;
    for (size_t i = 0; i < d->nslots; i++)
        d->slots[i].chunk = UINT64_MAX;
    d->base.manifest = m;
    d->disk.size = m->size;
    d->disk.base = &d->base;
    d->src.read = chunk_read;
    d->src.ctx = d;
    return 0;
}

static void ext_disk_free(struct ext_disk *d)
{
    for (size_t i = 0; d->slots && i < d->nslots; i++)
        free(d->slots[i].data);
    free(d->slots);
    d->slots = NULL;
}

/* Returns the bytes of chunk idx (chunk_size bytes, zero-padded past the
 * disk's end), reading it through read_fn unless it is cached. */
static int cached_chunk(struct ext_disk *d, uint64_t idx, const unsigned char **out)
{
    struct chunk_slot *victim = &d->slots[0];
    for (size_t i = 0; i < d->nslots; i++) {
        struct chunk_slot *s = &d->slots[i];
        if (s->chunk == idx) {
            s->used = ++d->clock;
            *out = s->data;
            return 0;
        }
        if (s->used < victim->used)
            victim = s;
    }
    if (!victim->data && !(victim->data = malloc(d->m->chunk_size)))
        return -ENOMEM;
    victim->chunk = UINT64_MAX;
    uint64_t off = idx * d->m->chunk_size;
    uint64_t len = d->m->size - off < d->m->chunk_size ? d->m->size - off : d->m->chunk_size;
    memset(victim->data + len, 0, d->m->chunk_size - len);
    int rc = d->read_fn(d->ctx, victim->data, (size_t)len, off);
    if (rc < 0)
        return rc;
    if (rc > 0)
        return -EIO;
    victim->chunk = idx;
    victim->used = ++d->clock;
    *out = victim->data;
    return 0;
}

static int chunk_read(void *arg, const struct vm_base *base, uint64_t index, void *buf, size_t len,
                      uint64_t chunk_off)
{
    (void)base;
    const unsigned char *data;
    int rc = cached_chunk(arg, index, &data);
    if (rc < 0)
        return rc;
    memcpy(buf, data + chunk_off, len);
    return 0;
}

/* Reads len bytes at off; -ERANGE when the range is not inside the disk. */
static int ext_disk_read(struct ext_disk *d, void *buf, size_t len, uint64_t off)
{
    if (off > d->m->size || len > d->m->size - off)
        return -ERANGE;
    return disk_read(&d->disk, &d->src, buf, len, off);
}

/* ---- an io_manager for libext2fs over one partition of the disk ---- */

/* ext2fs_open() hands the io_manager only a name, so the name carries the
 * address of this (caller-owned) description of the partition. */
struct part_io {
    struct ext_disk *disk;
    uint64_t offset;
    int error; /* the last read error, as a positive errno */
};

#define IO_NAME_PREFIX "imgfs-extmap:"

static errcode_t io_open(const char *name, int flags, io_channel *channel);
static errcode_t io_close(io_channel channel);
static errcode_t io_set_blksize(io_channel channel, int blksize);
static errcode_t io_read_blk64(io_channel channel, unsigned long long block, int count, void *data);
static errcode_t io_read_blk(io_channel channel, unsigned long block, int count, void *data);
static errcode_t io_write_blk64(io_channel channel, unsigned long long block, int count, const void *data);
static errcode_t io_write_blk(io_channel channel, unsigned long block, int count, const void *data);
static errcode_t io_write_byte(io_channel channel, unsigned long offset, int count, const void *data);
static errcode_t io_flush(io_channel channel);
static errcode_t io_set_option(io_channel channel, const char *option, const char *arg);

static struct struct_io_manager extmap_io_manager = {
    .magic = EXT2_ET_MAGIC_IO_MANAGER,
    .name = "imgfs extmap I/O manager",
    .open = io_open,
    .close = io_close,
    .set_blksize = io_set_blksize,
    .read_blk = io_read_blk,
    .write_blk = io_write_blk,
    .flush = io_flush,
    .write_byte = io_write_byte,
    .set_option = io_set_option,
    .read_blk64 = io_read_blk64,
    .write_blk64 = io_write_blk64,
};

static errcode_t io_open(const char *name, int flags, io_channel *channel)
{
    uintptr_t addr = 0;
    if (!name || strncmp(name, IO_NAME_PREFIX, strlen(IO_NAME_PREFIX)) != 0 ||
        sscanf(name + strlen(IO_NAME_PREFIX), "%" SCNxPTR, &addr) != 1 || !addr)
        return EXT2_ET_BAD_DEVICE_NAME;
    if (flags & IO_FLAG_RW)
        return EROFS;
    io_channel io = calloc(1, sizeof(*io));
    char *copy = strdup(name);
    if (!io || !copy) {
        free(io);
        free(copy);
        return ENOMEM;
    }
    io->magic = EXT2_ET_MAGIC_IO_CHANNEL;
    io->manager = &extmap_io_manager;
    io->name = copy;
    io->block_size = 1024;
    io->refcount = 1;
    io->private_data = (void *)addr;
    *channel = io;
    return 0;
}

static errcode_t io_close(io_channel channel)
{
    if (--channel->refcount > 0)
        return 0;
    free(channel->name);
    free(channel);
    return 0;
}

static errcode_t io_set_blksize(io_channel channel, int blksize)
{
    if (blksize <= 0)
        return EXT2_ET_INVALID_ARGUMENT;
    channel->block_size = blksize;
    return 0;
}

static errcode_t io_read_blk64(io_channel channel, unsigned long long block, int count, void *data)
{
    struct part_io *part = channel->private_data;
    /* A negative count is a byte count (libext2fs convention). */
    uint64_t len = count < 0 ? (uint64_t)-(int64_t)count : (uint64_t)count * (uint64_t)channel->block_size;
    if (block > (UINT64_MAX - part->offset) / (uint64_t)channel->block_size || len > SIZE_MAX)
        return EXT2_ET_SHORT_READ;
    int rc = ext_disk_read(part->disk, data, (size_t)len, part->offset + block * (uint64_t)channel->block_size);
    if (rc == -ERANGE)
        return EXT2_ET_SHORT_READ; /* past the disk's end: a damaged or truncated filesystem */
    if (rc < 0) {
        part->error = -rc;
        return (errcode_t)-rc;
    }
    return 0;
}

static errcode_t io_read_blk(io_channel channel, unsigned long block, int count, void *data)
{
    return io_read_blk64(channel, block, count, data);
}

static errcode_t io_write_blk64(io_channel channel, unsigned long long block, int count, const void *data)
{
    (void)channel, (void)block, (void)count, (void)data;
    return EROFS;
}

static errcode_t io_write_blk(io_channel channel, unsigned long block, int count, const void *data)
{
    return io_write_blk64(channel, block, count, data);
}

static errcode_t io_write_byte(io_channel channel, unsigned long offset, int count, const void *data)
{
    (void)channel, (void)offset, (void)count, (void)data;
    return EROFS;
}

static errcode_t io_flush(io_channel channel)
{
    (void)channel;
    return 0;
}

static errcode_t io_set_option(io_channel channel, const char *option, const char *arg)
{
    (void)channel, (void)option, (void)arg;
    return EXT2_ET_INVALID_ARGUMENT;
}

/* libext2fs's messages live in libcom_err; these are the ones that matter
 * here, worded for an operator. */
static const char *ext2_error_text(errcode_t e, char *buf, size_t len)
{
    if (e > 0 && e < 4096)
        return strerror((int)e);
    switch (e) {
    case EXT2_ET_BAD_MAGIC: return "no ext2/3/4 superblock";
    case EXT2_ET_UNSUPP_FEATURE: return "the filesystem uses a feature this libext2fs does not support";
    case EXT2_ET_RO_UNSUPP_FEATURE: return "the filesystem uses a read-only feature this libext2fs does not support";
    case EXT2_ET_CORRUPT_SUPERBLOCK: return "the superblock is corrupt";
    case EXT2_ET_SB_CSUM_INVALID: return "the superblock checksum does not match";
    case EXT2_ET_GDESC_READ:
    case EXT2_ET_GDESC_BAD_BLOCK_MAP:
    case EXT2_ET_GDESC_BAD_INODE_MAP:
    case EXT2_ET_GDESC_BAD_INODE_TABLE: return "the group descriptors are corrupt";
    case EXT2_ET_BAD_DESC_SIZE: return "the group descriptor size is invalid";
    case EXT2_ET_UNEXPECTED_BLOCK_SIZE: return "the block size is unsupported";
    case EXT2_ET_SHORT_READ: return "the filesystem reaches past the end of the disk";
    case EXT2_ET_FILE_NOT_FOUND: return "no such file";
    case EXT2_ET_NO_DIRECTORY: return "a component of the path is not a directory";
    case EXT2_ET_SYMLINK_LOOP: return "too many levels of symbolic links";
    case EXT2_ET_DIR_CORRUPTED: return "a directory on the path is corrupt";
    case EXT2_ET_DIR_CSUM_INVALID: return "a directory checksum does not match";
    case EXT2_ET_INODE_CSUM_INVALID: return "the inode checksum does not match";
    case EXT2_ET_EXTENT_HEADER_BAD:
    case EXT2_ET_EXTENT_CSUM_INVALID: return "the file's extent tree is corrupt";
    case EXT2_ET_BAD_BLOCK_NUM: return "the file names a block outside the filesystem";
    default: snprintf(buf, len, "libext2fs error %ld", (long)e); return buf;
    }
}

/* A system errno from our io_manager (a failed read of the disk), as
 * opposed to something libext2fs found wrong with the filesystem. */
static bool is_io_error(errcode_t e)
{
    return e > 0 && e < 4096;
}

/* ---- text helpers ---- */

struct text {
    char *buf;
    size_t len, cap;
    unsigned lines, dropped;
};

#define MAX_WARNING_LINES 200

static void text_addf(struct text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void text_addf(struct text *t, const char *fmt, ...)
{
    if (t->lines >= MAX_WARNING_LINES) {
        t->dropped++;
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (t->len + (size_t)n + 2 > t->cap) {
        size_t cap = (t->cap ? t->cap * 2 : 256) + (size_t)n + 2;
        char *b = realloc(t->buf, cap);
        if (!b)
            return; /* a lost warning is not worth failing for */
        t->buf = b;
        t->cap = cap;
    }
    va_start(ap, fmt);
    vsnprintf(t->buf + t->len, t->cap - t->len, fmt, ap);
    va_end(ap);
    t->len += (size_t)n;
    t->buf[t->len++] = '\n';
    t->buf[t->len] = '\0';
    t->lines++;
}

/* Moves t's text (with a count of what was left out) into *out. */
static void text_finish(struct text *t, char **out)
{
    if (t->dropped) {
        unsigned dropped = t->dropped;
        t->lines = 0;
        t->dropped = 0;
        text_addf(t, "... and %u more warnings", dropped);
    }
    if (out) {
        *out = t->buf;
    } else {
        free(t->buf);
    }
    memset(t, 0, sizeof(*t));
}

/* ---- the paths ---- */

#define MAX_PATH_LEN 4095

struct path_list {
    char **paths;
    size_t count, cap;
};

static void paths_free(struct path_list *pl)
{
    for (size_t i = 0; i < pl->count; i++)
        free(pl->paths[i]);
    free(pl->paths);
}

static bool is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}

/* Splits text into paths: trims each line, skips blank lines and '#'
 * comments, and drops a trailing all-digit count ("/usr/bin/foo 12"). A
 * path may contain spaces; it may not end in a space-separated number. */
static int paths_parse(const char *text, struct path_list *pl, struct text *warn)
{
    unsigned line_no = 0;
    const char *p = text;
    while (*p) {
        const char *eol = strchr(p, '\n');
        const char *end = eol ? eol : p + strlen(p);
        line_no++;
        const char *s = p;
        p = eol ? eol + 1 : end;
        while (s < end && is_blank(*s))
            s++;
        const char *e = end;
        while (e > s && is_blank(e[-1]))
            e--;
        if (s == e || *s == '#')
            continue;
        const char *t = e;
        while (t > s && t[-1] >= '0' && t[-1] <= '9')
            t--;
        if (t < e && t > s && is_blank(t[-1])) {
            e = t;
            while (e > s && is_blank(e[-1]))
                e--;
        }
        size_t len = (size_t)(e - s);
        if (len > MAX_PATH_LEN) {
            text_addf(warn, "line %u: path longer than %u bytes, skipped", line_no, MAX_PATH_LEN);
            continue;
        }
        if (pl->count == pl->cap) {
            size_t cap = pl->cap ? pl->cap * 2 : 64;
            char **n = realloc(pl->paths, cap * sizeof(*n));
            if (!n)
                return -ENOMEM;
            pl->paths = n;
            pl->cap = cap;
        }
        if (!(pl->paths[pl->count] = strndup(s, len)))
            return -ENOMEM;
        pl->count++;
    }
    return 0;
}

/* ---- mapping the files of one filesystem ---- */

struct mapping {
    const struct disk *disk;
    uint64_t offset;    /* of the filesystem on the disk */
    size_t resolved;    /* paths that named a regular file */
    uint64_t *chunks;   /* in order of first use */
    uint64_t count, cap;
    uint8_t *seen;      /* bitmap over the manifest's chunks */
    struct text warn;
};

static void mapping_free(struct mapping *mp)
{
    free(mp->chunks);
    free(mp->seen);
    free(mp->warn.buf);
    memset(mp, 0, sizeof(*mp));
}

struct file_walk {
    const struct manifest *m;
    struct mapping *mp;
    unsigned blocksize;
    uint64_t nblocks; /* logical blocks below the file's size */
    bool past_end;    /* a block lies past the disk's end */
    int rc;
};

/* Adds the base chunk of one extent, unless it was added already. All-zero
 * chunks (zero extents) are never fetched, so never prefetched. */
static int add_extent(void *arg, const struct disk_extent *e)
{
    struct mapping *mp = arg;
    uint64_t c = e->chunk;
    if (e->kind != DISK_EXTENT_BASE || (mp->seen[c / 8] & (1u << (c % 8))))
        return 0;
    mp->seen[c / 8] |= (uint8_t)(1u << (c % 8));
    if (mp->count == mp->cap) {
        uint64_t cap = mp->cap ? mp->cap * 2 : 256;
        uint64_t *nc = realloc(mp->chunks, cap * sizeof(*nc));
        if (!nc)
            return -ENOMEM;
        mp->chunks = nc;
        mp->cap = cap;
    }
    mp->chunks[mp->count++] = c;
    return 0;
}

/* Adds the chunks that hold physical blocks [pblk, pblk + n). */
static int add_blocks(struct file_walk *w, uint64_t pblk, uint64_t n)
{
    const struct manifest *m = w->m;
    struct mapping *mp = w->mp;
    if (n == 0)
        return 0;
    if (pblk > (m->size - mp->offset) / w->blocksize) {
        w->past_end = true;
        return 0;
    }
    uint64_t start = mp->offset + pblk * w->blocksize;
    uint64_t bytes = n > (m->size - start) / w->blocksize ? m->size - start : n * w->blocksize;
    if (bytes < n * w->blocksize)
        w->past_end = true;
    if (bytes == 0)
        return 0;
    return disk_map(mp->disk, start, bytes, add_extent, mp);
}

static int block_cb(ext2_filsys fs, blk64_t *blocknr, e2_blkcnt_t blockcnt, blk64_t ref_blk, int ref_offset,
                    void *priv)
{
    (void)fs, (void)ref_blk, (void)ref_offset;
    struct file_walk *w = priv;
    if (blockcnt < 0 || (uint64_t)blockcnt >= w->nblocks || *blocknr == 0)
        return 0;
    w->rc = add_blocks(w, *blocknr, 1);
    return w->rc < 0 ? BLOCK_ABORT : 0;
}

/* Walks the leaves of an extent tree in logical order, leaving out
 * uninitialised extents (they read as zeros without touching the disk). */
static errcode_t walk_extents(ext2_filsys fs, ext2_ino_t ino, struct ext2_inode *inode, struct file_walk *w)
{
    ext2_extent_handle_t h;
    errcode_t e = ext2fs_extent_open2(fs, ino, inode, &h);
    if (e)
        return e;
    struct ext2fs_extent ext;
    e = ext2fs_extent_get(h, EXT2_EXTENT_ROOT, &ext);
    while (!e) {
        if ((ext.e_flags & EXT2_EXTENT_FLAGS_LEAF) && !(ext.e_flags & EXT2_EXTENT_FLAGS_UNINIT) &&
            ext.e_lblk < w->nblocks) {
            uint64_t n = ext.e_len < w->nblocks - ext.e_lblk ? ext.e_len : w->nblocks - ext.e_lblk;
            if ((w->rc = add_blocks(w, ext.e_pblk, n)) < 0)
                break;
        }
        e = ext2fs_extent_get(h, EXT2_EXTENT_NEXT, &ext);
    }
    ext2fs_extent_free(h);
    return e == EXT2_ET_EXTENT_NO_NEXT ? 0 : e;
}

/* Resolves one path and adds its file's chunks. Returns 0 (resolved), 1
 * (skipped with a warning), or a negative errno for a fatal error. */
static int map_path(ext2_filsys fs, const struct manifest *m, struct mapping *mp, const char *path,
                    char *err, size_t errlen)
{
    char buf[64];
    ext2_ino_t ino;
    errcode_t e = ext2fs_namei(fs, EXT2_ROOT_INO, EXT2_ROOT_INO, path, &ino);
    struct ext2_inode inode;
    if (!e)
        e = ext2fs_read_inode(fs, ino, &inode);
    if (is_io_error(e))
        goto io_error;
    if (e) {
        text_addf(&mp->warn, "%s: %s, skipped", path, ext2_error_text(e, buf, sizeof(buf)));
        return 1;
    }
    if (LINUX_S_ISLNK(inode.i_mode)) {
        text_addf(&mp->warn, "%s: is a symbolic link, skipped (list its target instead)", path);
        return 1;
    }
    if (LINUX_S_ISDIR(inode.i_mode)) {
        text_addf(&mp->warn, "%s: is a directory, skipped", path);
        return 1;
    }
    if (!LINUX_S_ISREG(inode.i_mode)) {
        text_addf(&mp->warn, "%s: is not a regular file, skipped", path);
        return 1;
    }
    if (inode.i_flags & EXT4_INLINE_DATA_FL)
        return 0; /* the data lives in the inode itself */
    struct file_walk w = {.m = m, .mp = mp, .blocksize = fs->blocksize};
    w.nblocks = EXT2_I_SIZE(&inode) / fs->blocksize + (EXT2_I_SIZE(&inode) % fs->blocksize != 0);
    if (inode.i_flags & EXT4_EXTENTS_FL)
        e = walk_extents(fs, ino, &inode, &w);
    else
        e = ext2fs_block_iterate3(fs, ino, BLOCK_FLAG_READ_ONLY | BLOCK_FLAG_DATA_ONLY, NULL, block_cb, &w);
    if (w.rc < 0) {
        snprintf(err, errlen, "out of memory while mapping %s", path);
        return w.rc;
    }
    if (is_io_error(e))
        goto io_error;
    if (e) {
        text_addf(&mp->warn, "%s: %s, skipped", path, ext2_error_text(e, buf, sizeof(buf)));
        return 1;
    }
    if (w.past_end)
        text_addf(&mp->warn, "%s: some of its blocks lie past the end of the disk (damaged filesystem?)", path);
    return 0;
io_error:
    snprintf(err, errlen, "cannot read the disk of %s@%" PRIu64 " while looking up %s: %s", m->name, m->version,
             path, strerror((int)e));
    return -(int)e;
}

/* Opens the ext filesystem at offset and maps every path. Returns 0, 1 when
 * the filesystem cannot be opened (reason in err), or a negative errno. */
static int map_filesystem(struct ext_disk *d, uint64_t offset, const struct path_list *pl, struct mapping *mp,
                          char *err, size_t errlen)
{
    const struct manifest *m = d->m;
    memset(mp, 0, sizeof(*mp));
    mp->disk = &d->disk;
    mp->offset = offset;
    if (!(mp->seen = calloc(m->chunk_count / 8 + 1, 1)))
        return -ENOMEM;
    struct part_io part = {.disk = d, .offset = offset};
    char name[64];
    snprintf(name, sizeof(name), IO_NAME_PREFIX "%" PRIxPTR, (uintptr_t)&part);
    ext2_filsys fs = NULL;
    errcode_t e = ext2fs_open(name, EXT2_FLAG_64BITS, 0, 0, &extmap_io_manager, &fs);
    if (e) {
        char buf[64];
        if (is_io_error(e)) {
            snprintf(err, errlen, "cannot read the disk of %s@%" PRIu64 ": %s", m->name, m->version,
                     strerror((int)e));
            return -(int)e;
        }
        snprintf(err, errlen, "cannot open the ext filesystem at byte %" PRIu64 " of %s@%" PRIu64 ": %s", offset,
                 m->name, m->version, ext2_error_text(e, buf, sizeof(buf)));
        return 1;
    }
    /* A filesystem whose root directory cannot be read is refused as a
     * whole rather than with the same warning for every path. */
    struct ext2_inode root;
    e = ext2fs_read_inode(fs, EXT2_ROOT_INO, &root);
    if (!e && !LINUX_S_ISDIR(root.i_mode))
        e = EXT2_ET_NO_DIRECTORY;
    if (e) {
        char buf[64];
        ext2fs_free(fs);
        if (is_io_error(e)) {
            snprintf(err, errlen, "cannot read the disk of %s@%" PRIu64 ": %s", m->name, m->version,
                     strerror((int)e));
            return -(int)e;
        }
        snprintf(err, errlen, "the ext filesystem at byte %" PRIu64 " of %s@%" PRIu64 " is damaged: %s", offset,
                 m->name, m->version,
                 e == EXT2_ET_NO_DIRECTORY ? "its root is not a directory" : ext2_error_text(e, buf, sizeof(buf)));
        return 1;
    }
    int rc = 0;
    for (size_t i = 0; i < pl->count; i++) {
        rc = map_path(fs, m, mp, pl->paths[i], err, errlen);
        if (rc < 0)
            break;
        if (rc == 0)
            mp->resolved++;
        rc = 0;
    }
    ext2fs_free(fs);
    return rc;
}

/* ---- finding the filesystem: bare disk, MBR or GPT ---- */

#define MAX_CANDIDATES 64
#define MAX_GPT_ENTRIES 1024
#define MAX_LOGICAL_PARTITIONS 128

struct candidates {
    uint64_t offsets[MAX_CANDIDATES];
    size_t count;
    uint64_t starts[MAX_CANDIDATES]; /* every partition start seen, to name what is there instead */
    size_t nstarts;
};

static uint16_t le16(const unsigned char *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p)
{
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

/* Reads len bytes at off: 1 when read, 0 when outside the disk, or -errno. */
static int read_if_inside(struct ext_disk *d, void *buf, size_t len, uint64_t off)
{
    int rc = ext_disk_read(d, buf, len, off);
    return rc == -ERANGE ? 0 : rc < 0 ? rc : 1;
}

/* 1 when an ext2/3/4 superblock starts 1024 bytes into offset. */
static int has_ext_magic(struct ext_disk *d, uint64_t offset)
{
    unsigned char sb[1024];
    if (offset > UINT64_MAX - 2048)
        return 0;
    int rc = read_if_inside(d, sb, sizeof(sb), offset + 1024);
    if (rc <= 0)
        return rc;
    /* s_magic at 56, s_log_block_size at 24 (block size 1 KiB << it, at most 64 KiB) */
    return le16(sb + 56) == EXT2_SUPER_MAGIC && le32(sb + 24) <= 6;
}

static int consider(struct ext_disk *d, struct candidates *c, uint64_t offset)
{
    for (size_t i = 0; i < c->count; i++)
        if (c->offsets[i] == offset)
            return 0;
    if (c->nstarts < MAX_CANDIDATES)
        c->starts[c->nstarts++] = offset;
    int rc = has_ext_magic(d, offset);
    if (rc > 0 && c->count < MAX_CANDIDATES)
        c->offsets[c->count++] = offset;
    return rc < 0 ? rc : 0;
}

/* GPT with logical sectors of ss bytes: 1 when found, 0 when not, -errno. */
static int scan_gpt(struct ext_disk *d, struct candidates *c, uint32_t ss)
{
    unsigned char hdr[92];
    int rc = read_if_inside(d, hdr, sizeof(hdr), ss);
    if (rc <= 0)
        return rc;
    if (memcmp(hdr, "EFI PART", 8) != 0)
        return 0;
    uint64_t lba = le64(hdr + 72);
    uint32_t n = le32(hdr + 80), esize = le32(hdr + 84);
    if (esize < 128 || esize > 4096 || esize % 8 || lba == 0 || lba > UINT64_MAX / ss)
        return 0;
    if (n > MAX_GPT_ENTRIES)
        n = MAX_GPT_ENTRIES;
    unsigned char *entries = malloc((size_t)n * esize + 1);
    if (!entries)
        return -ENOMEM;
    rc = read_if_inside(d, entries, (size_t)n * esize, lba * ss);
    static const unsigned char unused[16];
    for (uint32_t i = 0; rc > 0 && i < n; i++) {
        const unsigned char *e = entries + (size_t)i * esize;
        uint64_t first = le64(e + 32);
        if (memcmp(e, unused, 16) == 0 || first == 0 || first > UINT64_MAX / ss)
            continue;
        int r = consider(d, c, first * ss);
        if (r < 0)
            rc = r;
    }
    free(entries);
    return rc < 0 ? rc : 1;
}

static bool mbr_extended(unsigned type)
{
    return type == 0x05 || type == 0x0f || type == 0x85;
}

/* MBR, with logical partitions in an extended one: 1 when found, 0, -errno. */
static int scan_mbr(struct ext_disk *d, struct candidates *c, const unsigned char *mbr)
{
    if (mbr[510] != 0x55 || mbr[511] != 0xaa)
        return 0;
    /* A boot sector of a filesystem also ends in 55 AA; a partition table
     * has only 0x00 or 0x80 as the status bytes. */
    for (int i = 0; i < 4; i++) {
        unsigned status = mbr[446 + i * 16];
        if (status != 0x00 && status != 0x80)
            return 0;
    }
    bool any = false;
    for (int i = 0; i < 4; i++) {
        const unsigned char *e = mbr + 446 + i * 16;
        unsigned type = e[4];
        uint64_t start = le32(e + 8);
        if (type == 0 || start == 0 || le32(e + 12) == 0)
            continue;
        any = true;
        if (!mbr_extended(type)) {
            int rc = consider(d, c, start * 512);
            if (rc < 0)
                return rc;
            continue;
        }
        /* A chain of extended boot records, each naming one logical
         * partition (relative to itself) and the next record (relative to
         * the extended partition). */
        uint64_t ebr = start;
        for (int n = 0; n < MAX_LOGICAL_PARTITIONS && ebr; n++) {
            unsigned char sec[512];
            int rc = read_if_inside(d, sec, sizeof(sec), ebr * 512);
            if (rc < 0)
                return rc;
            if (rc == 0 || sec[510] != 0x55 || sec[511] != 0xaa)
                break;
            const unsigned char *l = sec + 446, *next = sec + 462;
            if (l[4] != 0 && le32(l + 8) != 0 && (rc = consider(d, c, (ebr + le32(l + 8)) * 512)) < 0)
                return rc;
            uint64_t nebr = mbr_extended(next[4]) && le32(next + 8) ? start + le32(next + 8) : 0;
            ebr = nebr > ebr ? nebr : 0; /* forward only: no loops */
        }
    }
    return any ? 1 : 0;
}

static int find_candidates(struct ext_disk *d, struct candidates *c)
{
    memset(c, 0, sizeof(*c));
    unsigned char mbr[512];
    int rc = read_if_inside(d, mbr, sizeof(mbr), 0);
    if (rc <= 0)
        return rc;
    rc = scan_gpt(d, c, 512);
    if (rc == 0)
        rc = scan_gpt(d, c, 4096);
    if (rc == 0)
        rc = scan_mbr(d, c, mbr);
    if (rc < 0)
        return rc;
    if (c->count == 0)
        rc = consider(d, c, 0);
    return rc < 0 ? rc : 0;
}

/* Names a filesystem or volume that is not ext, for a clearer refusal. */
static const char *sniff(struct ext_disk *d, uint64_t off)
{
    static const struct {
        uint64_t at;
        const char *magic;
        size_t len;
        const char *what;
    } sigs[] = {
        {0, "XFSB", 4, "an XFS filesystem"},
        {0x10040, "_BHRfS_M", 8, "a Btrfs filesystem"},
        {0, "LUKS\xba\xbe", 6, "a LUKS encrypted volume"},
        {512, "LABELONE", 8, "an LVM physical volume"},
        {3, "NTFS    ", 8, "an NTFS filesystem"},
        {3, "EXFAT   ", 8, "an exFAT filesystem"},
        {0x36, "FAT1", 4, "a FAT filesystem"},
        {0x52, "FAT32   ", 8, "a FAT filesystem"},
        {1024, "\x10\x20\xf5\xf2", 4, "an F2FS filesystem"},
        {4086, "SWAPSPACE2", 10, "a swap area"},
        {0x8001, "CD001", 5, "an ISO 9660 filesystem"},
    };
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++) {
        char buf[16];
        if (off <= UINT64_MAX - sigs[i].at - 16 && read_if_inside(d, buf, sigs[i].len, off + sigs[i].at) > 0 &&
            memcmp(buf, sigs[i].magic, sigs[i].len) == 0)
            return sigs[i].what;
    }
    return NULL;
}

/* ---- the whole job ---- */

int extmap_paths_to_list(const struct manifest *m, extmap_read_fn read_fn, void *ctx, const char *paths_text,
                         struct chunk_list **out, char **warnings, char *err, size_t errlen)
{
    *out = NULL;
    if (warnings)
        *warnings = NULL;
    if (!m || !read_fn || !paths_text || !m->chunk_size || m->chunk_count * m->chunk_size < m->size) {
        snprintf(err, errlen, "invalid arguments to list from-files");
        return -EINVAL;
    }
    struct text warn = {0};
    struct path_list pl = {0};
    struct ext_disk d;
    struct candidates cands;
    struct mapping best = {0}, cur;
    char first_err[256] = "";
    size_t opened = 0;
    int rc = ext_disk_init(&d, m, read_fn, ctx);
    if (rc < 0) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    if ((rc = paths_parse(paths_text, &pl, &warn)) < 0) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    if (pl.count == 0) {
        snprintf(err, errlen, "the list of files names no path (only blank lines and comments)");
        rc = -EINVAL;
        goto out;
    }
    if ((rc = find_candidates(&d, &cands)) < 0) {
        snprintf(err, errlen, "cannot read the disk of %s@%" PRIu64 ": %s", m->name, m->version, strerror(-rc));
        goto out;
    }
    if (cands.count == 0) {
        const char *what = NULL;
        uint64_t where = 0;
        for (size_t i = 0; !what && i < cands.nstarts; i++)
            what = sniff(&d, where = cands.starts[i]);
        if (what)
            snprintf(err, errlen,
                     "%s@%" PRIu64 " holds %s at byte %" PRIu64 ", not ext2/3/4, the only filesystem "
                     "list from-files can read",
                     m->name, m->version, what, where);
        else
            snprintf(err, errlen,
                     "%s@%" PRIu64 " holds no ext2/3/4 filesystem, neither on the bare disk nor in an MBR or "
                     "GPT partition",
                     m->name, m->version);
        rc = -EINVAL;
        goto out;
    }
    /* With several ext filesystems (say /boot and /), keep the one in which
     * the most paths resolve; the first one on a tie. */
    for (size_t i = 0; i < cands.count; i++) {
        rc = map_filesystem(&d, cands.offsets[i], &pl, &cur, err, errlen);
        if (rc < 0) {
            mapping_free(&cur);
            goto out;
        }
        if (rc == 1) {
            if (!first_err[0])
                snprintf(first_err, sizeof(first_err), "%s", err);
            mapping_free(&cur);
            continue;
        }
        if (opened++ == 0 || cur.resolved > best.resolved) {
            mapping_free(&best);
            best = cur;
        } else {
            mapping_free(&cur);
        }
    }
    rc = 0;
    if (opened == 0) {
        snprintf(err, errlen, "%s", first_err);
        rc = -EINVAL;
        goto out;
    }
    if (first_err[0])
        text_addf(&warn, "%s", first_err);
    if (best.warn.buf) {
        /* The chosen filesystem's warnings, after the parser's. */
        char *line = best.warn.buf;
        while (*line) {
            char *nl = strchr(line, '\n');
            if (nl)
                *nl = '\0';
            text_addf(&warn, "%s", line);
            if (!nl)
                break;
            line = nl + 1;
        }
        warn.dropped += best.warn.dropped;
    }
    if (best.resolved == 0) {
        snprintf(err, errlen, "none of the %zu paths names a regular file in the filesystem of %s@%" PRIu64,
                 pl.count, m->name, m->version);
        rc = -ENOENT;
        goto out;
    }
    struct chunk_list *list = calloc(1, sizeof(*list));
    if (!list) {
        snprintf(err, errlen, "out of memory");
        rc = -ENOMEM;
        goto out;
    }
    snprintf(list->base_name, sizeof(list->base_name), "%s", m->name);
    list->base_version = m->version;
    list->base_id = m->id;
    list->chunk_size = m->chunk_size;
    list->count = best.count;
    list->chunks = best.chunks ? best.chunks : calloc(1, sizeof(*list->chunks));
    best.chunks = NULL;
    if (!list->chunks) {
        free(list);
        snprintf(err, errlen, "out of memory");
        rc = -ENOMEM;
        goto out;
    }
    *out = list;
out:
    text_finish(&warn, warnings);
    mapping_free(&best);
    paths_free(&pl);
    ext_disk_free(&d);
    return rc;
}
