/* Counts N2 random points of the unit square inside the circle of radius
 * 0.5 and sends {inside, total} to the printer, if it exists.
 * With --stdout it prints "inside total" instead and uses no Nefele at all:
 * the bare baseline of `nefele-perf pi` (posix_spawn and a pipe). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "hermodr.h"
#include "montecarlo.h"

static uint64_t next(uint64_t *s) { /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1DULL;
}

static uint64_t monte_carlo_count_pi(uint64_t n) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t s = ((uint64_t)getpid() << 32) ^ (uint64_t)ts.tv_nsec ^ (uint64_t)ts.tv_sec;
    if (s == 0) s = 1;
    uint64_t inside = 0;
    for (uint64_t i = 0; i < n; i++) {
        double x = (next(&s) >> 11) * 0x1.0p-53 - 0.5;
        double y = (next(&s) >> 11) * 0x1.0p-53 - 0.5;
        inside += x * x + y * y <= 0.25;
    }
    return inside;
}

int main(int argc, char *argv[]) {
    int to_stdout = argc > 2 && strcmp(argv[1], "--stdout") == 0;
    long n2 = argc > 1 ? atol(argv[to_stdout ? 2 : 1]) : 0;
    if (n2 <= 0) {
        fprintf(stderr, "usage: %s [--stdout] POINTS\n", argv[0]);
        return 2;
    }
    struct count msg;
    msg.inside = monte_carlo_count_pi((uint64_t)n2);
    msg.total = (uint64_t)n2;
    if (to_stdout) {
        printf("%llu %llu\n", (unsigned long long)msg.inside, (unsigned long long)msg.total);
        return 0;
    }

    hrmd_t *hrmd = hrmd_open();
    if (!hrmd) return 1;
    int rc = 1;
    if (hrmd_service_exists(hrmd, PRINTER_ADDR, 10000)) {
        int err = hrmd_message(hrmd, PRINTER_ADDR, (const byte *)&msg, sizeof(msg));
        /* The printer found may have been the previous run's, killed moments
         * ago on another node (its withdrawal had not reached this one yet,
         * nor the new printer's binding): wait for the printer again, once. */
        if (err == NEFELE_EPEERGONE && hrmd_service_exists(hrmd, PRINTER_ADDR, 10000))
            err = hrmd_message(hrmd, PRINTER_ADDR, (const byte *)&msg, sizeof(msg));
        if (err == 0) rc = 0;
        else fprintf(stderr, "worker: sending to %s: %s\n", PRINTER_ADDR, hrmd_strerror(err));
    } else {
        fprintf(stderr, "worker: no %s within 10 s\n", PRINTER_ADDR);
    }
    hrmd_close(hrmd);
    return rc;
}
