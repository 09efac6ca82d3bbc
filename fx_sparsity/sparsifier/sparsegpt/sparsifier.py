"""SparseGPT: one-shot pruning that updates the kept weights to preserve each layer's outputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from fx_sparsity.meta import QuantRecord, get_quantization, set_quantization
from fx_sparsity.quantization.gptq import check_dampening, check_quant_block_size
from fx_sparsity.quantization.rtn import dequantize
from fx_sparsity.quantization.spec import QuantizedWeight, QuantSpec, as_spec, check_fits
from fx_sparsity.sparsifier.base import BaseSparsifier
from fx_sparsity.sparsifier.mask_utils import validate_level
from fx_sparsity.sparsifier.nm.masks import validate_nm
from fx_sparsity.sparsifier.sparsegpt.obs import sparsegpt_prune, sparsegpt_quantize, validate_block_size
from passes import SparseTarget, get_sparse_target
from passes.calibration import InputHessianObserver
from passes.utils import fqns_read, set_tensor, tensor_aliases

__all__ = ["SparseGPTSparsifier", "INPUT_HESSIAN_KEY"]

# Where fx_sparsity.calibrate stores each weight's input Hessian: sparsifier.state[tensor_fqn][INPUT_HESSIAN_KEY].
INPUT_HESSIAN_KEY = "input_hessian"


class SparseGPTSparsifier(BaseSparsifier):
    r"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with weight updates, from input Hessians.

    :func:`fx_sparsity.calibrate` records each selected weight's input Hessian
    ``X^T X`` (float64; a conv's input unfolded to the weight's
    ``[out, in * kernel]`` view, one Hessian per conv group) in
    ``state[tensor_fqn]["input_hessian"]``; :meth:`step` then runs
    :func:`fx_sparsity.sparsifier.sparsegpt.obs.sparsegpt_prune` per weight: the mask is chosen
    per block of ``block_size`` columns (unstructured) or per ``m`` columns
    (``nm=(n, m)``, keeping ``n``), and the kept weights are updated to
    compensate. Weights are scored as ``weight * mask``, so pruned entries stay
    pruned when ``step`` runs again.

    The user's parameters are never written. The updated weight is a new tensor
    of the prepared module, registered under every name the old one had there
    (tied weights stay tied); the user's model keeps its dense tensors.
    ``squash_mask``, ``lower`` and ``gm.state_dict()`` carry the updated weights.
    A weight that an unmasked op also reads (an embedding tied to a masked head)
    is refused at :meth:`step`, since updating it would change that op.

    **Quantized and sparse.** With ``quantization`` (``"int8"``, ``"int4-g128"``, ... or a
    :class:`~fx_sparsity.quantization.QuantSpec`), each weight is pruned and quantized in one pass
    over its columns (the SparseGPT paper's joint mode:
    :func:`fx_sparsity.sparsifier.sparsegpt.obs.sparsegpt_quantize`): the updated weight written into
    the prepared module is exactly the dequantized ``scale * q`` (zero where pruned), and the grid values
    and scales are kept for lowering: :func:`fx_sparsity.quantization.get_quantization` (a
    :class:`fx_sparsity.meta.QuantRecord` per weight). A group whose ``quantization`` is ``None`` (a config
    entry may set it per weight) is pruned only, and loses any record it had. int4 needs the weight's
    columns (``in_features * kernel``) to be a multiple of the group size, and ``block_size`` a multiple
    of it: both are checked at ``prepare``, naming the weight.

    Memory: a Hessian of ``columns^2`` float64 values per weight stays in
    ``state`` (and in :meth:`state_dict`) until :meth:`step` runs again;
    ``step(release_statistics=True)``, as ``prune_sequential`` runs it, releases
    each one as its weight is pruned.

    Args:
        sparsity_level: fraction of each block to prune (unstructured).
        nm: ``(n, m)`` for N:M; then ``sparsity_level`` is not used.
        block_size: columns per block; a multiple of ``m`` with ``nm``.
        dampening: added to the Hessian's diagonal, as a fraction of its mean: a finite number ``>= 0``
            (infinity would swamp the Hessian; ``step()`` would then fail advising more dampening).
        quantization: ``None`` (prune only), or the grid to quantize every weight to while pruning it: a
            :class:`~fx_sparsity.quantization.QuantSpec` or its name (``"int8"``, ``"int4"``, ``"int4-g64"``,
            ``"int4-g128-zp"``); kept as its canonical name, so that state dicts stay plain data (which
            ``torch.load(weights_only=True)`` reads): give config entries names too.

    Example::

        >>> sparsifier = SparseGPTSparsifier(sparsity_level=0.5)
        >>> gm = fx_sparsity.prepare(model, sparsifier=sparsifier)
        >>> _ = fx_sparsity.calibrate(gm, batches, progress_bar=False)   # input Hessians
        >>> sparsifier.step()                     # masks, and updated weights in gm

    Pruned to 50% and quantized to int8 in one pass::

        >>> sparsifier = SparseGPTSparsifier(0.5, quantization="int8")
        >>> gm = fx_sparsity.prepare(model, sparsifier=sparsifier)
        >>> _ = fx_sparsity.calibrate(gm, batches, progress_bar=False)
        >>> sparsifier.step()
        >>> from fx_sparsity.quantization import dequantize, get_quantization
        >>> record = get_quantization(gm)["0.weight"]
        >>> torch.equal(gm.get_parameter("0.weight"), dequantize(record.quantized))
        True
    """

    calibration_key = INPUT_HESSIAN_KEY

    def __init__(
        self,
        sparsity_level: float = 0.5,
        nm: tuple[int, int] | None = None,
        block_size: int = 128,
        dampening: float = 0.01,
        quantization: QuantSpec | str | None = None,
    ) -> None:
        if quantization is not None:
            quantization = str(as_spec(quantization, "quantization"))
        defaults = {
            "sparsity_level": sparsity_level,
            "nm": nm,
            "block_size": block_size,
            "dampening": dampening,
            "quantization": quantization,
        }
        _validate(defaults, "")
        super().__init__(defaults=defaults)

    def validate_group(self, group: dict[str, Any], weight_shape: tuple[int, ...]) -> None:
        _validate(group, f" of {group['tensor_fqn']}")
        spec = _spec(group)
        if spec is not None:
            check_fits(spec, weight_shape, group["tensor_fqn"])

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """:meth:`BaseSparsifier.load_state_dict`; groups saved before the ``quantization`` argument existed
        load with ``quantization=None`` (what they did)."""
        groups = state_dict.get("groups") if isinstance(state_dict, Mapping) else None
        if isinstance(groups, list):
            filled = [{"quantization": None, **g} if isinstance(g, Mapping) else g for g in groups]
            state_dict = {**state_dict, "groups": filled}
        super().load_state_dict(state_dict, strict)

    def target_sparsity(self, group: dict[str, Any]) -> float:
        if group["nm"] is not None:
            n, m = group["nm"]
            return 1.0 - n / m
        return float(group["sparsity_level"])

    # The calibration protocol of fx_sparsity.calibrate: input Hessians.
    def calibration_observer(self, group: dict[str, Any], target: SparseTarget, ops: list[dict[str, Any]]) -> nn.Module:
        """An :class:`passes.calibration.InputHessianObserver` with the conv arguments of the group's ops."""
        return InputHessianObserver.for_target(target, ops)

    def calibration_statistic(self, group: dict[str, Any], observer: nn.Module) -> torch.Tensor:
        """``X^T X``: ``[groups, columns, columns]`` float64."""
        return observer.hessian()

    def prune(self, group: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new_weight, keep)`` of ``group`` from its Hessian; nothing is modified."""
        new_weight, keep, _ = self.prune_and_quantize(group)
        return new_weight, keep

    def prune_and_quantize(self, group: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, QuantizedWeight | None]:
        """``(new_weight, keep, quantized)`` of ``group`` from its Hessian (``quantized`` is ``None`` unless the
        group has a ``quantization``; then ``new_weight`` is its dequantized values); nothing is modified."""
        return self._prune_and_quantize(group, consume=False)

    def _prune_and_quantize(
        self, group: dict[str, Any], consume: bool
    ) -> tuple[torch.Tensor, torch.Tensor, QuantizedWeight | None]:
        """:meth:`prune_and_quantize`; with ``consume`` the Hessian leaves ``state`` first and is factorised in
        its own memory."""
        fqn = group["tensor_fqn"]
        hessian = self.state[fqn].get(INPUT_HESSIAN_KEY)
        if hessian is None:
            raise RuntimeError(f"no input Hessian for {fqn}: run fx_sparsity.calibrate(gm, batches) before step()")
        if consume:
            del self.state[fqn][INPUT_HESSIAN_KEY]
        weight = self.masked_tensor(group["module"], group["tensor_name"])
        nm = tuple(group["nm"]) if group["nm"] is not None else None
        args = (group["sparsity_level"], nm, group["block_size"], group["dampening"])
        spec = _spec(group)
        hessian = hessian.to(weight.device)
        try:
            if spec is None:
                return (*sparsegpt_prune(weight, hessian, *args, overwrite_hessian=consume), None)
            quantized, keep = sparsegpt_quantize(weight, hessian, spec, *args, overwrite_hessian=consume)
        except ValueError as e:
            raise ValueError(f"SparseGPT cannot prune {fqn}: {e}") from e
        return dequantize(quantized), keep, quantized

    def update_masks(self) -> None:
        """Prune every group first (any error leaves everything as it was), then write masks and weights; under
        ``step(release_statistics=True)`` one group at a time, each Hessian released as its weight is done."""
        model = self._require_model("step()")
        if self.releasing_statistics:
            every_aliases = [self._weight_aliases(model, group) for group in self.groups]  # refusals first
            for group, aliases in zip(self.groups, every_aliases):
                new_weight, keep, quantized = self._prune_and_quantize(group, consume=True)
                self._write(model, group, aliases, new_weight, keep)
                self._record(model, [(group, quantized)])
                del new_weight, keep, quantized
            return
        results = []
        for group in self.groups:
            aliases = self._weight_aliases(model, group)
            results.append((group, aliases, *self.prune_and_quantize(group)))
        for group, aliases, new_weight, keep, _ in results:
            self._write(model, group, aliases, new_weight, keep)
        self._record(model, [(group, quantized) for group, _, _, _, quantized in results])

    def update_mask(  # type: ignore[override]
        self, module: nn.Module, tensor_name: str, tensor_fqn: str, **kwargs: Any
    ) -> None:
        """Prune one group and write its mask and updated weight."""
        model = self._require_model("update_mask()")
        group = next(g for g in self.groups if g["tensor_fqn"] == tensor_fqn)
        aliases = self._weight_aliases(model, group)
        new_weight, keep, quantized = self.prune_and_quantize(group)
        self._write(model, group, aliases, new_weight, keep)
        self._record(model, [(group, quantized)])

    @staticmethod
    def _record(model: fx.GraphModule, results: list[tuple[dict[str, Any], QuantizedWeight | None]]) -> None:
        """Keep the quantization records of the quantized weights; drop those of the weights pruned only."""
        records = get_quantization(model)
        for group, quantized in results:
            records.pop(group["tensor_fqn"], None)
            if quantized is not None:
                records[group["tensor_fqn"]] = QuantRecord(group["tensor_fqn"], quantized, "sparsegpt")
        set_quantization(model, list(records.values()))

    @staticmethod
    def _weight_aliases(model: fx.GraphModule, group: dict[str, Any]) -> list[str]:
        """Every FQN of the group's weight in ``model``; refuses weights unmasked ops read too."""
        weight = getattr(group["module"], group["tensor_name"])
        aliases = tensor_aliases(model)[id(weight)]
        muls = [n for n in model.graph.nodes if (t := get_sparse_target(n)) is not None and t.role == "mask_mul"]
        mul = next(n for n in muls if get_sparse_target(n).tensor_fqn == group["tensor_fqn"])
        unmasked = fqns_read(model, aliases, skip=mul.all_input_nodes)
        if unmasked:
            raise ValueError(
                f"SparseGPT would change {group['tensor_fqn']}, which unmasked ops also read as {sorted(unmasked)} "
                "(a tied weight): exclude it from the config or mask every use"
            )
        return aliases

    def _write(
        self, model: fx.GraphModule, group: dict[str, Any], aliases: list[str], new_weight: torch.Tensor, keep: torch.Tensor
    ) -> None:
        old = getattr(group["module"], group["tensor_name"])
        new = self.to_stored_layout(group["module"], group["tensor_name"], new_weight).to(old.dtype).detach().contiguous()
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        set_tensor(model, aliases, new)
        self.get_mask(group["module"], group["tensor_name"]).copy_(keep)


def _validate(group: dict[str, Any], where: str) -> None:
    validate_level(group["sparsity_level"], f"sparsity_level{where}")
    nm = group["nm"]
    if nm is not None:
        if not isinstance(nm, (tuple, list)) or len(nm) != 2:
            raise TypeError(f"nm{where} must be a pair (n, m) like (2, 4), got {nm!r}")
        nm = validate_nm(*nm)
    try:
        validate_block_size(group["block_size"], nm)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{e}{where}") from None
    check_dampening(group["dampening"], f"dampening{where}")
    spec = _spec(group, where)
    if spec is not None:
        check_quant_block_size(group["block_size"], spec, f"block_size{where}")


def _spec(group: Mapping[str, Any], where: str = "") -> QuantSpec | None:
    """The group's quantization spec, or ``None`` (also for groups pickled before the argument existed)."""
    value = group.get("quantization")
    return None if value is None else as_spec(value, f"quantization{where}")
