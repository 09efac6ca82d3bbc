// The row kernels, written once over a vector type V and included by each ISA file
// (kernels_avx512.cpp, kernels_avx2.cpp, kernels_generic.cpp) inside its own namespace and
// target region. No #include here: everything it uses was included before the target
// pragma, so no header function is compiled for a wider ISA than the machine may have.
//
// V provides: L (floats per vector), R (the vector type), zero, load, store, bcast, add,
// fma, hsum, vals(const T*) (L packed values widened to fp32), expand(v, m) (the first
// popcount(m) lanes of v moved to the lanes set in m, the others zero), bits(row, c) (the
// L mask bits of column chunk c) and gather(x, idx) (x[idx[0..L)]).

using R = typename V::R;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline float to_f32(float v) { return v; }
inline float to_f32(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f32(f16_t v) { return c10::detail::fp16_ieee_to_fp32_value(v.bits); }

// The last n (< L + 1) values of a buffer, read without touching memory past them.
template <class T>
inline R vals_tail(const T* p, int64_t n) {
  T tmp[V::L] = {};
  std::memcpy(tmp, p, n * sizeof(T));
  return V::vals(tmp);
}

// f(std::integral_constant<int, 0>{}), ..., f(std::integral_constant<int, N - 1>{}), in that order: a loop
// over accumulator chains whose index is a compile-time constant, so the chains stay in registers. Defined
// here, inside each ISA's target region, so that f inlines into it.
template <class F, int... A>
inline void unrolled_impl(const F& f, std::integer_sequence<int, A...>) {
  (f(std::integral_constant<int, A>{}), ...);
}
template <int N, class F>
inline void unrolled(const F& f) {
  unrolled_impl(f, std::make_integer_sequence<int, N>{});
}

// step(chain) for the chunks c .. end - 1 in order, chunk k of them (counted from c) into chain k % NA; step reads
// and advances c. Every body that splits a row over chains goes through here, so that they sum in the same order
// (tail rows agree bit for bit with whole-vector rows).
template <int NA, class F>
inline void on_chains(int64_t& c, int64_t end, const F& step) {
  while (c + NA <= end) unrolled<NA>(step);
  unrolled<NA>([&](auto a) {
    if (c < end) step(a);
  });
}

// The NA partial sums of a group's chains, added pairwise: ((c0 + c1) + (c2 + c3)) for NA = 4.
template <int NA>
inline R chain_sum(const R* part) {
  if constexpr (NA == 1) return part[0];
  else if constexpr (NA == 2) return V::add(part[0], part[1]);
  else return V::add(V::add(part[0], part[1]), V::add(part[2], part[3]));
}

// Value streams are prefetched VALUE_PREFETCH bytes (kernels.h) ahead of the whole loads (quant_body.h's codes
// too). Chain a of NA prefetches when a % prefetch_every<bytes a whole chunk holds> == 0: about one prefetch per
// 64-byte line, not one per chunk (on AVX2 bf16, decode-bound, one per 16-byte chunk cost 7%).
template <int64_t BYTES>
constexpr int prefetch_every = BYTES >= 64 ? 1 : static_cast<int>(64 / BYTES);

// ---- bitmask and N:M: RB rows x BT batch columns, each weight vector decoded once ----

// NA: accumulator chains per row and batch column, chunk c into chain c % NA (batch 1: one row at a time on
// 4 chains, streaming one row's mask and values at a time; see quant_block).
template <class T, int RB, int BT, bool SAFE, int NA = 1>
inline void bitmask_block(const Dense& d, const Bitmask& w, int64_t r, int64_t b0) {
  const T* values = static_cast<const T*>(w.values);
  const int64_t chunks = (d.in_features + V::L - 1) / V::L;
  const uint8_t* mrow[RB];
  const T* p[RB];
  R acc[RB][BT][NA];
  for (int i = 0; i < RB; ++i) {
    mrow[i] = w.mask + (r + i) * w.mask_stride;
    p[i] = values + (w.offsets ? w.offsets[r + i] : (r + i) * w.row_stride);
    for (int j = 0; j < BT; ++j)
      for (int a = 0; a < NA; ++a) acc[i][j][a] = V::zero();
  }
  const float* xb = d.x + b0 * d.x_stride;
  int64_t c = 0;
  auto step = [&](auto chain) {  // chunk c into chain `chain`, then the next chunk
    constexpr int a = decltype(chain)::value;
    R xv[BT];
    for (int j = 0; j < BT; ++j) xv[j] = V::load(xb + j * d.x_stride + c * V::L);
    for (int i = 0; i < RB; ++i) {
      const uint32_t m = V::bits(mrow[i], c);
      const int n = __builtin_popcount(m);
      if constexpr (!SAFE && a % prefetch_every<V::L * sizeof(T)> == 0)
        __builtin_prefetch(reinterpret_cast<const char*>(p[i]) + VALUE_PREFETCH);
      const R v = V::expand(SAFE ? vals_tail(p[i], n) : V::vals(p[i]), m);
      p[i] += n;
      for (int j = 0; j < BT; ++j) acc[i][j][a] = V::fma(v, xv[j], acc[i][j][a]);
    }
    ++c;
  };
  on_chains<NA>(c, chunks, step);
  for (int i = 0; i < RB; ++i) {
    const float b = d.bias ? d.bias[r + i] : 0.f;
    for (int j = 0; j < BT; ++j) d.out[(b0 + j) * d.out_features + r + i] = V::hsum(chain_sum<NA>(acc[i][j])) + b;
  }
}

template <class T, int RB, bool SAFE>
inline void bitmask_tile(const Dense& d, const Bitmask& w, int64_t r, int64_t b0, int64_t nb) {
  switch (nb) {
    case 1: return bitmask_block<T, RB, 1, SAFE>(d, w, r, b0);
    case 2: return bitmask_block<T, RB, 2, SAFE>(d, w, r, b0);
    case 3: return bitmask_block<T, RB, 3, SAFE>(d, w, r, b0);
    case 4: return bitmask_block<T, RB, 4, SAFE>(d, w, r, b0);
    case 5: return bitmask_block<T, RB, 5, SAFE>(d, w, r, b0);
    case 6: return bitmask_block<T, RB, 6, SAFE>(d, w, r, b0);
    case 7: return bitmask_block<T, RB, 7, SAFE>(d, w, r, b0);
    default: return bitmask_block<T, RB, 8, SAFE>(d, w, r, b0);
  }
}

template <class T>
void bitmask_rows_t(const Dense& d, const Bitmask& w, int64_t r0, int64_t r1) {
  const int64_t safe_end = r0 > w.safe_rows ? r0 : min64(r1, w.safe_rows);
  int64_t r = r0;
  if (d.batch == 1) {  // one row at a time on 4 chains
    for (; r < safe_end; ++r) bitmask_block<T, 1, 1, false, 4>(d, w, r, 0);
    for (; r < r1; ++r) bitmask_block<T, 1, 1, true, 4>(d, w, r, 0);
    return;
  }
  for (; r + 2 <= safe_end; r += 2)
    for (int64_t b0 = 0; b0 < d.batch; b0 += 8) bitmask_tile<T, 2, false>(d, w, r, b0, min64(8, d.batch - b0));
  for (; r < r1; ++r) {
    for (int64_t b0 = 0; b0 < d.batch; b0 += 8) {
      if (r < safe_end) bitmask_tile<T, 1, false>(d, w, r, b0, min64(8, d.batch - b0));
      else bitmask_tile<T, 1, true>(d, w, r, b0, min64(8, d.batch - b0));
    }
  }
}

void bitmask_rows(const Dense& d, const Bitmask& w, int64_t r0, int64_t r1) {
  switch (w.vtype) {
    case ValueType::f32: return bitmask_rows_t<float>(d, w, r0, r1);
    case ValueType::bf16: return bitmask_rows_t<bf16_t>(d, w, r0, r1);
    case ValueType::f16: return bitmask_rows_t<f16_t>(d, w, r0, r1);
  }
}

// ---- CSR: batch 1 gathers x; batch > 1 broadcasts each weight over a row of xt ----

template <class T, class I>
inline void csr_row1(const Dense& d, const Csr& w, int64_t r) {
  const T* values = static_cast<const T*>(w.values);
  const I* col = static_cast<const I*>(w.col);
  int64_t k = w.crow[r];
  const int64_t end = w.crow[r + 1];
  R acc0 = V::zero(), acc1 = V::zero();
  for (; k + 2 * V::L <= end; k += 2 * V::L) {
    acc0 = V::fma(V::vals(values + k), V::gather(d.x, col + k), acc0);
    acc1 = V::fma(V::vals(values + k + V::L), V::gather(d.x, col + k + V::L), acc1);
  }
  for (; k + V::L <= end; k += V::L) acc0 = V::fma(V::vals(values + k), V::gather(d.x, col + k), acc0);
  if (k < end) {
    I idx[V::L] = {};
    std::memcpy(idx, col + k, (end - k) * sizeof(I));
    acc1 = V::fma(vals_tail(values + k, end - k), V::gather(d.x, idx), acc1);
  }
  d.out[r] = V::hsum(V::add(acc0, acc1)) + (d.bias ? d.bias[r] : 0.f);
}

// NV vectors of batch columns; U independent accumulator sets so that short rows of
// FMAs do not wait on each other's latency.
template <class T, class I, int NV>
inline void csr_row_batch(const Dense& d, const Csr& w, int64_t r, int64_t b0, int64_t nb) {
  constexpr int U = NV == 1 ? 4 : (NV == 2 ? 2 : 1);
  const T* values = static_cast<const T*>(w.values);
  const I* col = static_cast<const I*>(w.col);
  const float* xt = d.xt + b0;
  R acc[U][NV];
  for (int u = 0; u < U; ++u)
    for (int q = 0; q < NV; ++q) acc[u][q] = V::zero();
  int64_t k = w.crow[r];
  const int64_t end = w.crow[r + 1];
  for (; k + U <= end; k += U) {
    for (int u = 0; u < U; ++u) {
      const R wv = V::bcast(to_f32(values[k + u]));
      const float* xr = xt + static_cast<int64_t>(col[k + u]) * d.xt_stride;
      for (int q = 0; q < NV; ++q) acc[u][q] = V::fma(wv, V::load(xr + q * V::L), acc[u][q]);
    }
  }
  for (; k < end; ++k) {
    const R wv = V::bcast(to_f32(values[k]));
    const float* xr = xt + static_cast<int64_t>(col[k]) * d.xt_stride;
    for (int q = 0; q < NV; ++q) acc[0][q] = V::fma(wv, V::load(xr + q * V::L), acc[0][q]);
  }
  float sums[NV * V::L];
  for (int q = 0; q < NV; ++q) {
    for (int u = 1; u < U; ++u) acc[0][q] = V::add(acc[0][q], acc[u][q]);
    V::store(sums + q * V::L, acc[0][q]);
  }
  const float b = d.bias ? d.bias[r] : 0.f;
  for (int64_t j = 0; j < nb; ++j) d.out[(b0 + j) * d.out_features + r] = sums[j] + b;
}

template <class T, class I>
void csr_rows_t(const Dense& d, const Csr& w, int64_t r0, int64_t r1) {
  if (d.batch == 1) {
    for (int64_t r = r0; r < r1; ++r) csr_row1<T, I>(d, w, r);
    return;
  }
  constexpr int64_t tile = 4 * V::L;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b0 = 0; b0 < d.batch; b0 += tile) {
      const int64_t nb = min64(tile, d.batch - b0);
      switch ((nb + V::L - 1) / V::L) {
        case 1: csr_row_batch<T, I, 1>(d, w, r, b0, nb); break;
        case 2: csr_row_batch<T, I, 2>(d, w, r, b0, nb); break;
        case 3: csr_row_batch<T, I, 3>(d, w, r, b0, nb); break;
        default: csr_row_batch<T, I, 4>(d, w, r, b0, nb); break;
      }
    }
  }
}

template <class T>
void csr_rows_v(const Dense& d, const Csr& w, int64_t r0, int64_t r1) {
  if (w.col16) csr_rows_t<T, uint16_t>(d, w, r0, r1);
  else csr_rows_t<T, int32_t>(d, w, r0, r1);
}

void csr_rows(const Dense& d, const Csr& w, int64_t r0, int64_t r1) {
  switch (w.vtype) {
    case ValueType::f32: return csr_rows_v<float>(d, w, r0, r1);
    case ValueType::bf16: return csr_rows_v<bf16_t>(d, w, r0, r1);
    case ValueType::f16: return csr_rows_v<f16_t>(d, w, r0, r1);
  }
}
