"""How each op family moves channel spaces through the graph (one file per family)."""

from passes.dependency.rules.attention import (
    ATTENTION_RULES,
    follow_fused_heads,
)
from passes.dependency.rules.layers import (
    follow_layer,
    follow_module,
    NORM_RULES,
)
from passes.dependency.rules.lstm import (
    follow_lstm,
)
from passes.dependency.rules.moves import (
    MOVE_RULES,
)

__all__ = [
    "ATTENTION_RULES",
    "follow_fused_heads",
    "follow_layer",
    "follow_module",
    "NORM_RULES",
    "follow_lstm",
    "MOVE_RULES",
]
