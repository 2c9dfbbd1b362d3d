/* Unit tests for progress.c: the bar line fits every terminal width, from
 * 20 to 300 columns, at every stage, and keeps the rate and ETA when there
 * is room for them. */
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "progress.h"

static int fits(const char *label, uint64_t total, uint64_t done, int columns, char *line, size_t len)
{
    struct progress p = {.label = label, .total = total, .done = done, .started = 0, .enabled = true};
    progress_format(&p, 12.5, columns, line, len);
    for (const char *c = line; *c; c++)
        if ((unsigned char)*c < 0x20)
            return 0;
    return strlen(line) <= (size_t)(columns - 1);
}

int main(void)
{
    char line[512];
    const char *labels[] = {"publishing", "pre-copy debian12-cloud-with-a-rather-long-name@1234", ""};
    for (size_t l = 0; l < 3; l++)
        for (int columns = 20; columns <= 300; columns++) {
            int ok = 1;
            for (uint64_t done = 0; done <= 100; done += 25)
                ok &= fits(labels[l], 100ull << 30, done << 30, columns, line, sizeof(line));
            ok &= fits(labels[l], 0, 0, columns, line, sizeof(line));
            if (!ok)
                fprintf(stderr, "%d columns, label '%s': '%s' does not fit\n", columns, labels[l], line);
            CHECK(ok);
        }
    /* 80 columns: the bar, the percentage, sizes, rate and ETA all show. */
    CHECK(fits("publishing", 2ull << 30, 1ull << 30, 80, line, sizeof(line)));
    CHECK(strstr(line, "publishing [") == line);
    CHECK(strstr(line, " 50%") && strstr(line, "/s") && strstr(line, "ETA"));
    /* A wide terminal does not stretch the bar past 40 cells. */
    CHECK(fits("publishing", 2ull << 30, 2ull << 30, 300, line, sizeof(line)));
    CHECK(strstr(line, "[########################################]") != NULL);
    CHECK(strstr(line, "[#########################################") == NULL);
    /* Narrow: the ETA goes before the bar gets shorter than 10. */
    CHECK(fits("publishing", 2ull << 30, 1ull << 30, 40, line, sizeof(line)));
    CHECK(strstr(line, "ETA") == NULL && strstr(line, " 50%"));
    return check_summary();
}
