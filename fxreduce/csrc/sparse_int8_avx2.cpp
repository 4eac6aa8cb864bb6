// The AVX2 sparse int8 kernels (built with -mavx2 -mfma): 16 images per block.
#if defined(__x86_64__)
#define FXR_SPARSE_ISA sparse_avx2
#define FXR_SPARSE_TABLE sparse_int8_avx2_table
#define FXR_VEC_BYTES 32
#define FXR_SNV 2
#include "sparse_int8_impl.h"
#endif
