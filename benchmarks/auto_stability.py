"""How repeatable ``lower(gm, "auto")``'s picks are on a machine whose load changes between runs.

Layers of Llama-2-7B's shapes (4096x4096 and 11008x4096, no bias, batch 1: the decode regime), pruned by
magnitude (50% unstructured, 2:4, 90%) in fp32 and bf16, each timed by ``auto`` exactly as ``lower`` does
(``resolve_layer`` on a ``LayerTimer``: the masked and fused forms and every format the layer takes, in
interleaved rounds, streaming from memory) in several trials, alternately on the quiet machine and beside
``--cotenants`` busy processes (one core each). From the same rounds of each trial, two rules pick a format:

* ``median``: each variant's median round (``auto``'s rule before this benchmark);
* ``fastest``: each variant's fastest round (the least disturbed one; ``auto``'s rule now).

A rule is stable when it picks the same format for a layer in every trial, quiet or loaded. The table gives,
per layer and rule, the picks over the trials and how many trials agree with the most common pick.

    python benchmarks/auto_stability.py                 # 6 trials (3 quiet, 3 loaded), about 5 minutes
    python benchmarks/auto_stability.py --trials 2 --cases fp32-50%   # quicker
"""

from __future__ import annotations

import argparse
import collections
import statistics
from pathlib import Path

import torch
from machine import describe, start_cotenants
from tabulate import tabulate
from torch import nn

import fx_sparsity
from fx_sparsity.lowering.autotune import choose_backend, resolve_layer
from fx_sparsity.lowering.backends import LayerRequest
from fx_sparsity.lowering.timing import LayerTimer, record_op_calls
from passes import get_sparse_target, native_isa

SHAPES = ((4096, 4096), (11008, 4096))
CASES = {
    "fp32-50%": (torch.float32, lambda: fx_sparsity.MagnitudeSparsifier(0.5)),
    "fp32-2:4": (torch.float32, lambda: fx_sparsity.NMSparsifier(2, 4)),
    "bf16-50%": (torch.bfloat16, lambda: fx_sparsity.MagnitudeSparsifier(0.5)),
    "bf16-90%": (torch.bfloat16, lambda: fx_sparsity.MagnitudeSparsifier(0.9)),
}


class RecordingTimer(LayerTimer):
    """A LayerTimer that keeps the rounds ``auto`` timed."""

    def samples(self, variants):
        self.recorded = super().samples(variants)
        return self.recorded


def prepared(shape: tuple[int, int], dtype: torch.dtype, make) -> tuple:
    """A bias-free Linear of ``shape`` (out, in), pruned; its prepared module, mask node's target and input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False)).to(dtype)
    sparsifier = make()
    gm = fx_sparsity.prepare(model, sparsifier=sparsifier)
    sparsifier.step()
    mul = next(n for n in gm.graph.nodes if get_sparse_target(n) is not None)
    return gm, get_sparse_target(mul), torch.randn(1, shape[1], dtype=dtype)


def picks(layer_inputs, repeats: int) -> dict[str, dict[str, str]]:
    """For each layer: the pick of each rule from one round of ``auto``'s timing."""
    out = {}
    for key, (gm, target, x) in layer_inputs.items():
        calls = record_op_calls(gm, (x,), {})
        layer = RecordingTimer(gm, target, calls[target.tensor_fqn], repeats, cold=True)
        resolve_layer(layer, LayerRequest("auto"), None, None, True)
        formats = [k for k in layer.recorded if k not in ("masked", "fuse")]
        out[key] = {}
        for rule, stat in (("median", statistics.median), ("fastest", min)):
            times = {k: stat(v) for k, v in layer.recorded.items()}
            out[key][rule] = choose_backend(times["fuse"], {k: times[k] for k in formats})[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6, help="trials, alternately quiet and loaded")
    parser.add_argument("--cotenants", type=int, default=1, help="busy processes in a loaded trial")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=7, help="auto's rounds per layer (lower's default)")
    args = parser.parse_args()
    print(f"{describe()}, kernels {native_isa()}, load average at start {Path('/proc/loadavg').read_text().split()[:3]}")
    layer_inputs = {}
    for case in args.cases.split(","):
        dtype, make = CASES[case]
        for shape in SHAPES:
            layer_inputs[f"{case} {shape[0]}x{shape[1]}"] = prepared(shape, dtype, make)
    history = collections.defaultdict(list)  # (layer, rule) -> [(loaded, pick)]
    for trial in range(args.trials):
        loaded = trial % 2 == 1
        spinners = start_cotenants(args.cotenants if loaded else 0)
        try:
            for key, rules in picks(layer_inputs, args.repeats).items():
                for rule, pick in rules.items():
                    history[key, rule].append((loaded, pick))
        finally:
            for p in spinners:
                p.terminate()
        print(f"  trial {trial + 1} ({'loaded' if loaded else 'quiet'}) done", flush=True)
    rows = []
    for (key, rule), seen in history.items():
        every = [p for _, p in seen]
        common, count = collections.Counter(every).most_common(1)[0]
        rows.append([key, rule, " ".join(p for loaded, p in seen if not loaded),
                     " ".join(p for loaded, p in seen if loaded), common, f"{count}/{len(every)}"])
    print(f"\n### auto's picks over {args.trials} trials (quiet / beside {args.cotenants} busy process(es))\n")
    print(tabulate(rows, ["layer", "rule", "quiet picks", "loaded picks", "most common", "agree"], tablefmt="github"))
    for rule in ("median", "fastest"):
        agree = [r[5] for r in rows if r[1] == rule]
        total = sum(int(a.split("/")[0]) for a in agree), sum(int(a.split("/")[1]) for a in agree)
        print(f"{rule}: {total[0]} of {total[1]} picks agree with their layer's most common pick")
    print(f"\nload average at end: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
