// The portable fused low-rank kernels: 16-byte vectors that every target GCC or Clang supports (SSE2, NEON, ...).
#define FXR_LR_ISA lowrank_portable
#define FXR_LR_TABLE lowrank_portable_table
#define FXR_VEC_BYTES 16
#define FXR_LR_MR 6
#define FXR_LR_NV 2
#include "lowrank_impl.h"
