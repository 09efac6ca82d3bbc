"""Module attributes after :mod:`passes.shrink` sliced their tensors.

Size attributes (``in_features``, ``out_channels``, ``groups`` of a depthwise conv,
``num_features``, ``normalized_shape``, ``embedding_dim``, an LSTM's ``input_size``,
``hidden_size`` and ``proj_size``) are recomputed from the tensors; an LSTM then rebuilds
the flat weight list its ``forward`` reads. Head counts and widths have no module
attribute to update: a captured graph holds no attention module (symbolic tracing copies
only the leaf layers, and ``torch.export`` keeps plain ``nn.Module`` containers without the
original classes or configs); its views read the number of heads as ``-1``, from tensor
shapes, or as literal sizes, which :mod:`passes.shrink` rewrites in the graph.
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
    elif type(module) is nn.LSTM:
        _update_lstm(module)


def _update_lstm(lstm: nn.LSTM) -> None:
    """Sizes from layer 0's tensors (every layer and direction shrinks alike, or the pass froze it), then the
    flat weight list ``forward`` reads, which still holds the tensors replaced in ``_parameters``."""
    lstm.input_size = lstm.weight_ih_l0.shape[1]
    lstm.hidden_size = lstm.weight_hh_l0.shape[0] // 4
    if lstm.proj_size > 0:
        lstm.proj_size = lstm.weight_hr_l0.shape[0]
        if lstm.proj_size >= lstm.hidden_size:
            raise ValueError(
                f"shrinking leaves an LSTM with hidden_size {lstm.hidden_size} and proj_size {lstm.proj_size}, but "
                "nn.LSTM needs proj_size < hidden_size; remove fewer hidden units (or more projection channels)"
            )
    lstm._init_flat_weights()

