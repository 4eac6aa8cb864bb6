// The AVX-512 sparse int8 kernels (built with -mavx512f -mavx512bw -mavx512vl): 32 images per block.
#if defined(__x86_64__)
#define FXR_SPARSE_ISA sparse_avx512
#define FXR_SPARSE_TABLE sparse_int8_avx512_table
#define FXR_VEC_BYTES 64
#define FXR_SNV 2
#include "sparse_int8_impl.h"
#endif
