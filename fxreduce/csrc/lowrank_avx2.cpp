// The AVX2 + FMA fused low-rank kernels (built with -mavx2 -mfma): 16 registers, so a 6 x 2-vector tile.
#if defined(__x86_64__)
#define FXR_LR_ISA lowrank_avx2
#define FXR_LR_TABLE lowrank_avx2_table
#define FXR_VEC_BYTES 32
#define FXR_LR_MR 6
#define FXR_LR_NV 2
#include "lowrank_impl.h"
#endif
