"""``prune_sequential``: calibrate and prune a prepared module block by block.

The SparseGPT and Wanda reference implementations prune a transformer one
decoder layer at a time: record the layer's inputs for every calibration
sample, collect the layer's statistics, prune it, then run the *pruned* layer
to produce the next layer's inputs. Later layers so see (and SparseGPT
compensates) the error of the earlier ones, and only one layer's activations
and statistics are held at a time.

:func:`prune_sequential` does this on any prepared module: the graph is cut
into stages by :func:`passes.calibration.plan_stages` (each block, and the nodes before,
between and after the blocks), and each stage is calibrated with the
sparsifier's own observers (:func:`fx_sparsity.calibrate`'s protocol),
stepped, and run again to carry its outputs on. It is a separate function,
not a ``calibrate`` option, because it necessarily changes masks (and
SparseGPT's weights) while it runs: ``calibrate`` only records statistics.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx

from fx_sparsity.calibration.statistics import (
    apply_token_mask,
    calibration_key,
    calibration_observer,
    calibration_statistic,
    process_group,
    run_observed,
)
from fx_sparsity.calibration.streaming import SafetensorsWeights, WeightStreamer
from fx_sparsity.meta import get_sparsifier
from fx_sparsity.sparsifier.base import BaseSparsifier
from fx_sparsity.structured.pruner import ChannelPruner
from fx_sparsity.utils.progress import progress
from fx_sparsity.utils.running import (
    TokenMask,
    batch_token_mask,
    check_batches,
    check_token_mask_source,
    eval_mode,
    fit_inputs,
)
from passes.calibration import (
    Stage,
    StageRunner,
    carried_bytes,
    find_blocks,
    insert_input_observers,
    match_blocks,
    plan_stages,
    remove_input_observers,
)

__all__ = ["SequentialReport", "StageRecord", "prune_sequential"]


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """What one stage of :func:`prune_sequential` held and pruned.

    Attributes:
        name: the block's FQN, or ``"(before <first block>)"`` / ``"(after <block>)"``.
        tensor_fqns: the weights calibrated and stepped in this stage.
        input_bytes: the values carried into the stage, for all batches (tensor storages).
        output_bytes: the values the stage carried on to later stages, for all batches.
        statistic_bytes: the statistics recorded for the stage's weights.
        weight_bytes: with ``weights=``, the tensors loaded for the stage (0 otherwise).
    """

    name: str
    tensor_fqns: tuple[str, ...]
    input_bytes: int
    output_bytes: int
    statistic_bytes: int
    weight_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class SequentialReport:
    """The stages :func:`prune_sequential` ran, in order, and what each one stored."""

    stages: tuple[StageRecord, ...]

    @property
    def peak_bytes(self) -> int:
        """The most bytes held at once (at most): one stage's inputs, outputs, statistics and loaded weights."""
        return max((s.input_bytes + s.output_bytes + s.statistic_bytes + s.weight_bytes for s in self.stages), default=0)

    @property
    def blocks(self) -> tuple[str, ...]:
        """The stage names, in order."""
        return tuple(s.name for s in self.stages)


def _blocks(gm: fx.GraphModule, blocks: Sequence[str] | None, fqns: list[str]) -> tuple[str, ...]:
    if blocks is not None:
        return match_blocks(gm, blocks)
    found = find_blocks(gm, fqns)
    if not found:
        raise ValueError(
            "found no repeated blocks holding the sparsified weights (modules with an index as last name, "
            "like layers.0, layers.1): name the block modules, e.g. blocks=['model.layers.*']"
        )
    return found


def _calibrate(
    gm: fx.GraphModule,
    sparsifier: BaseSparsifier,
    runner: StageRunner,
    stage: Stage,
    carried: list[dict],
    token_masks: list[torch.Tensor | None],
    group: Any,
) -> dict[str, Any]:
    """The stage's statistics: its observers in, every batch's carried values through the stage (with its token
    mask), the sums all-reduced under a process group, observers out."""
    groups = {g["tensor_fqn"]: g for g in sparsifier.groups if g["tensor_fqn"] in stage.tensor_fqns}
    factories = {fqn: functools.partial(calibration_observer, sparsifier, g) for fqn, g in groups.items()}
    observers = insert_input_observers(gm, factories)

    def run() -> int:
        try:
            for env, mask in zip(carried, token_masks):
                apply_token_mask(observers, mask)
                runner.run(stage, env)
        finally:
            apply_token_mask(observers, None)
        return len(carried)

    try:
        run_observed(observers, run, group)
    finally:
        remove_input_observers(gm)
        runner.forget_constants()
    return {fqn: calibration_statistic(sparsifier, groups[fqn], o) for fqn, o in observers.items()}


def prune_sequential(
    gm: fx.GraphModule,
    batches: Iterable[Any],
    *,
    blocks: Sequence[str] | None = None,
    weights: SafetensorsWeights | None = None,
    keep_statistics: bool = False,
    token_mask: TokenMask = "attention_mask",
    distributed: Any = None,
    progress_bar: bool = True,
) -> SequentialReport:
    """Calibrate and prune ``gm`` one block at a time, each block on the outputs of the pruned blocks before it.

    The graph is cut into stages: each block, and the nodes outside the blocks
    before, between and after them (embeddings before, final norm and head
    after). The batches are read once; then, for each stage in order:

    1. its sparsifier observers are inserted (as :func:`fx_sparsity.calibrate`
       would: input norms for Wanda and magnitude, Hessians for SparseGPT) and
       the stage runs on every batch's stored inputs;
    2. the statistics go to ``sparsifier.state[fqn]`` and ``step()`` runs for
       the stage's weights only (a sparsifier with a global threshold, such as
       ``GlobalMagnitudeSparsifier``, thresholds each stage on its own);
    3. the stage runs again, pruned, and its outputs replace its inputs (not
       for the last stage holding a sparsified weight: nothing after it runs).

    Layers outside every block are calibrated and pruned in the same way, in
    their place in the sequence: the embedding before the first block on the
    raw batches, the head after the last block on the pruned blocks' outputs.
    Whole-model :func:`fx_sparsity.calibrate` instead sees the dense model
    everywhere; with nothing pruned (``sparsity_level=0``) both give the same
    statistics and masks. Held at once: one stage's inputs and outputs for all
    batches plus its statistics (the returned report says how many bytes).

    OWL composes by levels: run :func:`fx_sparsity.calibrate` and
    :func:`fx_sparsity.levels.owl.set_owl_levels` on the dense model first (OWL's
    outlier ratios are a whole-model quantity), then ``prune_sequential``,
    which prunes each group at the level it was given. Statistics already in
    ``sparsifier.state`` are replaced stage by stage, and stay referenced until
    the run succeeds (the memory they take stays held during the run): if a
    stage fails (a batch the model cannot compute), ``sparsifier.state`` is as
    before the call, so ``step()`` still works. Masks (and SparseGPT's
    weights) of the stages stepped before the failure keep their new values,
    as do, without ``keep_statistics``, SparseGPT's weights stepped in the
    failing stage before the error (each is pruned and written in turn, its
    Hessian released, so that one Hessian is held at a time while a stage
    steps); a batch the first stage cannot compute fails before any step.

    Args:
        gm: a module returned by ``prepare`` (masks in place); its masks and,
            for SparseGPT, its own copies of the weights change. The user's
            model does not.
        batches: an iterable of inputs (tensor, tuple/list, or dict of keyword
            inputs), read once; at least one.
        blocks: the block modules, as FQNs or globs whose ``*`` stays within one
            name (``["model.layers.*"]``); default: found from the graph
            (:func:`passes.calibration.find_blocks`: the repeated indexed submodules).
        weights: for a module prepared on the meta device
            (:func:`fx_sparsity.calibration.streaming.prepare_on_meta`): where its weights
            are read from and the pruned ones go. Each stage's tensors are
            loaded just before it runs (masks start as ones) and, once it ran,
            its weights are written pruned (``weight * mask``, SparseGPT's
            updates included, in the checkpoint's dtype) and every tensor goes
            back to the meta device; the other tensors of the checkpoint are
            copied at the end, the index last. Stages after the last one
            holding a sparsified weight do not run. The checkpoint's headers
            and the output directory are checked before the first stage; a
            failed run puts ``gm``'s tensors back on the meta device and
            removes the shards it wrote (see :class:`SafetensorsWeights`).
        keep_statistics: leave every weight's statistic in ``sparsifier.state``
            as ``calibrate`` does; by default each weight's is released as it is
            stepped (``step(release_statistics=True)``), so that at most one
            stage's are held.
        token_mask: where a batch's ``[batch, seq]`` token mask comes from, as in
            :func:`fx_sparsity.calibrate`: padded positions enter no statistic.
        distributed: as in :func:`fx_sparsity.calibrate`: under an initialized
            process group each stage's statistics are all-reduced before its
            step, so every process prunes alike from its own share of the batches
            (each process must run every stage: give each at least one batch).
        progress_bar: show a progress bar over the stages on stderr.

    Returns:
        A :class:`SequentialReport`: the stages in order, their weights and the
        bytes each held.

    Raises:
        TypeError: ``batches`` is not an iterable or a batch has the wrong form;
            ``blocks`` is not a list of strings; the sparsifier is a
            ``ChannelPruner`` (its channel groups span blocks).
        ValueError: ``batches`` is empty; ``blocks`` names nothing, overlapping
            modules, or blocks that do not run one after another; a weight is
            read in two blocks; ``gm`` has meta tensors and no ``weights``;
            ``weights`` is given for a module not prepared on the meta device,
            lacks one of its tensors or holds one of another shape or of a
            dtype torch cannot read; ``weights``' output directory cannot be
            written. All raised before any mask changes and, with ``weights``,
            before anything is read from the checkpoint or written.

    Example::

        >>> from fx_sparsity.calibration.sequential import prune_sequential
        >>> gm = fx_sparsity.prepare(model, sparsifier=fx_sparsity.WandaSparsifier(0.5))
        >>> report = prune_sequential(gm, batches, progress_bar=False)  # blocks found: the Linears 0 and 2
        >>> report.blocks
        ('0', '(after 0)', '2')
        >>> gm.get_buffer("2.weight_mask").float().mean().item()
        0.5
    """
    sparsifier = get_sparsifier(gm)
    if isinstance(sparsifier, ChannelPruner):
        raise TypeError(
            "ChannelPruner couples channels of layers across blocks and cannot prune one block at a time: "
            "use fx_sparsity.calibrate and step() on the whole model"
        )
    check_batches(batches)
    check_token_mask_source(token_mask)
    fqns = [g["tensor_fqn"] for g in sparsifier.groups]
    stages = plan_stages(gm, _blocks(gm, blocks, fqns))
    last = max((i for i, s in enumerate(stages) if s.tensor_fqns), default=-1)
    stages = stages[: last + 1]
    streamer = _streamer(gm, weights, stages)
    runner = StageRunner(gm)
    reduce_over = process_group(distributed)
    carried: list[dict] = []
    token_masks: list[torch.Tensor | None] = []
    for i, batch in enumerate(batches):
        args, kwargs = fit_inputs(gm, batch, f"batch {i} of batches")
        token_masks.append(batch_token_mask(batch, token_mask, f"batch {i} of batches"))
        try:
            carried.append(runner.inputs(args, kwargs))
        except (TypeError, ValueError) as e:
            raise TypeError(f"batch {i} of batches does not fit the model's inputs: {e}") from e
    if not carried:
        raise ValueError("prune_sequential needs at least one batch; batches was empty")
    key = calibration_key(sparsifier)
    earlier = {f: sparsifier.state[f][key] for f in fqns if key in sparsifier.state.get(f, {})}
    if streamer is not None:
        streamer.begin()
    records = []
    try:
        with torch.no_grad(), eval_mode(gm):
            for index, stage in enumerate(progress(stages, progress_bar, "prune_sequential")):
                if streamer is not None:
                    streamer.load(index)
                input_bytes = carried_bytes(v for env in carried for v in env.values())
                statistic_bytes = 0
                if stage.tensor_fqns:
                    statistics = _calibrate(gm, sparsifier, runner, stage, carried, token_masks, reduce_over)
                    statistic_bytes = carried_bytes(statistics.values())
                    for fqn, statistic in statistics.items():
                        sparsifier.state[fqn][key] = statistic
                    del statistics
                    # Without keep_statistics each statistic is released as soon as its weight is stepped.
                    sparsifier.step(stage.tensor_fqns, release_statistics=not keep_statistics)
                if index < len(stages) - 1:  # the last stage hands nothing on
                    for j, env in enumerate(carried):
                        carried[j] = runner.run(stage, env)
                    runner.forget_constants()
                else:
                    carried = [{} for _ in carried]
                output_bytes = carried_bytes(v for env in carried for v in env.values())
                weight_bytes = 0
                if streamer is not None:
                    weight_bytes = streamer.loaded_bytes
                    streamer.release(index)
                records.append(
                    StageRecord(stage.name, stage.tensor_fqns, input_bytes, output_bytes, statistic_bytes, weight_bytes)
                )
        if streamer is not None:
            streamer.finish()
    except BaseException:
        for fqn in fqns:  # the statistics calibrate left stay usable: step() works as before the call
            if fqn in earlier:
                sparsifier.state[fqn][key] = earlier[fqn]
            else:
                sparsifier.state[fqn].pop(key, None)
        if streamer is not None:
            streamer.abort()
        raise
    if not keep_statistics:
        for fqn in fqns:
            sparsifier.state[fqn].pop(key, None)
    return SequentialReport(tuple(records))


def _streamer(gm: fx.GraphModule, weights: Any, stages: Sequence[Stage]) -> WeightStreamer | None:
    if weights is None:
        meta = [n for n, t in [*gm.named_parameters(), *gm.named_buffers()] if t.is_meta]
        if meta:
            raise ValueError(
                f"gm has tensors on the meta device ({meta[0]}, ...): pass weights=SafetensorsWeights(checkpoint, out=...) "
                "to load each block's weights while it is pruned"
            )
        return None
    if not isinstance(weights, SafetensorsWeights):
        raise TypeError(f"weights must be a SafetensorsWeights, got {type(weights).__name__}")
    return WeightStreamer(gm, weights, stages)
