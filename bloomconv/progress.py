"""Progress reporting without tying the library to a terminal.

Library functions take `progress`, a factory called like `tqdm(total=..., desc=..., unit="B")`
that returns a context manager with `update(n)`. The default, `no_progress`, does nothing;
`terminal_progress` is the one the CLI passes, and works for library callers too:

>>> bloomconv.convert("bloom-560m", "out", progress=terminal_progress("convert"))   # doctest: +SKIP
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, ContextManager, Protocol

__all__ = ["Bar", "ProgressFactory", "no_progress", "terminal_progress"]


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


def terminal_progress(name: str | None = None, *, disable: bool = False) -> ProgressFactory:
    """tqdm bars on stderr, following tqdm's conventions: shown only when stderr is a terminal (a CI
    log gets no carriage returns or block characters), never when TQDM_DISABLE is set to a non-empty
    value (as tqdm reads it) or `disable` is true. `name` labels every bar, whatever the library
    function calls it (`quantize` runs `convert`'s loop but its bar says "quantize").

    Read here because tqdm turns TQDM_DISABLE into the default of its `disable` argument, and the
    terminal check needs that argument passed (`disable=None`), which would override it.
    """
    def factory(**kwargs):
        from tqdm import tqdm
        if name is not None:
            kwargs["desc"] = name
        off = True if disable or os.environ.get("TQDM_DISABLE") else None  # None: tqdm asks isatty()
        return tqdm(**kwargs, disable=off, leave=False, dynamic_ncols=True, file=sys.stderr)
    return factory
