"""Files saved by fx_sparsity 0.1.0 (tests/fixtures/v0_1_0, written by make_v0_1_0.py before the reorganisation)
still load: pickled prepared, lowered and shrunk modules compute what they computed when saved and can still be
stepped, fused and lowered; the .pt2 runs; sparsifier state dicts load into today's classes."""

from __future__ import annotations

import importlib.util
import pathlib
import warnings

import pytest
import torch

import fx_sparsity
from passes.meta import get_capture, masked_targets

FIXTURES = pathlib.Path(__file__).with_name("fixtures") / "v0_1_0"


def _load(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the pickles name 0.1.0's module paths
        return torch.load(FIXTURES / name, weights_only=False)


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURES / "expected.pt")


@pytest.mark.parametrize("name, input_key", [
    ("prepared_wanda", "x"),
    ("prepared_sparsegpt_export", "x"),
    ("lowered_csr_bitmask", "x"),
    ("lowered_nm", "x"),
    ("prepared_lstm_channels", "seq"),
    ("shrunk_lstm", "seq"),
])
def test_pickled_modules_compute_what_they_did(name, input_key, expected):
    """Each pickled module loads and gives, bit for bit, the outputs it gave when 0.1.0 saved it."""
    gm = _load(f"{name}.pt")
    torch.testing.assert_close(gm(expected[input_key]), expected[name], rtol=0, atol=0)


def test_loaded_prepared_module_steps_and_lowers(expected):
    """The sparsifier pickled with a prepared module comes back bound to it: it steps again (same masks), its
    capture record reads from 0.1.0's bare keys, and the module lowers to csr with the same outputs."""
    gm = _load("prepared_wanda.pt")
    sparsifier = fx_sparsity.get_sparsifier(gm)
    assert type(sparsifier) is fx_sparsity.WandaSparsifier and sparsifier.model is gm
    assert get_capture(gm).method == "symbolic_trace"
    masks = {t.tensor_fqn: gm.get_buffer(t.mask_fqn).clone() for t in masked_targets(gm)}
    sparsifier.step()
    for fqn, mask in masks.items():
        torch.testing.assert_close(gm.get_buffer(f"{fqn}_mask"), mask, rtol=0, atol=0)
    lowered = fx_sparsity.lower(gm, "csr")
    torch.testing.assert_close(lowered(expected["x"]), expected["prepared_wanda"])


def test_loaded_export_capture_keeps_its_dynamic_batch(expected):
    """A pickled export capture keeps its record (dynamic batch) and runs at another batch size."""
    gm = _load("prepared_sparsegpt_export.pt")
    record = get_capture(gm)
    assert (record.method, record.dynamic_batch) == ("export", True)
    x = torch.cat([expected["x"], expected["x"]])
    torch.testing.assert_close(gm(x), torch.cat([expected["prepared_sparsegpt_export"]] * 2))


def test_loaded_lstm_pruner_shrinks_as_it_did(expected):
    """The ChannelPruner pickled with its masked_lstm graph shrinks again to the module 0.1.0 saved; the shrunk
    pickle's report reads from 0.1.0's keys."""
    gm = _load("prepared_lstm_channels.pt")
    small = fx_sparsity.shrink(gm)
    torch.testing.assert_close(small(expected["seq"]), expected["shrunk_lstm"], rtol=0, atol=0)
    saved = _load("shrunk_lstm.pt")
    assert fx_sparsity.shrink_report(saved).params_after == fx_sparsity.shrink_report(small).params_after


def test_exported_program_loads_and_runs(expected):
    """The .pt2 of a module lowered to fx_sparsity::csr_linear and ::bitmask_linear loads (fx_sparsity imported)
    and runs at another batch size."""
    program = torch.export.load(FIXTURES / "lowered_csr_bitmask.pt2").module()
    torch.testing.assert_close(program(expected["x"]), expected["lowered_csr_bitmask"])
    torch.testing.assert_close(program(expected["x"][:3]), expected["lowered_csr_bitmask"][:3])


@pytest.mark.parametrize("name, make, model", [
    ("wanda_state_dict.pt", lambda: fx_sparsity.WandaSparsifier(0.5), "mlp"),
    ("weight_norm_state_dict.pt", lambda: fx_sparsity.WeightNormSparsifier(0.9, (1, 1)), "mlp"),
    ("channel_pruner_state_dict.pt", lambda: fx_sparsity.ChannelPruner(0.5), "lstm"),
])
def test_state_dicts_load_into_todays_classes(name, make, model, expected):
    """A 0.1.0 state dict names its sparsifier by its old class path and holds bool masks; it loads into a freshly
    prepared sparsifier of today's class (masks of the weight's dtype), and the masks it carries are the module's
    values afterwards."""
    spec = importlib.util.spec_from_file_location("make_v0_1_0", FIXTURES.parent / "make_v0_1_0.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    state = torch.load(FIXTURES / name)
    sparsifier = make()
    if model == "lstm":
        gm = sparsifier.prepare(models.LSTMTagger(), example_inputs=expected["seq"])
    else:
        gm = fx_sparsity.prepare(models.mlp(), sparsifier=sparsifier)
    assert state["sparsifier"] != f"{type(sparsifier).__module__}.{type(sparsifier).__qualname__}"
    sparsifier.load_state_dict(state)
    for fqn, entry in state["state"].items():
        assert entry["mask"].dtype == torch.bool
        assert torch.equal(gm.get_buffer(f"{fqn}_mask"), entry["mask"])
