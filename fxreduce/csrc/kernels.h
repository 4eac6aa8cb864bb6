// The kernel interface each ISA translation unit implements (kernels_avx512.cpp, kernels_avx2.cpp,
// kernels_portable.cpp). No torch headers here: the ISA units compile with their own -m flags, and any
// inline code they share with the rest of the library could be merged by the linker into one copy built
// for the widest ISA. ops.cpp picks one table at load and drives it with at::parallel_for.
#pragma once
#include <cstdint>

namespace fxreduce {
namespace native {

// C(g, m, c) = alpha * sum_j A(g, m, j) * B(g, row(g, j), c)  (+ C, or + D, or nothing), for c in a column range.
//   A(g, m, j) = A[g*a_group + m*a_row + j*a_col]        (any strides: read one scalar at a time)
//   row(g, j)  = b_index ? b_index[g*b_index_group + j] : j; B rows are contiguous over c with stride ldb
//   C row      = c_index ? c_index[g*c_index_group + m] : m; at C + g*c_group + row*ldc
// "Rows of B picked by an index" is the indirect-K GEMM: a kept unit is one contiguous row of W^T.
template <typename T>
struct RowsGemm {
  int64_t groups, M, K;
  const T* A;
  int64_t a_group, a_row, a_col;
  const T* B;
  int64_t b_group, ldb;
  const int64_t* b_index;
  int64_t b_index_group;
  T* C;
  int64_t c_group, ldc;
  const int64_t* c_index;
  int64_t c_index_group;
  const T* D;  // addend with C's layout (no c_index); ignored when accumulate
  int64_t d_group, ldd;
  bool accumulate;
  T alpha;
  // Non-zero: B comes packed by pack_panels (b_panel_rows rows per panel; ldb unused), and a column range
  // starts on a panel boundary and ends on one or at the last column.
  int64_t b_panel_rows = 0;
  // With accumulate and c_index: c_first[g*c_index_group + m] = 1 where group g is the first to write C row
  // c_index[g][m]; that group stores instead of adding, so C need not be zeroed first (rows no group writes
  // are the caller's to zero).
  const uint8_t* c_first = nullptr;
};

// A weight read at every step of a recurrence is packed once per call into column panels of the register
// tile's width (the last panel rounded up to whole vectors, zero-padded): panel p holds columns
// [p*w, p*w + w) of all `rows` rows contiguously, at dst + p*rows*w, so a tile streams one contiguous block
// instead of `rows` short strided pieces. src(j, c) = src[j*row_stride + c*col_stride], any strides.
template <typename T>
struct Panels {
  const T* src;
  int64_t rows, cols, row_stride, col_stride;
  T* dst;
};

// C(g, m, col(g, j)) (+)= alpha * sum_c A(g, m, c) * B(g, row(g, j), c): dot products of contiguous rows,
// for j in a range. col(g, j) = c_cols ? c_cols[g*c_cols_group + j] : j (a scatter into kept columns).
template <typename T>
struct RowDots {
  int64_t groups, M, J, K;
  const T* A;
  int64_t a_group, lda;
  const T* B;
  int64_t b_group, ldb;
  const int64_t* b_index;
  int64_t b_index_group;
  T* C;
  int64_t c_group, ldc;
  const int64_t* c_cols;
  int64_t c_cols_group;
  bool accumulate;
  T alpha;
};

struct KernelTable {
  const char* name;
  int column_tile_floats;  // columns per register tile, float32 (the parallel grain of rows_gemm, the panel width)
  void (*rows_gemm_f)(const RowsGemm<float>&, int64_t c_begin, int64_t c_end);
  void (*rows_gemm_d)(const RowsGemm<double>&, int64_t c_begin, int64_t c_end);
  void (*pack_panels_f)(const Panels<float>&, int64_t panel_begin, int64_t panel_end);
  void (*pack_panels_d)(const Panels<double>&, int64_t panel_begin, int64_t panel_end);
  void (*row_dots_f)(const RowDots<float>&, int64_t j_begin, int64_t j_end);
  void (*row_dots_d)(const RowDots<double>&, int64_t j_begin, int64_t j_end);
  // `units` LSTM cells of one row: gate g of unit u at gates[g*H + u] (in: pre-activations i f g o, out:
  // activations), c_prev[u] -> c, tanh(c), h.
  void (*cell_forward_f)(int64_t H, int64_t units, float* gates, const float* c_prev, float* c, float* tanh_c,
                         float* h);
  void (*cell_forward_d)(int64_t H, int64_t units, double* gates, const double* c_prev, double* c, double* tanh_c,
                         double* h);
  // Their backward: acts, c_prev, tanh_c, dh -> dgates (same layout); dc (in: from the next step, out: to the
  // previous one).
  void (*cell_backward_f)(int64_t H, int64_t units, const float* acts, const float* c_prev, const float* tanh_c,
                          const float* dh, float* dc, float* dgates);
  void (*cell_backward_d)(int64_t H, int64_t units, const double* acts, const double* c_prev, const double* tanh_c,
                          const double* dh, double* dc, double* dgates);
  // abs_out[p] = sum_i |x[p*plane + i]| and sum_out[p] = sum_i x[p*plane + i] for planes p in [begin, end):
  // error-map pruning's channel scores and bias gradient in one read of the error map (no |x| temporary, no
  // strided reduction).
  void (*plane_sums_f)(const float* x, int64_t plane, int64_t begin, int64_t end, float* abs_out, float* sum_out);
  void (*plane_sums_d)(const double* x, int64_t plane, int64_t begin, int64_t end, double* abs_out,
                       double* sum_out);
  // out (cols, rows) = src (rows, cols; row stride ld, columns contiguous) transposed, for the bands of
  // `lanes` source rows [band_begin, band_end): the transposed copy of a weight that ATen's strided copy
  // makes an order of magnitude slower.
  void (*transpose_f)(const float* src, int64_t rows, int64_t cols, int64_t ld, float* out, int64_t band_begin,
                      int64_t band_end);
  void (*transpose_d)(const double* src, int64_t rows, int64_t cols, int64_t ld, double* out, int64_t band_begin,
                      int64_t band_end);
  int float_lanes, double_lanes;  // source rows per band of transpose_f / transpose_d
};

extern const KernelTable avx512_table;
extern const KernelTable avx2_table;
extern const KernelTable portable_table;

}  // namespace native
}  // namespace fxreduce
