"""Masks are stored in the weight's dtype by default (torch.ao.pruning's contract), or as bool with
``prepare(..., mask_dtype=torch.bool)`` (one byte per weight), everywhere they live.

The mask buffers ``<module>.<tensor>_mask``, what every sparsifier's ``step`` writes, ``state_dict`` and the
config's initial ``"mask"`` keep the dtype the module was prepared with. Numerics of bool masks are checked against
the same module holding masks of the weight's dtype with the same values, bit for bit: prepared forward and
backward, ``lower`` to every CPU backend and ``squash_mask``; torch.export and torch.compile run both. State dicts
of either dtype (torch.ao.pruning's included) load into either; a bool mask must hold 0/1, a float mask finite
values (a float mask multiplies the weight, as in torch.ao.pruning), and other values are refused before anything
changes.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.ao.pruning import NearlyDiagonalSparsifier as AONearlyDiagonal
from torch.ao.pruning import WeightNormSparsifier as AOWeightNorm

from fx_sparsity import (
    ChannelPruner,
    GlobalMagnitudeSparsifier,
    MagnitudeSparsifier,
    NearlyDiagonalSparsifier,
    NMSparsifier,
    SparseGPTSparsifier,
    WandaSparsifier,
    WeightNormSparsifier,
    get_sparsifier,
    prepare,
)
from fx_sparsity.calibration import calibrate
from fx_sparsity.lowering import lower
from fx_sparsity.report import sparsity_table
from fx_sparsity.sparsifier.mask_utils import as_mask, to_bool_mask
from helpers import LinearNet, SimpleLinear, ThreeLinear
from passes import masked_targets

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TWO_FOUR = {"sparsity_level": 1.0, "sparse_block_shape": (1, 4), "zeros_per_block": 2}


def _prepared_pair(dtype: torch.dtype, **sparsifier_args):
    """(bool-mask module, default module) of one LinearNet in ``dtype``, each stepped by its own sparsifier.

    The first is prepared with ``mask_dtype=torch.bool``, the second with the default (masks of the weight's
    dtype); their masks hold equal values (checked), and the two modules own separate copies of the weights, so
    their gradients can be compared.
    """
    torch.manual_seed(0)
    model = LinearNet().to(dtype)
    gm = prepare(model, sparsifier=WeightNormSparsifier(**sparsifier_args), mask_dtype=torch.bool)
    get_sparsifier(gm).step()
    old = prepare(copy.deepcopy(model), sparsifier=WeightNormSparsifier(**sparsifier_args))
    get_sparsifier(old).step()
    for target in masked_targets(old):
        assert torch.equal(old.get_buffer(target.mask_fqn), gm.get_buffer(target.mask_fqn))
    return gm, old


def _masks(gm) -> dict[str, torch.Tensor]:
    return {f"{t.tensor_fqn}": gm.get_buffer(t.mask_fqn) for t in masked_targets(gm)}


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_buffers_default_to_the_weight_dtype_bool_takes_one_byte(dtype):
    """LinearNet in fp32/bf16/fp16: by default every mask buffer has its weight's dtype, shape and device (as
    torch.ao.pruning's); with mask_dtype=torch.bool it is bool, one byte per entry (a quarter of an fp32 weight's
    bytes, half of a bf16 one's); either way the output keeps the weight's dtype."""
    gm, old = _prepared_pair(dtype, sparsity_level=0.5, sparse_block_shape=(1, 1))
    for fqn, mask in _masks(old).items():
        weight = old.get_parameter(fqn)
        assert mask.dtype == weight.dtype and mask.shape == weight.shape and mask.device == weight.device
        assert 0 < int(mask.count_nonzero()) < mask.numel()
    for fqn, mask in _masks(gm).items():
        weight = gm.get_parameter(fqn)
        assert mask.dtype == torch.bool and mask.shape == weight.shape and mask.device == weight.device
        assert mask.nbytes == weight.numel() == weight.nbytes // weight.element_size()
        assert 0 < int(mask.count_nonzero()) < mask.numel()
    assert gm(torch.randn(3, 64, dtype=dtype)).dtype == old(torch.randn(3, 64, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_weight_gradients_equal_float_masks(dtype):
    """LinearNet: with bool masks, outputs and the gradients reaching the weights (and bias) are bit-identical to
    the same module with masks of the weight's dtype; the masked entries get zero gradient, and no gradient flows
    into a mask."""
    gm, old = _prepared_pair(dtype, sparsity_level=0.5, sparse_block_shape=(1, 1))
    x = torch.randn(5, 64, dtype=dtype)
    out, out_old = gm(x), old(x)
    assert torch.equal(out, out_old)
    out.square().sum().backward()
    out_old.square().sum().backward()
    for name, param in gm.named_parameters():
        assert torch.equal(param.grad, old.get_parameter(name).grad), name
    for fqn, mask in _masks(gm).items():
        assert not mask.requires_grad
        assert torch.all(gm.get_parameter(fqn).grad[~mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["fuse", "bitmask", "nm", "csr"])
def test_lower_and_squash_equal_float_masks(backend, dtype):
    """LinearNet, 2:4 masks: lower() to each CPU backend, and squash_mask(), give bit-identical outputs and fused
    weights whether the masks are bool or of the weight's dtype (lowering reads the values, not the storage)."""
    gm, old = _prepared_pair(dtype, **TWO_FOUR)
    x = torch.randn(3, 64, dtype=dtype)
    assert torch.equal(lower(gm, backend)(x), lower(old, backend)(x))
    squashed, squashed_old = get_sparsifier(gm).squash_mask(), get_sparsifier(old).squash_mask()
    for name, param in squashed.named_parameters():
        assert torch.equal(param, squashed_old.get_parameter(name)), name
    assert not [n for n, _ in squashed.named_buffers() if n.endswith("_mask")]


@pytest.mark.parametrize("bool_masks", [True, False])
def test_export_keeps_the_mask_dtype_and_matches(bool_masks):
    """LinearNet: torch.export of the prepared module keeps the masks in their dtype (bool, or the weight's), and the
    exported program (also after run_decompositions) computes exactly what the prepared module does."""
    pair = _prepared_pair(torch.float32, sparsity_level=0.5, sparse_block_shape=(1, 1))
    gm = pair[0] if bool_masks else pair[1]
    x = torch.randn(4, 64)
    ep = torch.export.export(gm, (x,))
    masks = {k: v for k, v in ep.state_dict.items() if k.endswith("_mask")}
    assert set(masks) == {f"{fqn}_mask" for fqn in _masks(gm)}
    assert all(v.dtype == (torch.bool if bool_masks else torch.float32) for v in masks.values())
    assert torch.equal(ep.module()(x), gm(x))
    assert torch.equal(ep.run_decompositions().module()(x), gm(x))


def test_compile_runs_bool_masks_forward_and_backward():
    """LinearNet: torch.compile(fullgraph=True) (inductor) of the prepared module matches its outputs and the
    gradients reaching its weights."""
    gm, old = _prepared_pair(torch.float32, sparsity_level=0.5, sparse_block_shape=(1, 1))
    x = torch.randn(4, 64)
    compiled = torch.compile(gm, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, old(x))
    out.sum().backward()
    old(x).sum().backward()
    for name, param in gm.named_parameters():
        torch.testing.assert_close(param.grad, old.get_parameter(name).grad)


def _step(sparsifier, model, batches=None, **kwargs):
    gm = sparsifier.prepare(model, None, **kwargs)
    if batches is not None:
        calibrate(gm, batches, progress_bar=False)
    sparsifier.step()
    return gm


SPARSIFIERS = {
    "weight_norm": lambda: WeightNormSparsifier(0.5, (1, 4)),
    "magnitude": lambda: MagnitudeSparsifier(0.5),
    "global_magnitude": lambda: GlobalMagnitudeSparsifier(0.5),
    "nm": lambda: NMSparsifier(2, 4),
    "wanda": lambda: WandaSparsifier(0.5),
    "wanda_nm": lambda: WandaSparsifier(nm=(2, 4)),
    "sparsegpt": lambda: SparseGPTSparsifier(0.5, block_size=8),
    "sparsegpt_nm": lambda: SparseGPTSparsifier(nm=(2, 4), block_size=8),
    "nearly_diagonal": lambda: NearlyDiagonalSparsifier(3),
    "channel": lambda: ChannelPruner(sparsity_level=0.5),
}


@pytest.mark.parametrize("mask_dtype", [None, torch.bool])
@pytest.mark.parametrize("name", list(SPARSIFIERS))
def test_every_sparsifier_keeps_the_mask_dtype_and_reports_count_them(name, mask_dtype):
    """ThreeLinear, each sparsifier, masks of the weight's dtype or bool: after step() (calibrated where it needs
    statistics) every mask keeps its dtype, holds only 0/1 with entries pruned, state_dict's masks have that dtype,
    and sparsity_table's nonzeros / total are the masks' own counts."""
    torch.manual_seed(0)
    sparsifier = SPARSIFIERS[name]()
    batches = [torch.randn(16, 24) for _ in range(4)] if name.startswith(("wanda", "sparsegpt")) else None
    kwargs = {"example_inputs": torch.randn(2, 24)} if name == "channel" else {}
    gm = _step(sparsifier, ThreeLinear(), batches, mask_dtype=mask_dtype, **kwargs)
    masks = _masks(gm)
    expected = mask_dtype or torch.float32
    assert masks
    assert all(m.dtype == expected and bool(((m == 0) | (m == 1)).all()) for m in masks.values())
    assert any(not m.all() for m in masks.values())
    assert sparsifier.state_dict()["state"] and all(
        s["mask"].dtype == expected for s in sparsifier.state_dict()["state"].values()
    )
    table = sparsity_table(gm, sparsifier)
    for mask in masks.values():
        assert f"{int(mask.float().sum()):,} / {mask.numel():,}" in table


@pytest.mark.parametrize("mask_dtype", [None, torch.bool])
def test_masks_equal_torch_ao_bit_for_bit(mask_dtype):
    """SimpleLinear: WeightNorm (2:4 and 1x1 blocks) and NearlyDiagonal masks equal torch.ao.pruning's, value for
    value; ours keep the weight's dtype (torch.ao's 2:4 step turns its float mask into a bool one) or are bool."""
    every = [f"{m}.weight" for m in ("seq.0", "seq.1", "seq.2", "linear1", "linear2")]
    cases = [  # torch.ao pads the mask of a weight that (1, 4) blocks do not divide: 2:4 on 4-column weights only
        (lambda: WeightNormSparsifier(**TWO_FOUR), lambda: AOWeightNorm(**TWO_FOUR), ["linear1.weight", "linear2.weight"]),
        (lambda: WeightNormSparsifier(0.6, (1, 1)), lambda: AOWeightNorm(0.6, (1, 1)), every),
        (lambda: NearlyDiagonalSparsifier(3), lambda: AONearlyDiagonal(3), every),
    ]
    for ours_fn, ao_fn, fqns in cases:
        config = [{"tensor_fqn": fqn} for fqn in fqns]
        torch.manual_seed(0)
        model = SimpleLinear()
        ao_model = copy.deepcopy(model)
        ours, ao = ours_fn(), ao_fn()
        gm = ours.prepare(model, config, mask_dtype=mask_dtype)
        ao.prepare(ao_model, copy.deepcopy(config))
        ours.step()
        ao.step()
        for entry in config:
            fqn = entry["tensor_fqn"]
            ao_mask = ao_model.get_submodule(fqn.rsplit(".", 1)[0]).parametrizations.weight[0].mask
            mask = gm.get_buffer(f"{fqn}_mask")
            assert mask.dtype == (mask_dtype or torch.float32)
            assert torch.equal(mask, ao_mask == 1) and torch.equal(mask, ao_mask.bool()), fqn
            assert torch.equal(mask, ao_mask.to(mask.dtype)), fqn


@pytest.mark.parametrize("mask_dtype", [None, torch.bool])
def test_load_torch_ao_state_dict(mask_dtype):
    """SimpleLinear: a torch.ao.pruning WeightNormSparsifier's state_dict (float masks, its group format) loads
    into ours prepared with the same config; the masks keep the module's dtype (float by default, or bool) and
    equal torch.ao's, and our state_dict then holds masks of that dtype."""
    config = [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "linear2.weight"}]
    torch.manual_seed(0)
    model = SimpleLinear()
    ao_model = copy.deepcopy(model)
    ao = AOWeightNorm(sparsity_level=0.5, sparse_block_shape=(1, 1))
    ao.prepare(ao_model, copy.deepcopy(config))
    ao.step()
    ao_state = ao.state_dict()
    assert all(s["mask"].dtype == torch.float32 for s in ao_state["state"].values())
    ours = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    gm = ours.prepare(model, config, mask_dtype=mask_dtype)
    ours.load_state_dict(ao_state)
    expected = mask_dtype or torch.float32
    for entry in config:
        fqn = entry["tensor_fqn"]
        mask = gm.get_buffer(f"{fqn}_mask")
        assert mask.dtype == expected and not mask.all()
        assert torch.equal(mask, ao_state["state"][fqn]["mask"] == 1)
        assert ours.state_dict()["state"][fqn]["mask"].dtype == expected


@pytest.mark.parametrize("mask_dtype", [None, torch.bool])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool])
def test_load_state_dict_accepts_zero_one_masks_of_any_dtype(dtype, mask_dtype):
    """SimpleLinear: a state dict whose masks are 0/1 in ``dtype`` (an fx_sparsity 0.1.0 bool state dict, float
    masks, ints) loads into a module prepared with bool masks or masks of the weight's dtype; the buffers keep their
    dtype and take the values. The prepared module's own load_state_dict takes them too."""
    source = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    source_gm = source.prepare(SimpleLinear(), None)
    source.step()
    state = source.state_dict()
    for entry in state["state"].values():
        entry["mask"] = entry["mask"].to(dtype)
    target = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    gm = target.prepare(SimpleLinear(), None, mask_dtype=mask_dtype)
    target.load_state_dict(state)
    for fqn, mask in _masks(gm).items():
        assert mask.dtype == (mask_dtype or torch.float32) and torch.equal(mask, source_gm.get_buffer(f"{fqn}_mask"))
    module_state = {k: (v.to(dtype) if k.endswith("_mask") else v) for k, v in source_gm.state_dict().items()}
    fresh = prepare(SimpleLinear(), mask_dtype=mask_dtype)
    fresh.load_state_dict(module_state)
    for fqn, mask in _masks(fresh).items():
        assert mask.dtype == (mask_dtype or torch.float32) and torch.equal(mask, source_gm.get_buffer(f"{fqn}_mask"))


@pytest.mark.parametrize("bad, mask_dtype", [
    (0.5, torch.bool), (float("nan"), torch.bool), (2.0, torch.bool), (-1.0, torch.bool),
    (float("nan"), None), (float("inf"), None),
])
def test_load_state_dict_refuses_other_values_before_changing_anything(bad, mask_dtype):
    """SimpleLinear: a state dict mask a bool mask cannot hold (a value other than 0/1), or a float mask cannot (NaN,
    inf), is a ValueError naming the weight and the value; the masks, groups and state stay as they were."""
    source = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    source.prepare(SimpleLinear(), None)
    source.step()
    state = source.state_dict()
    state["state"]["linear1.weight"]["mask"] = state["state"]["linear1.weight"]["mask"].float()
    state["state"]["linear1.weight"]["mask"][0, 0] = bad
    target = WeightNormSparsifier(sparsity_level=0.3, sparse_block_shape=(1, 1))
    gm = target.prepare(SimpleLinear(), None, mask_dtype=mask_dtype)
    before = ({k: v.clone() for k, v in _masks(gm).items()}, target.records, dict(target.state))
    what = "only 0 and 1" if mask_dtype == torch.bool else "finite values"
    with pytest.raises(ValueError, match=rf"state_dict mask of 'linear1.weight' must hold {what}.*e\.g\. "):
        target.load_state_dict(state)
    masks, records, st = before
    assert all(torch.equal(v, _masks(gm)[k]) for k, v in masks.items())
    assert target.records == records and dict(target.state) == st


@pytest.mark.parametrize("stored", [None, torch.bool])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bfloat16, torch.int32, torch.bool])
def test_initial_mask_from_config_accepts_zero_one_and_bool(mask_dtype, stored):
    """SimpleLinear: the config key "mask" takes 0/1 masks of any numeric dtype or bool and stores them in the
    module's mask dtype (the weight's, or bool)."""
    keep = torch.rand(4, 4) > 0.5
    gm = prepare(SimpleLinear(), {"linear1": {"mask": keep.to(mask_dtype)}}, mask_dtype=stored)
    mask = gm.get_buffer("linear1.weight_mask")
    assert mask.dtype == (stored or torch.float32) and torch.equal(mask, keep)


def test_initial_float_mask_keeps_its_values():
    """SimpleLinear: masks of the weight's dtype multiply the weight, as torch.ao.pruning's do, so an initial "mask"
    of other finite values (0.5) is kept as it is and the prepared module computes weight * mask."""
    mask = torch.ones(4, 4)
    mask[1, 2] = 0.5
    model = SimpleLinear()
    gm = prepare(model, {"linear1": {"mask": mask}})
    assert torch.equal(gm.get_buffer("linear1.weight_mask"), mask)
    x = torch.randn(2, 7)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.linear1.weight.mul_(mask)
    torch.testing.assert_close(gm(x), reference(x))


@pytest.mark.parametrize("bad, stored", [
    (0.5, torch.bool), (float("nan"), torch.bool), (float("inf"), torch.bool), (3.0, torch.bool),
    (float("nan"), None), (float("inf"), None),
])
def test_initial_mask_refuses_other_values(bad, stored):
    """SimpleLinear: an initial "mask" a bool mask cannot hold (not 0/1), or a float mask cannot (NaN, inf), is a
    ValueError naming the config entry."""
    mask = torch.ones(4, 4)
    mask[1, 2] = bad
    model = SimpleLinear()
    what = "only 0 and 1" if stored == torch.bool else "finite values"
    with pytest.raises(ValueError, match=re.escape(f"config entry for linear1.weight: 'mask' must hold {what}")):
        prepare(model, {"linear1": {"mask": mask}}, mask_dtype=stored)


def test_to_bool_mask():
    """to_bool_mask: bool passes through as the same tensor, 0/1 of other dtypes convert, the rest is refused."""
    keep = torch.tensor([True, False])
    assert to_bool_mask(keep) is keep
    assert torch.equal(to_bool_mask(torch.tensor([1, 0], dtype=torch.uint8)), keep)
    assert to_bool_mask(torch.ones(2, 3, device="meta")).dtype == torch.bool
    with pytest.raises(ValueError, match=r"1 of its 2 values are not, e.g. 0.25"):
        to_bool_mask(torch.tensor([1.0, 0.25]))
    with pytest.raises(TypeError, match="complex"):
        to_bool_mask(torch.ones(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="got list"):
        to_bool_mask([1, 0])


def test_bool_mask_memory_is_a_quarter_of_fp32_weights():
    """nn.Linear(256, 256) in fp32: with mask_dtype=torch.bool the prepared module's mask takes 64 KiB (one byte per
    weight) next to the 256 KiB weight; by default it takes the weight's 256 KiB."""
    gm = prepare(nn.Sequential(nn.Linear(256, 256)), mask_dtype=torch.bool)
    mask, weight = gm.get_buffer("0.weight_mask"), gm.get_parameter("0.weight")
    assert (mask.nbytes, weight.nbytes) == (64 << 10, 256 << 10)
    assert prepare(nn.Sequential(nn.Linear(256, 256))).get_buffer("0.weight_mask").nbytes == 256 << 10


@pytest.mark.parametrize("bad", [torch.int8, torch.int64, "bool", bool])
def test_mask_dtype_refuses_what_cannot_hold_a_mask(bad):
    """prepare(mask_dtype=...) takes None, torch.bool or a floating dtype; an integer dtype, a string or a Python
    type is a TypeError naming the argument, before anything is captured."""
    with pytest.raises(TypeError, match="mask_dtype must be None"):
        prepare(SimpleLinear(), mask_dtype=bad)


def test_as_mask():
    """as_mask: to bool only 0/1 (any dtype), to a float dtype any finite value, NaN/inf refused either way."""
    assert torch.equal(as_mask(torch.tensor([1, 0]), torch.bool), torch.tensor([True, False]))
    assert torch.equal(as_mask(torch.tensor([2.0, 0.25]), torch.float32), torch.tensor([2.0, 0.25]))
    assert as_mask(torch.tensor([True, False]), torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="must hold finite values"):
        as_mask(torch.tensor([1.0, float("nan")]), torch.float32)
    with pytest.raises(ValueError, match="must hold only 0 and 1"):
        as_mask(torch.tensor([1.0, 2.0]), torch.bool)
