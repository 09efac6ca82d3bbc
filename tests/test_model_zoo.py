"""Real model structures, random init, no downloads: prepare -> step -> lower -> torch.export, checked
against the eager model with masked weights.

torchvision's resnet18 / mobilenet_v3_small / a small ViT run where torchvision imports (on this
project's CPU machines it does not: PyPI has no CPU build for torch 2.13); miniature models with
the same building blocks (BatchNorm, residuals, depthwise/grouped convs, squeeze-excitation,
nn.MultiheadAttention) always run. A tiny Hugging Face BERT needs the torch.export capture.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsity
from fx_sparsity import WeightNormSparsifier, get_sparsifier, prepare
from fx_sparsity.lowering import lower
from helpers import TinyMobileNet, TinyResNet, TinyViT, masked_reference
from passes import get_capture


def _torchvision_model(name: str) -> nn.Module:
    models = pytest.importorskip("torchvision.models", reason="torchvision is not importable here")
    if name == "vit":
        return models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    return getattr(models, name)(weights=None)


MODELS = {
    "tiny_resnet": (TinyResNet, (2, 3, 32, 32)),
    "tiny_mobilenet": (TinyMobileNet, (2, 3, 32, 32)),
    "tiny_vit": (TinyViT, (2, 3, 32, 32)),
    "torchvision_resnet18": (lambda: _torchvision_model("resnet18"), (1, 3, 64, 64)),
    "torchvision_mobilenet_v3_small": (lambda: _torchvision_model("mobilenet_v3_small"), (1, 3, 64, 64)),
    "torchvision_vit": (lambda: _torchvision_model("vit"), (1, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_vision_model_prepare_step_lower_export(name):
    """Every Linear/Conv masked; masked, fused and exported outputs equal the masked eager model."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(shape)
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    gm = prepare(model, sparsifier=sparsifier, example_inputs=(x,))
    sparsifier.step()
    reference = masked_reference(model, gm, sparsifier)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(gm(x), expected)
        lowered = lower(gm, "fuse")
        exported = torch.export.export(lowered, (x,)).module()
        torch.testing.assert_close(exported(x), expected)
    assert len(sparsifier.groups) >= 5
    for record in sparsifier.records:
        # Half of the 1x4 blocks of the [out, -1] view are zero. A row whose length 4 does not divide ends in a
        # partial block (a depthwise 3x3 conv's rows of 9 hold 4 + 4 + 1), so the element sparsity may be off 50%.
        mask = gm.get_buffer(f"{record.tensor_fqn}_mask").reshape(record.weight_shape[0], -1)
        blocks = F.pad(mask, (0, (-mask.shape[1]) % 4)).reshape(mask.shape[0], -1, 4)
        zero_blocks = int((blocks.sum(-1) == 0).sum())
        assert zero_blocks == min(round(0.5 * blocks[..., 0].numel()), blocks[..., 0].numel() - 1), record.tensor_fqn


def test_depthwise_and_grouped_convs_are_matched():
    """TinyMobileNet: the depthwise (groups=C) and grouped (groups=4) convs are masked and lower to fused convs;
    1x1 convs lower to csr_linear."""
    torch.manual_seed(0)
    model = TinyMobileNet().eval()
    x = torch.randn(2, 3, 32, 32)
    gm = prepare(model, sparsifier=WeightNormSparsifier(0.9, (1, 1)))
    get_sparsifier(gm).step()
    fqns = {g["tensor_fqn"] for g in get_sparsifier(gm).groups}
    assert {"blocks.0.depthwise.0.weight", "grouped.weight"} <= fqns
    lowered = lower(gm, "csr")
    backends = {r.tensor_fqn: r.backend for r in fx_sparsity.get_lowering(lowered)}
    assert backends["blocks.0.depthwise.0.weight"] == "fuse" and backends["grouped.weight"] == "fuse"
    assert backends["blocks.0.expand.0.weight"] == "csr" and backends["classifier.0.weight"] == "csr"
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), gm(x))
        torch.testing.assert_close(torch.export.export(lowered, (x,)).module()(x), gm(x))


def tiny_bert(layers: int) -> nn.Module:
    """A randomly initialised BERT of hidden size 32 (skips the test without transformers)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    return transformers.BertModel(config).eval()


def test_tiny_bert_needs_export_capture_and_lowers():
    """A BERT built from a config: symbolic tracing fails, prepare falls back to torch.export; the csr-lowered
    module exports and matches the masked eager model."""
    model = tiny_bert(layers=2)
    ids = torch.randint(0, 100, (2, 12))
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    sparsifier = WeightNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 1))
    gm = prepare(model, sparsifier=sparsifier, example_inputs=(ids,))
    assert get_capture(gm).method == "export"
    assert len(sparsifier.groups) == 13  # 6 Linears per layer x 2, and the pooler
    sparsifier.step()
    reference = masked_reference(model, gm, sparsifier)
    with torch.no_grad():
        expected = reference(ids).last_hidden_state
        torch.testing.assert_close(gm(ids).last_hidden_state, expected)
        lowered = lower(gm, "csr")
        exported = torch.export.export(lowered, (ids,)).module()
        torch.testing.assert_close(exported(ids).last_hidden_state, expected, rtol=1e-4, atol=1e-5)


def test_tiny_bert_wanda_calibration_through_export_capture():
    """Wanda on the export-captured BERT: calibrate leaves the graph as it was, every Linear gets norms of its
    input width, and each output row keeps half its weights."""
    model = tiny_bert(layers=1)
    sparsifier = fx_sparsity.WandaSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier, example_inputs=(torch.randint(0, 100, (2, 12)),))
    code = gm.code
    norms = fx_sparsity.calibrate(gm, [(torch.randint(0, 100, (2, 12)),) for _ in range(3)], progress_bar=False)
    assert gm.code == code
    assert norms["encoder.layer.0.output.dense.weight"].shape == (64,)
    sparsifier.step()
    for group in sparsifier.groups:
        mask = gm.get_buffer(f"{group['tensor_fqn']}_mask")
        assert (mask.sum(1) == mask.shape[1] // 2).all(), group["tensor_fqn"]


def test_tiny_bert_export_capture_runs_at_other_batch_sizes():
    """The export-captured (and prepared, stepped, fused) tiny BERT, captured at batch 4, runs at batch 1, 3 and
    9 and matches the masked eager model."""
    model = tiny_bert(layers=1)
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    gm = prepare(model, sparsifier=sparsifier, example_inputs=(torch.randint(0, 100, (4, 12)),))
    assert get_capture(gm).dynamic_batch is True
    sparsifier.step()
    reference = masked_reference(model, gm, sparsifier)
    lowered = lower(gm, "fuse")
    with torch.no_grad():
        for batch in (1, 3, 9):
            ids = torch.randint(0, 100, (batch, 12))
            expected = reference(ids).last_hidden_state
            torch.testing.assert_close(gm(ids).last_hidden_state, expected)
            torch.testing.assert_close(lowered(ids).last_hidden_state, expected)


def test_tiny_gpt2_conv1d_weights_are_all_masked():
    """A GPT-2 built from a config: its transformers Conv1D layers (aten.addmm(bias, x, W) with W stored
    [in, out]) are matched with the LM head, 9 of 9 weights; masked and csr-lowered outputs equal the
    masked eager model, the [in, out] weights falling back to fuse with the reason."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False,
                                     tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    gm = prepare(model, sparsifier=sparsifier, example_inputs=(ids,))
    fqns = {g["tensor_fqn"] for g in sparsifier.groups}
    conv1d = {f"transformer.h.{i}.{name}.weight" for i in range(2)
              for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert fqns == conv1d | {"lm_head.weight"}
    sparsifier.step()
    reference = masked_reference(model, gm, sparsifier)
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(gm(ids).logits, expected)
        lowered = lower(gm, "csr")
        torch.testing.assert_close(lowered(ids).logits, expected, rtol=1e-4, atol=1e-5)
    backends = {r.tensor_fqn: r.backend for r in fx_sparsity.get_lowering(lowered)}
    assert {fqn for fqn, backend in backends.items() if backend == "fuse"} == conv1d


def test_tiny_bert_prepared_module_pickles():
    """The export-captured, prepared tiny BERT: a torch.save / torch.load round trip returns its ModelOutput with
    identical values, at the example batch size and another, and the loaded module can still be fused."""
    import io

    model = tiny_bert(layers=1)
    sparsifier = fx_sparsity.MagnitudeSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier, example_inputs=(torch.randint(0, 100, (4, 12)),))
    sparsifier.step()
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        for batch in (4, 3):
            ids = torch.randint(0, 100, (batch, 12))
            expected = gm(ids).last_hidden_state
            torch.testing.assert_close(loaded(ids).last_hidden_state, expected, rtol=0, atol=0)
            torch.testing.assert_close(lower(loaded, "fuse")(ids).last_hidden_state, expected)
