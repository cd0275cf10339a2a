// AVX-512 BF16 kernels whose bf16 metadata scan runs on AMX tiles (one tile product scores 16 rows for up to 16
// heads): the scan reads 32 KiB per page at streaming speed, and vdpbf16ps alone is slower than that on one core.
#define FLUXION_AVX512_BF16 1
#define FLUXION_AVX512_AMX 1
#define FLUXION_AVX512_NS avx512_amx
#define FLUXION_AVX512_ISA Isa::kAvx512Amx
#include "kernels_avx512.cpp"
