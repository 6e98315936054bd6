// The shared input validation, compiled into the emulation module too.
#include "../checks.cpp"
