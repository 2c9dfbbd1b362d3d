#include "image.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <libqcow.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow2map.h"
#include "util.h"

/* A chain of qcow files more than this deep is refused (and catches loops). */
#define MAX_BACKING_DEPTH 16

/* A piece of the virtual disk that may hold data, and the file of the
 * chain that holds it (0: the top). */
struct extent {
    uint64_t start, end;
    int file;
    uint64_t host; /* plain clusters: start's offset in that file; 0: through libqcow */
};

struct image {
    uint64_t size;
    int fd;                     /* raw images */
    libqcow_file_t *qcow_chain[MAX_BACKING_DEPTH]; /* [0] is the top image */
    char *qcow_paths[MAX_BACKING_DEPTH];           /* owned, resolved */
    int qcow_fds[MAX_BACKING_DEPTH];               /* owned: plain clusters are read directly */
    int qcow_depth;
    char format[32];
    char *path; /* owned, as given to image_open */
    /* qcow images: where data may be, sorted and disjoint; immutable once
     * image_open returns, so any thread may search it. */
    struct extent *extents;
    size_t extent_count;
    const char *map_source;
};

uint64_t image_size(const struct image *img) { return img->size; }
const char *image_format(const struct image *img) { return img->format; }

static void qcow_error_text(libqcow_error_t *qerr, char *out, size_t len)
{
    out[0] = '\0';
    if (qerr) {
        libqcow_error_sprint(qerr, out, len);
        libqcow_error_free(&qerr);
    }
    /* libqcow's messages are multi-line backtraces; keep the first line. */
    char *nl = strchr(out, '\n');
    if (nl)
        *nl = '\0';
}

static const char *foreign_format(const unsigned char *head, size_t len)
{
    if (len >= 4 && memcmp(head, "KDMV", 4) == 0)
        return "VMDK";
    if (len >= 8 && memcmp(head, "vhdxfile", 8) == 0)
        return "VHDX";
    if (len >= 8 && memcmp(head, "conectix", 8) == 0)
        return "VHD";
    if (len >= 4 && memcmp(head, "QED\0", 4) == 0)
        return "QED";
    if (len >= 0x44 && memcmp(head + 0x40, "\x7f\x10\xda\xbe", 4) == 0)
        return "VDI";
    return NULL;
}

void image_close(struct image *img)
{
    if (!img)
        return;
    for (int i = 0; i < img->qcow_depth; i++) {
        libqcow_file_close(img->qcow_chain[i], NULL);
        libqcow_file_free(&img->qcow_chain[i], NULL);
        free(img->qcow_paths[i]);
        if (img->qcow_fds[i] >= 0)
            close(img->qcow_fds[i]);
    }
    if (img->fd >= 0)
        close(img->fd);
    free(img->extents);
    free(img->path);
    free(img);
}

static int is_qcow(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    unsigned char magic[4];
    ssize_t n = pread(fd, magic, sizeof(magic), 0);
    close(fd);
    return n == 4 && memcmp(magic, "QFI\xfb", 4) == 0;
}

/* Opens one qcow file of the chain and, if it has a backing file, recurses. */
static int open_qcow_chain(struct image *img, const char *path, char *err, size_t errlen)
{
    if (img->qcow_depth >= MAX_BACKING_DEPTH) {
        snprintf(err, errlen, "backing chain of %s is deeper than %d files (or loops)", path,
                 MAX_BACKING_DEPTH);
        return -ELOOP;
    }
    libqcow_error_t *qerr = NULL;
    libqcow_file_t *file = NULL;
    char why[256];
    if (libqcow_file_initialize(&file, &qerr) != 1) {
        qcow_error_text(qerr, why, sizeof(why));
        snprintf(err, errlen, "cannot initialise libqcow: %s", why);
        return -ENOMEM;
    }
    if (libqcow_file_open(file, path, LIBQCOW_OPEN_READ, &qerr) != 1) {
        qcow_error_text(qerr, why, sizeof(why));
        libqcow_file_free(&file, NULL);
        snprintf(err, errlen, "%s is not a readable qcow2 image (damaged or truncated?): %s", path, why);
        return -EINVAL;
    }
    img->qcow_paths[img->qcow_depth] = strdup(path);
    img->qcow_fds[img->qcow_depth] = open(path, O_RDONLY | O_CLOEXEC);
    img->qcow_chain[img->qcow_depth++] = file;
    if (!img->qcow_paths[img->qcow_depth - 1] || img->qcow_fds[img->qcow_depth - 1] < 0) {
        int rc = img->qcow_paths[img->qcow_depth - 1] ? -errno : -ENOMEM;
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(-rc));
        return rc;
    }

    uint32_t encryption = 0;
    if (libqcow_file_get_encryption_method(file, &encryption, NULL) == 1 && encryption != 0) {
        snprintf(err, errlen, "%s is encrypted; decrypt it with qemu-img convert before publishing", path);
        return -EINVAL;
    }

    size_t name_size = 0;
    if (libqcow_file_get_utf8_backing_filename_size(file, &name_size, NULL) != 1 || name_size <= 1)
        return 0; /* no backing file */
    if (name_size > PATH_MAX) {
        snprintf(err, errlen, "%s names an absurdly long backing file", path);
        return -ENAMETOOLONG;
    }
    char backing[PATH_MAX];
    if (libqcow_file_get_utf8_backing_filename(file, (uint8_t *)backing, name_size, &qerr) != 1) {
        qcow_error_text(qerr, why, sizeof(why));
        snprintf(err, errlen, "cannot read the backing file name of %s: %s", path, why);
        return -EINVAL;
    }
    char resolved[PATH_MAX];
    if (backing[0] == '/') {
        snprintf(resolved, sizeof(resolved), "%s", backing);
    } else {
        char dir[PATH_MAX];
        snprintf(dir, sizeof(dir), "%s", path);
        if (path_join(resolved, sizeof(resolved), "%s/%s", dirname(dir), backing)) {
            snprintf(err, errlen, "backing file path of %s is too long", path);
            return -ENAMETOOLONG;
        }
    }
    int q = is_qcow(resolved);
    if (q < 0) {
        snprintf(err, errlen, "backing file %s of %s cannot be opened: %s", resolved, path, strerror(-q));
        return q;
    }
    if (!q) {
        snprintf(err, errlen,
                 "backing file %s of %s is not qcow2; flatten the image with "
                 "'qemu-img convert -O qcow2' before publishing",
                 resolved, path);
        return -ENOTSUP;
    }
    int rc = open_qcow_chain(img, resolved, err, errlen);
    if (rc)
        return rc;
    if (libqcow_file_set_parent_file(file, img->qcow_chain[img->qcow_depth - 1], &qerr) != 1) {
        qcow_error_text(qerr, why, sizeof(why));
        snprintf(err, errlen, "cannot attach backing file %s: %s", resolved, why);
        return -EINVAL;
    }
    return 0;
}

/* Builds img->extents from the L1/L2 tables of every file of the chain,
 * bottom first. When a file's tables cannot be read here, every byte is
 * taken as data, and reading finds out whether the image is sound. */
static int map_qcow_chain(struct image *img)
{
    struct qcow2map below = {0}, file, seen;
    int rc = 0;
    for (int i = img->qcow_depth - 1; i >= 0 && !rc; i--) {
        rc = qcow2map_read(img->qcow_paths[i], &file);
        if (rc)
            break;
        rc = qcow2map_overlay(&file, &below, &seen);
        qcow2map_free(&file);
        qcow2map_free(&below);
        below = seen;
    }
    if (rc == -ENOMEM) {
        qcow2map_free(&below);
        return rc;
    }
    if (rc) {
        qcow2map_free(&below);
        img->extents = malloc(sizeof(*img->extents));
        if (!img->extents)
            return -ENOMEM;
        img->extents[0] = (struct extent){0, img->size, 0, 0};
        img->extent_count = 1;
        img->map_source = "none";
        return 0;
    }
    img->extents = malloc((below.count + 1) * sizeof(*img->extents));
    if (!img->extents) {
        qcow2map_free(&below);
        return -ENOMEM;
    }
    for (size_t i = 0; i < below.count; i++)
        if (below.runs[i].state == QCOW2MAP_DATA && below.runs[i].start < img->size)
            img->extents[img->extent_count++] = (struct extent){
                below.runs[i].start, below.runs[i].end < img->size ? below.runs[i].end : img->size,
                (int)below.runs[i].file, below.runs[i].host};
    qcow2map_free(&below);
    img->map_source = "qcow2 tables";
    return 0;
}

int image_open(const char *path, struct image **out, char *err, size_t errlen)
{
    struct image *img = calloc(1, sizeof(*img));
    if (!img) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    img->path = strdup(path);
    img->fd = img->path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (img->fd < 0) {
        int rc = img->path ? -errno : -ENOMEM;
        snprintf(err, errlen, "cannot open image %s: %s", path, strerror(-rc));
        free(img->path);
        free(img);
        return rc;
    }
    struct stat st;
    unsigned char head[512];
    ssize_t n = fstat(img->fd, &st) == 0 ? pread(img->fd, head, sizeof(head), 0) : -1;
    int rc = 0;
    if (n < 0) {
        rc = -errno;
        snprintf(err, errlen, "cannot read image %s: %s", path, strerror(errno));
    } else if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
        rc = -EINVAL;
        snprintf(err, errlen, "image %s is not a regular file or block device", path);
    } else if (n == 0) {
        rc = -EINVAL;
        snprintf(err, errlen, "image %s is empty", path);
    } else if (foreign_format(head, (size_t)n)) {
        rc = -ENOTSUP;
        snprintf(err, errlen, "image %s is %s, which imgfs does not read; convert it with 'qemu-img convert -O qcow2'",
                 path, foreign_format(head, (size_t)n));
    } else if (n >= 4 && memcmp(head, "QFI\xfb", 4) == 0) {
        close(img->fd);
        img->fd = -1;
        rc = open_qcow_chain(img, path, err, errlen);
        size64_t media = 0;
        if (!rc && libqcow_file_get_media_size(img->qcow_chain[0], &media, NULL) != 1) {
            rc = -EINVAL;
            snprintf(err, errlen, "cannot read the virtual size of %s", path);
        }
        img->size = media;
        snprintf(img->format, sizeof(img->format), "%s", img->qcow_depth > 1 ? "qcow2+backing" : "qcow2");
        if (!rc && (rc = map_qcow_chain(img)) != 0)
            snprintf(err, errlen, "out of memory");
    } else {
        if (S_ISBLK(st.st_mode)) {
            off_t end = lseek(img->fd, 0, SEEK_END);
            img->size = end > 0 ? (uint64_t)end : 0;
        } else {
            img->size = (uint64_t)st.st_size;
        }
        snprintf(img->format, sizeof(img->format), "raw");
        img->map_source = "SEEK_DATA";
    }
    if (rc) {
        image_close(img);
        return rc;
    }
    *out = img;
    return 0;
}

/* The index of the first extent that ends after off (extent_count if none). */
static size_t extent_after(const struct image *img, uint64_t off)
{
    size_t lo = 0, hi = img->extent_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (img->extents[mid].end <= off)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int qcow_read(libqcow_file_t *file, char *p, size_t len, uint64_t off)
{
    while (len > 0) {
        ssize_t n = libqcow_file_read_buffer_at_offset(file, p, len, (off64_t)off, NULL);
        if (n <= 0)
            return -EIO;
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

/* Plain clusters straight from the file; past its end (a last cluster
 * that qemu did not write out whole) they read as zeros, as in qemu. */
static int read_host(int fd, char *p, size_t len, uint64_t host)
{
    while (len > 0) {
        ssize_t n = pread(fd, p, len, (off_t)host);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0) {
            memset(p, 0, len);
            return 0;
        }
        p += n;
        len -= (size_t)n;
        host += (uint64_t)n;
    }
    return 0;
}

int image_read(struct image *img, void *buf, size_t len, uint64_t off)
{
    if (off > img->size || len > img->size - off)
        return -EINVAL;
    if (img->qcow_depth == 0) {
        int rc = read_full_at(img->fd, buf, len, (off_t)off);
        return rc == -ENODATA ? -EIO : rc;
    }
    /* Each extent is read from the file that holds it, so libqcow never
     * resolves a cluster through a backing file: it would ignore a zero
     * cluster over backing data, misread compressed clusters of a backing
     * file, and spin at the end of a backing file smaller than the top.
     * The rest is zeros. */
    char *p = buf;
    uint64_t end = off + len;
    for (size_t i = extent_after(img, off); off < end; i++) {
        uint64_t data = i < img->extent_count && img->extents[i].start < end ? img->extents[i].start : end;
        if (data > off) {
            memset(p, 0, (size_t)(data - off));
            p += data - off;
            off = data;
        }
        if (off == end)
            break;
        const struct extent *e = &img->extents[i];
        uint64_t stop = e->end < end ? e->end : end;
        int rc = e->host ? read_host(img->qcow_fds[e->file], p, (size_t)(stop - off), e->host + (off - e->start))
                         : qcow_read(img->qcow_chain[e->file], p, (size_t)(stop - off), off);
        if (rc)
            return rc;
        p += stop - off;
        off = stop;
    }
    return 0;
}

int image_reopen(const struct image *img, struct image **out, char *err, size_t errlen)
{
    return image_open(img->path, out, err, errlen);
}

const char *image_map_source(const struct image *img) { return img->map_source; }

/* Raw images ask the file system; one that cannot tell (or a block device)
 * has data everywhere. */
static int raw_next_data(const struct image *img, uint64_t off, uint64_t *start, uint64_t *end)
{
    off_t data = lseek(img->fd, (off_t)off, SEEK_DATA);
    if (data < 0 && errno == ENXIO)
        return -ENXIO;
    if (data < 0) {
        *start = off;
        *end = img->size;
        return 0;
    }
    off_t hole = lseek(img->fd, data, SEEK_HOLE);
    *start = (uint64_t)data;
    *end = hole < 0 || (uint64_t)hole > img->size ? img->size : (uint64_t)hole;
    return *start < *end ? 0 : -ENXIO;
}

void image_prefetch(struct image *img, uint64_t off, uint64_t len)
{
    if (img->qcow_depth != 0 || off >= img->size)
        return;
    uint64_t to = len < img->size - off ? off + len : img->size;
    uint64_t start, end;
    /* Holes are left out: the kernel would fill the page cache with zeros. */
    for (; off < to && raw_next_data(img, off, &start, &end) == 0 && start < to; off = end)
        (void)posix_fadvise(img->fd, (off_t)start, (off_t)((end < to ? end : to) - start),
                            POSIX_FADV_WILLNEED); /* a hint: its failure changes nothing */
}

int image_next_data(const struct image *img, uint64_t off, uint64_t *start, uint64_t *end)
{
    if (off >= img->size)
        return -ENXIO;
    if (img->qcow_depth == 0)
        return raw_next_data(img, off, start, end);
    size_t lo = extent_after(img, off);
    if (lo == img->extent_count)
        return -ENXIO;
    *start = img->extents[lo].start > off ? img->extents[lo].start : off;
    *end = img->extents[lo].end;
    return 0;
}
