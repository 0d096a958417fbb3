"""Typed views of the tensors of one file: what the forward pass reads from each unit.

`UnitBytes` holds a file's tensors by name (views of its bytes, wherever they are: a RAM copy, the
file mapping); `block_weights`, `embedding_weights` and `final_weights` give them as records, with
each matrix decoded by the storage type its manifest entry names (`bloomconv.storage`). Records are
built once per UnitBytes, so a pinned file's parsed state lives as long as its bytes.

>>> block = block_weights(unit_bytes, 3)                                  # doctest: +SKIP
>>> block.query_key_value.weight.shape
(3072, 1024)
"""
from __future__ import annotations

import dataclasses

import torch

from bloomconv.errors import SourceError
from bloomconv.format import PREFIX, QuantType
from bloomconv.safetensors_io import SafetensorsHeader, torch_dtype
from bloomconv.storage import StoredWeight, decode_module

__all__ = ["BLOCK_LINEARS", "BlockWeights", "EMBEDDING_LINEARS", "EmbeddingWeights", "LayerNormWeights",
           "LinearWeights", "UnitBytes", "aligned", "block_weights", "embedding_weights", "final_weights",
           "widened_bytes"]

# The matrices of each file in the order a forward pass multiplies by them (streamed pieces are
# read in this order). The embedding matrix is multiplied once per pass, as the tied lm_head.
BLOCK_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                 "mlp.dense_4h_to_h")
EMBEDDING_LINEARS = ("word_embeddings",)


def _in_dtype(cache: dict, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, converted once per record and kept in its `cache`: a file's records
    live as long as it, so its small vectors are not converted again every token (~200
    conversions of bf16 layer-norm weights and biases per bloom-560m decoding step in fp32)."""
    if (key, dtype) not in cache:
        cache[key, dtype] = tensor.to(dtype)
    return cache[key, dtype]


@dataclasses.dataclass(frozen=True)
class LayerNormWeights:
    weight: torch.Tensor  # (hidden,)
    bias: torch.Tensor    # (hidden,)
    _converted: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def to(self, device) -> "LayerNormWeights":
        return LayerNormWeights(self.weight.to(device), self.bias.to(device))

    def in_dtype(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) in `dtype`, converted once."""
        return (_in_dtype(self._converted, "weight", self.weight, dtype),
                _in_dtype(self._converted, "bias", self.bias, dtype))


@dataclasses.dataclass(frozen=True)
class LinearWeights:
    weight: StoredWeight  # (out, in), in whatever storage the file has
    bias: torch.Tensor    # (out,)
    _converted: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def bias_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The bias in `dtype`, converted once."""
        return _in_dtype(self._converted, "bias", self.bias, dtype)


@dataclasses.dataclass(frozen=True)
class BlockWeights:
    input_layernorm: LayerNormWeights
    query_key_value: LinearWeights
    dense: LinearWeights
    post_attention_layernorm: LayerNormWeights
    dense_h_to_4h: LinearWeights
    dense_4h_to_h: LinearWeights


@dataclasses.dataclass(frozen=True)
class EmbeddingWeights:
    word_embeddings: StoredWeight  # (vocab, hidden); also the tied lm_head
    layernorm: LayerNormWeights


class UnitBytes:
    """The tensors of one safetensors file by name: views of its bytes (a mapping or a buffer),
    with the storage type the manifest records for each (`quant`)."""

    def __init__(self, tensors: dict[str, torch.Tensor], quant: dict[str, QuantType],
                 misaligned: dict[str, tuple[torch.Tensor, torch.dtype, tuple[int, ...]]] | None = None):
        self._tensors = tensors
        self._misaligned = misaligned or {}  # name -> (its bytes, dtype, shape): copied when first used
        self.quant = quant
        self._records: dict = {}

    def records(self, key, build):
        """`build()`'s weight records over these views, built once per UnitBytes: a pinned file's
        records (parsed 4-bit state, int8 row scales) then live as long as its bytes instead of
        being rebuilt every token."""
        if key not in self._records:
            self._records[key] = build()
        return self._records[key]

    @classmethod
    def parse(cls, header: SafetensorsHeader, data: torch.Tensor, quant: dict[str, QuantType]) -> "UnitBytes":
        """Views of `data` (uint8, the whole file) where `header` places each tensor. A tensor that
        does not start at a multiple of its item size (after an odd-sized 4-bit state blob) cannot
        be viewed: it is copied, when first used."""
        tensors, misaligned = {}, {}
        for name, info in header.tensors.items():
            dtype = torch_dtype(info.dtype)
            start = header.data_start + info.begin
            raw = data[start:header.data_start + info.end]
            if start % dtype.itemsize:
                misaligned[name] = (raw, dtype, info.shape)
            else:
                tensors[name] = raw.view(dtype).reshape(info.shape)
        return cls(tensors, quant, misaligned)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by name (copying the misaligned ones now)."""
        for name in list(self._misaligned):
            self.get(name)
        return self._tensors

    def get(self, name: str) -> torch.Tensor | None:
        if name in self._misaligned:
            raw, dtype, shape = self._misaligned.pop(name)
            self._tensors[name] = raw.clone().view(dtype).reshape(shape)
        return self._tensors.get(name)

    def to(self, device: torch.device) -> "UnitBytes":
        """Copies on `device`, queued on the current stream (see Transformer._on_device)."""
        return UnitBytes({name: t.to(device, non_blocking=True) for name, t in self.tensors.items()}, self.quant)

    def weight(self, module: str) -> StoredWeight:
        """The matrix `<module>.weight`, decoded by the storage type its manifest entry names."""
        name = f"{module}.weight"
        if name not in self.quant:
            raise SourceError(name, "is not listed in the manifest",
                              "The directory is damaged; verify it and copy the named file again.")
        return decode_module(module, self.quant[name], self.get)

    def widened_into(self, memory: torch.Tensor) -> "UnitBytes":
        """A copy in `memory` (uint8, at least `widened_bytes` of every tensor) with 16-bit float
        tensors as float32 (quantized data and its fp32 state unchanged): the form fp32 compute
        multiplies fastest, at up to twice the RAM."""
        tensors, offset = {}, 0
        for name, tensor in self.tensors.items():
            dtype = torch.float32 if _is_narrow_float(tensor.dtype) else tensor.dtype
            size = widened_bytes(tensor.dtype, tensor.numel())
            tensors[name] = memory[offset:offset + size].view(dtype).view(tensor.shape).copy_(tensor)
            offset += aligned(size)  # every tensor 64-byte aligned, as fused kernels want
        return UnitBytes(tensors, self.quant)


def _is_narrow_float(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def widened_bytes(dtype: torch.dtype, numel: int) -> int:
    """Bytes of a tensor once `UnitBytes.widened_into` has widened it."""
    return numel * (4 if _is_narrow_float(dtype) else dtype.itemsize)


def aligned(size: int) -> int:
    return -(-size // 64) * 64


def embedding_weights(source: UnitBytes) -> EmbeddingWeights:
    return source.records("embeddings", lambda: EmbeddingWeights(
        source.weight(f"{PREFIX}{EMBEDDING_LINEARS[0]}"), _layer_norm(source, f"{PREFIX}word_embeddings_layernorm")))


def block_weights(source: UnitBytes, index: int) -> BlockWeights:
    module = f"{PREFIX}h.{index}"

    def build() -> BlockWeights:
        qkv, dense, h_to_4h, four_h_to_h = (_linear(source, f"{module}.{name}") for name in BLOCK_LINEARS)
        return BlockWeights(input_layernorm=_layer_norm(source, f"{module}.input_layernorm"),
                            query_key_value=qkv, dense=dense,
                            post_attention_layernorm=_layer_norm(source, f"{module}.post_attention_layernorm"),
                            dense_h_to_4h=h_to_4h, dense_4h_to_h=four_h_to_h)
    return source.records(("block", index), build)


def final_weights(source: UnitBytes) -> LayerNormWeights:
    return source.records("final", lambda: _layer_norm(source, f"{PREFIX}ln_f"))


def _layer_norm(source: UnitBytes, module: str) -> LayerNormWeights:
    return LayerNormWeights(source.get(f"{module}.weight"), source.get(f"{module}.bias"))


def _linear(source: UnitBytes, module: str) -> LinearWeights:
    return LinearWeights(source.weight(module), source.get(f"{module}.bias"))
