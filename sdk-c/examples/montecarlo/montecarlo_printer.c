/* Sums the workers' counts and prints running estimates of pi; answers
 * main's query with the sums once all the counts it expects are in. */
#include <stdio.h>
#include <string.h>

#include "hermodr.h"
#include "montecarlo.h"

int main(void) {
    hrmd_t *hrmd = hrmd_open();
    if (!hrmd) return 1;
    int err = hrmd_bind(hrmd, PRINTER_ADDR);
    if (err) {
        fprintf(stderr, "printer: bind %s: %s\n", PRINTER_ADDR, hrmd_strerror(err));
        return 1;
    }
    struct count sum = {0, 0};
    uint64_t results = 0, expected = 0;
    int queried = 0;
    for (;;) {
        unsigned char buf[64];
        ssize_t n = hrmd_receive(hrmd, buf, sizeof(buf), -1);
        if (n < 0) {
            fprintf(stderr, "printer: receive: %s\n", hrmd_strerror((int)n));
            return 1;
        }
        if (n == sizeof(struct count)) {
            struct count c;
            memcpy(&c, buf, sizeof(c));
            sum.inside += c.inside;
            sum.total += c.total;
            results++;
            printf("printer: %3llu counts, %11llu points, pi ~= %.6f\n", (unsigned long long)results,
                   (unsigned long long)sum.total, 4.0 * (double)sum.inside / (double)sum.total);
            fflush(stdout);
        } else if (n == sizeof(struct query)) {
            struct query q;
            memcpy(&q, buf, sizeof(q));
            if (q.magic != QUERY_MAGIC) continue;
            expected = q.results;
            queried = 1;
        } else {
            fprintf(stderr, "printer: ignoring a message of %zd bytes\n", n);
        }
        if (queried && results >= expected) {
            /* main bound its address on its own node; on another node the
             * binding arrives by gossip, which a short job can outrun. */
            if (!hrmd_service_exists(hrmd, MAIN_ADDR, 10000))
                fprintf(stderr, "printer: %s did not appear within 10 s\n", MAIN_ADDR);
            err = hrmd_message(hrmd, MAIN_ADDR, (const byte *)&sum, sizeof(sum));
            if (err) fprintf(stderr, "printer: answering %s: %s\n", MAIN_ADDR, hrmd_strerror(err));
            queried = 0;
        }
    }
}
