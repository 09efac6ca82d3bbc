// The quantized row kernels (int8 and int4 codes, see Quant in kernels.h), written once over the
// vector type V and included by each ISA file after kernel_body.h (whose helpers they use), in
// its namespace and target region. No #include here, as for kernel_body.h.
//
// Beyond kernel_body.h's, V provides sub, vals(const int8_t*) (L int8 codes widened to fp32)
// and nib(base, k) (the L unsigned int4 codes k.. of a nibble stream, widened to fp32).
//
// The decode is fused with the sparse decode: a chunk of L codes is widened, its zero point
// subtracted (exact in fp32), expanded to its columns by the mask and multiplied into x; no
// dense weight is ever built. Each group of columns accumulates its own partial sums in fp32,
// multiplied by the group's scale when the group ends (int8: one group, the whole row, so the
// row's scale is applied once, in the epilogue). Up to summation order this is exactly
// sum_j scale_g(j) * (u_j - zero) * x_j.

// Code streams: load (L codes from code k, may read up to 18 codes past k + L, see
// Quant::total), tail (n < L + 1 codes, the lanes past n set to the code `fill`, reading
// nothing past the n codes) and one (code k as a float).
// Code streams are prefetched VALUE_PREFETCH bytes (kernels.h) ahead of the whole loads, about once per line
// (addr: the byte holding code k; chunk_bytes: the bytes of a whole chunk's codes). On Intel Sapphire Rapids
// (2 threads, 6 11008x4096 2:4 layers streaming, bf16 x, batch 1) it took bitmask int8 from 3.13 to 1.89 ms
// per layer and N:M int8 from 3.79 to 1.88 ms.

struct Int8Codes {
  static constexpr bool has_zero = false;
  static constexpr int64_t chunk_bytes = V::L;
  static const uint8_t* addr(const void* b, int64_t k) { return static_cast<const uint8_t*>(b) + k; }
  static R load(const void* b, int64_t k) { return V::vals(static_cast<const int8_t*>(b) + k); }
  static R tail(const void* b, int64_t k, int64_t n, int) { return vals_tail(static_cast<const int8_t*>(b) + k, n); }
  static float one(const void* b, int64_t k) { return static_cast<const int8_t*>(b)[k]; }
};

inline uint32_t nibble(const uint8_t* p, int64_t k) { return (p[k >> 1] >> ((k & 1) * 4)) & 15u; }

struct Int4Codes {
  static constexpr bool has_zero = true;
  static constexpr int64_t chunk_bytes = (V::L + 1) / 2;
  static const uint8_t* addr(const void* b, int64_t k) { return static_cast<const uint8_t*>(b) + (k >> 1); }
  static R load(const void* b, int64_t k) { return V::nib(static_cast<const uint8_t*>(b), k); }
  static R tail(const void* b, int64_t k, int64_t n, int fill) {
    const uint8_t* p = static_cast<const uint8_t*>(b);
    uint8_t tmp[16] = {};  // V::nib reads at most 9 bytes from byte 0
    for (int64_t i = 0; i < V::L; ++i) {
      const uint32_t u = i < n ? nibble(p, k + i) : static_cast<uint32_t>(fill);
      tmp[i >> 1] |= static_cast<uint8_t>(u << ((i & 1) * 4));
    }
    return V::nib(tmp, 0);
  }
  static float one(const void* b, int64_t k) { return static_cast<float>(nibble(static_cast<const uint8_t*>(b), k)); }
};

inline int zero_of(const Quant& q, int64_t r, int64_t g) { return q.zeros ? q.zeros[r * q.groups + g] : q.zero; }

// ---- bitmask, N:M (mask set) and dense (mask null): one row x BT batch columns ----

// NA: accumulator chains per batch column; chunk k of a group (k counted from the group's first chunk) adds
// into chain k % NA. Batch 1 runs on 4 chains (each call streams one row's mask and codes: on a Zen 3,
// reading from memory, 1.4x the throughput of 4 rows on one chain each, which stream 8 arrays at once),
// batch > 1 one chain per batch column.
template <class C, bool MASKED, int BT, bool SAFE, int NA = 1>
inline void quant_block(const Dense& d, const Bitmask& w, const Quant& q, int64_t r, int64_t b0) {
  static_assert(NA == 1 || NA == 2 || NA == 4, "1, 2 or 4 chains");
  const int64_t chunks = (d.in_features + V::L - 1) / V::L;
  const int64_t group_chunks = q.groups == 1 ? chunks : q.group_size / V::L;
  const uint8_t* mrow = MASKED ? w.mask + r * w.mask_stride : nullptr;
  int64_t p = w.offsets ? w.offsets[r] : r * w.row_stride;
  R acc[BT], part[BT][NA];
  for (int j = 0; j < BT; ++j) {
    acc[j] = V::zero();
    for (int a = 0; a < NA; ++a) part[j][a] = V::zero();
  }
  const float* xb = d.x + b0 * d.x_stride;
  for (int64_t g = 0, c = 0; g < q.groups; ++g) {
    const int64_t group_end = min64(chunks, c + group_chunks);
    const int zero = zero_of(q, r, g);
    const R zv = V::bcast(static_cast<float>(zero));
    auto step = [&](auto chain) {  // chunk c into chain `chain`, then the next chunk
      constexpr int a = decltype(chain)::value;
      R xv[BT];
      for (int j = 0; j < BT; ++j) xv[j] = V::load(xb + j * d.x_stride + c * V::L);
      uint32_t m = 0;
      int64_t n = V::L;
      if (MASKED) {
        m = V::bits(mrow, c);
        n = __builtin_popcount(m);
      } else if (SAFE) {
        n = min64(V::L, d.in_features - c * V::L);
      }
      if constexpr (!SAFE && a % prefetch_every<C::chunk_bytes> == 0)
        __builtin_prefetch(C::addr(w.values, p) + VALUE_PREFETCH);
      R v = SAFE ? C::tail(w.values, p, n, zero) : C::load(w.values, p);
      if (C::has_zero) v = V::sub(v, zv);
      if (MASKED) v = V::expand(v, m);
      p += n;
      for (int j = 0; j < BT; ++j) part[j][a] = V::fma(v, xv[j], part[j][a]);
      ++c;
    };
    on_chains<NA>(c, group_end, step);
    const R s = V::bcast(q.scales[r * q.groups + g]);
    for (int j = 0; j < BT; ++j) {
      acc[j] = V::fma(chain_sum<NA>(part[j]), s, acc[j]);
      for (int a = 0; a < NA; ++a) part[j][a] = V::zero();
    }
  }
  const float b = d.bias ? d.bias[r] : 0.f;
  for (int j = 0; j < BT; ++j) d.out[(b0 + j) * d.out_features + r] = V::hsum(acc[j]) + b;
}

// Batch > 1: one row at a time against up to 6 batch rows (12 accumulators), each chunk of
// codes decoded once per tile.
template <class C, bool MASKED, bool SAFE>
inline void quant_tile(const Dense& d, const Bitmask& w, const Quant& q, int64_t r, int64_t b0, int64_t nb) {
  switch (nb) {
    case 1: return quant_block<C, MASKED, 1, SAFE>(d, w, q, r, b0);
    case 2: return quant_block<C, MASKED, 2, SAFE>(d, w, q, r, b0);
    case 3: return quant_block<C, MASKED, 3, SAFE>(d, w, q, r, b0);
    case 4: return quant_block<C, MASKED, 4, SAFE>(d, w, q, r, b0);
    case 5: return quant_block<C, MASKED, 5, SAFE>(d, w, q, r, b0);
    default: return quant_block<C, MASKED, 6, SAFE>(d, w, q, r, b0);
  }
}

template <class C, bool MASKED>
void quant_rows_t(const Dense& d, const Bitmask& w, const Quant& q, int64_t r0, int64_t r1) {
  const int64_t safe_end = r0 > w.safe_rows ? r0 : min64(r1, w.safe_rows);
  int64_t r = r0;
  if (d.batch == 1) {  // one row at a time, on 4 chains (see quant_block)
    for (; r < safe_end; ++r) quant_block<C, MASKED, 1, false, 4>(d, w, q, r, 0);
    for (; r < r1; ++r) quant_block<C, MASKED, 1, true, 4>(d, w, q, r, 0);
    return;
  }
  for (; r < r1; ++r) {
    for (int64_t b0 = 0; b0 < d.batch; b0 += 6) {
      if (r < safe_end) quant_tile<C, MASKED, false>(d, w, q, r, b0, min64(6, d.batch - b0));
      else quant_tile<C, MASKED, true>(d, w, q, r, b0, min64(6, d.batch - b0));
    }
  }
}

void quant_bitmask_rows(const Dense& d, const Bitmask& w, const Quant& q, int64_t r0, int64_t r1) {
  const bool masked = w.mask != nullptr;
  if (q.type == QuantType::int8) {
    if (masked) quant_rows_t<Int8Codes, true>(d, w, q, r0, r1);
    else quant_rows_t<Int8Codes, false>(d, w, q, r0, r1);
  } else {
    if (masked) quant_rows_t<Int4Codes, true>(d, w, q, r0, r1);
    else quant_rows_t<Int4Codes, false>(d, w, q, r0, r1);
  }
}

// ---- CSR: the nonzeros of a row, in column order, split into runs of one group each ----

// The end of the run of nonzeros from k that lies in the group of column col[k], and that group.
template <class I>
inline int64_t group_run(const Csr& w, const Quant& q, int64_t k, int64_t end, int64_t* g) {
  if (q.groups == 1) {
    *g = 0;
    return end;
  }
  const I* col = static_cast<const I*>(w.col);
  *g = static_cast<int64_t>(col[k]) / q.group_size;
  const int64_t limit = (*g + 1) * q.group_size;
  int64_t e = k + 1;
  while (e < end && static_cast<int64_t>(col[e]) < limit) ++e;
  return e;
}

template <class C, class I>
inline void quant_csr_row1(const Dense& d, const Csr& w, const Quant& q, int64_t r) {
  const I* col = static_cast<const I*>(w.col);
  int64_t k = w.crow[r];
  const int64_t end = w.crow[r + 1];
  const int64_t vector_end = min64(end, q.total - 32);  // whole-vector loads stay inside the stream below it
  R acc = V::zero();
  while (k < end) {
    int64_t g;
    const int64_t run_end = group_run<I>(w, q, k, end, &g);
    const int zero = zero_of(q, r, g);
    const R zv = V::bcast(static_cast<float>(zero));
    R part0 = V::zero(), part1 = V::zero();
    for (; k + V::L <= min64(run_end, vector_end); k += V::L) {
      R v = C::load(w.values, k);
      if (C::has_zero) v = V::sub(v, zv);
      part0 = V::fma(v, V::gather(d.x, col + k), part0);
    }
    for (; k < run_end; k += V::L) {  // lanes past the run decode to zero (fill) and gather x[0]
      const int64_t n = min64(V::L, run_end - k);
      I idx[V::L] = {};
      std::memcpy(idx, col + k, n * sizeof(I));
      R v = C::tail(w.values, k, n, zero);
      if (C::has_zero) v = V::sub(v, zv);
      part1 = V::fma(v, V::gather(d.x, idx), part1);
    }
    k = run_end;
    acc = V::fma(V::add(part0, part1), V::bcast(q.scales[r * q.groups + g]), acc);
  }
  d.out[r] = V::hsum(acc) + (d.bias ? d.bias[r] : 0.f);
}

// NV vectors of batch columns: each code broadcast over a row of xt.
template <class C, class I, int NV>
inline void quant_csr_row_batch(const Dense& d, const Csr& w, const Quant& q, int64_t r, int64_t b0, int64_t nb) {
  const I* col = static_cast<const I*>(w.col);
  const float* xt = d.xt + b0;
  R acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = V::zero();
  int64_t k = w.crow[r];
  const int64_t end = w.crow[r + 1];
  while (k < end) {
    int64_t g;
    const int64_t run_end = group_run<I>(w, q, k, end, &g);
    const float zero = static_cast<float>(C::has_zero ? zero_of(q, r, g) : 0);
    R part[NV];
    for (int v = 0; v < NV; ++v) part[v] = V::zero();
    for (; k < run_end; ++k) {
      const R wv = V::bcast(C::one(w.values, k) - zero);
      const float* xr = xt + static_cast<int64_t>(col[k]) * d.xt_stride;
      for (int v = 0; v < NV; ++v) part[v] = V::fma(wv, V::load(xr + v * V::L), part[v]);
    }
    const R s = V::bcast(q.scales[r * q.groups + g]);
    for (int v = 0; v < NV; ++v) acc[v] = V::fma(part[v], s, acc[v]);
  }
  float sums[NV * V::L];
  for (int v = 0; v < NV; ++v) V::store(sums + v * V::L, acc[v]);
  const float b = d.bias ? d.bias[r] : 0.f;
  for (int64_t j = 0; j < nb; ++j) d.out[(b0 + j) * d.out_features + r] = sums[j] + b;
}

template <class C, class I>
void quant_csr_rows_t(const Dense& d, const Csr& w, const Quant& q, int64_t r0, int64_t r1) {
  if (d.batch == 1) {
    for (int64_t r = r0; r < r1; ++r) quant_csr_row1<C, I>(d, w, q, r);
    return;
  }
  constexpr int64_t tile = 4 * V::L;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b0 = 0; b0 < d.batch; b0 += tile) {
      const int64_t nb = min64(tile, d.batch - b0);
      switch ((nb + V::L - 1) / V::L) {
        case 1: quant_csr_row_batch<C, I, 1>(d, w, q, r, b0, nb); break;
        case 2: quant_csr_row_batch<C, I, 2>(d, w, q, r, b0, nb); break;
        case 3: quant_csr_row_batch<C, I, 3>(d, w, q, r, b0, nb); break;
        default: quant_csr_row_batch<C, I, 4>(d, w, q, r, b0, nb); break;
      }
    }
  }
}

template <class C>
void quant_csr_rows_c(const Dense& d, const Csr& w, const Quant& q, int64_t r0, int64_t r1) {
  if (w.col16) quant_csr_rows_t<C, uint16_t>(d, w, q, r0, r1);
  else quant_csr_rows_t<C, int32_t>(d, w, q, r0, r1);
}

void quant_csr_rows(const Dense& d, const Csr& w, const Quant& q, int64_t r0, int64_t r1) {
  if (q.type == QuantType::int8) quant_csr_rows_c<Int8Codes>(d, w, q, r0, r1);
  else quant_csr_rows_c<Int4Codes>(d, w, q, r0, r1);
}
