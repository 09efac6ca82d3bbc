"""Channel spaces for :mod:`passes.dependency`: a union-find with members, freeze reasons, blocks and
*relations*.

A relation says a fine space is a coarse one seen at a finer grain: channel ``c``
of the coarse space is channels ``c*f .. c*f+f-1`` of the fine one. Splitting
``[.., H*hd]`` into heads ``[.., H, hd]`` relates the channel space to a head space
(``f = hd``); aligning query heads with key/value heads repeated ``n_rep`` times
(grouped-query attention) relates the query heads to the KV heads (``f = n_rep``).
When the groups are built, a fine space is absorbed into its coarse one, its
members' ``inner`` multiplied by ``f``: removing a KV head removes its query group.
"""

from __future__ import annotations

import dataclasses
from math import gcd
from typing import Any

__all__ = ["Spaces"]


class Spaces:
    """Union-find over channel spaces, each with its members, freeze reasons and block count."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.members: dict[int, list] = {}
        self.reasons: dict[int, list[str]] = {}
        self.blocks: dict[int, int] = {}
        self.inexact: dict[int, list[str]] = {}
        self._owner: dict[Any, int] = {}
        self.relations: list[tuple[int, int, int]] = []

    def new(self, size: int) -> int:
        s = len(self.parent)
        self.parent.append(s)
        self.size.append(size)
        self.members[s], self.reasons[s], self.blocks[s], self.inexact[s] = [], [], 1, []
        return s

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        a, b = sorted((self.find(a), self.find(b)))
        if a == b:
            return
        if self.size[a] != self.size[b]:
            reason = f"coupled channel spaces of sizes {self.size[a]} and {self.size[b]}"
            self.freeze(a, reason)
            self.freeze(b, reason)
            return
        self.parent[b] = a
        self.members[a] += self.members.pop(b)
        self.reasons[a] += self.reasons.pop(b)
        self.inexact[a] += self.inexact.pop(b)
        self.set_blocks(a, self.blocks.pop(b))

    def add(self, s: int, member: Any) -> None:
        """Add ``member`` to ``s``'s group; the same tensor slice seen twice (a shared layer) unites the groups."""
        root = self.find(s)
        if member.kind not in ("module", "literal") and member in self._owner:
            self.union(self._owner[member], root)
            return
        self._owner[member] = root
        self.members[root].append(member)

    def freeze(self, s: int, reason: str) -> None:
        self.reasons[self.find(s)].append(reason)

    def set_blocks(self, s: int, blocks: int) -> None:
        root = self.find(s)
        lcm = self.blocks[root] * blocks // gcd(self.blocks[root], blocks)
        if self.size[root] % lcm:
            self.freeze(root, f"{self.size[root]} channels do not split into {lcm} equal blocks")
        self.blocks[root] = lcm

    def roots(self) -> list[int]:
        return sorted({self.find(s) for s in range(len(self.parent))})

    def relate(self, fine: int, coarse: int, factor: int) -> None:
        """Record that ``fine`` is ``coarse`` with each channel repeated ``factor`` times."""
        self.relations.append((fine, coarse, factor))

    def _absorb(self) -> dict[int, tuple[int, int]]:
        """Fine root -> (coarse root, factor), after uniting coarse spaces that one fine space maps onto alike."""
        while True:
            coarser: dict[int, tuple[int, int]] = {}
            united = False
            for fine, coarse, factor in self.relations:
                rf, rc = self.find(fine), self.find(coarse)
                if rf == rc:
                    self.freeze(rf, "a channel space maps onto itself at another grain")
                    continue
                if rf not in coarser:
                    coarser[rf] = (rc, factor)
                    continue
                other, other_factor = self.find(coarser[rf][0]), coarser[rf][1]
                if other != rc and other_factor == factor:
                    self.union(other, rc)
                    united = True
                    break
                if other_factor != factor:
                    for root in (rf, rc, other):
                        self.freeze(root, "heads or channels are grouped at two different grains")
            if not united:
                return coarser

    def resolve(self) -> list[dict[str, Any]]:
        """The final groups: one dict (size, members, reasons, inexact, blocks) per root not absorbed."""
        coarser = self._absorb()
        groups: dict[int, dict[str, Any]] = {}

        def final(root: int) -> tuple[int, int]:
            factor, seen = 1, set()
            while root in coarser and root not in seen:
                seen.add(root)
                root, f = self.find(coarser[root][0]), coarser[root][1]
                factor *= f
            return root, factor

        for root in self.roots():
            target, factor = final(root)
            group = groups.setdefault(
                target, {"size": self.size[target], "members": [], "reasons": [], "inexact": [], "blocks": 1}
            )
            group["members"] += [dataclasses.replace(m, inner=m.inner * factor) if m.kind != "module" else m
                                 for m in self.members[root]]
            group["reasons"] += self.reasons[root]
            group["inexact"] += self.inexact[root]
            blocks = self.blocks[root]
            if group["size"] % blocks:
                group["reasons"].append(f"{blocks} blocks do not align with {group['size']} heads")
            group["blocks"] = group["blocks"] * blocks // gcd(group["blocks"], blocks)
        groups = {r: g for r, g in sorted(groups.items())}
        _freeze_overlaps(groups)
        return list(groups.values())


def _freeze_overlaps(groups: dict[int, dict[str, Any]]) -> None:
    """Freeze groups that slice overlapping ranges of one tensor dim (only whole spaces are followed)."""
    ranges: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    for root, group in groups.items():
        for m in dict.fromkeys(group["members"]):
            if m.kind not in ("module", "literal"):
                ranges.setdefault((m.target, m.dim), []).append((m.offset, m.offset + group["size"] * m.inner, root))
    for (target, dim), spans in ranges.items():
        for i, (lo, hi, r) in enumerate(spans):
            for lo2, hi2, r2 in spans[i + 1 :]:
                if r != r2 and lo < hi2 and lo2 < hi:
                    for root in (r, r2):
                        groups[root]["reasons"].append(f"{target} dim {dim} is cut by two channel groups")
