"""ChannelPruner's Taylor and activation criteria: scores and chosen channels against direct computations on small
eager models, both gradient sources (accumulate_gradients and .grad), gradual pruning, the user's model untouched,
and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fx_sparsity
from fx_sparsity import shrink_report
from fx_sparsity.structured import (
    ChannelPruner,
    accumulate_gradients,
    activation_importance,
    channels_to_remove,
    count_to_remove,
    shrink,
    taylor_importance,
)
from helpers import TinyResNet, assert_adds_channels, snapshot


def _conv_model() -> nn.Module:
    """conv3x3 -> BN -> ReLU -> 1x1 conv -> Tanh -> flatten -> Linear, BN with non-trivial statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.Tanh(), nn.Flatten(), nn.Linear(54, 5)
    )
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.normal_()
        model[1].bias.normal_()
    return model.eval()


def _grouped_model() -> nn.Module:
    """conv1x1 (8 out) -> grouped conv (2 groups of 4) -> ReLU -> pool -> Linear: group 0 has 2 blocks."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(2)
    return [(torch.randn(4, 3, 5, 5), torch.randint(0, 5, (4,))) for _ in range(n)]


def _eager_gradients(model: nn.Module, batches, loss_fn) -> dict[str, torch.Tensor]:
    """Summed gradients of every parameter of an eager copy, in eval mode."""
    model = copy.deepcopy(model).eval()
    for x, y in batches:
        loss_fn(model(x), y).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _expected_removed(scores: torch.Tensor, ratio: float, blocks: int = 1) -> list[int]:
    return channels_to_remove(scores, count_to_remove(scores.numel(), ratio, 1, blocks), blocks).tolist()


def test_pure_scores():
    """taylor_importance is sum |w * g| per row; activation_importance the root of summed squares."""
    w, g = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(taylor_importance(w, g), (w * g).abs().sum(1))
    s = torch.rand(5, 3)
    torch.testing.assert_close(activation_importance(s), s.sum(1).sqrt())
    with pytest.raises(ValueError, match="must have one shape"):
        taylor_importance(w, g[:, :3])


# ------------------------------------------------------------------ Taylor
def test_taylor_matches_direct_computation_on_a_conv_bn_chain():
    """Group 0 (conv0's 8 channels): |w * g| over conv0's rows and bias, the BatchNorm's weight and bias and the 1x1
    conv's input columns, gradients summed over batches of an eager copy; group 1 (the 1x1 conv's 6 channels): its
    rows and bias and the Linear's columns, 9 per channel (flatten). The pruner removes the lowest of each."""
    model, batches, loss_fn = _conv_model(), _batches(), nn.CrossEntropyLoss()
    grads = _eager_gradients(model, batches, loss_fn)
    p = dict(model.named_parameters())
    t = lambda name: (p[name] * grads[name]).abs().detach()  # noqa: E731
    score0 = t("0.weight").flatten(1).sum(1) + t("0.bias") + t("1.weight") + t("1.bias") + t("3.weight").sum((0, 2, 3))
    score1 = t("3.weight").flatten(1).sum(1) + t("3.bias") + t("6.weight").reshape(5, 6, 9).sum((0, 2))
    before = snapshot(model)
    pruner = ChannelPruner(0.5, criterion="taylor")
    gm = pruner.prepare(model, example_inputs=batches[0][0])
    summed = accumulate_gradients(gm, batches, loss_fn)
    torch.testing.assert_close(summed["0.weight"], grads["0.weight"])
    torch.testing.assert_close(summed["1.bias"], grads["1.bias"])
    assert all(q.grad is None for q in model.parameters())  # no .grad left on the user's (shared) parameters
    scores = pruner.importance()
    torch.testing.assert_close(scores[0], score0)
    torch.testing.assert_close(scores[1], score1)
    pruner.step()
    removed = pruner.removed_channels()
    assert removed[0].tolist() == _expected_removed(score0, 0.5)
    assert removed[1].tolist() == _expected_removed(score1, 0.5)
    after = snapshot(model)
    assert after["attrs"] == before["attrs"]
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0)


def test_taylor_scores_match_torch_pruning():
    """Torch-Pruning's TaylorImportance (sum over the group, no normalizer, biases included) on the same gradients
    gives our scores: exactly for the 1x1 conv's group (rows, bias, the Linear's flattened columns); for conv0's group
    ours adds the BatchNorm's |w * g| terms, which Torch-Pruning 1.6 skips (it tests BatchNorm members against
    prune_groupnorm_out_channels)."""
    tp = pytest.importorskip("torch_pruning", reason="Torch-Pruning (PyPI torch-pruning) is not installed")
    model, batches, loss_fn = _conv_model(), _batches(), nn.CrossEntropyLoss()
    eager = copy.deepcopy(model).eval()
    for x, y in batches:
        loss_fn(eager(x), y).backward()
    graph = tp.DependencyGraph().build_dependency(eager, example_inputs=batches[0][0])
    scorer = tp.importance.TaylorImportance(group_reduction="sum", normalizer=None, bias=True)
    theirs = [
        scorer(graph.get_pruning_group(eager[i], tp.prune_conv_out_channels, idxs=list(range(eager[i].out_channels))))
        for i in (0, 3)
    ]
    bn = (eager[1].weight * eager[1].weight.grad).abs() + (eager[1].bias * eager[1].bias.grad).abs()
    pruner = ChannelPruner(0.5, criterion="taylor")
    gm = pruner.prepare(model, example_inputs=batches[0][0])
    accumulate_gradients(gm, batches, loss_fn)
    ours = pruner.importance()
    torch.testing.assert_close(ours[1], theirs[1])
    torch.testing.assert_close(ours[0], theirs[0] + bn.detach())


def test_taylor_grouped_conv_consumer_columns_are_read_per_block():
    """conv1x1 -> grouped conv (2 groups): input channel c of the grouped conv is column c % 4 of block c // 4's
    rows; scores equal the direct sum, and each block loses half its channels."""
    model = _grouped_model()
    torch.manual_seed(3)
    batches, loss_fn = [(torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,)))], nn.CrossEntropyLoss()
    grads = _eager_gradients(model, batches, loss_fn)
    p = dict(model.named_parameters())
    t = lambda name: (p[name] * grads[name]).abs().detach()  # noqa: E731
    columns = t("2.weight").reshape(2, 4, 4, 9).sum((1, 3)).flatten()  # [block, out, in-per-block, k] -> [in]
    score0 = t("0.weight").flatten(1).sum(1) + t("0.bias") + columns
    pruner = ChannelPruner(0.5, criterion="taylor")
    gm = pruner.prepare(model, ["0"], example_inputs=batches[0][0])
    accumulate_gradients(gm, batches, loss_fn)
    pruner.step()
    assert pruner.removed_channels()[0].tolist() == _expected_removed(score0, 0.5, blocks=2)


def test_taylor_reads_grad_from_the_users_training_steps():
    """Without accumulate_gradients, step() reads .grad that loss.backward() on gm left: the same channels as the
    accumulated gradients of the same batches."""
    model, batches, loss_fn = _conv_model(), _batches(), nn.CrossEntropyLoss()
    first = ChannelPruner(0.5, criterion="taylor")
    gm = first.prepare(model, example_inputs=batches[0][0])
    accumulate_gradients(gm, batches, loss_fn)
    first.step()
    trained = copy.deepcopy(model)
    second = ChannelPruner(0.5, criterion="taylor")
    gm2 = second.prepare(trained, example_inputs=batches[0][0])
    for x, y in batches:
        loss_fn(gm2(x), y).backward()
    second.step()
    for index, channels in first.removed_channels().items():
        assert torch.equal(second.removed_channels()[index], channels), index


def test_taylor_gradual_and_global_and_shrink_on_a_resnet():
    """TinyResNet (residual groups, BatchNorms): taylor per layer, then a higher ratio keeps the first channels
    removed; global scope removes floor(ratio * all); with consumer masks the shrunk module equals the masked one."""
    model, x = TinyResNet().eval(), torch.randn(2, 3, 16, 16)
    batches = [(x, torch.randint(0, 10, (2,)))]
    pruner = ChannelPruner(0.25, criterion="taylor", mask_consumers=True)
    gm = pruner.prepare(model, example_inputs=x)
    accumulate_gradients(gm, batches, nn.CrossEntropyLoss())
    pruner.step()
    first = pruner.removed_channels()
    for g in pruner.groups:
        g["sparsity_level"] = 0.5
    accumulate_gradients(gm, batches, nn.CrossEntropyLoss())
    pruner.step()
    second = pruner.removed_channels()
    assert_adds_channels(first, second, strictly=False)
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm)(x), gm(x))
    assert shrink_report(shrink(gm)).exact
    pruner = ChannelPruner(0.4, criterion="taylor", scope="global")
    gm = pruner.prepare(model, example_inputs=x)
    accumulate_gradients(gm, batches, nn.CrossEntropyLoss())
    pruner.step()
    sizes = shrink_report(shrink(gm)).channels.values()
    assert sum(b - a for b, a in sizes) == int(0.4 * sum(b for b, _ in sizes))


# ------------------------------------------------------------------ activation
def test_activation_matches_direct_computation_on_a_conv_bn_chain():
    """Group 0: the L2 norm of relu(bn(conv0(x))) per channel over all calibration batches (what the 1x1 conv
    reads); group 1: of tanh(conv3(.)) per channel, over the 9 positions the Linear reads. The pruner removes the
    lowest of each, and calibrate leaves no observer behind."""
    model, batches = _conv_model(), [x for x, _ in _batches()]
    with torch.no_grad():
        acts0 = [model[2](model[1](model[0](x))) for x in batches]
        acts1 = [model[4](model[3](a)) for a in acts0]
    score0 = sum(a.square().sum((0, 2, 3)) for a in acts0).sqrt()
    score1 = sum(a.square().sum((0, 2, 3)) for a in acts1).sqrt()
    pruner = ChannelPruner(0.5, criterion="activation")
    gm = pruner.prepare(model, example_inputs=batches[0])
    code = gm.code
    fx_sparsity.calibrate(gm, batches, progress_bar=False)
    assert gm.code == code
    scores = pruner.importance()
    torch.testing.assert_close(scores[0], score0)
    torch.testing.assert_close(scores[1], score1)
    pruner.step()
    removed = pruner.removed_channels()
    assert removed[0].tolist() == _expected_removed(score0, 0.5)
    assert removed[1].tolist() == _expected_removed(score1, 0.5)
    # consumers observed, their columns not masked (mask_consumers=False): the Linear's mask is all ones
    assert gm.get_buffer("6.weight_mask").all() and gm.get_buffer("3.weight_mask").flatten(1).any(0).all()


def test_activation_gradual_keeps_removed_channels_and_shrinks_exactly():
    """TinyResNet: after a first step, the removed channels carry constants with non-zero activations; a second
    calibration and step at a higher ratio still removes them (they score 0), and the shrunk module equals the
    masked one with consumer masks."""
    model, x = TinyResNet().eval(), torch.randn(2, 3, 16, 16)
    pruner = ChannelPruner(0.25, criterion="activation", mask_consumers=True)
    gm = pruner.prepare(model, example_inputs=x)
    fx_sparsity.calibrate(gm, [x], progress_bar=False)
    pruner.step()
    first = pruner.removed_channels()
    for g in pruner.groups:
        g["sparsity_level"] = 0.5
    fx_sparsity.calibrate(gm, [x], progress_bar=False)
    pruner.step()
    second = pruner.removed_channels()
    assert_adds_channels(first, second)
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm)(x), gm(x))


# ------------------------------------------------------------------ errors
def test_criteria_errors_are_clear():
    """An unknown criterion; taylor without gradients; activation without calibration; accumulate_gradients with
    a bare tensor, a batch that is no pair, a non-scalar loss, no batches, or a module of another sparsifier."""
    model, x = _conv_model(), torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="criterion must be one of .*'taylor', 'activation'.*got 'hessian'"):
        ChannelPruner(criterion="hessian")
    pruner = ChannelPruner(0.5, criterion="taylor")
    gm = pruner.prepare(model, example_inputs=x)
    with pytest.raises(ValueError, match="needs the gradient of 0.weight: call fx_sparsity.structured.accumulate_gradients"):
        pruner.step()
    with pytest.raises(TypeError, match="batches must be an iterable of \\(inputs, target\\) pairs"):
        accumulate_gradients(gm, x, nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="batch 0 of batches must be an \\(inputs, target\\) pair"):
        accumulate_gradients(gm, [x], nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        accumulate_gradients(gm, [(x, torch.zeros(2, 5))], nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match="at least one batch"):
        accumulate_gradients(gm, [], nn.CrossEntropyLoss())
    assert pruner.gradients == {}
    with pytest.raises(ValueError, match="prepared by ChannelPruner"):
        accumulate_gradients(fx_sparsity.prepare(model), [(x, torch.zeros(2))], nn.CrossEntropyLoss())
    pruner = ChannelPruner(0.5, criterion="activation")
    gm = pruner.prepare(model, example_inputs=x)
    with pytest.raises(ValueError, match="needs the activations 3.weight reads: run fx_sparsity.calibrate"):
        pruner.step()
