/* libnefele's error paths, checked from C. Run once with no daemon
 * ("offline") and once under `nefele run` ("online"). */
#include <stdio.h>
#include <string.h>

#include "hermodr.h"
#include "nefele.h"

static int failures = 0;
#define CHECK(cond)                                                   \
    do {                                                              \
        if (!(cond)) {                                                \
            fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                               \
        }                                                             \
    } while (0)

int main(int argc, char *argv[]) {
    int online = argc > 1 && strcmp(argv[1], "online") == 0;
    nefele_pid_t pid = 0;
    char *args[] = {"/bin/true", NULL};

    /* NULL and malformed arguments are errors, never crashes. */
    CHECK(nefele_spawn(NULL, "/bin/true", args, NULL) == NEFELE_EINVAL);
    CHECK(nefele_spawn(&pid, NULL, args, NULL) == NEFELE_EINVAL);
    CHECK(nefele_n_spawn(&pid, 0, "/bin/true", args, NULL) == NEFELE_EINVAL);
    CHECK(nefele_n_spawn(NULL, 1, "/bin/true", args, NULL) == NEFELE_EINVAL);
    CHECK(hrmd_bind(NULL, "x") == NEFELE_EINVAL);
    CHECK(hrmd_message(NULL, "x", (const byte *)"a", 1) == NEFELE_EINVAL);
    CHECK(hrmd_receive(NULL, NULL, 0, 0) == NEFELE_EINVAL);
    CHECK(!hrmd_service_exists(NULL, "x", 0));
    hrmd_close(NULL);
    CHECK(strcmp(hrmd_strerror(NEFELE_EINVAL), "invalid argument (NULL or malformed)") == 0);
    CHECK(strcmp(hrmd_strerror(12345), "unknown error code") == 0);
    CHECK(strcmp(hrmd_strerror(0), "success") == 0);

    if (!online) {
        CHECK(hrmd_open() == NULL);
        CHECK((int64_t)nefele_waitpid(0, NULL, 0) == NEFELE_ENODAEMON);
        CHECK(nefele_kill(1, 9) == NEFELE_ENODAEMON);
    } else {
        hrmd_t *h = hrmd_open();
        CHECK(h != NULL);
        CHECK(hrmd_bind(h, "bad@{1,") == NEFELE_EADDR);
        CHECK(hrmd_bind(h, "me@{4242,1,1}") == 0);
        CHECK(hrmd_bind(h, "me@{4242,1,1}") == NEFELE_EREFUSED);
        CHECK(hrmd_message(h, "{999,1}", (const byte *)"a", 1) == NEFELE_ENOMAILBOX);
        CHECK(hrmd_message(h, "me@{4242,1,1}", NULL, 5) == NEFELE_EINVAL);
        byte buf[16];
        CHECK(hrmd_receive(h, buf, sizeof(buf), 0) == NEFELE_ETIMEDOUT);
        CHECK(hrmd_receive(h, NULL, 4, 0) == NEFELE_EINVAL);
        /* A message larger than the buffer is kept for the next call. */
        CHECK(hrmd_message(h, "me@{4242,1,1}", (const byte *)"hello world", 11) == 0);
        CHECK(hrmd_receive(h, buf, 4, 5000) == NEFELE_ETOOBIG);
        CHECK(hrmd_receive(h, buf, sizeof(buf), 5000) == 11);
        CHECK(memcmp(buf, "hello world", 11) == 0);
        CHECK(hrmd_service_exists(h, "me@{4242,1,1}", 1000));
        CHECK(!hrmd_service_exists(h, "{4243,1}", 50));
        /* Processes: exit codes, signals, nothing to wait for. */
        char *fail[] = {"/bin/sh", "-c", "exit 5", NULL};
        CHECK(nefele_spawn(&pid, "/bin/sh", fail, NULL) == 0);
        int status = 0;
        CHECK(nefele_waitpid(pid, &status, 0) == pid);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 5 && !NEFELE_WNODELOST(status));
        char *sleeper[] = {"/bin/sleep", "30", NULL};
        CHECK(nefele_spawn(&pid, "/bin/sleep", sleeper, NULL) == 0);
        CHECK(nefele_waitpid(pid, &status, WNOHANG) == 0);
        CHECK(nefele_kill(pid, 9) == 0);
        CHECK(nefele_waitpid(0, &status, 0) == pid);
        CHECK(WIFSIGNALED(status) && WTERMSIG(status) == 9);
        CHECK((int64_t)nefele_waitpid(0, &status, 0) == NEFELE_ECHILD);
        CHECK(nefele_kill(pid, 9) == NEFELE_ESRCH);
        CHECK(nefele_spawn(&pid, "/nonexistent", NULL, NULL) == NEFELE_ESPAWN);
        hrmd_close(h);
    }
    if (failures == 0) printf("ok (%s)\n", online ? "online" : "offline");
    return failures == 0 ? 0 : 1;
}
