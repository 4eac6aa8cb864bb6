// torch.ops.fxreduce.lowrank_linear(x, first, second, bias) = (x first^T) second^T + bias, LowRankLinear's product
// in one pass: per block of rows the (rows, r) intermediate goes to a per-thread buffer that stays in cache and
// is consumed at once by the second product, whose accumulators start from the bias. Operands are checked here
// (TORCH_CHECK); any strides. The ISA is switched with the other kernels' (isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "isa.h"
#include "lowrank.h"

namespace fxreduce {
namespace native {
namespace {

using at::Tensor;

IsaTables<LowRankTable> tables{FXR_X86_TABLE(lowrank_avx512_table), FXR_X86_TABLE(lowrank_avx2_table),
                               &lowrank_portable_table};

#define FXR_CHECK(cond, ...) TORCH_CHECK(cond, "fxreduce.", op, ": ", __VA_ARGS__)

constexpr int64_t kWorkPerTask = 1 << 15;  // multiply-adds below which a thread is not worth waking
constexpr int64_t kIntermediateBytes = 1 << 17;  // a thread's block of the intermediate: stays in L2
// Rows per thread from which the threads split the rows (each then packs all of U^T) rather than the columns
// (each packs its share of U^T): fewer rows do not amortise a whole pack (docs/benchmarks.md, "Fused low-rank
// product").
constexpr int64_t kRowsPerThreadForRowSplit = 48;

template <typename T>
struct Kernels;
template <>
struct Kernels<float> {
  static auto pack(const LowRankTable& t) { return t.pack_f; }
  static auto intermediate(const LowRankTable& t) { return t.intermediate_f; }
  static auto output(const LowRankTable& t) { return t.output_f; }
  static auto panel(const LowRankTable& t) { return t.panel_f; }
};
template <>
struct Kernels<double> {
  static auto pack(const LowRankTable& t) { return t.pack_d; }
  static auto intermediate(const LowRankTable& t) { return t.intermediate_d; }
  static auto output(const LowRankTable& t) { return t.output_d; }
  static auto panel(const LowRankTable& t) { return t.panel_d; }
};

// x (M, K), first (R, K), second (N, R) with contiguous rows, out (M, N) contiguous.
template <typename T>
void run(const Tensor& x, const Tensor& first, const Tensor& second, const std::optional<Tensor>& bias, Tensor& out) {
  const LowRankTable& table = tables.active();
  auto pack = Kernels<T>::pack(table);
  auto intermediate = Kernels<T>::intermediate(table);
  auto output = Kernels<T>::output(table);
  const int64_t W = table.panel_floats * 4 / static_cast<int64_t>(sizeof(T));
  const int64_t M = x.size(0), K = x.size(1), R = first.size(0), N = second.size(0);
  const int64_t r_panels = (R + W - 1) / W, n_panels = (N + W - 1) / W, ldt = r_panels * W;
  Tensor vt = at::empty({std::max<int64_t>(1, r_panels * K * W)}, x.options());
  const T* v = first.data_ptr<T>();
  T* vt_data = vt.data_ptr<T>();
  at::parallel_for(0, r_panels, std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, K * W)),
                   [&](int64_t p0, int64_t p1) {
                     for (int64_t q = p0; q < p1; ++q) pack(v, K, R, first.stride(0), q, vt_data + q * K * W);
                   });
  Tensor padded_bias = at::zeros({n_panels * W}, x.options());
  if (bias.has_value()) padded_bias.narrow(0, 0, N).copy_(*bias);
  const LowRankProduct<T> p{M, K, R, N, x.data_ptr<T>(), x.stride(0), vt_data, padded_bias.data_ptr<T>(),
                            out.data_ptr<T>(), N};
  const T* u = second.data_ptr<T>();
  // Each U^T panel is packed by the thread that consumes it, into its own (R x W) buffer that stays in L1.
  auto consume = [&](const T* t, int64_t m0, int64_t m1, int64_t q, T* panel) {
    pack(u, R, N, second.stride(0), q, panel);
    output(p, t, ldt, m0, m1, q, panel);
  };
  const int64_t threads = at::get_num_threads();
  if (M >= kRowsPerThreadForRowSplit * threads) {
    // Rows split evenly among the threads; a block of a thread's rows has its intermediate computed into this
    // thread's buffer (L2-sized), then every U^T panel passes over it, so the intermediate never goes to memory.
    const int64_t mr = table.tile_rows;
    const int64_t block = std::max<int64_t>(mr, kIntermediateBytes / std::max<int64_t>(1, ldt * sizeof(T)) / mr * mr);
    at::parallel_for(0, M, mr, [&](int64_t m0, int64_t m1) {
      std::vector<T> t(std::min(block, m1 - m0) * ldt), panel(R * W);
      for (int64_t m = m0; m < m1; m += block) {
        const int64_t m_end = std::min(m + block, m1);
        intermediate(p, m, m_end, 0, r_panels, t.data(), ldt);
        for (int64_t q = 0; q < n_panels; ++q) consume(t.data(), m, m_end, q, panel.data());
      }
    });
    return;
  }
  // Few rows: the whole (small) intermediate first, then the output split by column panels.
  std::vector<T> t(M * ldt);
  at::parallel_for(0, r_panels, std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, M * K * W)),
                   [&](int64_t p0, int64_t p1) { intermediate(p, 0, M, p0, p1, t.data(), ldt); });
  at::parallel_for(0, n_panels, std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, M * R * W)),
                   [&](int64_t q0, int64_t q1) {
                     std::vector<T> panel(R * W);
                     for (int64_t q = q0; q < q1; ++q) consume(t.data(), 0, M, q, panel.data());
                   });
}

// AntMan's grouped forms in one pass: x (M, K) contiguous rows; first (g1, r1, k1) or none; second (g2, n2, r2);
// both contiguous. Every factor panel is packed once, up front, shared by the threads; rows are split among the
// threads, and for each block of a thread's rows the intermediate t = blockdiag(first) x (L2-sized, columns
// interleaved by `shuffle`) is computed and consumed at once by blockdiag(second), accumulators from the bias.
template <typename T>
void run_grouped(const Tensor& x, const std::optional<Tensor>& first, const Tensor& second,
                 const std::optional<Tensor>& bias, bool shuffle, Tensor& out) {
  const LowRankTable& table = tables.active();
  auto pack = Kernels<T>::pack(table);
  auto panel = Kernels<T>::panel(table);
  const int64_t W = table.panel_floats * 4 / static_cast<int64_t>(sizeof(T));
  const int64_t M = x.size(0), ldx = x.stride(0);
  const bool two = first.has_value();
  const int64_t g1 = two ? first->size(0) : 0, r1 = two ? first->size(1) : 0, k1 = two ? first->size(2) : 0;
  const int64_t g2 = second.size(0), n2 = second.size(1), r2 = second.size(2);
  const int64_t R = two ? g1 * r1 : x.size(1), N = g2 * n2;
  const int64_t p1 = (r1 + W - 1) / W, p2 = (n2 + W - 1) / W;  // panels per group of each factor
  Tensor packed = at::empty({std::max<int64_t>(1, g1 * p1 * k1 * W + g2 * p2 * r2 * W)}, x.options());
  T* first_panels = packed.data_ptr<T>();
  T* second_panels = first_panels + g1 * p1 * k1 * W;
  const T* v = two ? first->data_ptr<T>() : nullptr;
  const T* u = second.data_ptr<T>();
  at::parallel_for(0, g1 * p1 + g2 * p2, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      if (s < g1 * p1) {
        pack(v + s / p1 * r1 * k1, k1, r1, k1, s % p1, first_panels + s * k1 * W);
      } else {
        const int64_t s2 = s - g1 * p1;
        pack(u + s2 / p2 * n2 * r2, r2, n2, r2, s2 % p2, second_panels + s2 * r2 * W);
      }
    }
  });
  Tensor padded_bias = at::zeros({g2, p2 * W}, x.options());  // each group's bias rounded up to whole panels
  if (bias.has_value()) padded_bias.narrow(1, 0, n2).copy_(bias->view({g2, n2}));
  const T* b = padded_bias.data_ptr<T>();
  const T* xd = x.data_ptr<T>();
  T* o = out.data_ptr<T>();
  // Group j's panel q of first over rows [m, m + rows) into t (row stride R), interleaved when shuffle; `local`
  // holds rows x W for the interleaving copy.
  auto first_panel = [&](int64_t j, int64_t q, int64_t m, int64_t rows, T* t, T* local) {
    const int64_t width = std::min(W, r1 - q * W);
    const T* packed_panel = first_panels + (j * p1 + q) * k1 * W;
    if (!shuffle) return panel(xd + m * ldx + j * k1, ldx, rows, k1, packed_panel, nullptr, t + j * r1 + q * W, R,
                               width);
    panel(xd + m * ldx + j * k1, ldx, rows, k1, packed_panel, nullptr, local, W, width);
    for (int64_t r = 0; r < rows; ++r)  // group j's output k to column k * g1 + j
      for (int64_t c = 0; c < width; ++c) t[r * R + (q * W + c) * g1 + j] = local[r * W + c];
  };
  // Group i's panel q of second over rows [m, m + rows), reading a (row stride lda; row 0 is row m).
  auto second_panel = [&](int64_t i, int64_t q, int64_t m, int64_t rows, const T* a, int64_t lda) {
    panel(a + i * r2, lda, rows, r2, second_panels + (i * p2 + q) * r2 * W, b + i * p2 * W + q * W,
          o + m * N + i * n2 + q * W, N, std::min(W, n2 - q * W));
  };
  if (M < kRowsPerThreadForRowSplit * at::get_num_threads()) {
    // Few rows: the whole intermediate first, then the output, each split by panels.
    std::vector<T> t(two ? M * R : 0);
    if (two)
      at::parallel_for(0, g1 * p1, 1, [&](int64_t s0, int64_t s1) {
        std::vector<T> local(shuffle ? M * W : 0);
        for (int64_t s = s0; s < s1; ++s) first_panel(s / p1, s % p1, 0, M, t.data(), local.data());
      });
    at::parallel_for(0, g2 * p2, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) second_panel(s / p2, s % p2, 0, M, two ? t.data() : xd, two ? R : ldx);
    });
    return;
  }
  const int64_t mr = table.tile_rows;
  const int64_t block =
      two ? std::max<int64_t>(mr, kIntermediateBytes / std::max<int64_t>(1, R * sizeof(T)) / mr * mr) : M;
  at::parallel_for(0, M, mr, [&](int64_t m0, int64_t m1) {
    const int64_t most = std::min(block, m1 - m0);
    std::vector<T> t(two ? most * R : 0), local(two && shuffle ? most * W : 0);
    for (int64_t m = m0; m < m1; m += block) {
      const int64_t rows = std::min(block, m1 - m);
      for (int64_t j = 0; j < g1; ++j)
        for (int64_t q = 0; q < p1; ++q) first_panel(j, q, m, rows, t.data(), local.data());
      for (int64_t i = 0; i < g2; ++i)
        for (int64_t q = 0; q < p2; ++q) second_panel(i, q, m, rows, two ? t.data() : xd + m * ldx, two ? R : ldx);
    }
  });
}

// x on the CPU, float32 or float64, at least 1-D: its dtype, which every other operand must share.
at::ScalarType checked_x(const char* op, const Tensor& x) {
  FXR_CHECK(x.device().is_cpu(), "x is on ", x.device(), "; the native kernel runs on CPU tensors");
  const at::ScalarType dtype = x.scalar_type();
  FXR_CHECK(dtype == at::kFloat || dtype == at::kDouble, "x must be float32 or float64, got ", dtype);
  FXR_CHECK(x.dim() >= 1, "x must have at least one dimension, got a scalar");
  return dtype;
}

void check_operand(const char* op, const Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  FXR_CHECK(t.device().is_cpu(), name, " is on ", t.device(), "; the native kernel runs on CPU tensors");
  FXR_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype,
            " like x (float32 or float64)");
  FXR_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

// lowrank_linear(x (..., K), first (R, K), second (N, R), bias (N,)?) -> (..., N).
Tensor lowrank_linear(const Tensor& x_in, const Tensor& first, const Tensor& second,
                      const std::optional<Tensor>& bias) {
  const char* op = "lowrank_linear";
  const at::ScalarType dtype = checked_x(op, x_in);
  check_operand(op, first, "first", dtype, 2);
  check_operand(op, second, "second", dtype, 2);
  const int64_t K = first.size(1), R = first.size(0), N = second.size(0);
  FXR_CHECK(x_in.size(-1) == K, "x's last dimension is ", x_in.size(-1), ", first (R, K) has K = ", K);
  FXR_CHECK(second.size(1) == R, "second must be (out, R) with R = ", R, " (first's rows), got ", second.sizes());
  if (bias.has_value()) {
    check_operand(op, *bias, "bias", dtype, 1);
    FXR_CHECK(bias->size(0) == N, "bias has ", bias->size(0), " entries for ", N, " outputs");
  }
  Tensor x = x_in.reshape({-1, K});
  if (x.stride(1) != 1 || x.stride(0) < K) x = x.contiguous();
  auto rows_contiguous = [](const Tensor& t) {
    return t.stride(1) == 1 && t.stride(0) >= t.size(1) ? t : t.contiguous();
  };
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = N;
  Tensor out = at::empty({x.size(0), N}, x.options());
  if (out.numel() > 0) {
    if (dtype == at::kFloat)
      run<float>(x, rows_contiguous(first), rows_contiguous(second), bias, out);
    else
      run<double>(x, rows_contiguous(first), rows_contiguous(second), bias, out);
  }
  return out.view(shape);
}

// grouped_lowrank_linear(x (..., K), first (g1, r1, k1)?, second (g2, n2, r2), bias (N,)?, shuffle) -> (..., N):
// block-diagonal factors in GroupLinear's weight layout. Without first: out = blockdiag(second) x + bias; with
// it: t = blockdiag(first) x, group j's output k at column k * g1 + j when shuffle (else j * r1 + k), then
// out = blockdiag(second) t + bias.
Tensor grouped_lowrank_linear(const Tensor& x_in, const std::optional<Tensor>& first, const Tensor& second,
                              const std::optional<Tensor>& bias, bool shuffle) {
  const char* op = "grouped_lowrank_linear";
  const at::ScalarType dtype = checked_x(op, x_in);
  check_operand(op, second, "second", dtype, 3);
  const int64_t K = x_in.size(-1), g2 = second.size(0), n2 = second.size(1), r2 = second.size(2);
  FXR_CHECK(g2 > 0 && n2 > 0 && r2 > 0, "second must be (groups, out / groups, in / groups) > 0, got ",
            second.sizes());
  if (first.has_value()) {
    check_operand(op, *first, "first", dtype, 3);
    const int64_t g1 = first->size(0), r1 = first->size(1), k1 = first->size(2);
    FXR_CHECK(g1 > 0 && r1 > 0 && k1 > 0 && g1 * k1 == K, "first must be (groups, rank / groups, in / groups) with ",
              "groups x in / groups = x's last dimension ", K, ", got ", first->sizes());
    FXR_CHECK(g1 * r1 == g2 * r2, "first's outputs (", g1, " x ", r1, ") must be second's inputs (", g2, " x ", r2,
              ")");
  } else {
    FXR_CHECK(!shuffle, "shuffle interleaves first's outputs; there is no first");
    FXR_CHECK(g2 * r2 == K, "second's inputs (", g2, " x ", r2, ") must be x's last dimension ", K);
  }
  if (bias.has_value()) {
    check_operand(op, *bias, "bias", dtype, 1);
    FXR_CHECK(bias->size(0) == g2 * n2, "bias has ", bias->size(0), " entries for ", g2 * n2, " outputs");
  }
  Tensor x = x_in.reshape({-1, K});
  if (x.stride(1) != 1 || x.stride(0) < K) x = x.contiguous();
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = g2 * n2;
  Tensor out = at::empty({x.size(0), g2 * n2}, x.options());
  std::optional<Tensor> first_c = first.has_value() ? std::optional<Tensor>(first->contiguous()) : std::nullopt;
  std::optional<Tensor> bias_c = bias.has_value() ? std::optional<Tensor>(bias->contiguous()) : std::nullopt;
  if (out.numel() > 0) {
    if (dtype == at::kFloat)
      run_grouped<float>(x, first_c, second.contiguous(), bias_c, shuffle, out);
    else
      run_grouped<double>(x, first_c, second.contiguous(), bias_c, shuffle, out);
  }
  return out.view(shape);
}

#undef FXR_CHECK

}  // namespace

TORCH_LIBRARY_FRAGMENT(fxreduce, m) {
  m.def("lowrank_linear(Tensor x, Tensor first, Tensor second, Tensor? bias) -> Tensor");
  m.def("grouped_lowrank_linear(Tensor x, Tensor? first, Tensor second, Tensor? bias, bool shuffle) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxreduce, CPU, m) {
  m.impl("lowrank_linear", &lowrank_linear);
  m.impl("grouped_lowrank_linear", &grouped_lowrank_linear);
}

}  // namespace native
}  // namespace fxreduce
