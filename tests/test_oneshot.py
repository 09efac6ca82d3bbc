"""``fx_sparsity.oneshot``: one call from a model and calibration data to the pruned model in its class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsity
from fx_sparsity.deploy import SparseLinear, load_sparse
from fx_sparsity.recipes import parse_sparsity
from helpers import snapshot, tiny_causal_lm


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _batches(n: int = 4) -> list[torch.Tensor]:
    return [torch.randn(8, 16) for _ in range(n)]


@pytest.mark.parametrize("method, sparsity, sparsifier", [
    ("sparsegpt", "50%", lambda: fx_sparsity.SparseGPTSparsifier(0.5)),
    ("wanda", "2:4", lambda: fx_sparsity.WandaSparsifier(nm=(2, 4))),
    ("magnitude", 0.75, lambda: fx_sparsity.MagnitudeSparsifier(0.75)),
])
@pytest.mark.parametrize("sequential", [True, False])
def test_oneshot_is_the_pipeline_by_hand(method, sparsity, sparsifier, sequential):
    """oneshot's weights equal prepare + prune_sequential (or calibrate + step) + to_model by hand, bit for bit;
    its report is compare(model, pruned) on the batches; the user's model is unchanged."""
    model, batches = _mlp(), _batches()
    before = snapshot(model)
    result = fx_sparsity.oneshot(model, batches, method=method, sparsity=sparsity, sequential=sequential,
                                 progress_bar=False)
    by_hand = sparsifier()
    gm = fx_sparsity.prepare(model, sparsifier=by_hand, example_inputs=batches[0])
    if sequential:
        fx_sparsity.prune_sequential(gm, batches, progress_bar=False)
    else:
        if getattr(by_hand, "calibration_key", None) is not None:
            fx_sparsity.calibrate(gm, batches, progress_bar=False)
        by_hand.step()
    expected = fx_sparsity.to_model(gm)
    assert type(result.model) is nn.Sequential and (result.sequential is not None) == sequential
    for (name, a), b in zip(result.model.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(a, b), name
    reference = fx_sparsity.compare(model, expected, batches)
    assert result.report.output_error == reference.output_error and result.report.output_error > 0
    assert all(torch.equal(before["state"][k], v) for k, v in snapshot(model)["state"].items())


def test_llama_2_4_sparse_layers_saved_and_loaded(tmp_path):
    """A Llama (GQA) at 2:4 with SparseGPT, block by block, into nm SparseLinears: every decoder Linear is 2:4,
    the head (the output embedding) stays a dense Linear; the folder loads back with the same logits; the user's
    model is unchanged."""
    model = tiny_causal_lm("llama")
    before = snapshot(model)
    batches = [(torch.randint(0, 128, (2, 16)),) for _ in range(4)]
    result = fx_sparsity.oneshot(model, batches, sparsity="2:4", sparse_format="nm", output_dir=tmp_path / "out",
                                 progress_bar=False)
    layers = [m for m in result.model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 14 and all(m.layout == "nm" for m in layers)
    assert type(result.model.lm_head) is nn.Linear
    assert result.output_dir == tmp_path / "out" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    loaded = load_sparse(result.output_dir)
    ids = batches[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model(ids).logits)
    assert all(torch.equal(before["state"][k], v) for k, v in snapshot(model)["state"].items())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="sgpt"), ValueError, r"method must be one of \('sparsegpt', 'wanda', 'magnitude'\), got 'sgpt'"),
    (dict(sparsity="50"), ValueError, r"sparsity must be .*'50%'.*'2:4'.*got '50'"),
    (dict(sparsity="4:2"), ValueError, r"0 < N < M .*got \(4, 2\)"),
    (dict(sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\)"),
    (dict(data="some text"), TypeError, r"wrap one text in a list"),
    (dict(data=[]), ValueError, r"data is empty"),
    (dict(data=["a text"]), ValueError, r"pass tokenizer="),
    (dict(max_length=0), ValueError, r"max_length must be a positive int"),
])
def test_bad_arguments_are_refused_before_any_work(kwargs, error, match):
    model = _mlp()
    before = snapshot(model)
    args = {"data": _batches(), "progress_bar": False, **kwargs}
    with pytest.raises(error, match=match):
        fx_sparsity.oneshot(model, **args)
    assert snapshot(model)["ids"] == before["ids"]


def test_an_output_dir_holding_files_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"exists and is not an empty folder"):
        fx_sparsity.oneshot(_mlp(), _batches(), output_dir=tmp_path, progress_bar=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_parse_sparsity():
    assert [parse_sparsity(s) for s in ("50%", "2:4", 0.7, " 62.5 % ", (1, 4))] == [0.5, (2, 4), 0.7, 0.625, (1, 4)]
    with pytest.raises(TypeError):
        parse_sparsity(True)


def _word_tokenizer():
    """A transformers fast tokenizer over a 20-word vocabulary, built in memory (nothing downloaded)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = "the a cat dog sat on mat ran far and fast slow big small red blue".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def test_texts_with_a_tokenizer_equal_their_token_batches():
    """Four texts of different lengths tokenized by oneshot (one batch each, dicts of input_ids/attention_mask,
    the model's use_cache left on) prune exactly as the same dicts given as batches; the head stays dense."""
    from helpers import tiny_hf_model

    tokenizer = _word_tokenizer()
    texts = ["the cat sat on the mat", "a big red dog ran far and fast", "the small blue cat", "a dog sat"]
    model = tiny_hf_model("llama")
    from_texts = fx_sparsity.oneshot(model, texts, tokenizer=tokenizer, progress_bar=False)
    batches = [dict(tokenizer(t, return_tensors="pt")) for t in texts]
    from_batches = fx_sparsity.oneshot(model, batches, progress_bar=False)
    for (name, a), b in zip(from_texts.model.state_dict().items(), from_batches.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(from_texts.model.lm_head.weight, model.lm_head.weight)
    assert (from_texts.model.model.layers[1].mlp.down_proj.weight == 0).float().mean() == 0.5
    assert model.config.use_cache is True
    with pytest.raises(ValueError, match=r"data\[1\] tokenizes to no tokens"):
        fx_sparsity.oneshot(model, ["the cat", ""], tokenizer=tokenizer, progress_bar=False)
