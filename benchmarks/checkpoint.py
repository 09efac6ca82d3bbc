"""Compressed checkpoints: bytes on disk, load time and peak memory, dense ``save_pretrained`` against ``save_sparse``.

A ``LlamaForCausalLM`` from a config (random weights: nothing is downloaded), by default with the proportions of
``benchmarks/decode.py`` (hidden 2048, MLP 5504, 4 layers, 16 heads, a 4096-token vocabulary). Its decoder
Linears are pruned one-shot (``MagnitudeSparsifier(0.5)`` or ``NMSparsifier(2, 4)``), then

* **dense**: ``fx_sparsity.to_model(gm).save_pretrained(dir)`` (the weights with their zeros), loaded with
  ``LlamaForCausalLM.from_pretrained``;
* **sparse, <format>**: ``fx_sparsity.sparsify_model(gm, format)`` saved with
  ``fx_sparsity.deploy.save_sparse`` (the decoder Linears packed, embedding, norms and head dense), loaded with
  ``fx_sparsity.deploy.load_sparse``.

Bytes on disk are the folder's files. Each load runs in a fresh Python process (``--rounds`` of them per
variant, interleaved in a new random order each round), which reports the seconds of the load call alone and
its peak resident memory (``VmHWM``) over what the process held before the call (after importing torch,
transformers' Llama and fx_sparsity); medians. The loaded model's logits are checked against the saved model's in the
first round. Numbers are only meaningful on a quiet machine.

    python benchmarks/checkpoint.py                                   # about 3 GB of files in a temporary folder
    python benchmarks/checkpoint.py --formats bitmask,csr --rounds 5
    python benchmarks/checkpoint.py --hidden 128 --intermediate 256 --layers 1 --vocab 256 --heads 4 --rounds 1
                                                                      # does it run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from machine import describe
from tabulate import tabulate
from transformers import LlamaConfig, LlamaForCausalLM

import fx_sparsity
from fx_sparsity.deploy import save_sparse

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process: load one folder, report seconds and peak memory of the load alone, check the logits.
_CHILD = """
import json, sys, time
import torch, transformers, fx_sparsity
from fx_sparsity.deploy import load_sparse

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0

kind, folder, expected = sys.argv[1:4]
transformers.LlamaForCausalLM  # import the modeling module before the clock starts (transformers imports lazily)
before = status("VmRSS:")
start = time.perf_counter()
model = transformers.LlamaForCausalLM.from_pretrained(folder) if kind == "dense" else load_sparse(folder)
seconds = time.perf_counter() - start
peak = status("VmHWM:") - before
check = None
if expected != "-":
    saved = torch.load(expected)
    with torch.no_grad():
        logits = model(saved["ids"]).logits
    check = float((logits - saved["logits"]).abs().max())
print(json.dumps({"seconds": seconds, "peak_bytes": peak, "max_abs_error": check}))
"""


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab, use_cache=False,
    )
    return LlamaForCausalLM(config).to(getattr(torch, args.dtype)).eval()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def load_once(kind: str, folder: Path, expected: Path | None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _CHILD, kind, str(folder), str(expected or "-")],
                         capture_output=True, text=True, env=env, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"loading {folder} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="bitmask,nm", help="sparse formats to save (nm prunes 2:4)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="fresh-process loads per variant")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args()
    print(f"{describe()}, load average at start {Path('/proc/loadavg').read_text().split()[:3]}")
    model = build(args)
    ids = torch.randint(0, args.vocab, (2, 8))
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        scratch = Path(scratch)
        variants: dict[str, tuple[str, Path, Path]] = {}
        for layout in args.formats.split(","):
            sparsifier = fx_sparsity.NMSparsifier(2, 4) if layout == "nm" else fx_sparsity.MagnitudeSparsifier(0.5)
            gm = fx_sparsity.prepare(model, ["model.layers.*"], sparsifier=sparsifier, example_inputs=(ids,))
            sparsifier.step()
            pruning = "2:4" if layout == "nm" else "50%"
            if f"dense ({pruning})" not in variants:
                dense = fx_sparsity.to_model(gm)
                dense.save_pretrained(scratch / f"dense-{layout}")
                with torch.no_grad():
                    torch.save({"ids": ids, "logits": dense(ids).logits}, scratch / f"dense-{layout}.pt")
                variants[f"dense ({pruning})"] = ("dense", scratch / f"dense-{layout}", scratch / f"dense-{layout}.pt")
                del dense
            sparse = fx_sparsity.sparsify_model(gm, layout)
            save_sparse(sparse, scratch / layout)
            with torch.no_grad():
                torch.save({"ids": ids, "logits": sparse(ids).logits}, scratch / f"{layout}.pt")
            variants[f"sparse {layout} ({pruning})"] = ("sparse", scratch / layout, scratch / f"{layout}.pt")
            del sparse, gm
        results: dict[str, list[dict]] = {name: [] for name in variants}
        order = list(variants)
        for round_ in range(args.rounds):
            random.shuffle(order)
            for name in order:
                kind, folder, expected = variants[name]
                result = load_once(kind, folder, expected if round_ == 0 else None)
                if round_ == 0 and result["max_abs_error"] > (1e-3 if args.dtype == "float32" else 5e-2):
                    raise RuntimeError(f"{name}: loaded logits differ from the saved model's by {result['max_abs_error']}")
                results[name].append(result)
        dense_bytes = {name: folder_bytes(v[1]) for name, v in variants.items() if v[0] == "dense"}
        rows = []
        for name, (kind, folder, _) in variants.items():
            size = folder_bytes(folder)
            reference = next(b for n, b in dense_bytes.items() if n.endswith(name[name.index("("):]))
            rows.append([
                name, f"{size / 2**20:,.1f}", f"{size / reference:.2f}x",
                f"{statistics.median(r['seconds'] for r in results[name]):.2f}",
                f"{statistics.median(r['peak_bytes'] for r in results[name]) / 2**20:,.0f}",
            ])
    print(f"\n### {args.dtype} Llama, hidden {args.hidden}, {args.layers} layers: checkpoint size, load time, peak memory\n")
    print(tabulate(rows, ["checkpoint", "MiB on disk", "vs dense", "load s", "load peak MiB"], tablefmt="github"))
    print(f"\nload average at end: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
