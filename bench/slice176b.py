"""BLOOM-176B at its true geometry, cut to a few blocks, written as the release is, in bounded memory.

    python bench/slice176b.py DST [--blocks 2] [--clean]

What bigscience/bloom ships, with `n_layer` = the blocks asked for: its config.json, torch.save
zip-pickle shards named `pytorch_model_000NN-of-000MM.bin` with keys without `transformer.`
(shard 1: word_embeddings + word_embeddings_layernorm, the full 250880 x 14336 matrix, 7.19 GB;
one shard per block, 4.93 GB each; the last: ln_f; lm_head tied, absent) and
pytorch_model.bin.index.json; bf16. Two blocks: 17.06 GB. A tokenizer trained here (512 tokens)
stands in for the release's.

Values are deterministic and cheap: a 2 MB pattern of N(0, 0.02) draws, tiled along each tensor
from a per-tensor offset, with the sign of each repetition flipped by a hash (layer-norm weights
are 1). Memory stays bounded whatever the tensor size: torch.save writes each shard with
`skip_data` (the records' room, not their bytes), then each record is filled in place in pieces of
`piece_elements` and its CRC-32 patched in, so the file is what torch.save writes for those values
(tests/test_bench_slice.py checks it record by record). Nothing larger than one piece is ever in
memory, and written pages are flushed and dropped from the page cache as it goes.

Free disk is checked first (the error says how much is needed). A finished slice ends with
MARKER_NAME, written last: asking again for the same slice returns at once. `--clean` removes it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import torch

from bloomconv.atomic import fsync_dir
from bloomconv.converters.example import _release_groups, write_tokenizer
from bloomconv.format import CONFIG_NAME, PICKLE_INDEX_NAME, PICKLE_SHARD_TEMPLATE, TOKENIZER_NAMES
from bloomconv.geometry import Geometry

__all__ = ["BLOOM_176B", "MARKER_NAME", "SliceGeometry", "is_complete", "needed_bytes", "read_marker", "remove_slice",
           "shard_tensors", "write_slice"]

MARKER_NAME = ".bloomconv-slice.json"  # written last: the slice is complete
STAGING_DIR = ".tmp-shard"             # a shard being written
GENERATOR_VERSION = 1                   # bump when the values or the layout change
PATTERN_ELEMENTS = 1_000_003            # prime: no row of any BLOOM width starts the pattern twice in a row
DISK_MARGIN_BYTES = 1 << 30             # free space kept on top of what the slice needs
FLUSH_BYTES = 256 << 20                 # written bytes between fdatasync + page-cache drop
DEFAULT_PIECE_ELEMENTS = 1 << 25        # 64 MB of bf16 per write
_DATA_DESCRIPTOR = 0x08074B50
_CENTRAL_HEADER = 0x02014B50


@dataclasses.dataclass(frozen=True)
class SliceGeometry:
    """BLOOM's widths; the layer count is the slice's."""

    hidden_size: int
    n_head: int
    vocab_size: int
    n_layer_released: int  # what the release has: 70 for BLOOM-176B


BLOOM_176B = SliceGeometry(hidden_size=14336, n_head=112, vocab_size=250880, n_layer_released=70)

# bigscience/bloom's config.json; n_layer is set to the slice's blocks.
RELEASE_CONFIG = {
    "apply_residual_connection_post_layernorm": False,
    "architectures": ["BloomForCausalLM"],
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_dropout": 0.0,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "masked_softmax_fusion": True,
    "model_type": "bloom",
    "n_embed": 14336,
    "n_inner": None,
    "n_layer": 70,
    "num_attention_heads": 112,
    "offset_alibi": 100,
    "pad_token_id": 3,
    "pretraining_tp": 4,
    "seq_length": 2048,
    "skip_bias_add": True,
    "skip_bias_add_qkv": False,
    "slow_but_exact": False,
    "transformers_version": "4.21.0",
    "unk_token_id": 0,
    "use_cache": True,
    "vocab_size": 250880,
}


def shard_tensors(geometry: SliceGeometry, n_blocks: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """(name, shape) of each shard's tensors, in release order: embeddings, one per block, ln_f."""
    shapes = Geometry(geometry.hidden_size, n_blocks, geometry.n_head, geometry.vocab_size).expected_shapes()
    return [[(name, shapes[name]) for name in group] for group in _release_groups(n_blocks)]


def needed_bytes(geometry: SliceGeometry, n_blocks: int) -> int:
    """Tensor bytes of the slice (bf16); the files add a few KB of zip headers each."""
    return 2 * sum(_numel(shape) for shard in shard_tensors(geometry, n_blocks) for _, shape in shard)


def read_marker(dst: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(dst) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def write_slice(dst: str | os.PathLike, n_blocks: int = 2, *, geometry: SliceGeometry = BLOOM_176B,
                seed: int = 0, piece_elements: int = DEFAULT_PIECE_ELEMENTS,
                pattern_elements: int = PATTERN_ELEMENTS, log: Callable[[str], None] = print) -> Path:
    """Write the slice into `dst` (made if missing) unless it is there already; return `dst`.
    Values repeat every `pattern_elements` (sign aside); `piece_elements` bounds the memory used
    (bf16 elements per write). The tests make both tiny.

    >>> write_slice("/data/bloom-176b-slice", 2)                              # doctest: +SKIP
    """
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be at least 1, not {n_blocks}")
    dst = Path(dst)
    wanted = _marker(geometry, n_blocks, seed, pattern_elements)
    if is_complete(dst, n_blocks, geometry=geometry, seed=seed, pattern_elements=pattern_elements):
        log(f"{dst}: slice already written ({read_marker(dst)['bytes'] / 1e9:.2f} GB), kept")
        return dst
    if dst.exists():
        remove_slice(dst)  # another or an unfinished slice: only its own files are removed
    dst.mkdir(parents=True, exist_ok=True)
    need = needed_bytes(geometry, n_blocks) + DISK_MARGIN_BYTES
    free = shutil.disk_usage(dst).free
    if free < need:
        raise SystemExit(f"{dst}: the {n_blocks}-block slice needs {need / 1e9:.2f} GB free (with a "
                         f"{DISK_MARGIN_BYTES / 1e9:.1f} GB margin) and the disk has {free / 1e9:.2f} GB. "
                         "Free space there or choose another folder.")
    log(f"{dst}: writing a {n_blocks}-block slice, {need / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free")
    start = time.perf_counter()
    config = {**RELEASE_CONFIG, "n_embed": geometry.hidden_size, "num_attention_heads": geometry.n_head,
              "vocab_size": geometry.vocab_size, "n_layer": n_blocks}
    (dst / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(dst, min(geometry.vocab_size, 512))
    values = _Values(seed, piece_elements, pattern_elements)
    shards = shard_tensors(geometry, n_blocks)
    weight_map, files = {}, {}
    for number, tensors in enumerate(shards, start=1):
        name = PICKLE_SHARD_TEMPLATE.format(number=number, count=len(shards))
        _write_shard(dst / name, tensors, values)
        weight_map.update({tensor: name for tensor, _ in tensors})
        files[name] = (dst / name).stat().st_size
        log(f"  {name}: {files[name] / 1e9:.2f} GB, {time.perf_counter() - start:.0f} s")
    index = {"metadata": {"total_size": needed_bytes(geometry, n_blocks)}, "weight_map": weight_map}
    (dst / PICKLE_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    fsync_dir(dst)
    done = {**wanted, "bytes": sum(files.values()), "files": files, "seconds": time.perf_counter() - start}
    _atomic_write(dst / MARKER_NAME, json.dumps(done, indent=1) + "\n")
    return dst


def is_complete(dst: str | os.PathLike, n_blocks: int, *, geometry: SliceGeometry = BLOOM_176B, seed: int = 0,
                pattern_elements: int = PATTERN_ELEMENTS) -> bool:
    """Whether `dst` holds this slice, finished (its marker written, every file its recorded size)."""
    wanted = _marker(geometry, n_blocks, seed, pattern_elements)
    marker = read_marker(dst)
    return (marker is not None and {k: marker.get(k) for k in wanted} == wanted
            and _files_complete(Path(dst), marker))


def remove_slice(dst: str | os.PathLike) -> None:
    """Remove what `write_slice` writes in `dst`, then `dst` if that leaves it empty; anything else
    found there is left alone (and the folder with it)."""
    dst = Path(dst)
    if not dst.is_dir():
        return
    ours = {CONFIG_NAME, PICKLE_INDEX_NAME, MARKER_NAME, *TOKENIZER_NAMES}
    staging = dst / STAGING_DIR
    for path in [*dst.iterdir(), *(staging.iterdir() if staging.is_dir() else ())]:
        shard = path.name.startswith("pytorch_model_") and path.name.endswith(".bin")
        if path.is_file() and not path.is_symlink() and (path.name in ours or shard):
            path.unlink()
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    if not any(dst.iterdir()):
        dst.rmdir()


# ------------------------------------------------------------------------------ values

class _Values:
    """Fills tensors piece by piece: the pattern tiled from an offset drawn from the tensor's name,
    each repetition's sign flipped by a hash of (name, repetition)."""

    def __init__(self, seed: int, piece_elements: int, pattern_elements: int = PATTERN_ELEMENTS):
        generator = torch.Generator().manual_seed(seed)
        positive = (torch.randn(pattern_elements, generator=generator) * 0.02).to(torch.bfloat16)
        self.patterns = (positive, -positive)
        self.seed = seed
        self.piece = torch.empty(piece_elements, dtype=torch.bfloat16)

    def _hash(self, *parts) -> int:
        text = ":".join(map(str, (self.seed, *parts))).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")

    def pieces(self, name: str, numel: int):
        """Yield successive pieces of the tensor's flat values (views of one reused buffer)."""
        ones = name.endswith("layernorm.weight") or name.startswith("ln_f.weight")
        period = self.patterns[0].numel()
        offset = self._hash(name) % period
        for start in range(0, numel, self.piece.numel()):
            piece = self.piece[:min(self.piece.numel(), numel - start)]
            if ones:
                piece.fill_(1)
                yield piece
                continue
            filled = 0
            while filled < piece.numel():
                position = offset + start + filled
                repetition, at = divmod(position, period)
                run = min(period - at, piece.numel() - filled)
                pattern = self.patterns[self._hash(name, repetition) & 1]
                piece[filled:filled + run].copy_(pattern[at:at + run])
                filled += run
            yield piece


# ------------------------------------------------------------------------------ files

def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], values: _Values) -> None:
    """torch.save of the shard, made room-first (skip_data), then filled in place: the same bytes
    as torch.save with the values in memory, except the record of the serialization id."""
    # Staged under the final name in a folder of its own: torch.save names the archive's top
    # folder after the file's stem (pytorch_model_00001-of-00004/data.pkl).
    staging = path.parent / STAGING_DIR
    staging.mkdir(exist_ok=True)
    staged = staging / path.name
    # Never touched, so never resident: with skip_data torch.save reads only their sizes.
    placeholders = {name: torch.empty(shape, dtype=torch.bfloat16) for name, shape in tensors}
    with torch.serialization.skip_data():
        torch.save(placeholders, staged)
    del placeholders
    reader = torch._C.PyTorchFileReader(str(staged))
    offsets = [reader.get_record_offset(f"data/{key}") for key in range(len(tensors))]
    del reader
    crcs = []
    fd = os.open(staged, os.O_RDWR)
    try:
        unflushed = 0
        for (name, shape), position in zip(tensors, offsets):
            crc = 0
            for piece in values.pieces(name, _numel(shape)):
                data = memoryview(piece.view(torch.uint8).numpy())
                crc = zlib.crc32(data, crc)
                _pwrite_all(fd, data, position)
                position += len(data)
                unflushed += len(data)
                if unflushed >= FLUSH_BYTES:
                    _flush_and_drop(fd)
                    unflushed = 0
            crcs.append(crc)
        _patch_crcs(fd, staged, tensors, offsets, crcs)
        _flush_and_drop(fd)
    finally:
        os.close(fd)
    os.replace(staged, path)
    staging.rmdir()


def _patch_crcs(fd: int, path: Path, tensors, offsets: list[int], crcs: list[int]) -> None:
    """Write each filled record's CRC-32 where torch.save's zip writer keeps it: the data
    descriptor after the record and the central directory (the local header holds 0: flag bit 3).
    Record `data/<key>` holds the key-th tensor in the order pickled (the dict's order)."""
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: info for info in archive.infolist()}
        central = archive.start_dir
    crc_of = {}
    for key, (name, shape) in enumerate(tensors):
        member = next(m for m in members if m.endswith(f"/data/{key}"))
        if members[member].file_size != 2 * _numel(shape):
            raise RuntimeError(f"{path}: record {member} holds {members[member].file_size} bytes, "
                               f"{name} needs {2 * _numel(shape)}: torch.save's record order changed")
        crc_of[member] = crcs[key]
        descriptor = offsets[key] + members[member].file_size
        signature, = struct.unpack("<I", os.pread(fd, 4, descriptor))
        _pwrite_all(fd, struct.pack("<I", crcs[key]), descriptor + 4 if signature == _DATA_DESCRIPTOR else descriptor)
    position = central
    for _ in members:
        header = os.pread(fd, 46, position)
        signature, = struct.unpack_from("<I", header)
        if signature != _CENTRAL_HEADER:
            raise RuntimeError(f"{path}: no zip central directory entry at {position}")
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", header, 28)
        member = os.pread(fd, name_len, position + 46).decode()
        if member in crc_of:
            _pwrite_all(fd, struct.pack("<I", crc_of[member]), position + 16)
        position += 46 + name_len + extra_len + comment_len


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _flush_and_drop(fd: int) -> None:
    """Write the dirty pages out, then drop the file's pages: the page cache never holds more than
    FLUSH_BYTES of the slice (and the cold-cache benchmarks that follow start cold)."""
    os.fdatasync(fd)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _files_complete(dst: Path, marker: dict) -> bool:
    try:
        return all((dst / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, KeyError, AttributeError):
        return False


def _marker(geometry: SliceGeometry, n_blocks: int, seed: int, pattern_elements: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "geometry": dataclasses.asdict(geometry),
            "blocks": n_blocks, "seed": seed, "pattern_elements": pattern_elements}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks (BLOOM-176B has 70)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clean", action="store_true", help="remove the slice instead of writing it")
    parser.add_argument("--geometry", type=parse_geometry, default=BLOOM_176B,
                        help="HIDDEN,HEADS,VOCAB instead of BLOOM-176B's (to try things out small)")
    args = parser.parse_args(argv)
    if args.clean:
        remove_slice(args.dst)
        print(f"{args.dst}: removed")
        return
    write_slice(args.dst, args.blocks, geometry=args.geometry, seed=args.seed)


def parse_geometry(text: str) -> SliceGeometry:
    hidden, heads, vocab = (int(x) for x in text.split(","))
    return SliceGeometry(hidden, heads, vocab, BLOOM_176B.n_layer_released)


if __name__ == "__main__":
    sys.exit(main())
