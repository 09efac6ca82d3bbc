"""Quality effect of keeping padding out of calibration: held-out perplexity after one-shot pruning.

The model is ``benchmarks/quality.py``'s byte-level GPT (trained on the standard library's
``.py`` files, cached under ``/tmp/fx_sparsity_quality``; the first run trains it, about 40
minutes on a busy 2-core CPU). Calibration data is what a tokenizer with ``padding=True``
gives: ``--calib`` training segments of random lengths (``--min-length`` .. context - 1
bytes), in batches of 8, each right-padded to its batch's longest with ``--pad`` (byte 0
by default, which never occurs in the corpus, so its embedding was never trained, like
a BERT ``[PAD]``), with an ``attention_mask``. Real tokens never see the padding (the
attention is causal and the padding comes last), so only the statistics can change.

Each method prunes every Linear of the transformer blocks twice: calibrated with the
padding counted (``calibrate(token_mask=None)``, what calibrate did before) and with it
left out (the default: the batch's ``attention_mask``). The table gives held-out
perplexity per byte; magnitude needs no calibration and is the same in both columns.

    PYTHONPATH=. python benchmarks/padding_quality.py
    PYTHONPATH=. python benchmarks/padding_quality.py --pad 32   # pad with spaces (a byte the model knows well)
    PYTHONPATH=. python benchmarks/padding_quality.py --seed 2 --only "wanda 50%" "sparsegpt 2:4"
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from machine import describe
from tabulate import tabulate
from torch import nn

from benchmarks.quality import CONFIG, TinyGPT, add_model_arguments, corpus, make_sparsifier, perplexity, trained_model
from fx_sparsity import get_sparsifier, prepare
from fx_sparsity.calibration import calibrate
from fx_sparsity.levels import set_owl_levels


class WithMask(nn.Module):
    """Takes a tokenizer's ``(tokens, attention_mask)``; right padding under causal attention needs no mask."""

    def __init__(self, model: TinyGPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(tokens)


def padded_batches(stream: torch.Tensor, count: int, min_length: int, max_length: int, pad: int,
                   seed: int = 1, size: int = 8) -> list[dict[str, torch.Tensor]]:
    """``count`` segments of random lengths in batches of ``size``, right-padded to each batch's longest."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, max_length + 1, (count,), generator=g).tolist()
    starts = torch.randint(0, stream.numel() - max_length, (count,), generator=g).tolist()
    batches = []
    for i in range(0, count, size):
        chunk = [stream[s : s + n] for s, n in zip(starts[i : i + size], lengths[i : i + size])]
        width = max(len(c) for c in chunk)
        tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, c in enumerate(chunk):
            tokens[row, : len(c)], mask[row, : len(c)] = c, 1
        batches.append({"tokens": tokens, "attention_mask": mask})
    return batches


def prune(model: nn.Module, method: str, pattern: str, owl: bool, batches: list, token_mask: str | None) -> nn.Module:
    sparsifier = make_sparsifier(method, pattern)
    gm = prepare(model, [f"model.{c}" for c in CONFIG], sparsifier=sparsifier)
    if method != "magnitude" or owl:
        calibrate(gm, batches, token_mask=token_mask, progress_bar=False)
    if owl:
        set_owl_levels(gm, 0.5, blocks=lambda fqn: fqn.split(".")[2])
    get_sparsifier(gm).step()
    return gm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--calib", type=int, default=64, help="calibration segments")
    parser.add_argument("--min-length", type=int, default=8, help="shortest calibration segment, in bytes")
    parser.add_argument("--pad", type=int, default=0, help="the padding byte")
    parser.add_argument("--seed", type=int, default=1, help="seed of the calibration segments")
    parser.add_argument("--only", nargs="*", help="run only these rows, e.g. 'wanda 50%%' 'sparsegpt 2:4'")
    args = parser.parse_args()

    train_stream, held = corpus(args.corpus_bytes)
    model = WithMask(trained_model(args, train_stream)).eval()
    held = held[: args.eval_bytes + 1]
    batches = padded_batches(train_stream, args.calib, args.min_length, args.context - 1, args.pad, args.seed)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    dense = perplexity(model, held, args.context)
    runs = [("magnitude", "50%", False), ("wanda", "50%", False), ("wanda", "2:4", False), ("wanda", "50%", True),
            ("sparsegpt", "50%", False), ("sparsegpt", "2:4", False), ("sparsegpt", "50%", True)]
    rows = []
    for method, pattern, owl in runs:
        name = f"{method} {pattern}" + (" + OWL" if owl else "")
        if args.only and name not in args.only:
            continue
        row = [name]
        for token_mask in (None, "attention_mask"):
            start = time.perf_counter()
            ppl = perplexity(prune(model, method, pattern, owl, batches, token_mask), held, args.context)
            print(f"  {name:24s} padding {'out' if token_mask else 'in '}: ppl {ppl:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
            row.append(f"{ppl:.3f}")
        rows.append(row)
    print(f"Held-out perplexity per byte; dense {dense:.3f}. Calibration: {args.calib} segments of "
          f"{args.min_length}-{args.context - 1} training bytes (seed {args.seed}) in batches of 8 padded with byte "
          f"{args.pad}: "
          f"{real} real tokens, {total - real} padding ({(total - real) / total:.0%}). Machine: {describe()}.\n")
    print(tabulate(rows, headers=["method", "padding counted", "padding left out (attention_mask)"],
                   tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
