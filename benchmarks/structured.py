"""Structured pruning: parameters, MACs and CPU latency (batch 1) of shrunk torchvision models.

For each model and channel ratio, fx_sparsity's ``ChannelPruner`` (L1 saliency over
whole groups, consumer columns masked so the shrunk module equals the masked one) +
``shrink`` is compared with the dense model and, where ``torch-pruning`` imports,
with Torch-Pruning's ``MetaPruner`` (``GroupMagnitudeImportance(p=1)``, the final
classifier ignored so both keep the output shape) at the same ratio. MACs are
counted the same way for all three (Linear/Conv multiply-accumulates, from
:func:`passes.count_macs`) and also by Torch-Pruning's own ``count_ops_and_params``.
Latency: median over interleaved rounds in random order, ``inference_mode``,
batch 1, random init (no weights downloaded). Both pruned models are checked to
``torch.export``.

    python benchmarks/structured.py [--rounds 30] [--size 224]
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import time

import torch
from tabulate import tabulate
from torch import nn
from torchvision import models

from fx_sparsity.sparsifier.structured import ChannelPruner
from fx_sparsity.structured import shrink, shrink_report
from passes import capture, count_macs

try:
    import torch_pruning as tp
except ImportError:  # the comparison column is left out
    tp = None


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ours(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    pruner = ChannelPruner(sparsity_level=ratio, criterion="l1", mask_consumers=True)
    gm = pruner.prepare(model, example_inputs=x)
    pruner.step()
    return shrink(gm)


def _torch_pruning(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    model = copy.deepcopy(model)
    last = model.fc if hasattr(model, "fc") else model.classifier[-1]
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=ratio, ignored_layers=[last]
    )
    pruner.step()
    return model


def _latency(candidates: dict[str, nn.Module], x: torch.Tensor, rounds: int, inner: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for module in candidates.values():
            for _ in range(3):
                module(x)
        for _ in range(rounds):
            order = list(candidates)
            random.shuffle(order)
            for name in order:
                start = time.perf_counter()
                for _ in range(inner):
                    candidates[name](x)
                times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def _exports(module: nn.Module, x: torch.Tensor) -> bool:
    try:
        torch.export.export(module, (x,))
    except Exception:  # noqa: BLE001 - the table says whether it exported
        return False
    return True


def run(size: int, rounds: int, inner: int) -> list[list[object]]:
    rows = []
    x = torch.randn(1, 3, size, size)
    for name in ("resnet18", "mobilenet_v3_small"):
        torch.manual_seed(0)
        dense = getattr(models, name)().eval()
        dense_macs = count_macs(capture(dense), x)
        for ratio in (0.3, 0.5):
            candidates = {"dense": dense, "fx_sparsity": _ours(dense, x, ratio)}
            if tp is not None:
                candidates["torch-pruning"] = _torch_pruning(dense, x, ratio).eval()
            latency = _latency(candidates, x, rounds, inner)
            report = shrink_report(candidates["fx_sparsity"])
            for label, module in candidates.items():
                if label == "dense" and ratio != 0.3:
                    continue
                macs = count_macs(module if label == "fx_sparsity" else capture(module), x)
                tp_macs = tp.utils.count_ops_and_params(module, x)[0] if tp is not None else float("nan")
                rows.append([
                    name, "-" if label == "dense" else ratio, label, f"{_params(module) / 1e6:.3f}",
                    f"{macs / 1e6:.1f}", f"{tp_macs / 1e6:.1f}", f"{dense_macs / macs:.2f}x",
                    f"{latency[label] * 1e3:.2f}", f"{latency['dense'] / latency[label]:.2f}x",
                    "yes" if label == "dense" else _exports(module, x),
                    "" if label != "fx_sparsity" else ("exact" if report.exact else "inexact"),
                ])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, torch-pruning {getattr(tp, '__version__', 'not installed')}, "
          f"{platform.processor() or platform.machine()}, threads {torch.get_num_threads()}, "
          f"input 1x3x{args.size}x{args.size}")
    headers = ["model", "ratio", "method", "params (M)", "MACs (M, ours)", "MACs (M, TP count)", "MACs reduction",
               "latency (ms)", "speedup", "exports", "shrunk == masked"]
    print(tabulate(run(args.size, args.rounds, args.inner), headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
