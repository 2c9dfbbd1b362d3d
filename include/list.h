/* list: prefetch lists, the ordered chunks a workload read.
 *
 * A list belongs to exactly one base version and says so:
 *
 *   imgfs-list 1
 *   base NAME VERSION MANIFEST-HASH
 *   chunk-size 131072
 *   chunks 3
 *   12                  chunk indices in order of first access
 *   13
 *   400
 *   end <32 hex digits> xxh3-128 of every byte before this line
 *
 * In a repository, list LISTNAME of NAME@V is bases/NAME/V.lists/LISTNAME;
 * the list the daemon replays when a VM disk opens is "boot".
 *
 * Contract: pure functions; a parsed list is owned by the caller.
 */
#ifndef IMGFS_LIST_H
#define IMGFS_LIST_H

#include <stddef.h>
#include <stdint.h>

#include "hash.h"
#include "manifest.h"

struct chunk_list {
    char base_name[65];
    uint64_t base_version;
    struct chunk_hash base_id;
    uint32_t chunk_size;
    uint64_t count;
    uint64_t *chunks; /* indices into the base's manifest */
};

/* Parses a list; -EBADMSG with one sentence in err when malformed. */
int list_parse(const char *text, size_t len, struct chunk_list **out, char *err, size_t errlen);
/* Serialises a list into a malloc'd buffer. */
int list_format(const struct chunk_list *list, char **text, size_t *len);
void list_free(struct chunk_list *list);

/* Checks that list belongs to manifest m (same name, version and hash, and
 * every index in range); -EINVAL with a sentence in err otherwise. */
int list_check(const struct chunk_list *list, const struct manifest *m, char *err, size_t errlen);

/* Relative repository path of a list, "bases/NAME/V.lists/LISTNAME". */
int list_relpath(const char *name, uint64_t version, const char *list_name, char *out, size_t len);

#endif
