"""Progress reporting without tying the library to a terminal.

Library functions take `progress`, a factory called like `tqdm(total=..., desc=..., unit="B")`
that returns a context manager with `update(n)`. The CLI passes tqdm; the default does nothing.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Protocol


class Bar(Protocol):
    def update(self, n: int = 1) -> Any: ...


ProgressFactory = Callable[..., ContextManager[Bar]]


class _NullBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


def no_progress(**_kwargs) -> _NullBar:
    return _NullBar()
