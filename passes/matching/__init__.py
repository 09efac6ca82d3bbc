"""Find the Linear/Conv weights of a captured graph (:mod:`.weights`), the ones left dense with why
(:mod:`.unmatched`), and select them by FQN rules (:mod:`.select`)."""

from passes.matching.select import FqnRule, is_pattern, select_weights
from passes.matching.unmatched import UnmatchedWeight, unmatched_weights
from passes.matching.weights import (
    WeightMatch,
    find_masked_weights,
    find_weights,
    is_transposed_linear,
    op_arguments,
    op_kind,
    weight_of,
    weight_position,
)

__all__ = [
    "FqnRule",
    "is_pattern",
    "select_weights",
    "UnmatchedWeight",
    "unmatched_weights",
    "WeightMatch",
    "find_masked_weights",
    "find_weights",
    "is_transposed_linear",
    "op_arguments",
    "op_kind",
    "weight_of",
    "weight_position",
]
