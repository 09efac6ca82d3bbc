"""Quality of one-shot pruning: held-out perplexity of a small trained language model.

A GPT-style byte-level language model (hand-written blocks: LayerNorm, causal
self-attention through ``F.scaled_dot_product_attention``, GELU MLP; about 0.88M
parameters by default) is trained on the Python standard library's own ``.py`` sources,
which every machine with Python has. Files are split by a hash of their path:
about 10% are held out and never trained on. The trained checkpoint is cached
under ``/tmp`` (keyed by the model and training settings), so later runs only
prune and evaluate.

Then every Linear of the transformer blocks (not the embedding or the head, as
in the papers) is pruned one-shot with magnitude, Wanda and SparseGPT at 50%
unstructured, 4:8 and 2:4, each unstructured one with and without OWL levels,
and Wanda/SparseGPT also with *sequential* calibration
(``fx_sparsity.calibration.sequential.prune_sequential``: block by block, each block
calibrated on the outputs of the already pruned blocks before it, as the
reference implementations do; with OWL, the levels come from the dense model). Calibration: ``--calib`` training windows.
The table gives held-out perplexity (per byte) and the dense model's.

A second table, quantized and sparse (weight-only, ``fx_sparsity.quantization``): SparseGPT 50% alone
beside SparseGPT 50% + int8 pruned and quantized in one pass (``SparseGPTSparsifier(quantization="int8")``),
with the ratio of their perplexity losses over the dense model (the target: the joint loss within 10% of
SparseGPT's alone); and SparseGPT 2:4 alone, GPTQ int4 alone (dense masks) and SparseGPT 2:4 + int4 in one
pass, plus Wanda 2:4 followed by GPTQ int4 on its masks (``fx_sparsity.quantization.quantize``). int4 groups
are ``--group`` columns (128 by default; a tiny model needs 32).

    PYTHONPATH=. python benchmarks/quality.py     # trains once (40 min on a busy 2-core CPU), then prunes and evaluates
    PYTHONPATH=. python benchmarks/quality.py --steps 2000   # a better-trained model (new cache entry)
    PYTHONPATH=. python benchmarks/quality.py --tables quantized   # only the quantized and sparse table
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import describe
from tabulate import tabulate
from torch import nn

import fx_sparsity
from fx_sparsity import MagnitudeSparsifier, WandaSparsifier, prepare
from fx_sparsity.calibration import calibrate, prune_sequential
from fx_sparsity.levels import set_owl_levels
from fx_sparsity.quantization import quantize
from fx_sparsity.sparsifier import SparseGPTSparsifier

# ---------------------------------------------------------------- data


def corpus(limit_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out byte streams from the stdlib's ``.py`` files, split by file (about 90/10)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    size = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        size += len(data)
        if size > limit_bytes:
            break
        digest = hashlib.sha256(str(path.relative_to(root)).encode()).digest()[0]
        (held if digest < 26 else train).append(data)  # 26 / 256 ~ 10%
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(held)


# ---------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A byte-level GPT: token and position embeddings, ``layers`` blocks, a final LayerNorm and a head."""

    def __init__(self, d: int = 192, layers: int = 4, heads: int = 4, context: int = 128) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(256, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 256, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return self.head(self.ln(self.blocks(x)))


def windows(stream: torch.Tensor, context: int, count: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - context - 1, (count,), generator=generator)
    return torch.stack([stream[s : s + context + 1] for s in starts.tolist()])


def train(model: TinyGPT, stream: torch.Tensor, steps: int, batch: int, context: int, lr: float) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = []
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        chunk = windows(stream, context, batch, generator)
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - start:6.0f} s", file=sys.stderr)
    model.eval()
    return losses


def trained_model(args: argparse.Namespace, train_stream: torch.Tensor) -> TinyGPT:
    key = f"d{args.d}-l{args.layers}-c{args.context}-s{args.steps}-b{args.batch}-lr{args.lr}-n{train_stream.numel()}"
    path = Path(args.cache) / f"fx_sparsity_quality_{key}.pt"
    torch.manual_seed(0)
    model = TinyGPT(args.d, args.layers, 4, args.context)
    if path.exists():
        model.load_state_dict(torch.load(path))
        print(f"loaded {path}", file=sys.stderr)
    else:
        print(f"training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {args.steps} steps",
              file=sys.stderr)
        train(model, train_stream, args.steps, args.batch, args.context, args.lr)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


# ---------------------------------------------------------------- evaluation and pruning


@torch.no_grad()
def perplexity(model: nn.Module, held: torch.Tensor, context: int, batch: int = 32) -> float:
    """exp(mean cross-entropy per byte) over non-overlapping held-out windows."""
    n = (held.numel() - 1) // context
    inputs = held[: n * context].view(n, context)
    targets = held[1 : n * context + 1].view(n, context)
    total = 0.0
    for i in range(0, n, batch):
        logits = model(inputs[i : i + batch])
        total += F.cross_entropy(logits.reshape(-1, 256), targets[i : i + batch].reshape(-1), reduction="sum").item()
    return math.exp(total / (n * context))


def make_sparsifier(method: str, pattern: str):
    nm = {"4:8": (4, 8), "2:4": (2, 4)}.get(pattern)
    if method == "magnitude":
        # Per-layer magnitude for unstructured; N:M magnitude is Wanda's N:M with unit norms, so use the nm mask.
        return MagnitudeSparsifier(0.5) if nm is None else fx_sparsity.NMSparsifier(*nm)
    if method == "wanda":
        return WandaSparsifier(0.5, nm=nm)
    return SparseGPTSparsifier(0.5, nm=nm)


CONFIG = ["blocks.*.qkv", "blocks.*.proj", "blocks.*.fc1", "blocks.*.fc2"]


def prune(model: TinyGPT, method: str, pattern: str, owl: bool, sequential: bool, calib: list[torch.Tensor]):
    sparsifier = make_sparsifier(method, pattern)
    gm = prepare(model, CONFIG, sparsifier=sparsifier)
    if method == "magnitude" and not owl:
        sparsifier.step()
        return gm
    if owl:  # OWL's outlier ratios come from the dense model's statistics, sequential or not
        calibrate(gm, calib, progress_bar=False)
        set_owl_levels(gm, 0.5, blocks=lambda fqn: fqn.split(".")[1])
    if sequential:
        # Block by block (fx_sparsity.prune_sequential): each block calibrated on the outputs of the pruned blocks
        # before it, then pruned; only the blocks' Linears are in CONFIG, so the embeddings and head stay dense.
        prune_sequential(gm, calib, blocks=["blocks.*"], progress_bar=False)
        return gm
    if not owl:
        calibrate(gm, calib, progress_bar=False)
    sparsifier.step()
    return gm


def quantized(model: TinyGPT, run: str, group: int, calib: list[torch.Tensor]):
    """The prepared model of one row of the quantized table: ``"sparsegpt 50%"``, ``"sparsegpt 50% + int8"``,
    ``"sparsegpt 2:4"``, ``"gptq int4"``, ``"sparsegpt 2:4 + int4"`` or ``"wanda 2:4, gptq int4"``."""
    int4 = f"int4-g{group}"
    if run.startswith("sparsegpt"):
        nm = (2, 4) if "2:4" in run else None
        spec = "int8" if run.endswith("int8") else int4 if run.endswith("int4") else None
        sparsifier = SparseGPTSparsifier(0.5, nm=nm, quantization=spec)
        gm = prepare(model, CONFIG, sparsifier=sparsifier)
        calibrate(gm, calib, progress_bar=False)
        sparsifier.step()
        return gm
    if run == "gptq int4":  # masks of ones: quantization alone
        gm = prepare(model, CONFIG, sparsifier=MagnitudeSparsifier(0.0))
    else:
        sparsifier = WandaSparsifier(0.5, nm=(2, 4))
        gm = prepare(model, CONFIG, sparsifier=sparsifier)
        calibrate(gm, calib, progress_bar=False)
        sparsifier.step()
    quantize(gm, int4, batches=calib, progress_bar=False)
    return gm


def quantized_table(model: TinyGPT, held: torch.Tensor, context: int, group: int, calib, dense: float) -> str:
    """The quantized and sparse table: perplexity of each run and, beside a quantized run, the ratio of its loss
    over the dense model to that of the same pruning without quantization."""
    runs = ["sparsegpt 50%", "sparsegpt 50% + int8", "sparsegpt 2:4", "gptq int4", "sparsegpt 2:4 + int4",
            "wanda 2:4, gptq int4"]
    ppl = {}
    for run in runs:
        start = time.perf_counter()
        ppl[run] = perplexity(quantized(model, run, group, calib), held, context)
        print(f"  {run:32s} ppl {ppl[run]:8.3f}  ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    alone = {"sparsegpt 50% + int8": "sparsegpt 50%", "sparsegpt 2:4 + int4": "sparsegpt 2:4"}
    rows = []
    for run in runs:
        ratio = ""
        if run in alone and ppl[alone[run]] != dense:
            ratio = f"{(ppl[run] - dense) / (ppl[alone[run]] - dense):.3f}"
        rows.append([run.replace("int4", f"int4 (groups of {group})"), f"{ppl[run]:.3f}", ratio])
    return tabulate(rows, headers=["run", "perplexity", "loss / loss of the pruning alone"], tablefmt="github",
                    disable_numparse=True)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick the trained checkpoint (model size, training run, corpus) and its evaluation."""
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--corpus-bytes", type=int, default=12_000_000)
    parser.add_argument("--eval-bytes", type=int, default=100_000, help="held-out bytes evaluated")
    parser.add_argument("--cache", default="/tmp/fx_sparsity_quality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--calib", type=int, default=64, help="calibration windows of --context bytes")
    parser.add_argument("--tables", choices=["all", "pruning", "quantized"], default="all")
    parser.add_argument("--group", type=int, default=128, choices=[32, 64, 128], help="int4 group size")
    args = parser.parse_args()

    train_stream, held = corpus(args.corpus_bytes)
    print(f"corpus: {train_stream.numel() / 1e6:.1f} MB train, {held.numel() / 1e6:.1f} MB held out", file=sys.stderr)
    model = trained_model(args, train_stream)
    held = held[: args.eval_bytes + 1]
    calib = list(windows(train_stream, args.context - 1, args.calib, torch.Generator().manual_seed(1)).split(8))
    dense = perplexity(model, held, args.context)
    params = sum(p.numel() for p in model.parameters())
    print(f"Held-out perplexity per byte of a {params / 1e6:.2f}M-parameter byte-level GPT ({args.layers} blocks, "
          f"d={args.d}, context {args.context}, {args.steps} steps x {args.batch} windows) trained on the stdlib's "
          f".py files; {held.numel() - 1} held-out bytes from files never trained on; calibration "
          f"{args.calib} x {args.context - 1} training bytes. Dense: {dense:.3f}. Machine: {describe()}.\n")
    if args.tables in ("all", "pruning"):
        print(pruning_table(model, held, args.context, calib))
    if args.tables in ("all", "quantized"):
        print("\nQuantized and sparse (weight-only):\n")
        print(quantized_table(model, held, args.context, args.group, calib, dense))


def pruning_table(model: TinyGPT, held: torch.Tensor, context: int, calib: list[torch.Tensor]) -> str:
    """The pruning table: perplexity of each method and pattern."""
    runs = [("magnitude", False, False), ("magnitude", True, False), ("wanda", False, False), ("wanda", True, False),
            ("wanda", False, True), ("wanda", True, True), ("sparsegpt", False, False), ("sparsegpt", True, False),
            ("sparsegpt", False, True), ("sparsegpt", True, True)]
    rows = []
    for method, owl, sequential in runs:
        row = [method + (" + OWL" if owl else "") + (" (sequential)" if sequential else "")]
        for pattern in ("50%", "4:8", "2:4"):
            if owl and pattern != "50%":
                row.append("")
                continue
            start = time.perf_counter()
            gm = prune(model, method, pattern, owl, sequential, calib)
            ppl = perplexity(gm, held, context)
            print(f"  {row[0]:32s} {pattern:4s} ppl {ppl:8.3f}  ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
            row.append(f"{ppl:.3f}")
        rows.append(row)
    return tabulate(rows, headers=["method", "50% unstructured", "4:8", "2:4"], tablefmt="github", disable_numparse=True)


if __name__ == "__main__":
    main()
