"""Sparse modules in the user's own class: SparseLinear / SparseConv*d against the dense layers they replace, and
sparsify_model against the eager masked model (transformers Llama, Qwen2, GPT-2; plain MLP and CNN), generate()
with the KV cache running our operators, torch.compile, state dicts, and bad inputs refused before anything."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fx_sparsity
from fx_sparsity import MagnitudeSparsifier, NMSparsifier, prepare
from fx_sparsity.deploy import (
    SparseConv1d,
    SparseConv2d,
    SparseConv3d,
    SparseLinear,
    densify_model,
    sparsify_model,
    to_model,
)
from helpers import LinearNet, MixedNet, PointwiseConvNet, TiedEmbeddingNet, snapshot, tiny_causal_lm
from passes import get_capture
from passes.lowering import COMPONENT_NAMES, LAYOUTS, SPARSE_OPS, dequantize

CPU_LAYOUTS = [layout for layout in LAYOUTS if layout != "semi_structured"]
SPARSE_CLASSES = (SparseLinear, SparseConv1d, SparseConv2d, SparseConv3d)
OP_NAMES = {str(op) for op in SPARSE_OPS.values()}


class CountOps(TorchDispatchMode):
    """Counts the calls of each fx_sparsity operator that reach the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in OP_NAMES:
            self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def sparse_weight(rows: int, cols: int, layout: str) -> torch.Tensor:
    torch.manual_seed(1)
    weight = torch.randn(rows, cols)
    if layout == "nm":
        return weight * torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(rows, cols // 4)
    if layout == "bsr":
        return weight * (torch.rand(rows // 8, cols // 8) > 0.5).repeat_interleave(8, 0).repeat_interleave(8, 1)
    return weight * (torch.rand(rows, cols) > 0.6)


def masked_reference(model: nn.Module, gm: torch.fx.GraphModule) -> nn.Module:
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for group in fx_sparsity.get_sparsifier(gm).groups:
            fqn = group["tensor_fqn"]
            reference.get_parameter(fqn).mul_(gm.get_buffer(f"{fqn}_mask"))
    return reference


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["ids"] == before["ids"] and after["modules"] == before["modules"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


# ------------------------------------------------------------------------------------------- the modules alone
@pytest.mark.parametrize("layout", CPU_LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_linear(layout, bias):
    """SparseLinear.from_dense of an nn.Linear (48 x 64 weight with zeros in layout's pattern): outputs equal
    F.linear's on 2-D and 3-D inputs, dense_weight() gives the weight back exactly, the bias is the Linear's own,
    and the buffers are lower's names (weight_<component>)."""
    linear = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(sparse_weight(48, 64, layout))
    sparse = SparseLinear.from_dense(linear, layout, blocksize=(8, 8) if layout == "bsr" else None)
    for shape in [(5, 64), (2, 3, 64)]:
        x = torch.randn(shape)
        torch.testing.assert_close(sparse(x), F.linear(x, linear.weight, linear.bias))
    assert torch.equal(sparse.dense_weight(), linear.weight)
    assert sparse.bias is linear.bias
    assert [n for n, _ in sparse.named_buffers()] == [f"weight_{p}" for p in COMPONENT_NAMES[layout]]
    assert (sparse.in_features, sparse.out_features, sparse.layout) == (64, 48, layout)


@pytest.mark.parametrize("cls, dense, shape", [
    (SparseConv1d, nn.Conv1d(16, 8, 1, stride=2), (2, 16, 9)),
    (SparseConv2d, nn.Conv2d(16, 8, 1), (2, 16, 5, 6)),
    (SparseConv2d, nn.Conv2d(16, 8, 1, stride=(2, 3), bias=False), (2, 16, 7, 7)),
    (SparseConv3d, nn.Conv3d(16, 8, 1, stride=2), (1, 16, 3, 4, 5)),
])
def test_sparse_conv_matches_conv(cls, dense, shape):
    """A 1x1 conv (strided, with and without bias) packed as csr and bitmask computes what the conv does; the
    dense weight comes back with its kernel dims."""
    with torch.no_grad():
        dense.weight.mul_((torch.rand_like(dense.weight) > 0.5).float())
    x = torch.randn(shape)
    for layout in ("csr", "bitmask"):
        sparse = cls.from_dense(dense, layout)
        torch.testing.assert_close(sparse(x), dense(x))
        assert torch.equal(sparse.dense_weight(), dense.weight)
        assert sparse.stride == dense.stride


def test_sparse_conv_refuses_what_is_not_a_pointwise_conv():
    """3x3, padded and grouped convs and a module of another class are refused, naming why."""
    with pytest.raises(ValueError, match="1x1 convs only: kernel 3x3"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3), "csr")
    with pytest.raises(ValueError, match=r"padding \(1, 1\)"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 1, padding=1), "csr")
    with pytest.raises(ValueError, match="groups=2"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 1, groups=2), "csr")
    with pytest.raises(TypeError, match="conv must be an Conv2d, got Conv1d"):
        SparseConv2d.from_dense(nn.Conv1d(4, 4, 1), "csr")
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(4, 4, 1), "csr")


def test_bad_components_are_refused():
    """A wrong layout, component count, index dtype, shape or bias is a ValueError naming the component."""
    good = SparseLinear.from_dense(nn.Linear(8, 4), "csr").components
    with pytest.raises(ValueError, match="layout must be one of"):
        SparseLinear(8, 4, "coo", good)
    with pytest.raises(ValueError, match="has 3 components"):
        SparseLinear(8, 4, "csr", good[:2])
    with pytest.raises(ValueError, match="col_indices of a csr weight must be"):
        SparseLinear(8, 4, "csr", (good[0], good[1].float(), good[2]))
    with pytest.raises(ValueError, match=r"crow_indices of a csr weight of shape \(5, 8\) must have shape \(6,\)"):
        SparseLinear(8, 5, "csr", good)
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(4,\)"):
        SparseLinear(8, 4, "csr", good, torch.zeros(3))


def test_state_dict_round_trip_and_repr():
    """A SparseLinear's state dict loads into one packed from another weight (other nonzero count: the buffers
    take the incoming sizes; int32 column indices stay int32), which then computes the same; a state dict of
    another shape is refused; the repr names format, shape, sparsity and bytes."""
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(sparse_weight(32, 64, "csr"))
    source = SparseLinear.from_dense(linear, "csr")
    target = SparseLinear.from_dense(nn.Linear(64, 32), "csr")  # dense: 2048 nonzeros
    assert target.weight_values.shape != source.weight_values.shape
    state = source.state_dict()
    state["weight_col_indices"] = state["weight_col_indices"].to(torch.int32)
    target.load_state_dict(state)
    assert target.weight_col_indices.dtype == torch.int32
    x = torch.randn(3, 64)
    torch.testing.assert_close(target(x), source(x))
    with pytest.raises(RuntimeError, match="crow_indices of a csr weight of shape"):
        SparseLinear.from_dense(nn.Linear(64, 16), "csr").load_state_dict(state)
    text = repr(source)
    assert text.startswith("SparseLinear(in_features=64, out_features=32, bias=True, format=csr, dtype=float32")
    assert f"sparsity={source.sparsity:.1%}" in text and f"bytes={source.stored_bytes():,} (dense 8,192)" in text
    assert source.sparsity == float((linear.weight == 0).float().mean())


@pytest.mark.parametrize("layout", ["bitmask", "nm", "csr", "bitmask-int8", "dense-int4"])
def test_eager_calls_skip_the_dispatcher_only_where_nothing_else_could_happen(layout, monkeypatch):
    """In eager inference on CPU a sparse module calls the C++ kernel directly (eager_native_linear: no Python
    dispatch layers), with the operator's result bit for bit; wherever the operator must run (a gradient to
    record, a dispatch mode, a fake tensor, torch.compile) it does."""
    from passes.lowering import native, operators, rewrite

    if native.native_ops() is None:
        pytest.skip("the C++ kernels are not built")
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(sparse_weight(48, 64, "nm" if layout == "nm" else "csr"))
    if "int" in layout:
        sparse = SparseLinear.from_quantized(linear, layout, _round_to_nearest(linear.weight.detach(), layout))
    else:
        sparse = SparseLinear.from_dense(linear, layout)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = SPARSE_OPS[layout](x, *sparse.components, sparse.bias)
        assert torch.equal(operators.eager_native_linear(layout, x, sparse.components, sparse.bias), expected)

    def must_not_run(*args):
        raise AssertionError("the operator was called")

    monkeypatch.setitem(rewrite.SPARSE_OPS, layout, must_not_run)
    with torch.no_grad():
        assert torch.equal(sparse(x), expected)
    with pytest.raises(AssertionError, match="operator was called"):
        sparse(x.requires_grad_())  # the bias has a gradient to record
    with torch.no_grad(), pytest.raises(AssertionError, match="operator was called"), CountOps():
        sparse(x)
    with torch.no_grad(), pytest.raises(AssertionError, match="operator was called"), FakeTensorMode() as mode:
        sparse(mode.from_tensor(x))


def test_inference_only_weight_has_no_gradient():
    """In training mode the module runs and the input and bias get gradients; the packed weight is buffers (no
    gradient), and reading .weight says where the dense weight went."""
    sparse = SparseLinear.from_dense(nn.Linear(8, 4), "bitmask")
    sparse.bias.requires_grad_(True)
    sparse.train()
    x = torch.randn(2, 8, requires_grad=True)
    sparse(x).sum().backward()
    assert x.grad is not None and sparse.bias.grad is not None
    assert all(not t.requires_grad for t in sparse.components)
    assert list(dict(sparse.named_parameters())) == ["bias"]
    with pytest.raises(AttributeError, match=r"stores its weight packed \(bitmask\).*dense_weight\(\)"):
        sparse.weight  # noqa: B018


# -------------------------------------------------------------------------------- sparsify_model: transformers
def greedy(model: nn.Module, ids: torch.Tensor, steps: int = 6) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                              pad_token_id=0, use_cache=True)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_llama_qwen2_generate_runs_our_kernels(name):
    """Llama (GQA) and Qwen2 from tiny configs, 50% magnitude on every Linear (export capture): sparsify_model
    ('bitmask') gives the model's own class whose 15 Linears are SparseLinears; its logits equal the eager masked
    model's; greedy generate() with the KV cache (the model sees one token per step after the prompt) gives the
    tokens of to_model(gm) and calls the bitmask operator once per sparse layer per step; the user's model is
    untouched and unpruned tensors (embedding, norms) are its own."""
    model = tiny_causal_lm(name)
    before = snapshot(model)
    ids = torch.randint(0, 128, (2, 8))
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier, example_inputs=(ids,))
    assert get_capture(gm).method == "export"
    sparsifier.step()
    sparse = sparsify_model(gm, "bitmask")
    assert type(sparse) is type(model)
    layers = {n: m for n, m in sparse.named_modules() if isinstance(m, SparseLinear)}
    assert len(layers) == 15 and not any(type(m) is nn.Linear for m in sparse.modules())
    assert all(m.layout == "bitmask" and m.sparsity == 0.5 for m in layers.values())
    assert sparse.model.embed_tokens.weight is model.model.embed_tokens.weight
    reference = masked_reference(model, gm)
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, reference(ids).logits)

    lengths = []
    hook = sparse.register_forward_pre_hook(lambda m, a, k: lengths.append(k["input_ids"].shape[1]), with_kwargs=True)
    with CountOps() as ops:
        tokens = greedy(sparse, ids)
    hook.remove()
    assert lengths == [8, 1, 1, 1, 1, 1]  # the KV cache is used
    assert ops.counts == {"fx_sparsity.bitmask_linear.default": 15 * len(lengths)}
    assert torch.equal(tokens, greedy(to_model(gm), ids))
    assert torch.equal(tokens, greedy(reference, ids))
    assert_unchanged(model, before)


def test_gpt2_conv1d_fused_and_tied_head_sparse():
    """GPT-2 from a tiny config, every weight 50% pruned (export capture): its Conv1D layers (weights stored
    [in, out]) stay Conv1D with the masked weights; the head, tied to the embedding, becomes a SparseLinear while
    the embedding keeps the dense tensor (the user's own), as the prepared module reads it; logits and greedy
    tokens equal an eager copy with those weights."""
    transformers = pytest.importorskip("transformers")
    model = tiny_causal_lm("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 128, (2, 8))
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier, example_inputs=(ids,))
    sparsifier.step()
    sparse = sparsify_model(gm, "csr")
    assert type(sparse.lm_head) is SparseLinear and sparse.lm_head.sparsity == 0.5
    assert sparse.transformer.wte.weight is model.transformer.wte.weight
    conv1d = [m for m in sparse.modules() if isinstance(m, transformers.pytorch_utils.Conv1D)]
    assert len(conv1d) == 8 and all(float((m.weight == 0).float().mean()) == 0.5 for m in conv1d)

    reference = copy.deepcopy(model)
    with torch.no_grad():
        for group in sparsifier.groups:
            fqn, mask = group["tensor_fqn"], gm.get_buffer(f"{group['tensor_fqn']}_mask")
            if fqn == "transformer.wte.weight":  # the head's use of the tied weight is the masked one
                reference.lm_head.weight = nn.Parameter(reference.transformer.wte.weight * mask)
            else:
                reference.get_parameter(fqn).mul_(mask)
        torch.testing.assert_close(sparse(ids).logits, reference(ids).logits)
    assert torch.equal(greedy(sparse, ids), greedy(reference, ids))


# ------------------------------------------------------------------------------ sparsify_model: plain modules
def test_cnn_symbolic_trace_every_pointwise_conv_and_compile():
    """PointwiseConvNet (symbolic trace), 50% magnitude, csr: the 1x1 Conv1d/Conv2d (strided too)/Conv3d and
    the Linear become sparse modules, the 3x3 conv stays a Conv2d with its masked weight; outputs equal the
    prepared module's, also under torch.compile(fullgraph=True) (inductor)."""
    model = PointwiseConvNet().eval()
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    assert get_capture(gm).method == "symbolic_trace"
    sparsifier.step()
    sparse = sparsify_model(gm, "csr")
    kinds = {n: type(m).__name__ for n, m in sparse.named_children()}
    assert kinds == {"pw1d": "SparseConv1d", "pw": "SparseConv2d", "conv": "Conv2d", "strided": "SparseConv2d",
                     "pw3d": "SparseConv3d", "head": "SparseLinear"}
    assert sparse.strided.stride == (2, 2)
    assert float((sparse.conv.weight == 0).float().mean()) == 0.5 and sparse.conv.bias is model.conv.bias
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        expected = gm(x)
        torch.testing.assert_close(sparse(x), expected)
        torch.testing.assert_close(torch.compile(sparse, fullgraph=True)(x), expected)


def test_tied_shared_and_functional_weights():
    """MixedNet (symbolic trace): the Linear called twice and the Linear tied to it share one set of packed
    buffers; the weight read by F.linear in forward and the 3x3 convs stay dense (masked); TiedEmbeddingNet: the
    head tied to an unmasked embedding is sparse, the embedding keeps the dense tensor. Outputs equal gm's."""
    model = MixedNet().eval()
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    sparsifier.step()
    sparse = sparsify_model(gm, "bitmask")
    assert type(sparse.shared) is SparseLinear and type(sparse.tied) is SparseLinear
    assert all(a is b for a, b in zip(sparse.shared.components, sparse.tied.components))
    assert sparse.tied.bias is None and sparse.shared.bias is model.shared.bias
    assert isinstance(sparse.head_weight, nn.Parameter) and float((sparse.head_weight == 0).float().mean()) == 0.5
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), gm(x))

    model = TiedEmbeddingNet().eval()
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    sparsifier.step()
    sparse = sparsify_model(gm, "csr")
    assert type(sparse.head) is SparseLinear and sparse.embed.weight is model.embed.weight
    tokens = torch.randint(0, 64, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(sparse(tokens), gm(tokens))


def test_auto_per_layer_config_and_densify():
    """LinearNet: 'auto' on example inputs gives each layer a sparse module or keeps the Linear (fused), and the
    output equals gm's; an explicit per-layer config gives each layer its format (nm detected from a 2:4 mask);
    densify_model turns the sparse layers back into Linears holding exactly the masked weights; 'fuse' packs no
    layer and gives to_model's weights."""
    model = LinearNet().eval()
    sparsifier = NMSparsifier(2, 4)
    gm = prepare(model, sparsifier=sparsifier)
    sparsifier.step()
    x = torch.randn(4, 64)
    auto = sparsify_model(gm, "auto", example_inputs=(x,), progress_bar=False)
    for name in ("fc1", "fc2"):
        layer = getattr(auto, name)
        assert type(layer) is nn.Linear or (type(layer) is SparseLinear and layer.layout in LAYOUTS)
    explicit = sparsify_model(gm, {"fc1": "nm", "fc2": {"backend": "bsr", "blocksize": 16}})
    assert (explicit.fc1.layout, explicit.fc2.layout, explicit.fc2.blocksize) == ("nm", "bsr", (16, 16))
    dense = densify_model(explicit)
    reference = masked_reference(model, gm)
    with torch.no_grad():
        for candidate in (auto, explicit, dense):
            torch.testing.assert_close(candidate(x), gm(x))
    assert type(dense.fc1) is nn.Linear and torch.equal(dense.fc1.weight, reference.fc1.weight)
    assert type(explicit.fc1) is SparseLinear  # densify made a copy
    fused = sparsify_model(gm, "fuse")  # no layer packed: to_model's model
    assert not any(isinstance(m, SPARSE_CLASSES) for m in fused.modules())
    assert all(torch.equal(p, to_model(gm).get_parameter(n)) for n, p in fused.named_parameters())


class ReadsWeight(nn.Module):
    """A forward that reads a layer's weight outside the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.fc.weight.sum()


def test_bad_inputs_are_refused_before_anything():
    """Not a GraphModule, a lowered or squashed module, 'shrink', an unknown backend, auto without inputs, and a
    class whose forward reads a packed layer's weight (checked on example_inputs) are refused with the fix; the
    user's model is untouched."""
    model = LinearNet().eval()
    before = snapshot(model)
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    sparsifier.step()
    with pytest.raises(TypeError, match="gm must be the GraphModule"):
        sparsify_model(model, "csr")
    with pytest.raises(ValueError, match="lowered to sparse kernels"):
        sparsify_model(fx_sparsity.lower(gm, "csr"), "csr")
    with pytest.raises(ValueError, match="removes channels instead of packing"):
        sparsify_model(gm, "shrink")
    with pytest.raises(ValueError, match="backend must be one of"):
        sparsify_model(gm, "dense")
    with pytest.raises(ValueError, match="pass example_inputs"):
        sparsify_model(gm, "auto")
    squashed = prepare(model)
    fx_sparsity.get_sparsifier(squashed).squash_mask()
    with pytest.raises(ValueError, match="has no mask nodes"):
        sparsify_model(squashed, "csr")
    assert_unchanged(model, before)

    reads = ReadsWeight()
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(reads, sparsifier=sparsifier)
    sparsifier.step()
    with pytest.raises(ValueError, match="does not compute what the lowered module does"):
        sparsify_model(gm, "csr", example_inputs=(torch.randn(2, 8),))


# ------------------------------------------------------------------------------------------- quantized layouts
def _round_to_nearest(weight: torch.Tensor, layout: str) -> dict[str, torch.Tensor]:
    """A reference rounding: scale = max|w| / qmax per row (int8) or group of 32 (int4), an all-zero one 1."""
    rows, cols = weight.shape
    qmax, groups = (127, 1) if layout.endswith("int8") else (7, cols // 32)
    scales = weight.reshape(rows, groups, -1).abs().amax(-1) / qmax
    scales[scales == 0] = 1
    values = torch.clamp(torch.round(weight.reshape(rows, groups, -1) / scales[..., None]), -qmax, qmax)
    return {"values": values.reshape(rows, cols).to(torch.int8), "scales": scales.squeeze(1) if groups == 1 else scales}


QUANT_CASES = ["bitmask-int8", "nm-int4", "csr-int4", "dense-int8", "dense-int4"]


@pytest.mark.parametrize("layout", QUANT_CASES)
def test_quantized_sparse_linear_and_conv(layout):
    """SparseLinear and SparseConv2d hold the quantized layouts: forward equals F.linear / conv on the dequantized
    weight (fp32 and bf16 inputs), dense_weight() is that weight, the buffers are the layout's components."""
    family = layout.split("-")[0]
    weight = sparse_weight(32, 64, "nm" if family == "nm" else "csr")
    q = _round_to_nearest(weight, layout)
    dequantized = dequantize(q["values"], q["scales"])
    linear = nn.Linear(64, 32)
    layer = SparseLinear.from_quantized(linear, layout, q)
    assert [n for n, _ in layer.named_buffers()] == [f"weight_{p}" for p in COMPONENT_NAMES[layout]]
    assert torch.equal(layer.dense_weight(), dequantized)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(layer(x), F.linear(x, dequantized, linear.bias), rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    torch.testing.assert_close(layer(xb), F.linear(xb.float(), dequantized, linear.bias).bfloat16())
    conv = nn.Conv2d(64, 32, 1, stride=2)
    sparse_conv = SparseConv2d.from_quantized(conv, layout, q)
    image = torch.randn(2, 64, 6, 6)
    torch.testing.assert_close(sparse_conv(image), F.conv2d(image, dequantized[..., None, None], conv.bias, 2),
                               rtol=1e-5, atol=1e-5)


def test_densify_gives_a_quantized_layer_the_dtype_it_computes_in():
    """densify_model dequantizes a quantized layer and casts its weight to the layer's dtype: its bias's, else that
    of the model's other parameters (a bias-free bf16 Linear beside a bf16 norm), float32 where they disagree.
    A model-wide cast (.bfloat16()) keeps the quantized scales float32, as the kernels read them."""
    weight = sparse_weight(32, 64, "csr")
    q = _round_to_nearest(weight, "bitmask-int8")
    dequantized = dequantize(q["values"], q["scales"])
    model = nn.Sequential(SparseLinear.from_quantized(nn.Linear(64, 32, bias=False), "bitmask-int8", q),
                          nn.LayerNorm(32)).bfloat16()
    assert model[0].weight_scales.dtype == torch.float32 and torch.equal(model[0].weight_scales, q["scales"])
    with_bias = nn.Sequential(SparseLinear.from_quantized(nn.Linear(64, 32).bfloat16(), "bitmask-int8", q))
    mixed = nn.Sequential(SparseLinear.from_quantized(nn.Linear(64, 32, bias=False), "bitmask-int8", q),
                          nn.LayerNorm(32).bfloat16(), nn.Linear(32, 32))
    for source, dtype in ((model, torch.bfloat16), (with_bias, torch.bfloat16), (mixed, torch.float32)):
        dense = densify_model(source)
        assert isinstance(dense[0], nn.Linear) and dense[0].weight.dtype == dtype
        assert torch.equal(dense[0].weight, dequantized.to(dtype))
    x = torch.randn(3, 64, dtype=torch.bfloat16)  # the cast layer still runs its kernel on the exact weight
    torch.testing.assert_close(model[0](x), F.linear(x.float(), dequantized).bfloat16())


def test_quantized_state_dict_and_refusals():
    """A quantized SparseLinear's state dict loads into one packed from another weight (other nonzero count) and
    computes the same; bad components, float layouts and values of another shape are refused."""
    linear = nn.Linear(64, 32)
    source = SparseLinear.from_quantized(linear, "bitmask-int4", _round_to_nearest(sparse_weight(32, 64, "csr"), "int4"))
    target = SparseLinear.from_quantized(nn.Linear(64, 32), "bitmask-int4",
                                         _round_to_nearest(torch.randn(32, 64), "int4"))
    assert target.weight_values.shape != source.weight_values.shape
    target.load_state_dict(source.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(target(x), source(x))
    assert source.weight_dtype == torch.float32 and source.nonzeros() == int(source.dense_weight().count_nonzero())
    assert "format=bitmask-int4" in repr(source) and f"bytes={source.stored_bytes():,} (dense 8,192)" in repr(source)
    with pytest.raises(ValueError, match="component values of a bitmask-int4 weight must be torch.uint8"):
        SparseLinear(64, 32, "bitmask-int4", [source.weight_bitmask, source.weight_values.to(torch.int8),
                                              source.weight_row_offsets, source.weight_scales])
    with pytest.raises(ValueError, match=r"component scales of a bitmask-int4 weight .* group_size in"):
        SparseLinear(64, 32, "bitmask-int4", [*source.components[:3], torch.ones(32, 3)])
    with pytest.raises(ValueError, match="layout must be a quantized one"):
        SparseLinear.from_quantized(linear, "csr", _round_to_nearest(torch.randn(32, 64), "int8"))
    with pytest.raises(ValueError, match="the quantized values have shape"):
        SparseLinear.from_quantized(linear, "dense-int8", _round_to_nearest(torch.randn(16, 64), "int8"))


def test_quantized_checkpoint_round_trip(tmp_path):
    """save_sparse/load_sparse round-trip a model holding a quantized SparseLinear."""
    from fx_sparsity.deploy import load_sparse, save_sparse

    model = nn.Sequential(SparseLinear.from_quantized(nn.Linear(64, 32), "bitmask-int4",
                                                      _round_to_nearest(sparse_weight(32, 64, "csr"), "int4")))
    x = torch.randn(3, 64)
    folder = save_sparse(model, tmp_path / "q")
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(64, 32))
    loaded = load_sparse(folder, skeleton)
    assert torch.equal(loaded(x), model(x))
