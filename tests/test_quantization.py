"""Quantization: the spec, round-to-nearest against torch.ao's observers and torch's own quantizer, GPTQ against a
direct per-column reference (and, when FX_SPARSITY_IST_REFERENCE points at IST-DASLab's code, against it), then
the flow on prepared modules: masks kept, weights dequantized, the user's model unchanged, calibrated through
calibrate and prune_sequential (under two gloo processes: tests/test_calibrate_distributed.py)."""

from __future__ import annotations

import copy
import importlib.util
import os
import pathlib
import sys

import pytest
import torch
from torch import nn
from torch.ao.quantization import PerChannelMinMaxObserver

import fx_sparsity
from fx_sparsity import MagnitudeSparsifier, NMSparsifier, WandaSparsifier, prepare
from fx_sparsity.calibration import calibrate
from fx_sparsity.quantization import (
    QuantizedWeight,
    QuantSpec,
    check_fits,
    dequantize,
    get_quantization,
    gptq_quantize,
    quantize,
    quantize_weight,
)
from helpers import correlated_inputs, grid_reference, snapshot, to_grid_reference
from passes.calibration import accumulate_hessian, input_rows

SPECS = ["int8", "int4-g32", "int4-g64", "int4-g128", "int4-g32-zp", "int4-g128-zp"]


# ---------------------------------------------------------------------------------------------------- the spec
@pytest.mark.parametrize(
    "name, spec",
    [
        ("int8", QuantSpec(8)),
        ("int4", QuantSpec(4, 128)),
        ("int4-g64", QuantSpec(4, 64)),
        ("int4-g128-zp", QuantSpec(4, 128, True)),
        ("INT4-G32-ZP", QuantSpec(4, 32, True)),
    ],
)
def test_spec_parses_short_names(name, spec):
    """The short names give the specs; str() gives the canonical name back, which parses to the same spec."""
    assert QuantSpec.parse(name) == spec
    assert QuantSpec.parse(str(spec)) == spec


def test_spec_grids():
    """int8 is [-127, 127]; symmetric int4 [-7, 7]; int4 with zero points [0, 15]; int4's group defaults to 128."""
    assert (QuantSpec(8).qmin, QuantSpec(8).qmax) == (-127, 127)
    assert (QuantSpec(4).qmin, QuantSpec(4).qmax, QuantSpec(4).group_size) == (-7, 7, 128)
    assert (QuantSpec(4, 32, True).qmin, QuantSpec(4, 32, True).qmax) == (0, 15)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: QuantSpec(3), ValueError, "bits must be 8 or 4, got 3"),
        (lambda: QuantSpec(True), TypeError, "bits"),
        (lambda: QuantSpec(4, 48), ValueError, "group_size must be one of (32, 64, 128) for int4, got 48"),
        (lambda: QuantSpec(4, "32"), TypeError, "group_size"),
        (lambda: QuantSpec(8, 64), ValueError, "group_size must be None for int8"),
        (lambda: QuantSpec(8, zero_point=True), ValueError, "zero_point must be False for int8"),
        (lambda: QuantSpec(4, zero_point=1), TypeError, "zero_point must be True or False"),
        (lambda: QuantSpec.parse("int8-zp"), ValueError, "'int8-zp': QuantSpec.zero_point must be False"),
        (lambda: QuantSpec.parse("int4-g48"), ValueError, "'int4-g48': QuantSpec.group_size must be one of"),
        (lambda: QuantSpec.parse("int2"), ValueError, "bits must be 8 or 4, got 2"),
        (lambda: QuantSpec.parse("fp8"), ValueError, "not of the form int<bits>[-g<group>][-zp]"),
        (lambda: QuantSpec.parse(8), TypeError, "must be a string like 'int8'"),
    ],
)
def test_spec_refusals_name_field_value_and_allowed(make, error, words):
    """Bad fields and names: the error names the field, the value and what is allowed."""
    with pytest.raises(error) as info:
        make()
    assert words in str(info.value)


def test_widths_the_groups_do_not_tile_are_refused_naming_the_layer():
    """int4 groups must tile the columns (in * kernel): 224 columns refuse g64/g128 naming the layer and the sizes
    that fit; a conv's 36 columns refuse g32; int8 takes any width."""
    with pytest.raises(ValueError, match=r"int4-g64 cannot quantize fc\.weight: its 224 columns .* \(int4-g32\)"):
        check_fits(QuantSpec(4, 64), (8, 224), "fc.weight")
    with pytest.raises(ValueError, match="int4-g32 cannot quantize weight: its 36 columns"):
        quantize_weight(torch.randn(8, 4, 3, 3), "int4-g32")
    with pytest.raises(ValueError, match="int4-g128 cannot quantize weight: its 64 columns"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), "int4")
    check_fits(QuantSpec(8), (8, 37), "fc.weight")
    assert quantize_weight(torch.randn(8, 4, 2, 4), "int4-g32").scales.shape == (8, 1)


# ------------------------------------------------------------------------------------------- round to nearest
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_rtn_scales_equal_torch_ao_observers():
    """The scales and zero points of RTN are those of torch.ao.quantization's per-channel min/max observers on the
    same grid (symmetric over [-127, 127] or [-7, 7], affine over [0, 15]), per row (int8) or per group (int4);
    the values are those torch.quantize_per_channel gives for them."""
    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.logspace(-2, 1, 16)[:, None]
    for name in SPECS:
        spec = QuantSpec.parse(name)
        q = quantize_weight(w, spec)
        groups = w.reshape(-1, spec.group_columns(256))
        if spec.zero_point:
            observer = PerChannelMinMaxObserver(0, torch.quint8, torch.per_channel_affine, quant_min=0, quant_max=15)
        else:
            observer = PerChannelMinMaxObserver(
                0, torch.qint8, torch.per_channel_symmetric, quant_min=spec.qmin, quant_max=spec.qmax
            )
        observer(groups)
        scale, zero = observer.calculate_qparams()
        torch.testing.assert_close(q.scales.reshape(-1), scale.float(), rtol=1e-6, atol=0)
        if spec.zero_point:
            assert torch.equal(q.zeros.reshape(-1).long(), zero)
        dtype = torch.quint8 if spec.zero_point else torch.qint8
        zeros = q.zeros.reshape(-1).long() if spec.zero_point else torch.zeros(groups.shape[0], dtype=torch.long)
        expected = torch.quantize_per_channel(groups, q.scales.reshape(-1).double(), zeros, 0, dtype).int_repr()
        assert torch.equal(q.values.reshape(groups.shape).int(), expected.int()), name


@pytest.mark.parametrize("name", SPECS)
def test_rtn_round_trip_is_on_the_grid(name):
    """Values are int8 in [qmin, qmax]; dequantize(quantize(w)) is within half a step of w; symmetric grids:
    quantizing the dequantized weight again gives the same values and weights (it is on the grid), and a row or
    group's largest magnitude is exact."""
    torch.manual_seed(1)
    spec = QuantSpec.parse(name)
    w = torch.randn(12, 128)
    q = quantize_weight(w, spec)
    assert q.values.dtype == torch.int8 and q.values.shape == w.shape
    assert spec.qmin <= q.values.min() and q.values.max() <= spec.qmax
    deq = dequantize(q)
    size = spec.group_columns(128)
    step = q.scales.reshape(12, -1).repeat_interleave(size, 1)
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-6)).all()
    if not spec.zero_point:  # (a zero-point grid's range moves with rounding: its scales need not repeat)
        again = quantize_weight(deq, spec)
        assert torch.equal(again.values, q.values) and torch.equal(dequantize(again), deq)
        groups, deq_groups = w.reshape(12, -1, size), deq.reshape(12, -1, size)
        top = groups.abs().argmax(-1, keepdim=True)
        torch.testing.assert_close(deq_groups.gather(-1, top), groups.gather(-1, top), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", SPECS)
def test_rtn_zeros_stay_zero_and_masks_set_the_scales(name):
    """Zero weights and masked entries dequantize to exactly 0 (values 0, or the zero point); the scales are those
    of the kept entries: a huge masked weight changes nothing."""
    torch.manual_seed(2)
    spec = QuantSpec.parse(name)
    w = torch.randn(8, 128)
    w[w.abs() < 0.3] = 0
    keep = torch.rand(8, 128) > 0.5
    deq = dequantize(quantize_weight(w, spec))
    assert (deq[w == 0] == 0).all()
    loud = torch.where(keep, w, torch.full_like(w, 1e6))
    masked = quantize_weight(loud, spec, mask=keep.float())
    plain = quantize_weight(w * keep, spec)
    assert torch.equal(masked.values, plain.values) and torch.equal(masked.scales, plain.scales)
    assert (dequantize(masked)[~keep] == 0).all()
    if spec.zero_point:  # pruned entries hold the zero point
        zeros = masked.zeros.reshape(8, -1).repeat_interleave(spec.group_columns(128), 1)
        assert torch.equal(masked.values[~keep], zeros.to(torch.int8)[~keep])


def test_rtn_edge_rows():
    """All-zero rows get scale 1 and values 0; subnormal rows a finite scale (float32's smallest normal) with their
    values within half a step; float32's largest weights a finite scale, within half a step too; non-finite
    weights and bad masks are refused."""
    w = torch.zeros(3, 32)
    w[1] = torch.linspace(-1e-39, 1e-39, 32)
    w[2] = torch.linspace(-1, 1, 32) * 3e38
    for name in ("int8", "int4-g32", "int4-g32-zp"):
        q = quantize_weight(w, name)
        assert torch.isfinite(q.scales).all() and (q.scales > 0).all()
        assert q.scales.reshape(3, -1)[0].eq(1).all() and (dequantize(q)[0] == 0).all()
        assert q.scales.reshape(3, -1)[1].ge(torch.finfo(torch.float32).tiny).all()
        deq = dequantize(q)
        assert torch.isfinite(deq).all()
        step = q.scales.reshape(3, -1).repeat_interleave(32 // q.scales.reshape(3, -1).shape[1], 1)
        assert ((deq - w).abs() <= step / 2 * (1 + 1e-6)).all(), name  # every row within half a step: none clamped
    bad = torch.randn(2, 32)
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite entries"):
        quantize_weight(bad, "int8")
    with pytest.raises(ValueError, match=r"mask must be a tensor of the weight's shape \(2, 32\)"):
        quantize_weight(torch.randn(2, 32), "int8", mask=torch.ones(2, 16))
    with pytest.raises(TypeError, match="floating-point tensor"):
        quantize_weight(torch.ones(2, 32, dtype=torch.long), "int8")


def test_rtn_conv_and_bf16():
    """A conv weight is quantized on its [out, in * kernel] view (values keep its shape); bf16 weights are rounded
    from their values, dequantized to float32; QuantizedWeight refuses parts that do not fit."""
    torch.manual_seed(3)
    conv = torch.randn(6, 8, 2, 2)
    q = quantize_weight(conv, "int4-g32-zp")
    flat = quantize_weight(conv.reshape(6, 32), "int4-g32-zp")
    assert q.values.shape == conv.shape and torch.equal(q.values.reshape(6, 32), flat.values)
    assert torch.equal(dequantize(q).reshape(6, 32), dequantize(flat))
    half = torch.randn(4, 64).bfloat16()
    assert torch.equal(dequantize(quantize_weight(half, "int8")), dequantize(quantize_weight(half.float(), "int8")))
    with pytest.raises(ValueError, match=r"scales must be float32 of shape \(4,\)"):
        QuantizedWeight(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2), None, QuantSpec(8))
    with pytest.raises(ValueError, match="zeros must be given for int4-g32-zp"):
        QuantizedWeight(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2), None, QuantSpec(4, 32, True))
    with pytest.raises(ValueError, match=r"values must lie in \[-7, 7\] for int4-g32"):
        QuantizedWeight(torch.full((4, 64), 8, dtype=torch.int8), torch.ones(4, 2), None, QuantSpec(4, 32))
    with pytest.raises(ValueError, match="scales must be finite and > 0"):
        QuantizedWeight(torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4), None, QuantSpec(8))
    with pytest.raises(TypeError, match="QuantizedWeight.values must be a tensor"):
        QuantizedWeight([[0]], torch.ones(1), None, QuantSpec(8))


# ------------------------------------------------------------------------------------------------------- GPTQ
def gptq_reference(w, h, spec, keep=None, dampening=0.01):
    """GPTQ written from the algorithm, one column at a time with explicit inverses (float64, slow, obvious).

    Column j is fixed after columns < j: rounded to the grid (masked entries to 0), and its error moved onto the
    columns not yet fixed with the OBS update, which uses the inverse of the damped Hessian restricted to them,
    ``inv(H[j:, j:])``. A row's scale (int8) is computed before the first column, a group's (int4) when its first
    column is reached, on the current weights with the masked entries as zero. Returns the weights and the
    scales ``[rows, groups]``.
    """
    w, h = w.double().clone(), h.double().clone()
    keep = torch.ones(w.shape, dtype=torch.bool) if keep is None else keep.bool()
    w[~keep] = 0
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h += dampening * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    w[:, dead] = 0
    size = spec.group_columns(w.shape[1])
    scales = []
    for j in range(w.shape[1]):
        if j % size == 0:
            scale, zero = grid_reference(torch.where(keep[:, j : j + size], w[:, j : j + size], 0.0), spec)
            scales.append(scale)
        target = torch.where(keep[:, j], to_grid_reference(w[:, j], scale, zero, spec), 0.0)
        hinv = torch.linalg.inv(h[j:, j:])
        err = (w[:, j] - target) / hinv[0, 0]
        w[:, j:] -= err[:, None] * hinv[0][None, :]
        w[:, j] = target
    return w, torch.stack(scales, 1)


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("masked", [False, True])
def test_gptq_equals_direct_reference(name, masked):
    """gptq_quantize on a 10x128 layer with correlated inputs (and a Wanda-like mask): the weights and scales of the
    direct per-column reference, the values in the grid's range, masked entries exactly zero."""
    torch.manual_seed(4)
    spec = QuantSpec.parse(name)
    x = correlated_inputs(400, 128, seed=4)
    w = torch.randn(10, 128)
    h = accumulate_hessian(None, input_rows(x, w.shape))[0]
    keep = torch.rand(10, 128) > 0.5 if masked else None
    q = gptq_quantize(w, h, spec, mask=keep, block_size=64 if spec.group_size != 128 else 128)
    reference, scales = gptq_reference(w, h, spec, keep)
    torch.testing.assert_close(dequantize(q), reference.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q.scales.reshape(scales.shape), scales, rtol=1e-4, atol=0)
    assert spec.qmin <= q.values.min() and q.values.max() <= spec.qmax
    if masked:
        assert (dequantize(q)[~keep] == 0).all()


def test_gptq_lowers_output_error_and_block_size_changes_nothing():
    """On correlated inputs GPTQ's output error ||X (W_q - W)^T|| is well below RTN's, for every grid; the block
    size (lazy updates) changes the result only by float rounding."""
    torch.manual_seed(5)
    x = correlated_inputs(512, 128, seed=5)
    w = torch.randn(16, 128)
    h = accumulate_hessian(None, input_rows(x, w.shape))[0]
    for name in SPECS:
        def error(v):
            return (x @ (v - w).T).square().sum().item()
        q = gptq_quantize(w, h, name)
        assert error(dequantize(q)) < 0.8 * error(dequantize(quantize_weight(w, name))), name
        size = QuantSpec.parse(name).group_size or 16
        other = gptq_quantize(w, h, name, block_size=size)
        torch.testing.assert_close(dequantize(other), dequantize(q), rtol=1e-4, atol=1e-4)


def test_gptq_dead_inputs_grouped_conv_and_bad_arguments():
    """Inputs that never fire zero their weights (no NaN); a grouped conv's [groups, c, c] Hessian quantizes each
    group's rows with its own; bad Hessians, block sizes, dampening and masks are refused naming them."""
    torch.manual_seed(6)
    x = correlated_inputs(200, 64, seed=6)
    x[:, [5, 9]] = 0
    w = torch.randn(6, 64)
    h = accumulate_hessian(None, input_rows(x, w.shape))[0]
    q = gptq_quantize(w, h, "int4-g32")
    assert torch.isfinite(dequantize(q)).all() and (dequantize(q)[:, [5, 9]] == 0).all()
    conv = torch.randn(8, 4, 2, 4)
    hs = torch.stack([accumulate_hessian(None, input_rows(correlated_inputs(100, 32, s), (1, 32)))[0] for s in (1, 2)])
    grouped = gptq_quantize(conv, hs, "int4-g32")
    for g in range(2):
        alone = gptq_quantize(conv[4 * g : 4 * g + 4], hs[g], "int4-g32")
        assert torch.equal(grouped.values[4 * g : 4 * g + 4], alone.values)
        assert torch.equal(grouped.scales[4 * g : 4 * g + 4], alone.scales)
    with pytest.raises(ValueError, match="does not fit weight"):
        gptq_quantize(w, torch.eye(32), "int8")
    bad = h.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(w, bad, "int8")
    with pytest.raises(ValueError, match="block_size=48 must be a multiple of the group size 32 of int4-g32"):
        gptq_quantize(w, h, "int4-g32", block_size=48)
    with pytest.raises(ValueError, match="dampening must be a finite number >= 0"):
        gptq_quantize(w, h, "int8", dampening=float("inf"))
    with pytest.raises(ValueError, match="mask must be a tensor of the weight's shape"):
        gptq_quantize(w, h, "int8", mask=torch.ones(6, 32))
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(64), "int8", dampening=0)


# -------------------------------------------------------------------- the reference implementation (optional)
REFERENCE = os.environ.get("FX_SPARSITY_IST_REFERENCE")


def _load_reference(folder: str, name: str):
    """IST-DASLab's ``<folder>/<name>.py`` (it imports its own ``quant`` module), loaded under a unique name."""
    sys.modules.pop("quant", None)
    sys.path.insert(0, str(pathlib.Path(REFERENCE) / folder))
    try:
        spec = importlib.util.spec_from_file_location(f"ist_{folder}", pathlib.Path(REFERENCE) / folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
        sys.modules.pop("quant", None)
    return module


class _OurGrid:
    """A quantizer object for IST-DASLab's loops whose grid is fx_sparsity's (the loops call find_params and read
    scale, zero and maxq)."""

    def __init__(self, spec: QuantSpec) -> None:
        self.spec, self.maxq, self._ready = spec, torch.tensor(spec.qmax - spec.qmin), False

    def ready(self) -> bool:
        return self._ready

    def find_params(self, x: torch.Tensor, weight: bool = True) -> None:
        scale, zero = grid_reference(x.flatten(1), self.spec)
        self.scale = scale[:, None]
        self.zero = (torch.full_like(scale, self.spec.qmax) if zero is None else zero)[:, None]
        self._ready = self.spec.group_size is None  # a row's scale once, a group's at every group


@pytest.mark.skipif(REFERENCE is None, reason="FX_SPARSITY_IST_REFERENCE names no checkout of IST-DASLab's gptq and "
                    "sparsegpt (folders gptq/ and sparsegpt/ holding their gptq.py, sparsegpt.py and quant.py)")
def test_against_ist_daslab_reference(monkeypatch):
    """IST-DASLab's fasterquant (gptq), run on CPU with our grid: the same weights (to float rounding of their
    float32 Cholesky). Their groups are given blocksize = groupsize, so that their group scales see the updated
    weights, as ours do."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    gptq = _load_reference("gptq", "gptq")
    x = correlated_inputs(1024, 256, seed=7)
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(7))
    h = (x.T.double() @ x.double()).float()

    def layer():
        linear = nn.Linear(256, 48, bias=False)
        linear.weight.data = w.clone()
        return linear

    for name in SPECS:
        spec = QuantSpec.parse(name)
        ref = gptq.GPTQ(layer())
        ref.H, ref.quantizer = h.clone(), _OurGrid(spec)
        ref.fasterquant(blocksize=spec.group_size or 128, percdamp=0.01, groupsize=spec.group_size or -1)
        torch.testing.assert_close(dequantize(gptq_quantize(w, h.double(), spec)), ref.layer.weight.data,
                                   rtol=0, atol=1e-5)


@pytest.mark.skipif(REFERENCE is None, reason="FX_SPARSITY_IST_REFERENCE names no checkout of IST-DASLab's sparsegpt")
def test_joint_mode_against_ist_daslab_reference(monkeypatch):
    """IST-DASLab's fasterprune with an int8 quantizer of our grid, on CPU, unstructured 50% and 2:4: the same
    weights (to float rounding), so the same masks (an entry they zero is one we prune, or one we keep that
    rounds to 0)."""
    from fx_sparsity.sparsifier.sparsegpt.obs import sparsegpt_quantize

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    sparsegpt = _load_reference("sparsegpt", "sparsegpt")
    x = correlated_inputs(1024, 256, seed=7)
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(7))
    h = (x.T.double() @ x.double()).float()
    for nm in (None, (2, 4)):
        linear = nn.Linear(256, 48, bias=False)
        linear.weight.data = w.clone()
        ref = sparsegpt.SparseGPT(linear)
        ref.H, ref.quantizer = h.clone(), _OurGrid(QuantSpec(8))
        if nm is None:  # their threshold prunes int(numel * s) + 1 of a block: ask for round(0.5 * numel)
            ref.fasterprune((0.5 * 48 * 128 - 0.5) / (48 * 128), blocksize=128, percdamp=0.01)
        else:
            ref.fasterprune(0, prunen=2, prunem=4, blocksize=128, percdamp=0.01)
        q, keep = sparsegpt_quantize(w, h.double(), "int8", 0.5, nm=nm)
        theirs = ref.layer.weight.data
        torch.testing.assert_close(dequantize(q), theirs, rtol=0, atol=1e-5)
        assert not (theirs[~keep] != 0).any() and (dequantize(q)[keep & (theirs == 0)] == 0).all()


# ------------------------------------------------------------------------------------ the flow on a prepared module
def mlp() -> nn.Module:
    """Linear(64 -> 32) -> ReLU -> Linear(32 -> 32): widths every int4 group size of 32 tiles."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32))


def mlp_batches(count: int = 4) -> list[torch.Tensor]:
    return [correlated_inputs(16, 64, seed=10 + i) for i in range(count)]


def prepared_reference(model: nn.Module, gm) -> nn.Module:
    """An eager copy of ``model`` holding the prepared module's weights times their masks."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for group in fx_sparsity.get_sparsifier(gm).groups:
            fqn = group["tensor_fqn"]
            reference.get_parameter(fqn).copy_(gm.get_parameter(fqn) * gm.get_buffer(f"{fqn}_mask"))
    return reference


def layer_inputs(model: nn.Module, batches, names) -> dict[str, torch.Tensor]:
    """Each named module's inputs on all the batches, recorded with forward pre-hooks on an eager model."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
        for n in names
    ]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("name", ["int8", "int4-g32-zp"])
def test_quantize_rtn_keeps_magnitude_masks(name):
    """RTN on a magnitude-pruned MLP: the masks are unchanged, each prepared weight is exactly dequantize of
    quantize_weight(weight * mask, spec, mask), a new tensor, zero where masked; the records say so; the prepared
    module computes with those weights; the user's model and the prepared module's old tensors are unchanged."""
    model = mlp()
    before = snapshot(model)
    gm = prepare(model, sparsifier=MagnitudeSparsifier(0.5))
    fx_sparsity.get_sparsifier(gm).step()
    masks = {f: gm.get_buffer(f"{f}_mask").clone() for f in ("0.weight", "2.weight")}
    old = {f: (gm.get_parameter(f), gm.get_parameter(f).detach().clone()) for f in masks}
    records = quantize(gm, name, method="rtn")
    assert sorted(records) == sorted(masks) == sorted(get_quantization(gm))
    for fqn, mask in masks.items():
        assert torch.equal(gm.get_buffer(f"{fqn}_mask"), mask)
        expected = quantize_weight(old[fqn][1] * mask, name, mask)
        got = records[fqn].quantized
        assert records[fqn].method == "rtn" and torch.equal(got.values, expected.values)
        assert torch.equal(got.scales, expected.scales)
        weight = gm.get_parameter(fqn)
        assert torch.equal(weight, dequantize(got)) and weight is not old[fqn][0]
        assert (weight[mask == 0] == 0).all() and torch.equal(old[fqn][0], old[fqn][1])
    x = torch.randn(5, 64)
    torch.testing.assert_close(gm(x), prepared_reference(model, gm)(x))
    assert not torch.allclose(gm(x), masked_reference_output(model, masks, x))  # quantized: not the float weights
    assert_unchanged(model, before)


def masked_reference_output(model: nn.Module, masks, x: torch.Tensor) -> torch.Tensor:
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for fqn, mask in masks.items():
            reference.get_parameter(fqn).mul_(mask)
        return reference(x)


def assert_unchanged(model: nn.Module, before) -> None:
    after = snapshot(model)
    assert after["ids"] == before["ids"] and after["modules"] == before["modules"] and after["attrs"] == before["attrs"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


@pytest.mark.parametrize("name", ["int8", "int4-g32"])
def test_quantize_gptq_keeps_wanda_masks_and_equals_the_math(name):
    """GPTQ on a Wanda-pruned MLP, calibrated through calibrate: each weight is gptq_quantize of weight * mask with
    the Hessian of its inputs in the masked module (recorded eagerly) and its mask, so the masks stay exactly and
    the weights are zero where masked; the prepared module computes with them; its output error is below RTN's."""
    model = mlp()
    before = snapshot(model)
    batches = mlp_batches()
    gm = prepare(model, sparsifier=WandaSparsifier(0.5))
    calibrate(gm, batches, progress_bar=False)
    fx_sparsity.get_sparsifier(gm).step()
    masks = {f: gm.get_buffer(f"{f}_mask").clone() for f in ("0.weight", "2.weight")}
    masked = prepared_reference(model, gm)
    inputs = layer_inputs(masked, batches, ["0", "2"])
    rtn = copy.deepcopy(gm)
    quantize(rtn, name, method="rtn")
    records = quantize(gm, name, batches=batches, block_size=32, progress_bar=False)
    for fqn, mask in masks.items():
        x = inputs[fqn.split(".")[0]]
        h = accumulate_hessian(None, input_rows(x, mask.shape))[0]
        expected = gptq_quantize(masked.get_parameter(fqn), h, name, mask, block_size=32)
        torch.testing.assert_close(dequantize(records[fqn].quantized), dequantize(expected), rtol=1e-5, atol=1e-6)
        assert records[fqn].method == "gptq" and torch.equal(gm.get_buffer(f"{fqn}_mask"), mask)
        assert torch.equal(gm.get_parameter(fqn), dequantize(records[fqn].quantized))
        assert (gm.get_parameter(fqn)[mask == 0] == 0).all()
    x = torch.cat(batches)
    torch.testing.assert_close(gm(x), prepared_reference(model, gm)(x))
    target = masked(x)
    assert (gm(x) - target).square().sum() < (rtn(x) - target).square().sum()
    assert_unchanged(model, before)


def test_quantize_sequential_calibrates_each_block_on_the_quantized_ones():
    """sequential=True (prune_sequential): the first layer is quantized from the masked module's inputs, the second
    from the outputs of the quantized first layer (recorded eagerly), so the second differs from calibrate's."""
    model = mlp()
    batches = mlp_batches()
    gm = prepare(model, sparsifier=NMSparsifier())
    fx_sparsity.get_sparsifier(gm).step()
    plain = copy.deepcopy(gm)
    quantize(plain, "int4-g32", batches=batches, block_size=32, progress_bar=False)
    records = quantize(gm, "int4-g32", batches=batches, sequential=True, block_size=32, progress_bar=False)
    assert torch.equal(records["0.weight"].quantized.values, get_quantization(plain)["0.weight"].quantized.values)
    first = prepared_reference(model, gm)  # layer 0 quantized; layer 2 is replaced below
    first.get_parameter("2.weight").data = prepared_reference(model, plain).get_parameter("2.weight").data
    x = layer_inputs(first, batches, ["2"])["2"]
    mask = gm.get_buffer("2.weight_mask")
    h = accumulate_hessian(None, input_rows(x, mask.shape))[0]
    masked = model.get_parameter("2.weight") * mask
    expected = gptq_quantize(masked, h, "int4-g32", mask, block_size=32)
    torch.testing.assert_close(dequantize(records["2.weight"].quantized), dequantize(expected), rtol=1e-5, atol=1e-6)
    assert not torch.equal(records["2.weight"].quantized.values, get_quantization(plain)["2.weight"].quantized.values)
    assert (nm_groups := mask.view(32, -1, 4).sum(-1)).eq(2).all(), nm_groups


class ConvThenStoredInOut(nn.Module):
    """A grouped Conv2d, pooled, then a weight stored [in, out] (transformers' Conv1D) applied by addmm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.weight = nn.Parameter(torch.randn(8, 16))
        self.bias = nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, self.conv(x).mean(dim=(2, 3)), self.weight)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_conv_and_weights_stored_in_out(method):
    """A grouped conv (per-group Hessians) and a weight stored [in, out]: records are in the [out, in, *kernel]
    view, the prepared weights the dequantized values in their stored layout (the [in, out] one transposed), masks
    kept, zero where masked; the prepared module computes with them."""
    torch.manual_seed(0)
    model = ConvThenStoredInOut()
    batches = [torch.randn(4, 4, 6, 6) for _ in range(3)]
    gm = prepare(model, sparsifier=MagnitudeSparsifier(0.5))
    fx_sparsity.get_sparsifier(gm).step()
    masks = {f: gm.get_buffer(f"{f}_mask").clone() for f in ("conv.weight", "weight")}
    records = quantize(gm, "int8", method=method, batches=None if method == "rtn" else batches, progress_bar=False)
    assert records["conv.weight"].quantized.shape == (8, 2, 3, 3) and records["weight"].quantized.shape == (16, 8)
    assert torch.equal(gm.get_parameter("conv.weight"), dequantize(records["conv.weight"].quantized))
    assert torch.equal(gm.get_parameter("weight"), dequantize(records["weight"].quantized).t())
    for fqn, mask in masks.items():
        assert torch.equal(gm.get_buffer(f"{fqn}_mask"), mask) and (gm.get_parameter(fqn)[mask == 0] == 0).all()
    x = torch.cat(batches)
    torch.testing.assert_close(gm(x), prepared_reference(model, gm)(x))


def test_quantize_bf16_weights_hold_the_dequantized_values_rounded():
    """A bf16 model: the grid is computed from the bf16 values, the prepared weights stay bf16 and hold the
    dequantized float32 values rounded to bf16."""
    model = mlp().to(torch.bfloat16)
    gm = prepare(model, sparsifier=MagnitudeSparsifier(0.5))
    fx_sparsity.get_sparsifier(gm).step()
    records = quantize(gm, "int4-g32", method="rtn")
    weight = gm.get_parameter("0.weight")
    mask = gm.get_buffer("0.weight_mask")
    expected = quantize_weight(model.get_parameter("0.weight") * mask, "int4-g32", mask)
    assert weight.dtype == torch.bfloat16 and torch.equal(records["0.weight"].quantized.values, expected.values)
    assert torch.equal(weight, dequantize(records["0.weight"].quantized).bfloat16())


def test_quantize_refusals_leave_the_module_alone():
    """Bad arguments are refused naming them before anything changes: an unprepared module, an unknown method or
    spec, batches missing for GPTQ or given to RTN, sequential without GPTQ, an unknown weight (with close names),
    a width the int4 groups do not tile, a bad block size; a failing calibration (a batch of the wrong width)
    leaves weights, masks and records as they were."""
    model = mlp()
    gm = prepare(model, sparsifier=MagnitudeSparsifier(0.5))
    weights = {f: gm.get_parameter(f) for f in ("0.weight", "2.weight")}
    with pytest.raises(ValueError, match="was not prepared by fx_sparsity"):
        quantize(copy.deepcopy(model), "int8", method="rtn")
    with pytest.raises(ValueError, match=r"method must be one of \('gptq', 'rtn'\), got 'awq'"):
        quantize(gm, "int8", method="awq")
    with pytest.raises(ValueError, match="spec: quantization spec 'int3'"):
        quantize(gm, "int3", method="rtn")
    with pytest.raises(ValueError, match="method='gptq' needs calibration batches"):
        quantize(gm, "int8")
    with pytest.raises(ValueError, match="method='rtn' rounds each weight on its own and takes no batches"):
        quantize(gm, "int8", method="rtn", batches=mlp_batches())
    with pytest.raises(ValueError, match="sequential and blocks are GPTQ's"):
        quantize(gm, "int8", method="rtn", sequential=True)
    with pytest.raises(ValueError, match=r"tensor_fqns names '0\.wieght', which the sparsifier does not mask; did "
                       r"you mean \['0\.weight'"):
        quantize(gm, "int8", method="rtn", tensor_fqns=["0.wieght"])
    with pytest.raises(ValueError, match=r"int4-g64 cannot quantize 2\.weight: its 32 columns"):
        quantize(gm, "int4-g64", method="rtn")
    with pytest.raises(ValueError, match="block_size=16 must be a multiple of the group size 32"):
        quantize(gm, "int4-g32", batches=mlp_batches(), block_size=16)
    with pytest.raises(TypeError, match="batch 1 of batches"):
        quantize(gm, "int8", batches=[torch.randn(4, 64), "text"], progress_bar=False)
    assert all(gm.get_parameter(f) is w for f, w in weights.items()) and not get_quantization(gm)
    quantize(gm, "int4-g64", method="rtn", tensor_fqns=["0.weight"])
    assert list(get_quantization(gm)) == ["0.weight"] and gm.get_parameter("2.weight") is weights["2.weight"]
