#include "progress.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "util.h"

void progress_start(struct progress *p, const char *label, uint64_t total)
{
    p->label = label;
    p->total = total;
    p->done = 0;
    p->started = now_seconds();
    p->last_draw = 0;
    p->enabled = isatty(STDERR_FILENO);
}

enum { BAR_MIN = 10, BAR_MAX = 40 };

void progress_format(const struct progress *p, double now, int columns, char *out, size_t len)
{
    double frac = p->total ? (double)p->done / (double)p->total : 1.0;
    if (frac > 1)
        frac = 1;
    double elapsed = now - p->started;
    double rate = elapsed > 0 ? (double)p->done / elapsed : 0;
    char done[32], total[32], speed[32];
    format_size(p->done, done, sizeof(done));
    format_size(p->total, total, sizeof(total));
    format_size((uint64_t)rate, speed, sizeof(speed));
    int eta = rate > 0 && p->total > p->done ? (int)((double)(p->total - p->done) / rate) : 0;

    /* The widest tail that leaves room for a bar of BAR_MIN, then the
     * widest bar up to BAR_MAX. The last column stays empty: writing into it
     * makes some terminals wrap. */
    char tails[3][128];
    snprintf(tails[0], sizeof(tails[0]), " %3d%% %s / %s  %s/s  ETA %d:%02d", (int)(frac * 100), done, total, speed,
             eta / 60, eta % 60);
    snprintf(tails[1], sizeof(tails[1]), " %3d%% %s / %s", (int)(frac * 100), done, total);
    snprintf(tails[2], sizeof(tails[2]), " %3d%%", (int)(frac * 100));
    int room = columns - 1;
    int label_len = (int)strlen(p->label);
    const char *tail = tails[2];
    for (int i = 0; i < 3; i++)
        if (label_len + 3 + BAR_MIN + (int)strlen(tails[i]) <= room) {
            tail = tails[i];
            break;
        }
    int width = room - label_len - 3 - (int)strlen(tail);
    if (width > BAR_MAX)
        width = BAR_MAX;
    if (width < BAR_MIN) { /* a very narrow terminal: shorten the label too */
        width = BAR_MIN;
        label_len = room - 3 - BAR_MIN - (int)strlen(tail);
        if (label_len < 0)
            label_len = 0;
    }
    char bar[BAR_MAX + 1];
    int filled = (int)(frac * width);
    for (int i = 0; i < width; i++)
        bar[i] = i < filled ? '#' : '.';
    bar[width] = '\0';
    snprintf(out, len, "%.*s [%s]%s", label_len, p->label, bar, tail);
    if (columns > 0 && strlen(out) >= (size_t)columns) /* narrower than any layout */
        out[columns > 1 ? columns - 1 : 0] = '\0';
}

/* The terminal's width now (it may have been resized), else $COLUMNS or 80. */
static int terminal_columns(void)
{
    struct winsize ws;
    if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
        return ws.ws_col;
    const char *env = getenv("COLUMNS");
    int n = env ? atoi(env) : 0;
    return n > 0 ? n : 80;
}

static void draw(struct progress *p, double now)
{
    char line[512];
    progress_format(p, now, terminal_columns(), line, sizeof(line));
    fprintf(stderr, "\r%s\033[K", line);
    fflush(stderr);
    p->last_draw = now;
}

void progress_update(struct progress *p, uint64_t done)
{
    p->done = done;
    if (!p->enabled)
        return;
    double now = now_seconds();
    if (now - p->last_draw >= 0.1)
        draw(p, now);
}

void progress_finish(struct progress *p)
{
    if (!p->enabled)
        return;
    draw(p, now_seconds());
    fputc('\n', stderr);
}
