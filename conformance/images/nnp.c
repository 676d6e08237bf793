/* Installed setuid root: prints the effective uid it runs with, which stays the caller's when
   no_new_privs keeps the setuid bit from taking effect. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("Effective uid: %d\n", (int)geteuid());
    return 0;
}
