"""Our sparse CPU kernels (bitmask, nm, narrow csr) against torch dense and MKL csr, side by side.

Weights are the Llama-2-7B layer shapes, one "block" = 4096x4096 + 11008x4096 +
4096x11008 (attention projection, MLP up, MLP down). Two regimes:

* streaming (the LLM-decode regime): enough blocks of different random weights
  that the smallest format of the set exceeds twice the last-level cache, every
  layer run once per pass, so every variant reads its weights from memory;
* warm: one 2048x2048 layer called repeatedly (its weights stay in cache).

Per dtype (fp32, bf16), sparsity (unstructured 50-90% and 2:4) and batch (1, 4,
16, 64) it times torch dense (``F.linear``, same dtype), MKL csr
(``torch.sparse``, fp32 only; int32 indices, as the csr backend ran before our
kernels), and our ``bitmask``, ``csr`` (int16 indices) and ``nm`` (2:4 rows
only) operators. For bf16 on a CPU with AVX512-BF16, ``bitmask (fma)`` and
``nm (fma)`` are the same formats on the kernels without its dot products (bf16
widened to fp32, fp32 FMAs, as on CPUs that lack them). Rounds are interleaved in a new random order each time so that
load on a shared machine hits every variant alike; the speedups are ratios of
medians (dense time / variant time). ``limit`` is dense bytes / format bytes,
the speedup a purely memory-bound kernel would reach; ``of limit`` the measured
speedup as a fraction of it. Outputs are checked against dense before timing
(a quantized variant against its own dequantized weight).

``--quantized`` adds the quantized formats of the same weights (round to nearest: int8 per output row,
symmetric int4 in groups of 128): ``bitmask-int8``, ``csr-int8``, ``dense-int8``, ``bitmask-int4``,
``csr-int4``, ``dense-int4`` (and ``nm-int8``/``nm-int4`` on 2:4 rows), and torch's anchors beside them:
``torch fp32`` and ``torch bf16`` (``F.linear`` in that dtype), ``torch int8 wo``
(``torch._weight_int8pack_mm``, int8 weight-only, bf16 activations) and ``torch int4 wo``
(``torch.ops.aten._weight_int4pack_mm_for_cpu`` after ``_convert_weight_to_int4pack_for_cpu``, groups of
128, bf16 activations). An anchor whose activation dtype is not the row's converts ``x`` inside the timed
call (a ``[batch, in]`` cast, small beside the weight it reads).

    python benchmarks/sparse_kernels.py             # both regimes, about 20 minutes on 2 cores (estimate)
    python benchmarks/sparse_kernels.py --quick     # fp32, 50/70/90% and 2:4, batch 1/16, streaming
    python benchmarks/sparse_kernels.py --auto ...  # also fx_sparsity.lower(gm, "auto")'s per-layer picks
    python benchmarks/sparse_kernels.py --quantized --regime warm --dtypes bfloat16 --sparsities 50%,2:4
    python benchmarks/sparse_kernels.py --quick --auto --cotenants 1   # under load: one busy process beside

``--isas A,B`` adds each of our formats run on the kernels of those ISAs (``"bitmask [avx512-lut]"``), in the same
rounds: how the instruction set chosen by cpuid compares with the others this CPU has.

``--cotenants N`` starts N processes that each keep one core busy (a bare Python loop) before the first
variant is built and stops them at the end (they also exit by themselves once the benchmark is gone): the kernels, torch's and ``auto``'s own layer timing all run
beside them, as on a shared machine where another job holds a core.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import describe, start_cotenants
from tabulate import tabulate
from torch import nn

import fx_sparsity
from fx_sparsity.lowering.timing import last_level_cache_bytes
from passes.lowering import (
    QUANT_OPS,
    QuantizedComponents,
    bitmask_linear,
    csr_linear,
    native_isa,
    native_ops,
    nm_linear,
    quantized_to_dense,
    to_bitmask_components,
    to_narrow_csr_components,
    to_nm_components,
    to_quantized_components,
)
from passes.lowering.operators import _sparse_mm_linear

LLAMA_BLOCK = ((4096, 4096), (11008, 4096), (4096, 11008))
WARM_SHAPE = (2048, 2048)
SPARSITIES = ("50%", "60%", "70%", "80%", "90%", "2:4")
BATCHES = (1, 4, 16, 64)
INT4_GROUP = 128


def sparse_weight(shape: tuple[int, int], sparsity: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    rows, cols = shape
    w = torch.randn(rows, cols, generator=gen)
    if sparsity == "2:4":
        scores = torch.rand(rows, cols // 4, 4, generator=gen)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, -1).indices, True)
        keep = keep.view(rows, cols)
    else:
        keep = torch.rand(rows, cols, generator=gen) >= float(sparsity.rstrip("%")) / 100
    return (w * keep).to(dtype)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def round_to_nearest(weight: torch.Tensor, bits: int) -> QuantizedComponents:
    """Symmetric round to nearest: int8 per output row, int4 per group of INT4_GROUP columns (scale max|w| / qmax,
    an all-zero row or group scale 1)."""
    rows, cols = weight.shape
    qmax, groups = (127, 1) if bits == 8 else (7, cols // INT4_GROUP)
    w = weight.float().reshape(rows, groups, -1)
    scales = w.abs().amax(-1) / qmax
    scales[scales == 0] = 1
    values = torch.clamp(torch.round(w / scales[..., None]), -qmax, qmax).reshape(rows, cols).to(torch.int8)
    return QuantizedComponents(values, scales[:, 0].contiguous() if bits == 8 else scales)


def _as(dtype: torch.dtype, fn: Callable) -> Callable:
    """``fn`` on ``x`` converted to ``dtype`` (an anchor of another activation dtype), its output converted back."""
    return lambda x, *a: fn(x.to(dtype), *a).to(x.dtype)


def add_quantized(variants: dict, weights: list[torch.Tensor], sparsity: str) -> None:
    """Our quantized formats of ``weights`` and torch's anchors (see the module docstring); each entry's fourth
    element is the weight it stands for, per layer (its outputs are checked against that)."""
    dtype = weights[0].dtype
    for dense_dtype, name in ((torch.float32, "torch fp32"), (torch.bfloat16, "torch bf16")):
        if dense_dtype != dtype:  # the row's own dtype is "dense"
            cast = [w.to(dense_dtype) for w in weights]
            variants[name] = ([(w,) for w in cast], _as(dense_dtype, F.linear), nbytes(*cast), cast)
    quantized = {bits: [round_to_nearest(w, bits) for w in weights] for bits in (8, 4)}
    layouts = ["bitmask", "csr", "dense"] + (["nm"] if sparsity == "2:4" else [])
    for family in layouts:
        for bits in (8, 4):
            layout = f"{family}-int{bits}"
            parts = [to_quantized_components(layout, q) for q in quantized[bits]]
            refs = [quantized_to_dense(layout, p, w.shape[1]) for p, w in zip(parts, weights)]
            op = QUANT_OPS[layout]
            variants[layout] = (parts, lambda x, *c, op=op: op(x, *c, None), sum(nbytes(*p) for p in parts), refs)
    q8 = quantized[8]
    int8_args = [(q.values, q.scales.bfloat16()) for q in q8]
    variants["torch int8 wo"] = (int8_args, _as(torch.bfloat16, torch._weight_int8pack_mm),
                                 sum(nbytes(*a) for a in int8_args), [q.values * q.scales[:, None] for q in q8])
    int4_args, int4_refs = [], []
    for q in quantized[4]:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.values + 8).to(torch.int32), 2)
        scale_and_zero = torch.stack([q.scales.T, torch.zeros_like(q.scales.T)], -1).bfloat16().contiguous()
        int4_args.append((packed, INT4_GROUP, scale_and_zero))
        int4_refs.append(q.values * scale_and_zero[..., 0].float().T.repeat_interleave(INT4_GROUP, 1))
    variants["torch int4 wo"] = (int4_args, _as(torch.bfloat16, torch.ops.aten._weight_int4pack_mm_for_cpu),
                                 sum(nbytes(p, sz) for p, _, sz in int4_args), int4_refs)


def build_variants(weights: list[torch.Tensor], sparsity: str, quantized: bool = False,
                   isas: tuple[str, ...] = ()) -> dict[str, tuple[list[tuple], Callable, int]]:
    """name -> (per-layer args, fn(x, *args), total bytes[, weights it stands for]) for every variant that can run
    these weights (with ``quantized``, also the quantized formats and torch's anchors; with ``isas``, each of our
    formats also as ``"name [isa]"`` on the kernels of each of those ISAs)."""
    dtype = weights[0].dtype
    variants = {"dense": ([(w,) for w in weights], lambda x, w: F.linear(x, w), nbytes(*weights))}
    if quantized:
        add_quantized(variants, weights, sparsity)
    if dtype == torch.float32:
        mkl = [w.to_sparse_csr() for w in weights]
        size = sum(nbytes(m.crow_indices(), m.col_indices(), m.values()) for m in mkl)
        variants["mkl csr"] = ([(m,) for m in mkl], lambda x, m: _sparse_mm_linear(x, m, None), size)
    bm = [to_bitmask_components(w) for w in weights]
    variants["bitmask"] = (bm, lambda x, *c: bitmask_linear(x, *c, None), sum(nbytes(*c) for c in bm))
    cs = [to_narrow_csr_components(w) for w in weights]
    variants["csr"] = (cs, lambda x, *c: csr_linear(x, *c, None), sum(nbytes(*c) for c in cs))
    if sparsity == "2:4":
        nm = [to_nm_components(w, 2, 4) for w in weights]
        variants["nm"] = (nm, lambda x, *c: nm_linear(x, *c, None), sum(nbytes(*c) for c in nm))
    isa = native_isa() or ""
    if dtype == torch.bfloat16 and isa.endswith("-bf16"):  # the same formats on the fp32-FMA kernels
        fma_isa = isa.removesuffix("-bf16")
        for name in [n for n in ("bitmask", "nm") if n in variants]:
            args, fn, size, *_ = variants[name]
            variants[f"{name} (fma)"] = (args, lambda x, *c, fn=fn: _on_isa(fma_isa, fn, x, *c), size)
    ours = [n for n in variants if not n.startswith(("dense", "torch", "mkl")) and "(fma)" not in n]
    for name in ours:
        for isa in isas:
            args, fn, size, *refs = variants[name]
            variants[f"{name} [{isa}]"] = (args, lambda x, *c, fn=fn, isa=isa: _on_isa(isa, fn, x, *c), size, *refs)
    return variants


def _on_isa(isa: str, fn: Callable, x: torch.Tensor, *args) -> torch.Tensor:
    """``fn(x, *args)`` with the C++ kernels of ``isa`` (for bf16: without the AVX512-BF16 dot products)."""
    ops = native_ops()
    ops.isa(isa)
    try:
        return fn(x, *args)
    finally:
        ops.isa("auto")


class _Layers(nn.Module):
    """Bias-free Linears holding ``weights``, each applied to the input of its width (as the benchmark runs them)."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype) for w in weights)
        for layer, w in zip(self.layers, weights):
            layer.weight = nn.Parameter(w, requires_grad=False)
        self.widths = sorted({w.shape[1] for w in weights})
        assert len(self.widths) <= 2, "the Llama block has two input widths"

    def forward(self, x0: torch.Tensor, x1: torch.Tensor | None = None) -> list[torch.Tensor]:
        by_width = dict(zip(self.widths, (x0, x1)))
        return [layer(by_width[layer.in_features]) for layer in self.layers]


def add_auto(variants, weights, xs) -> None:
    """The ``auto`` variant: ``fx_sparsity.lower(gm, "auto")`` of the layers (masks of ones: the weights are
    sparse already), each layer then run by the variant auto picked for it; ``fuse`` is dense."""
    model = _Layers(weights)
    by_width = {x.shape[1]: x for x in xs}
    gm = fx_sparsity.prepare(model, sparsifier=fx_sparsity.MagnitudeSparsifier(0.0))
    lowered = fx_sparsity.lower(gm, "auto", example_inputs=tuple(by_width[w] for w in model.widths), progress_bar=False)
    picks = [r.backend for r in fx_sparsity.get_lowering(lowered)]
    names = ["dense" if p == "fuse" else p for p in picks]
    fns = [variants[n][1] for n in names]
    args = [(fn, *variants[n][0][i]) for i, (fn, n) in enumerate(zip(fns, names))]
    size = sum(nbytes(*variants[n][0][i]) for i, n in enumerate(names))
    variants["auto"] = (args, lambda x, fn, *a: fn(x, *a), size)
    counts = {n: names.count(n) for n in dict.fromkeys(names)}
    print(f"    auto picked {counts}", flush=True)


def check(variants, weights, xs) -> None:
    for i in range(min(3, len(weights))):
        x = xs[i]
        tol = 1e-3 if x.dtype == torch.float32 else 3e-2
        for name, (args, fn, _, *refs) in variants.items():
            ref = F.linear(x.float(), (refs[0][i] if refs else weights[i]).float())
            bf16 = name.startswith("torch") and name != "torch fp32"  # bf16 activations and output
            t = 3e-2 if bf16 else tol
            out = fn(x, *args[i]).float()
            torch.testing.assert_close(out, ref, rtol=t, atol=t * math.sqrt(x.shape[-1]), msg=name)


def time_round_robin(variants, xs, rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per layer call of each variant; each round runs the variants in a new random order.
    ``xs[i]`` is layer i's input."""
    samples = {name: [] for name in variants}
    names = list(variants)
    for name in names:  # warm up: first calls allocate and page in
        args, fn, *_ = variants[name]
        for x, a in zip(xs, args):
            fn(x, *a)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            args, fn, *_ = variants[name]
            start = time.perf_counter()
            for _ in range(calls):
                for x, a in zip(xs, args):
                    fn(x, *a)
            samples[name].append((time.perf_counter() - start) / (calls * len(args)))
    return {name: statistics.median(s) for name, s in samples.items()}


def run_cell(regime, dtype, sparsity, batches, rounds, blocks_for, auto=False, quantized=False,
             block=LLAMA_BLOCK, warm_shape=WARM_SHAPE, calls=20, isas=()) -> list[list]:
    gen = torch.Generator().manual_seed(0)
    if regime == "streaming":
        shapes = list(block)
        weights = [sparse_weight(s, sparsity, dtype, gen) for s in shapes]
        variants = build_variants(weights, sparsity, quantized, isas)
        n_blocks = blocks_for(min(v[2] for v in variants.values()))
        for _ in range(n_blocks - 1):
            more = [sparse_weight(s, sparsity, dtype, gen) for s in shapes]
            extra = build_variants(more, sparsity, quantized, isas)
            for name, (args, fn, size, *_) in extra.items():  # check() reads the first block's references only
                old_args, _, old_size, *old_refs = variants[name]
                variants[name] = (old_args + args, fn, old_size + size, *old_refs)
            del extra
            weights += more
        calls = 1
    else:
        weights = [sparse_weight(warm_shape, sparsity, dtype, gen)]
        variants = build_variants(weights, sparsity, quantized, isas)
    rows = []
    for batch in batches:
        by_in = {cols: torch.randn(batch, cols, generator=gen).to(dtype) for cols in {w.shape[1] for w in weights}}
        xs = [by_in[w.shape[1]] for w in weights]
        if auto:
            variants.pop("auto", None)
            add_auto(variants, weights, xs)
        check(variants, weights, xs)
        seconds = time_round_robin(variants, xs, rounds, calls)
        dense_s, dense_bytes = seconds["dense"], variants["dense"][2]
        for name in variants:
            if name == "dense":
                continue
            speedup = dense_s / seconds[name]
            limit = dense_bytes / variants[name][2]
            rows.append([
                str(dtype).removeprefix("torch."), sparsity, batch, name, f"{seconds[name] * 1e3:.3f}",
                f"{dense_s * 1e3:.3f}", f"{speedup:.2f}x", f"{limit:.2f}x", f"{speedup / limit:.0%}",
            ])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", choices=("streaming", "warm", "both"), default="both")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--sparsities", default=",".join(SPARSITIES))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--auto", action="store_true",
                        help="also time lower(gm, 'auto')'s per-layer picks (each layer timed by auto first)")
    parser.add_argument("--quick", action="store_true", help="fp32, 50/70/90%% and 2:4, batch 1/16, streaming")
    parser.add_argument("--quantized", action="store_true",
                        help="also the int8/int4 formats and torch's dense, int8 and int4 weight-only anchors")
    parser.add_argument("--cotenants", type=int, default=0,
                        help="busy processes beside the benchmark, one core each (timing under load)")
    parser.add_argument("--isas", default="",
                        help="also each of our formats on the kernels of these ISAs (comma-separated names of "
                             "native_isa(), those this CPU has; the same-CPU comparison behind the automatic choice)")
    parser.add_argument("--cache-mib", type=int, default=None,
                        help="last-level cache size the streaming regime outgrows (default: sysfs's); for virtual "
                             "machines whose sysfs reports the whole host's cache (measure where read bandwidth "
                             "drops)")
    parser.add_argument("--tiny", action="store_true",
                        help="a check that everything runs: 256x256 warm layers and a 256/512-wide block, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.regime, args.dtypes, args.sparsities, args.batches = "streaming", "float32", "50%,70%,90%,2:4", "1,16"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    l3 = last_level_cache_bytes() if args.cache_mib is None else args.cache_mib << 20
    print(f"{describe()}, kernels {native_isa()}, load average at start {Path('/proc/loadavg').read_text().split()[:3]}"
          + (f", streaming sized for a {args.cache_mib} MiB cache" if args.cache_mib is not None else "")
          + (f", {args.cotenants} busy co-tenant process(es)" if args.cotenants else ""))
    cotenants = start_cotenants(args.cotenants)
    try:
        run_regimes(args, l3)
    finally:
        for p in cotenants:
            p.terminate()
    print(f"\nload average at end: {Path('/proc/loadavg').read_text().split()[:3]}")


def run_regimes(args: argparse.Namespace, l3: int) -> None:
    """Every regime, dtype and sparsity cell of ``args``; prints each regime's table."""

    def blocks_for(smallest_block_bytes: int) -> int:
        return 1 if args.tiny else max(1, math.ceil(2 * l3 / smallest_block_bytes))

    header = ["dtype", "sparsity", "batch", "variant", "ms/layer", "dense ms", "speedup", "limit", "of limit"]
    regimes = ["streaming", "warm"] if args.regime == "both" else [args.regime]
    for regime in regimes:
        rows = []
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for sparsity in args.sparsities.split(","):
                sizes = {"block": ((256, 256), (512, 256), (256, 512)), "warm_shape": (256, 256), "calls": 1} \
                    if args.tiny else {}
                rows += run_cell(regime, dtype, sparsity, [int(b) for b in args.batches.split(",")],
                                 1 if args.tiny else args.rounds, blocks_for, auto=args.auto,
                                 quantized=args.quantized, isas=tuple(filter(None, args.isas.split(","))),
                                 **sizes)
                print(f"  done {regime} {dtype_name} {sparsity}", flush=True)
        what = ("tiny sizes: a check that everything runs, not a measurement" if args.tiny
                else "Llama-2-7B block shapes, weights > 2x L3" if regime == "streaming"
                else f"one {WARM_SHAPE[0]}x{WARM_SHAPE[1]} layer, warm")
        print(f"\n### {regime}: {what}\n")
        print(tabulate(rows, header, tablefmt="github"))


if __name__ == "__main__":
    main()
