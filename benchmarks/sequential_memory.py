"""Peak memory of pruning a model larger than a memory budget, block by block from a safetensors file.

``--model gpt`` (the default): a byte-level GPT (``benchmarks/quality.py``'s ``TinyGPT``,
``--d`` wide, ``--layers`` blocks) is saved to a safetensors file. ``--model llama``: a
transformers ``LlamaForCausalLM`` from a config (hidden ``--d``, ``--layers`` decoder
layers, ``--d // 64`` heads and a quarter as many KV heads, MLP ``8/3 * d``, vocabulary
``--vocab``) is saved with ``save_pretrained``. Random weights: memory does not depend on
them. Then, each in a fresh process, the model is pruned (``--sparsifier``, Wanda 50% by
default; SparseGPT adds one Hessian per layer) by ``prune_sequential``:

* streamed: built on the meta device, ``prepare_on_meta`` (the Llama captured by
  ``torch.export`` from a dict batch, on fake weights), weights read per block from the
  file by ``SafetensorsWeights`` and the pruned checkpoint written to a directory; run
  twice: with glibc malloc's defaults, and with ``MALLOC_MMAP_THRESHOLD_=1048576`` (glibc
  otherwise raises its mmap threshold after the first large free and serves later blocks
  from a heap that fragments);
* in memory: built on the CPU with the file's weights (``from_pretrained`` for the
  Llama), ``prepare``, ``prune_sequential``.

Each process reads its peak resident memory (``ru_maxrss``) right after its imports
(the baseline: torch, fx_sparsity and, for the Llama, transformers with the model's class, whose module
brings about 220 MiB of code), after the capture (streamed: ``prepare_on_meta``, whose ``torch.export``
run holds dynamo's and the fake tensors' bookkeeping; in memory: the weights loaded and ``prepare``) and at
the end; the table gives the growth over the baseline against the weights' size and the budget. Memory is
not timing: a busy machine does not change it.

    PYTHONPATH=. python benchmarks/sequential_memory.py              # 16 blocks of d=1024: 775 MiB of weights
    PYTHONPATH=. python benchmarks/sequential_memory.py --d 256 --layers 2 --budget-mib 64   # a quick check
    PYTHONPATH=. python benchmarks/sequential_memory.py --model llama --sparsifier sparsegpt   # transformers Llama
    PYTHONPATH=. python benchmarks/sequential_memory.py --model llama --d 128 --layers 2 --vocab 256 --context 16
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


def _llama_config(args: argparse.Namespace):
    import transformers

    heads = max(args.d // 64, 1)
    return transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d, intermediate_size=(8 * args.d // 3 + 63) // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1),
        max_position_embeddings=max(args.context, 2),
    )


def _model(args: argparse.Namespace, device: str):
    with torch.device(device):
        torch.manual_seed(0)
        if args.model == "llama":
            import transformers

            return transformers.LlamaForCausalLM(_llama_config(args)).eval()
        from benchmarks.quality import TinyGPT

        return TinyGPT(args.d, args.layers, 4, args.context).eval()


def _batches(args: argparse.Namespace) -> list:
    generator = torch.Generator().manual_seed(1)
    vocab = args.vocab if args.model == "llama" else 256
    ids = [torch.randint(0, vocab, (1, args.context), generator=generator) for _ in range(args.batches)]
    if args.model == "llama":  # what a tokenizer returns
        return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]
    return ids


def _sparsifier(args: argparse.Namespace):
    from fx_sparsity import SparseGPTSparsifier, WandaSparsifier

    return SparseGPTSparsifier(0.5) if args.sparsifier == "sparsegpt" else WandaSparsifier(0.5)


def _source(args: argparse.Namespace) -> Path:
    index = Path(args.dir) / "model.safetensors.index.json"  # save_pretrained shards large models
    return index if index.exists() else Path(args.dir) / "model.safetensors"


def _import_model_library(args: argparse.Namespace) -> None:
    """Import what the run needs before the baseline is read, so that the growth is the run's own: for the Llama,
    the model's class, as a user holding the model has (transformers imports ``modeling_llama`` on first access
    to the class, and with it about 220 MiB of code: torch._dynamo and the generation utilities)."""
    import fx_sparsity  # noqa: F401

    if args.model == "llama":
        import transformers

        transformers.LlamaForCausalLM  # noqa: B018 - the lazy module imports modeling_llama here


def write(args: argparse.Namespace) -> dict:
    model = _model(args, "cpu")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if args.model == "llama":
        model.save_pretrained(args.dir)
    else:
        from safetensors.torch import save_file

        save_file(state, str(Path(args.dir) / "model.safetensors"))
    return {"weights_mib": sum(v.nbytes for v in state.values()) / 2**20, "tensors": len(state)}


def _blocks(args: argparse.Namespace) -> list[str]:
    return ["model.layers.*"] if args.model == "llama" else ["blocks.*"]


def streamed(args: argparse.Namespace) -> dict:
    from fx_sparsity.calibration import SafetensorsWeights, prepare_on_meta, prune_sequential

    _import_model_library(args)
    base = _rss_mib()
    batches = _batches(args)
    example = batches[0] if args.model == "llama" else None
    gm = prepare_on_meta(_model(args, "meta"), sparsifier=_sparsifier(args), example_inputs=example)
    captured = _rss_mib()
    weights = SafetensorsWeights(_source(args), Path(args.dir) / "pruned")
    report = prune_sequential(gm, batches, blocks=_blocks(args), weights=weights, progress_bar=False)
    return {"base_mib": base, "captured_mib": captured, "peak_mib": _rss_mib(), "report_peak_mib": report.peak_bytes / 2**20}


def in_memory(args: argparse.Namespace) -> dict:
    from fx_sparsity import prepare
    from fx_sparsity.calibration import prune_sequential

    _import_model_library(args)
    base = _rss_mib()
    batches = _batches(args)
    if args.model == "llama":
        import transformers

        model = transformers.LlamaForCausalLM.from_pretrained(args.dir).eval()
    else:
        from safetensors.torch import load_file

        model = _model(args, "cpu")
        model.load_state_dict(load_file(str(Path(args.dir) / "model.safetensors")))
    example = batches[0] if args.model == "llama" else None
    gm = prepare(model, sparsifier=_sparsifier(args), example_inputs=example)
    captured = _rss_mib()
    report = prune_sequential(gm, batches, blocks=_blocks(args), progress_bar=False)
    return {"base_mib": base, "captured_mib": captured, "peak_mib": _rss_mib(), "report_peak_mib": report.peak_bytes / 2**20}


def _child(args: argparse.Namespace, phase: str, env: dict[str, str] | None = None) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--dir", args.dir]
    command += [f"--{k}={getattr(args, k)}" for k in ("d", "layers", "context", "batches", "model", "vocab", "sparsifier")]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4, help="calibration batches of one --context window")
    parser.add_argument("--model", choices=["gpt", "llama"], default="gpt", help="TinyGPT, or a transformers Llama")
    parser.add_argument("--vocab", type=int, default=8192, help="the Llama's vocabulary (its embedding and head)")
    parser.add_argument("--sparsifier", choices=["wanda", "sparsegpt"], default="wanda")
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
    what = "transformers LlamaForCausalLM" if args.model == "llama" else "TinyGPT"
    print(f"{what}, {args.layers} blocks, d={args.d}: {written['weights_mib']:.0f} MiB of fp32 weights in "
          f"{written['tensors']} tensors; {args.sparsifier} 50%, {args.batches} x {args.context} calibration tokens; "
          f"budget {args.budget_mib:.0f} MiB "
          f"above the baseline (the process's peak after its imports). {describe()}.\n")
    print("| run | baseline RSS (MiB) | growth after capture (MiB) | peak RSS (MiB) | growth (MiB) | within budget | "
          "largest stage by report (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        growth = r["peak_mib"] - r["base_mib"]
        print(f"| {name} | {r['base_mib']:.0f} | {r['captured_mib'] - r['base_mib']:.0f} | {r['peak_mib']:.0f} | {growth:.0f} | "
              f"{'yes' if growth <= args.budget_mib else 'no'} | {r['report_peak_mib']:.1f} |")


if __name__ == "__main__":
    main()
