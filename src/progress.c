#include "progress.h"

#include <stdio.h>
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

static void draw(struct progress *p, double now)
{
    enum { WIDTH = 30 };
    double frac = p->total ? (double)p->done / (double)p->total : 1.0;
    if (frac > 1)
        frac = 1;
    char bar[WIDTH + 1];
    int filled = (int)(frac * WIDTH);
    for (int i = 0; i < WIDTH; i++)
        bar[i] = i < filled ? '#' : '.';
    bar[WIDTH] = '\0';
    double elapsed = now - p->started;
    double rate = elapsed > 0 ? (double)p->done / elapsed : 0;
    char done[32], total[32], speed[32];
    format_size(p->done, done, sizeof(done));
    format_size(p->total, total, sizeof(total));
    format_size((uint64_t)rate, speed, sizeof(speed));
    int eta = rate > 0 && p->total > p->done ? (int)((double)(p->total - p->done) / rate) : 0;
    fprintf(stderr, "\r%s [%s] %3d%% %s / %s  %s/s  ETA %d:%02d \033[K", p->label, bar,
            (int)(frac * 100), done, total, speed, eta / 60, eta % 60);
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
