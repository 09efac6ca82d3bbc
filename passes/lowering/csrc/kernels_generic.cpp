// Portable kernels (any CPU): one float per "vector", so the same body runs weight by weight.
#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

#include "kernels.h"

namespace fxs::generic {

struct V {
  static constexpr int L = 1;
  using R = float;
  static R zero() { return 0.f; }
  static R load(const float* p) { return *p; }
  static void store(float* p, R a) { *p = a; }
  static R bcast(float v) { return v; }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static float hsum(R a) { return a; }
  static R vals(const float* p) { return *p; }
  static R vals(const bf16_t* p);
  static R vals(const f16_t* p) { return c10::detail::fp16_ieee_to_fp32_value(p->bits); }
  static R vals(const int8_t* p) { return static_cast<float>(*p); }
  static R nib(const uint8_t* base, int64_t k) { return static_cast<float>((base[k >> 1] >> ((k & 1) * 4)) & 15); }
  static R expand(R v, uint32_t m) { return m ? v : 0.f; }
  static uint32_t bits(const uint8_t* row, int64_t c) { return (row[c >> 3] >> (c & 7)) & 1u; }
  static R gather(const float* x, const int32_t* idx) { return x[*idx]; }
  static R gather(const float* x, const uint16_t* idx) { return x[*idx]; }
};

inline float V::vals(const bf16_t* p) {
  const uint32_t u = static_cast<uint32_t>(p->bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#include "kernel_body.h"
#include "quant_body.h"

const KernelTable table{"generic", bitmask_rows, bitmask_rows, csr_rows, nullptr, quant_bitmask_rows, quant_csr_rows};

}  // namespace fxs::generic
