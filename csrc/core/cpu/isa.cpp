#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "core/cpu/kernels.h"

namespace fluxion::core::cpu {
namespace {

Isa initial_isa() {
  const char* env = std::getenv("FLUXION_SIMD");
  if (env != nullptr) {
    Isa want = Isa::kAvx512Bf16;
    if (std::strcmp(env, "scalar") == 0) want = Isa::kScalar;
    else if (std::strcmp(env, "avx512_bf16") == 0) want = Isa::kAvx512Bf16;
    else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
    else if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
    else return best_supported_isa();
    if (isa_supported(want)) return want;
  }
  return best_supported_isa();
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
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

Isa best_supported_isa() {
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
  }
  return "?";
}

const KernelTable& kernels_for(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return avx512_bf16::kTable;
    case Isa::kAvx512: return avx512::kTable;
    case Isa::kAvx2: return avx2::kTable;
    default: return scalar::kTable;
  }
}

const KernelTable& kernels() { return kernels_for(active_isa()); }

}  // namespace fluxion::core::cpu
