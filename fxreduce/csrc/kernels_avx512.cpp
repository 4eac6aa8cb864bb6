// The AVX-512 kernels (built with -mavx512f -mavx512bw -mavx512vl -mfma); used when the CPU has them.
#if defined(__x86_64__)
#define FXR_ISA avx512
#define FXR_ISA_NAME "avx512"
#define FXR_TABLE avx512_table
#define FXR_VEC_BYTES 64
#define FXR_MR 5
#define FXR_NV 4
#define FXR_DM 5
#define FXR_DJ 4
#include "kernels_impl.h"
#endif
