"""Recipes over the stages. ``oneshot``: one call from a model and calibration data to the pruned model in its
own class, with its report.

The recipe, over the public pieces (in the spirit of llm-compressor's ``oneshot``):

1. the data: tokenized batches as they are, or strings tokenized one per batch with ``tokenizer``
   (``truncation`` to ``max_length``);
2. the sparsifier ``method`` names, at ``sparsity`` (``"50%"``, ``0.5``, ``"2:4"``), on every Linear
   weight but a transformers model's output embedding (the head: SparseGPT's and Wanda's recipes
   leave it dense), or the weights ``config`` selects;
3. :func:`fx_sparsity.prepare` on the first batch, then :func:`fx_sparsity.prune_sequential` (block by
   block, each block calibrated on the pruned blocks before it; the default) or
   :func:`fx_sparsity.calibrate` and ``step()`` (``sequential=False``);
4. the pruned model in its own class (:func:`fx_sparsity.to_model`, or
   :func:`fx_sparsity.sparsify_model` with ``sparse_format``), and :func:`fx_sparsity.compare` against
   the dense model on the calibration batches;
5. with ``output_dir``, the model saved: a compressed checkpoint
   (:func:`fx_sparsity.deploy.save_sparse`) for sparse layers, ``save_pretrained`` for a dense
   transformers model; written under a temporary name and renamed, so the folder exists only complete.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import fx, nn

from fx_sparsity.calibration.sequential import SequentialReport, prune_sequential
from fx_sparsity.calibration.statistics import calibrate
from fx_sparsity.config import SparsityConfig
from fx_sparsity.deploy.checkpoint import save_sparse
from fx_sparsity.deploy.resized import is_transformers_model
from fx_sparsity.deploy.user_model import sparsify_model, to_model
from fx_sparsity.preparation import prepare
from fx_sparsity.report.comparison import CompareReport, compare
from fx_sparsity.sparsifier.base import BaseSparsifier
from fx_sparsity.sparsifier.magnitude import MagnitudeSparsifier
from fx_sparsity.sparsifier.nm import NMSparsifier
from fx_sparsity.sparsifier.sparsegpt import SparseGPTSparsifier
from fx_sparsity.sparsifier.wanda import WandaSparsifier
from fx_sparsity.utils.safetensors_files import fsync_dir

__all__ = ["oneshot", "OneshotResult", "METHODS", "parse_sparsity", "default_config", "check_output_dir", "save_model"]

METHODS = ("sparsegpt", "wanda", "magnitude")


@dataclasses.dataclass(frozen=True)
class OneshotResult:
    """What :func:`oneshot` made.

    Attributes:
        model: the pruned model, of the input model's class (sparse layers with ``sparse_format``).
        prepared: the prepared ``GraphModule`` (masks, sparsifier), for further steps or ``lower``.
        report: :func:`fx_sparsity.compare` of the dense model and ``model`` on the calibration batches.
        sequential: the :class:`~fx_sparsity.calibration.SequentialReport` (``None`` with ``sequential=False``).
        output_dir: where the model was saved, or ``None``.
    """

    model: nn.Module
    prepared: fx.GraphModule
    report: CompareReport
    sequential: SequentialReport | None
    output_dir: Path | None

    def __str__(self) -> str:
        saved = f"; saved to {self.output_dir}" if self.output_dir is not None else ""
        return f"oneshot: {type(self.model).__name__}{saved}\n{self.report}"


def parse_sparsity(sparsity: Any) -> float | tuple[int, int]:
    """``"50%"`` or ``0.5`` -> ``0.5``; ``"2:4"`` or ``(2, 4)`` -> ``(2, 4)``.

    Raises:
        TypeError/ValueError: anything else, naming the value and the accepted forms.

    Example::

        >>> parse_sparsity("50%"), parse_sparsity("2:4"), parse_sparsity(0.7)
        (0.5, (2, 4), 0.7)
    """
    forms = "a fraction in [0, 1) (0.5), a percentage ('50%') or N:M ('2:4')"
    if isinstance(sparsity, bool):
        raise TypeError(f"sparsity must be {forms}, got {sparsity!r}")
    if isinstance(sparsity, str):
        text = sparsity.strip()
        if m := re.fullmatch(r"(\d+)\s*:\s*(\d+)", text):
            sparsity = (int(m[1]), int(m[2]))
        elif m := re.fullmatch(r"(\d+(?:\.\d*)?)\s*%", text):
            sparsity = float(m[1]) / 100
        else:
            raise ValueError(f"sparsity must be {forms}, got {sparsity!r}")
    if isinstance(sparsity, tuple):
        n, m = sparsity if len(sparsity) == 2 else (None, None)
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise ValueError(f"sparsity N:M needs whole numbers 0 < N < M (2:4 keeps 2 of every 4), got {sparsity!r}")
        return (n, m)
    if isinstance(sparsity, (int, float)):
        if not 0 <= float(sparsity) < 1:
            raise ValueError(f"sparsity must be in [0, 1) as a fraction (or '50%'), got {sparsity!r}")
        return float(sparsity)
    raise TypeError(f"sparsity must be {forms}, got {type(sparsity).__name__}")


def _sparsifier(method: str, sparsity: float | tuple[int, int]) -> BaseSparsifier:
    nm = sparsity if isinstance(sparsity, tuple) else None
    if method == "sparsegpt":
        return SparseGPTSparsifier(nm=nm) if nm else SparseGPTSparsifier(sparsity)
    if method == "wanda":
        return WandaSparsifier(nm=nm) if nm else WandaSparsifier(sparsity)
    return NMSparsifier(*nm) if nm else MagnitudeSparsifier(sparsity)


def default_config(model: nn.Module) -> SparsityConfig:
    """Every Linear-like weight but a transformers model's output embedding (and what is tied to it), as the
    SparseGPT and Wanda recipes prune LLMs; ``None`` (every Linear and Conv) for other models."""
    if not is_transformers_model(model) or model.get_output_embeddings() is None:
        return None
    head = model.get_output_embeddings().weight
    names = []
    for fqn, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is head or not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer
            names.append(f"{fqn}.weight")
    return names


def _batches(data: Any, tokenizer: Any, max_length: int) -> list[Any]:
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a list of strings (with tokenizer=) or of model inputs (tokenizer outputs, tensors), got "
            f"{type(data).__name__}{'; wrap one text in a list: [text]' if isinstance(data, str) else ''}"
        )
    data = list(data)
    if not data:
        raise ValueError("data is empty: give at least one calibration text or batch")
    texts = [isinstance(d, str) for d in data]
    if any(texts) and not all(texts):
        raise TypeError("data mixes strings and other inputs: give only texts (with tokenizer=) or only batches")
    if not all(texts):
        return data
    if tokenizer is None:
        raise ValueError("data holds strings: pass tokenizer= (e.g. transformers.AutoTokenizer.from_pretrained(path)) "
                         "to turn them into input_ids")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be callable as a transformers tokenizer, got {type(tokenizer).__name__}")
    batches = []
    for i, text in enumerate(data):
        encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
        batch = {k: v for k, v in dict(encoded).items() if k in ("input_ids", "attention_mask")}
        if "input_ids" not in batch or batch["input_ids"].numel() == 0:
            raise ValueError(f"data[{i}] tokenizes to no tokens ({text[:40]!r}); drop empty texts")
        batches.append(batch)
    return batches


def check_output_dir(output_dir: Any, name: str = "output_dir") -> Path | None:
    """``output_dir`` as a ``Path`` (``None`` stays ``None``), refused unless it is new or an empty folder.

    Raises:
        TypeError: not a path. ValueError: a file, or a folder holding files (never written over).
    """
    if output_dir is None:
        return None
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        raise TypeError(f"{name} must be a path, got {output_dir!r:.60}")
    folder = Path(output_dir)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{name} {str(folder)!r} exists and is not an empty folder; give a new path (nothing is "
                         "written over)")
    return folder


def save_model(model: nn.Module, folder: Path, sparse: bool) -> Path:
    """``model`` into ``folder`` (checked by :func:`check_output_dir`): a compressed checkpoint
    (:func:`fx_sparsity.deploy.save_sparse`) when ``sparse`` or the model is not a transformers one, else
    ``save_pretrained``; written into a temporary sibling folder renamed at the end, so ``folder`` exists only
    complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.partial")
    try:
        if sparse or not is_transformers_model(model):
            save_sparse(model, temporary)
        else:
            model.save_pretrained(temporary)
        if folder.exists():
            folder.rmdir()  # empty, checked before pruning
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    fsync_dir(folder.parent)
    return folder


def oneshot(
    model: nn.Module,
    data: Iterable[Any] | Sequence[str],
    *,
    method: str = "sparsegpt",
    sparsity: str | float | tuple[int, int] = "50%",
    tokenizer: Any = None,
    max_length: int = 2048,
    config: SparsityConfig = None,
    sequential: bool = True,
    sparse_format: Any = None,
    output_dir: str | os.PathLike | None = None,
    progress_bar: bool = True,
) -> OneshotResult:
    """Prune ``model`` in one shot on calibration ``data`` and return it in its own class, with a quality report.

    Args:
        model: the dense model (a transformers causal LM, or any module :func:`fx_sparsity.prepare` takes);
            not modified.
        data: calibration texts (with ``tokenizer``; one batch each) or batches of model inputs (dicts a
            tokenizer returns, tensors, tuples), as :func:`fx_sparsity.calibrate` takes them. The first is the
            example input of the capture.
        method: ``"sparsegpt"`` (default), ``"wanda"`` or ``"magnitude"``.
        sparsity: ``"50%"``/``0.5`` (unstructured) or ``"2:4"`` (N:M).
        tokenizer: a transformers tokenizer (any callable returning ``input_ids``), for texts.
        max_length: texts are truncated to this many tokens.
        config: the weights to prune (:func:`fx_sparsity.prepare`'s ``config``); default every Linear weight but
            a transformers model's output embedding.
        sequential: block by block (:func:`fx_sparsity.prune_sequential`, the default), else whole-model
            :func:`fx_sparsity.calibrate` then ``step()``.
        sparse_format: ``None`` for dense weights holding zeros (:func:`fx_sparsity.to_model`), or a
            :func:`fx_sparsity.sparsify_model` backend (``"auto"``, ``"bitmask"``, ``"nm"``, ``"csr"``, per layer)
            for sparse layers running our kernels.
        output_dir: a new (or empty) folder to save the model in: a compressed checkpoint for sparse layers
            (and for models that are not transformers'), ``save_pretrained`` for a dense transformers model.
        progress_bar: tqdm bars for calibration and pruning.

    Returns:
        An :class:`OneshotResult` (``print(result)`` shows the report).

    Raises:
        TypeError/ValueError: a bad ``method``, ``sparsity``, ``data``, ``tokenizer``, ``max_length`` or
            ``output_dir``, before any work.

    Example::

        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        >>> result = oneshot(model, [torch.randn(4, 16) for _ in range(4)], method="wanda", sparsity="50%",
        ...                  progress_bar=False)
        >>> type(result.model).__name__, (result.model[0].weight == 0).float().mean().item()
        ('Sequential', 0.5)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    level = parse_sparsity(sparsity)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    folder = check_output_dir(output_dir)
    batches = _batches(data, tokenizer, max_length)
    sparsifier = _sparsifier(method, level)
    config = default_config(model) if config is None else config
    with warnings.catch_warnings():
        # One text per batch is batch 1, which export specialises: the returned model (the user's class) runs
        # any batch; only result.prepared keeps the capture's batch size.
        warnings.filterwarnings("ignore", message=".*captured with torch.export for batch size", category=UserWarning)
        gm = prepare(model, config, sparsifier=sparsifier, example_inputs=batches[0])
    report = None
    if sequential:
        report = prune_sequential(gm, batches, progress_bar=progress_bar)
    else:
        if getattr(sparsifier, "calibration_key", None) is not None:  # Wanda and SparseGPT need statistics
            calibrate(gm, batches, progress_bar=progress_bar)
        sparsifier.step()
    pruned = to_model(gm) if sparse_format is None else sparsify_model(
        gm, sparse_format, example_inputs=batches[0], progress_bar=progress_bar)
    quality = compare(model, pruned, batches)
    saved = save_model(pruned, folder, sparse_format is not None) if folder is not None else None
    return OneshotResult(pruned, gm, quality, report, saved)
