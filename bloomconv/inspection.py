"""`inspect`: what a bloomconv directory holds, from its manifest alone (reads no weights)."""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from .format import BLOCK_SIZES_4BIT, PREFIX, SAFETENSORS_DTYPES, QuantType
from .errors import ManifestError
from .geometry import Geometry
from .manifest import Manifest, read_manifest



def inspect(directory: str | os.PathLike) -> dict:
    """Geometry, dtype, quantization, per-file and total sizes of a bloomconv directory.

    >>> inspect("bloom-560m-int8")["total_bytes"]     # doctest: +SKIP
    """
    manifest = read_manifest(Path(directory))
    weight_files = [f for f in manifest.files if f.tensors]
    geometry = _geometry(manifest)
    total_bytes = sum(f.size for f in manifest.files)
    return {
        "directory": str(directory),
        "format_version": manifest.format_version,
        "tool_version": manifest.tool_version,
        "model": manifest.model,
        "quantization": manifest.quantization.to_dict() if manifest.quantization else None,
        "source_layout": manifest.source_layout,
        "source_bytes": sum(f.size for f in manifest.source_files),
        "stored_tensors": sum(len(f.tensors) for f in weight_files),
        "files": [{"name": f.name, "size": f.size, "tensors": len(f.tensors)} for f in manifest.files],
        "weight_bytes": sum(f.size for f in weight_files),
        "total_bytes": total_bytes,
        "parameters": geometry.parameter_count(),
        "bits_per_weight": bits_per_weight(manifest),
        "size_ratio_to_16bit": size_ratio_to_16bit(manifest),
        "transformers": transformers_support(manifest),
        "warnings": [warning] if (warning := bitsandbytes_cpu_warning(manifest)) else [],
    }


def _geometry(manifest: Manifest) -> Geometry:
    return Geometry(**{k: manifest.model[k] for k in
                       ("hidden_size", "n_layer", "n_head", "vocab_size", "layer_norm_epsilon")})


def tensor_bytes(manifest: Manifest) -> int:
    """Bytes of every stored tensor's data, as the manifest records them: weights quantized or not,
    their quantization state (scales, code tables, bitsandbytes' state blob), embeddings, layer
    norms and biases; not the safetensors headers, config or tokenizer."""
    total = 0
    for entry in manifest.files:
        for tensor in entry.tensors:
            if tensor.dtype not in SAFETENSORS_DTYPES:
                raise ManifestError(entry.name, f"tensor {tensor.name} has dtype {tensor.dtype!r}, which safetensors "
                                    "does not define", "Copy manifest.json again from the source of this directory.")
            total += math.prod(tensor.shape) * SAFETENSORS_DTYPES[tensor.dtype][1]
    return total


def bits_per_weight(manifest: Manifest) -> float:
    """8 × `tensor_bytes` ÷ the model's parameter count (every tensor of the model, the tied lm_head
    once), as llama.cpp counts its BPW (all tensors' bytes × 8 ÷ all their elements): 16.0 for an
    unquantized bf16 directory; the 16-bit embeddings and norms count in a quantized one."""
    return 8 * tensor_bytes(manifest) / _geometry(manifest).parameter_count()


def size_ratio_to_16bit(manifest: Manifest) -> float:
    """Bytes of every file of the directory ÷ the model's parameters × 2 bytes (its size unquantized
    in bf16/fp16, BLOOM's release dtypes)."""
    return sum(f.size for f in manifest.files) / (2 * _geometry(manifest).parameter_count())


def bitsandbytes_cpu_misdecodes(shape: tuple[int, int], block_size: int) -> bool:
    """Whether bitsandbytes 0.50's CPU `dequantize_4bit` decodes a (rows, cols) weight stored in
    blocks of `block_size` wrongly (evidence: tests/test_evaluation.py). Its AVX-512 kernel (the
    one CPUs with AVX-512F run) looks up the absmax of element (r, c) as r·⌊cols/block⌋ +
    ⌊c/block⌋, as if every row started a block, whereas blocks run over the flattened weight: the
    two agree for every element iff block divides cols, or there is one row, or the whole weight
    is one block. Rows whose length is odd or not a multiple of 16, and blocks of 2048 or more,
    go through bitsandbytes' other, correct kernels."""
    rows, cols = shape
    return (cols % 16 == 0 and cols % block_size != 0 and rows > 1 and rows * cols > block_size
            and block_size < 2048)


def bitsandbytes_cpu_warning(manifest: Manifest) -> str | None:
    """One line naming the 4-bit weights `bitsandbytes_cpu_misdecodes`, or None."""
    quantization = manifest.quantization
    if quantization is None or not quantization.quant_type.is_4bit:
        return None
    # one block's shapes stand for every block's (a manifest may claim any number of blocks)
    shapes = {name.removeprefix("h.0."): shape
              for name, shape in dataclasses.replace(_geometry(manifest), n_layer=1).expected_shapes().items()}
    quantized = {_local_name(t.name) for f in manifest.files for t in f.tensors
                 if t.quant.is_4bit and t.name.endswith(".weight")}
    block = quantization.block_size
    affected = sorted((name, shapes[name]) for name in quantized
                      if name in shapes and bitsandbytes_cpu_misdecodes(shapes[name], block))
    if not affected:
        return None
    columns = sorted({shape[1] for _, shape in affected})
    dividing = [b for b in BLOCK_SIZES_4BIT if b < block and all(c % b == 0 for c in columns)]
    advice = (f"quantize with --block-size {dividing[-1]}, which divides the rows, to load it there"
              if dividing else "no 4-bit block size divides the rows: use int8 to load it there")
    what = ", ".join(f"{name} ({rows}x{cols})" for name, (rows, cols) in affected)
    return (f"block size {block} does not divide the rows of {what}: bloomconv's runtime decodes them correctly, "
            f"but transformers + bitsandbytes 0.50 on an AVX-512 CPU computes wrong weights from them; {advice}")


def _local_name(name: str) -> str:
    """transformer.h.3.mlp.dense_4h_to_h.weight -> mlp.dense_4h_to_h.weight (the same in every block);
    tensors outside the blocks keep their unprefixed name."""
    name = name.removeprefix(PREFIX)
    head, index, local = (name.split(".", 2) + ["", ""])[:3]
    return local if head == "h" and index.isdigit() else name


_RUNTIME_ONLY = "quantized embeddings (bloomconv runtime only; `quantize --no-embeddings` writes the layout it loads)"


def transformers_support(manifest: Manifest) -> str:
    """What `transformers.BloomForCausalLM.from_pretrained(DIR)` does with the directory (tested in
    tests/test_shipping.py): it loads and computes what the runtime computes, or it refuses."""
    quantization = manifest.quantization
    if quantization is None:
        return "loads"
    if not quantization.embeddings:
        return f"loads with bitsandbytes ({quantization.quant_type.value} blocks)"
    if manifest.format_version == 1:  # its config.json still names bitsandbytes: loads, then fails
        return "fails at the first forward pass: " + _RUNTIME_ONLY
    return "refused: " + _RUNTIME_ONLY
