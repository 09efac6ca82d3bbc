"""Hugging Face causal LMs as users hold them (passes/capturing/inputs.py, exporting.py; fx_sparsity/utils/running.py).

Tiny Llama (grouped-query attention), GPT-2 and Qwen2 built from configs with their defaults (``use_cache=True``):
prepared with a dict of keyword inputs (what a tokenizer returns), calibrated on padded dict batches of other lengths
and batch sizes, stepped, compared and lowered with dict inputs, against the eager model with ``weight * mask``; the
user's model and config unchanged. Each test needs transformers (skipped without it); an export of a tiny model
takes 1-3 s here, the parametrized tests export once per model.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fx_sparsity
from fx_sparsity import WandaSparsifier, calibrate, compare, lower, prepare
from fx_sparsity.calibration import prune_sequential
from helpers import masked_reference, snapshot, tiny_hf_model, token_batch
from passes import capture, get_capture

MODELS = ["llama", "gpt2", "qwen2"]


def _batches() -> list[dict[str, torch.Tensor]]:
    """Padded batches of three lengths and two batch sizes, none of the example's (2 x 10)."""
    return [token_batch(2, 7, padding=2, seed=1), token_batch(3, 12, padding=5, seed=2), token_batch(2, 9, seed=3)]


def _logits(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return module(**batch).logits


@pytest.mark.parametrize("kind", MODELS)
def test_prepare_calibrate_step_compare_lower_with_dict_inputs(kind):
    """{kind} with use_cache=True, prepared from a dict example (2 x 10): Wanda calibrates on padded dict batches
    of lengths 7, 12 and 9, steps (half of every row), and the prepared module equals the user's model with
    weight * mask at new lengths and batch sizes; compare reports no error against that eager model, lower(...,
    example_inputs=dict) fuses to the same outputs, and the user's weights and config (use_cache) are unchanged."""
    model = tiny_hf_model(kind)
    before = snapshot(model)
    sparsifier = WandaSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier, example_inputs=token_batch(2, 10, padding=3))
    assert get_capture(gm).method == "export" and get_capture(gm).dynamic_batch is True
    norms = calibrate(gm, _batches(), progress_bar=False)
    assert set(norms) == {g["tensor_fqn"] for g in sparsifier.groups}
    sparsifier.step()
    for group in sparsifier.groups:
        mask = gm.get_buffer(group["tensor_fqn"] + "_mask").bool()
        rows = mask.T if group.record.transposed else mask  # [out, in]: Wanda prunes half of each output row
        assert (rows.sum(1) == rows.shape[1] // 2).all(), group["tensor_fqn"]
    reference = masked_reference(model, gm, sparsifier)
    for batch in (token_batch(3, 5, padding=1, seed=4), token_batch(1, 17, seed=5)):
        torch.testing.assert_close(_logits(gm, batch), _logits(reference, batch))
    report = compare(reference, gm, _batches())
    assert report.output_error < 1e-5 and all(e.relative_error < 1e-5 for e in report.layers if e.calls)
    lowered = lower(gm, "fuse", example_inputs=token_batch(2, 6, padding=1), progress_bar=False)
    batch = token_batch(2, 11, padding=4, seed=6)
    torch.testing.assert_close(_logits(lowered, batch), _logits(reference, batch))
    assert model.config.use_cache is True
    after = snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items() if isinstance(v, torch.Tensor))


def test_calibration_statistics_leave_the_padding_out():
    """Llama prepared from a dict: Wanda's input norms of every Linear after calibrate on padded dict batches equal
    those recorded with forward pre-hooks on the eager model, over the real tokens only."""
    model = tiny_hf_model("llama")
    sparsifier = WandaSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier, example_inputs=token_batch(2, 10))
    batches = _batches()
    norms = calibrate(gm, batches, progress_bar=False)
    sums: dict[str, torch.Tensor] = {}

    def hook(fqn, mask):
        def record(module, args):
            rows = args[0][mask.bool()].double()
            sums[fqn] = sums.get(fqn, 0) + rows.square().sum(0)
        return record

    for batch in batches:
        handles = [model.get_submodule(f.rpartition(".")[0]).register_forward_pre_hook(hook(f, batch["attention_mask"]))
                   for f in norms]
        try:
            _logits(model, batch)
        finally:
            for handle in handles:
                handle.remove()
    for fqn, norm in norms.items():
        torch.testing.assert_close(norm, sums[fqn].sqrt().float(), msg=fqn)


@pytest.mark.parametrize("example", ["dict", "tuple"])
def test_sequence_length_is_dynamic(example):
    """Llama captured from a (2 x 10) dict or (input_ids,) tuple runs at lengths 3, 10 and 25 and batch sizes 1-4,
    equal to the eager model: dim 1 of the token inputs is dynamic, not only the batch."""
    model = tiny_hf_model("llama")
    batch = token_batch(2, 10)
    gm = capture(model, example_inputs=batch if example == "dict" else (batch["input_ids"],))
    for size, length in ((1, 3), (4, 10), (3, 25)):
        new = token_batch(size, length, padding=1 if size > 1 else 0, seed=length)
        if example == "tuple":
            new = {"input_ids": new["input_ids"]}
        with torch.no_grad():
            got = gm(**new).logits if example == "dict" else gm(new["input_ids"]).logits
        torch.testing.assert_close(got, _logits(model, new))


class FixedLengthTagger(nn.Module):
    """Token embedding, then a Linear over the whole (flattened) sequence of 10: the sequence length is fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(32, 4), nn.Linear(40, 3)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids) * attention_mask[..., None]
        return self.head(x.reshape(x.shape[0], 40)) if x.shape[1] else x.sum()


@pytest.mark.parametrize("length, reason", [
    (10, r"sequence length 10 only .*could not keep it dynamic"),
    (1, r"sequence length 1 only .*sequence length 0 or 1"),
])
def test_sequence_length_that_cannot_be_dynamic_is_warned(length, reason):
    """A model that fixes its sequence length (a Linear over the flattened sequence), or an example of one token:
    the capture keeps the batch dynamic and a warning names the fixed length, why, and what to pad to."""
    model = FixedLengthTagger().eval()
    if length == 1:
        model.head = nn.Linear(4, 3)
        model.forward = lambda input_ids, attention_mask: model.head(model.embed(input_ids)[:, 0] * attention_mask)
    ids = torch.randint(0, 32, (2, length))
    with pytest.warns(UserWarning, match=reason) as record:
        gm = capture(model, example_inputs={"input_ids": ids, "attention_mask": torch.ones(2, length, dtype=torch.long)},
                     method="export")
    assert "padding='max_length'" in str(record[0].message)
    assert get_capture(gm).dynamic_batch is True
    ids = torch.randint(0, 32, (5, length))
    mask = torch.ones(5, length, dtype=torch.long)
    torch.testing.assert_close(gm(input_ids=ids, attention_mask=mask), model(ids, mask))


def test_gpt2_tuple_with_the_mask_in_the_cache_slot_is_refused():
    """GPT-2's forward takes (input_ids, cache, attention_mask): (ids, mask) as example inputs, or as a batch to
    compare the user's model on, is a TypeError naming the cache parameter and pointing to the dict form; the dict
    form and (ids, None, mask) are accepted."""
    model = tiny_hf_model("gpt2")
    batch = token_batch(2, 8, padding=2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with pytest.raises(TypeError, match=r"example_inputs\[1\] .*parameter 'cache'.*dict of keyword inputs"):
        prepare(model, example_inputs=(ids, mask))
    gm = prepare(model, example_inputs=batch)
    with pytest.raises(TypeError, match=r"batch 0 of batches\[1\] .*parameter 'cache'.*dict"):
        compare(model, gm, [(ids, mask)])
    gm = capture(model, example_inputs=(ids, None, mask))
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, None, mask).logits, model(ids, None, mask).logits)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_dict_key_the_model_does_not_take_is_refused_before_anything_changes(kind):
    """Llama's and Qwen2's forward end with **kwargs typed Unpack[TransformersKwargs]: a key outside them and the
    named inputs (a BERT tokenizer's token_type_ids, a typo) binds, reaches the attention layers and is dropped there.
    prepare (both capture methods), compare on the user's model and calibrate on the prepared one refuse it with a
    TypeError naming the key and the fix, before anything runs; the user's model is unchanged. A key the typed
    **kwargs take (output_attentions) is accepted."""
    model = tiny_hf_model(kind)
    before = snapshot(model)
    batch = token_batch(2, 8, padding=2)
    extra = {**batch, "token_type_ids": torch.zeros_like(batch["input_ids"])}
    refused = rf"example_inputs has the key 'token_type_ids', which {type(model).__name__}.forward does not take .*drop it"
    for method in ("auto", "export"):
        with pytest.raises(TypeError, match=refused):
            prepare(model, sparsifier=WandaSparsifier(0.5), example_inputs=extra, capture_method=method)
    with pytest.raises(TypeError, match=r"has the keys 'atention_mask', 'token_type_ids', which .*drop them"):
        prepare(model, example_inputs={**extra, "atention_mask": batch["attention_mask"]})
    gm = prepare(model, sparsifier=WandaSparsifier(0.5), example_inputs={**batch, "output_attentions": False})
    with pytest.raises(TypeError, match=r"batch 0 of batches has the key 'token_type_ids'"):
        compare(model, gm, [extra])
    with pytest.raises(TypeError, match=r"'token_type_ids'"):
        calibrate(gm, [{**extra, "output_attentions": False}], progress_bar=False)
    after = snapshot(model)
    assert {k: v for k, v in after.items() if k != "state"} == {k: v for k, v in before.items() if k != "state"}
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())
    assert model.config.use_cache is True


def test_batches_in_another_form_than_the_capture_are_refused_with_the_fix():
    """A module captured from a dict refuses tuple batches, and one captured from (input_ids,) refuses dict batches
    carrying an attention_mask, in calibrate, compare, prune_sequential and lower: a TypeError naming the form the
    capture takes (before: torch's "Ran into a kwarg keyword mismatch" ValueError); a dict naming just the captured
    positional inputs is passed positionally and works."""
    model = tiny_hf_model("llama")
    batch = token_batch(2, 8, padding=2)
    from_dict = prepare(model, sparsifier=WandaSparsifier(0.5), example_inputs=batch)
    from_tuple = prepare(model, sparsifier=WandaSparsifier(0.5), example_inputs=(batch["input_ids"],))
    runs = {
        "calibrate": lambda gm, b: calibrate(gm, [b], progress_bar=False),
        "compare": lambda gm, b: compare(model, gm, [b]) if isinstance(b, dict) else compare(gm, gm, [b]),
        "prune_sequential": lambda gm, b: prune_sequential(gm, [b], progress_bar=False),
        "lower": lambda gm, b: lower(gm, "fuse", example_inputs=b, progress_bar=False),
    }
    for name, run in runs.items():
        with pytest.raises(TypeError, match=r"captured by torch.export from the keyword inputs \['input_ids', "
                                            r"'attention_mask'\]: give a dict with exactly these keys"):
            run(from_dict, (batch["input_ids"], batch["attention_mask"]))
        with pytest.raises(TypeError, match=r"unexpected keyword argument 'attention_mask'.*from 1 positional "
                                            r"input\(s\) \(input_ids\): .*prepare with example_inputs as a dict"):
            run(from_tuple, batch)
    norms = calibrate(from_tuple, [{"input_ids": batch["input_ids"]}], progress_bar=False)
    expected = calibrate(from_dict, [{**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}],
                         token_mask=None, progress_bar=False)
    for fqn, norm in norms.items():
        torch.testing.assert_close(norm, expected[fqn], msg=fqn)


def test_prune_sequential_on_padded_dict_batches_equals_calibrate():
    """Llama prepared from a dict: prune_sequential on padded dict batches of three lengths at sparsity 0 records the
    statistics whole-model calibrate records (padding left out by both), block by block."""
    model = tiny_hf_model("llama")
    sequential, whole = WandaSparsifier(0.0), WandaSparsifier(0.0)
    gm = prepare(model, sparsifier=sequential, example_inputs=token_batch(2, 10))
    report = prune_sequential(gm, _batches(), keep_statistics=True, progress_bar=False)
    assert report.blocks == ("(before model.layers.0)", "model.layers.0", "model.layers.1", "(after model.layers.1)")
    reference = prepare(model, sparsifier=whole, example_inputs=token_batch(2, 10))
    statistics = calibrate(reference, _batches(), progress_bar=False)
    for fqn, statistic in statistics.items():
        torch.testing.assert_close(sequential.state[fqn]["input_norm"], statistic, msg=fqn)


def test_capture_leaves_the_models_cache_setting_and_returns_no_cache():
    """Qwen2 (use_cache=True): the capture's output has no cache (torch.export cannot output a DynamicCache) while the
    user's model still returns one; a dict setting use_cache=True itself gets a CaptureError naming the cache."""
    model = tiny_hf_model("qwen2")
    batch = token_batch(2, 6)
    config = copy.deepcopy(model.config.to_dict())
    gm = capture(model, example_inputs=batch)
    with torch.no_grad():
        assert gm(**batch).past_key_values is None
        assert model(**batch).past_key_values is not None
    assert model.config.to_dict() == config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(fx_sparsity.CaptureError, match="KV cache.*leave use_cache out of example_inputs"):
            capture(model, example_inputs={**batch, "use_cache": True}, method="export")


def test_layer_calls_recorded_from_dict_inputs_in_any_key_order():
    """Llama captured from {input_ids, attention_mask}: the layer calls lower("auto") times on are recorded from a
    dict in the other key order (attention_mask first), once per masked weight, and each Linear's recorded input
    equals that of the user's model on the same batch (the graph's inputs bound by name, not by position)."""
    from fx_sparsity.lowering.timing import record_op_calls

    model = tiny_hf_model("llama")
    sparsifier = WandaSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier, example_inputs=token_batch(2, 8))
    batch = token_batch(3, 11, padding=4, seed=7)
    calls = record_op_calls(gm, (), {"attention_mask": batch["attention_mask"], "input_ids": batch["input_ids"]})
    assert set(calls) == {g["tensor_fqn"] for g in sparsifier.groups}
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(f.rpartition(".")[0]).register_forward_pre_hook(
        lambda m, args, f=f: seen.__setitem__(f, args[0])) for f in calls]
    try:
        _logits(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    for fqn, node_calls in calls.items():
        assert len(node_calls) == 1, fqn
        _, args, _ = node_calls[0]
        torch.testing.assert_close(args[0], seen[fqn], msg=fqn)
