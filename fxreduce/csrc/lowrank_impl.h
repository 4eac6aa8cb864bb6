// The fused low-rank product's two halves, written once with GCC vector extensions and compiled per ISA like
// kernels_impl.h: the including unit defines FXR_LR_ISA (its namespace), FXR_LR_TABLE,
// FXR_VEC_BYTES and the register tile FXR_LR_MR rows x FXR_LR_NV vectors (FXR_LR_NV * lanes: the panel width).
// Nothing from the standard library is
// instantiated here, so no code built for one ISA can be picked by the linker for another.
#include <cstdint>

#include "lowrank.h"

namespace fxreduce {
namespace native {
namespace FXR_LR_ISA {

template <typename T>
struct Vec {
  typedef T V __attribute__((vector_size(FXR_VEC_BYTES)));
  static constexpr int lanes = FXR_VEC_BYTES / sizeof(T);
  static constexpr int64_t panel = FXR_LR_NV * lanes;
};

#include "simd_inl.h"
inline int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------------
// Packing a factor stored transposed (src(j, c) = src[c*ld + j], contiguous over j, as both nn.Linear-style
// weights are) into panels: L x L blocks transposed in registers (simd_inl.h), one vector load and store per L
// elements.
//
// Panel `panel` of the (rows x cols) matrix src(j, c) = src[c*ld + j]: columns [panel*W, panel*W + W) of every
// row at dst, row stride = the panel's width rounded up to whole vectors, zero-padded.
template <typename T>
void pack_panel(const T* src, int64_t rows, int64_t cols, int64_t ld, int64_t panel, T* dst) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::lanes;
  constexpr int64_t W = Vec<T>::panel;
  const int64_t c0 = panel * W, width = smaller(W, cols - c0), stored = (width + L - 1) / L * L;
  int64_t e0 = 0;
  for (; e0 + L <= width; e0 += L) {
    const T* in = src + (c0 + e0) * ld;
    int64_t j0 = 0;
    for (; j0 + L <= rows; j0 += L) {
      V m[L];
      for (int i = 0; i < L; ++i) m[i] = load<V>(in + i * ld + j0);
      transpose<L / 2, L>(m);
      for (int i = 0; i < L; ++i) store(dst + (j0 + i) * stored + e0, m[i]);
    }
    for (; j0 < rows; ++j0)
      for (int i = 0; i < L; ++i) dst[j0 * stored + e0 + i] = in[i * ld + j0];
  }
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t e = e0; e < width; ++e) dst[j * stored + e] = src[(c0 + e) * ld + j];
    for (int64_t e = width; e < stored; ++e) dst[j * stored + e] = T(0);
  }
}

// c_rows[r][0 .. NVt*L) = init + sum_k A[r*lda + k] * B[k*NVt*L ..]: an MRt x NVt-vector register tile over one
// packed panel (row stride NVt*L). init: a bias row to start from, or nullptr for zero.
template <typename T, int MRt, int NVt>
inline void tile(int64_t K, const T* A, int64_t lda, const T* B, const T* init, T* const* c_rows) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::lanes;
  V acc[MRt][NVt];
  for (int v = 0; v < NVt; ++v) {
    const V start = init ? load<V>(init + v * L) : V();
    for (int r = 0; r < MRt; ++r) acc[r][v] = start;
  }
  for (int64_t k = 0; k < K; ++k) {
    V bv[NVt];
    for (int v = 0; v < NVt; ++v) bv[v] = load<V>(B + k * NVt * L + v * L);
    for (int r = 0; r < MRt; ++r) {
      const T s = A[r * lda + k];
      for (int v = 0; v < NVt; ++v) acc[r][v] += s * bv[v];
    }
  }
  for (int r = 0; r < MRt; ++r)
    for (int v = 0; v < NVt; ++v) store(c_rows[r] + v * L, acc[r][v]);
}

template <typename T, int NVt, int MRt>
inline void tile_rows(int rows, int64_t K, const T* A, int64_t lda, const T* B, const T* init, T* const* c_rows) {
  if constexpr (MRt > 0) {
    if (rows == MRt) return tile<T, MRt, NVt>(K, A, lda, B, init, c_rows);
    tile_rows<T, NVt, MRt - 1>(rows, K, A, lda, B, init, c_rows);
  }
}

template <typename T, int NVt>
inline void tile_of(int vectors, int rows, int64_t K, const T* A, int64_t lda, const T* B, const T* init,
                    T* const* c_rows) {
  if constexpr (NVt > 0) {
    if (vectors == NVt) return tile_rows<T, NVt, FXR_LR_MR>(rows, K, A, lda, B, init, c_rows);
    tile_of<T, NVt - 1>(vectors, rows, K, A, lda, B, init, c_rows);
  }
}

// t = x V^T for rows [m_begin, m_end), V^T panels [panel_begin, panel_end). Whole vectors are written: the
// padding columns of V^T are zero and t's row stride covers whole panels.
template <typename T>
void intermediate(const LowRankProduct<T>& p, int64_t m_begin, int64_t m_end, int64_t panel_begin, int64_t panel_end,
                  T* t, int64_t ldt) {
  constexpr int L = Vec<T>::lanes;
  constexpr int64_t W = Vec<T>::panel;
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    const int64_t c0 = panel * W;
    const int vectors = static_cast<int>((smaller(W, p.R - c0) + L - 1) / L);
    const T* B = p.vt + panel * p.K * W;
    for (int64_t m = m_begin; m < m_end; m += FXR_LR_MR) {
      const int rows = static_cast<int>(smaller(FXR_LR_MR, m_end - m));
      T* c_rows[FXR_LR_MR];
      for (int r = 0; r < rows; ++r) c_rows[r] = t + (m - m_begin + r) * ldt + c0;
      tile_of<T, FXR_LR_NV>(vectors, rows, p.K, p.x + m * p.ldx, p.ldx, B, nullptr, c_rows);
    }
  }
}

// out = bias + t U^T for rows [m_begin, m_end) (t's row 0 is row m_begin) and the columns of U^T panel `panel`,
// packed at ut_panel: the bias is the accumulators' start, so the output is written once. A last panel narrower
// than its whole vectors goes through a local tile.
template <typename T>
void output(const LowRankProduct<T>& p, const T* t, int64_t ldt, int64_t m_begin, int64_t m_end, int64_t panel,
            const T* ut_panel) {
  constexpr int L = Vec<T>::lanes;
  constexpr int64_t W = Vec<T>::panel;
  T local[FXR_LR_MR * W];
  const int64_t c0 = panel * W, width = smaller(W, p.N - c0);
  const int vectors = static_cast<int>((width + L - 1) / L);
  const bool partial = width < vectors * L;
  for (int64_t m = m_begin; m < m_end; m += FXR_LR_MR) {
    const int rows = static_cast<int>(smaller(FXR_LR_MR, m_end - m));
    T* c_rows[FXR_LR_MR];
    for (int r = 0; r < rows; ++r) c_rows[r] = partial ? local + r * W : p.out + (m + r) * p.ldo + c0;
    tile_of<T, FXR_LR_NV>(vectors, rows, p.R, t + (m - m_begin) * ldt, ldt, ut_panel, p.bias + c0, c_rows);
    if (partial)
      for (int r = 0; r < rows; ++r)
        for (int64_t e = 0; e < width; ++e) p.out[(m + r) * p.ldo + c0 + e] = local[r * W + e];
  }
}

template <typename T>
void panel(const T* a, int64_t lda, int64_t rows, int64_t K, const T* b, const T* init, T* out, int64_t ldo,
           int64_t width) {
  constexpr int L = Vec<T>::lanes;
  constexpr int64_t W = Vec<T>::panel;
  T local[FXR_LR_MR * W];
  const int vectors = static_cast<int>((width + L - 1) / L);
  const bool partial = width < vectors * L;
  for (int64_t m = 0; m < rows; m += FXR_LR_MR) {
    const int tile_rows = static_cast<int>(smaller(FXR_LR_MR, rows - m));
    T* c_rows[FXR_LR_MR];
    for (int r = 0; r < tile_rows; ++r) c_rows[r] = partial ? local + r * W : out + (m + r) * ldo;
    tile_of<T, FXR_LR_NV>(vectors, tile_rows, K, a + m * lda, lda, b, init, c_rows);
    if (partial)
      for (int r = 0; r < tile_rows; ++r)
        for (int64_t e = 0; e < width; ++e) out[(m + r) * ldo + e] = local[r * W + e];
  }
}

}  // namespace FXR_LR_ISA

extern const LowRankTable FXR_LR_TABLE = {
    FXR_LR_MR,
    static_cast<int>(FXR_LR_ISA::Vec<float>::panel),
    &FXR_LR_ISA::pack_panel<float>,
    &FXR_LR_ISA::pack_panel<double>,
    &FXR_LR_ISA::intermediate<float>,
    &FXR_LR_ISA::intermediate<double>,
    &FXR_LR_ISA::output<float>,
    &FXR_LR_ISA::output<double>,
    &FXR_LR_ISA::panel<float>,
    &FXR_LR_ISA::panel<double>,
};

}  // namespace native
}  // namespace fxreduce
