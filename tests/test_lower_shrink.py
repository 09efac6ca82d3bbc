"""lower(gm, "shrink"): the result of fx_sparsity.shrink with lowering records like the other backends, the model's
latency before/after in the shrink report when example_inputs are given, export, and refusals (per-layer use, a
module not prepared by a ChannelPruner)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsity
from fx_sparsity import WeightNormSparsifier, get_lowering, shrink_report
from fx_sparsity.lowering import LayerRequest, TimedShrinkReport
from fx_sparsity.report import lowering_table
from fx_sparsity.structured import ChannelPruner, shrink
from helpers import TinyResNet, snapshot


def _prepared(mask_consumers: bool = True):
    model, x = TinyResNet().eval(), torch.randn(2, 3, 16, 16)
    pruner = ChannelPruner(0.5, mask_consumers=mask_consumers)
    gm = pruner.prepare(model, example_inputs=x)
    pruner.step()
    return model, x, pruner, gm


def test_lower_shrink_equals_shrink_with_records_and_exports():
    """TinyResNet at 0.5: lower(gm, 'shrink') computes what shrink(gm) does with the same tensors; one record per
    masked weight with its shape before and the shrunk weight's bytes after; the table prints; the prepared module
    and the user's model are untouched, masks still step; the result exports."""
    model, x, pruner, gm = _prepared()
    before = snapshot(model)
    masks = {name: b.clone() for name, b in gm.named_buffers() if name.endswith("_mask")}
    lowered = fx_sparsity.lower(gm, "shrink")
    reference = shrink(gm)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(lowered(x), gm(x))
    assert {k: v.shape for k, v in lowered.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    records = get_lowering(lowered)
    assert [r.tensor_fqn for r in records] == [t["tensor_fqn"] for t in pruner.groups]
    for r in records:
        weight = lowered.get_parameter(r.tensor_fqn)
        assert r.backend == r.requested == "shrink" and r.blocksize is None
        assert r.weight_shape == tuple(gm.get_parameter(r.tensor_fqn).shape)
        assert r.lowered_bytes == weight.numel() * weight.element_size() < r.dense_bytes
        assert r.time_before is None and r.time_after is None and r.note == f"-> {'x'.join(map(str, weight.shape))}"
    assert "shrink" in lowering_table(lowered) and "total" in lowering_table(lowered)
    report = shrink_report(lowered)
    assert isinstance(report, TimedShrinkReport) and report.latency_before is None and report.speedup is None
    assert report.exact and report.params_after == shrink_report(reference).params_after
    for name, mask in masks.items():
        assert torch.equal(gm.get_buffer(name), mask), name
    after = snapshot(model)
    assert after["ids"] == before["ids"] and after["attrs"] == before["attrs"]
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0)
    pruner.step()
    with torch.no_grad():
        torch.testing.assert_close(torch.export.export(lowered, (x,)).module()(x), lowered(x))


def test_lower_shrink_times_the_model_before_and_after():
    """With example_inputs the report holds the median latency of the fused dense module and of the shrunk one
    (both positive; no speed is asserted: the machine is shared), and the same counts as shrink's report."""
    _, x, _, gm = _prepared(mask_consumers=False)
    lowered = fx_sparsity.lower(gm, "shrink", example_inputs=(x,), repeats=3)
    report, plain = shrink_report(lowered), shrink_report(shrink(gm))
    assert report.latency_before > 0 and report.latency_after > 0
    assert report.speedup == report.latency_before / report.latency_after
    assert (report.params_before, report.params_after, report.macs_before, report.macs_after) == (
        plain.params_before, plain.params_after, plain.macs_before, plain.macs_after)
    assert (report.channels, report.folded, report.inexact) == (plain.channels, plain.folded, plain.inexact)


def test_lower_shrink_refusals():
    """'shrink' per layer (dict and list forms, LayerRequest), a module prepared by another sparsifier, and bad
    example_inputs are refused before anything is built."""
    _, x, _, gm = _prepared()
    with pytest.raises(ValueError, match="removes channels from the whole model at once.*lower\\(gm, 'shrink'\\)"):
        fx_sparsity.lower(gm, {"stem.0": "shrink"})
    with pytest.raises(ValueError, match="whole model at once"):
        fx_sparsity.lower(gm, [{"tensor_fqn": "stem.0.weight", "backend": "shrink"}])
    with pytest.raises(ValueError, match="whole model at once"):
        LayerRequest("shrink")
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        fx_sparsity.lower(gm, "shrink", example_inputs=3)
    other = WeightNormSparsifier().prepare(nn.Sequential(nn.Linear(4, 4)), None)
    with pytest.raises(ValueError, match="backend 'shrink' removes the channels a ChannelPruner masked.*WeightNorm"):
        fx_sparsity.lower(other, "shrink")
