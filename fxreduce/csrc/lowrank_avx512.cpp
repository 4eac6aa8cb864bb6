// The AVX-512 fused low-rank kernels (built with -mavx512f -mfma): a 6 x 4-vector tile, 24 of the 32 registers.
#if defined(__x86_64__)
#define FXR_LR_ISA lowrank_avx512
#define FXR_LR_TABLE lowrank_avx512_table
#define FXR_VEC_BYTES 64
#define FXR_LR_MR 6
#define FXR_LR_NV 4
#include "lowrank_impl.h"
#endif
