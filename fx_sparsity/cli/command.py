"""``fx-sparsity`` / ``python -m fx_sparsity``: the whole flow on one model.

capture -> match -> insert masks -> (calibrate) -> step -> print tables -> lower
(and, with ``--export``, torch.export.save and reload) -> (with ``--eval``, the
per-layer error of the prepared and lowered forms against the dense model) ->
squash -> check every stage's output against the eager model with the pruned
weights -> one-line verdict.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fx_sparsity.calibration.statistics import calibrate
from fx_sparsity.cli.demo_models import load_model
from fx_sparsity.deploy.checkpoint import load_sparse
from fx_sparsity.deploy.resized import is_transformers_model
from fx_sparsity.deploy.user_model import sparsify_model, to_model
from fx_sparsity.lowering.backends import BACKENDS
from fx_sparsity.lowering.recipe import lower
from fx_sparsity.meta import get_lowering
from fx_sparsity.preparation import prepare
from fx_sparsity.recipes import check_output_dir, default_config, save_model
from fx_sparsity.report.comparison import compare, compare_table
from fx_sparsity.report.tables import graph_table, lowering_table, sparsity_table
from fx_sparsity.sparsifier.base import BaseSparsifier
from fx_sparsity.sparsifier.magnitude.sparsifier import GlobalMagnitudeSparsifier, MagnitudeSparsifier
from fx_sparsity.sparsifier.nm.sparsifier import NMSparsifier
from fx_sparsity.sparsifier.sparsegpt.sparsifier import SparseGPTSparsifier
from fx_sparsity.sparsifier.wanda.sparsifier import WandaSparsifier
from fx_sparsity.sparsifier.weight_norm.sparsifier import WeightNormSparsifier
from passes.capturing import CaptureError
from passes.lowering import QUANT_LAYOUTS
from passes.meta import get_capture

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAIL", "EXIT_USAGE"]

_DEFAULT_SHAPES = {"demo": (2, 3, 32, 32)}
_HF_SHAPE = (2, 64)
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
# BSR block size when --blocksize is not given and --block-shape is not square (MKL takes square blocks only).
DEFAULT_BSR_BLOCKSIZE = 2


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,3,224,224, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"dimensions must be positive, got {text!r}")
    return dims


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _block(text: str) -> tuple[int, int]:
    dims = _shape(text)
    if len(dims) != 2:
        raise argparse.ArgumentTypeError(f"block shape is ROWSxCOLS like 1x4, got {text!r}")
    return dims[0], dims[1]


def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:M like 2:4, got {text!r}") from None
    return n, m


METHODS = ("weight-norm", "magnitude", "global", "nm", "wanda", "sparsegpt")
# Methods that need calibration batches before step().
CALIBRATED = ("wanda", "sparsegpt")


def _sparsifier(args: argparse.Namespace) -> BaseSparsifier:
    if args.method == "weight-norm":
        return WeightNormSparsifier(args.sparsity_level, args.block_shape, args.zeros_per_block)
    if args.method == "magnitude":
        return MagnitudeSparsifier(args.sparsity_level)
    if args.method == "global":
        return GlobalMagnitudeSparsifier(args.sparsity_level)
    if args.method == "nm":
        return NMSparsifier(*(args.nm or (2, 4)))
    if args.method == "sparsegpt":
        return SparseGPTSparsifier(args.sparsity_level, nm=args.nm)
    return WandaSparsifier(args.sparsity_level, nm=args.nm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fx-sparsity",
        description="Sparsify a model's Linear and Conv weights with explicit masks in its FX graph, "
        "then check the result against the eager model.",
    )
    parser.add_argument("--model", default="demo",
                        help="'demo' (built in, the default), 'torchvision:<name>', 'hf:<folder>' (a transformers "
                        "causal LM that save_pretrained wrote, or a config.json or a folder with one and no weights: "
                        "random init; its inputs are random token ids) or "
                        "'path/file.py:ClassName'")
    parser.add_argument("--input-shape", type=_shape, default=None,
                        help="example input shape, e.g. 1,3,224,224 (default: 2,3,32,32 for demo, "
                        f"1,3,224,224 for torchvision, BATCH,TOKENS {_HF_SHAPE[0]},{_HF_SHAPE[1]} for hf; required "
                        "for file models)")
    parser.add_argument("--method", choices=METHODS, default="weight-norm",
                        help="weight-norm (blocks, torch.ao.pruning's), magnitude (per layer), global (one "
                        "threshold), nm (N:M), wanda (|W| x input norm, calibrated), sparsegpt (optimal brain "
                        "surgeon: masks and updated weights, calibrated); default weight-norm")
    parser.add_argument("--sparsity-level", type=_level, default=0.5,
                        help="fraction of blocks (weight-norm) or weights to sparsify (default 0.5)")
    parser.add_argument("--block-shape", type=_block, default=(1, 4),
                        help="weight-norm: sparse block ROWSxCOLS (default 1x4)")
    parser.add_argument("--zeros-per-block", type=int, default=None,
                        help="weight-norm: zeros in each sparse block (default: the whole block)")
    parser.add_argument("--nm", type=_nm, default=None,
                        help="N:M pattern like 2:4, for --method nm (default 2:4), wanda or sparsegpt (default: "
                        "unstructured)")
    parser.add_argument("--calibration-batches", type=int, default=4,
                        help="wanda, sparsegpt: random batches of --input-shape to calibrate on; also the number "
                        "of --eval batches (default 4)")
    parser.add_argument("--eval", action="store_true",
                        help="print each layer's relative output error of the prepared and lowered modules "
                        "against the dense model, on --calibration-batches fresh random batches")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # The quantized layouts change the numbers, which the run's checks against the masked eager model refuse.
    parser.add_argument("--backend", choices=[b for b in BACKENDS if b not in QUANT_LAYOUTS], default="fuse",
                        help="lowering backend for every masked layer (default fuse; auto times each layer)")
    parser.add_argument("--blocksize", type=_positive_int, default=None,
                        help="BSR block size for --backend bsr or auto (default for bsr: --block-shape when "
                        f"square, else {DEFAULT_BSR_BLOCKSIZE})")
    parser.add_argument("--export", metavar="PATH", default=None,
                        help="torch.export the lowered module and torch.export.save it to PATH (.pt2)")
    parser.add_argument("--save", metavar="DIR", default=None,
                        help="save the pruned model in its own class to the new (or empty) folder DIR: with a "
                        "sparse --backend, its layers as sparse modules in a compressed checkpoint "
                        "(fx_sparsity.deploy.load_sparse reads it); with fuse, dense weights holding zeros "
                        "(save_pretrained for hf models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-graph", action="store_true", help="do not print the graph table")
    return parser


def _input_shape(args: argparse.Namespace) -> tuple[int, ...]:
    if args.input_shape is not None:
        return args.input_shape
    if args.model in _DEFAULT_SHAPES:
        return _DEFAULT_SHAPES[args.model]
    if args.model.startswith("torchvision:"):
        return (1, 3, 224, 224)
    if args.model.startswith("hf:"):
        return _HF_SHAPE
    raise ValueError(f"--input-shape is required for --model {args.model}")


def _check_args(args: argparse.Namespace) -> None:
    """Option combinations that cannot work, refused before anything runs."""
    if args.nm is not None and args.method not in ("nm", *CALIBRATED):
        raise ValueError(f"--nm applies to --method nm, wanda or sparsegpt, not {args.method}: add --method nm")
    if args.calibration_batches < 1:
        raise ValueError(f"--calibration-batches must be at least 1, got {args.calibration_batches}")
    if args.blocksize is not None and args.backend not in ("bsr", "auto"):
        raise ValueError(f"--blocksize applies to --backend bsr or auto, not {args.backend}")
    if args.export is not None:
        _check_export_path(args.export)
    if args.save is not None:
        try:
            check_output_dir(args.save, "--save")
        except (TypeError, ValueError) as e:
            raise ValueError(str(e)) from None


def _temporary_path(path: str) -> str:
    """Where :func:`_save_exported` writes before renaming onto ``path``: a hidden file beside it."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


def _check_export_path(path: str) -> None:
    """Refuse an ``--export`` path the run could not write, before the run. The file is opened for appending
    (which leaves an existing file as it was; one this check creates is removed again), and so is the temporary
    file the save renames from. ``os.access`` is not enough: it says yes to root where writing fails."""
    if not path:
        raise ValueError("--export is empty: give the file to write, e.g. --export model.pt2")
    if os.path.isdir(path):
        raise ValueError(
            f"--export {path} is a folder: give the file to write in it, e.g. --export {os.path.join(path, 'model.pt2')}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--export {path}: the folder {folder} does not exist; create it first")
    for candidate in (path, _temporary_path(path)):
        existed = os.path.lexists(candidate)
        try:
            with open(candidate, "ab"):
                pass
        except OSError as e:
            raise ValueError(f"--export {path} cannot be written ({e.strerror or e}); choose another path") from None
        if not existed:
            os.remove(candidate)


def _save_exported(program: torch.export.ExportedProgram, path: str) -> None:
    """``torch.export.save`` to a temporary file beside ``path``, fsync'd, then renamed onto ``path``: a killed or
    failed run leaves no file at ``path`` that could be taken for a finished export."""
    temporary = _temporary_path(path)
    try:
        with open(temporary, "wb") as f:
            torch.export.save(program, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _masked_reference(model: torch.nn.Module, gm: torch.fx.GraphModule, sparsifier: BaseSparsifier) -> torch.nn.Module:
    """An eager copy of ``model`` holding ``weight * mask`` of the prepared module (SparseGPT's updated weights too)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for record in sparsifier.records:
            fqn = record.tensor_fqn
            reference.get_parameter(fqn).copy_(gm.get_parameter(fqn) * gm.get_buffer(f"{fqn}_mask"))
    return reference


def _lower_backend(args: argparse.Namespace) -> str | dict[str, dict[str, object]]:
    blocksize = args.blocksize
    if blocksize is None and args.backend == "bsr":
        rows, cols = args.block_shape
        blocksize = rows if rows == cols and args.method == "weight-norm" else DEFAULT_BSR_BLOCKSIZE
    if blocksize is None:
        return args.backend
    return {"*": {"backend": args.backend, "blocksize": blocksize}}


def _print_eval(
    args: argparse.Namespace, model: torch.nn.Module, forms: dict[str, torch.nn.Module], example: torch.Tensor
) -> None:
    """The per-layer error table of ``forms`` against the dense ``model`` on fresh random batches."""
    batches = [_random_inputs(model, example.shape) for _ in range(args.calibration_batches)]
    reports = {name: compare(model, form, batches) for name, form in forms.items()}
    print(f"\nrelative error of each layer's output against the dense model ({len(batches)} random batches of "
          f"shape {tuple(example.shape)}, not the calibration batches):")
    print(compare_table(reports))


def _random_inputs(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """Random token ids below the vocabulary size for a transformers model, else a standard normal tensor."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) if is_transformers_model(model) else None
    return torch.randint(0, vocab, shape) if vocab else torch.randn(shape)


def _tensor(output: object) -> torch.Tensor:
    """The tensor a check compares: a transformers output's logits, a tuple's first tensor."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output  # type: ignore[return-value]


def _skeleton(model: torch.nn.Module) -> torch.nn.Module | None:
    """What load_sparse builds a plain module's checkpoint into: a copy of the model (a transformers one is built
    from its config.json)."""
    return None if is_transformers_model(model) else copy.deepcopy(model)


def _save_and_load(args: argparse.Namespace, gm: torch.fx.GraphModule, lowered: torch.fx.GraphModule,
                   example: torch.Tensor) -> torch.nn.Module:
    """The pruned model in its own class saved to ``--save`` (sparse modules in the formats ``lowered`` chose per
    layer, or, all fused, dense weights holding zeros), and loaded back from there."""
    choices = [{"tensor_fqn": r.tensor_fqn, "backend": r.backend, **({"blocksize": r.blocksize} if r.blocksize else {})}
               for r in get_lowering(lowered)]
    sparse = any(c["backend"] != "fuse" for c in choices)
    model = sparsify_model(gm, choices, example_inputs=(example,), progress_bar=False) if sparse else to_model(gm)
    folder = save_model(model, Path(args.save), sparse=sparse)
    pretrained = is_transformers_model(model) and not sparse
    what = "save_pretrained's folder" if pretrained else "a compressed checkpoint (fx_sparsity.deploy.load_sparse)"
    print(f"\npruned {type(model).__name__} saved to {folder}: {what}")
    return type(model).from_pretrained(folder) if pretrained else load_sparse(folder, model=_skeleton(model))


def _run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model = load_model(args.model).eval()
    example = _random_inputs(model, _input_shape(args))
    sparsifier = _sparsifier(args)
    try:
        with torch.no_grad():
            dense_out = _tensor(model(example))
    except Exception as e:  # the model's own error: almost always an input of the wrong shape
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(
            f"{type(model).__name__} failed on an input of shape {tuple(example.shape)} "
            f"({type(e).__name__}: {first}); check --input-shape"
        ) from None
    with torch.no_grad():
        # A transformers model keeps its head (the output embedding, often tied to the input one) dense.
        gm = prepare(model, default_config(model), sparsifier=sparsifier, example_inputs=(example,))
        checks = {"prepared (all-ones masks) == dense": (_tensor(gm(example)), dense_out)}
        if args.method in CALIBRATED:
            batches = [_random_inputs(model, example.shape) for _ in range(args.calibration_batches)]
            calibrate(gm, batches, progress_bar=not args.no_progress)
        sparsifier.step()
        print(f"model: {args.model} ({type(model).__name__}), captured with {get_capture(gm).method}\n")
        print(sparsity_table(gm))
        if not args.no_graph:
            print("\n" + graph_table(gm))
        reference = _tensor(_masked_reference(model, gm, sparsifier)(example))
        checks["prepared == masked eager"] = (_tensor(gm(example)), reference)
        lowered = lower(gm, _lower_backend(args), example_inputs=(example,), progress_bar=not args.no_progress)
        print("\n" + lowering_table(lowered))
        checks[f"lowered ({args.backend}) == masked eager"] = (_tensor(lowered(example)), reference)
        if args.export is not None:
            _save_exported(torch.export.export(lowered, (example,)), args.export)
            checks["exported, saved and loaded == masked eager"] = (
                _tensor(torch.export.load(args.export).module()(example)), reference
            )
            extra = (" and `import transformers.modeling_outputs` (the output types of a transformers model)"
                     if is_transformers_model(model) else "")
            print(f"\nexported program written to {args.export}; load it where fx_sparsity is installed, "
                  f"after `import fx_sparsity` (which registers the fx_sparsity:: operators it calls){extra}")
        if args.eval:
            _print_eval(args, model, {"prepared": gm, f"lowered ({args.backend})": lowered}, example)
        if args.save is not None:
            loaded = _save_and_load(args, gm, lowered, example)
            checks["saved and loaded == masked eager"] = (_tensor(loaded.eval()(example)), reference)
        sparsifier.squash_mask()
        checks["squashed == masked eager"] = (_tensor(gm(example)), reference)
    failures = []
    worst = 0.0
    for name, (actual, expected) in checks.items():
        worst = max(worst, (actual - expected).abs().max().item())
        try:
            torch.testing.assert_close(actual, expected)
        except AssertionError as e:
            failures.append(f"{name}: {str(e).splitlines()[0]}")
    print()
    if failures:
        print("FAIL: " + "; ".join(failures))
        return EXIT_FAIL
    print(f"OK: {len(sparsifier.groups)} weights masked, lowered ({args.backend}) and squashed; outputs match "
          f"the masked eager reference (max abs diff {worst:.2e})")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns :data:`EXIT_OK`, :data:`EXIT_FAIL` (outputs differ) or :data:`EXIT_USAGE` (a user
    error, reported in one line on stderr; argparse's own errors exit with 2 as well)."""
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        return _run(args)
    except (ValueError, TypeError, CaptureError) as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"fx-sparsity: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
