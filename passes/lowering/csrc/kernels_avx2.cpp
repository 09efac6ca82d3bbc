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

// Byte shuffles (vpshufb, within each 128-bit half of a source holding the packed values twice)
// that expand AND widen in one instruction: per 8-bit mask m, lane k (bit k set, rank s among
// the set bits) receives the bytes of packed value s at its top, the other bytes and the lanes
// of clear bits zero (index 0x80). bf16: bytes 2s, 2s + 1 -> lane bytes 2, 3 (the fp32 of that
// bf16). int8: byte s -> lane byte 3 (code * 2^24 as int32).
struct ShuffleTables {
  alignas(32) uint8_t bf16[256][32];
  alignas(32) uint8_t int8[256][32];
  ShuffleTables() {
    std::memset(this, 0x80, sizeof(*this));
    for (int m = 0; m < 256; ++m) {
      for (int lane = 0, s = 0; lane < 8; ++lane) {
        if (!((m >> lane) & 1)) continue;
        bf16[m][4 * lane + 2] = static_cast<uint8_t>(2 * s);
        bf16[m][4 * lane + 3] = static_cast<uint8_t>(2 * s + 1);
        int8[m][4 * lane + 3] = static_cast<uint8_t>(s);
        ++s;
      }
    }
  }
};
static const ShuffleTables shuffle_tables;

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

// ---- bf16 and int8 values under a mask: expanded by byte shuffles ----
//
// The generic bodies widen the packed values, then expand them (vpermps + vblendvps); for 16- and
// 8-bit values one shuffle through ShuffleTables does both (on a Zen 3, bf16 bitmask 50% went
// from 59% to 76% of the memory limit, int8 from 39% to 49%; int4 gained nothing measurable and
// stays on the generic body). Each decode reads 16 bytes (bf16) or 8 bytes (int8) from the row's
// position p, within one vector of the row's end: rows below Bitmask::safe_rows only; later rows
// take the generic bodies.
// A decoded lane is the value times `unit` (a power of two: exact), divided out of each group's
// partial sum before its scale, so the sums are bit for bit those of quant_block.

inline __m256i table_row(const void* t) { return _mm256_load_si256(static_cast<const __m256i*>(t)); }

struct Bf16Shuffle {
  static constexpr float unit = 1.f;
  static R decode(const void* base, int64_t p, uint32_t m) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + p));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(v), table_row(shuffle_tables.bf16[m])));
  }
};

struct Int8Shuffle {
  static constexpr float unit = 1.f / (1 << 24);
  static R decode(const void* base, int64_t p, uint32_t m) {
    int64_t v;
    std::memcpy(&v, static_cast<const int8_t*>(base) + p, 8);
    return _mm256_cvtepi32_ps(_mm256_shuffle_epi8(_mm256_set1_epi64x(v), table_row(shuffle_tables.int8[m])));
  }
};

// One row x BT batch columns on NA chains, as bitmask_block / quant_block (the same summation order);
// QUANT: per-group partial sums times the group's scale (q unused otherwise).
template <class D, bool QUANT, int BT, int NA = 1>
inline void shuffle_block(const Dense& d, const Bitmask& w, const Quant& q, int64_t r, int64_t b0) {
  const int64_t chunks = (d.in_features + V::L - 1) / V::L;
  const int64_t groups = QUANT ? q.groups : 1;
  const int64_t group_chunks = groups == 1 ? chunks : q.group_size / V::L;
  const uint8_t* mrow = w.mask + r * w.mask_stride;
  int64_t p = w.offsets ? w.offsets[r] : r * w.row_stride;
  R acc[BT], part[BT][NA];
  for (int j = 0; j < BT; ++j) {
    acc[j] = V::zero();
    for (int a = 0; a < NA; ++a) part[j][a] = V::zero();
  }
  const float* xb = d.x + b0 * d.x_stride;
  for (int64_t g = 0, c = 0; g < groups; ++g) {
    const int64_t group_end = min64(chunks, c + group_chunks);
    auto step = [&](auto chain) {  // chunk c into chain `chain`, then the next chunk
      constexpr int a = decltype(chain)::value;
      R xv[BT];
      for (int j = 0; j < BT; ++j) xv[j] = V::load(xb + j * d.x_stride + c * V::L);
      const uint32_t m = mrow[c];
      const R v = D::decode(w.values, p, m);
      p += __builtin_popcount(m);
      for (int j = 0; j < BT; ++j) part[j][a] = V::fma(v, xv[j], part[j][a]);
      ++c;
    };
    on_chains<NA>(c, group_end, step);
    if (QUANT) {
      const R unit = V::bcast(D::unit);
      const R s = V::bcast(q.scales[r * groups + g]);
      for (int j = 0; j < BT; ++j) {
        acc[j] = V::fma(_mm256_mul_ps(chain_sum<NA>(part[j]), unit), s, acc[j]);
        for (int a = 0; a < NA; ++a) part[j][a] = V::zero();
      }
    }
  }
  const float b = d.bias ? d.bias[r] : 0.f;
  for (int j = 0; j < BT; ++j) d.out[(b0 + j) * d.out_features + r] = V::hsum(QUANT ? acc[j] : chain_sum<NA>(part[j])) + b;
}

template <class D, bool QUANT>
inline void shuffle_tile(const Dense& d, const Bitmask& w, const Quant& q, int64_t r, int64_t b0, int64_t nb) {
  switch (nb) {
    case 1: return shuffle_block<D, QUANT, 1>(d, w, q, r, b0);
    case 2: return shuffle_block<D, QUANT, 2>(d, w, q, r, b0);
    case 3: return shuffle_block<D, QUANT, 3>(d, w, q, r, b0);
    case 4: return shuffle_block<D, QUANT, 4>(d, w, q, r, b0);
    case 5: return shuffle_block<D, QUANT, 5>(d, w, q, r, b0);
    default: return shuffle_block<D, QUANT, 6>(d, w, q, r, b0);
  }
}

// Rows [r0, end of the safe rows) by the shuffle kernels; returns where they stopped.
template <class D, bool QUANT>
int64_t shuffle_rows(const Dense& d, const Bitmask& w, const Quant& q, int64_t r0, int64_t r1) {
  const int64_t safe_end = r0 > w.safe_rows ? r0 : min64(r1, w.safe_rows);
  int64_t r = r0;
  if (d.batch == 1) {  // one row at a time on 4 chains, as bitmask_block and quant_block
    for (; r < safe_end; ++r) shuffle_block<D, QUANT, 1, 4>(d, w, q, r, 0);
    return r;
  }
  for (; r < safe_end; ++r)
    for (int64_t b0 = 0; b0 < d.batch; b0 += 6) shuffle_tile<D, QUANT>(d, w, q, r, b0, min64(6, d.batch - b0));
  return r;
}

void avx2_bitmask_rows(const Dense& d, const Bitmask& w, int64_t r0, int64_t r1) {
  if (w.vtype == ValueType::bf16) r0 = shuffle_rows<Bf16Shuffle, false>(d, w, Quant{}, r0, r1);
  if (r0 < r1) bitmask_rows(d, w, r0, r1);
}

void avx2_quant_bitmask_rows(const Dense& d, const Bitmask& w, const Quant& q, int64_t r0, int64_t r1) {
  if (w.mask && q.type == QuantType::int8) r0 = shuffle_rows<Int8Shuffle, true>(d, w, q, r0, r1);
  if (r0 < r1) quant_bitmask_rows(d, w, q, r0, r1);
}

const KernelTable table{"avx2", avx2_bitmask_rows, avx2_bitmask_rows, csr_rows, nullptr, avx2_quant_bitmask_rows,
                        quant_csr_rows};

}  // namespace fxs::avx2

#pragma GCC pop_options
#endif
