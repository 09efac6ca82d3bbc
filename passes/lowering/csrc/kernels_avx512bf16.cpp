// Bitmask and N:M kernels for bfloat16 weights AND inputs with AVX512-BF16 dot products
// (vdpbf16ps: 32 bf16 products per instruction, summed in pairs into 16 fp32 lanes), the
// instruction torch's oneDNN bf16 dense uses. x is passed as zero-padded bf16 (Dense::xh).
//
// A 32-column chunk of a row is decoded into a dense 32-lane bf16 vector (zeros where the mask
// bit is clear): the packed values, then vpexpandw (AVX512-VBMI2). Unlike vexpandps (see
// kernels_avx512.cpp), this was the faster decode on AMD Zen 4 too: against a vpermw whose index
// vector is looked up per mask byte, 1.90x vs 1.83x torch's dense at batch 1 and 1.23x vs 1.06x
// at batch 4 (50%, 1 thread, loaded machine), so there is one decode.
//
// Batch 1 dots each decoded chunk with x right away (8 rows share each x load). Batch > 1
// decodes 4 rows once into a per-thread scratch of dense bf16 rows, then multiplies it with
// tiles of 6 batch rows (24 accumulators), so a weight is decoded once whatever the batch.
//
// int4 codes (bitmask, N:M or dense) with bf16 inputs at batch 1 run here too: the codes are
// turned into exact bf16 integers with one vpermw table lookup per chunk (see the int4 section).
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,avx2,fma,bmi,bmi2,popcnt")

namespace fxs::avx512bf16 {
namespace {

constexpr int L = 32;  // bf16 lanes per vector
constexpr int RB = 4;  // rows decoded together (batch > 1)
constexpr int BT = 6;  // batch rows per tile (RB * BT accumulators)
// Rows sharing each x load at batch 1: on a warm 1024x4096 layer (1 thread) 8 gave 1.47x torch's
// dense, 4 gave 1.33-1.41x and 12 1.41x.
constexpr int RB1 = 8;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline __m512 dot(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

// The packed values of a chunk: n of them are used; SAFE reads only those (a masked load,
// which does not fault on the masked lanes), else one whole vector.
template <bool SAFE>
inline __m512i packed(const uint16_t* p, int n) {
  if (SAFE) return _mm512_maskz_loadu_epi16(_bzhi_u32(0xFFFFFFFFu, n), p);
  return _mm512_loadu_si512(p);
}

// The first popcount(m) lanes of v moved to the lanes set in m, the others zero. Kept in a
// register: the memory form (a folded load) is microcoded on AMD.
inline __m512i expand(__m512i v, uint32_t m) {
  __asm__("" : "+v"(v));
  return _mm512_maskz_expand_epi16(m, v);
}

inline uint32_t bits(const uint8_t* row, int64_t c) {
  uint32_t b;
  std::memcpy(&b, row + 4 * c, 4);
  return b;
}

template <int N>
struct Rows {
  const uint8_t* mask[N];
  const uint16_t* values[N];
  Rows(const Bitmask& w, int64_t r, int nr) {
    const uint16_t* v = static_cast<const uint16_t*>(w.values);
    for (int i = 0; i < N; ++i) {
      const int64_t row = r + (i < nr ? i : 0);
      mask[i] = w.mask + row * w.mask_stride;
      values[i] = v + (w.offsets ? w.offsets[row] : row * w.row_stride);
    }
  }
};

// ---- batch 1: NR rows, each chunk decoded and dotted with x at once ----

template <int NR, bool SAFE>
inline void rows_x1(const Dense& d, const Bitmask& w, int64_t r) {
  Rows<NR> rows(w, r, NR);
  __m512 acc[NR];
  for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t chunks = (d.in_features + L - 1) / L;
  for (int64_t c = 0; c < chunks; ++c) {
    const __m512i xv = _mm512_loadu_si512(d.xh + c * L);
    for (int i = 0; i < NR; ++i) {
      const uint32_t m = bits(rows.mask[i], c);
      const int n = __builtin_popcount(m);
      acc[i] = dot(acc[i], expand(packed<SAFE>(rows.values[i], n), m), xv);
      rows.values[i] += n;
    }
  }
  for (int i = 0; i < NR; ++i) d.out[r + i] = _mm512_reduce_add_ps(acc[i]) + (d.bias ? d.bias[r + i] : 0.f);
}

void bitmask_rows_1(const Dense& d, const Bitmask& w, int64_t r0, int64_t r1) {
  const int64_t safe_end = r0 > w.safe_rows ? r0 : min64(r1, w.safe_rows);
  int64_t r = r0;
  for (; r + RB1 <= safe_end; r += RB1) rows_x1<RB1, false>(d, w, r);
  for (; r < safe_end; ++r) rows_x1<1, false>(d, w, r);
  for (; r < r1; ++r) rows_x1<1, true>(d, w, r);
}

// ---- batch > 1: RB rows decoded into scratch, then tiles of up to BT batch rows ----

template <bool SAFE>
inline void decode_rows(const Bitmask& w, int64_t r, int nr, int64_t chunks, uint16_t* scratch) {
  Rows<RB> rows(w, r, nr);
  for (int i = 0; i < nr; ++i) {
    uint16_t* s = scratch + i * chunks * L;
    const uint16_t* p = rows.values[i];
    for (int64_t c = 0; c < chunks; ++c) {
      const uint32_t m = bits(rows.mask[i], c);
      const int n = __builtin_popcount(m);
      _mm512_storeu_si512(s + c * L, expand(packed<SAFE>(p, n), m));
      p += n;
    }
  }
}

template <int NB>
inline void tile(const Dense& d, const uint16_t* scratch, int64_t chunks, int64_t r, int nr, int64_t b0) {
  __m512 acc[RB][NB];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t ld = chunks * L;
  const uint16_t* xb = d.xh + b0 * d.xh_stride;
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i wv[RB];
    for (int i = 0; i < RB; ++i) wv[i] = _mm512_loadu_si512(scratch + i * ld + c * L);
    for (int j = 0; j < NB; ++j) {
      const __m512i xv = _mm512_loadu_si512(xb + j * d.xh_stride + c * L);
      for (int i = 0; i < RB; ++i) acc[i][j] = dot(acc[i][j], wv[i], xv);
    }
  }
  for (int i = 0; i < nr; ++i) {
    const float b = d.bias ? d.bias[r + i] : 0.f;
    for (int j = 0; j < NB; ++j) d.out[(b0 + j) * d.out_features + r + i] = _mm512_reduce_add_ps(acc[i][j]) + b;
  }
}

void bitmask_rows(const Dense& d, const Bitmask& w, int64_t r0, int64_t r1) {
  const int64_t chunks = (d.in_features + L - 1) / L;
  // In a last block of nr < RB rows, scratch rows past nr keep an earlier block's rows (or
  // zeros): their products are computed and never written.
  thread_local std::vector<uint16_t> scratch;
  if (scratch.size() < static_cast<size_t>(RB * chunks * L)) scratch.resize(static_cast<size_t>(RB * chunks * L));
  for (int64_t r = r0; r < r1; r += RB) {
    const int nr = static_cast<int>(min64(RB, r1 - r));
    if (r + nr <= w.safe_rows) decode_rows<false>(w, r, nr, chunks, scratch.data());
    else decode_rows<true>(w, r, nr, chunks, scratch.data());
    for (int64_t b0 = 0; b0 < d.batch; b0 += BT) {
      switch (min64(BT, d.batch - b0)) {
        case 1: tile<1>(d, scratch.data(), chunks, r, nr, b0); break;
        case 2: tile<2>(d, scratch.data(), chunks, r, nr, b0); break;
        case 3: tile<3>(d, scratch.data(), chunks, r, nr, b0); break;
        case 4: tile<4>(d, scratch.data(), chunks, r, nr, b0); break;
        case 5: tile<5>(d, scratch.data(), chunks, r, nr, b0); break;
        default: tile<6>(d, scratch.data(), chunks, r, nr, b0); break;
      }
    }
  }
}

// ---- int4 codes (Quant, kernels.h) with bf16 inputs, batch 1: bitmask, N:M and dense (mask null) ----
//
// A 32-column chunk of a row: its codes (16 bytes, shifted by a nibble where the chunk starts mid-byte:
// vpshrdvq) are zero-extended to one byte per 32-bit lane and or-ed with themselves shifted by 12 bits, so
// word 2j holds byte j (its low nibble in bits 0-3) and word 2j + 1 byte j's high nibble; vpermw then looks
// each word up in a table of the 32 bf16 values (i % 16) - zero (vpermw reads an index's low 5 bits, and
// the table repeats every 16, so bit 4 of word 2j does not matter): the chunk's weights, unscaled, in
// column order, exact in bf16. A masked chunk moves them to its columns (vpexpandw, zeros elsewhere).
// vdpbf16ps multiplies them into x (products exact in fp32) on two chains per scale group; a group's sum
// is multiplied by its scale when it ends, as in quant_body.h. Scale groups must be whole chunks
// (groups == 1 or group_size a multiple of 32): ops.cpp uses these kernels only then.

// The 32 bf16 values (i % 16) - zero.
inline __m512i code_table(int zero) {
  const __m512 v = _mm512_sub_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                 _mm512_set1_ps(static_cast<float>(zero)));
  return (__m512i)_mm512_cvtne2ps_pbh(v, v);
}

// The 32 codes from nibble p of the stream at base (at most n of them are used) as 16 bytes, code k in the
// low (k even) or high nibble of byte k / 2. SAFE reads only the bytes of those n codes (masked loads, which
// do not fault on masked bytes); else bytes p / 2 .. p / 2 + 23, or p / 2 .. p / 2 + 15 when p is EVEN.
template <bool SAFE, bool EVEN>
inline __m128i code_bytes(const uint8_t* base, int64_t p, int n) {
  const uint8_t* b = base + (p >> 1);
  // Every chunk's codes prefetched VALUE_PREFETCH (kernels.h) ahead: N:M and bitmask int4 2.5 / 2.2 ms per layer
  // without, 2.0 with it (Sapphire Rapids). The 8-row bf16 kernel above gained nothing from a prefetch.
  if (!SAFE) _mm_prefetch(reinterpret_cast<const char*>(b) + VALUE_PREFETCH, _MM_HINT_T0);
  if (EVEN) {  // a dense row starting on a byte: every chunk does, and its 16 bytes are its codes
    if (!SAFE) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
    return _mm_maskz_loadu_epi8(static_cast<__mmask16>(_bzhi_u32(0xFFFFu, (n + 1) >> 1)), b);
  }
  __m128i lo, hi;
  if (SAFE) {
    const int bytes = n > 0 ? static_cast<int>(((p + n - 1) >> 1) - (p >> 1) + 1) : 0;
    lo = _mm_maskz_loadu_epi8(static_cast<__mmask16>(_bzhi_u32(0xFFFFu, bytes < 16 ? bytes : 16)), b);
    const int rest = bytes > 8 ? bytes - 8 : 0;
    hi = _mm_maskz_loadu_epi8(static_cast<__mmask16>(_bzhi_u32(0xFFFFu, rest)), b + 8);
  } else {
    lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
    hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 8));
  }
  // (hi:lo) >> 4 in each 64-bit lane when p is odd: the window starts at the chunk's first nibble.
  return _mm_shrdv_epi64(lo, hi, _mm_set1_epi64x(4 * (p & 1)));
}

inline __m512i decode_codes(__m128i bytes, __m512i table) {
  __m512i d = _mm512_cvtepu8_epi32(bytes);
  d = _mm512_or_si512(d, _mm512_slli_epi32(d, 12));
  return _mm512_permutexvar_epi16(d, table);
}

template <bool MASKED, bool SAFE, bool EVEN>
inline void int4_row(const Dense& d, const Bitmask& w, const Quant& q, int64_t r, __m512i table) {
  const int64_t chunks = (d.in_features + L - 1) / L;
  const int64_t group_chunks = q.groups == 1 ? chunks : q.group_size / L;
  const uint8_t* base = static_cast<const uint8_t*>(w.values);
  const uint8_t* mrow = MASKED ? w.mask + r * w.mask_stride : nullptr;
  int64_t p = w.offsets ? w.offsets[r] : r * w.row_stride;
  auto step = [&](int64_t c, __m512 part) {
    int n = static_cast<int>(min64(L, d.in_features - c * L));  // dense: lanes past in_features meet x's zeros
    uint32_t m = 0;
    if (MASKED) {
      m = bits(mrow, c);
      n = __builtin_popcount(m);
    }
    __m512i v = decode_codes(code_bytes<SAFE, EVEN>(base, p, n), table);
    if (MASKED) v = expand(v, m);
    p += n;
    return dot(part, v, _mm512_loadu_si512(d.xh + c * L));
  };
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0, c = 0; g < q.groups; ++g) {
    if (q.zeros) table = code_table(q.zeros[r * q.groups + g]);
    const int64_t end = min64(chunks, c + group_chunks);
    __m512 part0 = _mm512_setzero_ps(), part1 = _mm512_setzero_ps();
    for (; c + 2 <= end; c += 2) {
      part0 = step(c, part0);
      part1 = step(c + 1, part1);
    }
    if (c < end) part0 = step(c++, part0);
    acc = _mm512_fmadd_ps(_mm512_add_ps(part0, part1), _mm512_set1_ps(q.scales[r * q.groups + g]), acc);
  }
  d.out[r] = _mm512_reduce_add_ps(acc) + (d.bias ? d.bias[r] : 0.f);
}

template <bool MASKED>
inline void int4_rows(const Dense& d, const Bitmask& w, const Quant& q, int64_t r0, int64_t r1, __m512i table) {
  for (int64_t r = r0; r < r1; ++r) {
    // Whole loads while the last chunk's 24 bytes (48 codes from its first code, at most in_features codes
    // after the row's first) stay inside the stream; masked loads near its end.
    const int64_t p = w.offsets ? w.offsets[r] : r * w.row_stride;
    const bool safe = p + d.in_features + 48 <= q.total;
    if (!MASKED && (p & 1) == 0) {
      if (safe) int4_row<false, false, true>(d, w, q, r, table);
      else int4_row<false, true, true>(d, w, q, r, table);
    } else if (safe) {
      int4_row<MASKED, false, false>(d, w, q, r, table);
    } else {
      int4_row<MASKED, true, false>(d, w, q, r, table);
    }
  }
}

// One row at a time: sharing x's loads across 2 or 4 rows measured slower on Zen 4 (register pressure).
void quant_int4_rows_1(const Dense& d, const Bitmask& w, const Quant& q, int64_t r0, int64_t r1) {
  const __m512i table = code_table(q.zero);
  if (w.mask) int4_rows<true>(d, w, q, r0, r1, table);
  else int4_rows<false>(d, w, q, r0, r1, table);
}

}  // namespace

const Bf16Kernels kernels{bitmask_rows_1, bitmask_rows, quant_int4_rows_1};

}  // namespace fxs::avx512bf16

#pragma GCC pop_options
#endif
