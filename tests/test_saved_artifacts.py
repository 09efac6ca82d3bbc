"""Files saved by fx_sparsity 0.1.0 (tests/fixtures/v0_1_0, written by make_v0_1_0.py before the reorganisation)
still load: pickled prepared, lowered and shrunk modules compute what they computed when saved and can still be
stepped, fused and lowered; the .pt2 runs; sparsifier state dicts load into today's classes."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import native_isas

import fx_sparsity
from passes.lowering import native
from passes.meta import get_capture, masked_targets

FIXTURES = pathlib.Path(__file__).with_name("fixtures") / "v0_1_0"

# The expected outputs were computed by 0.1.0 on an AVX2 machine (AMD Zen 3). On a CPU with AVX-512, torch's LSTM
# (oneDNN, MKL, ATen's vectorized kernels) and our kernels sum in other orders (outputs 1 ulp apart), so the
# bit-for-bit tests run where torch is limited to AVX2 (read by those libraries when they start: a child
# process) and our kernels are forced to avx2. That reproduces the recording on AMD CPUs only: on Intel
# (Sapphire Rapids) MKL's and oneDNN's AVX2 paths still sum in other orders than on AMD (MKL_CBWR=AVX2 or
# COMPATIBLE does not change it; largest relative difference 1.9e-7), so there the same tests compare at
# float32's default tolerance, in this process, our kernels forced to avx2.
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
BIT_FOR_BIT = "compute_what_they_did or shrinks_as_it_did"


def _amd() -> bool:
    try:
        return "AuthenticAMD" in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def avx2_child() -> dict[str, str] | None:
    """None where this process computes as the recording machine did (torch at AVX2) or cannot be made to (not
    an AMD CPU); else the outcome (``PASSED``/``FAILED``/...) of each bit-for-bit test, by test name, run once
    in a child process limited to AVX2, and its output."""
    if torch.backends.cpu.get_cpu_capability() == "AVX2" or not _amd():
        return None
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", __file__, "-k", BIT_FOR_BIT],
        env={**os.environ, **AVX2_ENV}, capture_output=True, text=True, cwd=pathlib.Path(__file__).parent.parent)
    outcomes = {}
    for line in run.stdout.splitlines():
        status, _, test = line.partition(" ")
        if "::" in test:
            outcomes[test.split("::")[-1].split(" ")[0]] = status
    return {"outcomes": outcomes, "output": run.stdout[-4000:] + run.stderr[-2000:]}


@pytest.fixture
def as_recorded(request, avx2_child):
    """Runs the test body here, with our kernels on avx2, where torch computes as the recording machine did (or,
    not on AMD, cannot: the body then compares at float32's tolerance, see AVX2_ENV); elsewhere checks that the
    test passed in the AVX2 child process and skips the body (returns False)."""
    if avx2_child is not None:
        status = avx2_child["outcomes"].get(request.node.name)
        assert status == "PASSED", f"{request.node.name} in the AVX2 child process: {status}\n{avx2_child['output']}"
        yield False
        return
    if "avx2" not in native_isas(("avx2",)) and native.native_ops() is not None:
        pytest.skip("the recorded outputs came from the avx2 kernels, which this CPU lacks")
    ops = native.native_ops()
    if ops is not None:
        ops.isa("avx2")
    try:
        yield True
    finally:
        if ops is not None:
            ops.isa("auto")


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
def test_pickled_modules_compute_what_they_did(name, input_key, expected, as_recorded):
    """Each pickled module loads and gives, bit for bit, the outputs it gave when 0.1.0 saved it (on an AVX2
    machine: see AVX2_ENV; on Intel CPUs within float32's tolerance)."""
    if not as_recorded:
        return
    gm = _load(f"{name}.pt")
    torch.testing.assert_close(gm(expected[input_key]), expected[name], **_as_recorded_tolerance())


def _as_recorded_tolerance() -> dict:
    """Bit for bit on AMD CPUs, where torch computes as the recording machine did; float32's default tolerance on
    other vendors' (see AVX2_ENV)."""
    return {"rtol": 0, "atol": 0} if _amd() else {}


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


def test_loaded_lstm_pruner_shrinks_as_it_did(expected, as_recorded):
    """The ChannelPruner pickled with its masked_lstm graph shrinks again to the module 0.1.0 saved; the shrunk
    pickle's report reads from 0.1.0's keys."""
    if not as_recorded:
        return
    gm = _load("prepared_lstm_channels.pt")
    small = fx_sparsity.shrink(gm)
    torch.testing.assert_close(small(expected["seq"]), expected["shrunk_lstm"], **_as_recorded_tolerance())
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
