"""bloomconv: make huge BLOOM checkpoints shippable and runnable on small machines.

>>> import bloomconv
>>> bloomconv.convert("bloom-560m", "bloom-560m-blocks")        # doctest: +SKIP
>>> bloomconv.verify("bloom-560m-blocks")                         # doctest: +SKIP
>>> model = bloomconv.load("bloom-560m-blocks")                   # doctest: +SKIP
>>> model.generate("The capital of France is", max_new_tokens=8)  # doctest: +SKIP
"""
import time as _time

__version__ = "0.1.0"
IMPORTED_AT = _time.monotonic()  # start of "start-to-ready" (see process_stats.py)

__all__ = ["__version__", "convert", "inspect", "load", "quantize", "verify"]


def __getattr__(name):
    # Lazy so `import bloomconv` stays cheap and the runtime never pulls in the converters.
    if name == "convert":
        from .converters.convert import convert
        return convert
    if name == "quantize":
        from .converters.convert import quantize
        return quantize
    if name == "load":
        from .runtime import load
        return load
    if name == "verify":
        from .verify import verify
        return verify
    if name == "inspect":
        from .inspect import inspect
        return inspect
    raise AttributeError(name)
