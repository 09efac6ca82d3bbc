// AVX-512 (F, BW, VL, DQ) kernels: 16 floats per vector, bitmask decoded by vexpandps.
#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")

namespace fxs::avx512 {

struct V {
  static constexpr int L = 16;
  using R = __m512;
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R a) { _mm512_storeu_ps(p, a); }
  static R bcast(float v) { return _mm512_set1_ps(v); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(R a) { return _mm512_reduce_add_ps(a); }
  static R vals(const float* p) { return _mm512_loadu_ps(p); }
  static R vals(const bf16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static R vals(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  // The empty asm keeps v in a register: folded into vexpandps' memory form the load is
  // microcoded on AMD Zen 4 (about 4x slower for the whole kernel).
  static R expand(R v, uint32_t m) {
    __asm__("" : "+v"(v));
    return _mm512_maskz_expand_ps(static_cast<__mmask16>(m), v);
  }
  static uint32_t bits(const uint8_t* row, int64_t c) {
    uint16_t b;
    std::memcpy(&b, row + 2 * c, 2);
    return b;
  }
  static R gather(const float* x, const int32_t* idx) {
    return _mm512_i32gather_ps(_mm512_loadu_si512(idx), x, 4);
  }
  static R gather(const float* x, const uint16_t* idx) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx));
    return _mm512_i32gather_ps(_mm512_cvtepu16_epi32(h), x, 4);
  }
};

#include "kernel_body.h"

const KernelTable table{"avx512", bitmask_rows, bitmask_rows, csr_rows};

}  // namespace fxs::avx512

#pragma GCC pop_options
#endif
