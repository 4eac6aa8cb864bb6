// The sparse int8 kernels, written once with GCC vector extensions and compiled per ISA like kernels_impl.h:
// the including unit defines FXR_SPARSE_ISA (its namespace), FXR_SPARSE_TABLE, FXR_SPARSE_NAME, FXR_VEC_BYTES
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
constexpr int PT = 4;  // output pixels per register tile
typedef int32_t VI __attribute__((vector_size(FXR_VEC_BYTES)));
typedef float VF __attribute__((vector_size(FXR_VEC_BYTES)));

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void store(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

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

// w: the weight in the low 16 bits of every lane, upper 16 bits zero.
inline VI small_product(VI q, VI w) {
#if FXR_VEC_BYTES == 64 && defined(__AVX512BW__)
  return reinterpret_cast<VI>(_mm512_madd_epi16(reinterpret_cast<__m512i>(q), reinterpret_cast<__m512i>(w)));
#elif FXR_VEC_BYTES == 32 && defined(__AVX2__)
  return reinterpret_cast<VI>(_mm256_madd_epi16(reinterpret_cast<__m256i>(q), reinterpret_cast<__m256i>(w)));
#else
  return q * ((w << 16) >> 16);  // the weight sign-extended from the low half
#endif
}

// nearbyint (ties to even, the default rounding mode) for |x| < 2^22: adding and subtracting 1.5 * 2^23.
inline VI quantize_vector(VF x, float inverse_scale, int32_t zero) {
  VF scaled = x * inverse_scale;
  scaled = scaled < -512.0f ? VF() - 512.0f : scaled;
  scaled = scaled > 512.0f ? VF() + 512.0f : scaled;
  const VF magic = VF() + 12582912.0f;
  VI q = __builtin_convertvector((scaled + magic) - magic, VI) + zero;
  q = q < 0 ? VI() : q;
  return q > 255 ? VI() + 255 : q;
}

inline uint8_t quantize_scalar(float x, float inverse_scale, int32_t zero) {
  VF v = VF() + x;
  return static_cast<uint8_t>(quantize_vector(v, inverse_scale, zero)[0]);
}

void quantize(const SparseQuantize& a, int64_t block) {
  const int64_t elements = a.C * a.Hp * a.Wp;
  uint8_t* dst = a.blocks + block * elements * WIDTH;
  __builtin_memset(dst, static_cast<uint8_t>(a.zero), elements * WIDTH);
  const int64_t first = block * WIDTH;
  const int64_t count = a.images - first < WIDTH ? a.images - first : WIDTH;
  const int64_t plane = a.H * a.W;
  for (int64_t b = 0; b < count; ++b) {
    for (int64_t c = 0; c < a.C; ++c)
      for (int64_t h = 0; h < a.H; ++h) {
        const int64_t src = ((first + b) * a.C + c) * plane + h * a.W;
        uint8_t* row = dst + ((c * a.Hp + h + a.pad_h) * a.Wp + a.pad_w) * WIDTH + b;
        if (a.xq) {
          for (int64_t w = 0; w < a.W; ++w) row[w * WIDTH] = a.xq[src + w];
          continue;
        }
        const float* x = a.x + src;
        int64_t w = 0;
        for (; w + L <= a.W; w += L) {
          const VI q = quantize_vector(load<VF>(x + w), a.inverse_scale, a.zero);
          for (int e = 0; e < L; ++e) row[(w + e) * WIDTH] = static_cast<uint8_t>(q[e]);
        }
        for (; w < a.W; ++w) row[w * WIDTH] = quantize_scalar(x[w], a.inverse_scale, a.zero);
      }
  }
}

// PTt output pixels of one row: the non-zeros outer (each weight broadcast once), pixels and lanes inner.
template <int PTt>
inline void pixel_tile(const SparseInt8Rows& a, const uint8_t* block, int64_t i0, int64_t i1, const int64_t* poff,
                       int32_t* acc_out) {
  VI acc[PTt][NV];
  for (int p = 0; p < PTt; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v] = VI();
  for (int64_t i = i0; i < i1; ++i) {
    const VI w = VI() + a.weights[i];
    const uint8_t* base = block + a.offsets[i];
    for (int p = 0; p < PTt; ++p)
      for (int v = 0; v < NV; ++v) acc[p][v] += small_product(widen(base + poff[p] + v * L), w);
  }
  for (int p = 0; p < PTt; ++p)
    for (int v = 0; v < NV; ++v) store(acc_out + p * WIDTH + v * L, acc[p][v]);
}

template <int PTt>
inline void pixel_tile_of(int pixels, const SparseInt8Rows& a, const uint8_t* block, int64_t i0, int64_t i1,
                          const int64_t* poff, int32_t* acc_out) {
  if constexpr (PTt > 0) {
    if (pixels == PTt) return pixel_tile<PTt>(a, block, i0, i1, poff, acc_out);
    pixel_tile_of<PTt - 1>(pixels, a, block, i0, i1, poff, acc_out);
  }
}

void rows(const SparseInt8Rows& a, const uint8_t* blocks, int64_t block, int64_t n_begin, int64_t n_end,
          int32_t* scratch) {
  const uint8_t* x = blocks + block * a.block_elements * WIDTH;
  const int64_t first = block * WIDTH;
  const int64_t count = a.images - first < WIDTH ? a.images - first : WIDTH;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t i0 = a.row_ptr[n], i1 = a.row_ptr[n + 1];
    for (int64_t p = 0; p < a.pixels; p += PT) {
      const int tile = static_cast<int>(a.pixels - p < PT ? a.pixels - p : PT);
      pixel_tile_of<PT>(tile, a, x, i0, i1, a.pixel_offsets + p, scratch + p * WIDTH);
    }
    // The epilogue: each pixel's lanes converted as vectors, then stored image by image.
    const int64_t channel = n * a.out_channel;
    float* lanes = reinterpret_cast<float*>(scratch + a.pixels * WIDTH);
    const int32_t offset = a.out_int ? 0 : a.zero * a.row_sums[n];
    const float multiplier = a.out_int ? 0.0f : a.multipliers[n], bias = a.bias ? a.bias[n] : 0.0f;
    for (int64_t p = 0; p < a.pixels; ++p) {
      const int32_t* acc = scratch + p * WIDTH;
      const int64_t pixel = channel + p * a.out_pixel + first * a.out_image;
      if (a.out_int) {
        for (int64_t b = 0; b < count; ++b) a.out_int[pixel + b * a.out_image] = acc[b];
        continue;
      }
      for (int v = 0; v < NV; ++v) {
        VF y = __builtin_convertvector(load<VI>(acc + v * L) - offset, VF) * multiplier + bias;
        if (a.relu) y = y > 0.0f ? y : VF();
        store(lanes + v * L, y);
      }
      for (int64_t b = 0; b < count; ++b) a.out[pixel + b * a.out_image] = lanes[b];
    }
  }
}

}  // namespace FXR_SPARSE_ISA

extern const SparseInt8Table FXR_SPARSE_TABLE = {FXR_SPARSE_NAME, FXR_SPARSE_ISA::WIDTH, &FXR_SPARSE_ISA::quantize,
                                                 &FXR_SPARSE_ISA::rows};

}  // namespace native
}  // namespace fxreduce
