// torch.ops.fxreduce.sparse_int8_*: int8 Linear and Conv2d over weights stored as CSR by output channel (int8
// values, column index, row pointers), for pruned layers. The input is quantized as the dense int8 modules
// quantize it (Linear: per call, torch's reduce_range qparams; Conv2d: the calibrated static qparams) and the
// int32 sums equal the dense int8 GEMM's. Every operand is checked here (TORCH_CHECK): a bad index or shape is an
// error, never a read out of bounds. The ISA is switched with the other kernels' (isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/quantized/cpu/QuantUtils.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "isa.h"
#include "sparse_int8.h"

namespace fxreduce {
namespace native {
namespace {

using at::Tensor;

IsaTables<SparseInt8Table> tables{FXR_X86_TABLE(sparse_int8_avx512_table), FXR_X86_TABLE(sparse_int8_avx2_table),
                                  &sparse_int8_portable_table};

// ------------------------------------------------------------------------------------------------------
// Checks.
#define FXR_CHECK(cond, ...) TORCH_CHECK(cond, "fxreduce.", op, ": ", __VA_ARGS__)

struct Csr {
  Tensor values, columns, row_ptr;
  int64_t rows, nnz, kernel_elements;
};

// values (nnz,) int8, columns (nnz,) int32 in [0, kernel_elements), row_ptr (rows + 1,) int64: 0, non-decreasing, nnz.
Csr checked_csr(const char* op, const Tensor& values, const Tensor& columns, const Tensor& row_ptr,
                int64_t kernel_elements) {
  for (const Tensor* t : {&values, &columns, &row_ptr})
    FXR_CHECK(t->device().is_cpu() && t->dim() == 1, "the CSR weight tensors must be 1-D CPU tensors, got ",
              t->device(), " ", t->sizes());
  FXR_CHECK(values.scalar_type() == at::kChar, "values must be int8, got ", values.scalar_type());
  FXR_CHECK(columns.scalar_type() == at::kInt, "columns must be int32, got ", columns.scalar_type());
  FXR_CHECK(row_ptr.scalar_type() == at::kLong, "row_ptr must be int64, got ", row_ptr.scalar_type());
  const int64_t nnz = values.size(0);
  FXR_CHECK(columns.size(0) == nnz, "columns has ", columns.size(0), " entries for ", nnz, " values");
  FXR_CHECK(row_ptr.size(0) >= 2, "row_ptr needs rows + 1 >= 2 entries, got ", row_ptr.size(0));
  Csr csr{values.contiguous(), columns.contiguous(), row_ptr.contiguous(), row_ptr.size(0) - 1, nnz, 0};
  const int64_t* ptr = csr.row_ptr.data_ptr<int64_t>();
  FXR_CHECK(ptr[0] == 0 && ptr[csr.rows] == nnz, "row_ptr must start at 0 and end at nnz = ", nnz, ", got ", ptr[0],
            " and ", ptr[csr.rows]);
  for (int64_t n = 0; n < csr.rows; ++n)
    FXR_CHECK(ptr[n] <= ptr[n + 1], "row_ptr must be non-decreasing; row ", n, " goes from ", ptr[n], " to ",
              ptr[n + 1]);
  csr.kernel_elements = kernel_elements;  // the column indices are checked where run() reads them
  return csr;
}

void check_channel_vector(const char* op, const std::optional<Tensor>& t, const char* name, int64_t rows) {
  if (!t.has_value()) return;
  FXR_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == rows, name,
            " must be a float32 CPU tensor of shape (", rows, ",), got ", t->scalar_type(), " ", t->sizes(), " on ",
            t->device());
}

// The geometry of a (possibly Linear-as-conv) call: input (images, C, H, W), kernel (C, KH, KW).
struct Geometry {
  int64_t images, C, H, W, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW;
  int64_t Hp() const { return H + 2 * ph; }
  int64_t Wp() const { return W + 2 * pw; }
  // A Linear as a conv (linear_geometry): one pixel, column c at input element c.
  bool is_linear() const { return C == 1 && H == 1 && KH == 1 && KW == W && OH == 1 && OW == 1 && pw == 0; }
};

std::vector<int64_t> pair_of(const char* op, c10::IntArrayRef values, const char* name, int64_t low) {
  FXR_CHECK(values.size() == 2 && values[0] >= low && values[1] >= low, name, " must be two integers >= ", low,
            ", got ", values);
  return {values[0], values[1]};
}

Geometry conv_geometry(const char* op, const Tensor& x, c10::IntArrayRef kernel, c10::IntArrayRef stride,
                       c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  FXR_CHECK(x.dim() == 4, "expected a 4-D input (N, C, H, W), got ", x.sizes());
  FXR_CHECK(kernel.size() == 3 && kernel[0] > 0 && kernel[1] > 0 && kernel[2] > 0,
            "kernel must be (in_channels, kh, kw) > 0, got ", kernel);
  FXR_CHECK(x.size(1) == kernel[0], "input has ", x.size(1), " channels, the weight ", kernel[0]);
  auto s = pair_of(op, stride, "stride", 1), p = pair_of(op, padding, "padding", 0), d = pair_of(op, dilation,
                                                                                                  "dilation", 1);
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), kernel[1], kernel[2], s[0], s[1], p[0], p[1], d[0], d[1], 0, 0};
  g.OH = (g.Hp() - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.OW = (g.Wp() - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  FXR_CHECK(g.Hp() >= g.dh * (g.KH - 1) + 1 && g.Wp() >= g.dw * (g.KW - 1) + 1, "the input ", x.sizes(),
            " (padded) is smaller than the kernel");
  return g;
}

Geometry linear_geometry(int64_t images, int64_t in_features) {
  return Geometry{images, 1, 1, in_features, 1, in_features, 1, 1, 0, 0, 1, 1, 1, 1};
}

// A max pooling window (= stride, no padding, floor mode) on the conv's output: 1..4, and no larger than it.
constexpr int64_t kMaxPool = 4;  // pool^2 pixels fit the kernels' epilogue tile of 16

void check_pool(const char* op, const Geometry& g, int64_t pool) {
  FXR_CHECK(pool >= 1 && pool <= kMaxPool, "pool must be a max pooling window side in [1, ", kMaxPool, "], got ",
            pool);
  FXR_CHECK(g.OH >= pool && g.OW >= pool, "the conv output ", g.OH, "x", g.OW, " is smaller than the pooling window ",
            pool, "x", pool);
}

// ------------------------------------------------------------------------------------------------------
// The driver: quantize the input into blocks of `width` images (parallel over blocks), then every (block, output
// row) pair (parallel, block-major so a block stays in cache across its rows).
constexpr int64_t kWorkPerTask = 1 << 15;  // multiply-adds below which a thread is not worth waking
constexpr int64_t kQuantizePerTask = 1 << 16;  // input elements, the same for quantizing
constexpr int64_t kRowChunk = 16;         // the kernels' epilogue tile (kEpilogueOutputs)

void run(const char* op, const Geometry& g, const Csr& csr, const float* x, const uint8_t* xq, float inverse_scale,
         int32_t zero, const float* multipliers, const float* bias, bool relu, float* out, int32_t* out_int,
         int64_t pool = 1) {
  const SparseInt8Table& table = tables.active();
  const int64_t width = table.width, blocks = (g.images + width - 1) / width;
  const int64_t PH = g.OH / pool, PW = g.OW / pool, window = pool * pool;
  const bool linear = g.is_linear();
  const int64_t elements = g.C * g.Hp() * g.Wp();
  // A Linear's "pixels" are consecutive blocks (the kernel's pixel tile of them per task); a conv's, its output
  // pixels, whole pooling windows one after another.
  const int64_t pixels = linear ? kSparsePixelTile : PH * PW * window;
  const int64_t block_step = linear ? kSparsePixelTile : 1, block_groups = (blocks + block_step - 1) / block_step;
  // Per call, only what is per kernel element or per row: the input offset of each (c, kh, kw) (a conv's; a
  // Linear's column c is at c * width), the range check of the column indices and each row's sum of values (the
  // zero point's correction). The non-zeros themselves are read as stored by the kernel.
  std::vector<int64_t> column_offsets(linear ? 0 : csr.kernel_elements), pixel_offsets(pixels);
  if (!linear)
    for (int64_t c = 0, k = 0; c < g.C; ++c)
      for (int64_t kh = 0; kh < g.KH; ++kh)
        for (int64_t kw = 0; kw < g.KW; ++kw)
          column_offsets[k++] = ((c * g.Hp() + kh * g.dh) * g.Wp() + kw * g.dw) * width;
  const int32_t* columns = csr.columns.data_ptr<int32_t>();
  const int8_t* values = csr.values.data_ptr<int8_t>();
  const int64_t* row_ptr = csr.row_ptr.data_ptr<int64_t>();
  // A negative index is a large unsigned one: one compare per index, which the compiler vectorises.
  const uint32_t limit = static_cast<uint32_t>(std::min<int64_t>(csr.kernel_elements, int64_t{1} << 31));
  uint32_t outside = 0;
  for (int64_t i = 0; i < csr.nnz; ++i) outside |= static_cast<uint32_t>(columns[i]) >= limit;
  if (outside) {
    const int64_t low = csr.columns.min().item<int64_t>(), high = csr.columns.max().item<int64_t>();
    TORCH_CHECK(false, "fxreduce.", op, ": column indices must lie in [0, ", csr.kernel_elements, "), got [", low,
                ", ", high, "]");
  }
  std::vector<int32_t> row_sums(csr.rows);
  for (int64_t n = 0; n < csr.rows; ++n) {
    int32_t sum = 0;
    for (int64_t i = row_ptr[n]; i < row_ptr[n + 1]; ++i) sum += values[i];
    row_sums[n] = sum;
  }
  // A conv's pixels pooling window by window (one window of one pixel without pooling): the kernel pools each run
  // of `window` consecutive pixels. A Linear's are blocks, one after another.
  if (linear)
    for (int64_t p = 0; p < pixels; ++p) pixel_offsets[p] = p * elements * width;
  else
    for (int64_t ph = 0, k = 0; ph < PH; ++ph)
      for (int64_t pw = 0; pw < PW; ++pw)
        for (int64_t i = 0; i < pool; ++i)
          for (int64_t j = 0; j < pool; ++j)
            pixel_offsets[k++] = ((ph * pool + i) * g.sh * g.Wp() + (pw * pool + j) * g.sw) * width;
  Tensor quantized = at::empty({blocks * elements * width}, at::kByte);
  uint8_t* quantized_data = quantized.data_ptr<uint8_t>();
  SparseQuantize q{x, xq, g.images, g.C, g.H, g.W, g.ph, g.pw, g.Hp(), g.Wp(), inverse_scale, zero, quantized_data};
  at::parallel_for(0, blocks, std::max<int64_t>(1, kQuantizePerTask / (elements * width)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) table.quantize(q, b);
  });
  SparseInt8Rows a{values, columns, linear ? nullptr : column_offsets.data(), row_ptr, pixels, pixel_offsets.data(),
                   linear ? width : 0, static_cast<int>(pool), elements, g.images, row_sums.data(), zero,
                   multipliers, bias, relu, out, out_int, csr.rows * PH * PW, 1,
                   linear ? width * csr.rows : csr.rows};
  // Tasks are (blocks, chunk of kRowChunk rows) pairs, block-major so the blocks stay in cache across their rows.
  const int64_t chunks = (csr.rows + kRowChunk - 1) / kRowChunk;
  const int64_t per_chunk = std::max<int64_t>(1, csr.nnz / chunks * pixels * width);
  at::parallel_for(0, block_groups * chunks, std::max<int64_t>(1, kWorkPerTask / per_chunk),
                   [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> scratch(kRowChunk * kRowChunk * width);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t % chunks * kRowChunk;
      table.rows(a, quantized_data, t / chunks * block_step, n0, std::min(csr.rows, n0 + kRowChunk), scratch.data());
    }
  });
}

// The input's smallest and largest value (NaN when any is NaN, as at::aminmax), in parallel only past
// kQuantizePerTask elements a thread: at::aminmax woke the second thread for a 64-image batch of fc1's 800 inputs.
std::pair<float, float> value_range(const float* x, int64_t n) {
  using Range = std::pair<float, float>;
  const SparseInt8Table& table = tables.active();
  const auto join = [](Range a, Range b) {
    if (std::isnan(a.first) || std::isnan(b.first)) return Range(NAN, NAN);
    return Range(std::min(a.first, b.first), std::max(a.second, b.second));
  };
  return at::parallel_reduce(
      0, n, kQuantizePerTask, Range(INFINITY, -INFINITY),
      [&](int64_t begin, int64_t end, Range range) {
        Range part;
        table.value_range(x + begin, end - begin, &part.first, &part.second);
        return join(range, part);
      },
      join);
}

// Per output channel: x_scale * w_scale, the float epilogue's multiplier.
std::vector<float> multipliers_of(const Csr& csr, const Tensor& scale, float input_scale) {
  std::vector<float> multipliers(csr.rows);
  const float* s = scale.data_ptr<float>();
  for (int64_t n = 0; n < csr.rows; ++n) multipliers[n] = input_scale * s[n];
  return multipliers;
}

void check_input(const char* op, const Tensor& x, at::ScalarType dtype) {
  FXR_CHECK(x.device().is_cpu() && x.scalar_type() == dtype, "the input must be a ", dtype, " CPU tensor, got ",
            x.scalar_type(), " on ", x.device());
}

// ------------------------------------------------------------------------------------------------------
// sparse_int8_linear(x (..., K), CSR weight (N, K), scale (N,), bias, relu) -> (..., N) float32: x quantized per
// call to 0..127 with torch's qparams for its min and max (what fbgemm's dynamic Linear with reduce_range does).
Tensor sparse_int8_linear(const Tensor& x_in, const Tensor& values, const Tensor& columns, const Tensor& row_ptr,
                          int64_t in_features, const Tensor& scale, const std::optional<Tensor>& bias, bool relu) {
  const char* op = "sparse_int8_linear";
  check_input(op, x_in, at::kFloat);
  FXR_CHECK(x_in.dim() >= 1 && x_in.size(-1) == in_features, "input's last dimension must be in_features = ",
            in_features, ", got ", x_in.sizes());
  Csr csr = checked_csr(op, values, columns, row_ptr, in_features);
  check_channel_vector(op, scale, "scale", csr.rows);
  check_channel_vector(op, bias, "bias", csr.rows);
  Tensor x = x_in.reshape({-1, in_features}).contiguous();
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = csr.rows;
  Tensor out = at::empty(shape, x_in.options());
  if (out.numel() == 0) return out;
  float low = 0.0f, high = 0.0f;
  if (x.numel() > 0) std::tie(low, high) = value_range(x.data_ptr<float>(), x.numel());
  FXR_CHECK(std::isfinite(low) && std::isfinite(high), "the input holds NaN or infinite values (range [", low, ", ",
            high, "]); quantizing it to int8 needs a finite range: find where they come from upstream, or clamp the "
            "input before this layer");
  const auto qp = quant_utils::ChooseQuantizationParams(low, high, 0, 255, false, false, /*reduce_range=*/true);
  const std::vector<float> multipliers = multipliers_of(csr, scale.contiguous(), qp.scale);
  Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  run(op, linear_geometry(x.size(0), in_features), csr, x.data_ptr<float>(), nullptr, 1.0f / qp.scale, qp.zero_point,
      multipliers.data(), bias.has_value() ? b.data_ptr<float>() : nullptr, relu, out.data_ptr<float>(), nullptr);
  return out;
}

// sparse_int8_conv2d(x (N, C, H, W), CSR weight (O, C*kh*kw), kernel (C, kh, kw), ..., input_qparams (scale, zero),
// relu, pool) -> (N, O, OH / pool, OW / pool) float32 straight from the int32 sums (no output requantization), max
// pooled over pool x pool windows (stride pool, floor mode) when pool > 1: the conv's full output is never written.
Tensor sparse_int8_conv2d(const Tensor& x_in, const Tensor& values, const Tensor& columns, const Tensor& row_ptr,
                          c10::IntArrayRef kernel, const Tensor& scale, const std::optional<Tensor>& bias,
                          c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                          const Tensor& input_qparams, bool relu, int64_t pool) {
  const char* op = "sparse_int8_conv2d";
  check_input(op, x_in, at::kFloat);
  const Geometry g = conv_geometry(op, x_in, kernel, stride, padding, dilation);
  check_pool(op, g, pool);
  Csr csr = checked_csr(op, values, columns, row_ptr, g.C * g.KH * g.KW);
  check_channel_vector(op, scale, "scale", csr.rows);
  check_channel_vector(op, bias, "bias", csr.rows);
  check_channel_vector(op, input_qparams, "input_qparams (scale, zero point)", 2);
  const float in_scale = input_qparams[0].item<float>();
  const double in_zero = input_qparams[1].item<double>();
  FXR_CHECK(in_scale > 0 && std::isfinite(in_scale) && in_zero >= 0 && in_zero <= 255 && in_zero == std::floor(in_zero),
            "input_qparams must be a positive finite scale and an integer zero point in [0, 255], got ", in_scale,
            ", ", in_zero);
  Tensor x = x_in.contiguous();
  Tensor out = at::empty({g.images, csr.rows, g.OH / pool, g.OW / pool},
                         x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const std::vector<float> multipliers = multipliers_of(csr, scale.contiguous(), in_scale);
  if (pool > 1)
    for (int64_t n = 0; n < csr.rows; ++n)
      FXR_CHECK(multipliers[n] >= 0, "pooling on the int32 sums needs non-negative weight scales; output channel ",
                n, " has scale ", scale[n].item<float>());
  Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  run(op, g, csr, x.data_ptr<float>(), nullptr, 1.0f / in_scale, static_cast<int32_t>(in_zero), multipliers.data(),
      bias.has_value() ? b.data_ptr<float>() : nullptr, relu, out.data_ptr<float>(), nullptr, pool);
  return out;
}

// The int32 sums themselves, for quantized uint8 input (padding reads `zero`): what the tests hold equal, bit for
// bit, to a dense int8 GEMM on the same weights.
Tensor sparse_int8_conv2d_int32(const Tensor& xq_in, const Tensor& values, const Tensor& columns,
                                const Tensor& row_ptr, c10::IntArrayRef kernel, c10::IntArrayRef stride,
                                c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t zero, int64_t pool) {
  const char* op = "sparse_int8_conv2d_int32";
  check_input(op, xq_in, at::kByte);
  FXR_CHECK(zero >= 0 && zero <= 255, "zero must lie in [0, 255], got ", zero);
  const Geometry g = conv_geometry(op, xq_in, kernel, stride, padding, dilation);
  check_pool(op, g, pool);
  Csr csr = checked_csr(op, values, columns, row_ptr, g.C * g.KH * g.KW);
  Tensor xq = xq_in.contiguous();
  Tensor out = at::empty({g.images, csr.rows, g.OH / pool, g.OW / pool},
                         xq_in.options().dtype(at::kInt).memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  run(op, g, csr, nullptr, xq.data_ptr<uint8_t>(), 1.0f, static_cast<int32_t>(zero), nullptr, nullptr, false, nullptr,
      out.data_ptr<int32_t>(), pool);
  return out;
}

Tensor sparse_int8_linear_int32(const Tensor& xq_in, const Tensor& values, const Tensor& columns,
                                const Tensor& row_ptr, int64_t in_features) {
  const char* op = "sparse_int8_linear_int32";
  check_input(op, xq_in, at::kByte);
  FXR_CHECK(xq_in.dim() == 2 && xq_in.size(1) == in_features, "expected input (rows, ", in_features, "), got ",
            xq_in.sizes());
  Csr csr = checked_csr(op, values, columns, row_ptr, in_features);
  Tensor xq = xq_in.contiguous();
  Tensor out = at::empty({xq.size(0), csr.rows}, xq_in.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  run(op, linear_geometry(xq.size(0), in_features), csr, nullptr, xq.data_ptr<uint8_t>(), 1.0f, 0, nullptr, nullptr,
      false, nullptr, out.data_ptr<int32_t>());
  return out;
}

#undef FXR_CHECK

}  // namespace

TORCH_LIBRARY_FRAGMENT(fxreduce, m) {
  m.def("sparse_int8_linear(Tensor x, Tensor values, Tensor columns, Tensor row_ptr, int in_features, Tensor scale, "
        "Tensor? bias, bool relu) -> Tensor");
  m.def("sparse_int8_conv2d(Tensor x, Tensor values, Tensor columns, Tensor row_ptr, int[] kernel, Tensor scale, "
        "Tensor? bias, int[] stride, int[] padding, int[] dilation, Tensor input_qparams, bool relu, int pool=1) -> "
        "Tensor");
  m.def("sparse_int8_linear_int32(Tensor xq, Tensor values, Tensor columns, Tensor row_ptr, int in_features) -> "
        "Tensor");
  m.def("sparse_int8_conv2d_int32(Tensor xq, Tensor values, Tensor columns, Tensor row_ptr, int[] kernel, "
        "int[] stride, int[] padding, int[] dilation, int zero, int pool=1) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxreduce, CPU, m) {
  m.impl("sparse_int8_linear", &sparse_int8_linear);
  m.impl("sparse_int8_conv2d", &sparse_int8_conv2d);
  m.impl("sparse_int8_linear_int32", &sparse_int8_linear_int32);
  m.impl("sparse_int8_conv2d_int32", &sparse_int8_conv2d_int32);
}

}  // namespace native
}  // namespace fxreduce
