// Run-time choice of the CPU kernels (see csrc/cpu/dispatch.cpp).
#pragma once

#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace cbfused {
namespace cpu {

// Makes k the table of the CPU host entries; returns "" or why it was refused.
std::string set_active_kernels(const Kernels* k);

// The ISAs this CPU (and OS) can execute, from DEFAULT up: DEFAULT, AVX2, AVX512, AVX512_BF16.
std::vector<std::string> cpu_capabilities_supported();

}  // namespace cpu
}  // namespace cbfused
