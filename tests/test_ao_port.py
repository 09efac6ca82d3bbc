"""torch.ao.pruning's own test suite (test/ao/sparsity/test_sparsifier.py and test_scheduler.py), method by method,
through a thin adapter: the prepared module is ``gm``, a mask is ``gm.get_buffer("<module>.weight_mask")`` where
torch.ao.pruning reads ``module.parametrizations.weight[0].mask``, "parametrized" means "has a mask buffer and a
``mul(weight, mask)`` node", and weights after ``squash_mask`` are ``gm``'s (the user's model keeps its dense
weights). Every check torch.ao.pruning's tests make is made here, with its values; the adapter changes where a
mask is read, never what is expected of it. Checks of where fx_sparsity differs on purpose (no aliasing, the user's
model untouched) are in ``TestDifferences``.
"""

from __future__ import annotations

import copy
import itertools
import re
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from fx_sparsity import BaseSparsifier, CubicSL, LambdaSL, NearlyDiagonalSparsifier, WeightNormSparsifier
from fx_sparsity.levels import BaseScheduler
from helpers import MockSparseLinear, SimpleLinear, snapshot
from passes import masked_targets

ALL_LINEARS = ("seq.0", "seq.1", "seq.2", "linear1", "linear2")


class ImplementedSparsifier(BaseSparsifier):
    """torch.ao.pruning's test sparsifier (torch.testing._internal.common_pruning) on our API: zero row 0 of the mask
    and count its own steps in the state of linear1.weight."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(defaults=kwargs)

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        self.get_mask(module, tensor_name)[0] = 0
        linear_state = self.state["linear1.weight"]
        linear_state["step_count"] = linear_state.get("step_count", 0) + 1


class ImplementedScheduler(BaseScheduler):
    """torch.ao.pruning's test scheduler: halve every level after the first epoch."""

    def get_sl(self) -> list[float]:
        if self.last_epoch > 0:
            return [group["sparsity_level"] * 0.5 for group in self.sparsifier.groups]
        return list(self.base_sl)


# ------------------------------------------------------------------------------------------------------ the adapter
def mask_of(gm: nn.Module, module_fqn: str) -> torch.Tensor:
    """torch.ao.pruning's ``module.parametrizations.weight[0].mask``."""
    return gm.get_buffer(f"{module_fqn}.weight_mask")


def is_parametrized(gm: nn.Module, module_fqn: str) -> bool:
    """torch.ao.pruning's ``is_parametrized(module, "weight")``: the weight has a mask buffer and a mask node."""
    has_buffer = hasattr(gm.get_submodule(module_fqn), "weight_mask")
    has_node = any(t.module_fqn == module_fqn for t in masked_targets(gm))
    assert has_buffer == has_node, f"{module_fqn}: a mask buffer without its node, or the reverse"
    return has_buffer


def mean(mask: torch.Tensor) -> torch.Tensor:
    return mask.mean()


# ------------------------------------------------------------------------------------------------ test_sparsifier.py
class TestBaseSparsifier:
    def test_constructor(self):
        """The base is abstract; config=None gives one group per Linear; an entry's defaults reach its group."""
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
        assert "test" in sparsifier.groups[0]
        assert sparsifier.groups[0]["test"] == 3

    def test_prepare_config(self):
        """An entry's own key beats the default; the module and FQN of a group agree; only selected weights are
        masked."""
        model = SimpleLinear()
        sparsifier = ImplementedSparsifier(test=3)
        assert not hasattr(model.seq[0], "parametrizations") and not hasattr(model.linear1, "parametrizations")
        gm = sparsifier.prepare(model, config=[{"tensor_fqn": "seq.0.weight", "test": 42}, {"tensor_fqn": "linear2.weight"}])
        assert len(sparsifier.groups) == 2
        assert sparsifier.groups[0]["tensor_fqn"] == "seq.0.weight"
        assert sparsifier.groups[0]["test"] == 42
        assert sparsifier.groups[1]["tensor_fqn"] == "linear2.weight"
        assert sparsifier.groups[1]["module"] is gm.get_submodule("linear2")
        assert is_parametrized(gm, "seq.0")
        assert not is_parametrized(gm, "linear1")
        assert is_parametrized(gm, "linear2")

    def test_step(self):
        """ImplementedSparsifier's step zeroes row 0 of linear1's mask."""
        model = SimpleLinear()
        sparsifier = ImplementedSparsifier(test=3)
        sparsifier.enable_mask_update = True
        gm = sparsifier.prepare(model, [{"tensor_fqn": "linear1.weight"}])
        sparsifier.step()
        assert torch.all(mask_of(gm, "linear1")[0] == 0)

    def test_state_dict(self):
        """A state dict carries the state (step_count 3), the groups with their extra key, and a mask of arange
        values; loading it into a sparsifier prepared on every Linear (no defaults) gives equal state, groups (its
        groups replace the sparsifier's) and masks."""
        step_count = 3
        model0 = SimpleLinear()
        sparsifier0 = ImplementedSparsifier(test=3)
        gm0 = sparsifier0.prepare(model0, [{"tensor_fqn": "linear1.weight"}])
        mask = mask_of(gm0, "linear1")
        mask.data = torch.arange(mask.shape[0] * mask.shape[1]).reshape(mask.shape)
        for _ in range(step_count):
            sparsifier0.step()
        state_dict = sparsifier0.state_dict()
        assert "state" in state_dict
        assert "step_count" in state_dict["state"]["linear1.weight"]
        assert state_dict["state"]["linear1.weight"]["step_count"] == 3
        assert "groups" in state_dict
        assert "test" in state_dict["groups"][0]
        assert "tensor_fqn" in state_dict["groups"][0]
        assert state_dict["groups"][0]["tensor_fqn"] == "linear1.weight"

        model1 = SimpleLinear()
        sparsifier1 = ImplementedSparsifier()
        gm1 = sparsifier1.prepare(model1, None)
        assert sparsifier0.state != sparsifier1.state
        masks0 = {g["module_fqn"]: mask_of(gm0, g["module_fqn"]) for g in sparsifier0.groups}
        masks1 = {g["module_fqn"]: mask_of(gm1, g["module_fqn"]) for g in sparsifier1.groups}
        assert not torch.equal(masks0["linear1"], masks1["linear1"])

        with pytest.warns(UserWarning, match="no group for .*no longer stepped"):
            sparsifier1.load_state_dict(state_dict)
        assert sparsifier0.state == sparsifier1.state
        assert len(sparsifier0.groups) == len(sparsifier1.groups)
        for mg0, mg1 in zip(sparsifier0.groups, sparsifier1.groups):
            for key in mg0:
                assert key in mg1
                if key == "module":  # modules differ; their masks must be equal
                    assert hasattr(mg0[key], "weight_mask") and hasattr(mg1[key], "weight_mask")
                    assert torch.equal(mg0[key].weight_mask, mg1[key].weight_mask)
                else:
                    assert mg0[key] == mg1[key], key

    def test_convert(self):
        """convert(mapping={nn.Linear: MockSparseLinear}) swaps the sparsified Linear only."""
        model = SimpleLinear()
        sparsifier = ImplementedSparsifier(test=3)
        gm = sparsifier.prepare(model, [{"tensor_fqn": "linear1.weight"}])
        new_model = sparsifier.convert(gm, mapping={nn.Linear: MockSparseLinear}, inplace=False)
        assert isinstance(new_model.linear1, MockSparseLinear)
        assert isinstance(new_model.get_submodule("seq.0"), nn.Linear)
        assert isinstance(new_model.linear2, nn.Linear)

    def test_mask_squash(self):
        """squash_mask removes linear1's mask; seq.0 was never masked."""
        model = SimpleLinear()
        sparsifier = ImplementedSparsifier(test=3)
        gm = sparsifier.prepare(model, [{"tensor_fqn": "linear1.weight"}])
        assert hasattr(gm.linear1, "weight_mask")
        assert is_parametrized(gm, "linear1")
        assert not is_parametrized(gm, "seq.0")
        sparsifier.squash_mask()
        assert not is_parametrized(gm, "seq.0")
        assert not is_parametrized(gm, "linear1")

    @staticmethod
    def _squashed(**squash_args: Any) -> nn.Module:
        model = SimpleLinear()
        sparsifier = ImplementedSparsifier(foo=3, bar=2, baz=1)
        gm = sparsifier.prepare(model, [{"tensor_fqn": "linear1.weight"}, {"tensor_fqn": "seq.0.weight"}])
        sparsifier.squash_mask(**squash_args)
        assert not is_parametrized(gm, "seq.0") and not is_parametrized(gm, "linear1")
        assert hasattr(gm.get_submodule("seq.0"), "sparse_params") and hasattr(gm.linear1, "sparse_params")
        return gm

    def test_mask_squash_with_params1(self):
        """params_to_keep_per_layer keeps the named keys of each layer only."""
        gm = self._squashed(params_to_keep_per_layer={"linear1": ("foo", "bar"), "seq.0": ("baz",)})
        seq0, linear1 = gm.get_submodule("seq.0").sparse_params, gm.linear1.sparse_params
        assert seq0.get("foo", None) is None and seq0.get("bar", None) is None and seq0.get("baz", None) == 1
        assert linear1.get("foo", None) == 3 and linear1.get("bar", None) == 2 and linear1.get("baz", None) is None

    def test_mask_squash_with_params2(self):
        """params_to_keep keeps the same keys for every layer."""
        gm = self._squashed(params_to_keep=("foo", "bar"))
        for params in (gm.get_submodule("seq.0").sparse_params, gm.linear1.sparse_params):
            assert params.get("foo", None) == 3 and params.get("bar", None) == 2 and params.get("baz", None) is None

    def test_mask_squash_with_params3(self):
        """params_to_keep and params_to_keep_per_layer together: the union for the named layer."""
        gm = self._squashed(params_to_keep=("foo", "bar"), params_to_keep_per_layer={"seq.0": ("baz",)})
        seq0, linear1 = gm.get_submodule("seq.0").sparse_params, gm.linear1.sparse_params
        assert seq0.get("foo", None) == 3 and seq0.get("bar", None) == 2 and seq0.get("baz", None) == 1
        assert linear1.get("foo", None) == 3 and linear1.get("bar", None) == 2 and linear1.get("baz", None) is None


class TestWeightNormSparsifier:
    def test_constructor(self):
        """config=None selects every Linear of SimpleLinear."""
        model = SimpleLinear()
        sparsifier = WeightNormSparsifier()
        sparsifier.prepare(model, config=None)
        for g in sparsifier.groups:
            assert isinstance(g["module"], nn.Linear)
            assert g["module_fqn"] in ALL_LINEARS

    def test_step(self):
        """One step at 0.5 halves linear1's mask; it does not collapse over 1000 steps on re-randomised weights."""
        model = SimpleLinear()
        sparsifier = WeightNormSparsifier(sparsity_level=0.5)
        gm = sparsifier.prepare(model, config=[{"tensor_fqn": "linear1.weight"}])
        for g in sparsifier.groups:
            assert (1.0 - mean(g["module"].weight_mask)) == 0
        sparsifier.enable_mask_update = True
        sparsifier.step()
        assert mean(mask_of(gm, "linear1")).item() == pytest.approx(0.5, abs=0.005)
        for g in sparsifier.groups:
            assert (1.0 - mean(g["module"].weight_mask)) > 0
        for _ in range(1000):
            gm.linear1.weight.data = torch.randn(gm.linear1.weight.shape)
            sparsifier.step()
        for g in sparsifier.groups:
            assert (1.0 - mean(g["module"].weight_mask)) > 0

    def test_step_2_of_4(self):
        """sparsity_level=1, (1, 4) blocks, 2 zeros each: half the mask, exactly 2 zeros in every block of 4."""
        model = SimpleLinear()
        sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
        gm = sparsifier.prepare(model, config=[{"tensor_fqn": "linear1.weight"}])
        sparsifier.step()
        mask = mask_of(gm, "linear1").to(torch.float)
        assert mask.mean().item() == pytest.approx(0.5, abs=0.005)
        mask = sparsifier.groups[0]["module"].weight_mask
        for row in mask:
            for idx in range(0, len(row), 4):
                block, _ = row[idx : idx + 4].sort()
                assert (block[:2] == 0).all()
                assert (block[2:] != 0).all()

    def test_prepare(self):
        """Every selected weight gets a mask (and a mask node)."""
        model = SimpleLinear()
        sparsifier = WeightNormSparsifier()
        gm = sparsifier.prepare(model, config=None)
        for g in sparsifier.groups:
            assert hasattr(g["module"], "weight_mask")
            assert is_parametrized(gm, g["module_fqn"])

    def test_mask_squash(self):
        """After squash_mask no weight is parametrized and no module keeps a mask."""
        model = SimpleLinear()
        sparsifier = WeightNormSparsifier()
        gm = sparsifier.prepare(model, config=None)
        sparsifier.squash_mask()
        for g in sparsifier.groups:
            assert not is_parametrized(gm, g["module_fqn"])
            assert not hasattr(g["module"], "mask") and not hasattr(g["module"], "weight_mask")

    def test_sparsity_levels(self):
        """Levels -1, 0, 0.5, 1, 2 (clamped) x block shapes x zeros per block, one 12x12 ones-layer each: the zeros
        are clamp(level) * zeros / block size of the weight."""
        sparsity_levels = [-1.0, 0.0, 0.5, 1.0, 2.0]
        sparse_block_shapes = [(1, 1), (1, 4), (2, 2), (4, 1)]
        zeros_per_blocks = [0, 1, 2, 3, 4]
        cases = [c for c in itertools.product(sparsity_levels, sparse_block_shapes, zeros_per_blocks)
                 if c[2] <= c[1][0] * c[1][1]]
        name_of = {c: re.sub(r"[-.\s]", "_", f"{c[0]}_{c[1]}_{c[2]}") for c in cases}
        model = nn.Sequential()
        sparsifier = WeightNormSparsifier()
        config = []
        for sl, sbs, zpb in cases:
            layer = nn.Linear(12, 12, bias=False)
            layer.weight = nn.Parameter(torch.ones(12, 12))
            model.add_module(name_of[(sl, sbs, zpb)], layer)
            config.append({"tensor_fqn": name_of[(sl, sbs, zpb)] + ".weight", "sparsity_level": sl,
                           "sparse_block_shape": sbs, "zeros_per_block": zpb})
        gm = sparsifier.prepare(model, config)
        sparsifier.step()
        sparsifier.squash_mask()
        gm.eval()
        for sl, sbs, zpb in cases:
            weight = gm.get_parameter(name_of[(sl, sbs, zpb)] + ".weight")
            sparse_mask = (weight == 0).float()
            if zpb == 0:
                assert sparse_mask.mean() == 0
            else:
                true_sl = min(max(sl, 0.0), 1.0) * zpb / sbs[0] / sbs[1]
                assert sparse_mask.mean() == true_sl, (sl, sbs, zpb)


class TestNearlyDiagonalSparsifier:
    def test_constructor(self):
        """config=None selects every Linear."""
        model = SimpleLinear()
        sparsifier = NearlyDiagonalSparsifier(nearliness=1)
        sparsifier.prepare(model, config=None)
        for g in sparsifier.groups:
            assert isinstance(g["module"], nn.Linear)
            assert g["module_fqn"] in ALL_LINEARS

    def test_step(self):
        """nearliness=1 gives the identity mask, which does not collapse over 1000 steps."""
        model = SimpleLinear()
        sparsifier = NearlyDiagonalSparsifier(nearliness=1)
        gm = sparsifier.prepare(model, config=[{"tensor_fqn": "linear1.weight"}])
        for g in sparsifier.groups:
            assert (1.0 - mean(g["module"].weight_mask)) == 0
        sparsifier.enable_mask_update = True
        sparsifier.step()
        mask = mask_of(gm, "linear1")
        height, width = mask.shape
        assert torch.all(mask == torch.eye(height, width))
        for g in sparsifier.groups:
            assert (1.0 - mean(g["module"].weight_mask)) > 0
        for _ in range(1000):
            gm.linear1.weight.data = torch.randn(gm.linear1.weight.shape)
            sparsifier.step()
        for g in sparsifier.groups:
            assert (1.0 - mean(g["module"].weight_mask)) > 0

    def test_prepare(self):
        """Every selected weight gets a mask (and a mask node)."""
        model = SimpleLinear()
        sparsifier = NearlyDiagonalSparsifier(nearliness=1)
        gm = sparsifier.prepare(model, config=None)
        for g in sparsifier.groups:
            assert hasattr(g["module"], "weight_mask")
            assert is_parametrized(gm, g["module_fqn"])

    def test_mask_squash(self):
        """After step and squash only the diagonal of each weight remains."""
        model = SimpleLinear()
        sparsifier = NearlyDiagonalSparsifier(nearliness=1)
        gm = sparsifier.prepare(model, config=None)
        sparsifier.step()
        sparsifier.squash_mask()
        for g in sparsifier.groups:
            assert not is_parametrized(gm, g["module_fqn"])
            assert not hasattr(g["module"], "mask") and not hasattr(g["module"], "weight_mask")
            weights = g["module"].weight
            height, width = weights.shape
            assert torch.all(weights == torch.eye(height, width) * weights)

    def test_sparsity_levels(self):
        """nearliness -1..99 on 32x32 ones-layers added to one model, each prepared by its own sparsifier: prepare
        takes any nearliness, step() refuses an even one or one reaching past the weight, the others leave the band
        |i - j| <= nearliness // 2 (nothing for nearliness <= 0)."""
        model = nn.Sequential()
        for nearliness in range(-1, 100):
            sparsifier = NearlyDiagonalSparsifier(nearliness=1)
            layer_name = re.sub(r"[-.\s]", "_", f"{nearliness}")
            layer = nn.Linear(32, 32, bias=False)
            layer.weight = nn.Parameter(torch.ones(32, 32))
            width, height = layer.weight.shape
            model.add_module(layer_name, layer)
            gm = sparsifier.prepare(model, [{"tensor_fqn": layer_name + ".weight", "nearliness": nearliness}])
            if (nearliness > 0 and nearliness % 2 == 0) or (nearliness // 2 >= min(width, height)):
                with pytest.raises(ValueError):
                    sparsifier.step()
            else:
                sparsifier.step()
                sparsifier.squash_mask()
                gm.eval()
                self._verify_nearliness(gm.get_parameter(layer_name + ".weight"), nearliness)

    @staticmethod
    def _verify_nearliness(mask: torch.Tensor, nearliness: int) -> None:
        if nearliness <= 0:
            assert torch.all(mask == torch.zeros(mask.shape[0], mask.shape[1]))
            return
        height, width = mask.shape
        dist_to_diagonal = nearliness // 2
        for row in range(height):
            for col in range(width):
                assert mask[row, col] == (1 if abs(row - col) <= dist_to_diagonal else 0), (row, col)


# ------------------------------------------------------------------------------------------------- test_scheduler.py
class TestScheduler:
    def test_constructor(self):
        """A scheduler holds its sparsifier, has stepped once and keeps the groups' levels as its base."""
        model = nn.Sequential(nn.Linear(16, 16))
        sparsifier = WeightNormSparsifier()
        sparsifier.prepare(model, config=None)
        scheduler = ImplementedScheduler(sparsifier)
        assert scheduler.sparsifier is sparsifier
        assert scheduler._step_count == 1
        assert scheduler.base_sl == [sparsifier.groups[0]["sparsity_level"]]

    def test_order_of_steps(self):
        """scheduler.step() before sparsifier.step() warns; the right order gives no warning from the scheduler."""
        model = nn.Sequential(nn.Linear(16, 16))
        sparsifier = WeightNormSparsifier()
        sparsifier.prepare(model, config=None)
        scheduler = ImplementedScheduler(sparsifier)
        with pytest.warns(UserWarning):
            scheduler.step()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            sparsifier.step()
            scheduler.step()
            for warning in w:
                assert "/".join(warning.filename.split("/")[-3:]) != "fx_sparsity/levels/scheduler.py"

    def test_step(self):
        """ImplementedScheduler halves the level from the second epoch on."""
        model = nn.Sequential(nn.Linear(16, 16))
        sparsifier = WeightNormSparsifier()
        sparsifier.prepare(model, config=None)
        assert sparsifier.groups[0]["sparsity_level"] == 0.5
        scheduler = ImplementedScheduler(sparsifier)
        assert sparsifier.groups[0]["sparsity_level"] == 0.5
        sparsifier.step()
        scheduler.step()
        assert sparsifier.groups[0]["sparsity_level"] == 0.25

    def test_lambda_scheduler(self):
        """LambdaSL(epoch * 10): level 0 at epoch 0 and 5.0 at epoch 1 (kept as given; WeightNorm clamps it)."""
        model = nn.Sequential(nn.Linear(16, 16))
        sparsifier = WeightNormSparsifier()
        sparsifier.prepare(model, config=None)
        assert sparsifier.groups[0]["sparsity_level"] == 0.5
        scheduler = LambdaSL(sparsifier, lambda epoch: epoch * 10)
        assert sparsifier.groups[0]["sparsity_level"] == 0.0
        scheduler.step()
        assert sparsifier.groups[0]["sparsity_level"] == 5.0


class TestCubicScheduler:
    CONFIG = [{"tensor_fqn": "0.weight", "sparsity_level": 0.8}, {"tensor_fqn": "2.weight", "sparsity_level": 0.4}]
    LEVELS = [0.8, 0.4]
    INITIAL_SPARSITY, INITIAL_STEP = 0.1, 3

    @staticmethod
    def _make_model() -> nn.Module:
        return nn.Sequential(nn.Linear(13, 17), nn.Dropout(0.5), nn.Linear(17, 3))

    def _make_scheduler(self, model: nn.Module, **kwargs: Any):
        sparsifier = WeightNormSparsifier()
        sparsifier.prepare(model, config=copy.deepcopy(self.CONFIG))
        args = {"init_sl": self.INITIAL_SPARSITY, "init_t": self.INITIAL_STEP, **kwargs}
        return sparsifier, CubicSL(sparsifier, **args)

    @staticmethod
    def _levels(sparsifier: BaseSparsifier, precision: int = 32) -> list[float]:
        return [round(group["sparsity_level"], precision) for group in sparsifier.groups]

    def test_constructor(self):
        """Attached, stepped once, the targets kept; before t_0 the level is 0 (initially_zero) or s_0."""
        sparsifier, scheduler = self._make_scheduler(self._make_model(), initially_zero=True)
        assert scheduler.sparsifier is sparsifier
        assert scheduler._step_count == 1
        assert scheduler.base_sl == self.LEVELS
        assert self._levels(sparsifier) == [0.0] * len(self.LEVELS)
        sparsifier, scheduler = self._make_scheduler(self._make_model(), initially_zero=False)
        assert self._levels(sparsifier) == [self.INITIAL_SPARSITY] * len(self.LEVELS)

    def test_step(self):
        """init_t=3, delta_t=2, total_t=5: 0 before t_0, s_0 at t_0, about [0.3, 0.2] one step later, the targets
        after delta_t * total_t steps."""
        sparsifier, scheduler = self._make_scheduler(self._make_model(), initially_zero=True, init_t=3, delta_t=2,
                                                     total_t=5)
        scheduler.step()
        scheduler.step()
        assert scheduler._step_count == 3
        assert self._levels(sparsifier) == [0.0] * len(self.LEVELS)
        scheduler.step()
        assert self._levels(sparsifier) == [self.INITIAL_SPARSITY] * len(self.LEVELS)
        scheduler.step()
        assert self._levels(sparsifier, 1) == [0.3, 0.2]
        current_step = scheduler._step_count - scheduler.init_t[0] - 1
        for _ in range(scheduler.delta_t[0] * scheduler.total_t[0] - current_step):
            scheduler.step()
        assert self._levels(sparsifier) == self.LEVELS


# --------------------------------------------------------------------------- where fx_sparsity differs, on purpose
class TestDifferences:
    def test_state_dict_copies_and_the_model_stays_untouched(self):
        """state_dict returns copies and load_state_dict copies in: the two sparsifiers' masks, state and groups stay
        independent afterwards (torch.ao.pruning shares them); the user's models keep their weights and gain no
        parametrization or mask."""
        model0, model1 = SimpleLinear(), SimpleLinear()
        before0, before1 = snapshot(model0), snapshot(model1)
        sparsifier0 = ImplementedSparsifier(test=3)
        gm0 = sparsifier0.prepare(model0, [{"tensor_fqn": "linear1.weight"}])
        for _ in range(3):
            sparsifier0.step()
        state_dict = sparsifier0.state_dict()
        sparsifier1 = ImplementedSparsifier(test=0)
        gm1 = sparsifier1.prepare(model1, [{"tensor_fqn": "linear1.weight"}])
        sparsifier1.load_state_dict(state_dict)
        assert mask_of(gm0, "linear1").data_ptr() != mask_of(gm1, "linear1").data_ptr()
        mask_of(gm0, "linear1").zero_()
        assert mask_of(gm1, "linear1").sum() > 0
        sparsifier0.step()
        assert sparsifier1.state["linear1.weight"]["step_count"] == 3
        state_dict["groups"][0]["test"] = 99
        state_dict["state"]["linear1.weight"]["step_count"] = 99
        assert sparsifier1.groups[0]["test"] == 3
        assert sparsifier1.state["linear1.weight"]["step_count"] == 3
        for model, before in ((model0, before0), (model1, before1)):
            after = snapshot(model)
            assert after["modules"] == before["modules"]
            for key, value in before["state"].items():
                assert torch.equal(after["state"][key], value), key

    def test_extra_keys_only_where_update_mask_takes_them(self):
        """A custom sparsifier whose update_mask takes **kwargs carries extra group keys through config and state
        dict to update_mask; a key close to one of its arguments is still refused with the hint, and fx_sparsity's
        own sparsifiers refuse unknown keys."""
        seen = {}

        class Recording(ImplementedSparsifier):
            def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
                seen.update(kwargs)

        sparsifier = Recording(sparsity_level=0.5)
        sparsifier.prepare(SimpleLinear(), [{"tensor_fqn": "linear1.weight", "note": "keep"}])
        sparsifier.step()
        assert seen["note"] == "keep" and seen["sparsity_level"] == 0.5
        with pytest.raises(ValueError, match="did you mean 'sparsity_level'"):
            Recording(sparsity_level=0.5).prepare(SimpleLinear(), [{"tensor_fqn": "linear1.weight", "sparsity_levle": 1}])
        with pytest.raises(ValueError, match="'note', which is not an argument of WeightNormSparsifier"):
            WeightNormSparsifier().prepare(SimpleLinear(), [{"tensor_fqn": "linear1.weight", "note": "keep"}])

    def test_step_disabled(self):
        """enable_mask_update=False makes step a no-op: every mask stays all ones."""
        sparsifier = ImplementedSparsifier()
        gm = sparsifier.prepare(SimpleLinear(), None)
        sparsifier.enable_mask_update = False
        sparsifier.step()
        assert all(bool(mask_of(gm, fqn).all()) for fqn in ALL_LINEARS)

    def test_convert_fuses_on_a_copy(self):
        """convert(inplace=False) swaps on a copy with the mask fused into the new module's weight: the prepared
        module stays masked and both compute the same."""
        sparsifier = ImplementedSparsifier(test=3)
        gm = sparsifier.prepare(SimpleLinear(), [{"tensor_fqn": "linear1.weight"}])
        sparsifier.step()
        new = sparsifier.convert(gm, mapping={nn.Linear: MockSparseLinear}, inplace=False)
        assert isinstance(new.linear1, MockSparseLinear)
        assert masked_targets(gm), "inplace=False must leave the prepared module masked"
        x = torch.randn(3, 7)
        torch.testing.assert_close(new(x), gm(x))
