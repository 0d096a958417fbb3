"""The bloomconv directory format, in one place (format version 2).

Every file name, tensor-name template and quantization type that the converters write and the
runtime and verifier read is defined here; nothing else hard-codes them.

Layout of a converted directory (every file at the top level, where vLLM, TGI and accelerate's
disk offload look for the shards)::

    config.json, tokenizer files          copied from the source, with the other small files a
    README.md, LICENSE, …                 model repository carries (`is_carried_file`)
    embeddings.safetensors                transformer.word_embeddings.* + word_embeddings_layernorm.*
    block_000.safetensors …               transformer.h.<i>.* (one transformer block each)
    final.safetensors                     transformer.ln_f.* (lm_head is tied: never stored)
    model.safetensors.index.json          lets transformers' from_pretrained read the directory
    SHA256SUMS                            `sha256sum -c` compatible, written before the manifest, ends
                                          with the manifest's own hash
    manifest.json                         written last: a directory with a manifest is complete
    model.sig                             optional, after the manifest: an OpenSSF model-signing
                                          signature over every other file (`bloomconv sign`)

Format version 1 differed only in placing the blocks in a `blocks/` folder; it is still read
(`unit_file` names a unit's file for either version).
"""
from __future__ import annotations

import enum

FORMAT_NAME = "bloomconv"
FORMAT_VERSION = 2              # what the converters write
READABLE_FORMAT_VERSIONS = (1, 2)
LEGACY_BLOCKS_DIR = "blocks"    # format 1: blocks/block_000.safetensors

# What the sources name their files (transformers' conventions; bigscience/bloom's shards).
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAME = "pytorch_model.bin"
PICKLE_SHARD_TEMPLATE = "pytorch_model_{number:05d}-of-{count:05d}.bin"
SAFETENSORS_SINGLE_NAME = "model.safetensors"
SAFETENSORS_SHARD_TEMPLATE = "model-{number:05d}-of-{count:05d}.safetensors"

MANIFEST_NAME = "manifest.json"
CHECKSUMS_NAME = "SHA256SUMS"
HF_INDEX_NAME = "model.safetensors.index.json"  # written by convert, read in safetensors-shards sources
CONFIG_NAME = "config.json"
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Bookkeeping of an unfinished run; never part of a finished directory.
JOB_NAME = ".bloomconv-job.json"
JOURNAL_DIR = ".bloomconv-journal"
LOCK_NAME = ".bloomconv.lock"
TMP_MARKER = ".tmp-"
# The job record's entry saying the run signs the directory once its manifest is written: until
# the signature is there, the directory is not complete.
JOB_SIGNATURE_KEY = "signature"

# A detached signature in the OpenSSF model-signing format (a Sigstore bundle; the name is
# `model_signing sign`'s default). It covers every file of the directory except these: itself, a
# run's bookkeeping and what the Hub adds (model_signing also always leaves out git's files:
# .git/, .gitattributes, .github/, .gitignore). Names are relative: a signed directory verifies
# wherever it is copied.
SIGNATURE_NAME = "model.sig"

# What else a model repository carries that travels with the weights (README.md model card,
# LICENSE, generation_config.json, …): every regular, non-hidden file at the top of the source
# up to this size that is not weights, an index or a manifest. Config and tokenizer files are
# always copied, whatever their size.
CARRIED_FILE_MAX_BYTES = 10 * 1000 * 1000
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".ot", ".onnx",
                   ".tflite", ".gguf", ".ggml", ".pkl", ".pickle", ".npy", ".npz", ".joblib")
INDEX_SUFFIX = ".index.json"

# What the Hugging Face Hub adds to a downloaded directory: `hf download --local-dir` keeps its
# download metadata in .cache/huggingface/, and every Hub repository has a .gitattributes.
# `verify` ignores exactly these (and says so).
HUB_ADDED_NAMES = (".gitattributes", ".cache/huggingface")
UNSIGNED_NAMES = (SIGNATURE_NAME, JOB_NAME, LOCK_NAME, JOURNAL_DIR, *HUB_ADDED_NAMES)
# A Hugging Face cache: models--<org>--<name>/{refs/main, snapshots/<rev>/<file> -> ../../blobs/<hash>}
HF_CACHE_REPO_PREFIX = "models--"
HF_CACHE_SNAPSHOTS = "snapshots"
HF_CACHE_BLOBS = "blobs"
HF_CACHE_MAIN_REF = "refs/main"

EMBEDDINGS_UNIT = "embeddings"
FINAL_UNIT = "final"
BLOCK_UNIT_TEMPLATE = "block_{index:03d}"

PREFIX = "transformer."
EMBEDDING_TENSORS = ("word_embeddings.weight", "word_embeddings_layernorm.weight",
                     "word_embeddings_layernorm.bias")
FINAL_TENSORS = ("ln_f.weight", "ln_f.bias")
BLOCK_TENSORS = (
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
    "self_attention.dense.weight", "self_attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
)
# The four matmul weights of a block: what `quantize` converts by default.
BLOCK_LINEAR_WEIGHTS = (
    "self_attention.query_key_value.weight", "self_attention.dense.weight",
    "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight",
)
EMBEDDING_WEIGHT = "word_embeddings.weight"
TIED_HEAD = "lm_head.weight"


def block_unit(index: int) -> str:
    return BLOCK_UNIT_TEMPLATE.format(index=index)


def unit_file(unit: str, format_version: int = FORMAT_VERSION) -> str:
    """Relative path of the safetensors file holding one unit, in a directory of `format_version`.

    >>> unit_file("block_007"), unit_file("block_007", 1), unit_file("final", 1)
    ('block_007.safetensors', 'blocks/block_007.safetensors', 'final.safetensors')
    """
    if format_version == 1 and unit.startswith("block_"):
        return f"{LEGACY_BLOCKS_DIR}/{unit}.safetensors"
    return f"{unit}.safetensors"


def is_carried_file(name: str, size: int) -> bool:
    """Whether a source file (top-level `name`, `size` bytes) other than config and tokenizer is
    copied into the converted directory: small, not hidden, not weights, an index, a manifest or a
    signature (which vouches for the source, not for the conversion)."""
    return (size <= CARRIED_FILE_MAX_BYTES and not name.startswith(".")
            and not name.lower().endswith((*WEIGHT_SUFFIXES, INDEX_SUFFIX))
            and name not in (MANIFEST_NAME, CHECKSUMS_NAME, SIGNATURE_NAME, JOB_NAME, LOCK_NAME))


def block_tensor(index: int, local_name: str) -> str:
    """Stored (prefixed) name of a block tensor, e.g. transformer.h.3.mlp.dense_4h_to_h.bias."""
    return f"{PREFIX}h.{index}.{local_name}"


def unit_tensor_names(unit: str) -> list[str]:
    """Unprefixed source names of the tensors a unit holds, in storage order."""
    if unit == EMBEDDINGS_UNIT:
        return list(EMBEDDING_TENSORS)
    if unit == FINAL_UNIT:
        return list(FINAL_TENSORS)
    index = int(unit.removeprefix("block_"))
    return [f"h.{index}.{name}" for name in BLOCK_TENSORS]


def all_units(n_layer: int) -> list[str]:
    return [EMBEDDINGS_UNIT, *(block_unit(i) for i in range(n_layer)), FINAL_UNIT]


class QuantType(str, enum.Enum):
    """How a weight is stored. Values are what the manifest records."""

    NONE = "none"
    INT8 = "int8"  # LLM.int8() vector-wise: int8 [out, in] + SCB (row absmax, fp32)
    NF4 = "nf4"    # bitsandbytes blockwise 4-bit, NormalFloat code
    FP4 = "fp4"    # bitsandbytes blockwise 4-bit, FP4 code

    @property
    def is_4bit(self) -> bool:
        return self in (QuantType.NF4, QuantType.FP4)


# int8: "float16" quantizes the fp16 cast of the weight, as Int8Params/Linear8bitLt/transformers
# do, so the stored bytes equal transformers' own save; "source" quantizes the weight as it is.
INT8_SCALE_FROM = ("float16", "source")
# QuantSettings.embeddings of a 4-bit quantization whose word embeddings are stored int8 (as the
# int8 preset stores them) next to its 4-bit blocks; recorded as such in manifest.json
INT8_EMBEDDINGS = QuantType.INT8.value
BLOCK_SIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
NESTED_BLOCK_SIZE = 256                                        # double quant: one absmax per 256 absmax


# Suffixes bitsandbytes' state dicts use next to a quantized `<name>.weight`.
INT8_SCALE_SUFFIX = "SCB"                   # <module>.SCB
QUANT_ABSMAX_SUFFIX = "absmax"              # <module>.weight.absmax
QUANT_MAP_SUFFIX = "quant_map"              # <module>.weight.quant_map
NESTED_ABSMAX_SUFFIX = "nested_absmax"
NESTED_QUANT_MAP_SUFFIX = "nested_quant_map"
QUANT_STATE_SUFFIX_TEMPLATE = "quant_state.bitsandbytes__{quant_type}"

SAFETENSORS_DTYPES = {
    # safetensors dtype code -> (torch dtype name, item size in bytes): the one dtype table
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "I16": ("int16", 2),
    "I32": ("int32", 4), "I64": ("int64", 8), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F32": ("float32", 4), "F64": ("float64", 8),
}
SOURCE_FLOAT_DTYPES = ("bfloat16", "float16", "float32")  # what checkpoints may hold, and weights quantize from
NARROW_FLOAT_DTYPES = ("BF16", "F16")                       # 16-bit floats, widened for fp32 compute
ITEMSIZE = {name: size for name, size in SAFETENSORS_DTYPES.values()}  # torch dtype name -> bytes


def dtype_name(dtype) -> str:
    """A torch dtype's name as manifests, configs and SAFETENSORS_DTYPES spell it: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def is_quantized_weight(name: str, embeddings: bool) -> bool:
    """Whether `quantize` stores this (unprefixed or prefixed) source tensor quantized: the four
    matmul weights of every block, and the word embeddings when asked."""
    name = name.removeprefix(PREFIX)
    if name == EMBEDDING_WEIGHT:
        return embeddings
    head, index, local = (name.split(".", 2) + ["", ""])[:3]
    return head == "h" and index.isdigit() and local in BLOCK_LINEAR_WEIGHTS
