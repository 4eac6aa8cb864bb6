// The portable sparse int8 kernels: 16-byte vectors every GCC or Clang target has; 8 images per block.
#define FXR_SPARSE_ISA sparse_portable
#define FXR_SPARSE_TABLE sparse_int8_portable_table
#define FXR_VEC_BYTES 16
#define FXR_SNV 2
#include "sparse_int8_impl.h"
