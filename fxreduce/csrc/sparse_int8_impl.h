// The sparse int8 kernels, written once with GCC vector extensions and compiled per ISA like kernels_impl.h:
// the including unit defines FXR_SPARSE_ISA (its namespace), FXR_SPARSE_TABLE, FXR_VEC_BYTES
// and FXR_SNV (int32 accumulator vectors per block: width = FXR_SNV * lanes images). The units are compiled with
// -ffp-contract=off so x * inverse_scale is rounded before the rounding to an integer, as torch's quantizer does.
#include <cstdint>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "sparse_int8.h"

namespace fxreduce {
namespace native {
namespace FXR_SPARSE_ISA {

constexpr int L = FXR_VEC_BYTES / 4;  // int32 lanes
constexpr int NV = FXR_SNV;
constexpr int WIDTH = L * NV;
constexpr int PT = kSparsePixelTile;
constexpr int kEpilogueOutputs = 16;
typedef int32_t VI __attribute__((vector_size(FXR_VEC_BYTES)));
typedef float VF __attribute__((vector_size(FXR_VEC_BYTES)));

#include "simd_inl.h"

// Two steps GCC's vector extensions compile element by element, written with the ISA's instructions where it has
// them: widen L uint8 lanes to int32 (vpmovzxbd), and multiply them by a broadcast int8 weight. |w * q| <= 127 *
// 255 fits int16, so vpmaddwd on lanes whose upper halves are zero gives the exact product in one instruction.
inline VI widen(const uint8_t* p) {
#if FXR_VEC_BYTES == 64 && defined(__AVX512BW__)
  return reinterpret_cast<VI>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif FXR_VEC_BYTES == 32 && defined(__AVX2__)
  return reinterpret_cast<VI>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  VI v;
  for (int e = 0; e < L; ++e) v[e] = p[e];
  return v;
#endif
}

// w: the int8 weight in the low 16 bits of every lane, upper 16 bits zero.
inline VI small_product(VI q, VI w) {
#if FXR_VEC_BYTES == 64 && defined(__AVX512BW__)
  return reinterpret_cast<VI>(_mm512_madd_epi16(reinterpret_cast<__m512i>(q), reinterpret_cast<__m512i>(w)));
#elif FXR_VEC_BYTES == 32 && defined(__AVX2__)
  return reinterpret_cast<VI>(_mm256_madd_epi16(reinterpret_cast<__m256i>(q), reinterpret_cast<__m256i>(w)));
#else
  return q * ((w << 16) >> 16);  // the weight sign-extended from the low half
#endif
}

// L int32 lanes (each 0..255) stored as L bytes.
inline void narrow_store(uint8_t* p, VI v) {
#if FXR_VEC_BYTES == 64 && defined(__AVX512BW__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(reinterpret_cast<__m512i>(v)));
#elif FXR_VEC_BYTES == 32 && defined(__AVX2__)
  const __m256i low_bytes = _mm256_shuffle_epi8(reinterpret_cast<__m256i>(v),
                                                _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                                 -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1,
                                                                 -1, -1, -1, -1));
  const __m256i packed = _mm256_permutevar8x32_epi32(low_bytes, _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
#else
  for (int e = 0; e < L; ++e) p[e] = static_cast<uint8_t>(v[e]);
#endif
}


// q = clamp(nearbyint(x * inverse_scale) + zero, 0, 255). x * inverse_scale is first clamped to +-512 (any value
// past it gives 0 or 255 alike; a NaN gives 0), then rounded ties to even, the default rounding mode: by the
// ISA's conversion (vcvtps2dq, with min and max in place of compare-and-blend: 5 fewer instructions a vector; a
// Linear's per-call quantization had taken a third of the time of its sparse products), else by adding and
// subtracting 1.5 * 2^23.
inline VI quantize_vector(VF x, float inverse_scale, int32_t zero) {
#if FXR_VEC_BYTES == 64 && defined(__AVX512F__)
  const __m512 scaled = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(reinterpret_cast<__m512>(x),
                                                                  _mm512_set1_ps(inverse_scale)),
                                                    _mm512_set1_ps(-512.0f)),
                                      _mm512_set1_ps(512.0f));
  const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(scaled), _mm512_set1_epi32(zero));
  return reinterpret_cast<VI>(_mm512_min_epi32(_mm512_max_epi32(q, _mm512_setzero_si512()), _mm512_set1_epi32(255)));
#elif FXR_VEC_BYTES == 32 && defined(__AVX2__)
  const __m256 scaled = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(reinterpret_cast<__m256>(x),
                                                                  _mm256_set1_ps(inverse_scale)),
                                                    _mm256_set1_ps(-512.0f)),
                                      _mm256_set1_ps(512.0f));
  const __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(scaled), _mm256_set1_epi32(zero));
  return reinterpret_cast<VI>(_mm256_min_epi32(_mm256_max_epi32(q, _mm256_setzero_si256()), _mm256_set1_epi32(255)));
#else
  VF scaled = x * inverse_scale;
  scaled = scaled < -512.0f ? VF() - 512.0f : scaled;
  scaled = scaled > 512.0f ? VF() + 512.0f : scaled;
  const VF magic = VF() + 12582912.0f;
  VI q = __builtin_convertvector((scaled + magic) - magic, VI) + zero;
  q = q < 0 ? VI() : q;
  return q > 255 ? VI() + 255 : q;
#endif
}

inline uint8_t quantize_scalar(float x, float inverse_scale, int32_t zero) {
  float scaled = x * inverse_scale;
  scaled = scaled < -512.0f ? -512.0f : scaled > 512.0f ? 512.0f : scaled;
  const int32_t q = static_cast<int32_t>((scaled + 12582912.0f) - 12582912.0f) + zero;
  return static_cast<uint8_t>(q < 0 ? 0 : q > 255 ? 255 : q);
}

// One pass, four accumulators of each so the compare chain does not bound it; `v < low ? v : low` keeps `low` for a
// NaN, which the separate unordered test catches.
void value_range(const float* x, int64_t n, float* low, float* high) {
  constexpr int U = 4;
  VF lo[U], hi[U];
  VI nan = VI();
  for (int u = 0; u < U; ++u) lo[u] = VF() + __builtin_inff(), hi[u] = VF() - __builtin_inff();
  int64_t i = 0;
  for (; i + U * L <= n; i += U * L)
    for (int u = 0; u < U; ++u) {
      const VF v = load<VF>(x + i + u * L);
      lo[u] = v < lo[u] ? v : lo[u];
      hi[u] = v > hi[u] ? v : hi[u];
      nan |= v != v;
    }
  float l = __builtin_inff(), h = -__builtin_inff();
  bool any_nan = false;
  for (int u = 0; u < U; ++u)
    for (int e = 0; e < L; ++e) {
      l = lo[u][e] < l ? lo[u][e] : l;
      h = hi[u][e] > h ? hi[u][e] : h;
    }
  for (int e = 0; e < L; ++e) any_nan |= nan[e] != 0;
  for (; i < n; ++i) {
    l = x[i] < l ? x[i] : l;
    h = x[i] > h ? x[i] : h;
    any_nan |= x[i] != x[i];
  }
  *low = any_nan ? __builtin_nanf("") : l;
  *high = any_nan ? __builtin_nanf("") : h;
}

// `count` consecutive input elements to `dst`, WIDTH bytes apart.
inline void quantize_run(const SparseQuantize& a, int64_t src, int64_t count, uint8_t* dst) {
  if (a.xq) {
    for (int64_t e = 0; e < count; ++e) dst[e * WIDTH] = a.xq[src + e];
    return;
  }
  const float* x = a.x + src;
  int64_t e = 0;
  for (; e + L <= count; e += L) {
    const VI q = quantize_vector(load<VF>(x + e), a.inverse_scale, a.zero);
    for (int lane = 0; lane < L; ++lane) dst[(e + lane) * WIDTH] = static_cast<uint8_t>(q[lane]);
  }
  for (; e < count; ++e) dst[e * WIDTH] = quantize_scalar(x[e], a.inverse_scale, a.zero);
}

void quantize(const SparseQuantize& a, int64_t block) {
  const int64_t elements = a.C * a.Hp * a.Wp;
  uint8_t* dst = a.blocks + block * elements * WIDTH;
  const int64_t first = block * WIDTH;
  const int64_t count = a.images - first < WIDTH ? a.images - first : WIDTH;
  if (a.pad_h || a.pad_w || count < WIDTH) __builtin_memset(dst, static_cast<uint8_t>(a.zero), elements * WIDTH);
  const int64_t plane = a.H * a.W;
  int64_t done = 0;  // images quantized by the transposing path
  if (!a.xq && a.pad_w == 0) {
    // L images x L elements at a time: quantized as L vectors, transposed, stored as L rows of L bytes.
    for (; done + L <= count; done += L)
      for (int64_t c = 0; c < a.C; ++c) {
        const float* x = a.x + ((first + done) * a.C + c) * plane;
        uint8_t* out = dst + (c * a.Hp + a.pad_h) * a.Wp * WIDTH + done;
        int64_t e = 0;
        for (; e + L <= plane; e += L) {
          VI m[L];
          for (int j = 0; j < L; ++j) m[j] = quantize_vector(load<VF>(x + j * a.C * plane + e), a.inverse_scale, a.zero);
          transpose<L / 2, L>(m);
          for (int k = 0; k < L; ++k) narrow_store(out + (e + k) * WIDTH, m[k]);
        }
        for (; e < plane; ++e)
          for (int j = 0; j < L; ++j)
            out[e * WIDTH + j] = quantize_scalar(x[j * a.C * plane + e], a.inverse_scale, a.zero);
      }
  }
  for (int64_t b = done; b < count; ++b)
    for (int64_t c = 0; c < a.C; ++c) {
      const int64_t src = ((first + b) * a.C + c) * plane;
      uint8_t* out = dst + ((c * a.Hp + a.pad_h) * a.Wp + a.pad_w) * WIDTH + b;
      if (a.pad_w == 0) {  // the padded rows are as wide as the input's: one run per plane
        quantize_run(a, src, plane, out);
        continue;
      }
      for (int64_t h = 0; h < a.H; ++h) quantize_run(a, src + h * a.W, a.W, out + h * a.Wp * WIDTH);
    }
}

// PTt output pixels of one row: the non-zeros outer (each weight broadcast once), pixels and lanes inner. Dense
// columns (a Linear's): column c is at byte c * WIDTH of a block, no table lookup.
template <int PTt, bool DenseColumns>
__attribute__((always_inline)) inline void pixel_tile(const SparseInt8Rows& a, const uint8_t* block, int64_t i0,
                                                      int64_t i1, const int64_t* poff,
                       int32_t* acc_out) {
  VI acc[PTt][NV];
  for (int p = 0; p < PTt; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v] = VI();
  for (int64_t i = i0; i < i1; ++i) {
    const VI w = VI() + static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(a.values[i])));
    const uint8_t* base = block + (DenseColumns ? a.columns[i] * int64_t{WIDTH} : a.column_offsets[a.columns[i]]);
    for (int p = 0; p < PTt; ++p)
      for (int v = 0; v < NV; ++v) acc[p][v] += small_product(widen(base + poff[p] + v * L), w);
  }
  for (int p = 0; p < PTt; ++p)
    for (int v = 0; v < NV; ++v) store(acc_out + p * WIDTH + v * L, acc[p][v]);
}

template <int PTt, bool DenseColumns>
__attribute__((always_inline)) inline void pixel_tile_of(int pixels, const SparseInt8Rows& a, const uint8_t* block,
                                                         int64_t i0, int64_t i1, const int64_t* poff,
                                                         int32_t* acc_out) {
  if constexpr (PTt > 0) {
    if (pixels == PTt) return pixel_tile<PTt, DenseColumns>(a, block, i0, i1, poff, acc_out);
    pixel_tile_of<PTt - 1, DenseColumns>(pixels, a, block, i0, i1, poff, acc_out);
  }
}

// Each window of `window` consecutive pixel tiles of acc (pixel j of window q at acc[(q * window + j) * WIDTH]) to
// its lane-wise maximum, stored at acc[q * WIDTH]: max pooling on the int32 sums, before the epilogue.
inline void pool_windows(int32_t* acc, int64_t windows, int window) {
  for (int64_t q = 0; q < windows; ++q)
    for (int v = 0; v < NV; ++v) {
      VI m = load<VI>(acc + q * window * WIDTH + v * L);
      for (int j = 1; j < window; ++j) {
        const VI next = load<VI>(acc + (q * window + j) * WIDTH + v * L);
        m = next > m ? next : m;
      }
      store(acc + q * WIDTH + v * L, m);
    }
}

// Output rows [n_begin, n_end) of one block, kEpilogueOutputs rows x up to kEpilogueOutputs pixels at a time: the
// int32 sums of the tile, max-pooled over each window of a.pool x a.pool pixels (the pixel offsets come window by
// window), converted to float in place, then written out. A Linear's pixels are the blocks from `block` on
// (pixel_images = WIDTH), as many as hold images: a row's handful of non-zeros is read and broadcast once for
// PT x WIDTH images, where one block at a time spent more on each row's set-up and epilogue than on its products.
// Pooling the sums equals pooling the floats, bit for bit:
// the epilogue is non-decreasing in the sum (a multiplier >= 0, the caller checks). Outputs are channels-last (a
// Linear's rows are its channels), so with a full chunk of rows each (image, pixel) gets one contiguous run of
// channels, written as L x L transposes of the tile instead of one float per (row, pixel, image).
void rows(const SparseInt8Rows& a, const uint8_t* blocks, int64_t block, int64_t n_begin, int64_t n_end,
          int32_t* scratch) {
  constexpr int R = kEpilogueOutputs, S = kEpilogueOutputs;  // S: a row's pixel slots in the scratch tile
  const int window = a.pool * a.pool;
  const int64_t PP = S / window * window;  // pixels per chunk: whole windows
  const uint8_t* x = blocks + block * a.block_elements * WIDTH;
  const int64_t first = block * WIDTH;
  int64_t pixels = a.pixels;
  if (a.pixel_images) {
    const int64_t blocks_left = (a.images - first + WIDTH - 1) / WIDTH;
    pixels = blocks_left < pixels ? blocks_left : pixels;
  }
  // Images (lanes) of pixel q that exist: WIDTH, fewer in the last block.
  auto images_of = [&](int64_t q) {
    const int64_t left = a.images - first - q * a.pixel_images;
    return left < WIDTH ? left : int64_t{WIDTH};
  };
  float* y = reinterpret_cast<float*>(scratch);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += R) {
    const int64_t n1 = n0 + R < n_end ? n0 + R : n_end;
    for (int64_t p0 = 0; p0 < pixels; p0 += PP) {
      const int64_t p1 = p0 + PP < pixels ? p0 + PP : pixels;
      const int64_t q0 = p0 / window, outputs = (p1 - p0) / window;  // this chunk's output pixels
      for (int64_t n = n0; n < n1; ++n) {
        int32_t* acc = scratch + (n - n0) * S * WIDTH;
        for (int64_t p = p0; p < p1; p += PT) {
          const int tile = static_cast<int>(p1 - p < PT ? p1 - p : PT);
          if (a.column_offsets)
            pixel_tile_of<PT, false>(tile, a, x, a.row_ptr[n], a.row_ptr[n + 1], a.pixel_offsets + p,
                                     acc + (p - p0) * WIDTH);
          else
            pixel_tile_of<PT, true>(tile, a, x, a.row_ptr[n], a.row_ptr[n + 1], a.pixel_offsets + p,
                                    acc + (p - p0) * WIDTH);
        }
        if (window > 1) pool_windows(acc, outputs, window);
        if (a.out_int) continue;
        const int32_t offset = a.zero * a.row_sums[n];
        const float multiplier = a.multipliers[n], bias = a.bias ? a.bias[n] : 0.0f;
        for (int64_t e = 0; e < outputs * WIDTH; e += L) {
          VF v = __builtin_convertvector(load<VI>(acc + e) - offset, VF) * multiplier + bias;
          if (a.relu) v = v > 0.0f ? v : VF();
          store(y + (n - n0) * S * WIDTH + e, v);
        }
      }
      if (!a.out_int && n1 - n0 == R && a.out_channel == 1) {
        for (int64_t q = 0; q < outputs; ++q) {
          const int64_t count = images_of(q0 + q);
          for (int v = 0; v < NV; ++v)
            for (int r0 = 0; r0 < R; r0 += L) {
              VF m[L];
              for (int r = 0; r < L; ++r) m[r] = load<VF>(y + ((r0 + r) * S + q) * WIDTH + v * L);
              transpose<L / 2, L>(m);
              for (int j = 0; j < L && v * L + j < count; ++j)
                store(a.out + (first + v * L + j) * a.out_image + (q0 + q) * a.out_pixel + n0 + r0, m[j]);
            }
        }
        continue;
      }
      for (int64_t q = 0; q < outputs; ++q)
        for (int64_t b = 0, count = images_of(q0 + q); b < count; ++b)
          for (int64_t n = n0; n < n1; ++n) {
            const int64_t at = (first + b) * a.out_image + n * a.out_channel + (q0 + q) * a.out_pixel;
            const int64_t from = ((n - n0) * S + q) * WIDTH + b;
            if (a.out_int) {
              a.out_int[at] = scratch[from];
            } else {
              a.out[at] = y[from];
            }
          }
    }
  }
}

}  // namespace FXR_SPARSE_ISA

extern const SparseInt8Table FXR_SPARSE_TABLE = {FXR_SPARSE_ISA::WIDTH, &FXR_SPARSE_ISA::value_range,
                                                 &FXR_SPARSE_ISA::quantize, &FXR_SPARSE_ISA::rows};

}  // namespace native
}  // namespace fxreduce
