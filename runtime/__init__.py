"""Run a bloomconv directory on a desktop, one block of weights at a time, within a RAM budget.

>>> import bloomconv.runtime
>>> model = bloomconv.runtime.load("bloom-560m-blocks")                   # doctest: +SKIP
>>> model.generate(["Hello,", "The sea is"], max_new_tokens=20)           # doctest: +SKIP
>>> logits = model(model.tokenizer("Hello,"))                             # doctest: +SKIP
>>> logits, past = model.forward(input_ids)                               # doctest: +SKIP
>>> bloomconv.runtime.load("bloom-7b1-blocks", ram_budget="6GB", threads=2)  # doctest: +SKIP

Weights that fit the RAM budget are read once into memory; the rest stream from disk every
forward pass, a piece at a time, read ahead on a background thread (see `checkpoint`).

The runtime never imports `bloomconv.converters` or transformers (start-up stays ~torch's own).
"""
from .generate import (Bloom, Config, GenerationOptions, GenerationStats, Tokenizer, load, next_tokens,
                       repetition_penalty, top_k_mask, top_p_mask)
from .memory import parse_size
from .model import KVCache
from .residency import Residency

__all__ = ["Bloom", "Config", "GenerationOptions", "GenerationStats", "KVCache", "Residency", "Tokenizer", "load",
           "next_tokens", "parse_size", "repetition_penalty", "top_k_mask", "top_p_mask"]
