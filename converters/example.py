"""Write example BLOOM checkpoints in each layout bloomconv reads.

`TRAINED` is the small trained model that ships with bloomconv (trained_example.py), for the README
example: its output reads like text. Any other geometry gets random weights, for the tests and the
benchmarks, built with `transformers.BloomForCausalLM` (so the weights have the real module
structure). Both are saved exactly as the releases are. No network: a random model's tokenizer is a
small byte-level BPE trained here on Python's own documentation strings.
"""
from __future__ import annotations

import json
import os
import pydoc
from pathlib import Path

import torch

from bloomconv.errors import OptionsError
from bloomconv.format import (BLOCK_TENSORS, CONFIG_NAME, EMBEDDING_TENSORS, FINAL_TENSORS, HF_INDEX_NAME,
                              PICKLE_INDEX_NAME, PICKLE_SHARD_TEMPLATE, PICKLE_SINGLE_NAME, PREFIX,
                              SAFETENSORS_SHARD_TEMPLATE, SAFETENSORS_SINGLE_NAME, TOKENIZER_NAMES, dtype_name)
from bloomconv.geometry import Geometry

from .destination import explain_os_error

LAYOUTS = ("release-pickle-shards", "safetensors-shards", "pickle-single", "safetensors-single")
TRAINED = "trained"  # the shipped trained model, not a random one
GEOMETRIES = {
    # name: (hidden_size, n_layer, n_head, vocab_size)
    "tiny": (64, 2, 4, 1024),
    "small": (256, 4, 8, 4096),
    "bloom-560m": (1024, 24, 16, 250880),
}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FILL_ELEMENTS = 1 << 24  # random values drawn per step when writing a large checkpoint
_GEOMETRY_FIX = (f"Use one of {', '.join(GEOMETRIES)}, or HIDDEN,LAYERS,HEADS,VOCAB: four positive integers "
                 "with HIDDEN a multiple of HEADS, e.g. 64,2,4,1024.")


def parse_geometry(geometry: str | tuple) -> tuple[int, int, int, int]:
    """(hidden_size, n_layer, n_head, vocab_size) from a name in GEOMETRIES, "HIDDEN,LAYERS,HEADS,VOCAB"
    or a tuple of four; an OptionsError naming the fix for anything else.

    >>> parse_geometry("tiny"), parse_geometry("128,2,4,1000")
    ((64, 2, 4, 1024), (128, 2, 4, 1000))
    """
    if isinstance(geometry, str):
        if geometry in GEOMETRIES:
            return GEOMETRIES[geometry]
        try:
            dims = tuple(int(x) for x in geometry.split(","))
        except ValueError:
            dims = ()
    else:
        dims = tuple(geometry)
    if len(dims) != 4 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise OptionsError(f"geometry {geometry!r} is neither a known name nor four positive integers. {_GEOMETRY_FIX}")
    hidden, _, n_head, _ = dims
    if hidden % n_head:
        raise OptionsError(f"geometry {geometry!r}: hidden size {hidden} is not divisible by {n_head} heads. "
                           f"{_GEOMETRY_FIX}")
    return dims


def bloom_config(hidden_size: int, n_layer: int, n_head: int, vocab_size: int):
    from transformers import BloomConfig
    return BloomConfig(hidden_size=hidden_size, n_layer=n_layer, n_head=n_head, vocab_size=vocab_size,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


def random_state_dict(config, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unprefixed state dict of a randomly initialised BloomForCausalLM (lm_head dropped: tied)."""
    from transformers import BloomForCausalLM
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = BloomForCausalLM(config).to(dtype)
    state = {k.removeprefix(PREFIX): v.contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    del model
    return state


def write_example_checkpoint(dst: str | os.PathLike, geometry: str | tuple = "tiny",
                             layout: str = "release-pickle-shards", dtype: torch.dtype = torch.bfloat16,
                             seed: int = 0, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a random BLOOM checkpoint to `dst` in `layout`; return `dst`. `geometry` is what
    `parse_geometry` takes. An argument out of range raises OptionsError before anything is
    written; a write that fails, DestinationError.

    >>> write_example_checkpoint("/tmp/bloom-tiny", "tiny")          # doctest: +SKIP
    """
    if layout not in LAYOUTS:
        raise OptionsError(f"unknown layout {layout!r}. Choose one of {', '.join(LAYOUTS)}.")
    if dtype not in DTYPES:
        raise OptionsError(f"dtype {dtype} is not one BLOOM releases use. Choose torch.bfloat16, torch.float16 "
                           "or torch.float32.")
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise OptionsError(f"seed {seed!r} is out of range. Use an integer from 0 to 2**64 - 1.")
    if geometry == TRAINED:
        config, state = _trained_model(dtype)
    else:
        config = bloom_config(*parse_geometry(geometry))
    dst = Path(dst)
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise explain_os_error(dst, exc) from exc
    state = state if state is not None else random_state_dict(config, dtype, seed)
    config.dtype = dtype_name(dtype)
    try:
        (dst / CONFIG_NAME).write_text(config.to_json_string())
        if geometry == TRAINED:
            _copy_side_files(dst)
        else:
            write_tokenizer(dst, min(config.vocab_size, 512))
        if layout == "release-pickle-shards":
            groups = _release_groups(config.n_layer)
            _write_release_shards(dst, ({k: state[k] for k in keys} for keys in groups), groups)
        elif layout == "pickle-single":
            torch.save({PREFIX + k: v for k, v in state.items()}, dst / PICKLE_SINGLE_NAME)
        else:
            _write_safetensors(dst, state, sharded=layout == "safetensors-shards")
    except OSError as exc:
        raise explain_os_error(dst, exc) from exc
    return dst


def _trained_model(dtype: torch.dtype):
    """(config, unprefixed state dict in `dtype`) of the shipped trained model."""
    from safetensors.torch import load_file
    from transformers import BloomConfig

    from .trained_example import packaged_model
    folder = packaged_model()
    config = BloomConfig.from_json_file(folder / CONFIG_NAME)
    state = {k.removeprefix(PREFIX): v.to(dtype) for k, v in load_file(folder / SAFETENSORS_SINGLE_NAME).items()}
    return config, state


def _copy_side_files(dst: Path) -> None:
    """The shipped model's tokenizer and model card, as a release carries them."""
    from .trained_example import packaged_model
    folder = packaged_model()
    for name in (*TOKENIZER_NAMES, "README.md"):
        if (folder / name).is_file():
            (dst / name).write_bytes((folder / name).read_bytes())


def write_large_release_checkpoint(dst: str | os.PathLike, geometry: tuple, dtype: torch.dtype = torch.bfloat16,
                                   seed: int = 0) -> Path:
    """Release-layout checkpoint of any size, written shard by shard (for benchmarks).

    `write_example_checkpoint` builds the whole model in transformers first; this writes each
    shard from fresh N(0, 0.02) tensors so a checkpoint larger than RAM can be made. Each tensor
    is filled in place, _FILL_ELEMENTS at a time: never a float32 copy of a whole matrix (BLOOM's
    250880×14336 embeddings would take 14 GB).
    """
    hidden, n_layer, n_head, vocab = parse_geometry(geometry)
    config = bloom_config(hidden, n_layer, n_head, vocab)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype_name(dtype)
    (dst / CONFIG_NAME).write_text(config.to_json_string())
    write_tokenizer(dst, min(vocab, 512))
    shapes = Geometry.from_config(config.to_dict()).expected_shapes()
    generator = torch.Generator().manual_seed(seed)

    def fresh(names):
        tensors = {}
        for n in names:
            tensor = tensors[n] = torch.empty(shapes[n], dtype=dtype)
            flat = tensor.view(-1)
            for start in range(0, flat.numel(), _FILL_ELEMENTS):
                piece = flat[start:start + _FILL_ELEMENTS]
                piece.copy_(torch.randn(piece.numel(), generator=generator).mul_(0.02))
        return tensors

    groups = _release_groups(n_layer)
    _write_release_shards(dst, (fresh(keys) for keys in groups), groups)
    return dst


def _release_groups(n_layer: int) -> list[list[str]]:
    """Tensor names per shard in bigscience/bloom: embeddings, one shard per block, ln_f."""
    return [list(EMBEDDING_TENSORS), *([f"h.{i}.{t}" for t in BLOCK_TENSORS] for i in range(n_layer)),
            list(FINAL_TENSORS)]


def _write_release_shards(dst: Path, shard_states, groups: list[list[str]]) -> None:
    """bigscience/bloom: shard 1 embeddings, one shard per block, last shard ln_f; no prefix."""
    weight_map, total_size = {}, 0
    for number, (keys, shard) in enumerate(zip(groups, shard_states), start=1):
        name = PICKLE_SHARD_TEMPLATE.format(number=number, count=len(groups))
        torch.save(shard, dst / name)
        for k in keys:
            weight_map[k] = name
            total_size += shard[k].numel() * shard[k].element_size()
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (dst / PICKLE_INDEX_NAME).write_text(json.dumps(index, indent=2))


def _write_safetensors(dst: Path, state: dict[str, torch.Tensor], sharded: bool) -> None:
    from safetensors.torch import save_file
    prefixed = {PREFIX + k: v for k, v in state.items()}
    if not sharded:
        save_file(prefixed, dst / SAFETENSORS_SINGLE_NAME, metadata={"format": "pt"})
        return
    names = list(prefixed)
    half = len(names) // 2
    shards = [names[:half], names[half:]]
    weight_map = {}
    for number, keys in enumerate(shards, start=1):
        file = SAFETENSORS_SHARD_TEMPLATE.format(number=number, count=len(shards))
        save_file({k: prefixed[k] for k in keys}, dst / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    total = sum(v.numel() * v.element_size() for v in prefixed.values())
    (dst / HF_INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_tokenizer(dst: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on Python's built-in documentation (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    corpus = [pydoc.getdoc(obj) for obj in (str, list, dict, int, float, bytes, set, tuple, open, print,
                                            json, os, Path, torch.Tensor)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(dst / TOKENIZER_NAMES[0]))
    (dst / TOKENIZER_NAMES[1]).write_text(json.dumps(
        {"tokenizer_class": "BloomTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "pad_token": "<pad>", "padding_side": "left"}, indent=2))
