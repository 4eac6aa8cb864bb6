// The sparse int8 kernel interface each ISA unit implements (sparse_int8_avx512.cpp, _avx2.cpp, _portable.cpp);
// sparse_int8_ops.cpp checks the operands, picks a table and drives it with at::parallel_for. No torch headers
// here, for the reason kernels.h gives.
//
// Layout: a Linear is a conv over a (1, 1, K) image with a (1, 1, K) kernel and one output pixel, so one kernel
// serves both. The quantized input of `width` images is stored as a block (C, Hp, Wp, width) (the padded
// image, border = zero point) of uint8: the images are the vector lanes, and a weight (c, kh, kw) applied at an output
// pixel reads one contiguous vector at element offset (c*Hp + kh*dil_h)*Wp + kw*dil_w + pixel offset.
#pragma once
#include <cstdint>

namespace fxreduce {
namespace native {

// Images [block*width, block*width + width) of x (float32, or uint8 already quantized) into `blocks`.
struct SparseQuantize {
  const float* x;         // (images, C, H, W) float32, or nullptr when xq is given
  const uint8_t* xq;      // (images, C, H, W) quantized values, copied as they are
  int64_t images, C, H, W;
  int64_t pad_h, pad_w, Hp, Wp;  // padded image
  float inverse_scale;    // q = clamp(nearbyint(x * inverse_scale) + zero, 0, 255), as torch quantizes
  int32_t zero;
  uint8_t* blocks;        // (blocks, C*Hp*Wp, width)
};

// Output rows [n_begin, n_end) of one block (of a Linear, up to `pixels` blocks): acc(n, p, lane) = sum over row
// n's non-zeros i of values[i] * block[column_offsets[columns[i]] + pixel_offset[p]][lane], exact in int32. Then either
// out_int = acc, or out = float(acc - zero * row_sums[n]) * multipliers[n] + bias[n] (ReLU if relu), acc first
// max-pooled over windows of pool x pool pixels when pool > 1. The CSR weight is read as stored, so a call does no
// work per non-zero beyond the products.
struct SparseInt8Rows {
  const int8_t* values;         // per non-zero
  const int32_t* columns;       // per non-zero: its (c, kh, kw) index, checked in range by the caller
  const int64_t* column_offsets;  // per (c, kh, kw): the byte offset of its input element in a block; nullptr for
                                  // a Linear (one pixel, column c at c * width)
  const int64_t* row_ptr;       // (rows + 1)
  int64_t pixels;               // conv output pixels computed: whole pooling windows, window after window
  const int64_t* pixel_offsets; // per conv output pixel: the byte offset of its receptive field in a block
  int64_t pixel_images;         // 0 for a conv; for a Linear, WIDTH: its "pixels" are consecutive blocks (a call
                                // computes up to `pixels` blocks from `block` on, one weight broadcast for all)
  int pool;                     // max pooling window side (= stride) on the sums, 1 for none; pool^2 <= 16
  int64_t block_elements;       // C*Hp*Wp
  int64_t images;
  const int32_t* row_sums;
  int32_t zero;
  const float* multipliers;
  const float* bias;            // or nullptr
  bool relu;
  float* out;                   // or nullptr, then out_int
  int32_t* out_int;
  int64_t out_image, out_channel, out_pixel;  // output strides (of the pooled output)
};

// Output pixels per register tile: every non-zero is broadcast once for this many pixels (a Linear's: blocks).
constexpr int kSparsePixelTile = 4;

struct SparseInt8Table {
  int width;  // images per block (the vector lanes of the accumulators)
  // The smallest and largest of x[0, n) (both NaN when any element is): a dynamically quantized Linear's input range.
  void (*value_range)(const float* x, int64_t n, float* low, float* high);
  void (*quantize)(const SparseQuantize&, int64_t block);
  // scratch: 16 * 16 * width int32, owned by the caller
  void (*rows)(const SparseInt8Rows&, const uint8_t* blocks, int64_t block, int64_t n_begin, int64_t n_end,
               int32_t* scratch);
};

extern const SparseInt8Table sparse_int8_avx512_table;
extern const SparseInt8Table sparse_int8_avx2_table;
extern const SparseInt8Table sparse_int8_portable_table;

}  // namespace native
}  // namespace fxreduce
