"""Observers in front of masked ops, and the block-by-block stages of sequential calibration."""

from passes.calibration.insertion import (
    insert_input_observers,
    remove_input_observers,
)
from passes.calibration.observers import (
    InputHessianObserver,
    InputNormObserver,
    InputObserver,
    ObserverFactory,
    accumulate_hessian,
    all_reduce_observers,
    input_norm_observer,
    input_rows,
    token_rows,
)
from passes.calibration.stages import (
    Stage,
    StageRunner,
    carried_bytes,
    find_blocks,
    match_blocks,
    module_paths,
    plan_stages,
    stage_tensors,
)

__all__ = [
    "insert_input_observers",
    "remove_input_observers",
    "InputHessianObserver",
    "InputNormObserver",
    "InputObserver",
    "ObserverFactory",
    "accumulate_hessian",
    "all_reduce_observers",
    "input_norm_observer",
    "input_rows",
    "token_rows",
    "Stage",
    "StageRunner",
    "carried_bytes",
    "find_blocks",
    "match_blocks",
    "module_paths",
    "plan_stages",
    "stage_tensors",
]
