"""fx_sparsity.lower: backends, per-layer config, numerics against the prepared module, errors, report."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsity
import passes
from fx_sparsity import WeightNormSparsifier, get_lowering, get_sparsifier, prepare
from fx_sparsity.lowering import lower
from fx_sparsity.lowering.autotune import AUTO_MIN_SPEEDUP, choose_backend
from fx_sparsity.lowering.timing import last_level_cache_bytes, time_variants
from fx_sparsity.report import lowering_table
from helpers import LinearNet, MixedNet, PointwiseConvNet, TiedEmbeddingNet, TinyResNet, count_nodes, snapshot
from passes import get_capture
from passes.lowering import LAYOUTS

CSR = torch.ops.fx_sparsity.csr_linear.default
BSR = torch.ops.fx_sparsity.bsr_linear.default


def prepared(model: nn.Module, level: float = 0.9, block=(1, 1), seed: int = 0, **kwargs):
    """``prepare`` with a WeightNormSparsifier, one step taken."""
    torch.manual_seed(seed)
    gm = prepare(model, sparsifier=WeightNormSparsifier(sparsity_level=level, sparse_block_shape=block), **kwargs)
    get_sparsifier(gm).step()
    return gm


def mask_free(gm) -> bool:
    no_mul = ("call_function", operator.mul) not in count_nodes(gm)
    return no_mul and not any(name.endswith("_mask") for name, _ in gm.named_buffers())


def test_fuse_is_identical_to_prepared_and_restores_modules():
    """fuse on MixedNet (conv, reflect conv, reused, tied and functional Linear): same output bit for bit,
    no mask nodes or buffers, call_module nodes back, tied weights still tied."""
    model = MixedNet()
    gm = prepared(model, level=0.6, block=(1, 2))
    x = torch.randn(2, 3, 8, 8)
    lowered = lower(gm)
    assert mask_free(lowered)
    assert torch.equal(lowered(x), gm(x))
    counts = count_nodes(lowered)
    for fqn in ("conv", "conv_reflect", "fc", "tied"):
        assert counts[("call_module", fqn)] == 1
    assert counts[("call_module", "shared")] == 2
    assert counts[("call_function", F.linear)] == 1  # the functional head stays functional
    assert lowered.shared.weight is lowered.tied.weight
    assert [r.backend for r in get_lowering(lowered)] == ["fuse"] * 5


def test_lower_leaves_prepared_module_and_model_alone():
    """Every backend: the prepared module (graph, masks, weights) and the user's model are unchanged."""
    model = LinearNet()
    before_model = snapshot(model)
    gm = prepared(model, block=(16, 16))
    before_gm, code = snapshot(gm), gm.code
    for backend in ("fuse", "csr", "bsr"):
        lower(gm, backend)
    assert snapshot(gm).keys() == before_gm.keys()
    for key in ("ids", "modules", "attrs"):
        assert snapshot(gm)[key] == before_gm[key]
    for name, value in before_gm["state"].items():
        assert torch.equal(gm.state_dict()[name], value)
    assert gm.code == code
    after_model = snapshot(model)
    assert after_model["ids"] == before_model["ids"] and after_model["modules"] == before_model["modules"]
    for name, value in before_model["state"].items():
        assert torch.equal(model.state_dict()[name], value)


@pytest.mark.parametrize("bias", [True, False])
def test_csr_linear_numerics_and_graph(bias):
    """csr: each Linear calls fx_sparsity::csr_linear on int32 index buffers; output matches the prepared one;
    the dense weights are gone."""
    gm = prepared(LinearNet(bias=bias))
    lowered = lower(gm, "csr")
    x = torch.randn(7, 64)
    torch.testing.assert_close(lowered(x), gm(x))
    assert count_nodes(lowered)[("call_function", CSR)] == 2
    assert mask_free(lowered)
    assert {n for n, _ in lowered.named_parameters()} == ({"fc1.bias", "fc2.bias"} if bias else set())
    assert lowered.get_buffer("fc1.weight_crow_indices").dtype == torch.int32
    assert lowered.get_buffer("fc1.weight_values").numel() == int(gm.get_buffer("fc1.weight_mask").sum())


def test_bsr_blocksize_from_sparsifier_and_per_layer():
    """bsr takes the sparsifier's square block shape by default, or a per-layer blocksize."""
    gm = prepared(LinearNet(), level=0.75, block=(16, 16))
    x = torch.randn(5, 64)
    lowered = lower(gm, "bsr")
    torch.testing.assert_close(lowered(x), gm(x))
    assert lowered.get_buffer("fc1.weight_values").shape[1:] == (16, 16)
    # 16x16 blocks at 75%: a quarter of the blocks are stored.
    assert lowered.get_buffer("fc1.weight_values").shape[0] == (96 // 16) * (64 // 16) // 4
    lowered = lower(gm, {"fc1": {"backend": "bsr", "blocksize": 8}})
    assert lowered.get_buffer("fc1.weight_values").shape[1:] == (8, 8)
    assert [r.backend for r in get_lowering(lowered)] == ["bsr", "fuse"]
    torch.testing.assert_close(lowered(x), gm(x))


def test_pointwise_convs_lower_others_fuse():
    """1x1 convs (1d, 2d, 3d, strided) run through csr_linear; the 3x3 conv is fused and says why."""
    gm = prepared(PointwiseConvNet())
    lowered = lower(gm, "csr")
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(lowered(x), gm(x))
    records = {r.tensor_fqn: r for r in get_lowering(lowered)}
    assert {k: r.backend for k, r in records.items()} == {
        "pw1d.weight": "csr", "pw.weight": "csr", "conv.weight": "fuse",
        "strided.weight": "csr", "pw3d.weight": "csr", "head.weight": "csr",
    }
    assert "3x3 conv" in records["conv.weight"].note
    assert count_nodes(lowered)[("call_function", CSR)] == 5
    getitems = ("call_function", operator.getitem)
    assert count_nodes(lowered)[getitems] == count_nodes(gm)[getitems] + 1  # x[..., ::2, ::2]
    assert count_nodes(lowered)[("call_module", "conv")] == 1


def test_tied_weights_one_set_of_buffers():
    """A weight reused and tied (MixedNet.shared / .tied) is compressed once and every use calls csr_linear."""
    gm = prepared(MixedNet(), level=0.5)
    lowered = lower(gm, {"shared": "csr"})
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(lowered(x), gm(x))
    assert count_nodes(lowered)[("call_function", CSR)] == 3
    assert not hasattr(lowered.shared, "weight") and not hasattr(lowered.tied, "weight")
    assert sum("crow_indices" in name for name, _ in lowered.named_buffers()) == 1


@pytest.mark.parametrize("backend", ["fuse", "csr"])
def test_tied_embedding_keeps_dense_weight(backend):
    """A head tied to an embedding: the embedding still reads the dense weight, as in the prepared module."""
    gm = prepared(TiedEmbeddingNet())
    tokens = torch.randint(0, 64, (2, 5))
    lowered = lower(gm, backend)
    torch.testing.assert_close(lowered(tokens), gm(tokens), rtol=0, atol=1e-6)
    assert torch.equal(lowered.embed.weight, gm.embed.weight)
    if backend == "fuse":
        assert torch.equal(lowered.head.weight, gm.embed.weight * gm.get_buffer("embed.weight_mask"))


def test_per_layer_config_forms_and_precedence():
    """Dict with string or dict values and torch.ao list form select layers; exact names beat patterns;
    unselected layers are fused."""
    gm = prepared(LinearNet(), block=(16, 16))
    forms = [
        {"fc1": "csr"},
        {"fc1": {"backend": "csr"}},
        [{"tensor_fqn": "fc1.weight", "backend": "csr"}],
        {"fc*": "bsr", "fc1": "csr", "fc2": "fuse"},
    ]
    for config in forms:
        assert [r.backend for r in get_lowering(lower(gm, config))] == ["csr", "fuse"], config


@pytest.mark.parametrize(
    "backend, error, match",
    [
        ("dense", ValueError,
         r"backend must be one of 'fuse', 'csr', 'bsr', 'semi_structured', 'bitmask', 'nm', 'bitmask-int8', .*"
         r"'dense-int4', 'auto', got 'dense'"),
        ({"fc1": "sparse"}, ValueError, r"backend for fc1.weight must be one of .* got 'sparse'"),
        ({"fc3": "csr"}, ValueError, r"'fc3' selects no Linear or Conv weight: 'fc3' names nothing in the model; closest FQNs: fc2, fc1"),
        ({"fc1": {"backend": "bsr", "blocksize": (0, 4)}}, ValueError, r"blocksize for fc1.weight must be .* got \(0, 4\)"),
        ({"fc1": {"backend": "csr", "level": 2}}, ValueError, r"sets \['level'\]; only 'backend', 'blocksize' and 'quantization' apply"),
        ({"fc1": {"backend": "bsr", "blocksize": (4, 8)}}, ValueError, r"square blocks only, got blocksize \(4, 8\)"),
        ({"fc1": {"backend": "bsr", "blocksize": 5}}, ValueError, r"cannot lower fc1.weight to bsr: blocksize \(5, 5\) does not divide the weight shape \(96, 64\)"),
        ("bsr", ValueError, r"square blocks only, got blocksize \(1, 4\)"),
        ("semi_structured", ValueError, r"2:4 kernels run on CUDA GPUs only, the weight is on cpu; use 'fuse' or 'auto'"),
        ("auto", ValueError, r"backend 'auto' times each layer on its input: pass example_inputs"),
        (3, TypeError, r"backend must be a string like 'csr' or a per-layer config"),
        ({"fc1": 3}, TypeError, r"backend\['fc1'\] must be a backend name or a dict"),
        ({"fc1": {"backend": "csr", "blocksize": 4}}, ValueError,
         r"blocksize for fc1.weight applies to the 'bsr' and 'auto' backends only, got backend 'csr'"),
    ],
)
def test_bad_backends_raise_and_change_nothing(backend, error, match):
    """Each bad backend argument names the value and the fix; the prepared module is unchanged."""
    gm = prepared(LinearNet(), block=(1, 4))
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(error, match=match):
        lower(gm, backend)
    assert gm.code == code
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())


def test_bad_modules_raise():
    """Not a GraphModule: TypeError; a squashed module (no masks): ValueError saying to lower before squash."""
    with pytest.raises(TypeError, match="gm must be the GraphModule prepare"):
        lower(LinearNet())
    gm = prepared(LinearNet())
    get_sparsifier(gm).squash_mask()
    with pytest.raises(ValueError, match="no mask nodes.*before squash_mask"):
        lower(gm)
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        lower(prepared(LinearNet()), repeats=0)


def test_bfloat16_csr_on_cpu_is_refused_and_auto_fuses(monkeypatch):
    """bf16 weights without the C++ kernels (FX_SPARSITY_NO_NATIVE=1): csr names the dtype limit of CPU
    torch.sparse, bitmask and nm say their kernel is missing; auto fuses; fuse stays exact."""
    monkeypatch.setenv("FX_SPARSITY_NO_NATIVE", "1")
    gm = prepared(LinearNet().to(torch.bfloat16))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"float32 and float64 only, the weight is torch.bfloat16"):
        lower(gm, "csr")
    for layout in ("bitmask", "nm"):
        with pytest.raises(ValueError, match=f"the C\\+\\+ {layout} kernel is not available"):
            lower(gm, layout)
    lowered = lower(gm, "auto", example_inputs=x, repeats=1)
    assert [r.backend for r in get_lowering(lowered)] == ["fuse", "fuse"]
    assert all("no sparse kernel fits" in r.note for r in get_lowering(lowered))
    assert torch.equal(lowered(x), gm(x))


def test_auto_matches_prepared_and_records_timings():
    """auto on a conv+linear model: output matches, every layer has times before/after and a note."""
    gm = prepared(PointwiseConvNet(), level=0.95)
    x = torch.randn(2, 16, 8, 8)
    lowered = lower(gm, "auto", example_inputs=(x,), repeats=2)
    torch.testing.assert_close(lowered(x), gm(x))
    for record in get_lowering(lowered):
        assert record.requested == "auto" and record.backend in ("fuse", *LAYOUTS)
        assert record.time_before > 0 and record.time_after > 0 and record.note.startswith(("auto", "fused"))


def test_auto_decision_rule():
    """auto keeps a sparse kernel only when it beats the fused op by AUTO_MIN_SPEEDUP; else fuses."""
    assert choose_backend(1.0, {"csr": 0.5, "bsr": 0.4})[0] == "bsr"
    assert choose_backend(1.0, {"csr": 1.0 / AUTO_MIN_SPEEDUP})[0] == "csr"
    assert choose_backend(1.0, {"csr": 0.95})[0] == "fuse"
    assert choose_backend(1.0, {"csr": 2.0})[1] == "auto: fused (csr 0.50x)"
    assert choose_backend(1.0, {})[0] == "fuse"


def test_lowering_table_bytes_and_times():
    """The table lists backend, sparsity, bytes and the total; at 90% csr stores at most 0.21x the dense bytes."""
    gm = prepared(nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 128)))
    lowered = lower(gm, {"0": "csr"}, example_inputs=torch.randn(4, 256), repeats=2)
    records = get_lowering(lowered)
    assert records[0].lowered_bytes / records[0].dense_bytes <= 0.21
    assert records[1].lowered_bytes == records[1].dense_bytes == 256 * 128 * 4
    table = lowering_table(lowered)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["weight", "op", "shape", "backend"]
    assert lines[2].split()[:5] == ["0.weight", "linear", "256x256", "csr", "90.0%"]
    assert lines[3].split()[3] == "fuse" and lines[-1].startswith("total")
    assert "x" in lines[2].split()[-1]  # speedup column
    untimed = lowering_table(lower(gm, "csr"))
    assert untimed.splitlines()[2].split()[-3:] == ["-", "-", "-"]
    with pytest.raises(ValueError, match="not returned by fx_sparsity.lower"):
        get_lowering(gm)


def test_export_captured_model_lowers():
    """A model captured with torch.export (aten.linear nodes) lowers to csr and matches."""
    from helpers import ControlFlowNet

    model = ControlFlowNet()
    x = torch.randn(4, 6)
    gm = prepared(model, level=0.5, example_inputs=(x,))
    assert get_capture(gm).method == "export"
    lowered = lower(gm, "csr")
    torch.testing.assert_close(lowered(x), gm(x))
    assert count_nodes(lowered)[("call_function", CSR)] == 2


def test_public_names():
    """lower and its report are public: the calls at the top level, the records and tables in their namespaces;
    the 0.1.0 top-level names of the latter still resolve, with a DeprecationWarning naming the new home."""
    for name in ("lower", "get_lowering", "print_lowering_table"):
        assert name in fx_sparsity.__all__
    assert {"lower", "LayerLowering", "BACKENDS", "get_lowering"} <= set(fx_sparsity.lowering.__all__)
    assert "lowering_table" in fx_sparsity.report.__all__
    for name, home in (("lowering_table", fx_sparsity.report), ("LayerLowering", fx_sparsity.lowering),
                       ("BACKENDS", fx_sparsity.lowering)):
        with pytest.warns(DeprecationWarning, match=f"fx_sparsity.{name} is deprecated: use {home.__name__}.{name}"):
            assert getattr(fx_sparsity, name) is getattr(home, name)


def test_nm_masks_take_the_semi_structured_pass():
    """2:4 masks from NMSparsifier (fp16) go through the semi_structured pass (on CPU the operator unpacks to
    dense, its reference kernel): the graph calls semi_structured_linear, matches and exports."""
    import warnings

    from passes import SparseFormat, clone_sharing_tensors
    from passes.lowering import lower_sparse
    from passes.masking import fuse_masks

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "2:4 runs fast only on CUDA" warning
        gm = prepare(nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).half(),
                     sparsifier=fx_sparsity.NMSparsifier(2, 4))
    get_sparsifier(gm).step()
    lowered = clone_sharing_tensors(gm)
    lower_sparse(lowered, {"0.weight": SparseFormat("semi_structured"), "2.weight": SparseFormat("semi_structured")})
    fuse_masks(lowered)
    assert mask_free(lowered)
    assert count_nodes(lowered)[("call_function", torch.ops.fx_sparsity.semi_structured_linear.default)] == 2
    assert lowered.get_buffer("0.weight_packed").shape == (64, 64)
    x = torch.randn(5, 128, dtype=torch.float16)
    torch.testing.assert_close(lowered(x), gm(x))
    torch.testing.assert_close(torch.export.export(lowered, (x,)).module()(x), gm(x))


def test_pointwise_conv_with_string_padding_lowers():
    """A 1x1 conv with padding="same" or "valid" pads nothing and lowers to csr_linear."""
    model = nn.Sequential(nn.Conv2d(8, 8, 1, padding="same"), nn.Conv2d(8, 4, 1, padding="valid"))
    gm = prepared(model)
    lowered = lower(gm, "csr")
    assert [r.backend for r in get_lowering(lowered)] == ["csr", "csr"]
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(lowered(x), gm(x))


@pytest.mark.parametrize(
    "example_inputs, match",
    [
        (None, None),
        ([], r"example_inputs holds no tensor"),
        ("x", r"example_inputs must be a tensor, a tuple of positional inputs or a dict"),
        ({"x": 3}, r"example_inputs holds no tensor"),
    ],
)
def test_example_inputs_are_checked(example_inputs, match):
    """lower(example_inputs=...) takes a tensor, a tuple/list or a dict of keyword inputs; anything else is a
    TypeError naming the argument (a list used to fail with "'list' object has no attribute 'dim'")."""
    gm = prepared(LinearNet())
    if match is None:
        x = torch.randn(3, 64)
        for form in (x, (x,), [x], {"x": x}):
            records = get_lowering(lower(gm, "csr", example_inputs=form, repeats=1, progress_bar=False))
            assert all(r.time_before is not None for r in records)
        return
    with pytest.raises(TypeError, match=match):
        lower(gm, "csr", example_inputs=example_inputs, progress_bar=False)



@pytest.mark.parametrize("capture_method", ["symbolic_trace", "export"])
@pytest.mark.parametrize("backend", ["auto", "fuse", "shrink"])
def test_example_inputs_the_module_does_not_take_are_refused(capture_method, backend):
    """LinearNet takes one input: lower(gm, backend, example_inputs=(x, extra)) timed the layers on x and dropped the
    extra input without a word (the interpreter binds placeholders only), for a traced and an exported module alike.
    Now a TypeError names the extra input and the forward's parameters, for every backend, before anything runs;
    an unknown keyword is refused too."""
    x = torch.randn(3, 64)
    if backend == "shrink":
        pruner = fx_sparsity.ChannelPruner(0.5)
        gm = pruner.prepare(LinearNet(), example_inputs=(x,), capture_method=capture_method)
        pruner.step()
    else:
        gm = prepared(LinearNet(), example_inputs=(x,), capture_method=capture_method)
    with pytest.raises(TypeError, match=r"example_inputs holds 2 positional inputs, but the GraphModule's forward "
                                        r"takes 1 \(x\): example_inputs\[1\] \(a tensor of shape \(5,\)\) is not an "
                                        r"input of the model; drop it"):
        lower(gm, backend, example_inputs=(x, torch.randn(5)), repeats=1, progress_bar=False)
    with pytest.raises(TypeError, match=r"example_inputs does not fit the GraphModule's forward\(x\) .*'y'"):
        lower(gm, backend, example_inputs={"x": x, "y": x}, repeats=1, progress_bar=False)


def test_timing_leaves_batchnorm_statistics_alone():
    """TinyResNet (BatchNorm, in training mode): lower('auto') runs the module to time layers, in eval mode,
    so the user's running statistics and num_batches_tracked do not move, and training flags are restored."""
    model = TinyResNet().train()
    before = snapshot(model)
    gm = prepare(model, sparsifier=WeightNormSparsifier(0.5, (1, 1)))
    get_sparsifier(gm).step()
    lower(gm, "auto", example_inputs=torch.randn(2, 3, 16, 16), repeats=1, progress_bar=False)
    after = snapshot(model)
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())
    assert gm.training and all(m.training for m in gm.modules())


def test_timing_regimes():
    """last_level_cache_bytes reads this CPU's last-level cache from sysfs (at least 1 MiB); time_variants
    returns a positive median per variant, with calls per sample chosen to last about a millisecond (warm) or
    given (streaming: one call per copy of the layer's tensors), having called every variant in each round."""
    llc = last_level_cache_bytes()
    assert llc >= 1 << 20
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    for per_sample in (None, 4):
        calls.update(a=0, b=0)
        times = time_variants({"a": make("a"), "b": make("b")}, repeats=3, device=torch.device("cpu"), calls=per_sample)
        assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
        # 2 warm-up calls, then 3 rounds of 4 calls (streaming) or of at least one call each (warm: how many fit
        # in a millisecond depends on the machine's load, so only the lower bound is checked)
        assert calls["a"] == 2 + 3 * 4 if per_sample else calls["a"] >= 2 + 3


def test_streaming_timing_rotates_through_copies(monkeypatch):
    """When the model's weights exceed the last-level cache, each variant of a layer rotates through copies of its
    tensors that together exceed twice that cache (so every call reads memory, back to back), and auto still
    matches the prepared module. The cache size is patched small so that a test model is "large"."""
    from fx_sparsity.lowering import recipe as lower_module
    from fx_sparsity.lowering import timing as layer_timing

    monkeypatch.setattr(layer_timing, "last_level_cache_bytes", lambda: 32 << 10)
    monkeypatch.setattr(lower_module, "last_level_cache_bytes", lambda: 32 << 10)
    gm = prepared(LinearNet(), level=0.9)
    x = torch.randn(3, 64)
    assert lower_module._weights_exceed_cache(gm)
    target = passes.masked_targets(gm)[0]
    calls = layer_timing.record_op_calls(gm, (x,), {})[target.tensor_fqn]
    timer = layer_timing.LayerTimer(gm, target, calls, repeats=1, cold=True)
    weight_bytes = timer.weight.numel() * timer.weight.element_size()
    assert timer.copies == min(layer_timing.MAX_COPIES, -(-2 * (32 << 10) // weight_bytes)) > 1
    lowered = lower(gm, "auto", example_inputs=(x,), repeats=1, progress_bar=False)
    torch.testing.assert_close(lowered(x), gm(x))
