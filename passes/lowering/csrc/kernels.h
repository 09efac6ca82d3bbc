// Problem descriptions shared by the operator file (ops.cpp) and the per-ISA kernel files.
//
// The operator boundary checks and converts everything once (x to a zero-padded fp32
// matrix, bias to fp32); the kernels only read these raw pointers and write their rows
// of the fp32 output. Each ISA file compiles the same body (kernel_body.h) under its own
// target and fills one KernelTable; ops.cpp picks a table once, by cpuid.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>  // std::integer_sequence, for the bodies' unrolled loops

namespace fxs {

enum class ValueType : int { f32 = 0, bf16 = 1, f16 = 2 };

// 16-bit storage types, widened to fp32 by the kernels.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

// x: [batch, x_stride] fp32, row b at x + b * x_stride, zero beyond in_features.
// xt (csr, batch > 1): [in_features, xt_stride] fp32, column b of row c at xt[c * xt_stride + b],
// zero-padded up to xt_stride. xh (the bf16 dot-product kernels): [batch, xh_stride] bf16 bits,
// zero beyond in_features. out: [batch, out_features] fp32. bias: fp32 or null.
struct Dense {
  const float* x;
  int64_t x_stride;
  const float* xt;
  int64_t xt_stride;
  const uint16_t* xh;
  int64_t xh_stride;
  int64_t batch;
  int64_t in_features;
  int64_t out_features;
  float* out;
  const float* bias;
};

// Bitmask and N:M: bit j of row r (byte j / 8, bit j % 8 of mask + r * mask_stride) says
// whether weight (r, j) is stored; the stored values of a row are consecutive, starting at
// offsets[r] (bitmask) or r * row_stride when offsets is null (N:M, fixed stride).
// Rows below safe_rows may be over-read by one vector past their end; later rows are not.
struct Bitmask {
  const uint8_t* mask;
  int64_t mask_stride;
  const void* values;
  ValueType vtype;
  const int64_t* offsets;
  int64_t row_stride;
  int64_t safe_rows;
};

// CSR with int32 or 16-bit (read as unsigned) column indices.
struct Csr {
  const int32_t* crow;
  const void* col;
  bool col16;
  const void* values;
  ValueType vtype;
};

// Quantized weights (quant_body.h): the values are a stream of int8 (value k at values[k]) or
// int4 (value k in byte k / 2, the low nibble first, unsigned) codes u, in the value layout of
// Bitmask (offsets and row_stride counted in codes, nibbles for int4; mask null: dense rows) or
// Csr. Weight (r, j) is scales[r * groups + g] * (u - zero_rg), g = j / group_size, zero_rg =
// zeros[r * groups + g] when zeros is set, else the constant zero (0 for int8, 8 for int4).
// group_size is a multiple of 16 when groups > 1 (a group is a whole number of vectors).
// total: the number of codes in the stream; vector reads stay 32 codes inside it.
enum class QuantType : int { int8 = 0, int4 = 1 };

struct Quant {
  QuantType type;
  const float* scales;
  int64_t groups;
  int64_t group_size;
  const int8_t* zeros;
  int zero;
  int64_t total;
};

// Weight values and codes are prefetched this many bytes ahead of the kernels' whole loads (a SAFE read may end
// its stream). On Intel Sapphire Rapids (2 threads, 6 11008x4096 layers streaming, batch 1) the hardware
// prefetchers alone left the bitmask, N:M and quantized kernels at 44-80% of the memory limit; dense int4 on
// bf16 dot products took 4.24 ms per layer without it, 1.86 / 1.53 ms 1 / 4 KiB ahead.
constexpr int64_t VALUE_PREFETCH = 4096;

using BitmaskRowsFn = void (*)(const Dense&, const Bitmask&, int64_t, int64_t);
using CsrRowsFn = void (*)(const Dense&, const Csr&, int64_t, int64_t);
using QuantBitmaskRowsFn = void (*)(const Dense&, const Bitmask&, const Quant&, int64_t, int64_t);
using QuantCsrRowsFn = void (*)(const Dense&, const Csr&, const Quant&, int64_t, int64_t);

// Bitmask and N:M kernels for bf16 values with bf16 inputs (Dense::xh), AVX512-BF16.
struct Bf16Kernels {
  BitmaskRowsFn bitmask_rows_1;  // batch 1
  BitmaskRowsFn bitmask_rows;    // batch > 1
  // int4 codes (bitmask, N:M, dense) with bf16 inputs, batch 1; scale groups of a multiple of 32 columns
  QuantBitmaskRowsFn quant_int4_rows_1;
};

struct KernelTable {
  const char* isa;
  BitmaskRowsFn bitmask_rows_1;  // batch 1
  BitmaskRowsFn bitmask_rows;    // batch > 1
  CsrRowsFn csr_rows;
  const Bf16Kernels* bf16;       // bf16 bitmask/N:M instead of the two above, or null
  QuantBitmaskRowsFn quant_bitmask_rows;  // quantized bitmask, N:M and dense (mask null)
  QuantCsrRowsFn quant_csr_rows;
};

namespace avx512 { extern const KernelTable table; }
namespace avx512_lut { extern const KernelTable table; }
namespace avx2 { extern const KernelTable table; }
namespace generic { extern const KernelTable table; }
namespace avx512bf16 { extern const Bf16Kernels kernels; }

}  // namespace fxs
