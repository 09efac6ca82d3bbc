"""Package layering: no import circles, passes never imports fx_sparsity, a narrow public API, no private imports,
and every public name and module path of fx_sparsity 0.1.0 still resolving (deprecated where it moved)."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys
import warnings

import pytest

import fx_sparsity
import passes

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("passes", "fx_sparsity")

# fx_sparsity.__all__ and passes.__all__ of fx_sparsity 0.1.0.
OLD_FX_SPARSITY_NAMES = (
    "BACKENDS", "BaseScheduler", "BaseSparsifier", "CaptureError", "ChannelPruner", "CompareReport", "CubicSL",
    "GlobalMagnitudeSparsifier", "GroupView", "LambdaSL", "LayerError", "LayerLowering", "LayerSparsity",
    "MagnitudeSparsifier", "NMSparsifier", "NearlyDiagonalSparsifier", "SafetensorsWeights", "SequentialReport",
    "SparseGPTSparsifier", "SparsityConfig", "StageRecord", "TimedShrinkReport", "WandaSparsifier", "WeightGroup",
    "WeightNormSparsifier", "accumulate_gradients", "calibrate", "compare", "compare_table", "draw_graph",
    "get_lowering", "get_sparsifier", "get_unmatched", "graph_table", "layer_sparsity", "lower", "lowering_table",
    "nearly_diagonal_mask", "outlier_ratio", "owl_levels", "parse_config", "plot_compare", "plot_sparsity", "prepare",
    "prepare_on_meta", "print_compare", "print_graph_table", "print_lowering_table", "print_sparsity_table",
    "prune_sequential", "set_owl_levels", "shrink", "shrink_report", "sparsity_table", "to_model", "weight_norm_mask",
)
OLD_PASSES_NAMES = (
    "COMPONENT_NAMES", "CaptureError", "CapturedModule", "ChannelGroup", "FqnRule", "InputHessianObserver",
    "InputNormObserver", "InputObserver", "LAYOUTS", "LSTM_KIND", "Member", "NO_NATIVE_ENV", "ObserverFactory",
    "SPARSE_OPS", "SPARSITY_META_KEY", "ShrinkReport", "SparseFormat", "SparseTarget", "Stage", "StageRunner",
    "UnmatchedWeight", "WeightMatch", "accumulate_hessian", "all_reduce_observers", "capture", "carried_bytes",
    "clone_sharing_tensors", "conv_strides", "count_macs", "detect_nm", "find_blocks", "find_channel_groups",
    "find_lstm_weights", "find_masked_weights", "find_weights", "fqns_read", "fuse_masks", "get_sparse_target",
    "input_norm_observer", "input_rows", "insert_input_observers", "insert_masks", "is_pattern",
    "is_transposed_linear", "lower_sparse", "lowering_blocker", "lowering_blockers", "masked_lstm", "masked_targets",
    "match_blocks", "module_paths", "native_isa", "native_ops", "op_arguments", "op_kind", "plan_stages",
    "remove_input_observers", "select_weights", "set_tensor", "shrink_channels", "sparse_layer_forward", "split_fqn",
    "stage_tensors", "tensor_aliases", "token_rows", "unmatched_weights", "unsupported_reason", "weight_position",
)
# Module paths of 0.1.0 that pickles and state dicts name, with an object each must still give.
OLD_MODULE_OBJECTS = (
    ("passes.capture", "_new_captured"),
    ("passes.capture", "_Tracer"),
    ("passes.capture", "_InputShapeGuards"),
    ("passes.lstm_masks", "masked_lstm"),
    ("passes.meta", "SparseTarget"),
    ("passes.match", "UnmatchedWeight"),
    ("passes.dependency", "ChannelGroup"),
    ("passes.shrink", "ShrinkReport"),
    ("fx_sparsity.lower", "LayerLowering"),
    ("fx_sparsity.lower", "TimedShrinkReport"),
    ("fx_sparsity.user_model", "SourceModel"),
    ("fx_sparsity.sparsifier.group", "WeightGroup"),
    ("fx_sparsity.sparsifier.wanda", "WandaSparsifier"),
    ("fx_sparsity.sparsifier.structured", "ChannelPruner"),
    ("fx_sparsity.masks", "weight_norm_mask"),
    ("fx_sparsity.layer_timing", "last_level_cache_bytes"),
)


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> list[tuple[str, str]]:
    """``(module imported, name imported)`` for the runtime imports of ``name`` (``TYPE_CHECKING`` blocks skipped);
    name ``""`` for a whole module."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for n in ast.walk(node)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    found.append((f"{base}.{a.name}", ""))
                elif base in modules:
                    found.append((base, a.name))
    return found


def test_import_graph_has_no_cycle():
    """The runtime import graph of passes and fx_sparsity (a package imports what its __init__ imports) is acyclic."""
    modules = _modules()
    edges = {m: {imported for imported, _ in _imports(m, p, modules)} - {m} for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_no_module_imports_a_private_name_of_another():
    """``from x import _name`` across modules of the two packages is refused: what modules share is public."""
    modules = _modules()
    private = [(m, imported, name) for m, p in modules.items() for imported, name in _imports(m, p, modules)
               if name.startswith("_") and not name.startswith("__")]
    assert not private, private


def test_passes_does_not_import_fx_sparsity():
    """Importing passes loads no fx_sparsity module (and no passes module names one)."""
    modules = _modules()
    reaching = [(m, imported) for m, p in modules.items() if m.startswith("passes")
                for imported, _ in _imports(m, p, modules) if imported.startswith("fx_sparsity")]
    assert not reaching, reaching
    code = "import sys, passes; assert not [m for m in sys.modules if m.startswith('fx_sparsity')], sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_public_api_is_narrow_and_grouped():
    """fx_sparsity.__all__ holds at most 30 names and passes.__all__ fewer than 0.1.0's 68; every name exported by a
    package or namespace resolves there without a warning."""
    assert len(fx_sparsity.__all__) <= 30
    assert len(passes.__all__) < len(OLD_PASSES_NAMES) / 2
    for name in [n for n in _modules() if (ROOT / n.replace(".", "/") / "__init__.py").exists()]:
        module = importlib.import_module(name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for exported in getattr(module, "__all__", ()):
                getattr(module, exported)


@pytest.mark.parametrize("package, names", [(fx_sparsity, OLD_FX_SPARSITY_NAMES), (passes, OLD_PASSES_NAMES)])
def test_every_0_1_0_public_name_resolves(package, names):
    """Every name of 0.1.0's __all__ still resolves: kept, or moved to a namespace with a DeprecationWarning naming
    the new home, which holds the very same object."""
    for name in names:
        if name in package.__all__:
            getattr(package, name)
            continue
        with pytest.warns(DeprecationWarning, match=rf"{package.__name__}\.{name} is deprecated: use ([\w.]+)") as record:
            value = getattr(package, name)
        home = str(record[0].message).split("use ")[1].split(" ")[0]
        module, _, attr = home.rpartition(".")
        assert getattr(importlib.import_module(module), attr) is value


@pytest.mark.parametrize("module, name", OLD_MODULE_OBJECTS)
def test_0_1_0_module_paths_resolve(module, name):
    """The module paths that saved files of 0.1.0 name still import and give their objects (with a
    DeprecationWarning where the module moved); importing the old module ``fx_sparsity.lower`` leaves the function."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        value = getattr(importlib.import_module(module), name)
    assert value is not None
    assert callable(fx_sparsity.lower) and callable(fx_sparsity.calibrate) and callable(passes.capture)
