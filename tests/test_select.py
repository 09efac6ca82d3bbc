"""Matching Linear/Conv weights and selecting them by config."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fx_sparsity import WeightNormSparsifier, prepare
from fx_sparsity.config import parse_config
from helpers import ControlFlowNet, ConvNet1d3d, MixedNet, SimpleLinear
from passes import find_weights, select_weights
from passes.capturing import capture


def test_find_weights_both_forms_and_shared_weights():
    """MixedNet: call_module convs/linears, a functional F.linear, a weight used twice and a tied weight."""
    gm = capture(MixedNet())
    matches = {m.tensor_fqn: m for m in find_weights(gm)}
    assert set(matches) == {"conv.weight", "conv_reflect.weight", "fc.weight", "shared.weight", "head_weight"}
    shared = matches["shared.weight"]
    assert shared.aliases == ("shared.weight", "tied.weight")
    assert len(shared.nodes) == 3 and shared.call_module_fqns == ("shared", "tied")
    assert matches["head_weight"].kind == "linear" and matches["head_weight"].call_module_fqns == ()
    assert matches["conv.weight"].kind == "conv2d" and matches["conv.weight"].weight_shape == (8, 3, 3, 3)


def test_find_weights_on_export_graph():
    """Export graphs: aten.linear / aten.conv nodes whose weight is a get_attr."""
    model = ControlFlowNet()
    gm = capture(model, example_inputs=torch.randn(2, 6))
    assert {(m.tensor_fqn, m.kind) for m in find_weights(gm)} == {("fc1.weight", "linear"), ("fc2.weight", "linear")}
    gm = capture(ConvNet1d3d(), example_inputs=(torch.randn(1, 4, 16), torch.randn(1, 2, 4, 6, 6)))
    assert {(m.tensor_fqn, m.kind) for m in find_weights(gm)} == {("c1.weight", "conv1d"), ("c3.weight", "conv3d")}


def test_overridden_forward_is_not_matched():
    """A Linear subclass with its own forward is traced through, not rewritten as a Linear."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    gm = capture(nn.Sequential(Scaled(3, 3)))
    matches = find_weights(gm)
    assert [m.tensor_fqn for m in matches] == ["0.weight"] and matches[0].call_module_fqns == ()


@pytest.mark.parametrize(
    "config, expected",
    [
        (None, {"seq.0", "seq.1", "seq.2", "linear1", "linear2"}),
        ([{"tensor_fqn": "linear1.weight"}], {"linear1"}),
        ([{"module_fqn": "linear1"}], {"linear1"}),
        ([{"pattern": "seq.*"}], {"seq.0", "seq.1", "seq.2"}),
        (["linear*", "seq.1"], {"linear1", "linear2", "seq.1"}),
        ({"seq.[02]": {}, "linear2.weight": {}}, {"seq.0", "seq.2", "linear2"}),
        ([{"tensor_fqn": "seq.*.weight"}], {"seq.0", "seq.1", "seq.2"}),
    ],
)
def test_selection_forms(config, expected):
    """All config forms select the expected modules."""
    sparsifier = WeightNormSparsifier()
    sparsifier.prepare(SimpleLinear(), config)
    assert {g["module_fqn"] for g in sparsifier.groups} == expected


def test_precedence_exact_tensor_over_module_over_pattern():
    """Exact tensor FQN beats exact module FQN beats the first matching pattern beats the default."""
    config = [
        {"pattern": "*", "sparsity_level": 0.1},
        {"pattern": "seq.*", "sparsity_level": 0.2},
        {"module_fqn": "linear1", "sparsity_level": 0.3},
        {"tensor_fqn": "linear1.weight", "sparsity_level": 0.4},
        {"module_fqn": "seq.2", "sparsity_level": 0.5},
    ]
    sparsifier = WeightNormSparsifier(sparsity_level=0.9)
    sparsifier.prepare(SimpleLinear(), config)
    levels = {g["module_fqn"]: g["sparsity_level"] for g in sparsifier.groups}
    assert levels == {"seq.0": 0.1, "seq.1": 0.1, "seq.2": 0.5, "linear1": 0.4, "linear2": 0.1}


def test_tied_weight_selected_by_either_name():
    """A tied weight is one group whichever alias or module names it."""
    for key in ("shared", "tied", "tied.weight"):
        sparsifier = WeightNormSparsifier()
        sparsifier.prepare(MixedNet(), [key])
        assert [g["tensor_fqn"] for g in sparsifier.groups] == ["shared.weight"]



class AliasedNet(nn.Module):
    """One Linear reachable as ``a`` and ``b`` (``self.b = self.a``), called as ``b``, then a Linear ``c``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.c = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(x))


@pytest.mark.parametrize("capture_method", ["symbolic_trace", "export"])
@pytest.mark.parametrize("key", ["b", "b.weight", "a", {"module_fqn": "b"}, {"tensor_fqn": "b.weight"}])
def test_aliased_module_is_selected_by_either_name(key, capture_method):
    """AliasedNet with the config ['b'] (the module's second name): symbolic tracing keeps the first name only, and
    'b' selected nothing ("no Linear or Conv op in the graph uses it"). Either name of the module or of its weight now
    selects the one shared weight, a.weight, with either capture."""
    sparsifier = WeightNormSparsifier()
    sparsifier.prepare(AliasedNet(), [key], example_inputs=(torch.randn(2, 4),), capture_method=capture_method)
    assert [g["tensor_fqn"] for g in sparsifier.groups] == ["a.weight"]


def test_two_names_of_one_weight_with_different_arguments_are_refused():
    """{'a': level 0.5, 'b': level 0.9} names one weight twice with different levels: neither name has precedence, so
    it is an error asking to merge the entries; the same arguments under both names are one selection."""
    with pytest.raises(ValueError, match="config entries 'a' and 'b' name the same weight a.weight .*merge them"):
        prepare(AliasedNet(), {"a": {"sparsity_level": 0.5}, "b": {"sparsity_level": 0.9}})
    sparsifier = WeightNormSparsifier()
    sparsifier.prepare(AliasedNet(), {"a": {"sparsity_level": 0.5}, "b": {"sparsity_level": 0.5}})
    assert [(g["tensor_fqn"], g["sparsity_level"]) for g in sparsifier.groups] == [("a.weight", 0.5)]


@pytest.mark.parametrize(
    "config, error, match",
    [
        ([{"tensor_fqn": "shard.weight"}], ValueError, "closest FQNs: shared.weight"),
        ([{"module_fqn": "fc.weight"}], ValueError, "is a weight tensor, not a module: select it with tensor_fqn"),
        ([{"tensor_fqn": "fc.bias"}], ValueError, "'fc.bias' is a Parameter of Linear module 'fc'"),
        ([{"pattern": "nothing*"}], ValueError, "matches no Linear or Conv weight"),
        ([{"sparsity_level": 0.5}], ValueError, "names no weight"),
        ([{"tensor_fqn": "fc.weight", "module_fqn": "conv"}], ValueError, "disagree"),
        ([{"tensor_fqn": "fc.weight", "module": None}], ValueError, "derived from the selection"),
        (["fc", "fc"], ValueError, "twice"),
        ("fc", TypeError, "config must be None"),
        ([3], TypeError, r"config\[0\] must be a dict"),
        ({"fc": 0.5}, TypeError, r"config\['fc'\] must be a dict"),
        ([{"tensor_fqn": "fc.weight", "zeros_per_block": 9}], ValueError, "zeros_per_block=9"),
        ([{"tensor_fqn": "fc"}], ValueError, "'fc' is a module, not a tensor: select it with module_fqn='fc' or "
         "tensor_fqn='fc.weight'"),
        ([], ValueError, "config is empty.*pass None"),
        ({}, ValueError, "config is empty.*pass None"),
        ({"fc": {"sparsity_levle": 0.5}}, ValueError, "'sparsity_levle', which is not an argument of "
         "WeightNormSparsifier.*did you mean 'sparsity_level'"),
        ([{"tensor_fqn": "fc.weight", "spars_block_shape": (1, 1)}], ValueError, "did you mean 'sparse_block_shape'"),
        ({"fc": {"sparsity_level": float("nan")}}, ValueError, "sparsity_level of fc.weight must be a number, got NaN"),
        ({"fc": {"sparsity_level": "1.5"}}, TypeError, "sparsity_level of fc.weight must be a number"),
        ({"fc": {"mask": torch.ones(3, 3)}}, ValueError, r"'mask' has shape \(3, 3\), the weight has \(12, 8\)"),
        ({"fc": {"mask": [[1.0]]}}, TypeError, "'mask' must be a tensor"),
    ],
)
def test_config_errors_leave_model_untouched(config, error, match):
    """Bad configs raise a clear error before anything is built; the user's model is unchanged."""
    model = MixedNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        prepare(model, config)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(hasattr(m, "weight_mask") for m in model.modules())


def test_embedding_weight_is_described():
    """Naming an Embedding's weight says what it is."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, idx):
            return self.fc(self.emb(idx))

    with pytest.raises(ValueError, match="'emb.weight' is a Parameter of Embedding module 'emb'"):
        prepare(Net(), ["emb.weight"])
    with pytest.raises(ValueError, match="'emb' is a Embedding module"):
        prepare(Net(), ["emb"])


def test_container_is_described():
    """Naming a Sequential says it is one, though the captured module flattens containers."""
    with pytest.raises(ValueError, match="'seq' is a Sequential module, not a Linear or Conv layer"):
        prepare(SimpleLinear(), [{"module_fqn": "seq"}])


def test_no_weights_is_an_error():
    """A model without Linear/Conv cannot be prepared."""
    with pytest.raises(ValueError, match="no Linear or Conv weight"):
        prepare(nn.Sequential(nn.ReLU()))


def test_parse_config_rules():
    """Strings become exact or pattern rules; overrides are read-only."""
    rules = parse_config(["fc", "layer*", {"tensor_fqn": "a.weight", "sparsity_level": 0.7}])
    assert [(r.key, r.by) for r in rules] == [("fc", "fqn"), ("layer*", "pattern"), ("a.weight", "tensor_fqn")]
    with pytest.raises(TypeError):
        rules[2].overrides["sparsity_level"] = 0.1
    assert select_weights(capture(SimpleLinear()), [], None) == []


def test_initial_mask_from_config_is_honoured():
    """torch.ao.pruning's config key "mask" is the initial mask: the prepared module starts with it, and the
    first step scores the weight as masked by it (pruned entries stay pruned)."""
    model = SimpleLinear()
    initial = torch.ones(4, 4)
    initial[0, 1] = initial[2, 3] = 0
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    gm = prepare(model, [{"tensor_fqn": "linear1.weight", "mask": initial}], sparsifier=sparsifier)
    assert torch.equal(gm.get_buffer("linear1.weight_mask"), initial)
    assert "mask" not in sparsifier.groups[0]
    x = torch.randn(2, 7)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.linear1.weight.mul_(initial)
    torch.testing.assert_close(gm(x), reference(x))
    sparsifier.step()
    mask = gm.get_buffer("linear1.weight_mask")
    assert mask.sum() == 8 and not bool((mask > initial).any())
