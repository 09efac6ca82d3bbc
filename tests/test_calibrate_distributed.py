"""calibrate and quantize under torch.distributed: N processes with 1/N of the batches each get one process's
statistics.

The test starts two gloo processes on this machine once (this file is their script: ``python
test_calibrate_distributed.py RANK WORLD INIT_FILE OUT``; most of their time is two interpreters starting and
importing torch), each calibrating every other batch in every scenario below, and compares their statistics,
masks and weights with one process calibrating on all the batches.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsity
from fx_sparsity import SparseGPTSparsifier, WandaSparsifier, prepare
from fx_sparsity.calibration import calibrate, prune_sequential
from fx_sparsity.quantization import quantize
from helpers import correlated_inputs
from passes.calibration import InputNormObserver, all_reduce_observers

WORLD = 2
ROOT = pathlib.Path(__file__).resolve().parents[1]


class TokenMLP(nn.Module):
    """Embedding -> Linear -> GELU -> Linear -> GELU -> Linear on [batch, seq, features]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(self.embed(input_ids))))))


class ConvNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> grouped conv -> pool -> Linear (conv Hessians per group, a BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.bn(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


def token_batches(count: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded dict batches of 3 sequences of random lengths."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(count):
        lengths = torch.randint(2, 10, (3,), generator=g)
        ids = torch.randint(1, 40, (3, int(lengths.max())), generator=g)
        mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


def image_batches(count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.randn(2, 3, 8, 8, generator=g) for _ in range(count)]


# name -> (model, sparsifier, batches, calibrate's options)
SCENARIOS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], Callable[[], list], dict[str, Any]]] = {
    "wanda": (TokenMLP, lambda: WandaSparsifier(0.5), lambda: token_batches(7), {}),
    "wanda_2_4": (TokenMLP, lambda: WandaSparsifier(nm=(2, 4)), lambda: token_batches(5), {}),
    "sparsegpt": (TokenMLP, lambda: SparseGPTSparsifier(0.5, block_size=8), lambda: token_batches(7), {}),
    "sparsegpt_2_4_conv": (ConvNet, lambda: SparseGPTSparsifier(nm=(2, 4), block_size=8), lambda: image_batches(5), {}),
    # One batch for two processes: the second runs none, its zero sums still take part.
    "sparsegpt_one_batch": (TokenMLP, lambda: SparseGPTSparsifier(0.5, block_size=8), lambda: token_batches(1), {}),
    # Opting out: each process keeps the statistics of its own share.
    "local": (TokenMLP, lambda: WandaSparsifier(0.5), lambda: token_batches(7), {"distributed": False}),
}


def calibrate_and_step(name: str, share: slice, **extra: Any) -> dict[str, Any]:
    """Prepare scenario ``name``'s model, calibrate on ``batches[share]``, step; the statistics and the state dict."""
    build, make, batches, options = SCENARIOS[name]
    torch.manual_seed(0)
    sparsifier = make()
    gm = prepare(build(), sparsifier=sparsifier)
    statistics = calibrate(gm, batches()[share], progress_bar=False, **options, **extra)
    sparsifier.step()
    return {"statistics": statistics, "state": {k: v.clone() for k, v in gm.state_dict().items()}}


def sequential_and_step(share: slice) -> dict[str, Any]:
    """SparseGPT 50% on TokenMLP pruned layer by layer (prune_sequential) on padded ``token_batches(7)[share]``:
    every layer's Hessian and the state dict."""
    torch.manual_seed(0)
    sparsifier = SparseGPTSparsifier(0.5, block_size=8)
    gm = prepare(TokenMLP(), sparsifier=sparsifier)
    prune_sequential(gm, token_batches(7)[share], blocks=["fc1", "fc2", "head"], keep_statistics=True, progress_bar=False)
    statistics = {fqn: state["input_hessian"] for fqn, state in sparsifier.state.items()}
    return {"statistics": statistics, "state": {k: v.clone() for k, v in gm.state_dict().items()}}


def wanda_then_gptq(share: slice) -> dict[str, torch.Tensor]:
    """Wanda 50% on Linear(64 -> 32) -> ReLU -> Linear(32 -> 32) calibrated on five correlated batches' ``share``,
    then GPTQ int4-g32 on the same share: the prepared module's state (masks and dequantized weights)."""
    torch.manual_seed(0)
    gm = prepare(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32)), sparsifier=WandaSparsifier(0.5))
    batches = [correlated_inputs(16, 64, seed=10 + i) for i in range(5)][share]
    calibrate(gm, batches, progress_bar=False)
    fx_sparsity.get_sparsifier(gm).step()
    quantize(gm, "int4-g32", batches=batches, block_size=32, progress_bar=False)
    return {k: v.clone() for k, v in gm.state_dict().items()}


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One process: every scenario on batches[rank::world], then a failing batch on the last rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {name: calibrate_and_step(name, slice(rank, None, world)) for name in SCENARIOS}
        results["sequential"] = sequential_and_step(slice(rank, None, world))
        results["gptq"] = wanda_then_gptq(slice(rank, None, world))
        build, make, batches, _ = SCENARIOS["wanda"]
        gm = prepare(build(), sparsifier=make())
        bad = batches()[:2] + (["not a batch"] if rank == world - 1 else [])
        try:
            calibrate(gm, bad, progress_bar=False)
            results["failure"] = None
        except Exception as e:  # what each process raised, for the test to check
            results["failure"] = (type(e).__name__, str(e), gm.code)
        results["code"] = prepare(build(), sparsifier=make()).code
        observer = InputNormObserver(0)
        observer(torch.ones(2, 3 + rank))  # a different width on each process
        try:
            all_reduce_observers({"fc.weight": observer})
            results["mismatch"] = None
        except RuntimeError as e:
            results["mismatch"] = str(e)
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    """The results of two gloo processes running this file's worker."""
    folder = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    outs = [folder / f"rank{r}.pt" for r in range(WORLD)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(WORLD), str(folder / "init"), str(outs[r])],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [torch.load(out, weights_only=False) for out in outs]


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "local"])
def test_two_processes_match_one(ranks, name):
    """Wanda (unstructured, 2:4) on padded token batches and SparseGPT (unstructured on tokens, 2:4 on a conv
    net with a grouped conv and a BatchNorm), each process calibrating every other batch, one process with no
    batch at all: every process's statistics equal one process's on all the batches (float64 sums added in
    another order), its masks are the same, and SparseGPT's updated weights agree within float tolerance;
    the processes agree exactly with each other."""
    single = calibrate_and_step(name, slice(None))
    for result in ranks:
        for fqn, statistic in single["statistics"].items():
            torch.testing.assert_close(result[name]["statistics"][fqn], statistic)
        assert result[name]["state"].keys() == single["state"].keys()
        for key, value in single["state"].items():
            if key.endswith("_mask"):
                assert torch.equal(result[name]["state"][key], value), key
            else:
                torch.testing.assert_close(result[name]["state"][key], value, rtol=1e-5, atol=1e-6)
    for key, value in ranks[0][name]["state"].items():
        assert torch.equal(ranks[1][name]["state"][key], value), key
    masks = [v for k, v in single["state"].items() if k.endswith("_mask")]
    assert masks and all(0 < m.float().mean() < 1 for m in masks)


def test_sequential_two_processes_match_one(ranks):
    """prune_sequential under a process group all-reduces each stage's Hessians before its step: each process,
    pruning layer by layer from every other padded batch, gets the Hessians (each computed on the outputs of the
    layers pruned before it), masks and SparseGPT weights of one process running all the batches."""
    single = sequential_and_step(slice(None))
    for result in ranks:
        got = result["sequential"]
        assert got["statistics"].keys() == single["statistics"].keys() == {"fc1.weight", "fc2.weight", "head.weight"}
        for fqn, statistic in single["statistics"].items():
            torch.testing.assert_close(got["statistics"][fqn], statistic)
        for key, value in single["state"].items():
            if key.endswith("_mask"):
                assert torch.equal(got["state"][key], value), key
            else:
                torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6)
    masks = [v for k, v in single["state"].items() if k.endswith("_mask")]
    assert masks and all(0 < m.float().mean() < 1 for m in masks)


def test_two_processes_quantize_as_one(ranks):
    """GPTQ under a process group all-reduces its Hessians: both processes get the same masks and weights, those of
    one process on all the batches (weights to float summation order)."""
    single = wanda_then_gptq(slice(None))
    assert single.keys() == ranks[0]["gptq"].keys() == ranks[1]["gptq"].keys()
    for key, value in single.items():
        assert torch.equal(ranks[0]["gptq"][key], ranks[1]["gptq"][key]), key
        if key.endswith("_mask"):
            assert torch.equal(ranks[0]["gptq"][key], value), key
        else:
            torch.testing.assert_close(ranks[0]["gptq"][key], value, rtol=1e-5, atol=1e-6)


def test_distributed_false_keeps_each_process_own_statistics(ranks):
    """distributed=False under a process group: each process's statistics are those of its own share only."""
    for rank, result in enumerate(ranks):
        own = calibrate_and_step("local", slice(rank, None, WORLD))
        for fqn, statistic in own["statistics"].items():
            torch.testing.assert_close(result["local"]["statistics"][fqn], statistic)
    assert not torch.allclose(ranks[0]["local"]["statistics"]["fc1.weight"], ranks[1]["local"]["statistics"]["fc1.weight"])


def test_a_failing_process_makes_every_process_raise(ranks):
    """The last process gets a bad batch: it raises its TypeError, the other one a RuntimeError saying another
    process failed (instead of waiting in a collective forever); both graphs are left as they were."""
    name, message, code = ranks[-1]["failure"]
    assert name == "TypeError" and "batch 2 of batches must be a tensor" in message
    name, message, code0 = ranks[0]["failure"]
    assert name == "RuntimeError" and "another process failed" in message
    assert code == code0 == ranks[0]["code"]


def test_different_shapes_are_refused_on_every_process(ranks):
    """Processes whose observers recorded different shapes for one statistic all raise, naming it."""
    for result in ranks:
        assert "sum_squares of fc.weight with different shapes" in result["mismatch"]


def test_distributed_option_is_checked():
    """Without a process group, distributed=True names the fix; anything but None/bool/ProcessGroup is refused."""
    gm = prepare(TokenMLP(), sparsifier=WandaSparsifier(0.5))
    batches = token_batches(1)
    with pytest.raises(ValueError, match="distributed=True needs an initialized process group"):
        calibrate(gm, batches, distributed=True, progress_bar=False)
    with pytest.raises(TypeError, match="distributed must be None, True, False or a torch.distributed ProcessGroup"):
        calibrate(gm, batches, distributed="gloo", progress_bar=False)
    assert not any(fx_sparsity.get_sparsifier(gm).state.values())


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
