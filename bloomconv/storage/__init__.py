"""The storage types of a bloomconv directory, one class each, found by the manifest's `quant` tag.

    none   DenseStorage   (dense.py)    bf16 / fp16 / fp32 as in the source
    int8   Int8Storage    (int8.py)     LLM.int8() vector-wise: int8 rows + fp32 row absmax
    nf4    NF4Storage     (fourbit.py)  bitsandbytes blockwise 4-bit, NormalFloat code
    fp4    FP4Storage     (fourbit.py)  bitsandbytes blockwise 4-bit, FP4 code

>>> from bloomconv.format import QuantType
>>> storage_for("int8").stored_names(None)
('weight', 'SCB')
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from bloomconv.format import QuantType

from .base import CHUNK_ELEMENTS, Lookup, Storage, StoredWeight, register, registered_types, storage_for
from .dense import DenseStorage, DenseWeight
from .fourbit import FourBitStorage, FourBitWeight, FP4Storage, NF4Storage
from .int8 import Int8Storage, Int8Weight

__all__ = ["CHUNK_ELEMENTS", "DenseStorage", "DenseWeight", "FP4Storage", "FourBitStorage", "FourBitWeight",
           "Int8Storage", "Int8Weight", "Lookup", "NF4Storage", "Storage", "StoredWeight", "decode_module",
           "dequantize_directory", "dequantize_tensors", "register", "registered_types", "storage_for"]


def decode_module(module: str, quant: QuantType | str, lookup: Lookup) -> StoredWeight:
    """The weight `<module>.weight` stored as `quant` (its manifest tag), from `lookup(full_name)`."""
    return storage_for(quant).decode(lambda key: lookup(f"{module}.{key}"), name=f"{module}.weight")


def dequantize_tensors(tensors: Mapping[str, torch.Tensor], quant: Mapping[str, QuantType | str],
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A plain state dict from stored tensors (a unit file, or a whole directory's) and the manifest's
    `quant` tag of each: every quantized `<module>.weight` becomes the matrix it encodes, in
    `dtype`; the tensors of its state go with it; unquantized tensors pass through.

    >>> from bloomconv.storage.int8 import quantize_int8
    >>> CB, SCB = quantize_int8(torch.ones(4, 64))
    >>> sorted(dequantize_tensors({"m.weight": CB, "m.SCB": SCB, "m.bias": torch.zeros(4)},
    ...                           {"m.weight": "int8", "m.SCB": "int8", "m.bias": "none"}))
    ['m.bias', 'm.weight']
    """
    out = {}
    for name, tensor in tensors.items():
        tag = QuantType(quant[name])
        if tag is QuantType.NONE:
            out[name] = tensor
        elif name.endswith(".weight"):
            out[name] = decode_module(name.removesuffix(".weight"), tag, tensors.get).dequantize(dtype)
    return out


def dequantize_directory(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of a bloomconv directory as a plain state dict (transformers' names), quantized
    weights dequantized to `dtype` by the storage type its manifest records. Holds the whole model
    in memory: for inspection and evaluation of small models, not for running large ones.

    >>> state = dequantize_directory("bloom-560m-int8")                 # doctest: +SKIP
    """
    from safetensors.torch import load_file

    from bloomconv.manifest import read_manifest
    directory = Path(directory)
    tensors, quant = {}, {}
    for entry in read_manifest(directory).files:
        if entry.tensors:
            tensors.update(load_file(directory / entry.name))
            quant.update({t.name: t.quant for t in entry.tensors})
    return dequantize_tensors(tensors, quant, dtype)
