"""Find the Linear/Conv weights of a captured graph, the ones left dense, and select them by FQN."""

from passes.matching.select import (
    FqnRule,
    select_weights,
    is_pattern,
)
from passes.matching.weights import (
    WeightMatch,
    find_weights,
    find_masked_weights,
    op_kind,
    op_arguments,
    weight_position,
    is_transposed_linear,
    UnmatchedWeight,
    unmatched_weights,
)

__all__ = [
    "FqnRule",
    "select_weights",
    "is_pattern",
    "WeightMatch",
    "find_weights",
    "find_masked_weights",
    "op_kind",
    "op_arguments",
    "weight_position",
    "is_transposed_linear",
    "UnmatchedWeight",
    "unmatched_weights",
]
