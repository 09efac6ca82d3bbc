"""Inspection tables: per-layer sparsity and graph printouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsity
from fx_sparsity import (
    NearlyDiagonalSparsifier,
    WeightNormSparsifier,
    get_sparsifier,
    prepare,
    print_graph_table,
    print_sparsity_table,
)
from fx_sparsity.report import graph_table, sparsity_table
from helpers import MixedNet, SimpleLinear


def _row(table: str, first: str) -> list[str]:
    for line in table.splitlines():
        if line.split()[:1] == [first]:
            return line.split()
    raise AssertionError(f"no row {first!r} in\n{table}")


def test_sparsity_table_counts_match_masks():
    """SimpleLinear at 50% (1x1 blocks): per-layer nonzeros equal the masks', the total row sums them."""
    torch.manual_seed(0)
    gm = prepare(SimpleLinear(), sparsifier=WeightNormSparsifier(0.5, (1, 1)))
    get_sparsifier(gm).step()
    table = sparsity_table(gm)
    for fqn in ("seq.0", "linear2"):
        mask = gm.get_buffer(f"{fqn}.weight_mask")
        row = _row(table, fqn)
        assert row[1] == "linear" and row[2] == "x".join(map(str, mask.shape))
        assert f"{int(mask.sum())}" in row and f"{mask.numel()}" in row
        assert row[-5] == "50.0%"  # target
    total = _row(table, "total")
    nnz = sum(int(b.sum()) for n, b in gm.named_buffers() if n.endswith("_mask"))
    numel = sum(b.numel() for n, b in gm.named_buffers() if n.endswith("_mask"))
    assert total[-3:] == [f"{nnz:,}", "/", f"{numel:,}"]


def test_sparsity_table_after_squash_reads_weights():
    """After squash the achieved sparsity comes from the fused weights; root-level tensors are labelled."""
    torch.manual_seed(1)
    gm = prepare(MixedNet(), sparsifier=NearlyDiagonalSparsifier(1))
    sparsifier = get_sparsifier(gm)
    sparsifier.step()
    masked = sparsity_table(gm)
    sparsifier.squash_mask()
    squashed = sparsity_table(gm)
    assert _row(masked, "fc")[-3:] == _row(squashed, "fc")[-3:]
    assert "(root) [head_weight]" in squashed


def test_graph_table_marks_masks(capsys):
    """Every mul(weight, mask) node is marked; print_* print the same strings."""
    gm = prepare(MixedNet())
    table = graph_table(gm)
    assert table.count(">> MASK") == 5
    assert ">> MASK shared.weight_mask" in table
    print_graph_table(gm)
    print_sparsity_table(gm)
    out = capsys.readouterr().out
    assert table in out and sparsity_table(gm) in out


def test_layer_sparsity_refuses_a_sparsifier_that_is_not_one():
    """layer_sparsity / sparsity_table with sparsifier='x' is a TypeError naming the argument, not an AttributeError."""
    from fx_sparsity.report import layer_sparsity, sparsity_table

    gm = fx_sparsity.prepare(nn.Sequential(nn.Linear(4, 4)))
    for fn in (layer_sparsity, sparsity_table):
        with pytest.raises(TypeError, match="sparsifier must be the BaseSparsifier that prepared gm"):
            fn(gm, sparsifier="x")
