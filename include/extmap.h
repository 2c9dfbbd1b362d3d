/* extmap: turns file paths inside a guest's filesystem into a prefetch list.
 *
 * `imgfsctl list from-files` uses it: given the files a workload reads (a
 * readahead or preload list), it finds the chunks of a base version that
 * hold their data, so those chunks can be prefetched before the guest asks.
 *
 * The disk is read through a callback, so the same code works on a local
 * or an HTTP repository. The filesystem is read with libext2fs (e2fsprogs)
 * through an io_manager of our own; nothing is ever written.
 *
 * What is mapped: the data blocks of regular files, in logical order, up to
 * the file's size. Uninitialised (preallocated) extents, holes, inline data
 * and all-zero chunks are left out: none of them is ever fetched.
 *
 * Contract: single-threaded per call, no global state; the returned list is
 * owned by the caller (list_free()).
 */
#ifndef IMGFS_EXTMAP_H
#define IMGFS_EXTMAP_H

#include <stddef.h>
#include <stdint.h>

#include "list.h"
#include "manifest.h"

/* Reads len bytes at byte offset off of the virtual disk into buf.
 * Returns 0, or a negative errno. Offsets stay below the manifest's size. */
typedef int (*extmap_read_fn)(void *ctx, void *buf, size_t len, uint64_t off);

/* Maps the files named in paths_text (readahead/preload style: one path per
 * line, optionally followed by whitespace and a count, which is ignored;
 * blank lines and lines starting with '#' are skipped; a path is taken from
 * the filesystem's root whether or not it starts with '/') to the chunks of
 * base manifest m that hold their data, in the order of the paths (the
 * first occurrence of a chunk wins), and fills *out.
 *
 * The filesystem is ext2/3/4, either on the bare disk or in an MBR (primary
 * or logical) or GPT partition. When several partitions hold an ext
 * filesystem, the one in which the most paths resolve is used (the first
 * one on a tie), so a separate /boot does not hide the root filesystem.
 *
 * Paths that do not exist, symlinks, directories and other non-regular
 * files are skipped and reported in *warnings (a malloc'd text of one line
 * per problem, or NULL when there is none; warnings may be NULL to ignore
 * them). Returns 0; -EINVAL when there is no ext filesystem or paths_text
 * names no path; -ENOENT when no path resolves to a regular file; -EIO (or
 * what read_fn returned) when the disk cannot be read; one sentence in err
 * in every case. */
int extmap_paths_to_list(const struct manifest *m, extmap_read_fn read_fn, void *ctx, const char *paths_text,
                         struct chunk_list **out, char **warnings, char *err, size_t errlen);

#endif
