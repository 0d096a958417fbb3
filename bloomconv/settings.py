"""How `quantize` stores a directory's weights: `QuantSettings`, its defaults and its validation.

The defaults of each quantization type are the presets — the same for `bloomconv quantize --bits`,
`--recipe`, `bloomconv.quantize(...)` and `QuantSettings(...)` — and every combination of options
is checked here, whatever the entry point.

>>> QuantSettings(QuantType.NF4)            # doctest: +NORMALIZE_WHITESPACE
QuantSettings(quant_type=<QuantType.NF4: 'nf4'>, block_size=32, double_quant=True, embeddings='int8',
              int8_scale_from='float16', method='rtn', calibration_sha256=None, calibration_tokens=None)
>>> QuantSettings(QuantType.NF4, embeddings=False, int8_scale_from="source")
Traceback (most recent call last):
bloomconv.errors.OptionsError: int8_scale_from applies to int8 only (--bits 8, or 4-bit with int8 embeddings), not nf4 with 16-bit embeddings. Drop it.
"""
from __future__ import annotations

import dataclasses
import functools

from .errors import OptionsError
from .format import (BLOCK_SIZES_4BIT, EMBEDDING_WEIGHT, INT8_EMBEDDINGS, INT8_SCALE_FROM, PREFIX, QuantType,
                     is_quantized_weight)

__all__ = ["DEFAULT_CALIBRATION_TOKENS", "INT8_EMBEDDINGS", "METHODS", "PRESETS", "QuantSettings",
           "settings_from_options"]

# The presets: what each quantization type stores when an option is not given.
PRESETS: dict[QuantType, dict] = {
    # int8 embeddings halve the tied lm_head's bytes; the row absmax of the fp16 cast is what
    # Linear8bitLt/transformers store, so the bytes equal their own save
    QuantType.INT8: {"block_size": None, "double_quant": False, "embeddings": True, "int8_scale_from": "float16"},
    # 4-bit: the smallest round-to-nearest layout no worse than bitsandbytes' NF4 block 64 on every
    # model of bench/bench_quality.py (worst case, not mean); block 32 divides every hidden size
    # bitsandbytes' CPU decoder reads correctly (see inspection.py). The embeddings int8, as the
    # int8 preset stores them: the tied lm_head is read whole at every step; --no-embeddings keeps
    # them 16-bit, the layout transformers loads
    QuantType.NF4: {"block_size": 32, "double_quant": True, "embeddings": INT8_EMBEDDINGS, "int8_scale_from": None},
    QuantType.FP4: {"block_size": 32, "double_quant": True, "embeddings": INT8_EMBEDDINGS, "int8_scale_from": None},
}
_FIELDS = ("quant_type", "block_size", "double_quant", "embeddings", "int8_scale_from")
# How weights are rounded onto the stored grid; every method stores the same layout:
#   rtn     round to nearest with the block (row) absmax: bitsandbytes' own quantizer, bit for bit
#   search  per block (row), the scale with the least squared reconstruction error
#   gptq    calibrated: columns rounded in order, each one's error compensated by the later
#           columns through the layer inputs' Hessian (Frantar et al., ICLR 2023)
METHODS = ("rtn", "search", "gptq")
_METHOD_FIELDS = ("method", "calibration_sha256", "calibration_tokens")  # absent from records of rtn
DEFAULT_CALIBRATION_TOKENS = 65536


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    """How `quantize` stored the weights; absent (None) for a plain `convert`. Options left None
    take the preset of `quant_type`."""

    quant_type: QuantType
    block_size: int | None = None          # 4-bit: elements per absmax
    double_quant: bool | None = None       # 4-bit: absmax themselves quantized (bitsandbytes nested)
    embeddings: bool | str | None = None   # word embeddings (= the tied lm_head) quantized too; 4-bit: "int8"
                                           # stores them int8 (the int8 preset's way) next to 4-bit blocks
    int8_scale_from: str | None = None     # int8 (and int8 embeddings): dtype the row absmax is taken in
                                           # ("float16" | "source")
    method: str = "rtn"                    # one of METHODS
    calibration_sha256: str | None = None  # gptq: sha256 of the calibration text
    calibration_tokens: int | None = None  # gptq: at most this many calibration tokens are used

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        try:
            set_("quant_type", QuantType(self.quant_type))
        except ValueError:
            raise OptionsError(f"quantization type {self.quant_type!r} is unknown. Use int8, nf4 or fp4.") from None
        kind = self.quant_type.value
        if self.quant_type not in PRESETS:
            raise OptionsError(f"{kind!r} is not a quantization. Use int8, nf4 or fp4 (or plain convert).")
        if self.int8_scale_from is not None and self.int8_scale_from not in INT8_SCALE_FROM:
            raise OptionsError(f"int8 scale source {self.int8_scale_from!r} is unknown. "
                               f"Use one of {', '.join(INT8_SCALE_FROM)}.")
        if self.quant_type is QuantType.INT8:
            if self.block_size is not None:
                raise OptionsError("block size applies to 4-bit (nf4, fp4) only, not int8. Drop it, or use --bits 4.")
            if self.double_quant:
                raise OptionsError("double quant applies to 4-bit (nf4, fp4) only, not int8. Drop it, or use --bits 4.")
        elif self.block_size is not None and self.block_size not in BLOCK_SIZES_4BIT:
            raise OptionsError(f"4-bit block size {self.block_size} is not one bitsandbytes supports. "
                               f"Use one of {', '.join(map(str, BLOCK_SIZES_4BIT))}.")
        for field, default in PRESETS[self.quant_type].items():
            if getattr(self, field) is None:
                set_(field, default)
        if (self.quant_type is not QuantType.INT8 and self.int8_scale_from is not None
                and self.embeddings != INT8_EMBEDDINGS):
            raise OptionsError(f"int8_scale_from applies to int8 only (--bits 8, or 4-bit with int8 embeddings), not "
                               f"{kind} with {'4-bit' if self.embeddings else '16-bit'} embeddings. Drop it.")
        if not isinstance(self.double_quant, bool):
            raise OptionsError(f"double_quant must be true or false, not {self.double_quant!r}.")
        if self.embeddings == INT8_EMBEDDINGS and self.quant_type is QuantType.INT8:
            raise OptionsError("int8 embeddings go with 4-bit blocks. Drop --int8-embeddings (--bits 8 stores "
                               "them int8 already), or use --bits 4.")
        if not isinstance(self.embeddings, bool) and self.embeddings != INT8_EMBEDDINGS:
            raise OptionsError(f"embeddings must be true, false or {INT8_EMBEDDINGS!r}, not {self.embeddings!r}.")
        if self.embeddings == INT8_EMBEDDINGS and self.int8_scale_from is None:
            set_("int8_scale_from", PRESETS[QuantType.INT8]["int8_scale_from"])
        self._check_method()

    def _check_method(self) -> None:
        if self.method is None:
            object.__setattr__(self, "method", "rtn")
        if self.method not in METHODS:
            raise OptionsError(f"quantization method {self.method!r} is unknown. Use one of {', '.join(METHODS)}.")
        if self.method != "gptq":
            if self.calibration_sha256 is not None or self.calibration_tokens is not None:
                raise OptionsError(f"calibration text applies to method gptq only, not {self.method}. "
                                   "Drop --calibrate, or use --method gptq.")
            return
        digest = self.calibration_sha256
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")):
            raise OptionsError("method gptq needs calibration text. Give --calibrate FILE.txt "
                               "(bloomconv.quantize(..., calibrate='FILE.txt')).")
        if self.calibration_tokens is None:
            object.__setattr__(self, "calibration_tokens", DEFAULT_CALIBRATION_TOKENS)
        if type(self.calibration_tokens) is not int or self.calibration_tokens < 1:
            raise OptionsError(f"calibration tokens must be a positive integer, not {self.calibration_tokens!r}.")

    def settings_for(self, name: str) -> "QuantSettings | None":
        """How the source tensor `name` is stored: these settings, the int8 settings of int8
        embeddings, or None where it is stored as it is."""
        if not is_quantized_weight(name, bool(self.embeddings)):
            return None
        if self.embeddings == INT8_EMBEDDINGS and name.removeprefix(PREFIX) == EMBEDDING_WEIGHT:
            return QuantSettings(QuantType.INT8, embeddings=True, int8_scale_from=self.int8_scale_from,
                                 method=self.weight_only_method)
        return self

    @property
    def weight_only_method(self) -> str:
        """How a weight is rounded from itself alone: gptq needs the inputs of a block's linears, so
        a weight it does not reach (the word embeddings) gets the scale search instead."""
        return "search" if self.method == "gptq" else self.method

    def to_dict(self) -> dict:
        """The record a manifest keeps. Round to nearest records no method, as before methods
        existed, so its records (and the jobs of older runs) are unchanged."""
        d = {"quant_type": self.quant_type.value, "block_size": self.block_size,
             "double_quant": self.double_quant, "embeddings": self.embeddings,
             "int8_scale_from": self.int8_scale_from}
        if self.method != "rtn":
            d["method"] = self.method
        if self.method == "gptq":
            d.update(calibration_sha256=self.calibration_sha256, calibration_tokens=self.calibration_tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSettings":
        """From a manifest record: every field present (a record states what was done); a record
        without a method is round to nearest."""
        if not isinstance(d, dict) or not set(_FIELDS) <= set(d) <= {*_FIELDS, *_METHOD_FIELDS}:
            raise ValueError("quantization record has unexpected keys")
        try:
            return cls(**d)
        except OptionsError as exc:
            raise ValueError(str(exc)) from None


def settings_from_options(bits: int | str | None = None, *, quant_type: str | None = None,
                          base: QuantSettings | None = None, **options) -> QuantSettings:
    """Settings from command-line style options: `bits` 8 or 4 (4-bit: `quant_type` nf4 by
    default), or a recipe's `base` settings, overridden by `options` (block_size, double_quant,
    embeddings, int8_scale_from, method, calibration_sha256, calibration_tokens; None means "not
    given"). Contradictions raise OptionsError.

    >>> settings_from_options(4, block_size=64).block_size
    64
    """
    options = {k: v for k, v in options.items() if v is not None}
    unknown = set(options) - {*_FIELDS[1:], *_METHOD_FIELDS}
    if unknown:
        raise OptionsError(f"unknown quantization option(s) {', '.join(sorted(unknown))}. "
                           f"Use {', '.join((*_FIELDS[1:], *_METHOD_FIELDS))}.")
    if (bits is None) == (base is None):
        raise OptionsError("give either bits (8 or 4) or a recipe. E.g. `bloomconv quantize --bits 8 SRC DST`.")
    if base is not None:
        if quant_type is not None and quant_type != base.quant_type.value:
            raise OptionsError(f"the recipe stores {base.quant_type.value}; quant type {quant_type} contradicts it. "
                               f"Pick the recipe ending in -{quant_type}, or drop the quant type.")
        chosen = base.quant_type
        # a recipe's own values give way to the options given; the type's rules still apply
        fields = {**{k: v for k, v in base.to_dict().items() if k != "quant_type"}, **options}
        return QuantSettings(chosen, **fields)
    if str(bits) == "8":
        if quant_type not in (None, "int8"):
            raise OptionsError(f"quant type {quant_type} is 4-bit; it does not go with 8 bits. Use --bits 4.")
        return QuantSettings(QuantType.INT8, **options)
    if str(bits) == "4":
        if quant_type == "int8":
            raise OptionsError("quant type int8 does not go with 4 bits. Use --bits 8.")
        return QuantSettings(quant_type or QuantType.NF4, **options)
    raise OptionsError(f"bits must be 8 or 4, not {bits!r}.")
