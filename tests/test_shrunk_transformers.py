"""A shrunk transformers model back in its own class with its config updated (``to_model`` of a shrunk module,
:mod:`fx_sparsity.deploy.resized`)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.export import Dim

from fx_sparsity import to_model
from fx_sparsity.structured import ChannelPruner, shrink
from helpers import snapshot, tiny_causal_lm

transformers = pytest.importorskip("transformers")


def _shrunk(name: str, config=None, dynamic: bool = True):
    model = tiny_causal_lm(name)
    ids = torch.randint(0, 128, (2, 16))
    pruner = ChannelPruner(0.5)
    dims = ({0: Dim("batch", min=1, max=64), 1: Dim("seq", min=2, max=64)},) if dynamic else None
    gm = pruner.prepare(model, config, example_inputs=(ids,), capture_method="export", dynamic_shapes=dims)
    pruner.step()
    return model, shrink(gm), ids


def test_dict_example_inputs_prune_and_shrink_as_a_tokenizer_batch():
    """ChannelPruner.prepare takes example_inputs as a dict of keyword inputs (what a tokenizer returns): the
    shrunk Llama takes dict batches of another size and length, computes exactly what the channel-masked module
    does, and comes back as its class with the config halved; the user's model is unchanged."""
    model = tiny_causal_lm("llama")
    before = snapshot(model)
    ids = torch.randint(0, 128, (2, 16))
    pruner = ChannelPruner(0.5)
    gm = pruner.prepare(model, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    pruner.step()
    small = shrink(gm)
    batch = {"input_ids": torch.randint(0, 128, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():
        expected = gm(**batch).logits
        assert torch.equal(small(**batch).logits, expected)
        back = to_model(small)
        assert (back.config.num_attention_heads, back.config.num_key_value_heads) == (2, 1)
        torch.testing.assert_close(back(**batch).logits, expected)
    after = snapshot(model)
    assert after["ids"] == before["ids"] and after["modules"] == before["modules"] and after["attrs"] == before["attrs"]
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_heads_and_mlp_come_back_with_the_config_updated(name, tmp_path):
    """Llama and Qwen2 (4 heads of 16, 2 KV heads, MLP 128) halved: the class again, its config saying 2 heads of 16,
    1 KV head, MLP 64 (Qwen2's implied head_dim written out); its logits are the shrunk module's at the example
    length and another; generate() runs; save_pretrained/from_pretrained gives the same logits; the user's model and
    config are unchanged."""
    model, small, ids = _shrunk(name)
    before, config_before = snapshot(model), model.config.to_dict()
    back = to_model(small)
    assert type(back) is type(model) and back.config is not model.config
    sizes = {k: getattr(back.config, k) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size",
                                                  "head_dim", "hidden_size")}
    assert sizes == {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64, "head_dim": 16,
                     "hidden_size": 64}
    assert back.model.layers[1].self_attn.q_proj.weight.shape == (32, 64)
    with torch.no_grad():
        for x in (ids, torch.randint(0, 128, (3, 9))):
            torch.testing.assert_close(back(x).logits, small(x).logits)
        tokens = back.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                               pad_token_id=0)
    assert tokens.shape == (2, 20)
    back.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, back(ids).logits)
    after = snapshot(model)
    assert after["ids"] == before["ids"] and after["modules"] == before["modules"] and after["attrs"] == before["attrs"]
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())
    assert model.config.to_dict() == config_before


def test_an_mlp_shrunk_alone_changes_one_field():
    """Only the MLPs pruned (a config naming their producers), captured at one sequence length: the config
    changes intermediate_size alone; model= given explicitly works as the kept reference does."""
    config = [{"tensor_fqn": f"model.layers.{i}.mlp.{p}.weight"} for i in range(2) for p in ("gate_proj", "up_proj")]
    model, small, ids = _shrunk("llama", config, dynamic=False)
    back = to_model(small, model=model)
    assert (back.config.intermediate_size, back.config.num_attention_heads, back.config.num_key_value_heads) == \
        (64, 4, 2)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, small(ids).logits)


def test_gpt2_heads_cannot_be_held_by_its_config():
    """GPT-2 derives its head size from n_embd // n_head, so fewer heads of the same size fit no GPT2Config: refused,
    pointing to the shrunk module; its MLP alone (n_inner, None by default) comes back."""
    model, small, _ = _shrunk("gpt2")
    with pytest.raises(ValueError, match=r"cannot rebuild the shrunk GPT2LMHeadModel.*c_attn.*shrunk GraphModule"):
        to_model(small)
    config = [{"tensor_fqn": f"transformer.h.{i}.mlp.c_fc.weight"} for i in range(2)]
    model, small, ids = _shrunk("gpt2", config)
    back = to_model(small)
    assert (back.config.n_inner, back.config.n_head) == (128, 4)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, small(ids).logits)


def test_layers_pruned_to_different_sizes_are_refused_naming_them():
    """Layer 0's MLP at 0.5, layer 1's at 0.25: one intermediate_size cannot hold both; the error names both
    tensors."""
    config = [{"tensor_fqn": "model.layers.0.mlp.gate_proj.weight", "sparsity_level": 0.5},
              {"tensor_fqn": "model.layers.0.mlp.up_proj.weight", "sparsity_level": 0.5},
              {"tensor_fqn": "model.layers.1.mlp.gate_proj.weight", "sparsity_level": 0.25},
              {"tensor_fqn": "model.layers.1.mlp.up_proj.weight", "sparsity_level": 0.25}]
    model, small, _ = _shrunk("llama", config)
    snapshot_config = copy.deepcopy(model.config.to_dict())
    with pytest.raises(ValueError, match=r"different sizes \(model\.layers\.0\.mlp\.gate_proj\.weight \[64, 64\], "
                                         r"model\.layers\.1\.mlp\.gate_proj\.weight \[96, 64\]"):
        to_model(small)
    assert model.config.to_dict() == snapshot_config
