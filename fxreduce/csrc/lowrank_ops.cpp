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

#define FXR_CHECK(cond, ...) TORCH_CHECK(cond, "fxreduce.lowrank_linear: ", __VA_ARGS__)

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
};
template <>
struct Kernels<double> {
  static auto pack(const LowRankTable& t) { return t.pack_d; }
  static auto intermediate(const LowRankTable& t) { return t.intermediate_d; }
  static auto output(const LowRankTable& t) { return t.output_d; }
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

void check_operand(const Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  FXR_CHECK(t.device().is_cpu(), name, " is on ", t.device(), "; the native kernel runs on CPU tensors");
  FXR_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype,
            " like x (float32 or float64)");
  FXR_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

// lowrank_linear(x (..., K), first (R, K), second (N, R), bias (N,)?) -> (..., N).
Tensor lowrank_linear(const Tensor& x_in, const Tensor& first, const Tensor& second,
                      const std::optional<Tensor>& bias) {
  FXR_CHECK(x_in.device().is_cpu(), "x is on ", x_in.device(), "; the native kernel runs on CPU tensors");
  const at::ScalarType dtype = x_in.scalar_type();
  FXR_CHECK(dtype == at::kFloat || dtype == at::kDouble, "x must be float32 or float64, got ", dtype);
  FXR_CHECK(x_in.dim() >= 1, "x must have at least one dimension, got a scalar");
  check_operand(first, "first", dtype, 2);
  check_operand(second, "second", dtype, 2);
  const int64_t K = first.size(1), R = first.size(0), N = second.size(0);
  FXR_CHECK(x_in.size(-1) == K, "x's last dimension is ", x_in.size(-1), ", first (R, K) has K = ", K);
  FXR_CHECK(second.size(1) == R, "second must be (out, R) with R = ", R, " (first's rows), got ", second.sizes());
  if (bias.has_value()) {
    check_operand(*bias, "bias", dtype, 1);
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

#undef FXR_CHECK

}  // namespace

TORCH_LIBRARY_FRAGMENT(fxreduce, m) {
  m.def("lowrank_linear(Tensor x, Tensor first, Tensor second, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxreduce, CPU, m) { m.impl("lowrank_linear", &lowrank_linear); }

}  // namespace native
}  // namespace fxreduce
