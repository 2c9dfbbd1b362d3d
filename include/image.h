/* image: reads the virtual disk of a source image for publishing.
 *
 * The format is detected from the content, never from the file name:
 *  - qcow2 (and qcow v1) through libqcow, including compressed clusters.
 *    A backing file is followed (relative names resolve against the image's
 *    directory) when it is itself qcow; any other backing format is refused.
 *  - Known container formats that are not raw (VMDK, VHD/VHDX, VDI, QED) are
 *    refused with a hint to convert them, so their headers are never
 *    published as disk bytes.
 *  - Anything else is a raw disk image.
 *
 * Allocation: image_next_data() tells where the image may hold data, so that
 * the rest is known to read as zeros without reading it. Raw images ask the
 * file system (SEEK_DATA/SEEK_HOLE); qcow2 images use the L1/L2 tables of
 * every file of the chain (qcow2map.h), read once at open. Where neither
 * can tell (a block device, qcow v1, subclusters), everything is data.
 * A qcow2 image is read through that map: each allocated range from the
 * file of the chain that holds it (plain clusters with pread, compressed
 * ones through libqcow), the rest as zeros, so libqcow never
 * resolves a cluster through a backing file (where it ignores zero clusters
 * and misreads compressed ones).
 *
 * Contract: image_read() is for one thread at a time per image; a second
 * thread opens its own reader with image_reopen(). image_size(),
 * image_format() and image_next_data() may be called from any thread.
 * image_close() frees an image.
 */
#ifndef IMGFS_IMAGE_H
#define IMGFS_IMAGE_H

#include <stddef.h>
#include <stdint.h>

struct image;

int image_open(const char *path, struct image **out, char *err, size_t errlen);
void image_close(struct image *img);

uint64_t image_size(const struct image *img);
/* "raw" or "qcow2" (or "qcow2+backing"). */
const char *image_format(const struct image *img);

/* Reads len bytes at off; the range must lie within the image. Returns 0 or
 * a negative errno (-EIO for an unreadable or truncated image). */
int image_read(struct image *img, void *buf, size_t len, uint64_t off);

/* Asks the kernel to start reading the data (not the holes) of
 * [off, off + len) of a raw image into the page cache, and returns without
 * waiting, so that a later image_read finds it there. A hint: it does
 * nothing for qcow2 images (libqcow reads them). */
void image_prefetch(struct image *img, uint64_t off, uint64_t len);

/* The first range [*start, *end) at or after off that may hold data, with
 * *start >= off. Everything between off and *start reads as zeros. Returns
 * 0, or -ENXIO when nothing at or after off holds data. */
int image_next_data(const struct image *img, uint64_t off, uint64_t *start, uint64_t *end);

/* Where image_next_data's answers come from: "SEEK_DATA", "qcow2 tables",
 * or "none" (every byte is taken as data). */
const char *image_map_source(const struct image *img);

/* Opens another, independent reader of the same image (for another thread). */
int image_reopen(const struct image *img, struct image **out, char *err, size_t errlen);

#endif
