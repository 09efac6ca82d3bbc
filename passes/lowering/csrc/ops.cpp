// fx_sparsity_native::* operators: checks at the boundary, one ISA chosen at load time,
// rows split over torch's intra-op pool. The public fx_sparsity::* operators
// (passes/sparse_ops.py) call these when the extension is built, else their pure-torch
// references.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels.h"

namespace fxs {
namespace {

bool supports(const std::string& isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (isa == "avx512-bf16" || isa == "avx512-lut-bf16")
    return supports("avx512") && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2");
  if (isa == "avx512" || isa == "avx512-lut")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi2");
#endif
  return isa == "generic";
}

#if defined(__x86_64__)
// An AVX-512 table with the bf16 dot-product kernels for bf16 weights and inputs: avx512-bf16 and
// avx512-lut-bf16 differ in their fp32/fp16 and quantized bitmask decode only.
constexpr KernelTable with_bf16(const KernelTable& base, const char* name, const Bf16Kernels* bf16) {
  return KernelTable{name, base.bitmask_rows_1, base.bitmask_rows, base.csr_rows, bf16, base.quant_bitmask_rows,
                     base.quant_csr_rows};
}
#endif

const KernelTable* table_for(const std::string& isa) {
#if defined(__x86_64__)
  static const KernelTable avx512_bf16 = with_bf16(avx512::table, "avx512-bf16", &avx512bf16::kernels);
  static const KernelTable avx512_lut_bf16 =
      with_bf16(avx512_lut::table, "avx512-lut-bf16", &avx512bf16::kernels);
  // auto: vexpandps on AMD too. The permutation-table decode (-lut) was AMD Zen 4's choice while the batch-1
  // kernels ran 4 rows per block (vexpandps then 1.7x slower); since they run one row on 4 chains, vexpandps
  // is the faster of the two there as well (Zen 4, streaming batch 1: fp32 bitmask 50% 1.26x, bitmask-int8 1.34x;
  // BENCHMARKS.md, sparse_kernels.py --isas). The -lut tables stay forceable, to measure on each new CPU.
  if (isa == "auto") {
    if (supports("avx512-bf16")) return &avx512_bf16;
    if (supports("avx512")) return &avx512::table;
    return supports("avx2") ? &avx2::table : &generic::table;
  }
  if (isa == "avx512-bf16") return &avx512_bf16;
  if (isa == "avx512-lut-bf16") return &avx512_lut_bf16;
  if (isa == "avx512") return &avx512::table;
  if (isa == "avx512-lut") return &avx512_lut::table;
  if (isa == "avx2") return &avx2::table;
#endif
  return &generic::table;
}

// Chosen once, by cpuid; only the isa operator (tests, benchmarks) changes it.
const KernelTable*& active() {
  static const KernelTable* table = table_for("auto");
  return table;
}

std::string isa(const std::string& want) {
  if (!want.empty()) {
    TORCH_CHECK(want == "auto" || want == "avx512-bf16" || want == "avx512-lut-bf16" || want == "avx512" ||
                    want == "avx512-lut" || want == "avx2" || want == "generic",
                "isa must be 'auto', 'avx512-bf16', 'avx512-lut-bf16', 'avx512', 'avx512-lut', 'avx2' or 'generic', "
                "got '", want, "'");
    TORCH_CHECK(supports(want) || want == "auto", "this CPU does not support ", want);
    active() = table_for(want);
  }
  return active()->isa;
}

ValueType value_type(const at::Tensor& values, const at::Tensor& x, const char* op) {
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": values (", values.scalar_type(),
              ") and x (", x.scalar_type(), ") must have the same dtype");
  switch (values.scalar_type()) {
    case at::kFloat: return ValueType::f32;
    case at::kBFloat16: return ValueType::bf16;
    case at::kHalf: return ValueType::f16;
    default: TORCH_CHECK(false, op, ": values must be float32, bfloat16 or float16, got ", values.scalar_type());
  }
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// How a kernel reads x: fp32 rows, fp32 columns (csr at batch > 1), or bf16 rows (Dense::xh).
enum class XLayout { rows, transposed, bf16_rows };

// x as a zero-padded fp32 [batch, round_up(in, 16)] matrix (transposed for the csr batch
// kernel; bf16 [batch, round_up(in, 64)] for the bf16 dot-product kernels), bias in fp32, an
// fp32 output; everything the kernels read.
struct Call {
  at::Tensor x, xt, xh, bias, out;
  Dense d{};
  std::vector<int64_t> out_shape;

  Call(const at::Tensor& x_in, int64_t out_features, const std::optional<at::Tensor>& bias_in, XLayout layout,
       const char* op) {
    TORCH_CHECK(x_in.dim() >= 1, op, ": x must have at least one dimension");
    TORCH_CHECK(x_in.device().is_cpu(), op, ": x must be on the CPU");
    const int64_t in = x_in.size(-1);
    out_shape = x_in.sizes().vec();
    out_shape.back() = out_features;
    int64_t batch = 1;
    for (int64_t i = 0; i + 1 < x_in.dim(); ++i) batch *= x_in.size(i);
    const auto f32 = x_in.options().dtype(at::kFloat);
    const at::Tensor x2 = x_in.reshape({batch, in});
    if (layout == XLayout::bf16_rows) {
      xh = at::zeros({batch, round_up(in, 64)}, x_in.options().dtype(at::kBFloat16));
      xh.narrow(1, 0, in).copy_(x2);
    } else if (layout == XLayout::transposed && batch > 1) {
      xt = at::zeros({in, round_up(batch, 16)}, f32);
      xt.narrow(1, 0, batch).copy_(x2.t());
    } else {
      x = at::zeros({batch, round_up(in, 16)}, f32);
      x.narrow(1, 0, in).copy_(x2);
    }
    if (bias_in.has_value()) {
      TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == out_features, op, ": bias must have shape [",
                  out_features, "], got ", bias_in->sizes());
      bias = bias_in->to(at::kFloat).contiguous();
    }
    out = at::empty({batch, out_features}, f32);
    d = Dense{x.defined() ? x.data_ptr<float>() : nullptr, x.defined() ? x.size(1) : 0,
              xt.defined() ? xt.data_ptr<float>() : nullptr, xt.defined() ? xt.size(1) : 0,
              xh.defined() ? reinterpret_cast<const uint16_t*>(xh.data_ptr()) : nullptr, xh.defined() ? xh.size(1) : 0,
              batch, in, out_features, out.data_ptr<float>(), bias.defined() ? bias.data_ptr<float>() : nullptr};
  }

  at::Tensor result(at::ScalarType dtype) const { return out.to(dtype).view(out_shape); }
};

// Rows in chunks handed out by an atomic counter to torch's intra-op threads (as many as
// torch.set_num_threads allows): a thread the OS deschedules (a shared machine) leaves its
// chunks to the others instead of holding the whole call up, as a static split would.
template <class F>
void for_rows(int64_t rows, const F& f) {
  constexpr int64_t chunk = 32;
  const int64_t chunks = (rows + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < chunks; c = next++) f(c * chunk, std::min(rows, (c + 1) * chunk));
  });
}

int64_t mask_bytes_per_row(int64_t in) { return round_up(in, 64) / 8; }

void check_mask(const at::Tensor& mask, int64_t rows, int64_t in, const char* op) {
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.is_contiguous(), op,
              ": mask must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(mask.size(0) == rows && mask.size(1) == mask_bytes_per_row(in), op, ": mask must have shape [", rows,
              ", ", mask_bytes_per_row(in), "] for ", in, " input features, got ", mask.sizes());
}

// Rows whose last vector read stays inside values (see Bitmask::safe_rows).
template <class Offset>
int64_t safe_rows(int64_t rows, int64_t total, const Offset& offset) {
  constexpr int64_t max_lanes = 32;  // bf16 lanes of the bf16 dot-product kernels
  int64_t s = rows;
  while (s > 0 && offset(s) + max_lanes > total) --s;
  return s;
}

// The bitmask/N:M kernel of the active table for this call: the bf16 dot-product kernels for
// bf16 values where the table has them, else the fp32-accumulating ones.
at::Tensor run_bitmask(const at::Tensor& x, const Bitmask& w, int64_t rows, const std::optional<at::Tensor>& bias,
                       const char* op) {
  const Bf16Kernels* bf16 = w.vtype == ValueType::bf16 ? active()->bf16 : nullptr;
  Call call(x, rows, bias, bf16 ? XLayout::bf16_rows : XLayout::rows, op);
  BitmaskRowsFn fn = call.d.batch == 1 ? active()->bitmask_rows_1 : active()->bitmask_rows;
  if (bf16) fn = call.d.batch == 1 ? bf16->bitmask_rows_1 : bf16->bitmask_rows;
  if (call.d.batch > 0) for_rows(rows, [&](int64_t r0, int64_t r1) { fn(call.d, w, r0, r1); });
  return call.result(x.scalar_type());
}

at::Tensor bitmask_linear(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                          const at::Tensor& offsets, const std::optional<at::Tensor>& bias) {
  const char* op = "fx_sparsity_native::bitmask_linear";
  const ValueType vt = value_type(values, x, op);
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), op, ": values must be a contiguous 1-D tensor");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.size(0) >= 1, op, ": row_offsets must be a contiguous 1-D int64 tensor");
  const int64_t rows = offsets.size(0) - 1;
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[rows] <= values.numel(), op, ": row_offsets must start at 0 and end at most at ",
              values.numel(), " (the number of values), got ", off[0], "..", off[rows]);
  check_mask(mask, rows, x.size(-1), op);
  const Bitmask w{mask.data_ptr<uint8_t>(), mask.size(1), values.data_ptr(), vt, off, 0,
                  safe_rows(rows, values.numel(), [off](int64_t r) { return off[r]; })};
  return run_bitmask(x, w, rows, bias, op);
}

at::Tensor nm_linear(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                     const std::optional<at::Tensor>& bias) {
  const char* op = "fx_sparsity_native::nm_linear";
  const ValueType vt = value_type(values, x, op);
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous(), op, ": values must be a contiguous 2-D tensor");
  const int64_t rows = values.size(0), stride = values.size(1);
  check_mask(mask, rows, x.size(-1), op);
  const Bitmask w{mask.data_ptr<uint8_t>(), mask.size(1), values.data_ptr(), vt, nullptr, stride,
                  safe_rows(rows, values.numel(), [stride](int64_t r) { return r * stride; })};
  return run_bitmask(x, w, rows, bias, op);
}

at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                      const std::optional<at::Tensor>& bias) {
  const char* op = "fx_sparsity_native::csr_linear";
  const ValueType vt = value_type(values, x, op);
  TORCH_CHECK(crow.scalar_type() == at::kInt && crow.dim() == 1 && crow.is_contiguous() && crow.size(0) >= 1, op,
              ": crow_indices must be a contiguous 1-D int32 tensor");
  TORCH_CHECK((col.scalar_type() == at::kShort || col.scalar_type() == at::kInt) && col.dim() == 1 &&
                  col.is_contiguous(), op, ": col_indices must be a contiguous 1-D int16 or int32 tensor");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && values.numel() == col.numel(), op,
              ": values must be contiguous, 1-D and as long as col_indices");
  const int64_t rows = crow.size(0) - 1;
  const int32_t* cr = crow.data_ptr<int32_t>();
  TORCH_CHECK(cr[0] == 0 && cr[rows] <= col.numel(), op, ": crow_indices must start at 0 and end at most at ",
              col.numel(), ", got ", cr[0], "..", cr[rows]);
  Call call(x, rows, bias, XLayout::transposed, op);
  const Csr w{cr, col.data_ptr(), col.scalar_type() == at::kShort, values.data_ptr(), vt};
  const auto fn = active()->csr_rows;
  for_rows(rows, [&](int64_t r0, int64_t r1) { fn(call.d, w, r0, r1); });
  return call.result(x.scalar_type());
}

// ---- quantized weights (quant_body.h): int8 codes (values int8) or int4 codes (values uint8, two per byte) ----

void check_x_float(const at::Tensor& x, const char* op) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", t);
}

// The Quant of a call; values' dtype says int8 or int4, scales [rows] or [rows, groups] the groups.
Quant quant_of(const at::Tensor& values, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
               int64_t rows, int64_t in, const char* op) {
  TORCH_CHECK(values.is_contiguous() && (values.scalar_type() == at::kChar || values.scalar_type() == at::kByte), op,
              ": values must be contiguous int8 (int8 codes) or uint8 (int4 codes, two per byte), got ",
              values.scalar_type());
  const bool int4 = values.scalar_type() == at::kByte;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() >= 1 && scales.dim() <= 2 &&
                  scales.size(0) == rows && (scales.dim() == 1 || scales.size(1) >= 1), op,
              ": scales must be a contiguous float32 [", rows, "] or [", rows, ", groups] tensor, got ",
              scales.scalar_type(), " ", scales.sizes());
  const int64_t groups = scales.dim() == 1 ? 1 : scales.size(1);
  TORCH_CHECK(in % groups == 0 && (groups == 1 || (in / groups) % 16 == 0), op, ": ", groups,
              " scale groups per row must split the ", in, " input features into groups of a multiple of 16");
  const int8_t* zp = nullptr;
  if (zeros.has_value()) {
    TORCH_CHECK(int4, op, ": zero points are for int4 codes only");
    TORCH_CHECK(zeros->scalar_type() == at::kChar && zeros->is_contiguous() && zeros->numel() == rows * groups, op,
                ": zeros must be a contiguous int8 tensor of scales' shape ", scales.sizes(), ", got ",
                zeros->scalar_type(), " ", zeros->sizes());
    zp = zeros->data_ptr<int8_t>();
  }
  return Quant{int4 ? QuantType::int4 : QuantType::int8, scales.data_ptr<float>(), groups, in / groups, zp,
               int4 ? 8 : 0, values.numel() * (int4 ? 2 : 1)};
}

// int4 codes with bf16 x at batch 1 run on the bf16 dot-product kernels where the table has them (the
// products are exact either way) and the scale groups are whole 32-column chunks.
at::Tensor run_quant_bitmask(const at::Tensor& x, const Bitmask& w, const Quant& q, int64_t rows,
                             const std::optional<at::Tensor>& bias, const char* op) {
  const Bf16Kernels* bf16 = active()->bf16;
  const bool dot = bf16 && x.scalar_type() == at::kBFloat16 && q.type == QuantType::int4 &&
                   x.numel() == x.size(-1) && (q.groups == 1 || q.group_size % 32 == 0);
  Call call(x, rows, bias, dot ? XLayout::bf16_rows : XLayout::rows, op);
  const auto fn = dot ? bf16->quant_int4_rows_1 : active()->quant_bitmask_rows;
  if (call.d.batch > 0) for_rows(rows, [&](int64_t r0, int64_t r1) { fn(call.d, w, q, r0, r1); });
  return call.result(x.scalar_type());
}

at::Tensor quant_bitmask_linear(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                                const at::Tensor& offsets, const at::Tensor& scales,
                                const std::optional<at::Tensor>& bias) {
  const char* op = "fx_sparsity_native::quant_bitmask_linear";
  check_x_float(x, op);
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.size(0) >= 1, op, ": row_offsets must be a contiguous 1-D int64 tensor");
  const int64_t rows = offsets.size(0) - 1;
  const Quant q = quant_of(values, scales, std::nullopt, rows, x.size(-1), op);
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[rows] <= q.total, op, ": row_offsets must start at 0 and end at most at ", q.total,
              " (the number of codes), got ", off[0], "..", off[rows]);
  check_mask(mask, rows, x.size(-1), op);
  const Bitmask w{mask.data_ptr<uint8_t>(), mask.size(1), values.data_ptr(), ValueType::f32, off, 0,
                  safe_rows(rows, q.total, [off](int64_t r) { return off[r]; })};
  return run_quant_bitmask(x, w, q, rows, bias, op);
}

at::Tensor quant_nm_linear(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                           const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  const char* op = "fx_sparsity_native::quant_nm_linear";
  check_x_float(x, op);
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D");
  const int64_t rows = values.size(0);
  const Quant q = quant_of(values, scales, std::nullopt, rows, x.size(-1), op);
  const int64_t stride = rows ? q.total / rows : 0;
  check_mask(mask, rows, x.size(-1), op);
  const Bitmask w{mask.data_ptr<uint8_t>(), mask.size(1), values.data_ptr(), ValueType::f32, nullptr, stride,
                  safe_rows(rows, q.total, [stride](int64_t r) { return r * stride; })};
  return run_quant_bitmask(x, w, q, rows, bias, op);
}

at::Tensor quant_dense_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scales,
                              const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias) {
  const char* op = "fx_sparsity_native::quant_dense_linear";
  check_x_float(x, op);
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D");
  const int64_t rows = values.size(0), in = x.size(-1);
  const Quant q = quant_of(values, scales, zeros, rows, in, op);
  const int64_t stride = rows ? q.total / rows : 0;
  TORCH_CHECK(stride == (q.type == QuantType::int4 ? round_up(in, 2) : in), op, ": values must have shape [", rows,
              ", ", q.type == QuantType::int4 ? round_up(in, 2) / 2 : in, "] for ", in, " input features, got ",
              values.sizes());
  const Bitmask w{nullptr, 0, values.data_ptr(), ValueType::f32, nullptr, stride,
                  safe_rows(rows, q.total, [stride](int64_t r) { return r * stride; })};
  return run_quant_bitmask(x, w, q, rows, bias, op);
}

at::Tensor quant_csr_linear(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                            const at::Tensor& values, const at::Tensor& scales,
                            const std::optional<at::Tensor>& bias) {
  const char* op = "fx_sparsity_native::quant_csr_linear";
  check_x_float(x, op);
  TORCH_CHECK(crow.scalar_type() == at::kInt && crow.dim() == 1 && crow.is_contiguous() && crow.size(0) >= 1, op,
              ": crow_indices must be a contiguous 1-D int32 tensor");
  TORCH_CHECK((col.scalar_type() == at::kShort || col.scalar_type() == at::kInt) && col.dim() == 1 &&
                  col.is_contiguous(), op, ": col_indices must be a contiguous 1-D int16 or int32 tensor");
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D");
  const int64_t rows = crow.size(0) - 1;
  const Quant q = quant_of(values, scales, std::nullopt, rows, x.size(-1), op);
  TORCH_CHECK(q.total == (q.type == QuantType::int4 ? round_up(col.numel(), 2) : col.numel()), op,
              ": values must hold one code per column index (int4: two per byte), got ", values.numel(),
              " values for ", col.numel(), " indices");
  const int32_t* cr = crow.data_ptr<int32_t>();
  TORCH_CHECK(cr[0] == 0 && cr[rows] <= col.numel(), op, ": crow_indices must start at 0 and end at most at ",
              col.numel(), ", got ", cr[0], "..", cr[rows]);
  Call call(x, rows, bias, XLayout::transposed, op);
  const Csr w{cr, col.data_ptr(), col.scalar_type() == at::kShort, values.data_ptr(), ValueType::f32};
  const auto fn = active()->quant_csr_rows;
  for_rows(rows, [&](int64_t r0, int64_t r1) { fn(call.d, w, q, r0, r1); });
  return call.result(x.scalar_type());
}

}  // namespace
}  // namespace fxs

TORCH_LIBRARY(fx_sparsity_native, m) {
  m.def("bitmask_linear(Tensor x, Tensor mask, Tensor values, Tensor row_offsets, Tensor? bias) -> Tensor");
  m.def("nm_linear(Tensor x, Tensor mask, Tensor values, Tensor? bias) -> Tensor");
  m.def("csr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias) -> Tensor");
  // The kernels in use; want = 'avx512-bf16' | 'avx512-lut-bf16' | 'avx512' | 'avx512-lut' | 'avx2' | 'generic'
  // forces one (tests, benchmarks), 'auto' re-picks by cpuid.
  // Quantized weights: values int8 (int8 codes) or uint8 (int4 codes, two per byte, low nibble first),
  // scales float32 [rows] or [rows, groups]; see Quant in kernels.h.
  m.def("quant_bitmask_linear(Tensor x, Tensor mask, Tensor values, Tensor row_offsets, Tensor scales, Tensor? bias) "
        "-> Tensor");
  m.def("quant_nm_linear(Tensor x, Tensor mask, Tensor values, Tensor scales, Tensor? bias) -> Tensor");
  m.def("quant_csr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor scales, "
        "Tensor? bias) -> Tensor");
  m.def("quant_dense_linear(Tensor x, Tensor values, Tensor scales, Tensor? zeros, Tensor? bias) -> Tensor");
  m.def("isa(str want='') -> str", &fxs::isa);
}

TORCH_LIBRARY_IMPL(fx_sparsity_native, CPU, m) {
  m.impl("bitmask_linear", &fxs::bitmask_linear);
  m.impl("nm_linear", &fxs::nm_linear);
  m.impl("csr_linear", &fxs::csr_linear);
  m.impl("quant_bitmask_linear", &fxs::quant_bitmask_linear);
  m.impl("quant_nm_linear", &fxs::quant_nm_linear);
  m.impl("quant_csr_linear", &fxs::quant_csr_linear);
  m.impl("quant_dense_linear", &fxs::quant_dense_linear);
}
