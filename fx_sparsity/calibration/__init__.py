"""Calibration: the statistics sparsifiers ask for, over the whole model in one pass (:mod:`.statistics`),
block by block (:mod:`.sequential`), or block by block from a checkpoint for models larger than memory
(:mod:`.meta_device` prepares them, :mod:`.streaming` streams them)."""

from fx_sparsity.calibration.meta_device import prepare_on_meta
from fx_sparsity.calibration.sequential import SequentialReport, StageRecord, prune_sequential
from fx_sparsity.calibration.statistics import calibrate
from fx_sparsity.calibration.streaming import SafetensorsWeights

__all__ = [
    "SequentialReport",
    "StageRecord",
    "prune_sequential",
    "calibrate",
    "SafetensorsWeights",
    "prepare_on_meta",
]
