// Two builds of kernels_impl.h in one process (benchmarks/ab_kernels.py compiles each into its own namespace
// and table, fxreduce::native::ab_base_table and ab_work_table), timed call by call on the same operands: the
// indirect-K forward and weight gradient (rows_gemm) and the input gradient (row_dots) of an LSTM layer's input
// projection, T=35 steps of 20 rows, in = H, out = 4H, a uniform keep set of keep x H units per step; and the
// dense weight gradient of all steps' rows at once (keep ignored), A transposed first as ops.cpp does.
//   ab_kernels_driver H keep pairs [op]   ->   one line per op: both builds' times and the pairs' median ratio
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "kernels.h"

namespace fxreduce {
namespace native {
extern const KernelTable ab_base_table;
extern const KernelTable ab_work_table;
}  // namespace native
}  // namespace fxreduce

using namespace fxreduce::native;

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s H keep pairs [forward|weight_gradient|input_gradient|dense_weight_gradient]\n",
                 argv[0]);
    return 2;
  }
  const int64_t H = std::atoi(argv[1]), pairs = std::atoi(argv[3]);
  const double keep = std::atof(argv[2]);
  const char* only = argc > 4 ? argv[4] : nullptr;
  const int64_t G = 35, N = 20, out = 4 * H, k = std::max<int64_t>(1, static_cast<int64_t>(keep * H + 0.5));
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  auto random = [&](int64_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = normal(rng);
    return v;
  };
  std::vector<float> x = random(G * N * k), wt = random(H * out), dout = random(G * N * out);
  std::vector<float> y(G * N * out), dw(H * out), dx(G * N * k), xt = random(H * G * N);
  std::vector<int64_t> index(G * k), units(H);
  std::vector<uint8_t> first(G * k, 0), written(H, 0);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t u = 0; u < H; ++u) units[u] = u;
    std::shuffle(units.begin(), units.end(), rng);
    std::sort(units.begin(), units.begin() + k);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t u = units[j];
      index[g * k + j] = u;
      first[g * k + j] = written[u] ? 0 : 1;
      written[u] = 1;
    }
  }
  const RowsGemm<float> forward{G, N, k, x.data(), N * k, k, 1, wt.data(), 0, out, index.data(), k, y.data(), N * out,
                                out, nullptr, 0, nullptr, 0, 0, false, 1.0f};
  RowsGemm<float> weight_gradient{G, k, N, x.data(), N * k, 1, k, dout.data(), N * out, out, nullptr, 0, dw.data(),
                                  0, out, index.data(), k, nullptr, 0, 0, true, 1.0f};
  weight_gradient.c_first = first.data();
  const RowDots<float> input_gradient{G, N, k, out, dout.data(), N * out, out, wt.data(), 0, out, index.data(), k,
                                      dx.data(), N * k, k, nullptr, 0, false, 1.0f};
  const RowsGemm<float> dense_weight_gradient{1, H, G * N, xt.data(), 0, G * N, 1, dout.data(), 0, out, nullptr, 0,
                                              dw.data(), 0, out, nullptr, 0, nullptr, 0, 0, false, 1.0f};
  const KernelTable* builds[2] = {&ab_base_table, &ab_work_table};
  const char* names[4] = {"forward", "weight_gradient", "input_gradient", "dense_weight_gradient"};
  for (int op = 0; op < 4; ++op) {
    if (only && std::strcmp(only, names[op]) != 0) continue;
    auto call = [&](const KernelTable* t) {
      if (op == 0) t->rows_gemm_f(forward, 0, out);
      if (op == 1) t->rows_gemm_f(weight_gradient, 0, out);
      if (op == 2) t->row_dots_f(input_gradient, 0, k);
      if (op == 3) t->rows_gemm_f(dense_weight_gradient, 0, out);
    };
    std::vector<double> seconds[2], ratios;
    for (int64_t p = 0; p < pairs; ++p) {
      double pair[2];
      for (int turn = 0; turn < 2; ++turn) {
        const int b = p % 2 ? 1 - turn : turn;  // alternate which build goes first
        call(builds[b]);
        const auto start = std::chrono::steady_clock::now();
        call(builds[b]);
        pair[b] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        seconds[b].push_back(pair[b]);
      }
      ratios.push_back(pair[1] / pair[0]);
    }
    for (auto* v : {&seconds[0], &seconds[1], &ratios}) std::sort(v->begin(), v->end());
    std::printf("%lld %.2f %s %.4f %.4f %.4f %.4f %.4f\n", static_cast<long long>(H), keep, names[op],
                seconds[0][0] * 1e3, seconds[0][pairs / 2] * 1e3, seconds[1][0] * 1e3, seconds[1][pairs / 2] * 1e3,
                ratios[pairs / 2]);
  }
  return 0;
}
