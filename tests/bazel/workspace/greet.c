#include "greet.h"

const char *greeting(void) { return "hello from kiln bazel test"; }
