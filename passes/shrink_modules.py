"""Module attributes after :mod:`passes.shrink` sliced their tensors.

Size attributes (``in_features``, ``out_channels``, ``groups`` of a depthwise conv,
``num_features``, ``normalized_shape``, ``embedding_dim``) are recomputed from the
tensors. Head counts and widths have no module attribute to update: a captured graph
holds no attention module (symbolic tracing copies only the leaf layers, and
``torch.export`` keeps plain ``nn.Module`` containers without the original classes or
configs); its views read the number of heads as ``-1``, from tensor shapes, or as
literal sizes, which :mod:`passes.shrink` rewrites in the graph.
"""

from __future__ import annotations

from torch import nn

__all__ = ["update_module"]


def update_module(module: nn.Module) -> None:
    """Recompute a module's size attributes from its (sliced) tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1 and module.groups == module.in_channels and module.weight.shape[1] == 1:
            module.groups = module.in_channels = module.weight.shape[0]
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        stats = module.running_mean if module.running_mean is not None else module.weight
        module.num_features = stats.shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (module.weight.shape[0],)
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]

