// The CPU kernel table in use (csrc/cpu/kernels.h) and what the running CPU can execute:
// cbfused/_cpu.py asks cpu_capabilities_supported(), imports the best cbfused._cpu_<ISA>
// module and hands its table to set_active_kernels(), once, at import.
#include "cpu/dispatch.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstring>

namespace cbfused {
namespace cpu {
namespace {
std::atomic<const Kernels*> g_active{nullptr};
}  // namespace

const Kernels& active_kernels() {
  const Kernels* k = g_active.load(std::memory_order_acquire);
  TORCH_CHECK(
      k != nullptr,
      "cbfused: no CPU kernels are loaded (import cbfused, not cbfused._C, to pick them for this CPU)");
  return *k;
}

std::string set_active_kernels(const Kernels* k) {
  if (k == nullptr) return "no table";
  if (k->abi != kKernelsAbi) {
    return "kernel table version " + std::to_string(k->abi) + ", expected " + std::to_string(kKernelsAbi) +
           " (a stale cbfused._cpu_* module: rebuild cbfused)";
  }
  g_active.store(k, std::memory_order_release);
  return "";
}

std::vector<std::string> cpu_capabilities_supported() {
  std::vector<std::string> out{"DEFAULT"};
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  // __builtin_cpu_supports also checks that the OS saves the vector registers (XCR0).
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && avx2;
  if (avx2) out.emplace_back("AVX2");
  if (avx512) out.emplace_back("AVX512");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) out.emplace_back("AVX512_BF16");
#endif
  return out;
}

}  // namespace cpu
}  // namespace cbfused
