// The AVX2 + FMA kernels (built with -mavx2 -mfma); 16 registers, so a 6 x 2-vector GEMM tile and a 4 x 3 dot
// tile (12 accumulators; 3 x 3 ran 3-15% slower, 5 x 2 25-40%, 3 x 4 the same, in an in-process A/B at 1 thread).
#if defined(__x86_64__)
#define FXR_ISA avx2
#define FXR_ISA_NAME "avx2"
#define FXR_TABLE avx2_table
#define FXR_VEC_BYTES 32
#define FXR_MR 6
#define FXR_NV 2
#define FXR_DM 4
#define FXR_DJ 3
#define FXR_STREAM_PREFETCH 24
#define FXR_PACK_B_FROM_ROWS 64
#include "kernels_impl.h"
#endif
