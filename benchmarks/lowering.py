"""Lowered forms of a sparse 4096x4096 fp32 Linear, side by side against dense, in one run.

For each sparsity case (unstructured 50/90/95/99% and 90% in 32x32 blocks) and
batch (1/16/256) it times, round-robin so that drift on a shared machine hits
every variant alike:

* dense: ``nn.Linear`` with the original weight;
* prepared: ``fx_sparsity.prepare`` (``mul(weight, mask)`` then linear);
* torch.ao: ``torch.ao.pruning``'s parametrized Linear with the same mask;
* fused / bitmask / csr / bsr / auto: ``fx_sparsity.lower`` with that backend
  (bitmask and csr run our C++ kernels, csr with int16 column indices; bsr is
  torch.sparse on MKL with 32x32 blocks, for the block case only; auto tuned on
  that batch).

This is the single-layer view: the mask overhead of the prepared (fine-tuning)
module against torch.ao's parametrization, bsr, 95/99% and batch 256, which
``benchmarks/sparse_kernels.py`` (the Llama-shape streaming and warm regimes of our
kernels, bf16 included) does not cover. Speedups are dense time / variant time,
medians of ``--repeats`` rounds; by default a buffer twice the last-level cache
(read from sysfs) is written before every timed call, so each variant reads its
weights from memory (``--warm`` keeps the caches). At batch 1 a linear layer is
bound by memory traffic, so the best a sparse form can do is dense bytes /
sparse bytes: the ``of limit`` column gives the measured speedup of the best
sparse format as a fraction of that. Every lowered output is checked against the
prepared module's.

    python benchmarks/lowering.py                 # Markdown tables, about 10 minutes
    python benchmarks/lowering.py --size 1024     # quicker, smaller layer
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch
from machine import describe
from tabulate import tabulate
from torch import nn
from torch.ao.pruning import WeightNormSparsifier as AOWeightNorm

import fx_sparsity
from fx_sparsity import WeightNormSparsifier, get_lowering, get_sparsifier, prepare
from fx_sparsity.lowering import lower
from fx_sparsity.lowering.timing import last_level_cache_bytes
from passes import native_isa

CASES = [  # (label, sparsity_level, sparse_block_shape)
    ("50%", 0.5, (1, 1)),
    ("90%", 0.9, (1, 1)),
    ("95%", 0.95, (1, 1)),
    ("99%", 0.99, (1, 1)),
    ("90% 32x32", 0.9, (32, 32)),
]
BATCHES = (1, 16, 256)


def _round_robin(fns: dict[str, object], repeats: int, cold: bool) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds.

    Each round runs the functions in a new random order: the call right after a
    dense 4096x4096 matmul runs measurably slower, whatever it is, so a fixed
    order would favour whichever variant comes later.

    With ``cold``, a buffer twice the last-level cache is written before every
    timed call, so each variant reads its weights from memory, as a layer of a
    large model does, instead of from a cache its own previous call warmed.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    flush = torch.empty(2 * last_level_cache_bytes() // 4 if cold else 0)
    with torch.no_grad():
        for fn in fns.values():
            fn()
        rng = random.Random(0)
        for _ in range(repeats):
            order = list(fns.items())
            rng.shuffle(order)
            for name, fn in order:
                if cold:
                    flush.fill_(1.0)
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def weight_bytes(module: nn.Module) -> int:
    """Bytes of everything the module stores for its weights (biases excluded)."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    return sum(t.nbytes for name, t in tensors.items() if not name.endswith("bias"))


def run_case(size: int, level: float, block: tuple[int, int], repeats: int, cold: bool) -> tuple[list, dict]:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(size, size))
    gm = prepare(dense, sparsifier=WeightNormSparsifier(sparsity_level=level, sparse_block_shape=block))
    get_sparsifier(gm).step()
    mask = gm.get_buffer("0.weight_mask")

    ao_model = nn.Sequential(nn.Linear(size, size))
    ao_model.load_state_dict(dense.state_dict())
    ao = AOWeightNorm(sparsity_level=level, sparse_block_shape=block)
    ao.prepare(ao_model, [{"tensor_fqn": "0.weight"}])
    ao_model[0].parametrizations.weight[0].mask.copy_(mask.bool())

    lowered = {"fused": lower(gm, "fuse"), "bitmask": lower(gm, "bitmask"), "csr": lower(gm, "csr")}
    if block != (1, 1):
        lowered["bsr"] = lower(gm, "bsr")
    bytes_row = {"dense": weight_bytes(dense), "prepared": weight_bytes(gm)}
    bytes_row.update({name: weight_bytes(m) for name, m in lowered.items()})

    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, size)
        auto = lower(gm, "auto", example_inputs=(x,), progress_bar=False)
        reference = gm(x)
        for name, module in [*lowered.items(), ("auto", auto)]:
            torch.testing.assert_close(module(x), reference, rtol=1e-4, atol=1e-4, msg=f"{name} differs")
        fns = {"dense": lambda: dense(x), "prepared": lambda: gm(x), "torch.ao": lambda: ao_model(x)}
        fns.update({name: (lambda m=m: m(x)) for name, m in lowered.items()})
        fns["auto"] = lambda: auto(x)
        seconds = _round_robin(fns, repeats, cold)
        speedup = {name: seconds["dense"] / s for name, s in seconds.items()}
        best_sparse = max((n for n in lowered if n != "fused"), key=lambda n: speedup[n])
        limit = bytes_row["dense"] / bytes_row[best_sparse]
        rows.append([
            batch,
            f"{1e3 * seconds['dense']:.2f}",
            *(f"{speedup[n]:.2f}x" for n in ("prepared", "torch.ao", "fused", "bitmask", "csr")),
            f"{speedup['bsr']:.2f}x" if "bsr" in speedup else "-",
            f"{speedup['auto']:.2f}x ({get_lowering(auto)[0].backend})",
            f"{speedup[best_sparse] / limit:.0%} ({best_sparse})" if batch == 1 else "",
        ])
    return rows, bytes_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--warm", action="store_true", help="do not flush the caches before each timed call")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"# Lowering benchmark: {args.size}x{args.size} fp32 Linear with bias")
    print(f"{describe()}, kernels {native_isa()}, "
          f"fx_sparsity {fx_sparsity.__version__}, medians of {args.repeats} rounds in random order, "
          f"{'warm caches' if args.warm else 'a 2x L3 buffer written before each call'}\n")
    headers = ["batch", "dense ms", "prepared", "torch.ao", "fused", "bitmask", "csr", "bsr", "auto (pick)",
               "of limit (best)"]
    byte_rows = []
    for label, level, block in CASES:
        rows, bytes_row = run_case(args.size, level, block, args.repeats, not args.warm)
        print(f"## {label} sparsity (speedup vs dense)\n")
        print(tabulate(rows, headers=headers, tablefmt="github"), "\n")
        dense_bytes = bytes_row["dense"]
        byte_rows.append([label] + [
            f"{bytes_row[n] / dense_bytes:.3f}" if n in bytes_row else "-"
            for n in ("prepared", "fused", "bitmask", "csr", "bsr")
        ])
    print("## Weight bytes per backend (fraction of dense; prepared holds weight + mask)\n")
    print(tabulate(byte_rows, headers=["case", "prepared", "fused", "bitmask", "csr", "bsr"], tablefmt="github"))


if __name__ == "__main__":
    main()
