"""Structured pruning: parameters, MACs and CPU latency (batch 1) of shrunk models, side by side with Torch-Pruning.

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
from passes.shrink import count_macs

try:
    import torch_pruning as tp
except ImportError:  # the comparison column is left out
    tp = None

MODELS = ("resnet18", "mobilenet_v3_small", "vit_b_16", "bert", "llama")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--tiny", action="store_true", help="small models, to check the script (timings meaningless)")
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    print(f"{describe()}, torch-pruning {getattr(tp, '__version__', 'not installed')}, batch 1"
          f"{', TINY models' if args.tiny else ''}")
    headers = ["model", "ratio", "method", "params (M)", "MACs (M, ours)", "MACs (M, TP count)", "MACs reduction",
               "latency (ms)", "speedup", "output shape kept", "exports", "shrunk == masked / note"]
    print(tabulate(run(names, args.tiny, args.rounds, args.inner), headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
