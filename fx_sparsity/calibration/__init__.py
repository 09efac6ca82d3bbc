"""Calibration: statistics in one pass, block by block, and streaming from a checkpoint."""

from fx_sparsity.calibration.sequential import (
    SequentialReport,
    StageRecord,
    prune_sequential,
)
from fx_sparsity.calibration.statistics import (
    calibrate,
    calibration_key,
    calibration_observer,
    calibration_statistic,
    apply_token_mask,
    process_group,
    run_observed,
)
from fx_sparsity.calibration.streaming import (
    SafetensorsWeights,
    WeightStreamer,
    prepare_on_meta,
    write_safetensors,
)

__all__ = [
    "SequentialReport",
    "StageRecord",
    "prune_sequential",
    "calibrate",
    "calibration_key",
    "calibration_observer",
    "calibration_statistic",
    "apply_token_mask",
    "process_group",
    "run_observed",
    "SafetensorsWeights",
    "WeightStreamer",
    "prepare_on_meta",
    "write_safetensors",
]
