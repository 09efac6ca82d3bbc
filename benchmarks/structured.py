"""Structured pruning: parameters, MACs and CPU latency (batch 1) of shrunk models, side by side with Torch-Pruning.

Two tables. The default one times five models (below). ``--zoo`` counts only parameters and MACs (no timing) of
the shrunk models of a dozen real architectures at ratio 0.5, ours and Torch-Pruning's side by side (issue 18):
torchvision efficientnet_b0, convnext_tiny, swin_t, mobilenet_v2, resnet50, regnet_y_400mf and vit_b_16 (1x3x224x224),
timm efficientnet_b0, convnext_tiny and mobilevitv2_050 (if timm is installed; 1x3x224x224, 256x256 for
mobilevitv2), GPT-2 (n_embd 256, 4 layers, 8 heads) and a T5 encoder (d_model 256, 4 layers, 8 heads of 32, d_ff
1024) from transformers configs at 128 tokens. Torch-Pruning runs ``MetaPruner`` with
``GroupMagnitudeImportance(p=1)`` and the final classifier ignored (vit_b_16: its channel-group recipe below, the
widths patched by hand); both tools count with :func:`passes.shrink.count_macs` on a capture of the pruned module
(Linear/Conv and ``x @ W`` multiply-accumulates; attention's own matmuls are not counted). swin_t is not given to
Torch-Pruning (1.6.1 raises ``MemoryError`` building its index mappings, under an 8 GiB limit at 64x64 already).

    python benchmarks/structured.py --zoo [--models resnet50,gpt2] [--tiny]

Models (random init, no weights downloaded): torchvision resnet18, mobilenet_v3_small and vit_b_16 (224x224),
a transformers BERT (hidden 256, 4 layers, 4 heads, intermediate 1024) and a Llama-style model (hidden 512, 4
layers, 16 query heads on 8 KV heads, intermediate 1408), both at sequence length 128. ``--tiny`` builds small
versions of all five (to check the script, not to time).

For each model and channel ratio (0.3, 0.5), fx_sparsity's ``ChannelPruner`` (L1 saliency over whole groups, heads
and KV heads as units, consumer columns masked so the shrunk module equals the masked one) + ``shrink`` is compared
with the dense model and with Torch-Pruning's ``MetaPruner`` (``GroupMagnitudeImportance(p=1)``) at the same ratio,
with the recipe of its examples:

* CNNs: every group, the final classifier ignored (both keep the output shape);
* vit_b_16: its head recipe (``num_heads`` of every ``nn.MultiheadAttention``, ``prune_num_heads=True``,
  ``prune_head_dims=False``, ``head_pruning_ratio=ratio``), the classifier ignored, then ``hidden_dim`` patched
  by hand as its examples do;
* BERT: ``num_heads`` for query/key/value, the layers that write the hidden size (embeddings, attention output
  and output dense, pooler) ignored so the output shape is kept, then ``num_attention_heads`` and
  ``all_head_size`` patched by hand;
* Llama: q/k/v and o_proj excluded (its standard head recipe does not finish on grouped-query attention), so
  only the MLPs shrink; the hidden size kept as for BERT.

MACs: Linear/Conv multiply-accumulates from :func:`passes.shrink.count_macs` (attention's own matmuls are not counted)
and Torch-Pruning's ``count_ops_and_params``. Latency: median over interleaved rounds in random order,
``inference_mode``, batch 1; "dense" is the eager model, "dense captured" the ``GraphModule`` our pruner starts from
(for vit_b_16, BERT and Llama a ``torch.export`` graph run op by op, which costs per-op overhead at small sizes:
compare fx_sparsity with both). Each pruned model is checked to ``torch.export``, and its output shapes against the
dense model's.

    python benchmarks/structured.py [--rounds 20] [--inner 3] [--models resnet18,bert] [--tiny]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from machine import describe
from tabulate import tabulate
from torch import nn
from torch.utils._pytree import tree_leaves
from torchvision import models
from torchvision.models.vision_transformer import VisionTransformer

from fx_sparsity import shrink_report
from fx_sparsity.deploy import to_model
from fx_sparsity.structured import ChannelPruner, shrink
from passes.capturing import capture
from passes.shrink import count_macs, count_params

try:
    import torch_pruning as tp
except ImportError:  # the comparison column is left out
    tp = None

MODELS = ("resnet18", "mobilenet_v3_small", "vit_b_16", "bert", "llama")
ZOO = ("efficientnet_b0", "convnext_tiny", "swin_t", "mobilenet_v2", "resnet50", "regnet_y_400mf", "vit_b_16",
       "timm/efficientnet_b0", "timm/convnext_tiny", "timm/mobilevitv2_050", "gpt2", "t5")
# Models Torch-Pruning is not run on, and why.
TP_SKIPPED = {"swin_t": "not run: raises MemoryError building its index mappings (8 GiB limit, at 64x64 already)"}


def _bert(tiny: bool) -> nn.Module:
    import transformers

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if tiny else dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    return transformers.BertModel(transformers.BertConfig(vocab_size=1000, max_position_embeddings=512, **size))


def _llama(tiny: bool) -> nn.Module:
    import transformers

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=128) if tiny else dict(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, intermediate_size=1408)
    config = transformers.LlamaConfig(vocab_size=1000, max_position_embeddings=512, use_cache=False, **size)
    return transformers.LlamaModel(config)


def _gpt2(tiny: bool) -> nn.Module:
    import transformers

    size = dict(n_embd=64, n_layer=2, n_head=4) if tiny else dict(n_embd=256, n_layer=4, n_head=8)
    config = transformers.GPT2Config(vocab_size=1000, n_positions=512, use_cache=False, bos_token_id=0, eos_token_id=0,
                                     **size)
    return transformers.GPT2Model(config)


def _t5(tiny: bool) -> nn.Module:
    import transformers

    size = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4) if tiny else dict(
        d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_heads=8)
    return transformers.T5EncoderModel(transformers.T5Config(vocab_size=1000, **size))


def build_zoo(name: str, tiny: bool) -> tuple[nn.Module, torch.Tensor]:
    """A model of :data:`ZOO` (random init, eval mode) and its batch-1 input."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 1000, (1, 16 if tiny else 128), generator=torch.Generator().manual_seed(0))
    if name == "gpt2":
        return _gpt2(tiny).eval(), tokens
    if name == "t5":
        return _t5(tiny).eval(), tokens
    image = 64 if tiny else 256 if "mobilevit" in name else 224
    x = torch.randn(1, 3, image, image)
    if name.startswith("timm/"):
        import timm

        return timm.create_model(name.removeprefix("timm/")).eval(), x
    if name == "vit_b_16" and tiny:
        return VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64,
                                 mlp_dim=128).eval(), x
    return getattr(models, name)().eval(), x


def build(name: str, tiny: bool) -> tuple[nn.Module, torch.Tensor]:
    """The model (random init, eval mode) and a batch-1 input."""
    torch.manual_seed(0)
    image = 32 if tiny else 224
    tokens = torch.randint(0, 1000, (1, 16 if tiny else 128), generator=torch.Generator().manual_seed(0))
    if name == "vit_b_16":
        model = (VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)
                 if tiny else models.vit_b_16())
        return model.eval(), torch.randn(1, 3, image, image)
    if name == "bert":
        return _bert(tiny).eval(), tokens
    if name == "llama":
        return _llama(tiny).eval(), tokens
    return getattr(models, name)().eval(), torch.randn(1, 3, image, image)


def _ours(model: nn.Module, x: torch.Tensor, ratio: float, config: Any = None) -> nn.Module:
    pruner = ChannelPruner(sparsity_level=ratio, criterion="l1", mask_consumers=True)
    gm = pruner.prepare(model, config, example_inputs=(x,))
    pruner.step()
    return shrink(gm)


# Extra variants of one model: label -> (our config, Torch-Pruning recipe name). vit_b_16's default prunes the
# residual width too (its output is class logits); "heads + MLPs" names those layers to keep the width.
VARIANTS: dict[str, dict[str, tuple[Any, str]]] = {
    "vit_b_16": {
        "fx_sparsity (heads + MLPs)": (["*.in_proj_weight", "*.mlp.0"], ""),
        "torch-pruning (channel groups)": (None, "vit_b_16 channel groups"),
    },
}


def _tp_recipe(name: str, model: nn.Module, ratio: float) -> tuple[dict[str, Any], Callable[[], None]]:
    """MetaPruner arguments for ``model`` and what must be patched by hand afterwards."""
    if name == "vit_b_16 channel groups":  # the residual width too: its class token and position embedding named

        attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]

        def patch_width() -> None:
            model.hidden_dim = model.conv_proj.out_channels
            for m in attentions:
                m.embed_dim = m.kdim = m.vdim = m.in_proj_weight.shape[1]
                m.head_dim = m.embed_dim // m.num_heads

        # the width must stay a multiple of the head count: every head loses the same dims
        return {"ignored_layers": [model.heads], "round_to": attentions[0].num_heads, "unwrapped_parameters": [
            (model.class_token, 2), (model.encoder.pos_embedding, 2)]}, patch_width
    if name in ("resnet18", "mobilenet_v3_small"):
        last = model.fc if hasattr(model, "fc") else model.classifier[-1]
        return {"ignored_layers": [last]}, lambda: None
    if name == "vit_b_16":
        heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}

        def patch() -> None:
            model.hidden_dim = model.conv_proj.out_channels

        return {"ignored_layers": [model.heads], "num_heads": heads, "prune_num_heads": True,
                "prune_head_dims": False, "head_pruning_ratio": ratio}, patch
    if name == "bert":
        selves = [layer.attention.self for layer in model.encoder.layer]
        heads = {m: s.num_attention_heads for s in selves for m in (s.query, s.key, s.value)}
        ignored = [model.embeddings, model.pooler] + [
            m for layer in model.encoder.layer for m in (layer.attention.output.dense, layer.output.dense)]

        def patch() -> None:
            for s in selves:
                s.num_attention_heads = s.query.out_features // s.attention_head_size
                s.all_head_size = s.query.out_features

        return {"ignored_layers": ignored, "num_heads": heads, "prune_num_heads": True, "prune_head_dims": False,
                "head_pruning_ratio": ratio}, patch
    if name == "llama":
        ignored = [model.embed_tokens] + [
            m for layer in model.layers
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                      layer.mlp.down_proj)]
        return {"ignored_layers": ignored}, lambda: None
    if name in ZOO:  # every group, the final classifier (1000 classes) ignored
        classifier = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
        return {"ignored_layers": classifier}, lambda: None
    raise ValueError(f"no Torch-Pruning recipe for {name!r}")


def _torch_pruning(name: str, model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    model = copy.deepcopy(model)
    kwargs, patch = _tp_recipe(name, model, ratio)
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=ratio, **kwargs
    )
    pruner.step()
    patch()
    return model.eval()


def _latency(candidates: dict[str, nn.Module], x: torch.Tensor, rounds: int, inner: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for module in candidates.values():
            for _ in range(3):
                module(x)
        for _ in range(rounds):
            order = list(candidates)
            random.shuffle(order)
            for name in order:
                start = time.perf_counter()
                for _ in range(inner):
                    candidates[name](x)
                times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def _exports(module: nn.Module, x: torch.Tensor) -> str:
    try:
        torch.export.export(module, (x,))
    except Exception as e:  # noqa: BLE001 - the table says whether it exported
        return f"no ({type(e).__name__})"
    return "yes"


def _shapes(module: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    with torch.no_grad():
        return [tuple(t.shape) for t in tree_leaves(module(x)) if isinstance(t, torch.Tensor)]


def _macs(module: nn.Module, x: torch.Tensor) -> int:
    return count_macs(module if isinstance(module, torch.fx.GraphModule) else capture(module, example_inputs=(x,)), x)


def _tp_macs(module: nn.Module, x: torch.Tensor) -> float:
    if tp is None:
        return float("nan")
    try:  # its counter calls module.eval(), which an exported GraphModule refuses
        return tp.utils.count_ops_and_params(module, x)[0]
    except NotImplementedError:
        return float("nan")


def run(names: list[str], tiny: bool, rounds: int, inner: int) -> list[list[object]]:
    rows = []
    for name in names:
        dense, x = build(name, tiny)
        dense_macs, dense_shapes = _macs(dense, x), _shapes(dense, x)
        for ratio in (0.3, 0.5):
            candidates: dict[str, nn.Module] = {"dense": dense, "dense captured": capture(dense, example_inputs=(x,))}
            candidates["fx_sparsity"] = _ours(dense, x, ratio)
            for label, (config, recipe) in VARIANTS.get(name, {}).items():
                if label.startswith("fx_sparsity"):
                    candidates[label] = _ours(dense, x, ratio, config)
            if name in ("resnet18", "mobilenet_v3_small"):  # back in the user's class, run eagerly
                candidates["fx_sparsity, to_model"] = to_model(candidates["fx_sparsity"])
            notes = {label: "exact" if shrink_report(module).exact else "inexact (LayerNorm statistics)"
                     for label, module in candidates.items()
                     if label.startswith("fx_sparsity") and isinstance(module, torch.fx.GraphModule)}
            if tp is not None:
                try:
                    candidates["torch-pruning"] = _torch_pruning(name, dense, x, ratio)
                    _shapes(candidates["torch-pruning"], x)
                except Exception as e:  # noqa: BLE001 - its failure is a result
                    candidates.pop("torch-pruning", None)
                    rows.append([name, ratio, "torch-pruning", "-", "-", "-", "-", "-", "-", "-", "-",
                                 f"failed: {type(e).__name__}: {str(e)[:60]}"])
                for label, (config, recipe) in VARIANTS.get(name, {}).items():
                    if recipe:
                        candidates[label] = _torch_pruning(recipe, dense, x, ratio)
            latency = _latency(candidates, x, rounds, inner)
            for label, module in candidates.items():
                if label.startswith("dense") and ratio != 0.3:
                    continue
                macs = _macs(module, x)
                tp_macs = _tp_macs(module, x)
                params = sum(p.numel() for p in module.parameters())
                rows.append([
                    name, "-" if label.startswith("dense") else ratio, label, f"{params / 1e6:.3f}",
                    f"{macs / 1e6:.1f}", f"{tp_macs / 1e6:.1f}", f"{dense_macs / macs:.2f}x",
                    f"{latency[label] * 1e3:.2f}", f"{latency['dense'] / latency[label]:.2f}x",
                    "yes" if _shapes(module, x) == dense_shapes else "no",
                    "yes" if label == "dense" else _exports(module, x), notes.get(label, ""),
                ])
    return rows


def _zoo_row(name: str, label: str, module: nn.Module, x: torch.Tensor, dense: tuple[int, int], shapes: list,
             note: str) -> list[object]:
    params, macs = count_params(module), _macs(module, x)
    return [name, label, f"{params / 1e6:.3f}", f"{params / dense[0]:.3f}", f"{macs / 1e6:.1f}",
            f"{macs / dense[1]:.3f}", "yes" if _shapes(module, x) == shapes else "no", _exports(module, x), note]


def run_zoo(names: list[str], tiny: bool, ratio: float = 0.5) -> list[list[object]]:
    """Parameters and MACs of the dense model, ours and Torch-Pruning's at ``ratio``; no timing."""
    rows = []
    for name in names:
        dense, x = build_zoo(name, tiny)
        sizes, shapes = (count_params(dense), _macs(dense, x)), _shapes(dense, x)
        rows.append(_zoo_row(name, "dense", dense, x, sizes, shapes, ""))
        small = _ours(dense, x, ratio)
        report = shrink_report(small)
        note = "exact" if report.exact else f"inexact: {_reasons(report.inexact)}"
        rows.append(_zoo_row(name, "fx_sparsity", small, x, sizes, shapes, note))
        if tp is None or name in TP_SKIPPED:
            rows.append([name, "torch-pruning", "-", "-", "-", "-", "-", "-",
                         TP_SKIPPED.get(name, "not installed")])
            continue
        recipe = "vit_b_16 channel groups" if name == "vit_b_16" else name
        try:
            theirs = _torch_pruning(recipe, dense, x, ratio)
            rows.append(_zoo_row(name, "torch-pruning", theirs, x, sizes, shapes, ""))
        except Exception as e:  # noqa: BLE001 - its failure is a result
            rows.append([name, "torch-pruning", "-", "-", "-", "-", "-", "-", f"failed: {type(e).__name__}: {e}"[:90]])
    return rows


def _reasons(notes: tuple[str, ...]) -> str:
    """What makes a shrunk module inexact, by kind (LayerNorm statistics, ...)."""
    kinds = {"LayerNorm": "LayerNorm statistics", "GroupNorm": "GroupNorm statistics", "scales q": "attention scale",
             "vary with the input": "removed channels still vary", "still feed": "removed channels still vary",
             "padded conv": "padded conv borders"}
    found = [label for key, label in kinds.items() if any(key in n for n in notes)]
    return ", ".join(dict.fromkeys(found)) or notes[0][:60]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--models", default="", help=f"comma-separated, from {', '.join(MODELS)} (or, with --zoo, "
                        f"{', '.join(ZOO)}); all by default")
    parser.add_argument("--tiny", action="store_true", help="small models, to check the script (timings meaningless)")
    parser.add_argument("--zoo", action="store_true", help="parameters and MACs of the ZOO models at 0.5, no timing")
    args = parser.parse_args()
    known = ZOO if args.zoo else MODELS
    names = [n for n in (args.models or ",".join(known)).split(",") if n]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(known)}")
    if args.zoo:
        print(f"{describe()}, torch-pruning {getattr(tp, '__version__', 'not installed')}, ratio 0.5, batch 1"
              f"{', TINY models' if args.tiny else ''}")
        headers = ["model", "method", "params (M)", "params / dense", "MACs (M)", "MACs / dense", "output shape kept",
                   "exports", "shrunk == masked / note"]
        print(tabulate(run_zoo(names, args.tiny), headers=headers, tablefmt="github"))
        return
    print(f"{describe()}, torch-pruning {getattr(tp, '__version__', 'not installed')}, batch 1"
          f"{', TINY models' if args.tiny else ''}")
    headers = ["model", "ratio", "method", "params (M)", "MACs (M, ours)", "MACs (M, TP count)", "MACs reduction",
               "latency (ms)", "speedup", "output shape kept", "exports", "shrunk == masked / note"]
    print(tabulate(run(names, args.tiny, args.rounds, args.inner), headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
