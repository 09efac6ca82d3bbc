"""Mask insertion and fusion: graph shape, numerics against eager references, the user's model untouched."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fx_sparsity import NearlyDiagonalSparsifier, WeightNormSparsifier, get_sparsifier, prepare
from helpers import (
    ControlFlowNet,
    ConvNet1d3d,
    MixedNet,
    MockSparseLinear,
    SimpleLinear,
    check_against_eager,
    count_nodes,
    masked_reference,
    snapshot,
)
from passes import find_weights, get_capture, masked_targets
from passes.capturing import capture
from passes.masking import fuse_masks, insert_masks

MIXED_INPUT = (2, 3, 8, 8)


def test_mul_nodes_and_buffers():
    """MixedNet: one mul(weight, mask) per weight (5), masks are bool all-True buffers named <module>.<tensor>_mask."""
    gm = prepare(MixedNet())
    counts = count_nodes(gm)
    assert counts[("call_function", operator.mul)] == 5
    assert counts[("call_function", F.linear)] == 5  # fc, shared x2, tied, head
    assert ("call_module", "fc") not in counts
    names = {name for name, _ in gm.named_buffers()}
    assert names == {"conv.weight_mask", "conv_reflect.weight_mask", "fc.weight_mask", "shared.weight_mask", "head_weight_mask"}
    for name, mask in gm.named_buffers():
        weight = gm.get_parameter(name[: -len("_mask")])
        assert mask.shape == weight.shape and mask.dtype == weight.dtype and torch.all(mask == 1)
    assert set(gm.state_dict()) >= names


def test_prepared_equals_dense_then_masked_reference():
    """Masks of ones: output equals the dense model; after step: equals the eager model with W * mask."""
    torch.manual_seed(0)
    model = MixedNet()
    x = torch.randn(MIXED_INPUT)
    gm = prepare(model, sparsifier=WeightNormSparsifier(sparsity_level=0.6, sparse_block_shape=(1, 2)))
    check_against_eager(gm, model, x)
    sparsifier = get_sparsifier(gm)
    sparsifier.step()
    assert all(not gm.get_buffer(f"{g['tensor_fqn']}_mask").all() for g in sparsifier.groups)
    check_against_eager(gm, masked_reference(model, gm, sparsifier), x)


def test_user_model_is_never_modified():
    """prepare, step, squash and convert leave the user's modules, buffers, attributes and values as they were."""
    torch.manual_seed(1)
    model = MixedNet()
    before = snapshot(model)
    gm = prepare(model)
    sparsifier = get_sparsifier(gm)
    sparsifier.step()
    sparsifier.convert(gm, {nn.Linear: MockSparseLinear})
    sparsifier.squash_mask()
    after = snapshot(model)
    assert after["ids"] == before["ids"] and after["modules"] == before["modules"] and after["attrs"] == before["attrs"]
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert gm.fc.weight is not model.fc.weight  # squash made a new tensor
    assert gm.conv.bias is model.conv.bias  # untouched tensors stay shared


def test_parameters_shared_and_gradients_flow():
    """Parameters are the model's objects; gradients reach them through the mask, zero where masked."""
    torch.manual_seed(2)
    model = SimpleLinear()
    gm = prepare(model, ["linear1"], sparsifier=NearlyDiagonalSparsifier(1))
    assert gm.get_parameter("linear1.weight") is model.linear1.weight
    get_sparsifier(gm).step()
    gm(torch.randn(5, 7)).sum().backward()
    grad = model.linear1.weight.grad
    assert grad is not None
    assert torch.all(grad[~torch.eye(4, dtype=torch.bool)] == 0) and grad.diag().abs().sum() > 0
    assert not gm.linear1.weight_mask.requires_grad


@pytest.mark.parametrize("bias", [True, False])
def test_conv_forms(bias):
    """Conv1d (circular padding, stride, dilation, groups) and Conv3d ('same') rewrite and fuse exactly."""
    torch.manual_seed(3)
    model = ConvNet1d3d()
    if not bias:
        model.c1.bias = None
    inputs = (torch.randn(2, 4, 16), torch.randn(1, 2, 4, 6, 6))
    gm = prepare(model, sparsifier=WeightNormSparsifier(0.5, (1, 2)))
    check_against_eager(gm, model, *inputs)
    sparsifier = get_sparsifier(gm)
    sparsifier.step()
    reference = masked_reference(model, gm, sparsifier)
    check_against_eager(gm, reference, *inputs)
    sparsifier.squash_mask()
    assert count_nodes(gm)[("call_module", "c1")] == 1
    check_against_eager(gm, reference, *inputs)


def test_export_captured_model():
    """ControlFlowNet through torch.export: masks on aten.linear, numerics and squash as with tracing."""
    torch.manual_seed(4)
    model = ControlFlowNet()
    x = torch.randn(4, 6)
    gm = prepare(model, example_inputs=(x,), sparsifier=WeightNormSparsifier(0.5, (1, 1)))
    assert get_capture(gm).method == "export"
    assert count_nodes(gm)[("call_function", operator.mul)] == 2
    sparsifier = get_sparsifier(gm)
    sparsifier.step()
    reference = masked_reference(model, gm, sparsifier)
    check_against_eager(gm, reference, x)
    sparsifier.squash_mask()
    check_against_eager(gm, reference, x)
    assert not masked_targets(gm)


def test_fuse_restores_graph_and_keeps_ties():
    """fuse_masks: mul nodes and buffers gone, call_module restored, tied weights stay one tensor."""
    torch.manual_seed(5)
    model = MixedNet()
    gm = insert_masks(capture(model), find_weights(capture(model)))
    gm.shared.weight_mask[:, ::2] = 0
    gm.head_weight_mask[0] = 0
    x = torch.randn(MIXED_INPUT)
    expected = gm(x)
    fuse_masks(gm)
    counts = count_nodes(gm)
    assert ("call_function", operator.mul) not in counts
    assert counts[("call_module", "shared")] == 2 and counts[("call_module", "tied")] == 1
    assert counts[("call_module", "conv_reflect")] == 1
    assert ("call_function", F.pad) not in counts
    assert not [n for n, _ in gm.named_buffers() if n.endswith("_mask")]
    assert gm.shared.weight is gm.tied.weight
    assert torch.all(gm.shared.weight[:, ::2] == 0) and torch.all(model.shared.weight[:, ::2] != 0)
    torch.testing.assert_close(gm(x), expected)


def test_insert_twice_is_refused_before_mutation():
    """Masking an already-masked weight raises and changes nothing."""
    gm = capture(SimpleLinear())
    matches = find_weights(gm)
    insert_masks(gm, matches)
    code = gm.code
    with pytest.raises(ValueError, match="already has an attribute 'weight_mask'"):
        insert_masks(gm, matches)
    assert gm.code == code


def test_step_after_squash_raises():
    """step() after squash_mask() says the masks are gone."""
    gm = prepare(SimpleLinear())
    sparsifier = get_sparsifier(gm)
    sparsifier.squash_mask()
    with pytest.raises(RuntimeError, match="squash_mask"):
        sparsifier.step()


def test_get_sparsifier_errors():
    """get_sparsifier on an unprepared module, prepare with a non-sparsifier."""
    with pytest.raises(ValueError, match="not prepared"):
        get_sparsifier(torch.fx.symbolic_trace(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="sparsifier must be"):
        prepare(SimpleLinear(), sparsifier=object())


def test_given_sparsifier_is_the_one_prepared():
    """prepare(model, sparsifier=s): s.groups refer to the returned module."""
    sparsifier = WeightNormSparsifier()
    gm = prepare(SimpleLinear(), ["linear1"], sparsifier=sparsifier)
    assert get_sparsifier(gm) is sparsifier and sparsifier.model is gm
    assert sparsifier.groups[0]["module"] is gm.linear1


def test_squash_mask_argument_errors():
    """Unknown layers or keys in params_to_keep* raise ValueError before squashing."""
    gm = prepare(SimpleLinear())
    sparsifier = get_sparsifier(gm)
    with pytest.raises(ValueError, match="not sparsified modules"):
        sparsifier.squash_mask(params_to_keep_per_layer={"nope": ("sparsity_level",)})
    with pytest.raises(ValueError, match="cannot keep"):
        sparsifier.squash_mask(params_to_keep=("nope",))
    assert masked_targets(gm)


def test_load_state_dict_errors():
    """A group without a mask in the prepared module, or a wrong mask shape, is refused."""
    source = WeightNormSparsifier()
    source.prepare(SimpleLinear(), ["linear2"])
    state = source.state_dict()
    target = WeightNormSparsifier()
    target.prepare(SimpleLinear(), ["linear1"])
    with pytest.raises(ValueError, match="has no mask in the prepared model"):
        target.load_state_dict(state)
    # linear2 has no mask here: dropped; the state dict's groups replace the target's (torch.ao.pruning), so
    # linear1 keeps its mask but is no longer stepped, which a warning says
    with pytest.warns(UserWarning, match=r"no group for \['linear1.weight'\].*no longer stepped"):
        target.load_state_dict(state, strict=False)
    assert [r.tensor_fqn for r in target.records] == []
    state = WeightNormSparsifier()
    state.prepare(SimpleLinear(), ["linear1"])
    sd = state.state_dict()
    sd["state"]["linear1.weight"]["mask"] = torch.ones(2, 2)
    target = WeightNormSparsifier()
    target.prepare(SimpleLinear(), ["linear1"])
    with pytest.raises(ValueError, match="shape"):
        target.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="prepare"):
        WeightNormSparsifier().load_state_dict(sd)


def test_load_state_dict_refuses_before_changing_anything():
    """Another sparsifier's state, malformed states and bad arguments are refused, and the sparsifier and its masks
    are unchanged afterwards; a state dict lacking a group loads (its groups replace the sparsifier's, as in
    torch.ao.pruning) with a warning naming the weight, which keeps its mask and is no longer stepped."""
    source = WeightNormSparsifier(sparsity_level=0.9)
    gm_source = source.prepare(SimpleLinear(), None)
    source.step()
    target = WeightNormSparsifier()
    gm = target.prepare(SimpleLinear(), None)
    before = (target.records, {k: v.clone() for k, v in gm.state_dict().items() if k.endswith("_mask")})

    other = NearlyDiagonalSparsifier(1)
    other.prepare(SimpleLinear(), None)
    with pytest.raises(ValueError, match="comes from a .*NearlyDiagonalSparsifier"):
        target.load_state_dict(other.state_dict())
    for bad in ([], {"state": {}}, {"state": [], "groups": []}, {"state": {}, "groups": "x"},
                {"state": {}, "groups": [{"module_fqn": "linear1"}]}):
        with pytest.raises(ValueError, match="state_dict"):
            target.load_state_dict(bad)
    sd = source.state_dict()
    sd["groups"][0]["sparsity_level"] = float("nan")
    with pytest.raises(ValueError, match="sparsity_level of seq.0.weight must be a number, got NaN"):
        target.load_state_dict(sd)
    sd = source.state_dict()
    sd["groups"][0]["sparsity_levle"] = 0.5
    with pytest.raises(ValueError, match="did you mean 'sparsity_level'"):
        target.load_state_dict(sd)
    assert target.records == before[0]
    assert all(torch.equal(gm.get_buffer(k), v) for k, v in before[1].items())

    sd = source.state_dict()
    del sd["groups"][1]
    with pytest.warns(UserWarning, match=r"no group for \['seq.1.weight'\].*no longer stepped"):
        target.load_state_dict(sd)
    assert [r.tensor_fqn for r in target.records] == [r.tensor_fqn for r in source.records if r.tensor_fqn != "seq.1.weight"]
    assert all(r.args["sparsity_level"] == 0.9 for r in target.records)
    assert torch.equal(gm.get_buffer("seq.0.weight_mask"), gm_source.get_buffer("seq.0.weight_mask"))
    assert bool(gm.get_buffer("seq.1.weight_mask").all())
    target.step()
    assert bool(gm.get_buffer("seq.1.weight_mask").all()), "a weight the state dict has no group for is not stepped"


def test_state_dict_after_squash_mask():
    """state_dict() after squash_mask() returns the groups and state, without masks."""
    sparsifier = WeightNormSparsifier()
    sparsifier.prepare(SimpleLinear(), ["linear1"])
    sparsifier.step()
    sparsifier.squash_mask()
    sd = sparsifier.state_dict()
    assert sd["groups"][0]["tensor_fqn"] == "linear1.weight"
    assert sd["state"] == {} and sparsifier.steps == 1


def test_convert_errors():
    """convert needs a mapping of classes with from_dense."""
    gm = prepare(SimpleLinear())
    sparsifier = get_sparsifier(gm)
    with pytest.raises(ValueError, match="mapping"):
        sparsifier.convert(gm, {})
    with pytest.raises(TypeError, match="from_dense"):
        sparsifier.convert(gm, {nn.Linear: nn.Conv2d})
