// AVX-512 (F, BW, VL, DQ) kernels: 16 floats per vector. Two builds of the same body:
// fxs::avx512 decodes the bitmask with vexpandps (one instruction, fast on Intel);
// fxs::avx512_lut with a permutation looked up per mask byte (faster on AMD Zen 4,
// which runs vexpandps at a fraction of Intel's rate).
#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

namespace fxs::avx512_lut {

// For each 8-bit mask, the rank of every set lane among the set lanes (0 for unset lanes,
// which the write mask zeroes anyway).
struct ExpandTable {
  alignas(32) int32_t idx[256][8];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane) idx[m][lane] = (m >> lane) & 1 ? next++ : 0;
    }
  }
};
static const ExpandTable expand_table;

}  // namespace fxs::avx512_lut

namespace fxs::avx512 {

// For V::nib: the 32-bit word (of bytes k/2..+3, +4..+7, +4..+7, +8..+11) and the shift of each of the 16
// nibbles k..k+15, for even and odd k. Even: nibbles 0-7 in word 0, 8-15 in word 1. Odd (the window
// starts at bit 4): nibbles 1-7 of the bytes in word 0, 8-15 in word 1, 16 (byte 8's low nibble) in word 3.
struct NibbleTable {
  alignas(64) int32_t idx[2][16];
  alignas(64) int32_t shift[2][16];
  NibbleTable() {
    for (int i = 0; i < 16; ++i) {
      idx[0][i] = i / 8;
      shift[0][i] = 4 * (i % 8);
      const int j = i + 1;  // nibble j of the bytes from k / 2
      idx[1][i] = j < 8 ? 0 : (j < 16 ? 1 : 3);
      shift[1][i] = j < 16 ? 4 * (j % 8) : 0;
    }
  }
};
static const NibbleTable nibble_table;

}  // namespace fxs::avx512

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
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(R a) { return _mm512_reduce_add_ps(a); }
  static R vals(const float* p) { return _mm512_loadu_ps(p); }
  static R vals(const bf16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static R vals(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  // 16 int8 codes: sign-extended to int32, then converted (exact).
  static R vals(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // The 16 unsigned int4 codes k..k+15 of a nibble stream (low nibble first), all in vector registers:
  // bytes k/2.. k/2+7 and k/2+4.. k/2+11 as four 32-bit words, each lane given the word holding its
  // nibble (vpermd) and shifted to it (vpsrlvd), by the index and shift rows of k's parity (NibbleTable).
  // Reads 12 bytes from byte k / 2. Replaces a decode that built the 64 bits in a general register
  // (branching on k's parity) and broadcast its halves: on Zen 4, streaming 11008x4096 layers at batch 1,
  // dense-int4 1.15x, nm-int4 1.07x, bitmask-int4 1.9x (whose rows start at either parity).
  static R nib(const uint8_t* base, int64_t k) {
    const uint8_t* p = base + (k >> 1);
    const __m128i words = _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)),
                                             _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 4)));
    const int odd = static_cast<int>(k & 1);
    const __m512i idx = _mm512_load_si512(nibble_table.idx[odd]);
    const __m512i shifts = _mm512_load_si512(nibble_table.shift[odd]);
    const __m512i lanes = _mm512_permutexvar_epi32(idx, _mm512_castsi128_si512(words));
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(lanes, shifts), _mm512_set1_epi32(15)));
  }
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
#include "quant_body.h"

const KernelTable table{"avx512", bitmask_rows, bitmask_rows, csr_rows, nullptr, quant_bitmask_rows, quant_csr_rows};

}  // namespace fxs::avx512

namespace fxs::avx512_lut {

// The avx512 vector operations but the bitmask decode.
struct V : avx512::V {
  static R expand(R v, uint32_t m) {
    const __m256i lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(expand_table.idx[m & 255]));
    const __m256i hi = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(expand_table.idx[m >> 8])),
                                        _mm256_set1_epi32(__builtin_popcount(m & 255)));
    const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    return _mm512_maskz_permutexvar_ps(static_cast<__mmask16>(m), idx, v);
  }
};

#include "kernel_body.h"
#include "quant_body.h"

// Batch > 1 decodes once per batch tile of 8, where vexpandps is the cheaper decode again.
const KernelTable table{"avx512-lut", bitmask_rows, avx512::bitmask_rows, csr_rows, nullptr, quant_bitmask_rows,
                        quant_csr_rows};

}  // namespace fxs::avx512_lut

#pragma GCC pop_options
#endif
