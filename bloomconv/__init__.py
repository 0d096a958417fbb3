"""bloomconv: make huge BLOOM checkpoints shippable and runnable on small machines.

>>> import bloomconv
>>> bloomconv.convert("bloom-560m", "bloom-560m-blocks")                        # doctest: +SKIP
>>> bloomconv.quantize("bloom-560m", "bloom-560m-nf4", bits=4, block_size=64)   # doctest: +SKIP
>>> bloomconv.verify("bloom-560m-blocks").ok                                     # doctest: +SKIP
>>> bloomconv.sign("bloom-560m-blocks", bloomconv.SigningKey("private.pem"))    # doctest: +SKIP
>>> bloomconv.verify("bloom-560m-blocks", public_key="public.pem").signature     # doctest: +SKIP
>>> bloomconv.inspect("bloom-560m-nf4")["quantization"]                          # doctest: +SKIP
>>> bloomconv.evaluate("bloom-560m-nf4", Path("wiki.txt"), reference="bloom-560m")  # doctest: +SKIP
>>> model = bloomconv.load("bloom-560m-blocks")                                  # doctest: +SKIP
>>> model.generate("The capital of France is", max_new_tokens=8)                 # doctest: +SKIP

Every public name is a function or class defined elsewhere and imported on first use, so
`import bloomconv` stays cheap and the runtime never pulls in the converters. No submodule shares
a public name (`bloomconv.verification` holds `verify`, `bloomconv.inspection` holds `inspect`):
importing a submodule binds it as a package attribute, which would shadow a function of that name.
"""
import importlib as _importlib
import time as _time

__version__ = "0.1.0"
IMPORTED_AT = _time.monotonic()  # start of "start-to-ready" (see process_stats.py)

# public name -> module that defines it
_EXPORTS = {
    "convert": ".converters.convert",
    "quantize": ".converters.convert",
    "verify": ".verification",
    "sign": ".signing",
    "SigningKey": ".signing",
    "inspect": ".inspection",
    "evaluate": ".evaluation",
    "load": ".runtime",
    "QuantSettings": ".settings",
    "QuantType": ".format",
    "BloomconvError": ".errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bloomconv' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # bound once: later lookups never reach __getattr__
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
