// The kernels, written once with GCC vector extensions and compiled once per ISA: the including unit
// defines FXR_ISA (its namespace), FXR_TABLE (the table's name), FXR_VEC_BYTES (register width), FXR_MR x
// FXR_NV (the rows_gemm register tile: rows x vectors) and FXR_DM x FXR_DJ (the row_dots tile). Everything
// lives in the per-ISA namespace and nothing from the standard library is instantiated here, so no code
// built for one ISA can be picked by the linker for another.
#include <cmath>
#include <cstdint>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace fxreduce {
namespace native {
namespace FXR_ISA {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(FXR_VEC_BYTES)));
  typedef int32_t I __attribute__((vector_size(FXR_VEC_BYTES)));
  static constexpr int lanes = FXR_VEC_BYTES / 4;
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(FXR_VEC_BYTES)));
  static constexpr int lanes = FXR_VEC_BYTES / 8;
};

#include "simd_inl.h"
inline int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

// Heap scratch owned by one call (no static buffers: calls may run concurrently). Zeroed unless the caller
// writes every element it reads.
template <typename T>
struct Scratch {
  T* data;
  explicit Scratch(int64_t n, bool zeroed = true) : data(zeroed ? new T[n > 0 ? n : 1]() : new T[n > 0 ? n : 1]) {}
  ~Scratch() { delete[] data; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ---------------------------------------------------------------------------------------------------
// rows_gemm: an MRt x (NVt vectors) register tile; B rows read through the index, the next ones prefetched.
constexpr int kPrefetchDistance = 8;
// Packed panel rows of B (ldb = the tile's width, read in order) are requested this many rows ahead where the
// ISA's unit sets FXR_STREAM_PREFETCH (0: the hardware prefetcher alone). A recurrent weight larger than L2
// streams from L3 for each step's first row tile: on a Zen 3 (AVX2) at H=650 the hardware prefetcher alone
// left the kernel waiting on B in 23% of its samples, 6% with this. Dense and indexed B (the indirect-K ops)
// are left out: mostly cached, they only paid for the extra instruction. The AVX-512 kernel reads 4 lines of B
// per row (a sequence the hardware follows) and ran near the FMA peak without it; it is not measured with it.
#ifndef FXR_STREAM_PREFETCH
#define FXR_STREAM_PREFETCH 0
#endif
constexpr int kStreamPrefetchDistance = FXR_STREAM_PREFETCH;

// How a tile reads A(m, j) = A[m*a_row + j*a_col]: a weight gradient's x^T or dgates^T has its tile's rows
// side by side (a_row == 1: one pointer, constant offsets), a forward's x has contiguous rows (a_col == 1:
// one pointer per row), anything else goes through the strides. With the general form the AVX2 loop spent
// as many instructions on addresses as on FMAs and ran at 60% of the FMA peak.
enum class ALayout { kAdjacentRows, kContiguousRows, kStrided };

// acc += A(tile rows, [0, K)) x B(rows b_index[j] or j, the tile's columns). Indexed B rows are prefetched
// kPrefetchDistance ahead in a loop of their own, so the last rows' loop carries no test.
template <typename T, int MRt, int NVt, ALayout Layout>
__attribute__((always_inline)) inline void k_loop(typename Vec<T>::V (&acc)[MRt][NVt], const T* A, int64_t a_row,
                                                  int64_t a_col, int64_t K, const T* b_base, int64_t ldb,
                                                  const int64_t* b_index) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::lanes;
  const T* a_rows[MRt];
  for (int r = 0; r < MRt; ++r) a_rows[r] = A + r * a_row;
  auto step = [&](int64_t j, const T* b) __attribute__((always_inline)) {
    V bv[NVt];
    for (int v = 0; v < NVt; ++v) bv[v] = load<V>(b + v * L);
    for (int r = 0; r < MRt; ++r) {
      const T s = Layout == ALayout::kAdjacentRows    ? A[j * a_col + r]
                  : Layout == ALayout::kContiguousRows ? a_rows[r][j]
                                                       : a_rows[r][j * a_col];
      for (int v = 0; v < NVt; ++v) acc[r][v] += s * bv[v];
    }
  };
  constexpr int kTileBytes = NVt * FXR_VEC_BYTES;
  if (b_index) {
    int64_t j = 0;
    for (; j + kPrefetchDistance < K; ++j) {
      const char* next = reinterpret_cast<const char*>(b_base + b_index[j + kPrefetchDistance] * ldb);
      for (int byte = 0; byte < kTileBytes; byte += 64) __builtin_prefetch(next + byte);
      step(j, b_base + b_index[j] * ldb);
    }
    for (; j < K; ++j) step(j, b_base + b_index[j] * ldb);
  } else if (kStreamPrefetchDistance > 0 && ldb == NVt * L) {
    int64_t j = 0;
    for (; j + kStreamPrefetchDistance < K; ++j) {
      const char* next = reinterpret_cast<const char*>(b_base + (j + kStreamPrefetchDistance) * ldb);
      for (int byte = 0; byte < kTileBytes; byte += 64) __builtin_prefetch(next + byte);
      step(j, b_base + j * ldb);
    }
    for (; j < K; ++j) step(j, b_base + j * ldb);
  } else {
    for (int64_t j = 0; j < K; ++j) step(j, b_base + j * ldb);
  }
}

template <typename T, int MRt, int NVt>
inline void row_tile(const RowsGemm<T>& a, const T* A, int64_t K, const T* b_base, int64_t ldb,
                     const int64_t* b_index, T* const* c_rows, const T* const* d_rows) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::lanes;
  V acc[MRt][NVt];
  for (int r = 0; r < MRt; ++r)
    for (int v = 0; v < NVt; ++v) acc[r][v] = V();
  // The epilogue's rows of D, requested now so that they arrive during the K loop: in the LSTM's step GEMM, D
  // is the step's input projection, far from any cache, and its first load stalled the epilogue (a quarter of
  // the AVX2 kernel's samples at H=200). The last byte's line too, for rows that straddle two. C is not
  // prefetched: its stores do not stall, and a write-intent prefetch of a line a neighbouring column tile
  // (another thread's) shares would pull it away from that thread.
  constexpr int kTileBytes = NVt * FXR_VEC_BYTES;
  for (int r = 0; r < MRt; ++r) {
    if (!d_rows[r]) continue;
    for (int byte = 0; byte < kTileBytes + 64; byte += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(d_rows[r]) + (byte < kTileBytes ? byte : kTileBytes - 1));
  }
  if (a.a_row == 1)
    k_loop<T, MRt, NVt, ALayout::kAdjacentRows>(acc, A, a.a_row, a.a_col, K, b_base, ldb, b_index);
  else if (a.a_col == 1)
    k_loop<T, MRt, NVt, ALayout::kContiguousRows>(acc, A, a.a_row, a.a_col, K, b_base, ldb, b_index);
  else
    k_loop<T, MRt, NVt, ALayout::kStrided>(acc, A, a.a_row, a.a_col, K, b_base, ldb, b_index);
  for (int r = 0; r < MRt; ++r)
    for (int v = 0; v < NVt; ++v) {
      V out = acc[r][v] * a.alpha;
      if (d_rows[r]) out += load<V>(d_rows[r] + v * L);
      store(c_rows[r] + v * L, out);
    }
}

template <typename T, int NVt, int MRt>
inline void row_tile_of(int rows, const RowsGemm<T>& a, const T* A, int64_t K, const T* b_base, int64_t ldb,
                        const int64_t* b_index, T* const* c_rows, const T* const* d_rows) {
  if constexpr (MRt > 0) {
    if (rows == MRt) return row_tile<T, MRt, NVt>(a, A, K, b_base, ldb, b_index, c_rows, d_rows);
    row_tile_of<T, NVt, MRt - 1>(rows, a, A, K, b_base, ldb, b_index, c_rows, d_rows);
  }
}

// K is taken in chunks of at most this many rows of B, each chunk over every row tile before the next: a
// chunk of a column tile (768 x 64 floats, 192 KiB) stays in L2 while the row tiles read it, where a whole
// K = 4H = 2600 tile (666 KiB) was evicted part-way by the A rows streaming past it (docs/benchmarks.md,
// "Design measurements"). Later chunks add into C.
constexpr int64_t kMaxKChunk = 768;

// All rows of group g for the columns [c, c + width), width <= NVt vectors, or for `tiles` adjacent full tiles
// from c (B's and C's columns the tile's width apart; with a tile_stride, B's tiles are that many elements
// apart instead, as pack_block lays them out). A narrower tile is computed into a local buffer (B
// zero-padded to whole vectors in b_base) and its first `width` columns written back. A row tile's rows are
// looked up once for all its column tiles: with a per-step keep set the weight gradient's K is the step's 20
// rows, and that set-up took a third of the AVX2 kernel's samples when it ran once per column tile.
template <typename T, int NVt>
inline void group_columns(const RowsGemm<T>& a, int64_t g, int64_t c, const T* b_base, int64_t ldb,
                          const int64_t* b_index, int64_t width, int64_t tiles = 1, int64_t tile_stride = 0) {
  constexpr int64_t full = NVt * Vec<T>::lanes;
  if (a.M == 0) return;
  const bool partial = width < full;
  T local[FXR_MR * full];
  const int64_t chunks = a.K > kMaxKChunk ? (a.K + kMaxKChunk - 1) / kMaxKChunk : 1;
  const int64_t chunk = (a.K + chunks - 1) / chunks;
  // The fewest row tiles of at most FXR_MR rows, their heights differing by at most one: a step's 20 rows
  // run as 5 + 5 + 5 + 5 on the 6-row AVX2 tile, not 6 + 6 + 6 + 2, whose 2-row tile has too few
  // independent accumulators to cover the FMA latency.
  const int64_t row_tiles = (a.M + FXR_MR - 1) / FXR_MR, shorter = a.M / row_tiles, taller = a.M % row_tiles;
  for (int64_t part = 0; part < chunks; ++part) {
    const int64_t k0 = part * chunk, K = smaller(chunk, a.K - k0);
    const T* chunk_b = b_index ? b_base : b_base + k0 * ldb;
    const int64_t* chunk_index = b_index ? b_index + k0 : nullptr;
    for (int64_t row_tile_number = 0, m = 0; row_tile_number < row_tiles; ++row_tile_number) {
      const int rows = static_cast<int>(shorter + (row_tile_number < taller ? 1 : 0));
      T* out_rows[FXR_MR];
      const T* add_rows[FXR_MR];
      for (int r = 0; r < rows; ++r) {
        const int64_t row = m + r;
        const int64_t c_row = a.c_index ? a.c_index[g * a.c_index_group + row] : row;
        out_rows[r] = a.C + g * a.c_group + c_row * a.ldc + c;
        const bool stores = a.c_first && a.c_first[g * a.c_index_group + row];
        add_rows[r] = k0 > 0 ? out_rows[r]
                      : a.accumulate ? (stores ? nullptr : out_rows[r])
                      : a.D ? a.D + g * a.d_group + row * a.ldd + c : nullptr;
      }
      const T* tile_a = a.A + g * a.a_group + m * a.a_row + k0 * a.a_col;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t shift = tile * full;
        T* c_rows[FXR_MR];
        const T* d_rows[FXR_MR];
        for (int r = 0; r < rows; ++r) {
          c_rows[r] = partial ? local + r * full : out_rows[r] + shift;
          d_rows[r] = partial || !add_rows[r] ? nullptr : add_rows[r] + shift;
        }
        const T* tile_b = chunk_b + (tile_stride ? tile * tile_stride : shift);
        row_tile_of<T, NVt, FXR_MR>(rows, a, tile_a, K, tile_b, ldb, chunk_index, c_rows, d_rows);
      }
      if (partial) {
        for (int r = 0; r < rows; ++r)
          for (int64_t e = 0; e < width; ++e)
            out_rows[r][e] = local[r * full + e] + (add_rows[r] ? add_rows[r][e] : T(0));
      }
      m += rows;
    }
  }
}

template <typename T, int NVt>
inline void group_columns_of(int vectors, const RowsGemm<T>& a, int64_t g, int64_t c, const T* b_base, int64_t ldb,
                             const int64_t* b_index, int64_t width) {
  if constexpr (NVt > 0) {
    if (vectors == NVt) return group_columns<T, NVt>(a, g, c, b_base, ldb, b_index, width);
    group_columns_of<T, NVt - 1>(vectors, a, g, c, b_base, ldb, b_index, width);
  }
}

// A group's A rows are reused across 256 bytes of output columns before the next group is read: one tile of
// the AVX-512 build, four of the AVX2 build's 64-byte tiles. With one AVX2 tile per pass, every column tile
// streamed all groups' A again (560 KiB at H=200, past L2), and two threads ran the forward at 1.1x one.
constexpr int64_t kColumnBlockTiles = 256 / (FXR_NV * FXR_VEC_BYTES) > 1 ? 256 / (FXR_NV * FXR_VEC_BYTES) : 1;

// From this many rows of B (K) on, the AVX2 build copies each group's block of B (the rows it reads, through
// the index, for the block's column tiles) into tile-major panels before its row tiles read them: a tile then
// streams one contiguous panel, prefetched ahead, instead of one 64-byte piece of each of K rows a row
// stride apart. 0: never.
#ifndef FXR_PACK_B_FROM_ROWS
#define FXR_PACK_B_FROM_ROWS 0
#endif
constexpr int64_t kPackBFromRows = FXR_PACK_B_FROM_ROWS;

// dst[(t*K + j)*W + e] = B(row j, column t*W + e) for `tiles` tiles of W columns: row j is b[j*ldb] or
// b[index[j]*ldb].
template <typename T>
inline void pack_block(const T* b, int64_t ldb, const int64_t* index, int64_t K, int64_t tiles, T* dst) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::lanes;
  constexpr int64_t W = FXR_NV * L;
  for (int64_t j = 0; j < K; ++j) {
    const T* row = b + (index ? index[j] : j) * ldb;
    for (int64_t t = 0; t < tiles; ++t)
      for (int v = 0; v < FXR_NV; ++v) store(dst + (t * K + j) * W + v * L, load<V>(row + t * W + v * L));
  }
}

template <typename T>
void rows_gemm(const RowsGemm<T>& a, int64_t c_begin, int64_t c_end) {
  constexpr int L = Vec<T>::lanes;
  constexpr int64_t W = FXR_NV * L;
  auto index_of = [&](int64_t g) { return a.b_index ? a.b_index + g * a.b_index_group : nullptr; };
  if (a.b_panel_rows) {
    for (int64_t c = c_begin; c < c_end; c += W) {
      const int64_t width = smaller(W, c_end - c), vectors = (width + L - 1) / L;
      const T* panel = a.B + (c / W) * a.b_panel_rows * W;
      for (int64_t g = 0; g < a.groups; ++g)
        group_columns_of<T, FXR_NV>(static_cast<int>(vectors), a, g, c, panel + g * a.b_group, vectors * L,
                                    index_of(g), width);
    }
    return;
  }
  int64_t c = c_begin;
  // Packing needs a scratch block only when a whole column tile follows; pack_block writes what is read.
  const bool pack = kPackBFromRows > 0 && a.K >= kPackBFromRows && c + W <= c_end;
  Scratch<T> block(pack ? a.K * W * kColumnBlockTiles : 0, /*zeroed=*/false);
  // Column blocks outer, groups inner: the block's (K x W) panels of B stay in cache across every group (time
  // step), and each row tile of a group's A serves all the block's column tiles in turn (measured faster than
  // running each column tile over all row tiles, even where the block's B does not fit in L1).
  while (c + W <= c_end) {
    const int64_t tiles = smaller(kColumnBlockTiles, (c_end - c) / W);
    for (int64_t g = 0; g < a.groups; ++g) {
      const T* b = a.B + g * a.b_group + c;
      if (pack) {
        pack_block(b, a.ldb, index_of(g), a.K, tiles, block.data);
        group_columns<T, FXR_NV>(a, g, c, block.data, W, nullptr, W, tiles, a.K * W);
      } else {
        group_columns<T, FXR_NV>(a, g, c, b, a.ldb, index_of(g), W, tiles);
      }
    }
    c += tiles * W;
  }
  for (; c + L <= c_end; c += L)
    for (int64_t g = 0; g < a.groups; ++g)
      group_columns<T, 1>(a, g, c, a.B + g * a.b_group + c, a.ldb, index_of(g), L);
  if (c < c_end) {
    const int64_t tail = c_end - c;
    Scratch<T> packed(a.K * L);
    for (int64_t g = 0; g < a.groups; ++g) {
      const int64_t* index = index_of(g);
      for (int64_t j = 0; j < a.K; ++j) {
        const T* b = a.B + g * a.b_group + (index ? index[j] : j) * a.ldb + c;
        for (int64_t e = 0; e < tail; ++e) packed.data[j * L + e] = b[e];
      }
      group_columns<T, 1>(a, g, c, packed.data, L, nullptr, tail);
    }
  }
}

template <typename T>
void pack_panels(const Panels<T>& p, int64_t panel_begin, int64_t panel_end) {
  constexpr int L = Vec<T>::lanes;
  constexpr int64_t W = FXR_NV * L;
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    const int64_t c0 = panel * W, width = smaller(W, p.cols - c0), stored = (width + L - 1) / L * L;
    T* out = p.dst + panel * p.rows * W;
    if (p.row_stride == 1 && p.col_stride != 1) {
      // A transposed source (W_hh.t()): L x L tiles of its contiguous runs, transposed in registers. Element
      // by element, every write would land on another row of the panel.
      typedef typename Vec<T>::V V;
      int64_t e = 0;
      for (; e + L <= width; e += L) {
        const T* in = p.src + (c0 + e) * p.col_stride;
        int64_t j = 0;
        for (; j + L <= p.rows; j += L) {
          V m[L];
          for (int i = 0; i < L; ++i) m[i] = load<V>(in + i * p.col_stride + j);
          transpose<L / 2, L>(m);
          for (int i = 0; i < L; ++i) store(out + (j + i) * stored + e, m[i]);
        }
        for (; j < p.rows; ++j)
          for (int i = 0; i < L; ++i) out[j * stored + e + i] = in[i * p.col_stride + j];
      }
      for (; e < width; ++e) {
        const T* in = p.src + (c0 + e) * p.col_stride;
        for (int64_t j = 0; j < p.rows; ++j) out[j * stored + e] = in[j];
      }
    } else {
      for (int64_t j = 0; j < p.rows; ++j)
        for (int64_t e = 0; e < width; ++e) out[j * stored + e] = p.src[j * p.row_stride + (c0 + e) * p.col_stride];
    }
    for (int64_t j = 0; j < p.rows; ++j)
      for (int64_t e = width; e < stored; ++e) out[j * stored + e] = T(0);
  }
}

// ---------------------------------------------------------------------------------------------------
// row_dots: an FXR_DM x FXR_DJ tile of dot products over contiguous rows.
// v[0] lane i := the sum of v[i]'s lanes, for L vectors: log2(L) stages, each merging vector i with vector
// i + H into one whose lanes with bit H clear hold pairwise sums of the first and the others of the second.
// L - 1 merges (two shuffles and an add each) for L sums, where lane-by-lane sums take L - 1 adds per sum.
template <int H, int L, typename V>
__attribute__((always_inline)) inline void fold_sums(V* v) {
  if constexpr (H > 0) {
    for (int i = 0; i < H; ++i)
      v[i] = low_half<H, L>(v[i], v[i + H], typename MakeLanes<L>::type()) +
             high_half<H, L>(v[i], v[i + H], typename MakeLanes<L>::type());
    fold_sums<H / 2, L>(v);
  }
}

template <typename T, int DMt, int DJt>
inline void dot_tile(const RowDots<T>& a, int64_t g, int64_t m, int64_t j) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::lanes;
  const T* A[DMt];
  const T* B[DJt];
  for (int r = 0; r < DMt; ++r) A[r] = a.A + g * a.a_group + (m + r) * a.lda;
  for (int s = 0; s < DJt; ++s) {
    const int64_t row = a.b_index ? a.b_index[g * a.b_index_group + j + s] : j + s;
    B[s] = a.B + g * a.b_group + row * a.ldb;
  }
  V acc[DMt][DJt];
  for (int r = 0; r < DMt; ++r)
    for (int s = 0; s < DJt; ++s) acc[r][s] = V();
  int64_t c = 0;
  for (; c + L <= a.K; c += L) {
    V av[DMt];
    for (int r = 0; r < DMt; ++r) av[r] = load<V>(A[r] + c);
    for (int s = 0; s < DJt; ++s) {
      const V bv = load<V>(B[s] + c);
      for (int r = 0; r < DMt; ++r) acc[r][s] += av[r] * bv;
    }
  }
  constexpr int n = DMt * DJt;
  T sums[n];
  for (int first = 0; first < n; first += L) {
    V v[L];
    for (int q = 0; q < L; ++q) v[q] = first + q < n ? acc[(first + q) / DJt][(first + q) % DJt] : V();
    fold_sums<L / 2, L>(v);
    for (int q = 0; q < L && first + q < n; ++q) sums[first + q] = v[0][q];
  }
  for (int r = 0; r < DMt; ++r)
    for (int s = 0; s < DJt; ++s) {
      T sum = sums[r * DJt + s];
      for (int64_t e = c; e < a.K; ++e) sum += A[r][e] * B[s][e];
      const int64_t col = a.c_cols ? a.c_cols[g * a.c_cols_group + j + s] : j + s;
      T* out = a.C + g * a.c_group + (m + r) * a.ldc + col;
      *out = a.accumulate ? *out + a.alpha * sum : a.alpha * sum;
    }
}

template <typename T, int DJt, int DMt>
inline void dot_tile_of(int rows, const RowDots<T>& a, int64_t g, int64_t m, int64_t j) {
  if constexpr (DMt > 0) {
    if (rows == DMt) return dot_tile<T, DMt, DJt>(a, g, m, j);
    dot_tile_of<T, DJt, DMt - 1>(rows, a, g, m, j);
  }
}

// B rows outer, A rows inner: the FXR_DJ rows of B a tile reads (a slice of W^T: 4H floats each) are read
// from memory once and then from cache for every row tile, instead of all of B once per row tile.
template <typename T>
void row_dots(const RowDots<T>& a, int64_t j_begin, int64_t j_end) {
  for (int64_t g = 0; g < a.groups; ++g) {
    int64_t j = j_begin;
    for (; j + FXR_DJ <= j_end; j += FXR_DJ)
      for (int64_t m = 0; m < a.M; m += FXR_DM)
        dot_tile_of<T, FXR_DJ, FXR_DM>(static_cast<int>(smaller(FXR_DM, a.M - m)), a, g, m, j);
    for (; j < j_end; ++j)
      for (int64_t m = 0; m < a.M; m += FXR_DM)
        dot_tile_of<T, 1, FXR_DM>(static_cast<int>(smaller(FXR_DM, a.M - m)), a, g, m, j);
  }
}

// ---------------------------------------------------------------------------------------------------
// The LSTM cell. float32: vectorised exp (Cephes' expf: range reduction by ln 2, degree-6 polynomial,
// about 1 ulp) and a tanh that keeps its relative accuracy near 0; float64: libm, scalar.
typedef typename Vec<float>::V VF;
typedef typename Vec<float>::I VI;

inline VF splat(float s) { return VF() + s; }

inline VF vexp(VF x) {
  x = x > splat(88.3762626647949f) ? splat(88.3762626647949f) : x;
  x = x < splat(-87.3365447504f) ? splat(-87.3365447504f) : x;
  const VF magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  VF n = (x * 1.44269504088896341f + magic) - magic;
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  VF y = splat(1.9875691500E-4f);
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * (x * x) + x + 1.0f;
  VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  VF scale;
  __builtin_memcpy(&scale, &bits, sizeof(VF));
  return y * scale;
}

// 1 / x: the ISA's reciprocal estimate (14 or 12 bits) and one Newton step (28 or 24 bits), where a division
// costs several FMAs' time; five per vector of units made divisions the cell's largest cost.
inline VF vreciprocal(VF x) {
#if FXR_VEC_BYTES == 64 && defined(__AVX512F__)
  const VF r = (VF)_mm512_rcp14_ps((__m512)x);
  return r + r * (1.0f - x * r);
#elif FXR_VEC_BYTES == 32 && defined(__AVX__)
  const VF r = (VF)_mm256_rcp_ps((__m256)x);
  return r + r * (1.0f - x * r);
#else
  return 1.0f / x;
#endif
}

inline VF vsigmoid(VF x) { return vreciprocal(1.0f + vexp(-x)); }

// tanh(x) = 2 sigmoid(2x) - 1, as the torch path computes it: one exponential and one reciprocal. Near 0 its
// error is absolute (~1e-7), not relative.
inline VF vtanh(VF x) { return 2.0f * vsigmoid(2.0f * x) - 1.0f; }

// The gates of `units` units: i, f, o sigmoids and g a tanh, written back as activations, then the cell state,
// its tanh and the output. A last partial vector runs on zero-padded copies.
void cell_forward_f(int64_t H, int64_t units, float* gates, const float* c_prev, float* c, float* tanh_c, float* h) {
  constexpr int L = Vec<float>::lanes;
  float *gi = gates, *gf = gates + H, *gg = gates + 2 * H, *go = gates + 3 * H;
  auto cells = [](float* i_p, float* f_p, float* g_p, float* o_p, const float* c_prev_p, float* c_p, float* tc_p,
                  float* h_p) {
    const VF i = vsigmoid(load<VF>(i_p)), f = vsigmoid(load<VF>(f_p));
    const VF g = vtanh(load<VF>(g_p)), o = vsigmoid(load<VF>(o_p));
    const VF cell = f * load<VF>(c_prev_p) + i * g;
    const VF tc = vtanh(cell);
    store(i_p, i);
    store(f_p, f);
    store(g_p, g);
    store(o_p, o);
    store(c_p, cell);
    store(tc_p, tc);
    store(h_p, o * tc);
  };
  int64_t u = 0;
  for (; u + L <= units; u += L) cells(gi + u, gf + u, gg + u, go + u, c_prev + u, c + u, tanh_c + u, h + u);
  if (u < units) {
    const int64_t rest = units - u;
    float part[8][L] = {};
    for (int64_t e = 0; e < rest; ++e) {
      part[0][e] = gi[u + e], part[1][e] = gf[u + e], part[2][e] = gg[u + e], part[3][e] = go[u + e];
      part[4][e] = c_prev[u + e];
    }
    cells(part[0], part[1], part[2], part[3], part[4], part[5], part[6], part[7]);
    for (int64_t e = 0; e < rest; ++e) {
      gi[u + e] = part[0][e], gf[u + e] = part[1][e], gg[u + e] = part[2][e], go[u + e] = part[3][e];
      c[u + e] = part[5][e], tanh_c[u + e] = part[6][e], h[u + e] = part[7][e];
    }
  }
}

inline double dsigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

void cell_forward_d(int64_t H, int64_t units, double* gates, const double* c_prev, double* c, double* tanh_c,
                    double* h) {
  for (int64_t u = 0; u < units; ++u) {
    const double i = dsigmoid(gates[u]), f = dsigmoid(gates[H + u]);
    const double g = std::tanh(gates[2 * H + u]), o = dsigmoid(gates[3 * H + u]);
    const double cell = f * c_prev[u] + i * g;
    const double tc = std::tanh(cell);
    gates[u] = i, gates[H + u] = f, gates[2 * H + u] = g, gates[3 * H + u] = o;
    c[u] = cell, tanh_c[u] = tc, h[u] = o * tc;
  }
}

template <typename T>
void cell_backward(int64_t H, int64_t units, const T* acts, const T* c_prev, const T* tanh_c, const T* dh, T* dc,
                   T* dgates) {
  const T *i = acts, *f = acts + H, *g = acts + 2 * H, *o = acts + 3 * H;
  T *di = dgates, *df = dgates + H, *dg = dgates + 2 * H, *d_o = dgates + 3 * H;
  for (int64_t u = 0; u < units; ++u) {
    const T tc = tanh_c[u];
    const T total = dc[u] + dh[u] * o[u] * (T(1) - tc * tc);
    di[u] = total * g[u] * i[u] * (T(1) - i[u]);
    df[u] = total * c_prev[u] * f[u] * (T(1) - f[u]);
    dg[u] = total * i[u] * (T(1) - g[u] * g[u]);
    d_o[u] = dh[u] * tc * o[u] * (T(1) - o[u]);
    dc[u] = total * f[u];
  }
}

template <typename T>
void plane_sums(const T* x, int64_t plane, int64_t begin, int64_t end, T* abs_out, T* sum_out) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::lanes, U = 4;  // U independent accumulators hide the add latency
  for (int64_t p = begin; p < end; ++p) {
    const T* row = x + p * plane;
    V magnitude[U] = {}, signed_sum[U] = {};
    int64_t i = 0;
    for (; i + U * L <= plane; i += U * L)
      for (int u = 0; u < U; ++u) {
        const V v = load<V>(row + i + u * L);
        magnitude[u] += v < V() ? -v : v;
        signed_sum[u] += v;
      }
    for (; i + L <= plane; i += L) {
      const V v = load<V>(row + i);
      magnitude[0] += v < V() ? -v : v;
      signed_sum[0] += v;
    }
    const V a = (magnitude[0] + magnitude[1]) + (magnitude[2] + magnitude[3]);
    const V b = (signed_sum[0] + signed_sum[1]) + (signed_sum[2] + signed_sum[3]);
    T total_abs = 0, total = 0;
    for (int lane = 0; lane < L; ++lane) total_abs += a[lane], total += b[lane];
    for (; i < plane; ++i) total_abs += row[i] < 0 ? -row[i] : row[i], total += row[i];
    abs_out[p] = total_abs;
    sum_out[p] = total;
  }
}

// Bands of L source rows: L x L tiles loaded as L row vectors, transposed in registers, stored as L rows of
// the output; the band's last columns and a last band of fewer rows element by element.
template <typename T>
void transpose_bands(const T* src, int64_t rows, int64_t cols, int64_t ld, T* out, int64_t band_begin,
                     int64_t band_end) {
  typedef typename Vec<T>::V V;
  constexpr int L = Vec<T>::lanes;
  for (int64_t band = band_begin; band < band_end; ++band) {
    const int64_t r0 = band * L, height = smaller(L, rows - r0);
    int64_t c = 0;
    if (height == L) {
      for (; c + L <= cols; c += L) {
        V m[L];
        for (int i = 0; i < L; ++i) m[i] = load<V>(src + (r0 + i) * ld + c);
        transpose<L / 2, L>(m);
        for (int j = 0; j < L; ++j) store(out + (c + j) * rows + r0, m[j]);
      }
    }
    for (; c < cols; ++c)
      for (int64_t i = 0; i < height; ++i) out[c * rows + r0 + i] = src[(r0 + i) * ld + c];
  }
}

}  // namespace FXR_ISA

extern const KernelTable FXR_TABLE = {
    FXR_ISA_NAME,
    FXR_NV * FXR_ISA::Vec<float>::lanes,
    &FXR_ISA::rows_gemm<float>,
    &FXR_ISA::rows_gemm<double>,
    &FXR_ISA::pack_panels<float>,
    &FXR_ISA::pack_panels<double>,
    &FXR_ISA::row_dots<float>,
    &FXR_ISA::row_dots<double>,
    &FXR_ISA::cell_forward_f,
    &FXR_ISA::cell_forward_d,
    &FXR_ISA::cell_backward<float>,
    &FXR_ISA::cell_backward<double>,
    &FXR_ISA::plane_sums<float>,
    &FXR_ISA::plane_sums<double>,
    &FXR_ISA::transpose_bands<float>,
    &FXR_ISA::transpose_bands<double>,
    FXR_ISA::Vec<float>::lanes,
    FXR_ISA::Vec<double>::lanes,
};

}  // namespace native
}  // namespace fxreduce
