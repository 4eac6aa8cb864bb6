// torch.ops.fxreduce.*: the indirect-K GEMMs and the LSTM layer's time loop, on the ISA picked at load.
// Shapes, dtypes, devices and indices are checked here (TORCH_CHECK), so a bad call is an error, never a
// read out of bounds. Any strides: operands are made contiguous where a kernel reads rows.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "isa.h"
#include "kernels.h"

namespace fxreduce {
namespace native {
namespace {

using at::Tensor;

IsaTables<KernelTable> tables{FXR_X86_TABLE(avx512_table), FXR_X86_TABLE(avx2_table), &portable_table};

const KernelTable& kernels() { return tables.active(); }

// ------------------------------------------------------------------------------------------------------
// Checks.
void check_float(const Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "fxreduce.", op, ": ", name, " is on ", t.device(),
              "; the native kernels run on CPU tensors (other devices take the torch path)");
  TORCH_CHECK(t.scalar_type() == dtype, "fxreduce.", op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", dtype, " like the first operand (float32 or float64)");
}

void check_dtype(const Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fxreduce.", op,
              ": dtype ", t.scalar_type(), " is unsupported; the native kernels take float32 or float64");
}

void check_shape(bool ok, const char* op, const std::string& what) {
  TORCH_CHECK(ok, "fxreduce.", op, ": ", what);
}

// index: None, (k,) shared by every group, or (groups, k); values in [0, rows). Returns it contiguous.
std::optional<Tensor> checked_index(const std::optional<Tensor>& index, int64_t groups, int64_t k, int64_t rows,
                                    const char* op) {
  if (!index.has_value()) {
    check_shape(k == rows, op, "without an index the operand's width " + std::to_string(k) +
                                   " must equal the weight's rows " + std::to_string(rows));
    return std::nullopt;
  }
  const Tensor& i = *index;
  TORCH_CHECK(i.device().is_cpu(), "fxreduce.", op, ": index is on ", i.device(), "; expected a CPU tensor");
  TORCH_CHECK(i.scalar_type() == at::kLong, "fxreduce.", op, ": index has dtype ", i.scalar_type(),
              ", expected int64");
  check_shape((i.dim() == 1 && i.size(0) == k) || (i.dim() == 2 && i.size(0) == groups && i.size(1) == k), op,
              "index must have shape (" + std::to_string(k) + ",) or (" + std::to_string(groups) + ", " +
                  std::to_string(k) + "), got " + c10::str(i.sizes()));
  Tensor c = i.contiguous();
  // One pass in place of two ATen reductions: their dispatch costs more than a small kernel's check.
  const int64_t* values = c.data_ptr<int64_t>();
  if (c.numel() > 0) {
    int64_t low = values[0], high = values[0];
    for (int64_t e = 1; e < c.numel(); ++e) {
      low = std::min(low, values[e]);
      high = std::max(high, values[e]);
    }
    TORCH_CHECK(low >= 0 && high < rows, "fxreduce.", op, ": index values must lie in [0, ", rows, "), got [", low,
                ", ", high, "]");
  }
  return c;
}

int64_t index_group_stride(const std::optional<Tensor>& index) {
  return index.has_value() && index->dim() == 2 ? index->size(1) : 0;
}

const int64_t* index_data(const std::optional<Tensor>& index) {
  return index.has_value() ? index->data_ptr<int64_t>() : nullptr;
}

// A C of `rows` rows that groups scatter-accumulate into through index ((k,) shared, or (groups, k)), made
// without zeroing it all first: returns the RowsGemm::c_first flags (the first group writing a row stores
// into it) and zeroes the rows no group writes.
std::vector<uint8_t> first_writes(const std::optional<Tensor>& index, int64_t groups, const Tensor& c) {
  const int64_t k = index->size(-1), rows = c.size(0), sets = index->dim() == 2 ? groups : 1;
  const int64_t* kept = index->data_ptr<int64_t>();
  std::vector<uint8_t> first(sets * k), written(rows);
  for (int64_t i = 0; i < sets * k; ++i) {
    first[i] = !written[kept[i]];
    written[kept[i]] = 1;
  }
  for (int64_t row = 0; row < rows; ++row)
    if (!written[row]) c[row].zero_();
  return first;
}

// ------------------------------------------------------------------------------------------------------
// Drivers: split columns (rows_gemm) or dot outputs (row_dots) across threads; tiny calls stay serial.
constexpr int64_t kWorkPerTask = 1 << 16;  // multiply-adds below which a thread is not worth waking

template <typename T>
void (*rows_gemm_fn())(const RowsGemm<T>&, int64_t, int64_t) {
  const KernelTable& k = kernels();
  return std::is_same<T, float>::value ? reinterpret_cast<void (*)(const RowsGemm<T>&, int64_t, int64_t)>(k.rows_gemm_f)
                                       : reinterpret_cast<void (*)(const RowsGemm<T>&, int64_t, int64_t)>(k.rows_gemm_d);
}

template <typename T>
void (*row_dots_fn())(const RowDots<T>&, int64_t, int64_t) {
  const KernelTable& k = kernels();
  return std::is_same<T, float>::value ? reinterpret_cast<void (*)(const RowDots<T>&, int64_t, int64_t)>(k.row_dots_f)
                                       : reinterpret_cast<void (*)(const RowDots<T>&, int64_t, int64_t)>(k.row_dots_d);
}

template <typename T>
int64_t panel_width() {
  return kernels().column_tile_floats * 4 / static_cast<int64_t>(sizeof(T));
}

// src (rows, cols) with any strides, packed into column panels (Panels) in a buffer owned by the caller.
template <typename T>
Tensor pack_panels(const Tensor& src, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
  const int64_t width = panel_width<T>(), panels = (cols + width - 1) / width;
  Tensor packed = at::empty({std::max<int64_t>(1, panels * rows * width)}, src.options());
  const KernelTable& k = kernels();
  auto fn = std::is_same<T, float>::value
                ? reinterpret_cast<void (*)(const Panels<T>&, int64_t, int64_t)>(k.pack_panels_f)
                : reinterpret_cast<void (*)(const Panels<T>&, int64_t, int64_t)>(k.pack_panels_d);
  const Panels<T> p{src.data_ptr<T>(), rows, cols, row_stride, col_stride, packed.data_ptr<T>()};
  at::parallel_for(0, panels, std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, rows * width)),
                   [&](int64_t p0, int64_t p1) { fn(p, p0, p1); });
  return packed;
}

// Rows [m0, m1) of every group of a (whose C rows are not scattered), as a call of their own.
template <typename T>
RowsGemm<T> row_range(const RowsGemm<T>& a, int64_t m0, int64_t m1) {
  RowsGemm<T> part = a;
  part.M = m1 - m0;
  part.A += m0 * a.a_row;
  part.C += m0 * a.ldc;
  if (a.D) part.D += m0 * a.ldd;
  return part;
}

// out (cols, rows) := src (rows, cols; rows ld apart, each contiguous) transposed, in register tiles.
template <typename T>
void transpose_into(const T* src, int64_t rows, int64_t cols, int64_t ld, T* out) {
  using Fn = void (*)(const T*, int64_t, int64_t, int64_t, T*, int64_t, int64_t);
  const KernelTable& k = kernels();
  const bool single = std::is_same<T, float>::value;
  const Fn fn = single ? reinterpret_cast<Fn>(k.transpose_f) : reinterpret_cast<Fn>(k.transpose_d);
  const int64_t lanes = single ? k.float_lanes : k.double_lanes, bands = (rows + lanes - 1) / lanes;
  at::parallel_for(0, bands, std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, lanes * cols)),
                   [&](int64_t b0, int64_t b1) { fn(src, rows, cols, ld, out, b0, b1); });
}

// An A read down its columns (a_row == 1: a weight gradient's dgates^T or x^T) costs a cache line per row of
// the tile at every multiply-add step, again for each column tile; from this many column tiles on, one tiled
// transpose of A into rows first is cheaper (docs/benchmarks.md, "Design measurements"). A group's A smaller
// than kMinElementsToTransposeA (a per-step keep set's N x k) stays in cache anyway.
constexpr int64_t kMinColumnTilesToTransposeA = 6;
constexpr int64_t kMinElementsToTransposeA = 1 << 16;

// Split by column tiles; a tall GEMM with few tiles (a weight gradient's H columns: 11 tiles of 64 at
// H=650 give one thread 6 and the other 5, the last one narrow) splits its rows instead, unless an index
// scatters them (two rows may then land on one row of C).
constexpr int64_t kMinRowsPerThreadForRowSplit = 64;

template <typename T>
void run_rows_gemm(const RowsGemm<T>& args, int64_t columns) {
  const int64_t tile = panel_width<T>();
  const int64_t blocks = (columns + tile - 1) / tile;
  if (args.a_row == 1 && args.a_col > 1 && args.M * args.K >= kMinElementsToTransposeA &&
      blocks >= kMinColumnTilesToTransposeA) {
    const int64_t copies = args.a_group == 0 ? 1 : args.groups;
    Tensor rows_of_a = at::empty({copies, args.M, args.K}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    T* out = rows_of_a.data_ptr<T>();
    for (int64_t g = 0; g < copies; ++g)
      transpose_into<T>(args.A + g * args.a_group, args.K, args.M, args.a_col, out + g * args.M * args.K);
    RowsGemm<T> by_rows = args;
    by_rows.A = out;
    by_rows.a_group = copies == 1 ? 0 : args.M * args.K;
    by_rows.a_row = args.K;
    by_rows.a_col = 1;
    return run_rows_gemm(by_rows, columns);
  }
  auto fn = rows_gemm_fn<T>();
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && !args.c_index && blocks < 8 * threads && args.M >= kMinRowsPerThreadForRowSplit * threads) {
    const int64_t per_row = std::max<int64_t>(1, args.groups * args.K * columns);
    at::parallel_for(0, args.M, std::max<int64_t>(1, kWorkPerTask / per_row), [&](int64_t m0, int64_t m1) {
      fn(row_range(args, m0, m1), 0, columns);
    });
    return;
  }
  const int64_t per_block = std::max<int64_t>(1, args.groups * args.M * args.K * tile);
  const int64_t grain = std::max<int64_t>(1, kWorkPerTask / per_block);
  if (threads > 1 && !args.b_panel_rows && blocks % threads != 0 && blocks < 8 * threads && grain < blocks) {
    // Few tiles that do not divide among the threads (W^T of 800 columns: 13 tiles of 64, 7 for one thread
    // and 6 for the other): one range per thread, equal to a vector, the last tiles of each range narrower.
    const int64_t lanes = sizeof(T) == 4 ? kernels().float_lanes : kernels().double_lanes;
    const int64_t per_thread = ((columns + threads - 1) / threads + lanes - 1) / lanes * lanes;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      fn(args, std::min(t0 * per_thread, columns), std::min(t1 * per_thread, columns));
    });
    return;
  }
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    fn(args, b0 * tile, std::min(b1 * tile, columns));
  });
}

template <typename T>
void run_row_dots(const RowDots<T>& args) {
  const int64_t per_j = std::max<int64_t>(1, args.groups * args.M * args.K);
  const int64_t grain = std::max<int64_t>(4, kWorkPerTask / per_j);
  auto fn = row_dots_fn<T>();
  at::parallel_for(0, args.J, grain, [&](int64_t j0, int64_t j1) { fn(args, j0, j1); });
}

// ------------------------------------------------------------------------------------------------------
// transposed(x (rows, cols)) -> (cols, rows) contiguous: x.t().contiguous() in register tiles.
Tensor transposed(const Tensor& x) {
  const char* op = "transposed";
  check_dtype(x, op);
  check_float(x, op, "x", x.scalar_type());
  check_shape(x.dim() == 2, op, "x must be 2-d, got shape " + c10::str(x.sizes()));
  const int64_t rows = x.size(0), cols = x.size(1);
  if (x.stride(0) == 1 && cols > 1) return x.t().clone(at::MemoryFormat::Contiguous);  // x.t()'s rows are contiguous
  const Tensor src = x.stride(1) == 1 ? x : x.contiguous();
  Tensor out = at::empty({cols, rows}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fxreduce", [&] {
    transpose_into<scalar_t>(src.data_ptr<scalar_t>(), rows, cols, src.stride(0), out.data_ptr<scalar_t>());
  });
  return out;
}

// A 2-d operand with contiguous rows; a transposed view (W.t()) through the tiled transpose.
Tensor contiguous_rows(const Tensor& t) {
  if (t.is_contiguous()) return t;
  return t.stride(0) == 1 ? transposed(t.t()) : t.contiguous();
}

// smallest_k(keys (G, width), k) -> (G, k) int64: per row, the positions of its k smallest keys (ties to the
// lower position) in increasing order: a uniform k-subset of the units per row when the keys are i.i.d.
Tensor smallest_k(const Tensor& keys, int64_t k) {
  const char* op = "smallest_k";
  check_dtype(keys, op);
  check_float(keys, op, "keys", keys.scalar_type());
  check_shape(keys.dim() == 2, op, "keys must be (groups, width), got shape " + c10::str(keys.sizes()));
  const int64_t groups = keys.size(0), width = keys.size(1);
  check_shape(k >= 0 && k <= width, op, "k must lie in [0, " + std::to_string(width) + "], got " + std::to_string(k));
  const Tensor c = keys.contiguous();
  // NaN keys have no order: the selection would be undefined (and could read past the row).
  TORCH_CHECK(!c.isnan().any().item<bool>(), "fxreduce.", op, ": keys contain NaN; pass ordered keys (e.g. torch.rand)");
  Tensor out = at::empty({groups, k}, keys.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "fxreduce", [&] {
    const scalar_t* data = c.data_ptr<scalar_t>();
    int64_t* result = out.data_ptr<int64_t>();
    at::parallel_for(0, groups, std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, width * 16)),
                     [&](int64_t g0, int64_t g1) {
      // (key, position) pairs order the keys with ties to the lower position; the k-th smallest pair found by
      // selection, one scan in position order emits the k positions at or below it, already sorted.
      std::vector<std::pair<scalar_t, int64_t>> keyed(width);
      for (int64_t g = g0; g < g1; ++g) {
        const scalar_t* row = data + g * width;
        int64_t* kept = result + g * k;
        for (int64_t j = 0; j < width; ++j) keyed[j] = {row[j], j};
        std::nth_element(keyed.begin(), keyed.begin() + (k - 1), keyed.end());
        const std::pair<scalar_t, int64_t> last = keyed[k - 1];
        for (int64_t j = 0, n = 0; j < width; ++j)
          if (std::make_pair(row[j], j) <= last) kept[n++] = j;
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------------------
// gather_matmul(x (G, N, k), wt (in, out), index, bias) -> (G, N, out): out[g] = x[g] @ wt[index[g]] (+ bias,
// added in the tile's epilogue).
Tensor gather_matmul(const Tensor& x, const Tensor& wt, const std::optional<Tensor>& index,
                     const std::optional<Tensor>& bias) {
  const char* op = "gather_matmul";
  check_dtype(x, op);
  check_float(x, op, "x", x.scalar_type());
  check_float(wt, op, "wt", x.scalar_type());
  check_shape(x.dim() == 3 && wt.dim() == 2, op,
              "expected x (groups, rows, k) and wt (in, out), got " + c10::str(x.sizes()) + " and " + c10::str(wt.sizes()));
  const int64_t G = x.size(0), N = x.size(1), K = x.size(2), out = wt.size(1);
  auto idx = checked_index(index, G, K, wt.size(0), op);
  if (bias.has_value()) {
    check_float(*bias, op, "bias", x.scalar_type());
    check_shape(bias->dim() == 1 && bias->size(0) == out, op,
                "bias must have shape (" + std::to_string(out) + ",), got " + c10::str(bias->sizes()));
  }
  Tensor xc = x.contiguous(), wc = contiguous_rows(wt), bc = bias.has_value() ? bias->contiguous() : Tensor();
  Tensor result = at::empty({G, N, out}, x.options());
  if (result.numel() == 0) return result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fxreduce", [&] {
    // The bias as the addend D of every row: D's rows and groups all start at the bias (strides 0).
    RowsGemm<scalar_t> a{G, N, K, xc.data_ptr<scalar_t>(), N * K, K, 1, wc.data_ptr<scalar_t>(), 0, out,
                         index_data(idx), index_group_stride(idx), result.data_ptr<scalar_t>(), N * out, out,
                         nullptr, 0, bc.defined() ? bc.data_ptr<scalar_t>() : nullptr, 0, 0, false, scalar_t(1)};
    run_rows_gemm(a, out);
  });
  return result;
}

// gather_matmul_input_grad(dout (G, N, out), wt (in, out), index (k)) -> (G, N, k) = dout[g] @ wt[index[g]]^T.
Tensor gather_matmul_input_grad(const Tensor& dout, const Tensor& wt, const std::optional<Tensor>& index, int64_t k) {
  const char* op = "gather_matmul_input_grad";
  check_dtype(dout, op);
  check_float(dout, op, "dout", dout.scalar_type());
  check_float(wt, op, "wt", dout.scalar_type());
  check_shape(dout.dim() == 3 && wt.dim() == 2 && dout.size(2) == wt.size(1), op,
              "expected dout (groups, rows, out) and wt (in, out), got " + c10::str(dout.sizes()) + " and " +
                  c10::str(wt.sizes()));
  const int64_t G = dout.size(0), N = dout.size(1), out = dout.size(2);
  auto idx = checked_index(index, G, k, wt.size(0), op);
  Tensor dc = dout.contiguous(), wc = contiguous_rows(wt);
  Tensor result = at::empty({G, N, k}, dout.options());  // every (group, row, kept unit) written once
  if (result.numel() == 0) return result;
  AT_DISPATCH_FLOATING_TYPES(dout.scalar_type(), "fxreduce", [&] {
    RowDots<scalar_t> a{G, N, k, out, dc.data_ptr<scalar_t>(), N * out, out, wc.data_ptr<scalar_t>(), 0, out,
                        index_data(idx), index_group_stride(idx), result.data_ptr<scalar_t>(), N * k, k, nullptr, 0,
                        false, scalar_t(1)};
    run_row_dots(a);
  });
  return result;
}

// gather_matmul_weight_grad(x (G, N, k), dout (G, N, out), index, rows) -> (rows, out):
// row index[g][j] accumulates sum_n x[g][n][j] * dout[g][n]; rows no set keeps stay zero.
Tensor gather_matmul_weight_grad(const Tensor& x, const Tensor& dout, const std::optional<Tensor>& index,
                                 int64_t rows) {
  const char* op = "gather_matmul_weight_grad";
  check_dtype(x, op);
  check_float(x, op, "x", x.scalar_type());
  check_float(dout, op, "dout", x.scalar_type());
  check_shape(x.dim() == 3 && dout.dim() == 3 && x.size(0) == dout.size(0) && x.size(1) == dout.size(1), op,
              "expected x (groups, rows, k) and dout (groups, rows, out), got " + c10::str(x.sizes()) + " and " +
                  c10::str(dout.sizes()));
  check_shape(rows >= 0, op, "rows must be >= 0");
  const int64_t G = x.size(0), N = x.size(1), K = x.size(2), out = dout.size(2);
  auto idx = checked_index(index, G, K, rows, op);
  Tensor xc = x.contiguous(), dc = dout.contiguous();
  // Without an index the GEMM writes every row exactly once; with a keep set the first group to write a row
  // stores into it and later ones add, and the rows no set keeps are zeroed.
  const bool every_row = !idx.has_value() && G * N > 0;
  Tensor result = every_row || idx.has_value() ? at::empty({rows, out}, x.options()) : at::zeros({rows, out}, x.options());
  if (result.numel() == 0 || x.numel() == 0) {
    if (idx.has_value()) result.zero_();
    return result;
  }
  const bool one_group = !idx.has_value() || idx->dim() == 1;  // one set for all: a single GEMM over G*N rows
  const std::vector<uint8_t> first = idx.has_value() ? first_writes(idx, G, result) : std::vector<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fxreduce", [&] {
    RowsGemm<scalar_t> a{one_group ? 1 : G, K, one_group ? G * N : N, xc.data_ptr<scalar_t>(), N * K, 1, K,
                         dc.data_ptr<scalar_t>(), N * out, out, nullptr, 0, result.data_ptr<scalar_t>(), 0, out,
                         index_data(idx), one_group ? 0 : K, nullptr, 0, 0, !every_row, scalar_t(1)};
    a.c_first = first.empty() ? nullptr : first.data();
    run_rows_gemm(a, out);
  });
  return result;
}

// ------------------------------------------------------------------------------------------------------
// The LSTM layer: xp (T, N, 4H) input projections with every bias, h0, c0 (N, H), wt = W_hh^T (H, 4H),
// index: None or the kept hidden units ((k,) for the sequence, (T, k) per step; the state entering step t
// is masked by index[t]), scale: the kept units' factor. Returns hs (T, N, H), c_last, and for the backward
// the gate activations (T, N, 4H), cell states and their tanh (T, N, H).
struct Layer {
  int64_t T, N, H, k;
  bool reverse;
  int64_t step(int64_t n) const { return reverse ? T - 1 - n : n; }  // the n-th step processed
};

void check_lstm(const char* op, const Tensor& xp, const Tensor& h0, const Tensor& c0, const Tensor& wt) {
  check_dtype(xp, op);
  for (auto [t, name] : {std::pair<const Tensor&, const char*>{xp, "xp"}, {h0, "h0"}, {c0, "c0"}, {wt, "wt"}})
    check_float(t, op, name, xp.scalar_type());
  check_shape(xp.dim() == 3 && xp.size(2) % 4 == 0, op, "xp must be (T, N, 4H), got " + c10::str(xp.sizes()));
  const int64_t N = xp.size(1), H = xp.size(2) / 4;
  check_shape(h0.sizes() == c10::IntArrayRef({N, H}) && c0.sizes() == c10::IntArrayRef({N, H}), op,
              "h0 and c0 must be (" + std::to_string(N) + ", " + std::to_string(H) + "), got " + c10::str(h0.sizes()) +
                  " and " + c10::str(c0.sizes()));
  check_shape(wt.dim() == 2 && wt.size(0) == H && wt.size(1) == 4 * H, op,
              "wt (the recurrent weight transposed) must be (" + std::to_string(H) + ", " + std::to_string(4 * H) +
                  "), got " + c10::str(wt.sizes()));
}

// How a layer's time loop is split across threads. The recurrence of each batch row depends on that row
// only, so with enough rows per thread each thread runs the whole sequence for its rows: one parallel
// region per call, no synchronisation per step; every thread then reads all of W^T per step, which pays
// while W^T stays in cache. Otherwise every step splits the GEMM's column panels, then (forward) the cells'
// rows; backward, the cells' rows, then the state gradient's columns.
constexpr int64_t kRowSplitMaxWeightBytes = 8 << 20;
constexpr int64_t kMinRowsPerThread = 5;

bool split_rows(int64_t N, int64_t H, int64_t element_size) {
  const int64_t threads = at::get_num_threads();
  return threads == 1 || (N >= kMinRowsPerThread * threads && 4 * H * H * element_size <= kRowSplitMaxWeightBytes);
}

template <typename T>
using CellForward = void (*)(int64_t, int64_t, T*, const T*, T*, T*, T*);
template <typename T>
using CellBackward = void (*)(int64_t, int64_t, const T*, const T*, const T*, const T*, T*, T*);

template <typename T>
CellForward<T> cell_forward() {
  const KernelTable& k = kernels();
  return std::is_same<T, float>::value ? reinterpret_cast<CellForward<T>>(k.cell_forward_f)
                                       : reinterpret_cast<CellForward<T>>(k.cell_forward_d);
}

template <typename T>
CellBackward<T> cell_backward() {
  const KernelTable& k = kernels();
  return std::is_same<T, float>::value ? reinterpret_cast<CellBackward<T>>(k.cell_backward_f)
                                       : reinterpret_cast<CellBackward<T>>(k.cell_backward_d);
}

// Rows [r0, r1) of the state entering a step, kept units gathered and scaled into z (or h itself).
template <typename T>
const T* step_input(const T* h_prev, int64_t H, const int64_t* kept, int64_t k, T scale, int64_t r0, int64_t r1, T* z) {
  if (!kept) return h_prev + r0 * H;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < k; ++j) z[(r - r0) * k + j] = h_prev[r * H + kept[j]] * scale;
  return z;
}

// The forward loop. With keep_activations false (inference) the gates and tanh(c) of a step go to one step's
// scratch, reused by every step and so still in cache, instead of (T, N, 4H) and (T, N, H) tensors for a
// backward that will not run; acts and tanh_cs then hold only the last step's.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_loop(const char* op, const Tensor& xp_in, const Tensor& h0_in,
                                                             const Tensor& c0_in, const Tensor& wt_in,
                                                             const std::optional<Tensor>& index, double scale,
                                                             bool reverse, bool keep_activations) {
  check_lstm(op, xp_in, h0_in, c0_in, wt_in);
  const int64_t T = xp_in.size(0), N = xp_in.size(1), H = xp_in.size(2) / 4;
  const int64_t k = index.has_value() ? index->size(-1) : H;
  auto idx = checked_index(index, T, k, H, op);
  Tensor xp = xp_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const int64_t stored_steps = keep_activations ? T : std::min<int64_t>(T, 1);
  Tensor hs = at::empty({T, N, H}, xp.options()), acts = at::empty({stored_steps, N, 4 * H}, xp.options());
  Tensor cs = at::empty({T, N, H}, xp.options()), tcs = at::empty({stored_steps, N, H}, xp.options());
  if (T == 0) return {hs, c0.clone(), acts, cs, tcs};
  const Layer L{T, N, H, k, reverse};
  const int64_t acts_step = keep_activations ? N * 4 * H : 0, tcs_step = keep_activations ? N * H : 0;
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "fxreduce", [&] {
    auto gemm = rows_gemm_fn<scalar_t>();
    auto cell = cell_forward<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(scale);
    scalar_t *hs_p = hs.data_ptr<scalar_t>(), *acts_p = acts.data_ptr<scalar_t>(), *cs_p = cs.data_ptr<scalar_t>();
    scalar_t* tcs_p = tcs.data_ptr<scalar_t>();
    const scalar_t* xp_p = xp.data_ptr<scalar_t>();
    const scalar_t *h0_p = h0.data_ptr<scalar_t>(), *c0_p = c0.data_ptr<scalar_t>();
    const int64_t* index_p = index_data(idx);
    const int64_t index_stride = index_group_stride(idx);
    // W^T packed once for all steps, read straight from any strides (W_hh.t() itself included).
    const Tensor packed = pack_panels<scalar_t>(wt_in, H, 4 * H, wt_in.stride(0), wt_in.stride(1));
    const scalar_t* panels = packed.data_ptr<scalar_t>();
    // Step n's pieces: the state it reads, its keep set, its gate buffer and the projection it adds.
    auto prev_of = [&](int64_t n) { return n == 0 ? int64_t(-1) : L.step(n - 1); };
    auto h_prev_of = [&](int64_t n) { return prev_of(n) < 0 ? h0_p : hs_p + prev_of(n) * N * H; };
    auto c_prev_of = [&](int64_t n) { return prev_of(n) < 0 ? c0_p : cs_p + prev_of(n) * N * H; };
    auto kept_of = [&](int64_t t) { return index_p ? index_p + t * index_stride : nullptr; };
    // Rows [r0, r1) of step n: the GEMM into the gate buffer (plus the projection), given its input a.
    auto step_gemm = [&](int64_t n, int64_t r0, int64_t r1, const scalar_t* a) {
      const int64_t t = L.step(n);
      return RowsGemm<scalar_t>{1, r1 - r0, k, a, 0, kept_of(t) ? k : H, 1, panels, 0, 0, kept_of(t), 0,
                                acts_p + t * acts_step + r0 * 4 * H, 0, 4 * H, nullptr, 0,
                                xp_p + (t * N + r0) * 4 * H, 0, 4 * H, false, scalar_t(1), H};
    };
    auto cells = [&](int64_t n, int64_t r0, int64_t r1) {
      const int64_t t = L.step(n);
      const scalar_t* c_prev = c_prev_of(n);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = (t * N + r) * H;
        cell(H, H, acts_p + t * acts_step + r * 4 * H, c_prev + r * H, cs_p + o, tcs_p + t * tcs_step + r * H,
             hs_p + o);
      }
    };
    if (split_rows(N, H, sizeof(scalar_t))) {
      at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
        std::vector<scalar_t> z((r1 - r0) * k);
        for (int64_t n = 0; n < T; ++n) {
          gemm(step_gemm(n, r0, r1, step_input(h_prev_of(n), H, kept_of(L.step(n)), k, s, r0, r1, z.data())), 0, 4 * H);
          cells(n, r0, r1);
        }
      });
      return;
    }
    // Otherwise per step: the GEMM split by column panels, then the cells split by rows.
    std::vector<scalar_t> z(N * k);
    for (int64_t n = 0; n < T; ++n) {
      run_rows_gemm(step_gemm(n, 0, N, step_input(h_prev_of(n), H, kept_of(L.step(n)), k, s, 0, N, z.data())), 4 * H);
      at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) { cells(n, r0, r1); });
    }
  });
  return {hs, cs[L.step(T - 1)].clone(), acts, cs, tcs};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer(const Tensor& xp, const Tensor& h0, const Tensor& c0,
                                                              const Tensor& wt, const std::optional<Tensor>& index,
                                                              double scale, bool reverse) {
  return lstm_loop("lstm_layer", xp, h0, c0, wt, index, scale, reverse, true);
}

// hs and c_last only, for a forward no backward follows.
std::tuple<Tensor, Tensor> lstm_layer_inference(const Tensor& xp, const Tensor& h0, const Tensor& c0, const Tensor& wt,
                                                const std::optional<Tensor>& index, double scale, bool reverse) {
  auto [hs, c_last, acts, cs, tcs] = lstm_loop("lstm_layer_inference", xp, h0, c0, wt, index, scale, reverse, false);
  return {hs, c_last};
}

// Returns dxp (T, N, 4H), dh0, dc0 (N, H), dwt (H, 4H) for the outputs' gradients dhs (T, N, H), dc_last (N, H).
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_backward(
    const Tensor& dhs_in, const Tensor& dc_last, const Tensor& acts_in, const Tensor& cs_in, const Tensor& tcs_in,
    const Tensor& hs_in, const Tensor& h0_in, const Tensor& c0_in, const Tensor& wt_in,
    const std::optional<Tensor>& index, double scale, bool reverse) {
  const char* op = "lstm_layer_backward";
  check_lstm(op, acts_in, h0_in, c0_in, wt_in);
  const int64_t T = acts_in.size(0), N = acts_in.size(1), H = acts_in.size(2) / 4;
  const std::vector<int64_t> seq{T, N, H};
  for (auto [t, name] : {std::pair<const Tensor&, const char*>{dhs_in, "dhs"}, {cs_in, "cs"}, {tcs_in, "tanh_cs"},
                         {hs_in, "hs"}}) {
    check_float(t, op, name, acts_in.scalar_type());
    check_shape(t.sizes() == c10::IntArrayRef(seq), op,
                std::string(name) + " must be " + c10::str(seq) + ", got " + c10::str(t.sizes()));
  }
  check_float(dc_last, op, "dc_last", acts_in.scalar_type());
  check_shape(dc_last.sizes() == c10::IntArrayRef({N, H}), op, "dc_last must be (N, H)");
  const int64_t k = index.has_value() ? index->size(-1) : H;
  auto idx = checked_index(index, T, k, H, op);
  Tensor dhs = dhs_in.contiguous(), acts = acts_in.contiguous(), cs = cs_in.contiguous(), tcs = tcs_in.contiguous();
  Tensor hs = hs_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  // Dense, dh = dgates @ W_hh runs on W_hh = wt^T packed once (read from wt's strides); with a keep set, on
  // dot products with the kept rows of wt.
  const bool dense = !idx.has_value();
  Tensor wt = dense ? wt_in : contiguous_rows(wt_in);
  Tensor dgates = at::empty({T, N, 4 * H}, acts.options());
  Tensor dc = dc_last.contiguous().clone();
  Tensor dh = T > 0 ? dhs[reverse ? 0 : T - 1].clone() : at::zeros({N, H}, acts.options());
  if (T == 0) return {dgates, dh, dc, at::zeros({H, 4 * H}, acts.options())};
  const Layer L{T, N, H, k, reverse};
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "fxreduce", [&] {
    auto cell = cell_backward<scalar_t>();
    auto dots = row_dots_fn<scalar_t>();
    auto gemm = rows_gemm_fn<scalar_t>();
    const Tensor packed = dense ? pack_panels<scalar_t>(wt, 4 * H, H, wt.stride(1), wt.stride(0)) : Tensor();
    const scalar_t* panels = dense ? packed.data_ptr<scalar_t>() : nullptr;
    const scalar_t *acts_p = acts.data_ptr<scalar_t>(), *cs_p = cs.data_ptr<scalar_t>(), *tcs_p = tcs.data_ptr<scalar_t>();
    const scalar_t *dhs_p = dhs.data_ptr<scalar_t>(), *w_p = wt.data_ptr<scalar_t>(), *c0_p = c0.data_ptr<scalar_t>();
    scalar_t *dg_p = dgates.data_ptr<scalar_t>(), *dh_p = dh.data_ptr<scalar_t>(), *dc_p = dc.data_ptr<scalar_t>();
    const int64_t* index_p = index_data(idx);
    const int64_t index_stride = index_group_stride(idx);
    const scalar_t alpha = static_cast<scalar_t>(index_p ? scale : 1.0);
    // Rows [r0, r1) of step n: the cells' backward, then dh for the step before: that step's own output
    // gradient plus the recurrence's, scattered to the kept units.
    auto cells = [&](int64_t n, int64_t r0, int64_t r1) {
      const int64_t t = L.step(n), prev = n == 0 ? -1 : L.step(n - 1);
      const scalar_t* c_prev = prev < 0 ? c0_p : cs_p + prev * N * H;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = (t * N + r) * H;
        cell(H, H, acts_p + o * 4, c_prev + r * H, tcs_p + o, dh_p + r * H, dc_p + r * H, dg_p + o * 4);
      }
      if (prev >= 0) {
        std::copy(dhs_p + (prev * N + r0) * H, dhs_p + (prev * N + r1) * H, dh_p + r0 * H);
      } else {
        std::fill(dh_p + r0 * H, dh_p + r1 * H, scalar_t(0));
      }
    };
    auto recurrent = [&](int64_t n, int64_t r0, int64_t r1) {
      const int64_t t = L.step(n);
      const int64_t* kept = index_p ? index_p + t * index_stride : nullptr;
      return RowDots<scalar_t>{1, r1 - r0, k, 4 * H, dg_p + (t * N + r0) * 4 * H, 0, 4 * H, w_p, 0, 4 * H, kept, 0,
                               dh_p + r0 * H, 0, H, kept, 0, true, alpha};
    };
    auto recurrent_dense = [&](int64_t n, int64_t r0, int64_t r1) {
      return RowsGemm<scalar_t>{1, r1 - r0, 4 * H, dg_p + (L.step(n) * N + r0) * 4 * H, 0, 4 * H, 1, panels, 0, 0,
                                nullptr, 0, dh_p + r0 * H, 0, H, nullptr, 0, nullptr, 0, 0, true, scalar_t(1), 4 * H};
    };
    if (split_rows(N, H, sizeof(scalar_t))) {
      at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t n = T - 1; n >= 0; --n) {
          cells(n, r0, r1);
          if (dense) {
            gemm(recurrent_dense(n, r0, r1), 0, H);
          } else {
            dots(recurrent(n, r0, r1), 0, k);
          }
        }
      });
      return;
    }
    for (int64_t n = T - 1; n >= 0; --n) {
      at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) { cells(n, r0, r1); });
      if (dense) {
        run_rows_gemm(recurrent_dense(n, 0, N), H);
      } else {
        run_row_dots(recurrent(n, 0, N));
      }
    }
  });
  if (dense) {
    // dW_hh = sum_t dgates_t^T h_(t-1), laid out like wt: for a wt that is W_hh.t(), in W_hh's own (4H, H)
    // layout (returned as its transpose), else as wt's (H, 4H) rows, so the gradient reaches the parameter
    // without a copy. Two GEMMs: the step that reads h0, then all others against hs shifted by one step.
    const bool like_w = !wt_in.is_contiguous();
    Tensor dw = like_w ? at::empty({4 * H, H}, acts.options()) : at::empty({H, 4 * H}, acts.options());
    AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "fxreduce", [&] {
      const scalar_t *dg_p = dgates.data_ptr<scalar_t>(), *hs_p = hs.data_ptr<scalar_t>();
      const int64_t first = reverse ? T - 1 : 0;  // the step whose state entering it is h0
      auto gemm = [&](const scalar_t* dg, const scalar_t* h, int64_t rows, bool accumulate) {
        if (like_w) {
          RowsGemm<scalar_t> a{1, 4 * H, rows, dg, 0, 1, 4 * H, h, 0, H, nullptr, 0, dw.data_ptr<scalar_t>(), 0, H,
                               nullptr, 0, nullptr, 0, 0, accumulate, scalar_t(1)};
          run_rows_gemm(a, H);
        } else {
          RowsGemm<scalar_t> a{1, H, rows, h, 0, 1, H, dg, 0, 4 * H, nullptr, 0, dw.data_ptr<scalar_t>(), 0, 4 * H,
                               nullptr, 0, nullptr, 0, 0, accumulate, scalar_t(1)};
          run_rows_gemm(a, 4 * H);
        }
      };
      gemm(dg_p + first * N * 4 * H, h0.data_ptr<scalar_t>(), N, false);
      if (T > 1) gemm(dg_p + (reverse ? 0 : N * 4 * H), hs_p + (reverse ? N * H : 0), (T - 1) * N, true);
    });
    return {dgates, dh, dc, like_w ? dw.t() : dw};
  }
  // The recurrent weight's gradient: one GEMM over all steps (per-step sets: one group per step) on the
  // kept units of the state entering each step, scaled.
  const bool one_group = idx->dim() == 1;
  Tensor zc = at::empty({T, N, k}, acts.options());
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "fxreduce", [&] {
    const scalar_t *hs_p = hs.data_ptr<scalar_t>(), *h0_p = h0.data_ptr<scalar_t>();
    const int64_t *index_p = index_data(idx), index_stride = index_group_stride(idx);
    scalar_t* z_p = zc.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(scale);
    at::parallel_for(0, T, std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, N * k)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t t = L.step(n);
        const scalar_t* h_prev = n == 0 ? h0_p : hs_p + L.step(n - 1) * N * H;
        step_input(h_prev, H, index_p + t * index_stride, k, s, 0, N, z_p + t * N * k);
      }
    });
  });
  Tensor dwt = at::empty({H, 4 * H}, acts.options());
  const std::vector<uint8_t> first = first_writes(idx, T, dwt);
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "fxreduce", [&] {
    RowsGemm<scalar_t> a{one_group ? 1 : T, k, one_group ? T * N : N, zc.data_ptr<scalar_t>(), N * k, 1, k,
                         dgates.data_ptr<scalar_t>(), N * 4 * H, 4 * H, nullptr, 0, dwt.data_ptr<scalar_t>(), 0,
                         4 * H, index_data(idx), one_group ? 0 : k, nullptr, 0, 0, true, scalar_t(1)};
    a.c_first = first.data();
    run_rows_gemm(a, 4 * H);
  });
  // For a wt that is W_hh.t(), the gradient in W_hh's own layout: it reaches the parameter without a copy.
  return {dgates, dh, dc, wt_in.is_contiguous() ? dwt : transposed(dwt).t()};
}

}  // namespace

// ------------------------------------------------------------------------------------------------------
// Error-map pruning's channel scores and bias gradient: sum |x| and sum x over every dim but dim 1 of an
// (N, C, ...) tensor, in one read of it.
std::tuple<Tensor, Tensor> channel_sums(const Tensor& x) {
  const char* op = "channel_sums";
  check_dtype(x, op);
  check_float(x, op, "x", x.scalar_type());
  check_shape(x.dim() >= 2, op, "x must have a batch and a channel dim, got shape " + c10::str(x.sizes()));
  const Tensor c = x.contiguous();
  const int64_t batch = c.size(0), channels = c.size(1), planes = batch * channels;
  const int64_t plane = planes ? c.numel() / planes : 0;
  Tensor magnitudes = at::zeros({batch, channels}, c.options()), sums = at::zeros({batch, channels}, c.options());
  if (planes > 0) {
    const int64_t grain = std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, plane));
    AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "channel_sums", [&] {
      using Fn = void (*)(const scalar_t*, int64_t, int64_t, int64_t, scalar_t*, scalar_t*);
      const Fn fn = std::is_same<scalar_t, float>::value ? reinterpret_cast<Fn>(kernels().plane_sums_f)
                                                         : reinterpret_cast<Fn>(kernels().plane_sums_d);
      const scalar_t* data = c.data_ptr<scalar_t>();
      scalar_t *abs_out = magnitudes.data_ptr<scalar_t>(), *sum_out = sums.data_ptr<scalar_t>();
      at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) { fn(data, plane, p0, p1, abs_out, sum_out); });
    });
  }
  return {magnitudes.sum(0), sums.sum(0)};
}

TORCH_LIBRARY_FRAGMENT(fxreduce, m) {
  m.def("gather_matmul(Tensor x, Tensor wt, Tensor? index, Tensor? bias=None) -> Tensor");
  m.def("channel_sums(Tensor x) -> (Tensor, Tensor)");
  m.def("transposed(Tensor x) -> Tensor");
  m.def("smallest_k(Tensor keys, int k) -> Tensor");
  m.def("gather_matmul_input_grad(Tensor dout, Tensor wt, Tensor? index, int k) -> Tensor");
  m.def("gather_matmul_weight_grad(Tensor x, Tensor dout, Tensor? index, int rows) -> Tensor");
  m.def("lstm_layer(Tensor xp, Tensor h0, Tensor c0, Tensor wt, Tensor? index, float scale, bool reverse) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_layer_inference(Tensor xp, Tensor h0, Tensor c0, Tensor wt, Tensor? index, float scale, bool reverse) "
        "-> (Tensor, Tensor)");
  m.def("lstm_layer_backward(Tensor dhs, Tensor dc_last, Tensor acts, Tensor cs, Tensor tanh_cs, Tensor hs, "
        "Tensor h0, Tensor c0, Tensor wt, Tensor? index, float scale, bool reverse) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fxreduce, CPU, m) {
  m.impl("gather_matmul", &gather_matmul);
  m.impl("channel_sums", &channel_sums);
  m.impl("transposed", &transposed);
  m.impl("smallest_k", &smallest_k);
  m.impl("gather_matmul_input_grad", &gather_matmul_input_grad);
  m.impl("gather_matmul_weight_grad", &gather_matmul_weight_grad);
  m.impl("lstm_layer", &lstm_layer);
  m.impl("lstm_layer_inference", &lstm_layer_inference);
  m.impl("lstm_layer_backward", &lstm_layer_backward);
}

}  // namespace native
}  // namespace fxreduce

#ifndef FXR_SOURCES_DIGEST
#define FXR_SOURCES_DIGEST "unknown"  // setup.py defines it; a build without it matches no other
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fxreduce's native CPU kernels (the ops are torch.ops.fxreduce.*)";
  m.def("isa", [] { return std::string(fxreduce::native::kernels().name); }, "the ISA the kernels run on");
  m.def("supported_isas", &fxreduce::native::supported_isas, "the ISAs this CPU and build can run, best first");
  m.def("set_isa", &fxreduce::native::set_isa, "run the kernels on another supported ISA (for tests)");
  m.def("sources_digest", [] { return std::string(FXR_SOURCES_DIGEST); }, "a digest of the sources built");
}
