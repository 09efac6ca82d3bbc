"""End to end: one-token decode steps of a Llama-style transformers model, dense vs pruned and lowered with auto.

A ``LlamaForCausalLM`` built from a config (random weights: nothing is downloaded) with Llama-2-7B's
layer proportions at a smaller width: hidden 2048, MLP 5504, 4 layers, 16 heads, a 4096-token
vocabulary (the head is about 4% of the weights, as in a 7B model where it is 2%). Its decoder
Linears are pruned one-shot (``MagnitudeSparsifier(0.5)`` or ``NMSparsifier(2, 4)``; quality is not
the point here, see ``benchmarks/quality.py``), then ``fx_sparsity.lower(gm, "auto")`` picks each
layer's format on its own input. The dense baseline is the same capture lowered with ``"fuse"`` and
all-ones masks, so both run the same graph but for the layers.

A decode step is one forward of batch 1 and sequence length 1 without a KV cache: at short context a
decode step costs the reading of every weight once, which is what this measures; attention over a
long cache is not included. The decoder's weights (800 MB fp32) are far beyond the last-level cache,
so every step streams them from memory. Steps of the variants are timed in interleaved rounds in a
new random order each time; tokens/s = 1 / median step time. Outputs are checked against the eager
model with masked weights first.

    python benchmarks/decode.py                 # fp32 and bf16, about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate
from transformers import LlamaConfig, LlamaForCausalLM

import fx_sparsity
from fx_sparsity.layer_timing import last_level_cache_bytes
from passes import native_isa


def build(dtype: torch.dtype, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5504, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=4096, use_cache=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def lowered_variant(model, sparsifier, backend: str, ids: torch.Tensor):
    """(lowered module, masked eager reference, backends picked) for ``model`` pruned by ``sparsifier``."""
    gm = fx_sparsity.prepare(model, ["model.layers.*"], sparsifier=sparsifier, example_inputs=(ids,))
    sparsifier.step()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for record in sparsifier.records:
            reference.get_parameter(record.tensor_fqn).mul_(gm.get_buffer(f"{record.tensor_fqn}_mask"))
    lowered = fx_sparsity.lower(gm, backend, example_inputs=(ids,), progress_bar=False)
    picks = [r.backend for r in fx_sparsity.get_lowering(lowered)]
    return lowered, reference, {p: picks.count(p) for p in dict.fromkeys(picks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"CPU kernels: {native_isa()}, L3: {last_level_cache_bytes() >> 20} MiB, threads: {torch.get_num_threads()}, "
          f"torch {torch.__version__}, load average at start: {Path('/proc/loadavg').read_text().split()[:3]}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = build(dtype, args.layers)
        ids = torch.randint(0, 4096, (1, 1))
        variants, picks = {}, {}
        for name, sparsifier, backend in (
            ("dense", fx_sparsity.MagnitudeSparsifier(0.0), "fuse"),
            ("50% unstructured, auto", fx_sparsity.MagnitudeSparsifier(0.5), "auto"),
            ("2:4, auto", fx_sparsity.NMSparsifier(2, 4), "auto"),
        ):
            lowered, reference, picks[name] = lowered_variant(model, sparsifier, backend, ids)
            with torch.no_grad():
                tol = 1e-3 if dtype == torch.float32 else 5e-2
                torch.testing.assert_close(lowered(ids).logits, reference(ids).logits, rtol=tol, atol=tol)
            variants[name] = lowered
            print(f"  {dtype_name} {name}: {picks[name]}", flush=True)
        samples = {name: [] for name in variants}
        order = list(variants)
        with torch.no_grad():
            for module in variants.values():
                module(ids)
            for _ in range(args.rounds):
                random.shuffle(order)
                for name in order:
                    start = time.perf_counter()
                    variants[name](ids)
                    samples[name].append(time.perf_counter() - start)
        dense = statistics.median(samples["dense"])
        for name, s in samples.items():
            step = statistics.median(s)
            rows.append([dtype_name, name, f"{step * 1e3:.1f}", f"{1 / step:.1f}", f"{dense / step:.2f}x",
                         ", ".join(f"{k} {v}" for k, v in picks[name].items())])
    print()
    print(tabulate(rows, ["dtype", "model", "ms/token", "tokens/s", "vs dense", "layers per backend"],
                   tablefmt="github"))
    print(f"\nload average at end: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
