"""torch.ao.pruning's sparsifier test suite (test/ao/sparsity/test_sparsifier.py), ported to fx_sparsity.

Where torch.ao.pruning checks a parametrization on the user's module, we check
the mask buffer of the returned GraphModule; the user's model must stay as it was.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch import nn

from fx_sparsity import BaseSparsifier, NearlyDiagonalSparsifier, WeightNormSparsifier
from helpers import ImplementedSparsifier, MockSparseLinear, SimpleLinear
from passes import masked_targets

ALL_LINEARS = {"seq.0", "seq.1", "seq.2", "linear1", "linear2"}


def mask_of(gm, module_fqn):
    return gm.get_buffer(f"{module_fqn}.weight_mask")


class TestBaseSparsifier:
    def test_constructor(self):
        """BaseSparsifier is abstract; config=None gives one group per Linear; defaults reach groups."""
        with pytest.raises(TypeError):
            BaseSparsifier()
        model = SimpleLinear()
        sparsifier = ImplementedSparsifier(test=3)
        sparsifier.prepare(model, config=None)
        assert len(sparsifier.groups) == 5
        sparsifier.step()
        sparsifier = ImplementedSparsifier(test=3)
        sparsifier.prepare(model, [{"tensor_fqn": "linear1.weight"}])
        assert len(sparsifier.groups) == 1
        assert sparsifier.groups[0]["tensor_fqn"] == "linear1.weight"
        assert sparsifier.groups[0]["test"] == 3

    def test_prepare_config(self):
        """An entry's own key beats the default; unselected Linears get no mask; the user model is untouched."""
        model = SimpleLinear()
        sparsifier = ImplementedSparsifier(test=3)
        gm = sparsifier.prepare(model, config=[{"tensor_fqn": "seq.0.weight", "test": 42}, {"tensor_fqn": "linear2.weight"}])
        assert len(sparsifier.groups) == 2
        assert sparsifier.groups[0]["tensor_fqn"] == "seq.0.weight"
        assert sparsifier.groups[0]["test"] == 42
        assert sparsifier.groups[1]["tensor_fqn"] == "linear2.weight"
        assert sparsifier.groups[1]["module"] is gm.get_submodule("linear2")
        assert {t.module_fqn for t in masked_targets(gm)} == {"seq.0", "linear2"}
        assert not hasattr(gm.linear1, "weight_mask")
        for module in model.modules():
            assert not hasattr(module, "weight_mask") and not hasattr(module, "parametrizations")

    def test_step(self):
        """A custom update_mask zeroes row 0 of linear1's mask."""
        model = SimpleLinear()
        sparsifier = ImplementedSparsifier(test=3)
        sparsifier.enable_mask_update = True
        gm = sparsifier.prepare(model, [{"tensor_fqn": "linear1.weight"}])
        sparsifier.step()
        assert torch.all(mask_of(gm, "linear1")[0] == 0)
        assert torch.all(mask_of(gm, "linear1")[1:] == 1)

    def test_step_disabled(self):
        """enable_mask_update=False makes step a no-op."""
        sparsifier = ImplementedSparsifier()
        gm = sparsifier.prepare(SimpleLinear(), None)
        sparsifier.enable_mask_update = False
        sparsifier.step()
        assert all(bool(mask_of(gm, fqn).all()) for fqn in ALL_LINEARS)

    def test_state_dict(self):
        """state_dict keeps step_count, groups and masks; loading restores them without aliasing."""
        model0 = SimpleLinear()
        sparsifier0 = ImplementedSparsifier(test=3)
        gm0 = sparsifier0.prepare(model0, [{"tensor_fqn": "linear1.weight"}])
        mask = mask_of(gm0, "linear1")
        mask.copy_(torch.arange(mask.numel()).reshape(mask.shape) % 3 != 0)
        for _ in range(3):
            sparsifier0.step()
        state_dict = sparsifier0.state_dict()
        assert state_dict["state"]["linear1.weight"]["step_count"] == 3
        assert state_dict["groups"][0]["test"] == 3
        assert state_dict["groups"][0]["tensor_fqn"] == "linear1.weight"
        assert "module" not in state_dict["groups"][0]

        # Unlike torch.ao.pruning, a strict load needs the same groups and arguments (see test_state_dict_errors).
        model1 = SimpleLinear()
        sparsifier1 = ImplementedSparsifier(test=0)
        gm1 = sparsifier1.prepare(model1, [{"tensor_fqn": "linear1.weight"}])
        assert sparsifier0.state != sparsifier1.state
        assert not torch.equal(mask_of(gm0, "linear1"), mask_of(gm1, "linear1"))

        sparsifier1.load_state_dict(state_dict)
        assert sparsifier0.state == sparsifier1.state
        assert len(sparsifier0.groups) == len(sparsifier1.groups)
        for g0, g1 in zip(sparsifier0.groups, sparsifier1.groups):
            assert g0.keys() == g1.keys()
            for key in g0:
                if key == "module":
                    assert g1[key] is gm1.get_submodule(g0["module_fqn"])
                else:
                    assert g0[key] == g1[key]
        assert torch.equal(mask_of(gm0, "linear1"), mask_of(gm1, "linear1"))

        # No aliasing: masks, state and groups of the two sparsifiers are independent.
        assert mask_of(gm0, "linear1").data_ptr() != mask_of(gm1, "linear1").data_ptr()
        mask_of(gm0, "linear1").zero_()
        assert mask_of(gm1, "linear1").sum() > 0
        sparsifier0.step()
        assert sparsifier1.state["linear1.weight"]["step_count"] == 3
        state_dict["groups"][0]["test"] = 99
        state_dict["state"]["linear1.weight"]["step_count"] = 99
        assert sparsifier1.groups[0]["test"] == 3
        assert sparsifier1.state["linear1.weight"]["step_count"] == 3

    def test_convert(self):
        """convert swaps only the sparsified Linear for the mapped type, on a copy, with the mask fused."""
        model = SimpleLinear()
        sparsifier = ImplementedSparsifier(test=3)
        gm = sparsifier.prepare(model, [{"tensor_fqn": "linear1.weight"}])
        sparsifier.step()
        new = sparsifier.convert(gm, mapping={nn.Linear: MockSparseLinear}, inplace=False)
        assert isinstance(new.linear1, MockSparseLinear)
        assert type(new.get_submodule("seq.0")) is nn.Linear
        assert type(new.linear2) is nn.Linear
        assert torch.all(new.linear1.weight[0] == 0)
        assert masked_targets(gm), "inplace=False must leave the prepared module masked"
        x = torch.randn(3, 7)
        torch.testing.assert_close(new(x), gm(x))

    def test_mask_squash(self):
        """squash_mask removes the mask buffer and node of every sparsified weight."""
        model = SimpleLinear()
        sparsifier = ImplementedSparsifier(test=3)
        gm = sparsifier.prepare(model, [{"tensor_fqn": "linear1.weight"}])
        assert hasattr(gm.linear1, "weight_mask")
        assert not hasattr(gm.get_submodule("seq.0"), "weight_mask")
        sparsifier.squash_mask()
        assert not hasattr(gm.linear1, "weight_mask")
        assert not masked_targets(gm)

    @pytest.mark.parametrize(
        "keep, per_layer, expected",
        [
            (None, {"linear1": ("foo", "bar"), "seq.0": ("baz",)}, {"linear1": {"foo": 3, "bar": 2}, "seq.0": {"baz": 1}}),
            (("foo", "bar"), None, {"linear1": {"foo": 3, "bar": 2}, "seq.0": {"foo": 3, "bar": 2}}),
            (("foo", "bar"), {"seq.0": ("baz",)}, {"linear1": {"foo": 3, "bar": 2}, "seq.0": {"foo": 3, "bar": 2, "baz": 1}}),
        ],
    )
    def test_mask_squash_with_params(self, keep, per_layer, expected):
        """params_to_keep, params_to_keep_per_layer and both give torch.ao.pruning's sparse_params."""
        model = SimpleLinear()
        sparsifier = ImplementedSparsifier(foo=3, bar=2, baz=1)
        gm = sparsifier.prepare(model, [{"tensor_fqn": "linear1.weight"}, {"tensor_fqn": "seq.0.weight"}])
        sparsifier.squash_mask(params_to_keep=keep, params_to_keep_per_layer=per_layer)
        for fqn, params in expected.items():
            assert gm.get_submodule(fqn).sparse_params == params
            assert not hasattr(gm.get_submodule(fqn), "weight_mask")
        assert not any(hasattr(m, "sparse_params") for m in model.modules())


class TestWeightNormSparsifier:
    def test_constructor(self):
        """config=None selects every Linear of SimpleLinear."""
        sparsifier = WeightNormSparsifier()
        sparsifier.prepare(SimpleLinear(), config=None)
        for g in sparsifier.groups:
            assert isinstance(g["module"], nn.Linear)
        assert {g["module_fqn"] for g in sparsifier.groups} == ALL_LINEARS

    def test_step(self):
        """One step halves linear1; the mask does not collapse over 1000 re-randomised steps."""
        model = SimpleLinear()
        sparsifier = WeightNormSparsifier(sparsity_level=0.5)
        gm = sparsifier.prepare(model, config=[{"tensor_fqn": "linear1.weight"}])
        assert mask_of(gm, "linear1").float().mean() == 1
        sparsifier.step()
        assert mask_of(gm, "linear1").float().mean().item() == pytest.approx(0.5, abs=1e-2)
        for _ in range(1000):
            with torch.no_grad():
                gm.linear1.weight.copy_(torch.randn(gm.linear1.weight.shape))
            sparsifier.step()
        assert 0 < mask_of(gm, "linear1").float().mean() < 1

    def test_step_2_of_4(self):
        """sparsity_level=1, block (1, 4), zeros_per_block=2: exactly 2 zeros in every 4."""
        model = SimpleLinear()
        sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
        gm = sparsifier.prepare(model, config=[{"tensor_fqn": "linear1.weight"}])
        sparsifier.step()
        mask = mask_of(gm, "linear1")
        assert mask.float().mean().item() == pytest.approx(0.5)
        assert torch.all(mask.reshape(-1, 4).sum(dim=1) == 2)

    def test_prepare(self):
        """Every selected weight gets an all-ones mask of its shape."""
        sparsifier = WeightNormSparsifier()
        gm = sparsifier.prepare(SimpleLinear(), config=None)
        for g in sparsifier.groups:
            mask = g["module"].weight_mask
            assert mask.shape == g["module"].weight.shape and torch.all(mask == 1)

    def test_mask_squash(self):
        """After squash no module keeps a mask."""
        sparsifier = WeightNormSparsifier()
        gm = sparsifier.prepare(SimpleLinear(), config=None)
        sparsifier.squash_mask()
        for g in sparsifier.groups:
            assert not hasattr(g["module"], "weight_mask")

    def test_sparsity_levels(self):
        """Grid of levels x blocks x zeros_per_block on 12x12 ones: zeros = level * zpb / block size.

        torch.ao.pruning's grid also has levels -1 and 2, which it clamps; fx_sparsity refuses
        levels outside [0, 1] (tests/test_masks.py::test_weight_norm_refuses_levels_outside_0_1)."""
        levels = [0.0, 0.25, 0.5, 1.0]
        blocks = [(1, 1), (1, 4), (2, 2), (4, 1)]
        zeros = [0, 1, 2, 3, 4]
        model = nn.Sequential()
        config = []
        cases = [(sl, b, z) for sl, b, z in itertools.product(levels, blocks, zeros) if z <= b[0] * b[1]]
        name_of = {c: re.sub(r"[-.\s]", "_", f"{c[0]}_{c[1]}_{c[2]}") for c in cases}
        for case in cases:
            layer = nn.Linear(12, 12, bias=False)
            layer.weight = nn.Parameter(torch.ones(12, 12))
            model.add_module(name_of[case], layer)
            config.append({"tensor_fqn": name_of[case] + ".weight", "sparsity_level": case[0],
                           "sparse_block_shape": case[1], "zeros_per_block": case[2]})
        sparsifier = WeightNormSparsifier()
        gm = sparsifier.prepare(model, config)
        sparsifier.step()
        sparsifier.squash_mask()
        for sl, block, zpb in cases:
            zero_fraction = (gm.get_parameter(name_of[(sl, block, zpb)] + ".weight") == 0).float().mean()
            expected = 0.0 if zpb == 0 else sl * zpb / (block[0] * block[1])
            assert zero_fraction.item() == expected, (sl, block, zpb)
        assert all(torch.all(p == 1) for p in model.parameters()), "the user's weights must stay dense"


class TestNearlyDiagonalSparsifier:
    def test_constructor(self):
        """config=None selects every Linear."""
        sparsifier = NearlyDiagonalSparsifier(nearliness=1)
        sparsifier.prepare(SimpleLinear(), config=None)
        assert {g["module_fqn"] for g in sparsifier.groups} == ALL_LINEARS

    def test_step(self):
        """nearliness=1 gives the identity mask, and it does not collapse over 1000 steps."""
        model = SimpleLinear()
        sparsifier = NearlyDiagonalSparsifier(nearliness=1)
        gm = sparsifier.prepare(model, config=[{"tensor_fqn": "linear1.weight"}])
        assert mask_of(gm, "linear1").float().mean() == 1
        sparsifier.step()
        mask = mask_of(gm, "linear1")
        assert torch.equal(mask, torch.eye(*mask.shape))
        for _ in range(1000):
            with torch.no_grad():
                gm.linear1.weight.copy_(torch.randn(gm.linear1.weight.shape))
            sparsifier.step()
        assert torch.equal(mask_of(gm, "linear1"), torch.eye(*mask.shape))

    def test_mask_squash(self):
        """After step and squash only diagonal weights remain."""
        sparsifier = NearlyDiagonalSparsifier(nearliness=1)
        gm = sparsifier.prepare(SimpleLinear(), config=None)
        sparsifier.step()
        sparsifier.squash_mask()
        for g in sparsifier.groups:
            weight = g["module"].weight
            assert not hasattr(g["module"], "weight_mask")
            assert torch.equal(weight, torch.eye(*weight.shape) * weight)

    @pytest.mark.parametrize("nearliness", range(-1, 100))
    def test_sparsity_levels(self, nearliness):
        """On 32x32 ones: the band |i - j| <= nearliness // 2, all zeros for <= 0, ValueError when illegal."""
        model = nn.Sequential(nn.Linear(32, 32, bias=False))
        model[0].weight = nn.Parameter(torch.ones(32, 32))
        sparsifier = NearlyDiagonalSparsifier(nearliness=1)
        config = [{"tensor_fqn": "0.weight", "nearliness": nearliness}]
        if (nearliness > 0 and nearliness % 2 == 0) or nearliness // 2 >= 32:
            with pytest.raises(ValueError, match="nearliness"):
                sparsifier.prepare(model, config)
            return
        gm = sparsifier.prepare(model, config)
        sparsifier.step()
        sparsifier.squash_mask()
        weight = gm.get_parameter("0.weight")
        rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
        expected = torch.zeros(32, 32) if nearliness <= 0 else ((rows - cols).abs() <= nearliness // 2).float()
        assert torch.equal(weight, expected)
