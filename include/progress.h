/* progress: a one-line progress bar on stderr for long-running commands.
 *
 * Contract: drawn only when stderr is a terminal (scripts and logs stay
 * quiet); redrawn at most 10 times a second; single-threaded use. The line
 * fits the terminal's current width without its last column (the bar
 * shrinks, then the rate and ETA go, then the label is cut), so it never
 * wraps.
 */
#ifndef IMGFS_PROGRESS_H
#define IMGFS_PROGRESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct progress {
    const char *label;
    uint64_t total;
    uint64_t done;
    double started;
    double last_draw;
    bool enabled;
};

void progress_start(struct progress *p, const char *label, uint64_t total);
void progress_update(struct progress *p, uint64_t done);
/* Draws the final state and ends the line. */
void progress_finish(struct progress *p);

/* The line as drawn at time now for a terminal of columns: at most
 * columns - 1 characters, no control characters. */
void progress_format(const struct progress *p, double now, int columns, char *out, size_t len);

#endif
