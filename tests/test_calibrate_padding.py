"""calibrate(token_mask=...): padded positions stay out of input norms, Hessians and OWL's outlier ratios."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsity
from fx_sparsity import SparseGPTSparsifier, WandaSparsifier, prepare
from fx_sparsity.calibration import calibrate
from passes import get_capture
from passes.calibration import InputNormObserver, token_rows

PAD = 0


class TokenMLP(nn.Module):
    """Embedding -> Linear -> GELU -> Linear -> GELU -> Linear, position by position (tokens never mix), so a
    padded sequence's real tokens see exactly what the unpadded sequence's do. ``flatten`` runs the Linears on
    ``[batch * seq, features]`` instead of ``[batch, seq, features]``."""

    def __init__(self, flatten: bool = False) -> None:
        super().__init__()
        self.flatten = flatten
        self.embed = nn.Embedding(40, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        if self.flatten:
            h = h.reshape(-1, h.shape[-1])
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(h)))))


def sequences(count: int = 10, longest: int = 9) -> list[torch.Tensor]:
    """Token sequences of random lengths 2..longest (no PAD token in them)."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, longest + 1, (count,), generator=g).tolist()
    return [torch.randint(1, 40, (n,), generator=g) for n in lengths]


def padded_batches(seqs: list[torch.Tensor], size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Right-padded dict batches, as a tokenizer with padding=True returns them."""
    batches = []
    for i in range(0, len(seqs), size):
        chunk = seqs[i : i + size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), PAD)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : len(s)] = s
            mask[row, : len(s)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def unpadded_batches(seqs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each sequence alone, at its own length: nothing to mask."""
    return [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)} for s in seqs]


def calibrated(model: nn.Module, sparsifier, batches, **kwargs):
    gm = prepare(model, sparsifier=sparsifier)
    return gm, calibrate(gm, batches, progress_bar=False, **kwargs)


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("make", [lambda: WandaSparsifier(0.5), lambda: SparseGPTSparsifier(0.5, block_size=8)])
def test_padding_excluded_equals_unpadded_sequences(flatten, make):
    """TokenMLP on [batch, seq, features] and on flattened [batch * seq, features] inputs: Wanda's norms and
    SparseGPT's Hessians from padded batches with their attention masks equal those from the unpadded sequences
    run one by one (within float32 rounding: the activations are float32, computed at other shapes); so do the
    masks and SparseGPT's updated weights. Without the mask the padding changes them."""
    torch.manual_seed(0)
    model = TokenMLP(flatten)
    seqs = sequences()
    gm_pad, padded = calibrated(model, make(), padded_batches(seqs))
    gm_ref, reference = calibrated(model, make(), unpadded_batches(seqs))
    _, unmasked = calibrated(model, make(), padded_batches(seqs), token_mask=None)
    assert sorted(padded) == ["fc1.weight", "fc2.weight", "head.weight"]
    for fqn in padded:
        # float32 tolerances: the activations are float32, computed at other batch shapes (GEMM rounding differs)
        torch.testing.assert_close(padded[fqn].float(), reference[fqn].float())
        assert not torch.allclose(unmasked[fqn], reference[fqn]), fqn
    fx_sparsity.get_sparsifier(gm_pad).step()
    fx_sparsity.get_sparsifier(gm_ref).step()
    for fqn in padded:
        module = fqn.rsplit(".", 1)[0]
        assert torch.equal(gm_pad.get_buffer(f"{module}.weight_mask"), gm_ref.get_buffer(f"{module}.weight_mask"))
        torch.testing.assert_close(gm_pad.get_parameter(fqn), gm_ref.get_parameter(fqn))


def test_padding_excluded_from_owl_levels():
    """OWL's per-layer levels come from calibrate's statistics, so with the attention mask they are those of the
    unpadded sequences (and here the padding would have changed them)."""
    model = TokenMLP()
    seqs = sequences()
    levels = []
    for batches, token_mask in ((padded_batches(seqs), "attention_mask"), (unpadded_batches(seqs), None)):
        gm, _ = calibrated(model, WandaSparsifier(0.5), batches, token_mask=token_mask)
        levels.append(fx_sparsity.set_owl_levels(gm, lam=0.2, m=2.0))
    assert levels[0] == pytest.approx(levels[1], abs=1e-9)
    assert len(set(levels[0].values())) > 1


def test_callable_token_mask_and_tuple_batches():
    """(input_ids, attention_mask) tuples with token_mask=lambda b: b[1] give the dict batches' statistics; the
    default key finds nothing in a tuple batch, so every position counts there."""
    model = TokenMLP()
    seqs = sequences()
    dicts = padded_batches(seqs)
    tuples = [(b["input_ids"], b["attention_mask"]) for b in dicts]
    _, from_dicts = calibrated(model, WandaSparsifier(0.5), dicts)
    _, from_tuples = calibrated(model, WandaSparsifier(0.5), tuples, token_mask=lambda b: b[1])
    _, unmasked = calibrated(model, WandaSparsifier(0.5), tuples)
    for fqn in from_dicts:
        torch.testing.assert_close(from_tuples[fqn], from_dicts[fqn])
        assert not torch.allclose(unmasked[fqn], from_dicts[fqn])


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    return transformers.BertModel(config).eval()


def eager_statistics(model: nn.Module, seqs: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Linear name -> (sum of squares per input channel, X^T X) over the sequences run one by one through the eager
    model, from forward pre-hooks (the reference calibrate is checked against)."""
    sums: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            old = sums.get(name, [0, 0])
            sums[name] = [old[0] + x.square().sum(0), old[1] + x.T @ x]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            for s in seqs:
                model(s[None])
    finally:
        for h in handles:
            h.remove()
    return {n: (a, b) for n, (a, b) in sums.items()}


@pytest.mark.parametrize("sparsifier_class", [WandaSparsifier, SparseGPTSparsifier])
def test_bert_padded_batches_match_eager_unpadded(sparsifier_class):
    """A BERT built from a config, export-captured with (input_ids, attention_mask): calibrating on right-padded
    batches with their masks gives every encoder Linear the norms / Hessians that the eager model's inputs have
    on the unpadded sequences run one by one (attention ignores the padding, positions start at 0). The pooler
    reads the first token only ([batch, hidden]): it is observed at every row, and a warning says so."""
    model = tiny_bert()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 100, (n,), generator=g) for n in (12, 7, 3, 10, 12, 5)]
    batches = [(b["input_ids"], b["attention_mask"]) for b in padded_batches(seqs, size=3)]
    sparsifier = sparsifier_class(0.5)
    gm = prepare(model, sparsifier=sparsifier, example_inputs=batches[0])
    assert get_capture(gm).method == "export"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        statistics = calibrate(gm, batches, token_mask=lambda b: b[1], progress_bar=False)
    messages = [str(w.message) for w in caught if "token masks did not map" in str(w.message)]
    assert len(messages) == 1 and "'pooler.dense.weight': [(3, 32)]" in messages[0]
    reference = eager_statistics(model, seqs)
    encoder = [n for n in reference if n.startswith("encoder.")]
    assert len(encoder) == 6
    for name in encoder:
        squares, hessian = reference[name]
        if sparsifier_class is WandaSparsifier:
            torch.testing.assert_close(statistics[f"{name}.weight"], squares.sqrt().float(), rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(statistics[f"{name}.weight"][0], hessian, rtol=1e-5, atol=1e-5)
    sparsifier.step()


class ConvTokens(nn.Module):
    """A conv over [batch, channels, seq] then a Linear over [batch, seq, channels]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv(self.embed(input_ids).transpose(1, 2)).transpose(1, 2)
        return self.fc(h)


def test_conv_inputs_are_observed_in_full_with_a_warning():
    """A conv's input does not map to tokens: it is observed at every position (equal to calibrating without
    a mask) and the warning names it; the Linear after it is masked."""
    model = ConvTokens()
    batches = padded_batches(sequences())
    with pytest.warns(UserWarning, match=r"'conv.weight': \[\(2, 8, 9\), \(4, 8, 7\), \(4, 8, 9\)\]"):
        masked = calibrated(model, WandaSparsifier(0.5), batches)[1]
    unmasked = calibrated(model, WandaSparsifier(0.5), batches, token_mask=None)[1]
    torch.testing.assert_close(masked["conv.weight"], unmasked["conv.weight"])
    assert not torch.allclose(masked["fc.weight"], unmasked["fc.weight"])


def test_token_rows_mapping():
    """token_rows keeps the masked rows of [batch, seq, ...] and [batch * seq, features] inputs in order, and
    returns None for inputs that do not map."""
    x = torch.arange(24.0).reshape(2, 3, 4)
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    expected = torch.stack([x[0, 0], x[0, 2], x[1, 1]])
    torch.testing.assert_close(token_rows(x, mask), expected)
    torch.testing.assert_close(token_rows(x.reshape(6, 4), mask.bool()), expected)
    assert token_rows(x[:, 0], mask) is None and token_rows(x.transpose(0, 1), mask) is None
    observer = InputNormObserver(0)
    observer.token_mask = mask
    assert observer(x) is x and observer.rows == 3
    torch.testing.assert_close(observer.norm(), expected.norm(dim=0))


class PlainObserver(nn.Module):
    """An observer that is no passes.calibration.InputObserver: it cannot apply token masks."""

    def forward(self, x):
        self.seen = x
        return x


class PlainSparsifier(fx_sparsity.MagnitudeSparsifier):
    calibration_key = "plain"

    def calibration_observer(self, group, target, ops):
        return PlainObserver()

    def calibration_statistic(self, group, observer):
        return observer.seen.shape


def test_bad_token_masks_are_refused():
    """Wrong token masks get errors naming the batch and the fix, the graph is left as it was and nothing is
    stored; an observer that cannot apply masks is refused once a batch carries one, and works without."""
    model = TokenMLP()
    batch = padded_batches(sequences())[0]
    cases = [
        ({**batch, "attention_mask": batch["attention_mask"][:, None, None, :]}, {}, ValueError,
         r"batch 0 of batches\['attention_mask'\] must be \[batch, seq\]"),
        ({**batch, "attention_mask": (1.0 - batch["attention_mask"]) * -1e9}, {}, ValueError,
         r"only 0 and 1.*pass \(bias == 0\)"),
        (batch, {"token_mask": lambda b: b["attention_mask"].tolist()}, TypeError,
         r"token_mask\(batch 0 of batches\) must be a \[batch, seq\] tensor"),
        (batch, {"token_mask": 3}, TypeError, "token_mask must be a key of dict batches"),
    ]
    for bad, kwargs, error, match in cases:
        sparsifier = WandaSparsifier(0.5)
        gm = prepare(model, sparsifier=sparsifier)
        code = gm.code
        with pytest.raises(error, match=match):
            calibrate(gm, [bad], progress_bar=False, **kwargs)
        assert gm.code == code and not any(sparsifier.state.values())
    gm = prepare(model, sparsifier=PlainSparsifier(0.5))
    with pytest.raises(TypeError, match=r"observers of \{'fc1.weight': 'PlainObserver'.*token_mask=None"):
        calibrate(gm, [batch], progress_bar=False)
    shapes = calibrate(gm, [batch], token_mask=None, progress_bar=False)
    assert shapes["fc1.weight"] == (*batch["input_ids"].shape, 16)
