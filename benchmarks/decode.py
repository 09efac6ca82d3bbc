"""End to end: decode of a Llama-style transformers model, dense vs pruned and lowered with auto.

A ``LlamaForCausalLM`` built from a config (random weights: nothing is downloaded) with Llama-2-7B's
layer proportions at a smaller width: hidden 2048, MLP 5504, 4 layers, 16 heads, a 4096-token
vocabulary (the head is about 4% of the weights, as in a 7B model where it is 2%). Its decoder
Linears are pruned one-shot (``MagnitudeSparsifier(0.5)`` or ``NMSparsifier(2, 4)``; quality is not
the point here, see ``benchmarks/quality.py``), then ``fx_sparsity.lower(gm, "auto")`` picks each
layer's format on its own one-token input (the decode regime) at each ``--batches`` size. ``50% + int8``
also rounds the masked weights to int8 (one scale per output row, ``quantize(gm, "int8",
method="rtn")``), so ``auto`` chooses among the int8 layouts (``bitmask-int8``, ``nm-int8``,
``csr-int8``, ``dense-int8``) and the float ones. Two measurements:

* **KV-cache decode** (the table to read): a greedy decode with transformers' ``DynamicCache`` --
  a prompt of ``--prompt`` tokens (prefill), then ``--new-tokens`` one-token steps, each attending
  over the cache. The HF model runs eagerly: ``fx_sparsity.sparsify_model`` gives a
  ``LlamaForCausalLM`` whose decoder Linears are ``SparseLinear`` modules holding the packed buffers
  of the format ``auto`` chose for that layer (the per-layer choices of the lowered graph, passed
  back as a per-layer config; ``fuse``: the Linear with the masked dense weight), calling the same
  ``torch.ops.fx_sparsity`` operator as the lowered graph. The dense baseline is the unpruned model.
  tokens/s = batch x new tokens / decode time (the prefill is reported apart; ms/step is one step
  of the whole batch).
* **one-token forward** of the export-captured graphs without a cache (``lower(gm, "auto")`` against
  ``lower(gm, "fuse")`` with all-ones masks): the lowered program itself, as ``torch.export`` ships it.

The decoder's weights (800 MB fp32) are far beyond the last-level cache, so every step streams them
from memory. Variants are timed in interleaved rounds in a new random order each time; medians.
Outputs are checked against the eager model with masked weights first (logits of the prefill and of
a cached step, and the one-token forward).

    python benchmarks/decode.py                 # fp32 and bf16, batches 1 and 4, about 30 minutes on 2 cores
    python benchmarks/decode.py --rounds 3 --new-tokens 16 --dtypes bfloat16   # quicker
    python benchmarks/decode.py --hidden 128 --intermediate 256 --layers 1 --rounds 1 --forward-rounds 1 \
        --prompt 4 --new-tokens 2 --vocab 256                                   # does it run (seconds)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from machine import describe
from tabulate import tabulate
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import fx_sparsity
from fx_sparsity.deploy import SparseLinear
from fx_sparsity.quantization import quantize
from passes import native_isa


def build(dtype: torch.dtype, args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab, use_cache=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def pruned_variants(model, sparsifier, ids: torch.Tensor, quantization: str | None = None):
    """(lowered graph, the model's class with sparse modules, masked eager reference, backends picked).

    ``quantization``: also round the masked weights to that grid (``quantize(..., method="rtn")``), so that
    ``auto`` times the quantized layouts of each weight beside the float ones.
    """
    gm = fx_sparsity.prepare(model, ["model.layers.*"], sparsifier=sparsifier, example_inputs=(ids,))
    sparsifier.step()
    if quantization is not None:
        quantize(gm, quantization, method="rtn", progress_bar=False)
    reference = fx_sparsity.to_model(gm)  # the masked weights, dense, in the model's class
    lowered = fx_sparsity.lower(gm, "auto", example_inputs=(ids,), progress_bar=False)
    # The formats auto chose for the lowered graph, per layer, so that both variants run the same kernels.
    choices = [{"tensor_fqn": r.tensor_fqn, "backend": r.backend, **({"blocksize": r.blocksize} if r.blocksize else {})}
               for r in fx_sparsity.get_lowering(lowered)]
    sparse = fx_sparsity.sparsify_model(gm, choices, example_inputs=(ids,), progress_bar=False)
    picks = [r.backend for r in fx_sparsity.get_lowering(lowered)]
    swapped = sum(isinstance(m, SparseLinear) for m in sparse.modules())
    if swapped != len(picks) - picks.count("fuse"):
        raise RuntimeError(f"sparsify_model swapped {swapped} layers, lower packed {len(picks) - picks.count('fuse')}")
    return lowered, sparse, reference, {p: picks.count(p) for p in dict.fromkeys(picks)}


def decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """Greedy decode with a KV cache: (prefill seconds, seconds of the ``new_tokens`` one-token steps, tokens)."""
    cache = DynamicCache()
    start = time.perf_counter()
    logits = model(prompt, cache=cache, use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    prefill = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        tokens.append(token)
    return prefill, time.perf_counter() - start, torch.cat(tokens, 1)


def check(candidate, reference, prompt: torch.Tensor, tol: float) -> None:
    """Logits of the prefill and of one cached step, candidate against reference (same tokens fed to both)."""
    caches = DynamicCache(), DynamicCache()
    outs = [m(prompt, cache=c, use_cache=True).logits for m, c in zip((candidate, reference), caches)]
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
    token = outs[1][:, -1:].argmax(-1)
    outs = [m(token, cache=c, use_cache=True).logits for m, c in zip((candidate, reference), caches)]
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)


def interleaved(fns: dict, rounds: int) -> dict[str, list]:
    """Each function's results over ``rounds`` rounds, run in a new random order each round (after one warm-up)."""
    results = {name: [] for name in fns}
    order = list(fns)
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            results[name].append(fns[name]())
    return results


def timed(fn):
    def run():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5, help="KV-cache decodes per variant")
    parser.add_argument("--forward-rounds", type=int, default=15, help="one-token forwards per variant")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,4", help="sequences decoded together (auto picks per batch)")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                        help="also 50%% unstructured with int8 values (round to nearest, per output row)")
    args = parser.parse_args()
    print(f"{describe()}, kernels {native_isa()}, load average at start {Path('/proc/loadavg').read_text().split()[:3]}")
    decode_rows, forward_rows = [], []
    cells = [(d, int(b)) for d in args.dtypes.split(",") for b in args.batches.split(",")]
    for dtype_name, batch in cells:
        dtype = getattr(torch, dtype_name)
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        model = build(dtype, args)
        ids = torch.randint(0, args.vocab, (batch, 1))
        prompt = torch.randint(0, args.vocab, (batch, args.prompt))
        eager = {"dense": model}
        graphs, picks = {}, {"dense": {"fuse": 7 * args.layers}}
        dense_gm = fx_sparsity.prepare(model, ["model.layers.*"], sparsifier=fx_sparsity.MagnitudeSparsifier(0.0),
                                       example_inputs=(ids,))
        graphs["dense"] = fx_sparsity.lower(dense_gm, "fuse")
        variants = [
            ("50% unstructured, auto", fx_sparsity.MagnitudeSparsifier(0.5), None),
            ("2:4, auto", fx_sparsity.NMSparsifier(2, 4), None),
        ]
        if args.int8:
            variants.append(("50% + int8, auto", fx_sparsity.MagnitudeSparsifier(0.5), "int8"))
        for name, sparsifier, quantization in variants:
            lowered, sparse, reference, picks[name] = pruned_variants(model, sparsifier, ids, quantization)
            # bf16 with int8 values: the reference holds the dequantized weights rounded to bf16, the kernels use
            # them exactly (scale x code in fp32), so the logits differ by that rounding too
            vtol = 1e-1 if quantization and dtype == torch.bfloat16 else tol
            with torch.no_grad():
                torch.testing.assert_close(lowered(ids).logits, reference(ids).logits, rtol=vtol, atol=vtol)
                check(sparse, reference, prompt, vtol)
            graphs[name], eager[name] = lowered, sparse
            print(f"  {dtype_name} batch {batch} {name}: {picks[name]}", flush=True)
        with torch.no_grad():
            runs = interleaved({n: (lambda m=m: decode(m, prompt, args.new_tokens)) for n, m in eager.items()},
                               args.rounds)
            steps = interleaved({n: timed(lambda g=g: g(ids)) for n, g in graphs.items()}, args.forward_rounds)
        dense_decode = statistics.median(r[1] for r in runs["dense"])
        dense_step = statistics.median(steps["dense"])
        for name, r in runs.items():
            prefill, seconds = statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)
            per_backend = ", ".join(f"{k} {v}" for k, v in picks[name].items())
            decode_rows.append([dtype_name, batch, name, f"{prefill * 1e3:.0f}", f"{seconds / args.new_tokens * 1e3:.1f}",
                                f"{batch * args.new_tokens / seconds:.1f}", f"{dense_decode / seconds:.2f}x", per_backend])
            step = statistics.median(steps[name])
            forward_rows.append([dtype_name, batch, name, f"{step * 1e3:.1f}", f"{batch / step:.1f}", f"{dense_step / step:.2f}x",
                                 per_backend])
        print(tabulate(decode_rows[-len(runs):], tablefmt="github"), flush=True)  # this cell, before the tables
    print(f"\n### KV-cache decode: prompt {args.prompt}, {args.new_tokens} new tokens, greedy\n")
    print(tabulate(decode_rows, ["dtype", "batch", "model", "prefill ms", "ms/step", "tokens/s", "vs dense",
                                 "layers per backend"], tablefmt="github"))
    print("\n### one-token forward of the lowered graph, no KV cache\n")
    print(tabulate(forward_rows, ["dtype", "batch", "model", "ms/step", "tokens/s", "vs dense", "layers per backend"],
                   tablefmt="github"))
    print(f"\nload average at end: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
