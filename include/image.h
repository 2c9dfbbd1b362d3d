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
 * Contract: an image is used by one thread at a time. image_close() frees it.
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

#endif
