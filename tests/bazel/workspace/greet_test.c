#include <string.h>
#include "greet.h"

int main(void) {
    return strstr(greeting(), "kiln") == NULL;
}
