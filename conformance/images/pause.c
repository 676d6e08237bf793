/* The pause image's process: holds a pod's namespaces and waits until it is told to stop. */
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

static void leave(int sig) { _exit(128 + sig); }

int main(void) {
    signal(SIGINT, leave);
    signal(SIGTERM, leave);
    for (;;)
        pause();
}
