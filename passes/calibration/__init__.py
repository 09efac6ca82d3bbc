"""Calibration, graph side: observers and their statistics (:mod:`.observers`), put in front of masked ops and
taken out again (:mod:`.insertion`); the repeated blocks of a model (:mod:`.blocks`) and the stages that run
between them, one after another (:mod:`.stages`)."""

from passes.calibration.blocks import find_blocks, is_inside, match_blocks, module_paths, module_stack
from passes.calibration.insertion import insert_input_observers, remove_input_observers
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
from passes.calibration.stages import Stage, StageRunner, carried_bytes, plan_stages, stage_tensors

__all__ = [
    "find_blocks",
    "is_inside",
    "match_blocks",
    "module_paths",
    "module_stack",
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
    "plan_stages",
    "stage_tensors",
]
