// AVX2 + FMA + F16C kernels: 8 floats per vector; AVX2 has no expand, so a 256-entry table
// gives, per 8-bit mask, the permutation that spreads the packed values (sign bit set on
// the lanes to zero, which blendv reads).
#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

namespace fxs::avx2 {

struct ExpandTable {
  alignas(32) int32_t idx[256][8];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane)
        idx[m][lane] = (m >> lane) & 1 ? next++ : static_cast<int32_t>(0x80000000u);
    }
  }
};
static const ExpandTable expand_table;

}  // namespace fxs::avx2

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")

namespace fxs::avx2 {

struct V {
  static constexpr int L = 8;
  using R = __m256;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R a) { _mm256_storeu_ps(p, a); }
  static R bcast(float v) { return _mm256_set1_ps(v); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(R a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
  }
  static R vals(const float* p) { return _mm256_loadu_ps(p); }
  static R vals(const bf16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static R vals(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // 8 int8 codes: sign-extended to int32, then converted (exact).
  static R vals(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // The 8 unsigned int4 codes k..k+7 of a nibble stream (low nibble first): one 32-bit word
  // broadcast and shifted right by 0, 4, ..., 28 per lane. Reads the 8 bytes from byte k / 2.
  static R nib(const uint8_t* base, int64_t k) {
    uint64_t w;
    std::memcpy(&w, base + (k >> 1), 8);
    const __m256i word = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(w >> ((k & 1) * 4))));
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(word, shifts), _mm256_set1_epi32(15)));
  }
  static R expand(R v, uint32_t m) {
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(expand_table.idx[m]));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(v, idx), _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
  }
  static uint32_t bits(const uint8_t* row, int64_t c) { return row[c]; }
  static R gather(const float* x, const int32_t* idx) {
    return _mm256_i32gather_ps(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), 4);
  }
  static R gather(const float* x, const uint16_t* idx) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx));
    return _mm256_i32gather_ps(x, _mm256_cvtepu16_epi32(h), 4);
  }
};

#include "kernel_body.h"
#include "quant_body.h"

const KernelTable table{"avx2", bitmask_rows, bitmask_rows, csr_rows, nullptr, quant_bitmask_rows, quant_csr_rows};

}  // namespace fxs::avx2

#pragma GCC pop_options
#endif
