"""Bool masks against float masks (the weight's dtype, as masks were stored before): bytes and prepared-module time.

One ``nn.Linear(size, size)`` per dtype, pruned 50% by magnitude, prepared twice from the same weights: once as
``prepare`` makes it now (bool mask buffer), once with the mask buffer replaced by a float copy of the same values.
Reports the mask's bytes, the saved sizes of ``gm.state_dict()`` and ``sparsifier.state_dict()``, and the prepared
module's time per call (forward under ``no_grad``, and forward + backward as in fine-tuning with masks): medians of
``--rounds`` interleaved rounds in random order, the ratio measured side by side. Both forms compute the same
values bit for bit (checked here too); only the ``mul(weight, mask)`` differs in speed: a bool operand takes
ATen's mixed-dtype (casting) loop instead of the same-dtype vectorized one. Lowered and squashed modules have no
mask and are unaffected.

    python benchmarks/bool_masks.py                           # 4096x4096, fp32 and bf16, batch 16
    python benchmarks/bool_masks.py --size 256 --rounds 3     # a quick check that it runs
"""

from __future__ import annotations

import argparse
import copy
import io
import random
import statistics
import time
from pathlib import Path

import torch
from machine import describe
from tabulate import tabulate
from torch import nn

from fx_sparsity import MagnitudeSparsifier, get_sparsifier, prepare

MiB = 1 << 20


def saved_bytes(obj: object) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def pair(size: int, dtype: torch.dtype):
    """(bool-mask module, float-mask module), same weights (separate copies) and mask values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(size, size)).to(dtype)
    new = prepare(model, sparsifier=MagnitudeSparsifier(0.5))
    get_sparsifier(new).step()
    old = prepare(copy.deepcopy(model), sparsifier=MagnitudeSparsifier(0.5))
    old.get_submodule("0").register_buffer("weight_mask", new.get_buffer("0.weight_mask").to(dtype))
    return new, old


def round_robin(fns: dict[str, object], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, in interleaved rounds of random order (after one warm-up call)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(fns.items())
        rng.shuffle(order)
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def forward(gm: nn.Module, x: torch.Tensor):
    def run() -> None:
        with torch.no_grad():
            gm(x)
    return run


def train_step(gm: nn.Module, x: torch.Tensor):
    def run() -> None:
        gm(x).sum().backward()
        for p in gm.parameters():
            p.grad = None
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    print(f"{describe()}, load average at start {Path('/proc/loadavg').read_text().split()[:3]}\n")
    byte_rows, time_rows = [], []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        new, old = pair(args.size, dtype)
        x = torch.randn(args.batch, args.size, dtype=dtype)
        if not torch.equal(new(x), old(x)):
            raise RuntimeError(f"{name}: bool and float masks give different outputs")
        new_mask, old_mask = new.get_buffer("0.weight_mask"), old.get_buffer("0.weight_mask")
        weight_mib = new.get_parameter("0.weight").nbytes / MiB
        byte_rows.append([
            f"{args.size}x{args.size} {name}", f"{weight_mib:.1f}",
            f"{old_mask.nbytes / MiB:.1f} -> {new_mask.nbytes / MiB:.1f}",
            f"{saved_bytes(old.state_dict()) / MiB:.1f} -> {saved_bytes(new.state_dict()) / MiB:.1f}",
            f"{saved_bytes(get_sparsifier(old).state_dict()) / MiB:.1f} -> "
            f"{saved_bytes(get_sparsifier(new).state_dict()) / MiB:.1f}",
        ])
        t = round_robin({
            "fwd bool": forward(new, x), "fwd float": forward(old, x),
            "step bool": train_step(new, x), "step float": train_step(old, x),
        }, args.rounds)
        time_rows.append([
            name, f"{t['fwd float'] * 1e3:.2f}", f"{t['fwd bool'] * 1e3:.2f}", f"{t['fwd bool'] / t['fwd float']:.2f}x",
            f"{t['step float'] * 1e3:.2f}", f"{t['step bool'] * 1e3:.2f}", f"{t['step bool'] / t['step float']:.2f}x",
        ])
    print("## Mask bytes: float (before) -> bool (now), MiB\n")
    print(tabulate(byte_rows, headers=["weight", "weight MiB", "mask buffer", "gm.state_dict() saved",
                                       "sparsifier.state_dict() saved"], tablefmt="github"), "\n")
    print(f"## Prepared module, batch {args.batch}: ms per call, medians of {args.rounds} interleaved rounds\n")
    print(tabulate(time_rows, headers=["dtype", "forward float", "forward bool", "bool / float",
                                       "fwd+bwd float", "fwd+bwd bool", "bool / float"], tablefmt="github"))


if __name__ == "__main__":
    main()
