// The fused low-rank product's interface each ISA unit implements (lowrank_avx512.cpp, _avx2.cpp, _portable.cpp);
// lowrank_ops.cpp checks the operands, packs the factors, picks a table and drives it with at::parallel_for. No
// torch headers here, for the reason kernels.h gives.
//
// out = (x V^T) U^T + bias for x (M, K), V (R, K), U (N, R). The factors are read as column panels of the register
// tile's width W (V^T: W of the R columns over K rows, packed once per call; U^T: W of the N columns over R rows,
// packed by the thread that consumes it into a buffer that stays in L1; the last panel rounded up to whole
// vectors and zero-padded), so a tile streams one contiguous block. The intermediate t = x V^T of a block of
// rows lives in a buffer the caller owns, row stride `ldt` (R rounded up to whole panels), small enough to stay
// in cache between the two products.
#pragma once
#include <cstdint>

namespace fxreduce {
namespace native {

template <typename T>
struct LowRankProduct {
  int64_t M, K, R, N;
  const T* x;     // row m at x + m*ldx, contiguous over K
  int64_t ldx;
  const T* vt;    // packed V^T: panel p (columns [p*W, p*W + W) of R) at vt + p*K*W
    const T* bias;  // N rounded up to whole panels (zeros past N, all zeros without a bias)
  T* out;         // row m at out + m*ldo
  int64_t ldo;
};

struct LowRankTable {
  int tile_rows;          // rows per register tile
  int panel_floats;       // W for float32 (float64: half of it)
  // Panel `panel` of the (rows x cols) matrix src(j, c) = src[c*ld + j] into dst (rows * W): a factor stored
  // as nn.Linear stores its weight (V^T from V (R, K) is rows = K, cols = R, ld = K).
  void (*pack_f)(const float* src, int64_t rows, int64_t cols, int64_t ld, int64_t panel, float* dst);
  void (*pack_d)(const double* src, int64_t rows, int64_t cols, int64_t ld, int64_t panel, double* dst);
  // t[(m - m_begin)*ldt + j] = sum_k x[m][k] V[j][k] for rows [m_begin, m_end) and the V^T panels given.
  void (*intermediate_f)(const LowRankProduct<float>&, int64_t m_begin, int64_t m_end, int64_t panel_begin,
                         int64_t panel_end, float* t, int64_t ldt);
  void (*intermediate_d)(const LowRankProduct<double>&, int64_t m_begin, int64_t m_end, int64_t panel_begin,
                         int64_t panel_end, double* t, int64_t ldt);
  // out[m][c] = bias[c] + sum_j t[(m - m_begin)*ldt + j] U[c][j] for rows [m_begin, m_end) and the columns of
  // U^T panel `panel`, packed at ut_panel.
  void (*output_f)(const LowRankProduct<float>&, const float* t, int64_t ldt, int64_t m_begin, int64_t m_end,
                   int64_t panel, const float* ut_panel);
  void (*output_d)(const LowRankProduct<double>&, const double* t, int64_t ldt, int64_t m_begin, int64_t m_end,
                   int64_t panel, const double* ut_panel);
  // One packed panel over `rows` rows of any operand, for the block-diagonal factors' products:
  // out[r*ldo + c] = init[c] (0 without) + sum_{k < K} a[r*lda + k] * B(k, c) for c < width <= W, B packed at b
  // with its row stride `width` rounded up to whole vectors (pack's layout); init has whole vectors.
  void (*panel_f)(const float* a, int64_t lda, int64_t rows, int64_t K, const float* b, const float* init, float* out,
                  int64_t ldo, int64_t width);
  void (*panel_d)(const double* a, int64_t lda, int64_t rows, int64_t K, const double* b, const double* init,
                  double* out, int64_t ldo, int64_t width);
};

extern const LowRankTable lowrank_avx512_table;
extern const LowRankTable lowrank_avx2_table;
extern const LowRankTable lowrank_portable_table;

}  // namespace native
}  // namespace fxreduce
