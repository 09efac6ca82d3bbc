"""Masks are stored as bool (one byte per weight, whatever the weight's dtype), everywhere they live.

The mask buffers ``<module>.<tensor>_mask``, what every sparsifier's ``step`` writes, ``state_dict`` and the
config's initial ``"mask"``. Numerics are checked against the same module holding float masks of the same values
(the form masks had before), bit for bit: prepared forward and backward, ``lower`` to every CPU backend and
``squash_mask``; torch.export and torch.compile run the bool masks. Older float state dicts, torch.ao.pruning's
state dicts and 0/1 masks of any numeric dtype load; other values are refused before anything changes.
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
from fx_sparsity.sparsifier.mask_utils import to_bool_mask
from helpers import LinearNet, SimpleLinear, ThreeLinear
from passes import masked_targets

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TWO_FOUR = {"sparsity_level": 1.0, "sparse_block_shape": (1, 4), "zeros_per_block": 2}


def _prepared_pair(dtype: torch.dtype, **sparsifier_args):
    """(bool-mask module, float-mask module) of one LinearNet in ``dtype``, stepped, with equal mask values.

    The second holds each mask as a tensor of its weight's dtype, the form masks had before they became bool;
    the two modules own separate copies of the weights, so their gradients can be compared.
    """
    torch.manual_seed(0)
    model = LinearNet().to(dtype)
    gm = prepare(model, sparsifier=WeightNormSparsifier(**sparsifier_args))
    get_sparsifier(gm).step()
    old = prepare(copy.deepcopy(model), sparsifier=WeightNormSparsifier(**sparsifier_args))
    for target in masked_targets(old):
        owner = old.get_submodule(target.module_fqn)
        weight = getattr(owner, target.tensor_name)
        owner.register_buffer(target.mask_name, gm.get_buffer(target.mask_fqn).to(weight.dtype))
    return gm, old


def _masks(gm) -> dict[str, torch.Tensor]:
    return {f"{t.tensor_fqn}": gm.get_buffer(t.mask_fqn) for t in masked_targets(gm)}


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_buffers_are_bool_one_byte_per_weight(dtype):
    """LinearNet in fp32/bf16/fp16: every mask buffer is bool of the weight's shape and device, one byte per
    entry (a quarter of an fp32 weight's bytes, half of a bf16 one's), and the output keeps the weight's dtype."""
    gm, _ = _prepared_pair(dtype, sparsity_level=0.5, sparse_block_shape=(1, 1))
    for fqn, mask in _masks(gm).items():
        weight = gm.get_parameter(fqn)
        assert mask.dtype == torch.bool and mask.shape == weight.shape and mask.device == weight.device
        assert mask.nbytes == weight.numel() == weight.nbytes // weight.element_size()
        assert 0 < int(mask.count_nonzero()) < mask.numel()
    assert gm(torch.randn(3, 64, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_weight_gradients_equal_float_masks(dtype):
    """LinearNet: outputs and the gradients reaching the weights (and bias) are bit-identical to the same module
    with float masks; the masked entries get zero gradient, and no gradient flows into a mask."""
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
    weights whether the masks are bool or float (lowering reads the values, not the storage)."""
    gm, old = _prepared_pair(dtype, **TWO_FOUR)
    x = torch.randn(3, 64, dtype=dtype)
    assert torch.equal(lower(gm, backend)(x), lower(old, backend)(x))
    squashed, squashed_old = get_sparsifier(gm).squash_mask(), get_sparsifier(old).squash_mask()
    for name, param in squashed.named_parameters():
        assert torch.equal(param, squashed_old.get_parameter(name)), name
    assert not [n for n, _ in squashed.named_buffers() if n.endswith("_mask")]


def test_export_keeps_bool_masks_and_matches():
    """LinearNet: torch.export of the prepared module keeps the masks as bool buffers, and the exported program
    (also after run_decompositions) computes exactly what the prepared module does."""
    gm, _ = _prepared_pair(torch.float32, sparsity_level=0.5, sparse_block_shape=(1, 1))
    x = torch.randn(4, 64)
    ep = torch.export.export(gm, (x,))
    masks = {k: v for k, v in ep.state_dict.items() if k.endswith("_mask")}
    assert set(masks) == {f"{fqn}_mask" for fqn in _masks(gm)}
    assert all(v.dtype == torch.bool for v in masks.values())
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


@pytest.mark.parametrize("name", list(SPARSIFIERS))
def test_every_sparsifier_writes_bool_masks_and_reports_count_them(name):
    """ThreeLinear, each sparsifier: after step() (calibrated where it needs statistics) every mask is still a
    bool buffer with entries pruned, and sparsity_table's nonzeros / total are the masks' own counts."""
    torch.manual_seed(0)
    sparsifier = SPARSIFIERS[name]()
    batches = [torch.randn(16, 24) for _ in range(4)] if name.startswith(("wanda", "sparsegpt")) else None
    kwargs = {"example_inputs": torch.randn(2, 24)} if name == "channel" else {}
    gm = _step(sparsifier, ThreeLinear(), batches, **kwargs)
    masks = _masks(gm)
    assert masks
    assert all(m.dtype == torch.bool for m in masks.values())
    assert any(not m.all() for m in masks.values())
    assert sparsifier.state_dict()["state"] and all(
        s["mask"].dtype == torch.bool for s in sparsifier.state_dict()["state"].values()
    )
    table = sparsity_table(gm, sparsifier)
    for mask in masks.values():
        assert f"{int(mask.float().sum()):,} / {mask.numel():,}" in table


def test_masks_equal_torch_ao_bit_for_bit():
    """SimpleLinear: WeightNorm (2:4 and 1x1 blocks) and NearlyDiagonal masks are bool and equal torch.ao.pruning's
    float masks compared as ``== 1``."""
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
        gm = ours.prepare(model, config)
        ao.prepare(ao_model, copy.deepcopy(config))
        ours.step()
        ao.step()
        for entry in config:
            fqn = entry["tensor_fqn"]
            ao_mask = ao_model.get_submodule(fqn.rsplit(".", 1)[0]).parametrizations.weight[0].mask
            mask = gm.get_buffer(f"{fqn}_mask")
            assert mask.dtype == torch.bool
            assert torch.equal(mask, ao_mask == 1) and torch.equal(mask, ao_mask.bool()), fqn


def test_load_torch_ao_state_dict():
    """SimpleLinear: a torch.ao.pruning WeightNormSparsifier's state_dict (float masks, its group format) loads
    into ours prepared with the same config; the masks become bool and equal torch.ao's, and our state_dict
    then holds bool masks."""
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
    gm = ours.prepare(model, config)
    ours.load_state_dict(ao_state)
    for entry in config:
        fqn = entry["tensor_fqn"]
        mask = gm.get_buffer(f"{fqn}_mask")
        assert mask.dtype == torch.bool and not mask.all()
        assert torch.equal(mask, ao_state["state"][fqn]["mask"] == 1)
        assert ours.state_dict()["state"][fqn]["mask"].dtype == torch.bool


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool])
def test_load_state_dict_accepts_zero_one_masks_of_any_dtype(dtype):
    """SimpleLinear: a state dict whose masks are 0/1 in ``dtype`` (an older fx_sparsity's float masks, ints)
    loads; the buffers stay bool with the same values. The prepared module's own load_state_dict takes them too."""
    source = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    source_gm = source.prepare(SimpleLinear(), None)
    source.step()
    state = source.state_dict()
    for entry in state["state"].values():
        entry["mask"] = entry["mask"].to(dtype)
    target = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    gm = target.prepare(SimpleLinear(), None)
    target.load_state_dict(state)
    for fqn, mask in _masks(gm).items():
        assert mask.dtype == torch.bool and torch.equal(mask, source_gm.get_buffer(f"{fqn}_mask"))
    module_state = {k: (v.to(dtype) if k.endswith("_mask") else v) for k, v in source_gm.state_dict().items()}
    fresh = prepare(SimpleLinear())
    fresh.load_state_dict(module_state)
    for fqn, mask in _masks(fresh).items():
        assert mask.dtype == torch.bool and torch.equal(mask, source_gm.get_buffer(f"{fqn}_mask"))


@pytest.mark.parametrize("bad", [0.5, float("nan"), 2.0, -1.0])
def test_load_state_dict_refuses_other_values_before_changing_anything(bad):
    """SimpleLinear: a state dict mask holding a value other than 0/1 is a ValueError naming the weight and the
    value; the masks, groups and state stay as they were."""
    source = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    source.prepare(SimpleLinear(), None)
    source.step()
    state = source.state_dict()
    state["state"]["linear1.weight"]["mask"] = state["state"]["linear1.weight"]["mask"].float()
    state["state"]["linear1.weight"]["mask"][0, 0] = bad
    target = WeightNormSparsifier(sparsity_level=0.3, sparse_block_shape=(1, 1))
    gm = target.prepare(SimpleLinear(), None)
    before = ({k: v.clone() for k, v in _masks(gm).items()}, target.records, dict(target.state))
    with pytest.raises(ValueError, match=r"state_dict mask of 'linear1.weight' must hold only 0 and 1.*e\.g\. "):
        target.load_state_dict(state)
    masks, records, st = before
    assert all(torch.equal(v, _masks(gm)[k]) for k, v in masks.items())
    assert target.records == records and dict(target.state) == st


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bfloat16, torch.int32, torch.bool])
def test_initial_mask_from_config_accepts_zero_one_and_bool(mask_dtype):
    """SimpleLinear: the config key "mask" takes 0/1 masks of any numeric dtype or bool and stores them as bool."""
    keep = torch.rand(4, 4) > 0.5
    gm = prepare(SimpleLinear(), {"linear1": {"mask": keep.to(mask_dtype)}})
    mask = gm.get_buffer("linear1.weight_mask")
    assert mask.dtype == torch.bool and torch.equal(mask, keep)


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("inf"), 3.0])
def test_initial_mask_refuses_other_values(bad):
    """SimpleLinear: an initial "mask" with a value other than 0/1 is a ValueError naming the config entry."""
    mask = torch.ones(4, 4)
    mask[1, 2] = bad
    model = SimpleLinear()
    with pytest.raises(ValueError, match=re.escape("config entry for linear1.weight: 'mask' must hold only 0 and 1")):
        prepare(model, {"linear1": {"mask": mask}})


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


def test_mask_memory_is_a_quarter_of_fp32_weights():
    """nn.Linear(256, 256) in fp32: the prepared module's mask takes 64 KiB (one byte per weight) next to the
    256 KiB weight; as float masks did, it would take 256 KiB."""
    gm = prepare(nn.Sequential(nn.Linear(256, 256)))
    mask, weight = gm.get_buffer("0.weight_mask"), gm.get_parameter("0.weight")
    assert (mask.nbytes, weight.nbytes) == (64 << 10, 256 << 10)
