/* From C on a 3-node cluster: a process whose node is lost ends with a
 * status that NEFELE_WNODELOST accepts and no <sys/wait.h> macro does.
 * Spawns 6 sleepers (spread: two per node), prints "spawned" once they run
 * and then waits for those on node 3, whose daemon the test kills; the
 * others it kills itself and expects SIGKILL from. */
#include <signal.h>
#include <stdio.h>

#include "hermodr.h"
#include "nefele.h"

#define N 6
#define LOST_NODE 3

static int failures = 0;
#define CHECK(cond)                                                   \
    do {                                                              \
        if (!(cond)) {                                                \
            fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                               \
        }                                                             \
    } while (0)

static unsigned node_of(nefele_pid_t pid) { return (unsigned)(pid >> 48); }

int main(void) {
    nefele_pid_t pids[N];
    char *args[] = {"/bin/sleep", "60", NULL};
    int n = nefele_n_spawn(pids, N, "/bin/sleep", args, NULL);
    if (n != N) {
        fprintf(stderr, "nefele_n_spawn: %s\n", hrmd_strerror(n));
        return 2;
    }
    int on_lost = 0;
    for (int i = 0; i < N; i++) on_lost += node_of(pids[i]) == LOST_NODE;
    CHECK(on_lost > 0);
    printf("spawned %d on node %d\n", on_lost, LOST_NODE);
    fflush(stdout);

    int status = 0;
    for (int i = 0; i < N; i++) {
        if (node_of(pids[i]) != LOST_NODE) continue;
        CHECK(nefele_waitpid(pids[i], &status, 0) == pids[i]);
        CHECK(NEFELE_WNODELOST(status));
        CHECK(!WIFEXITED(status) && !WIFSIGNALED(status) && !WIFSTOPPED(status));
    }
    for (int i = 0; i < N; i++) {
        if (node_of(pids[i]) == LOST_NODE) continue;
        CHECK(nefele_kill(pids[i], SIGKILL) == 0);
        CHECK(nefele_waitpid(pids[i], &status, 0) == pids[i]);
        CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL && !NEFELE_WNODELOST(status));
    }
    if (failures == 0) printf("ok\n");
    return failures == 0 ? 0 : 1;
}
