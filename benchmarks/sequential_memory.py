"""Peak memory of pruning a model larger than a memory budget, block by block from a safetensors file.

A byte-level GPT (``benchmarks/quality.py``'s ``TinyGPT``, ``--d`` wide, ``--layers``
blocks; random weights: memory does not depend on them) is saved to a safetensors
file. Then, each in a fresh process, the model is pruned with Wanda 50% by
``prune_sequential``:

* streamed: built on the meta device, ``prepare_on_meta``, weights read per block
  from the file by ``SafetensorsWeights`` and the pruned checkpoint written to a
  directory; run twice: with glibc malloc's defaults, and with
  ``MALLOC_MMAP_THRESHOLD_=1048576`` (glibc otherwise raises its mmap threshold
  after the first large free and serves later blocks from a heap that fragments);
* in memory: built on the CPU with the file's weights, ``prepare``, ``prune_sequential``.

Each process reads its peak resident memory (``ru_maxrss``) right after its imports
(the baseline: torch alone) and at the end; the table gives the growth over the
baseline against the weights' size and the budget. Memory is not timing: a busy
machine does not change it.

    PYTHONPATH=. python benchmarks/sequential_memory.py              # 16 blocks of d=1024: 775 MiB of weights
    PYTHONPATH=. python benchmarks/sequential_memory.py --d 256 --layers 2 --budget-mib 64   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from machine import describe


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _model(args: argparse.Namespace, device: str):
    from benchmarks.quality import TinyGPT

    with torch.device(device):
        torch.manual_seed(0)
        return TinyGPT(args.d, args.layers, 4, args.context).eval()


def _batches(args: argparse.Namespace) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (1, args.context), generator=generator) for _ in range(args.batches)]


def write(args: argparse.Namespace) -> dict:
    from safetensors.torch import save_file

    model = _model(args, "cpu")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(args.dir) / "model.safetensors"))
    return {"weights_mib": sum(v.nbytes for v in state.values()) / 2**20, "tensors": len(state)}


def streamed(args: argparse.Namespace) -> dict:
    from fx_sparsity import WandaSparsifier
    from fx_sparsity.calibration import SafetensorsWeights, prepare_on_meta, prune_sequential

    base = _rss_mib()
    gm = prepare_on_meta(_model(args, "meta"), sparsifier=WandaSparsifier(0.5))
    batches = _batches(args)
    weights = SafetensorsWeights(Path(args.dir) / "model.safetensors", Path(args.dir) / "pruned")
    report = prune_sequential(gm, batches, blocks=["blocks.*"], weights=weights, progress_bar=False)
    return {"base_mib": base, "peak_mib": _rss_mib(), "report_peak_mib": report.peak_bytes / 2**20}


def in_memory(args: argparse.Namespace) -> dict:
    from safetensors.torch import load_file

    from fx_sparsity import WandaSparsifier, prepare
    from fx_sparsity.calibration import prune_sequential

    base = _rss_mib()
    model = _model(args, "cpu")
    model.load_state_dict(load_file(str(Path(args.dir) / "model.safetensors")))
    gm = prepare(model, sparsifier=WandaSparsifier(0.5))
    report = prune_sequential(gm, _batches(args), blocks=["blocks.*"], progress_bar=False)
    return {"base_mib": base, "peak_mib": _rss_mib(), "report_peak_mib": report.peak_bytes / 2**20}


def _child(args: argparse.Namespace, phase: str, env: dict[str, str] | None = None) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--dir", args.dir]
    command += [f"--{k}={getattr(args, k)}" for k in ("d", "layers", "context", "batches")]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4, help="calibration batches of one --context window")
    parser.add_argument("--budget-mib", type=float, default=256.0, help="memory budget above the baseline (torch imported)")
    parser.add_argument("--phase", choices=["write", "streamed", "in_memory"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps({"write": write, "streamed": streamed, "in_memory": in_memory}[args.phase](args)))
        return
    with tempfile.TemporaryDirectory(prefix="fx_sparsity_seqmem_") as directory:
        args.dir = directory
        written = _child(args, "write")
        runs = {
            "streamed (glibc defaults)": _child(args, "streamed"),
            "streamed (MALLOC_MMAP_THRESHOLD_=1048576)": _child(args, "streamed", {"MALLOC_MMAP_THRESHOLD_": "1048576"}),
            "in memory": _child(args, "in_memory"),
        }
    print(f"{args.layers} blocks, d={args.d}: {written['weights_mib']:.0f} MiB of fp32 weights in {written['tensors']} "
          f"tensors; Wanda 50%, {args.batches} x {args.context} calibration tokens; budget {args.budget_mib:.0f} MiB "
          f"above the baseline (the process's peak after importing torch). {describe()}.\n")
    print("| run | baseline RSS (MiB) | peak RSS (MiB) | growth (MiB) | within budget | largest stage by report (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        growth = r["peak_mib"] - r["base_mib"]
        print(f"| {name} | {r['base_mib']:.0f} | {r['peak_mib']:.0f} | {growth:.0f} | "
              f"{'yes' if growth <= args.budget_mib else 'no'} | {r['report_peak_mib']:.1f} |")


if __name__ == "__main__":
    main()
