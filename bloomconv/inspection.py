"""`inspect`: what a bloomconv directory holds, from its manifest alone (reads no weights)."""
from __future__ import annotations

import os
from pathlib import Path

from .geometry import Geometry
from .manifest import Manifest, read_manifest


def inspect(directory: str | os.PathLike) -> dict:
    """Geometry, dtype, quantization, per-file and total sizes of a bloomconv directory.

    >>> inspect("bloom-560m-int8")["total_bytes"]     # doctest: +SKIP
    """
    manifest = read_manifest(Path(directory))
    weight_files = [f for f in manifest.files if f.tensors]
    geometry = Geometry(**{k: manifest.model[k] for k in
                           ("hidden_size", "n_layer", "n_head", "vocab_size", "layer_norm_epsilon")})
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
        "total_bytes": sum(f.size for f in manifest.files),
        "parameters": geometry.parameter_count(),
        "transformers": transformers_support(manifest),
    }


def transformers_support(manifest: Manifest) -> str:
    """What `transformers.BloomForCausalLM.from_pretrained(DIR)` does with the directory (tested in
    tests/test_shipping.py): it loads and computes what the runtime computes, or it refuses."""
    quantization = manifest.quantization
    if quantization is None:
        return "loads"
    if not quantization.embeddings:
        return f"loads with bitsandbytes ({quantization.quant_type.value} blocks)"
    if manifest.format_version == 1:  # its config.json still names bitsandbytes: loads, then fails
        return "fails at the first forward pass: quantized embeddings (bloomconv runtime only)"
    return "refused: quantized embeddings (bloomconv runtime only)"
