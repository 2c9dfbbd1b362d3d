/* fuse_passthrough_abi: Linux 6.9's FUSE passthrough interface (protocol
 * 7.40), newer than the <linux/fuse.h> of libfuse 3.14's systems (7.38).
 * Only the constants and the ioctl argument; fs/serve.c and
 * bench/fuse-null.c amend libfuse's replies with them. */
#ifndef IMGFS_FUSE_PASSTHROUGH_ABI_H
#define IMGFS_FUSE_PASSTHROUGH_ABI_H

#include <stdint.h>
#include <sys/ioctl.h>

#define PASSTHROUGH_INIT_FLAG2 (1u << 5) /* FUSE_PASSTHROUGH >> 32, in fuse_init_out.flags2 */
#define PASSTHROUGH_OPEN_FLAG (1u << 7)  /* FOPEN_PASSTHROUGH */

struct passthrough_backing_map { /* struct fuse_backing_map */
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};

#define PASSTHROUGH_BACKING_OPEN _IOW(229, 1, struct passthrough_backing_map) /* FUSE_DEV_IOC_BACKING_OPEN */
#define PASSTHROUGH_BACKING_CLOSE _IOW(229, 2, uint32_t)                      /* FUSE_DEV_IOC_BACKING_CLOSE */

#endif
