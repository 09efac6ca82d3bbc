"""Mask computation time: fx_sparsity's WeightNormSparsifier vs torch.ao.pruning's, same weights.

Times one ``step()`` from all-ones masks (the dense-weight case), median of
``--repeats`` runs, for several random weights. A row says whether the k-th
smallest score is tied with another score: then both libraries must let
``topk`` pick among the tied values, and fx_sparsity falls back to it to stay
bit-identical. Every row checks the two masks are equal.

    python benchmarks/mask_computation.py            # prints a Markdown table
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from machine import describe
from tabulate import tabulate
from torch import nn
from torch.ao.pruning import WeightNormSparsifier as AOWeightNorm

from fx_sparsity import WeightNormSparsifier, prepare

CASES = [  # (sparsity_level, block, zeros_per_block, seeds)
    (0.5, (1, 1), None, (0, 1, 2, 3, 4)),
    (0.9, (1, 1), None, (0, 1, 2)),
    (0.5, (1, 4), None, (0,)),
    (0.9, (32, 32), None, (0,)),
    (1.0, (1, 4), 2, (0,)),
]


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _boundary_tied(weight: torch.Tensor, level: float, block: tuple[int, int]) -> bool:
    if block != (1, 1):
        return False
    scores = (weight * weight).flatten()
    k = max(0, min(scores.numel() - 1, round(level * scores.numel())))
    kth = torch.kthvalue(scores, k).values
    return int(torch.count_nonzero(scores == kth)) > 1


def run(size: int, repeats: int) -> list[list[object]]:
    rows = []
    for level, block, zeros, seeds in CASES:
        for seed in seeds:
            torch.manual_seed(seed)
            weight = torch.randn(size, size)
            ao_model = nn.Sequential(nn.Linear(size, size, bias=False))
            ao_model[0].weight = nn.Parameter(weight.clone())
            ao = AOWeightNorm(level, block, zeros)
            ao.prepare(ao_model, None)
            ao_mask = ao_model[0].parametrizations.weight[0]

            def ao_step():
                ao_mask.mask = torch.ones(size, size)
                ao.step()

            ours_model = nn.Sequential(nn.Linear(size, size, bias=False))
            ours_model[0].weight = nn.Parameter(weight.clone())
            ours = WeightNormSparsifier(level, block, zeros)
            gm = prepare(ours_model, sparsifier=ours)
            mask = gm.get_buffer("0.weight_mask")

            def ours_step():
                mask.fill_(1)
                ours.step()

            t_ao, t_ours = _time(ao_step, repeats), _time(ours_step, repeats)
            equal = torch.equal(ao_mask.mask.bool(), mask)
            rows.append([
                f"{level}", f"{block[0]}x{block[1]}", "all" if zeros is None else zeros, seed,
                "yes" if _boundary_tied(weight, level, block) else "no",
                f"{t_ao * 1e3:.0f}", f"{t_ours * 1e3:.0f}", f"{t_ao / t_ours:.1f}x", "yes" if equal else "NO",
            ])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.size}x{args.size} fp32, {describe()}, median of {args.repeats}\n")
    headers = ["level", "block", "zeros/block", "seed", "tie at k-th score", "torch.ao ms", "fx_sparsity ms",
               "speedup", "masks equal"]
    print(tabulate(run(args.size, args.repeats), headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
