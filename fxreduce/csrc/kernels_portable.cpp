// The portable kernels: 16-byte vectors that every target GCC or Clang supports (SSE2, NEON, ...).
#define FXR_ISA portable
#define FXR_ISA_NAME "portable"
#define FXR_TABLE portable_table
#define FXR_VEC_BYTES 16
#define FXR_MR 6
#define FXR_NV 2
#define FXR_DM 3
#define FXR_DJ 3
#include "kernels_impl.h"
