#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "core/cpu/kernels.h"

namespace fluxion::core::cpu {
namespace {

Isa initial_isa() {
  const char* env = std::getenv("FLUXION_SIMD");
  Isa want;
  if (env != nullptr && isa_from_name(env, &want) && isa_supported(want)) return want;
  return best_supported_isa();
}

// AMX-BF16 in the CPU (CPUID.7.0:EDX bits 22, 24) and the kernel's permission for this process to use tile
// data (Linux >= 5.16 hands it out on request, once per process). GCC 12's __builtin_cpu_supports does not
// report AMX, hence CPUID by hand.
bool amx_usable() {
#if defined(__x86_64__) && defined(__linux__)
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

std::atomic<int>& active() {
  static std::atomic<int> isa{int(initial_isa())};
  return isa;
}

}  // namespace

bool isa_supported(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Isa::kAvx512Bf16: return isa_supported(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16");
    case Isa::kAvx512Amx: return isa_supported(Isa::kAvx512Bf16) && amx_usable();
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

Isa best_supported_isa() {
  if (isa_supported(Isa::kAvx512Amx)) return Isa::kAvx512Amx;
  if (isa_supported(Isa::kAvx512Bf16)) return Isa::kAvx512Bf16;
  if (isa_supported(Isa::kAvx512)) return Isa::kAvx512;
  if (isa_supported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kScalar;
}

Isa active_isa() { return Isa(active().load()); }

void set_active_isa(Isa isa) {
  if (!isa_supported(isa)) throw std::invalid_argument(std::string("this CPU does not support ") + isa_name(isa));
  active().store(int(isa));
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512Amx: return "avx512_amx";
  }
  return "?";
}

bool isa_from_name(const char* name, Isa* isa) {
  for (Isa i : kAllIsas)
    if (std::strcmp(name, isa_name(i)) == 0) {
      *isa = i;
      return true;
    }
  return false;
}

const KernelTable& kernels_for(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Amx: return avx512_amx::kTable;
    case Isa::kAvx512Bf16: return avx512_bf16::kTable;
    case Isa::kAvx512: return avx512::kTable;
    case Isa::kAvx2: return avx2::kTable;
    default: return scalar::kTable;
  }
}

const KernelTable& kernels() { return kernels_for(active_isa()); }

}  // namespace fluxion::core::cpu
