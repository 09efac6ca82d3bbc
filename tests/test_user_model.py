"""to_model: the pruned weights back in a copy of the user's own model class, the user's model untouched."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fx_sparsity
from fx_sparsity import MagnitudeSparsifier, SparseGPTSparsifier, prepare
from fx_sparsity.calibration import calibrate
from fx_sparsity.deploy import to_model
from helpers import ThreeLinear, TiedEmbeddingNet, snapshot
from passes import get_capture


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["ids"] == before["ids"] and after["modules"] == before["modules"]
    assert after["attrs"] == before["attrs"]
    for k, v in before["state"].items():
        torch.testing.assert_close(after["state"][k], v, rtol=0, atol=0, msg=k)


def pruned_reference(model: nn.Module, gm: torch.fx.GraphModule) -> nn.Module:
    """An eager deep copy of ``model`` whose masked weights are set by hand to gm's (updated) weight * mask."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for group in fx_sparsity.get_sparsifier(gm).groups:
            fqn = group["tensor_fqn"]
            reference.get_parameter(fqn).copy_(gm.get_parameter(fqn) * gm.get_buffer(f"{fqn}_mask"))
    return reference


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(0)
    return transformers, transformers.LlamaForCausalLM(config).eval()


def test_llama_sparsegpt_generate_save_and_reload(tmp_path):
    """A Llama-style transformers model from a tiny config, pruned 50% by SparseGPT (export capture, calibrate,
    step): to_model gives a LlamaForCausalLM whose logits equal the prepared module's, whose greedy generate equals
    an eager copy holding gm's weight * mask, which save_pretrained / from_pretrained keeps bit for bit (zeros
    included); unchanged tensors are the original's, changed ones new, and the user's model is untouched."""
    transformers, model = tiny_llama()
    before = snapshot(model)
    ids = torch.randint(0, 64, (2, 8))
    sparsifier = SparseGPTSparsifier(0.5, block_size=16)
    gm = prepare(model, sparsifier=sparsifier, example_inputs=(ids,))
    assert get_capture(gm).method == "export"
    calibrate(gm, [torch.randint(0, 64, (2, 8)) for _ in range(4)], progress_bar=False)
    sparsifier.step()
    pruned = to_model(gm)
    assert type(pruned) is transformers.LlamaForCausalLM
    assert pruned.config is not model.config and pruned.config.to_dict() == model.config.to_dict()
    assert not any(name.endswith("_mask") for name, _ in pruned.named_buffers())
    reference = pruned_reference(model, gm)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, gm(ids).logits, rtol=0, atol=0)
        generated = pruned.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        expected = reference.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 13)
    torch.testing.assert_close(generated, expected, rtol=0, atol=0)

    original = dict(model.named_parameters())
    pruned_fqns = {g["tensor_fqn"] for g in sparsifier.groups}
    assert len(pruned_fqns) == 15
    for fqn, param in pruned.named_parameters():
        assert isinstance(param, nn.Parameter)
        if fqn in pruned_fqns:
            assert param is not original[fqn]
            assert (param == 0).float().mean().item() == 0.5, fqn
            torch.testing.assert_close(param, reference.get_parameter(fqn), rtol=0, atol=0)
            assert not torch.equal(param, original[fqn] * (param != 0)), f"{fqn}: SparseGPT updated no weight"
        else:
            assert param is original[fqn], fqn

    pruned.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    state = pruned.state_dict()
    for fqn, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, state[fqn], rtol=0, atol=0, msg=fqn)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, gm(ids).logits, rtol=0, atol=0)
    assert_unchanged(model, before)


def test_torchvision_resnet_every_unlowered_form():
    """torchvision's resnet18 (symbolic trace), 50% magnitude: to_model of the prepared, the 'fuse'-lowered and the
    squashed module is a torchvision ResNet equal to the prepared module's output; BatchNorm buffers and biases are
    the original's objects; a 'csr'-lowered module is refused; the user's model is untouched."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = snapshot(model)
    x = torch.randn(2, 3, 32, 32)
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    assert get_capture(gm).method == "symbolic_trace"
    sparsifier.step()
    with torch.no_grad():
        expected = gm(x)
        forms = {"prepared": to_model(gm), "fuse": to_model(fx_sparsity.lower(gm, "fuse"))}
        with pytest.raises(ValueError, match="lowered to sparse kernels"):
            to_model(fx_sparsity.lower(gm, "csr"))
        sparsifier.squash_mask()
        forms["squashed"] = to_model(gm)
        for form, pruned in forms.items():
            assert type(pruned) is torchvision.models.ResNet, form
            torch.testing.assert_close(pruned(x), expected, rtol=0, atol=0, msg=form)
            assert pruned.bn1.running_mean is model.bn1.running_mean, form
            assert pruned.fc.bias is model.fc.bias, form
            assert (pruned.layer1[0].conv1.weight == 0).float().mean().item() == 0.5, form
    assert_unchanged(model, before)


class TiedLinears(nn.Module):
    """Two Linears sharing one weight, both called."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_tied_weights_stay_tied():
    """TiedLinears: the one masked weight is one new tensor under both names in the returned model."""
    torch.manual_seed(0)
    model = TiedLinears()
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    sparsifier.step()
    pruned = to_model(gm)
    assert pruned.a.weight is pruned.b.weight
    assert pruned.a.weight is not model.a.weight
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), gm(x), rtol=0, atol=0)


def test_head_tied_to_an_unmasked_embedding_is_untied_with_a_warning():
    """TiedEmbeddingNet: gm reads head.weight masked and embed.weight dense; the returned model does the same (untied,
    output equal to gm's) and a UserWarning names both."""
    torch.manual_seed(0)
    model = TiedEmbeddingNet()
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    sparsifier.step()
    with pytest.warns(UserWarning, match="untied") as record:
        pruned = to_model(gm)
    assert "head.weight" in str(record[0].message) and "embed.weight" in str(record[0].message)
    assert pruned.embed.weight is model.embed.weight
    assert pruned.head.weight is not model.embed.weight
    tokens = torch.randint(0, 64, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens), gm(tokens), rtol=0, atol=0)


def test_loaded_module_needs_the_model_and_bad_inputs():
    """ThreeLinear pruned by SparseGPT: after torch.save/load the module keeps no model (ValueError asking for
    model=), with model= it gives the same weights; a wrong model, a non-GraphModule, an unmasked all-ones
    prepared module and an unprepared graph give clear answers."""
    torch.manual_seed(0)
    model = ThreeLinear()
    before = snapshot(model)
    sparsifier = SparseGPTSparsifier(0.5, block_size=8)
    gm = prepare(model, sparsifier=sparsifier)
    calibrate(gm, [torch.randn(16, 24) for _ in range(2)], progress_bar=False)
    sparsifier.step()
    expected = to_model(gm)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with pytest.raises(ValueError, match=r"loaded from a file.*to_model\(gm, model=model\)"):
        to_model(loaded)
    again = to_model(loaded, model=model)
    for fqn, param in expected.named_parameters():
        torch.testing.assert_close(again.get_parameter(fqn), param, rtol=0, atol=0)
    with pytest.raises(ValueError, match="gm holds the parameter a.weight, which Sequential lacks"):
        to_model(gm, model=nn.Sequential(nn.Linear(24, 48)))
    with pytest.raises(TypeError, match="gm must be the GraphModule"):
        to_model(model)
    with pytest.raises(ValueError, match="not returned by fx_sparsity.prepare"):
        to_model(torch.fx.symbolic_trace(model))
    untouched = to_model(prepare(model))  # all-ones masks: nothing changed, everything shared
    assert all(p is model.get_parameter(n) for n, p in untouched.named_parameters())
    assert_unchanged(model, before)


def test_training_mode_and_class_attributes_are_kept():
    """A model in training mode with a plain attribute: the copy keeps both, gets new module objects, and its
    gradients flow to its own new (pruned) weights only."""
    torch.manual_seed(0)
    model = ThreeLinear().train()
    model.note = {"origin": "test"}
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    sparsifier.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned = to_model(gm)
    assert pruned.training and pruned.note == model.note and pruned.note is not model.note
    assert pruned.a is not model.a
    pruned(torch.randn(4, 24)).sum().backward()
    assert pruned.a.weight.grad is not None and model.a.weight.grad is None


def test_export_captured_llama_with_tied_head():
    """A Llama with tie_word_embeddings (export capture, which reads the tied tensor under one name for both uses):
    masking the head but not the embedding is refused with the remedy; leaving the head out of the config (as
    SparseGPT's and Wanda's reference code do) gives a model whose head and embedding stay one dense tensor, the
    decoder pruned, logits equal to gm's."""
    transformers, _ = tiny_llama()
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, use_cache=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 64, (2, 8))
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier, example_inputs=(ids,))
    sparsifier.step()
    with pytest.raises(ValueError, match=r"are one tied tensor .* Leave the tied weight out of the config"):
        to_model(gm)
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(model, {"model.layers.*": {}}, sparsifier=sparsifier, example_inputs=(ids,))
    sparsifier.step()
    assert all(g["tensor_fqn"].startswith("model.layers.") for g in sparsifier.groups)
    pruned = to_model(gm)
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight is model.lm_head.weight
    assert (pruned.model.layers[0].mlp.up_proj.weight == 0).float().mean().item() == 0.5
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, gm(ids).logits, rtol=0, atol=0)


def test_shrunk_module_and_prepared_module_back_in_the_class():
    """ChannelPruner on a Linear-ReLU-Linear: to_model of the prepared module is a Sequential whose zeroed rows
    equal the masks; of the shrunk module, a Sequential whose changed layers are the shrunk ones (8 of 16 hidden
    units, the next layer's bias holding the removed units' folded constants) computing exactly what the shrunk
    module does; the user's model is untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    before = snapshot(model)
    pruner = fx_sparsity.ChannelPruner(sparsity_level=0.5)
    gm = pruner.prepare(model, example_inputs=torch.randn(2, 8))
    pruner.step()
    pruned = to_model(gm)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), gm(x), rtol=0, atol=0)
    assert int((pruned[0].weight.abs().sum(1) == 0).sum()) == 8
    small = fx_sparsity.shrink(gm)
    slim = to_model(small)
    assert type(slim) is nn.Sequential and slim[0].out_features == 8 and slim[2].in_features == 8
    assert slim[0] is not small.get_submodule("0")  # a copy: the shrunk module keeps its own
    with torch.no_grad():
        torch.testing.assert_close(slim(x), small(x), rtol=0, atol=0)
    assert_unchanged(model, before)


def test_shrunk_resnet_back_in_its_class_and_refusals():
    """A torchvision resnet18 at half its channels: to_model of the shrunk module is a ResNet of exactly the shrunk
    module's parameters and output (every conv, BatchNorm and the fc swapped in). A class that keeps a size in an
    attribute its forward reads (torchvision's VisionTransformer, whose hidden_dim shrinking changed) or an
    export capture is refused with the remedy."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = snapshot(model)
    x = torch.randn(1, 3, 32, 32)
    pruner = fx_sparsity.ChannelPruner(sparsity_level=0.5)
    gm = pruner.prepare(model, example_inputs=x)
    pruner.step()
    small = fx_sparsity.shrink(gm)
    slim = to_model(small)
    assert type(slim) is type(model) and slim.layer1[0].conv1.out_channels == 32
    assert sum(p.numel() for p in slim.parameters()) == sum(p.numel() for p in small.parameters())
    y = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(slim(y), small(y))
    assert_unchanged(model, before)

    class Width(nn.Module):  # keeps its hidden size in an attribute its forward reads
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.hidden = nn.Linear(8, 16), nn.Linear(16, 4), 16

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)).reshape(-1, self.hidden))

    pruner = fx_sparsity.ChannelPruner(sparsity_level=0.5)
    gm = pruner.prepare(Width(), example_inputs=torch.randn(2, 8), concrete_args=None)
    pruner.step()
    small = fx_sparsity.shrink(gm)
    with pytest.raises(ValueError, match="keeps a size that shrinking changed in an attribute or config"):
        to_model(small)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                              mlp_dim=32).eval()
    pruner = fx_sparsity.ChannelPruner(sparsity_level=0.5)
    gm = pruner.prepare(vit, example_inputs=torch.randn(1, 3, 32, 32))
    pruner.step()
    with pytest.raises(ValueError, match="needs a symbolically traced capture"):
        to_model(fx_sparsity.shrink(gm))
