"""One sparsified weight: a typed, frozen record, with torch.ao.pruning's dict view on top.

:class:`WeightGroup` is what the library reads (schedulers, reports, ``lower``,
the CLI): the weight's FQN, op kind and shape, and the sparsifier arguments
that apply to it. :class:`GroupView` is what ``sparsifier.groups`` holds, for
code written against torch.ao.pruning: a mapping with the keys of a torch.ao
group (``tensor_fqn``, ``module_fqn``, ``tensor_name``, ``module`` and the
arguments). Writing an argument through the view (``group["sparsity_level"] =
0.8``, as schedulers do) validates the new value first and then replaces the
record; the keys that name the weight cannot be written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

__all__ = ["WeightGroup", "GroupView", "STRUCTURAL_KEYS"]

# Keys of a torch.ao.pruning group that name the weight rather than configure it.
STRUCTURAL_KEYS = ("tensor_fqn", "module_fqn", "tensor_name", "module")


@dataclass(frozen=True)
class WeightGroup:
    """One selected weight and the sparsifier arguments for it.

    Attributes:
        tensor_fqn: canonical FQN of the weight (``"layer1.fc.weight"``).
        kind: the op reading it: ``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"conv3d"`` or
            ``"lstm"`` (an ``nn.LSTM`` parameter, masked by ``ChannelPruner`` only).
        weight_shape: the weight's shape.
        args: the merged sparsifier arguments (defaults, then the config entry's keys); read-only.
        transposed: the weight is stored ``[in, out]`` (an ``x @ W`` product, transformers' ``Conv1D``);
            sparsifiers see it, and its mask, in the ``[out, in]`` view all other weights have.

    Example::

        >>> g = WeightGroup("fc.weight", "linear", (4, 8), {"sparsity_level": 0.5})
        >>> g.module_fqn, g.tensor_name, g.with_args(sparsity_level=0.9).args["sparsity_level"]
        ('fc', 'weight', 0.9)
    """

    tensor_fqn: str
    kind: str
    weight_shape: tuple[int, ...]
    args: Mapping[str, Any] = field(default_factory=dict)
    transposed: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_shape", tuple(self.weight_shape))
        object.__setattr__(self, "args", MappingProxyType(dict(self.args)))

    @property
    def module_fqn(self) -> str:
        return self.tensor_fqn.rpartition(".")[0]

    @property
    def tensor_name(self) -> str:
        return self.tensor_fqn.rpartition(".")[2]

    @property
    def view_shape(self) -> tuple[int, ...]:
        """The shape sparsifiers score: ``[out, in, ...]``, the stored shape reversed for a transposed weight."""
        return self.weight_shape[::-1] if self.transposed else self.weight_shape

    def with_args(self, **changes: Any) -> WeightGroup:
        """A copy whose arguments are updated by ``changes``."""
        return dataclasses.replace(self, args={**self.args, **changes})

    def to_dict(self) -> dict[str, Any]:
        """torch.ao.pruning's group dict, without the module: names, then arguments."""
        return {
            "tensor_fqn": self.tensor_fqn,
            "module_fqn": self.module_fqn,
            "tensor_name": self.tensor_name,
            **self.args,
        }

    def __reduce__(self):  # MappingProxyType does not pickle: rebuild from a plain dict
        return (WeightGroup, (self.tensor_fqn, self.kind, self.weight_shape, dict(self.args), self.transposed))


class GroupView(MutableMapping):
    """torch.ao.pruning's view of one group: ``group["sparsity_level"]``, ``group["module"]``.

    Args:
        record: the typed group.
        module: the module owning the weight and its mask in the prepared ``GraphModule``.
        validate: called with the candidate record before an argument is written;
            raises ``ValueError``/``TypeError`` to refuse it.
    """

    def __init__(self, record: WeightGroup, module: nn.Module, validate: Callable[[WeightGroup], None]) -> None:
        self.record = record
        self.module = module
        self._validate = validate

    def __getitem__(self, key: str) -> Any:
        if key == "module":
            return self.module
        if key in ("tensor_fqn", "module_fqn", "tensor_name"):
            return getattr(self.record, key)
        return self.record.args[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in STRUCTURAL_KEYS:
            raise KeyError(f"group[{key!r}] names the weight and cannot be changed; prepare the model again instead")
        if key not in self.record.args:
            raise KeyError(
                f"{key!r} is not an argument of the group of {self.record.tensor_fqn}; "
                f"its arguments are {sorted(self.record.args)}"
            )
        candidate = self.record.with_args(**{key: value})
        self._validate(candidate)
        self.record = candidate

    def __delitem__(self, key: str) -> None:
        raise KeyError(f"cannot delete group[{key!r}]: a group keeps all its keys")

    def __iter__(self) -> Iterator[str]:
        yield from STRUCTURAL_KEYS
        yield from self.record.args

    def __len__(self) -> int:
        return len(STRUCTURAL_KEYS) + len(self.record.args)

    def __repr__(self) -> str:
        return f"GroupView({self.record!r})"
