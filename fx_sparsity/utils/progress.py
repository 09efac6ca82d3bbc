"""Progress bars for long loops (calibration, auto-tuning), off with ``progress=False``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["progress"]

T = TypeVar("T")


def progress(items: Iterable[T], enabled: bool, desc: str, total: int | None = None) -> Iterator[T]:
    """``items``, behind a tqdm bar on stderr when ``enabled``."""
    if not enabled:
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, leave=False)
