// AVX-512 + AVX512_BF16: the metadata scan and q.k read bf16 pairs directly (vdpbf16ps).
#define FLUXION_AVX512_BF16 1
#define FLUXION_AVX512_NS avx512_bf16
#define FLUXION_AVX512_ISA Isa::kAvx512Bf16
#include "kernels_avx512.cpp"
