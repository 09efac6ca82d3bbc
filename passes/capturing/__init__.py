"""Capture an ``nn.Module`` as a ``GraphModule``: symbolic tracing, or ``torch.export`` (:mod:`.tracing`), as a
module that pickles its graph as it is (:mod:`.pickling`)."""

from passes.capturing.pickling import CapturedModule, as_exported_module
from passes.capturing.tracing import CaptureError, capture

__all__ = [
    "CapturedModule",
    "as_exported_module",
    "CaptureError",
    "capture",
]
