"""Pictures: sparsity and error bar charts (matplotlib) and the prepared graph with its masks highlighted (pydot),
checked on the data they draw; clear errors when the optional packages or Graphviz are missing."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from torch import nn

import fx_sparsity
from fx_sparsity import MagnitudeSparsifier, WandaSparsifier, prepare
from fx_sparsity.calibration import calibrate
from fx_sparsity.report import compare, draw_graph, layer_sparsity, plot_compare, plot_sparsity
from fx_sparsity.report.plots import MASK_COLOR, MASKED_OP_COLOR
from helpers import ThreeLinear


def wanda_three_linear(levels=(0.5, 0.75, 0.25)):
    """ThreeLinear pruned by Wanda with a level per layer."""
    torch.manual_seed(0)
    model = ThreeLinear()
    config = {name: {"sparsity_level": level} for name, level in zip("abc", levels)}
    gm = prepare(model, config, sparsifier=WandaSparsifier())
    batches = [torch.randn(8, 24) for _ in range(2)]
    calibrate(gm, batches, progress_bar=False)
    fx_sparsity.get_sparsifier(gm).step()
    return model, gm, batches


def bar_heights(container) -> list[float]:
    return [patch.get_height() for patch in container.patches]


def test_layer_sparsity_is_what_the_masks_hold():
    """layer_sparsity: per layer the level asked and the zeros counted in each mask by hand."""
    _, gm, _ = wanda_three_linear()
    layers = layer_sparsity(gm)
    assert [layer.label for layer in layers] == ["a", "b", "c"]
    assert [layer.target for layer in layers] == [0.5, 0.75, 0.25]
    for layer in layers:
        mask = gm.get_buffer(f"{layer.tensor_fqn}_mask")
        assert (layer.nonzeros, layer.total) == (int(mask.count_nonzero()), mask.numel())
        assert layer.achieved == layer.target


def test_plot_sparsity_draws_targets_and_achieved(tmp_path):
    """plot_sparsity on ThreeLinear (levels 0.5, 0.75, 0.25): two bar containers whose heights are the targets and
    the zeros counted in the masks, tick labels the layers; the PNG is written."""
    pytest.importorskip("matplotlib")
    _, gm, _ = wanda_three_linear()
    path = tmp_path / "sparsity.png"
    figure = plot_sparsity(gm, path)
    (axes,) = figure.axes
    target, achieved = axes.containers
    assert bar_heights(target) == [0.5, 0.75, 0.25]
    counted = [1 - int(gm.get_buffer(f"{n}.weight_mask").count_nonzero()) / gm.get_buffer(f"{n}.weight_mask").numel()
               for n in "abc"]
    assert bar_heights(achieved) == pytest.approx(counted, abs=0)
    assert [t.get_text() for t in axes.get_xticklabels()] == ["a", "b", "c"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_compare_draws_each_forms_errors(tmp_path):
    """plot_compare of the prepared and csr-lowered forms: one bar container per form whose heights are the report's
    layer errors then the output error; a single report works too; mismatched reports raise."""
    pytest.importorskip("matplotlib")
    model, gm, batches = wanda_three_linear()
    reports = {"prepared": compare(model, gm, batches), "csr": compare(model, fx_sparsity.lower(gm, "csr"), batches)}
    figure = plot_compare(reports, tmp_path / "errors.svg")
    (axes,) = figure.axes
    assert len(axes.containers) == 2
    for container, report in zip(axes.containers, reports.values()):
        expected = [e.relative_error for e in report.layers] + [report.output_error]
        assert bar_heights(container) == pytest.approx(expected, rel=1e-12)
    assert axes.get_yscale() == "log"
    assert (tmp_path / "errors.svg").read_text().lstrip().startswith("<?xml")
    assert len(plot_compare(reports["prepared"]).axes[0].containers) == 1
    with pytest.raises(ValueError, match="lists other layers"):
        plot_compare({"x": reports["prepared"], "y": compare(model, gm, batches, layers=["a"])})
    with pytest.raises(TypeError, match="CompareReport"):
        plot_compare({})


def test_without_matplotlib_the_error_says_what_to_install(monkeypatch, tmp_path):
    """With matplotlib unimportable: ImportError naming pip install matplotlib, and nothing written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    gm = prepare(ThreeLinear(), sparsifier=MagnitudeSparsifier(0.5))
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_sparsity(gm, tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_bad_paths():
    """A path in a missing folder, or not a path: ValueError / TypeError naming it."""
    gm = prepare(ThreeLinear(), sparsifier=MagnitudeSparsifier(0.5))
    with pytest.raises(ValueError, match="the folder /no/such does not exist"):
        plot_sparsity(gm, "/no/such/s.png")
    with pytest.raises(TypeError, match="path must be a file path"):
        draw_graph(gm, 3)
    with pytest.raises(TypeError, match="gm must be a GraphModule"):
        draw_graph(nn.Linear(2, 2))


def test_draw_graph_highlights_the_masks(tmp_path):
    """draw_graph of prepared ThreeLinear: exactly the 3 mask muls and 3 mask buffers are MASK_COLOR, the 3 linears
    MASKED_OP_COLOR, every other node keeps FxGraphDrawer's colour; the .dot file holds that source."""
    pytest.importorskip("pydot")
    gm = prepare(ThreeLinear(), sparsifier=MagnitudeSparsifier(0.5))
    path = tmp_path / "g.dot"
    dot = draw_graph(gm, path)
    colors = {n.get_name(): n.get("fillcolor").strip('"') for n in dot.get_nodes() if n.get("fillcolor")}
    masks = {n for n, c in colors.items() if c == MASK_COLOR}
    ops = {n for n, c in colors.items() if c == MASKED_OP_COLOR}
    assert masks == {f"masked_{n}_weight" for n in "abc"} | {f"{n}_weight_mask" for n in "abc"}
    assert ops == {f"{n}_linear" for n in "abc"}
    assert len(colors) == len(list(gm.graph.nodes))
    assert path.read_text() == dot.to_string()


def test_draw_graph_renders_or_says_graphviz_is_missing(tmp_path, monkeypatch):
    """An .svg needs Graphviz's dot: rendered when it is on PATH; with PATH emptied, a RuntimeError naming Graphviz
    and the .dot alternative, and no file."""
    pytest.importorskip("pydot")
    gm = prepare(ThreeLinear(), sparsifier=MagnitudeSparsifier(0.5))
    if shutil.which("dot") is not None:
        draw_graph(gm, tmp_path / "g.svg")
        assert "masked_a_weight" in (tmp_path / "g.svg").read_text()
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="install Graphviz .* or write a .dot file"):
        draw_graph(gm, tmp_path / "h.svg")
    assert not (tmp_path / "h.svg").exists()


def test_without_pydot_the_error_says_what_to_install(monkeypatch, tmp_path):
    """With pydot unimportable: ImportError naming pip install pydot, and nothing written."""
    monkeypatch.setitem(sys.modules, "pydot", None)
    gm = prepare(ThreeLinear(), sparsifier=MagnitudeSparsifier(0.5))
    with pytest.raises(ImportError, match="pip install pydot"):
        draw_graph(gm, tmp_path / "g.dot")
    assert not (tmp_path / "g.dot").exists()


def test_plot_sparsity_refuses_a_sparsifier_that_is_not_one():
    """plot_sparsity(gm, sparsifier='x'): a TypeError naming sparsifier (an AttributeError on .groups before)."""
    gm = prepare(ThreeLinear(), sparsifier=MagnitudeSparsifier(0.5))
    with pytest.raises(TypeError, match="sparsifier must be the BaseSparsifier that prepared gm.*got str 'x'"):
        plot_sparsity(gm, sparsifier="x")
