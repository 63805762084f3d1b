/* The seed's Monte Carlo pi: spawns the printer, then keeps spawning
 * workers (INFLIGHT at a time) and waiting for them until N1 have
 * finished; then asks the printer for the sums, kills it, and prints the
 * estimate.
 *
 * usage: montecarlo_main [N1 workers, 32] [N2 points each, 200000] [INFLIGHT, 4]
 * The worker and printer programs are looked up next to this program. */
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "hermodr.h"
#include "montecarlo.h"
#include "nefele.h"

#define MAX_INFLIGHT 256
/* Workers per node are counted for nodes 0..MAX_NODES-1 (the node is the
 * top 16 bits of a global pid); others are counted together. */
#define MAX_NODES 64

static int failed(const char *what, int err) {
    fprintf(stderr, "main: %s: %s\n", what, hrmd_strerror(err));
    return 1;
}

int main(int argc, char *argv[]) {
    long n1 = argc > 1 ? atol(argv[1]) : 32;
    long n2 = argc > 2 ? atol(argv[2]) : 200000;
    long inflight = argc > 3 ? atol(argv[3]) : 4;
    if (n1 <= 0 || n2 <= 0 || inflight <= 0 || inflight > MAX_INFLIGHT) {
        fprintf(stderr, "usage: %s [WORKERS>0] [POINTS>0] [INFLIGHT 1..%d]\n", argv[0], MAX_INFLIGHT);
        return 2;
    }
    char self[PATH_MAX], worker[PATH_MAX], printer[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (len <= 0) return failed("finding this program", NEFELE_EIO);
    self[len] = 0;
    const char *dir = dirname(self);
    snprintf(worker, sizeof(worker), "%s/montecarlo_worker", dir);
    snprintf(printer, sizeof(printer), "%s/montecarlo_printer", dir);

    hrmd_t *hrmd = hrmd_open();
    if (!hrmd) return 1;
    int err = hrmd_bind(hrmd, MAIN_ADDR);
    if (err) return failed("bind " MAIN_ADDR, err);

    nefele_pid_t pid_printer;
    char *p_arg[] = {printer, NULL};
    err = nefele_spawn(&pid_printer, printer, p_arg, NULL);
    if (err) return failed("spawning the printer", err);

    char points[32];
    snprintf(points, sizeof(points), "%ld", n2);
    char *w_arg[] = {worker, points, NULL};
    long started = 0, pending = 0, completed = 0;
    long per_node[MAX_NODES + 1] = {0};
    do {
        long new_req = inflight - pending;
        if (new_req > n1 - started) new_req = n1 - started;
        if (new_req > 0) {
            nefele_pid_t pids[MAX_INFLIGHT];
            err = nefele_n_spawn(pids, (int)new_req, worker, w_arg, NULL);
            if (err < 0) return failed("spawning workers", err);
            for (long i = 0; i < new_req; i++) {
                unsigned node = (unsigned)(pids[i] >> 48);
                per_node[node < MAX_NODES ? node : MAX_NODES]++;
            }
            started += new_req;
            pending += new_req;
        }
        int status;
        nefele_pid_t done = nefele_waitpid(0, &status, 0);
        if ((int64_t)done < 0) return failed("waitpid", (int)(int64_t)done);
        if (done == pid_printer) {
            fprintf(stderr, "main: the printer exited early (status %#x)\n", status);
            return 1;
        }
        if (NEFELE_WNODELOST(status) || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "main: a worker failed (status %#x)\n", status);
            return 1;
        }
        pending--;
        completed++;
    } while (pending > 0 || completed < n1);

    struct query q = {QUERY_MAGIC, (uint64_t)n1, 0};
    err = hrmd_message(hrmd, PRINTER_ADDR, (const byte *)&q, sizeof(q));
    if (err) return failed("asking the printer", err);
    struct count sum;
    ssize_t n = hrmd_receive(hrmd, (byte *)&sum, sizeof(sum), 30000);
    if (n != (ssize_t)sizeof(sum)) return failed("the printer's answer", n < 0 ? (int)n : NEFELE_EIO);

    nefele_kill(pid_printer, 9);
    int status;
    nefele_waitpid(pid_printer, &status, 0);
    hrmd_close(hrmd);
    printf("pi ~= %.6f from %llu points in %ld workers\n", 4.0 * (double)sum.inside / (double)sum.total,
           (unsigned long long)sum.total, n1);
    printf("workers per node:");
    for (int node = 0; node <= MAX_NODES; node++) {
        if (per_node[node] == 0) continue;
        if (node < MAX_NODES) printf(" %d:%ld", node, per_node[node]);
        else printf(" other:%ld", per_node[node]);
    }
    printf("\n");
    return 0;
}
