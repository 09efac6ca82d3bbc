"""Capture an ``nn.Module`` as a ``GraphModule``: symbolic tracing, or ``torch.export``."""

from passes.capturing.tracing import (
    capture,
    CaptureError,
    CapturedModule,
)

__all__ = [
    "capture",
    "CaptureError",
    "CapturedModule",
]
