"""Capture: symbolic tracing by default, torch.export fallback, clear errors, no shared modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import ControlFlowNet, MixedNet, snapshot
from passes import CaptureError, get_capture
from passes.capturing import capture


def test_symbolic_trace_shares_parameters_not_modules():
    """MixedNet: the capture's parameters are the model's objects; no module object is shared."""
    model = MixedNet()
    before = snapshot(model)
    gm = capture(model)
    assert get_capture(gm).method == "symbolic_trace"
    model_params = {id(p) for p in model.parameters()}
    assert {id(p) for p in gm.parameters()} == model_params
    assert not {id(m) for m in gm.modules()} & {id(m) for m in model.modules()}
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x))
    assert snapshot(model)["ids"] == before["ids"]


def test_leaf_modules_and_concrete_args():
    """leaf_modules keeps a module as call_module; concrete_args fixes a flag reaching control flow."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x, double: bool = False):
            y = self.block(x)
            return y * 2 if double else y

    gm = capture(Net(), leaf_modules=[Block], concrete_args={"double": True})
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["block"]
    gm = capture(Net(), leaf_modules=["block"], concrete_args={"double": False})
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["block"]


def test_export_fallback_when_tracing_fails():
    """ControlFlowNet: symbolic tracing fails, example_inputs switch to torch.export; outputs match."""
    model = ControlFlowNet()
    x = torch.randn(3, 6)
    gm = capture(model, example_inputs=(x,))
    assert get_capture(gm).method == "export"
    torch.testing.assert_close(gm(x), model(x))
    assert gm.get_parameter("fc1.weight") is model.fc1.weight


def test_error_without_example_inputs_names_construct_and_remedies():
    """No example_inputs: CaptureError names the failing line and both remedies."""
    with pytest.raises(CaptureError) as info:
        capture(ControlFlowNet())
    message = str(info.value)
    assert "if x.shape[0] > 1" in message
    assert "example_inputs" in message and "leaf_modules" in message


def test_error_when_both_captures_fail():
    """Data-dependent control flow: both failures are reported."""

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(CaptureError, match="symbolic tracing failed.*\n.*torch.export failed"):
        capture(DataDependent(), example_inputs=torch.randn(2, 4))


def test_bad_arguments():
    """Non-modules and bad example_inputs / leaf_modules raise TypeError."""
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        capture(lambda x: x)
    with pytest.raises(TypeError, match="example_inputs"):
        capture(nn.Linear(2, 2), example_inputs={"x": 1})
    with pytest.raises(TypeError, match="leaf_modules"):
        capture(nn.Linear(2, 2), leaf_modules=[3])


def test_torch_nn_containers_with_linears_are_traced_into():
    """nn.TransformerEncoder (a torch.nn module, a leaf by default) holds Linears: capture traces into it.
    Its control flow then needs torch.export (example_inputs); without them the error points inside torch's
    module; leaf_modules keeps it opaque on request."""
    from helpers import TinyViT
    from passes import find_weights

    model = TinyViT().eval()
    x = torch.randn(2, 3, 32, 32)
    gm = capture(model, example_inputs=(x,))
    fqns = {m.tensor_fqn for m in find_weights(gm)}
    assert {"encoder.layers.0.linear1.weight", "encoder.layers.1.self_attn.in_proj_weight",
            "encoder.layers.1.self_attn.out_proj.weight"} <= fqns
    with pytest.raises(CaptureError, match=r"inside torch/nn/modules/transformer.py:\d+ in _get_seq_len"):
        capture(model)
    opaque = capture(model, leaf_modules=[nn.TransformerEncoder])
    assert {m.tensor_fqn for m in find_weights(opaque)} == {"patch_embed.weight", "head.weight"}


# ---------------------------------------------------------------- the user's model is never modified

_OFFSET = torch.arange(4.0)  # a module-level tensor: symbolic tracing stores it on the traced root


class CachingNet(nn.Module):
    """Writes into its own dict during forward (timm's attention_bias_cache) and reads a module-level tensor."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.cache: dict[str, torch.Tensor] = {}
        self.sizes = [4, 4]

    def forward(self, x):
        if "bias" not in self.cache:
            self.cache["bias"] = self.fc.bias * 2
        return self.bn(self.fc(x) + self.cache["bias"] + _OFFSET) * self.sizes[0]


class CachingControlFlowNet(CachingNet):
    """CachingNet with control flow on a shape: only torch.export captures it."""

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2
        return super().forward(x)


def deep_snapshot(model: nn.Module) -> dict:
    """Every module's attributes by identity, the contents of its dict/list attributes, and tensor values."""
    snap = {}
    for fqn, module in model.named_modules():
        attrs = {}
        for key, value in vars(module).items():
            contents = None
            if isinstance(value, dict):
                contents = {k: id(v) for k, v in value.items()}
            elif isinstance(value, list):
                contents = [id(v) for v in value]
            attrs[key] = (id(value), contents)
        snap[fqn] = attrs
    snap["tensors"] = {k: (id(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    return snap


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = deep_snapshot(model)
    tensors_before, tensors_after = before["tensors"], after.pop("tensors")
    assert after == {k: v for k, v in before.items() if k != "tensors"}
    assert tensors_after.keys() == tensors_before.keys()
    for key, (obj_id, value) in tensors_before.items():
        assert tensors_after[key][0] == obj_id, key
        torch.testing.assert_close(tensors_after[key][1], value, rtol=0, atol=0)


@pytest.mark.parametrize("training", [False, True])
def test_symbolic_trace_leaves_model_untouched(training):
    """CachingNet: tracing writes a constant and a cached Proxy onto the module it traces; the user's model
    keeps every attribute, dict entry, tensor object and value (BatchNorm statistics too), and a second capture
    (and a plain symbolic_trace) still works."""
    model = CachingNet().train(training)
    before = deep_snapshot(model)
    gm = capture(model)
    assert get_capture(gm).method == "symbolic_trace"
    assert_unchanged(model, before)
    gm2 = capture(model)
    assert_unchanged(model, before)
    x = torch.randn(3, 4)
    model.eval(), gm.eval(), gm2.eval()
    torch.testing.assert_close(gm(x), model(x))
    torch.testing.assert_close(gm2(x), model(x))


def test_export_capture_leaves_model_untouched():
    """CachingControlFlowNet in training mode, captured with torch.export: its list and dict attributes stay
    the same objects, BatchNorm running statistics and num_batches_tracked do not change."""
    model = CachingControlFlowNet().train()
    before = deep_snapshot(model)
    gm = capture(model, example_inputs=(torch.randn(3, 4),))
    assert get_capture(gm).method == "export"
    assert_unchanged(model, before)
    assert model.bn.num_batches_tracked.item() == 0


def test_prepare_twice_on_a_caching_model():
    """fx_sparsity.prepare of CachingNet twice: both prepared modules work and the model is untouched."""
    import fx_sparsity

    model = CachingNet().eval()
    x = torch.randn(3, 4)
    before = deep_snapshot(model)
    prepared = [fx_sparsity.prepare(model, sparsifier=fx_sparsity.WeightNormSparsifier(0.5, (1, 1))) for _ in "ab"]
    assert_unchanged(model, before)
    for gm in prepared:
        torch.testing.assert_close(gm(x), model(x))


# ---------------------------------------------------------------- dynamic batch of export captures


def test_export_capture_has_a_dynamic_batch():
    """ControlFlowNet captured with torch.export at batch 3 runs at batch 2, 5 and 17 like the eager model."""
    model = ControlFlowNet().eval()
    gm = capture(model, example_inputs=(torch.randn(3, 6),))
    assert get_capture(gm).dynamic_batch is True
    for batch in (2, 5, 17):
        x = torch.randn(batch, 6)
        torch.testing.assert_close(gm(x), model(x))


class FixedBatchNet(ControlFlowNet):
    """ControlFlowNet whose forward hard-codes the batch size: export must specialise it."""

    def forward(self, x):
        return super().forward(x + torch.zeros(3, 1))


@pytest.mark.parametrize("model, batch, reason", [
    (FixedBatchNet(), 3, r"could not keep dim 0 dynamic.*specialized it to be a constant \(3\)"),
    (ControlFlowNet(), 1, "batch size 0 or 1"),
])
def test_static_batch_is_warned_with_the_reason(model, batch, reason):
    """A model fixing its batch size, or an example batch of 1: the capture is static and a warning says why."""
    x = torch.randn(batch, 6)
    with pytest.warns(UserWarning, match=reason):
        gm = capture(model.eval(), example_inputs=(x,))
    assert get_capture(gm).dynamic_batch is False
    torch.testing.assert_close(gm(x), model(x))


def test_dynamic_shapes_argument_is_passed_to_export():
    """dynamic_shapes given: export uses it (here a static capture, so batch 5 is refused) and nothing warns."""
    import warnings

    model = ControlFlowNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = capture(model, example_inputs=(torch.randn(3, 6),), dynamic_shapes=({0: torch.export.Dim.STATIC},))
    assert get_capture(gm).dynamic_batch is None
    with pytest.raises(Exception, match="3"):
        gm(torch.randn(5, 6))


# ---------------------------------------------------------------- argument checks


def _prepared() -> nn.Module:
    from passes import find_weights
    from passes.masking import insert_masks

    gm = capture(nn.Sequential(nn.Linear(4, 4)))
    return insert_masks(gm, find_weights(gm))


def _masked_eager() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].register_buffer("weight_mask", torch.ones(4, 4))
    return model


@pytest.mark.parametrize("make, error, fix", [
    (lambda: torch.jit.script(nn.Linear(2, 2)), TypeError, "TorchScript.*pass the model you scripted"),
    (lambda: nn.DataParallel(nn.Linear(2, 2)), TypeError, r"DataParallel: pass the wrapped model, model\.module"),
    (lambda: torch.compile(nn.Linear(2, 2)), TypeError, r"OptimizedModule\): pass the original model, model\._orig_mod"),
    (lambda: nn.Sequential(nn.LazyLinear(2)), ValueError, "uninitialized lazy module 0.*run one forward pass"),
    (lambda: nn.Linear(2, 2, device="meta"), ValueError, "meta device.*to_empty"),
    (_prepared, ValueError, r"already prepared.*0\.weight_mask.*prepare the original model"),
    (_masked_eager, ValueError, r"already prepared.*0\.weight_mask"),
])
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_models_capture_refuses_say_what_to_pass(make, error, fix):
    """Wrappers, scripted, lazy, meta-device and already-prepared models are refused with the fix."""
    with pytest.raises(error, match=fix):
        capture(make())


def test_already_prepared_graph_module_without_buffers_is_refused():
    """A GraphModule whose nodes carry fx_sparsity's meta (mask buffers renamed away) is refused too."""
    gm = _prepared()
    gm.get_submodule("0")._buffers["renamed"] = gm.get_submodule("0")._buffers.pop("weight_mask")
    with pytest.raises(ValueError, match="already rewritten by the fx_sparsity passes"):
        capture(gm)


def test_leaf_modules_forms():
    """leaf_modules: a string is refused (not iterated as characters), a single type is accepted, an unknown FQN
    lists the closest names."""
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ReLU())
    with pytest.raises(TypeError, match=r"got the string '0': pass \['0'\]"):
        capture(model, leaf_modules="0")
    gm = capture(model, leaf_modules=nn.Sequential)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    with pytest.raises(ValueError, match="'0.1'.*closest: 0.0"):
        capture(model, leaf_modules=["0.1"])
    with pytest.raises(TypeError, match="leaf_modules must be"):
        capture(model, leaf_modules=3)


def test_other_argument_checks():
    """concrete_args must be a dict; dynamic_shapes needs example_inputs."""
    with pytest.raises(TypeError, match="concrete_args must be a dict"):
        capture(nn.Linear(2, 2), concrete_args=[1])
    with pytest.raises(ValueError, match="dynamic_shapes .*needs example_inputs"):
        capture(nn.Linear(2, 2), dynamic_shapes=({0: None},))


# ---------------------------------------------------------------- pickling


def _round_trips(module: nn.Module) -> list[nn.Module]:
    import io
    import pickle

    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return [pickle.loads(pickle.dumps(module)), torch.load(buffer, weights_only=False)]


@pytest.mark.parametrize("net, shape", [(MixedNet, (2, 3, 8, 8)), (ControlFlowNet, (3, 6))])
def test_prepared_lowered_and_fused_modules_pickle(net, shape):
    """MixedNet (symbolic trace) and ControlFlowNet (export capture), prepared and stepped, then lowered to csr
    and fused: pickle and torch.save round trips give identical outputs, keep the graph's node names and sparsity
    tags and gm.meta, and a loaded prepared module can still be stepped and lowered."""
    import fx_sparsity
    from passes import SPARSITY_META_KEY

    torch.manual_seed(0)
    model = net().eval()
    x = torch.randn(shape)
    # MagnitudeSparsifier: WeightNormSparsifier holds a local lambda, which does not pickle.
    gm = fx_sparsity.prepare(model, sparsifier=fx_sparsity.MagnitudeSparsifier(0.5), example_inputs=(x,))
    fx_sparsity.get_sparsifier(gm).step()
    with torch.no_grad():
        for module in (gm, fx_sparsity.lower(gm, "csr"), fx_sparsity.lower(gm, "fuse")):
            for loaded in _round_trips(module):
                torch.testing.assert_close(loaded(x), module(x), rtol=0, atol=0)
                assert [n.name for n in loaded.graph.nodes] == [n.name for n in module.graph.nodes]
                assert [n.meta.get(SPARSITY_META_KEY) for n in loaded.graph.nodes] == [
                    n.meta.get(SPARSITY_META_KEY) for n in module.graph.nodes]
                assert loaded.meta.keys() == module.meta.keys()
                assert _round_trips(loaded)[0].code == module.code
        loaded = _round_trips(gm)[1]
        fx_sparsity.get_sparsifier(loaded).step()
        torch.testing.assert_close(fx_sparsity.lower(loaded, "fuse")(x), gm(x))
        expected = gm(x)
        squashed = fx_sparsity.get_sparsifier(gm).squash_mask()
        for loaded in _round_trips(squashed):
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_loaded_static_export_capture_still_checks_input_shapes():
    """A static export capture (batch 3), pickled: its guard function is generated code, replaced on pickling by a
    check of the static input sizes, so batch 5 is still refused with a clear message."""
    model = ControlFlowNet().eval()
    gm = capture(model, example_inputs=(torch.randn(3, 6),), dynamic_shapes=({0: torch.export.Dim.STATIC},))
    for loaded in _round_trips(gm):
        x = torch.randn(3, 6)
        torch.testing.assert_close(loaded(x), model(x))
        with pytest.raises(AssertionError, match=r"Guard failed: input 0.size\(\)\[0\] == 3"):
            loaded(torch.randn(5, 6))


@pytest.mark.parametrize("method", ["auto", "symbolic_trace", "export"])
def test_an_attribute_that_cannot_be_copied_is_named(method):
    """A threading.Lock on a submodule: capture copies the model (sharing its tensors) and deepcopy refuses the lock.
    The TypeError names the submodule, its class, the attribute and the lock's type, with every capture method (the
    export capture wrapped it as a torch.export failure, advising torch.cond)."""
    import threading

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].lock = threading.Lock()
    with pytest.raises(TypeError, match=r"the attribute 'lock' of submodule '2' \(Linear\), a _thread.lock, cannot be "
                                        r"copied .*define __deepcopy__") as info:
        capture(model, example_inputs=(torch.randn(3, 4),), method=method)
    assert "torch.cond" not in str(info.value)


@torch.fx.wrap
def _wrapped_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight)


@torch.fx.wrap
def _wrapped_branchy_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.sum() > 0:  # data-dependent: torch.export cannot capture it
        return torch.nn.functional.linear(x, weight)
    return torch.nn.functional.linear(x, weight).relu()


class WrappedWeightNet(nn.Module):
    """fc is called as a module; proj's weight is used only inside a torch.fx.wrap'ed function (as torchvision's
    swin_t passes its attention projections to shifted_window_attention); with ``branchy``, a wrapped function
    torch.export cannot capture."""

    def __init__(self, branchy: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.proj = nn.Linear(8, 8)
        self.branchy = branchy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branchy:
            return _wrapped_branchy_linear(self.fc(x), self.proj.weight)
        return _wrapped_linear(self.fc(x), self.proj.weight)


def test_auto_capture_takes_export_when_tracing_hides_weights_export_exposes():
    """WrappedWeightNet with example inputs: symbolic tracing succeeds but leaves proj.weight in an opaque call, which
    the export graph exposes; method='auto' now returns the export capture (every weight matched) and warns, naming
    proj.weight and both ways to choose. Without example inputs, and with leaf_modules or concrete_args (symbolic
    tracing's own knobs), it keeps the trace."""
    import warnings

    from passes import find_weights, unmatched_weights

    model, x = WrappedWeightNet(), torch.randn(3, 8)
    with pytest.warns(UserWarning, match=r"WrappedWeightNet was captured with torch.export, not symbolic tracing: .*"
                                         r"\(proj.weight; passed to _wrapped_linear.*capture_method='symbolic_trace'"):
        gm = capture(model, example_inputs=(x,))
    assert get_capture(gm).method == "export"
    assert sorted(m.tensor_fqn for m in find_weights(gm)) == ["fc.weight", "proj.weight"]
    assert unmatched_weights(model, gm, find_weights(gm)) == []
    torch.testing.assert_close(gm(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kwargs in ({}, {"example_inputs": (x,), "leaf_modules": [nn.ReLU]},
                       {"example_inputs": (x,), "concrete_args": {}}):
            assert get_capture(capture(model, **kwargs)).method == "symbolic_trace", kwargs


def test_auto_capture_keeps_the_trace_that_masks_everything_or_when_export_fails():
    """MixedNet, whose every weight the trace matches, stays symbolically traced with example inputs (no export run,
    no warning); a wrapped function torch.export cannot capture (data-dependent control flow) keeps the trace too,
    its weight reported with the export remedy."""
    import warnings

    from passes import find_weights, unmatched_weights

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = capture(MixedNet(), example_inputs=(torch.randn(2, 3, 8, 8),))
    assert get_capture(gm).method == "symbolic_trace"
    model = WrappedWeightNet(branchy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = capture(model, example_inputs=(torch.randn(3, 8),))
    assert get_capture(gm).method == "symbolic_trace"
    (hidden,) = unmatched_weights(model, gm, find_weights(gm))
    assert hidden.tensor_fqn == "proj.weight" and hidden.opaque and "method='export'" in hidden.remedy


def test_auto_capture_of_a_small_swin_masks_every_weight():
    """torchvision's SwinTransformer (2 stages, embed_dim 16; swin_t's blocks, where symbolic tracing left the qkv
    and proj weights of every attention in shifted_window_attention): prepare with example inputs now masks all 11
    Linear/Conv weights, none left dense, and the masked module computes the model."""
    import warnings

    import fx_sparsity

    swin = pytest.importorskip("torchvision.models.swin_transformer", reason="torchvision is not importable here")
    torch.manual_seed(0)
    model = swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                 window_size=[4, 4], num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = fx_sparsity.prepare(model, example_inputs=(x,))
    assert any("captured with torch.export, not symbolic tracing" in str(w.message) for w in caught)
    assert not any("the config selects stay dense" in str(w.message) for w in caught)
    assert get_capture(gm).method == "export" and fx_sparsity.get_unmatched(gm) == ()
    assert len(fx_sparsity.get_sparsifier(gm).records) == 11
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
