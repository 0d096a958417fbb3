"""What `convert --quantize` stores for each source tensor, under bitsandbytes' state-dict names.

The four matmul weights of every block (and, if asked, the word embeddings) are stored the way
`bitsandbytes.nn.Linear8bitLt` / `Linear4bit` save them, so a converted directory loads with plain
`transformers.BloomForCausalLM.from_pretrained(DST)` (config.json gets a `quantization_config`):

    int8   <module>.weight (int8 [out, in]), <module>.SCB (fp32 [out])
    4-bit  <module>.weight (uint8 [out*in/2, 1]), <module>.weight.absmax, <module>.weight.quant_map,
           [<module>.weight.nested_absmax, <module>.weight.nested_quant_map,]
           <module>.weight.quant_state.bitsandbytes__nf4|fp4

Everything else (layernorms, biases) is stored as it is. With int8 embeddings next to 4-bit
blocks (`QuantSettings.settings_for`), the embeddings are stored as the int8 preset stores them.

Quantized word embeddings (`QuantSettings.embeddings`) are for the bloomconv runtime only:
transformers keeps `word_embeddings` an `nn.Embedding`; given bitsandbytes' config it would load
the int8 data into it without a word and fail at the first forward pass. Such a directory's
config.json gets a `quantization_config` without a `quant_method` instead, which every
transformers release refuses at `from_pretrained` (ValueError: "...has no `quant_method`
attribute..."), with a `bloomconv` entry saying why. (An unknown `quant_method` is no refusal:
recent transformers warn, skip the quantization and load the int8 bytes as numbers.)
"""
from __future__ import annotations

import json

import torch

from bloomconv.format import QuantType
from bloomconv.safetensors_io import StreamedTensor
from bloomconv.settings import QuantSettings
from bloomconv.storage import storage_for
from bloomconv.storage.base import NO_REPORT, ReadReport, stream_as_stored

__all__ = ["config_with_quantization", "encode_for_storage", "stream_computed", "stream_for_storage"]

_TIED_HEAD_MODULE = "lm_head"  # never stored (tied to the embeddings): transformers must not convert it
RUNTIME_ONLY_NOTE = ("quantized word embeddings: transformers cannot load this directory. Run it with bloomconv "
                     "(bloomconv.load, `bloomconv generate`), or quantize again with --no-embeddings.")


def encode_for_storage(name: str, tensor: torch.Tensor,
                       settings: QuantSettings) -> list[tuple[str, torch.Tensor, QuantType]]:
    """The (stored name, tensor, quant type) triples that represent one source tensor.

    >>> s = QuantSettings(QuantType.INT8)
    >>> [(n, t.dtype) for n, t, _ in encode_for_storage("transformer.h.0.self_attention.dense.weight",
    ...                                                   torch.ones(4, 16), s)]   # doctest: +NORMALIZE_WHITESPACE
    [('transformer.h.0.self_attention.dense.weight', torch.int8),
     ('transformer.h.0.self_attention.dense.SCB', torch.float32)]
    >>> encode_for_storage("transformer.ln_f.bias", torch.zeros(16), s)[0][2]
    <QuantType.NONE: 'none'>
    """
    chosen = settings.settings_for(name)
    if chosen is None:
        return [(name, tensor, QuantType.NONE)]
    module = name.removesuffix(".weight")
    stored = storage_for(chosen.quant_type).encode(tensor, chosen, name=name)
    return [(f"{module}.{key}", value, chosen.quant_type) for key, value in stored.items()]


def stream_for_storage(name: str, tensor: torch.Tensor, settings: QuantSettings | None,
                       report: ReadReport = NO_REPORT) -> list[tuple[str, StreamedTensor, QuantType]]:
    """`encode_for_storage` as the writer takes it: the same names, bytes and order, each stored
    tensor computed piece by piece as it is written (`Storage.encode_stream`); `report` hears what
    is read of `tensor`. `settings` None: stored as it is (a plain `convert`)."""
    chosen = settings.settings_for(name) if settings is not None else None
    if chosen is None:
        return [(name, stream_as_stored(tensor, report), QuantType.NONE)]
    module = name.removesuffix(".weight")
    stored = storage_for(chosen.quant_type).encode_stream(tensor, chosen, name=name, report=report)
    return [(f"{module}.{key}", value, chosen.quant_type) for key, value in stored.items()]


def stream_computed(name: str, stored: dict[str, torch.Tensor],
                    settings: QuantSettings) -> list[tuple[str, StreamedTensor, QuantType]]:
    """`stream_for_storage` of a weight whose stored tensors were computed beforehand (GPTQ's, by
    the storage type's own keys, in its order)."""
    module = name.removesuffix(".weight")
    return [(f"{module}.{key}", stream_as_stored(value), settings.quant_type) for key, value in stored.items()]


def config_with_quantization(config_bytes: bytes, settings: QuantSettings) -> bytes:
    """config.json with the `quantization_config` transformers needs to load the stored weights,
    or, with quantized embeddings, one it refuses (see the module docstring).

    The fields are those `BitsAndBytesConfig.to_dict()` writes. The 4-bit compute dtype is float32,
    transformers' default and the faster choice on CPUs without a fused 4-bit kernel. transformers
    reads each weight's quant type and block size from its stored state; these fields agree with it.

    >>> cfg = config_with_quantization(b'{"dtype": "bfloat16"}', QuantSettings(QuantType.NF4, 64))
    >>> json.loads(cfg)["quantization_config"]["bnb_4bit_quant_type"]
    'nf4'
    >>> list(json.loads(config_with_quantization(b'{}', QuantSettings(QuantType.INT8)))["quantization_config"])
    ['bloomconv']
    """
    config = json.loads(config_bytes)
    is_4bit = settings.quant_type.is_4bit
    config["quantization_config"] = {"bloomconv": RUNTIME_ONLY_NOTE} if settings.embeddings else {
        "quant_method": "bitsandbytes",
        "load_in_8bit": settings.quant_type is QuantType.INT8,
        "load_in_4bit": is_4bit,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": [_TIED_HEAD_MODULE],
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": settings.quant_type.value if is_4bit else "fp4",
        "bnb_4bit_use_double_quant": settings.double_quant,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
    }
    return (json.dumps(config, indent=2) + "\n").encode("utf-8")
