"""Channel spaces for :mod:`passes.dependency`: a union-find with members, freeze reasons, blocks and
*relations*.

A relation says a fine space is a coarse one seen at a finer grain: channel ``c``
of the coarse space is channels ``c*f .. c*f+f-1`` of the fine one. Splitting
``[.., H*hd]`` into heads ``[.., H, hd]`` relates the channel space to a head space
(``f = hd``); aligning query heads with key/value heads repeated ``n_rep`` times
(grouped-query attention) relates the query heads to the KV heads (``f = n_rep``).
When the groups are built, a fine space is absorbed into its coarse one, its
members' ``inner`` multiplied by ``f``: removing a KV head removes its query group.

A *split* cuts a space into consecutive pieces, new spaces of their own (GPT-2's
``c_attn`` output split into q, k and v; MobileViTv2's ``split_with_sizes`` into query,
key and value): when the groups are built, every member of the cut space is handed to
each piece at the piece's offset (a producer row ``c`` of piece ``k`` is row
``start_k + c``), with its freeze reasons and notes, before relations are absorbed.
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
        self.splits: list[tuple[int, tuple[int, ...]]] = []

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

    def split(self, s: int, sizes: list[int]) -> list[int]:
        """New spaces for consecutive pieces of ``s`` of ``sizes`` channels (summing to its size); ``s``'s members go
        to them when the groups are built (:meth:`resolve`)."""
        assert sum(sizes) == self.size[self.find(s)], (sizes, self.size[self.find(s)])
        pieces = tuple(self.new(n) for n in sizes)
        self.splits.append((s, pieces))
        return list(pieces)

    def _cut(self) -> None:
        """Hand each cut space's members, reasons and notes to its pieces. A space cut at two different places,
        one with a piece united back into it, or one related to heads or in blocks keeps its members and is frozen
        with its pieces."""
        cuts: dict[int, tuple[int, ...]] = {}
        refused: dict[int, str] = {}
        for s, pieces in self.splits:
            root = self.find(s)
            if root not in cuts:
                cuts[root] = pieces
            elif [self.size[p] for p in cuts[root]] == [self.size[p] for p in pieces]:
                for p, q in zip(cuts[root], pieces):  # the same cut twice (two splits of one tensor)
                    self.union(p, q)
            else:
                cuts[root] += pieces
                refused[root] = "its channels are split at two different places"
        related = {self.find(s) for fine, coarse, _ in self.relations for s in (fine, coarse)}
        done: dict[int, tuple[int, ...]] = {}
        for s, pieces in cuts.items():
            root = self.find(s)
            if root in done:  # two cuts met through the pieces united above (each piece cut again)
                refused[s] = "its channels are split at two different places"
                pieces += done[root]
            elif any(self.find(p) == root for p in pieces):
                refused[s] = "a piece of its split is combined with the whole"
            elif root in related or self.blocks[root] > 1:
                refused[s] = "a split cuts channels that are grouped into heads or blocks"
            if s in refused:
                for p in (root, *pieces):
                    self.freeze(p, refused[s])
                continue
            done[root] = pieces
            members, self.members[root] = self.members[root], []
            start = 0
            for p in pieces:
                self.reasons[self.find(p)] += self.reasons[root]
                self.inexact[self.find(p)] += self.inexact[root]
                for m in members:
                    self._move(m, root, p, start)
                start += self.size[p]

    def _move(self, m: Any, root: int, piece: int, start: int) -> None:
        """Add member ``m`` of cut space ``root`` to ``piece``, which starts at channel ``start`` of it."""
        if m.kind == "module":
            self.members[self.find(piece)].append(m)
            return
        if m.kind == "literal":  # one copy per piece: the size loses every piece's channels
            self.members[self.find(piece)].append(dataclasses.replace(m, part=piece))
            return
        shifted = dataclasses.replace(m, offset=m.offset + start * m.inner)
        owner = self._owner.get(shifted)
        if owner is not None and self.find(owner) not in (root, self.find(piece)):  # a shared layer's slice
            self.union(owner, piece)
            return
        self._owner[shifted] = self.find(piece)
        self.members[self.find(piece)].append(shifted)

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
        self._cut()
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
