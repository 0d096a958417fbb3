"""`convert`: reshard a BLOOM checkpoint into one safetensors file per block, streaming.

Memory: tensors come from memory-mapped shards and are written straight from those pages, so
anonymous memory stays near start-up size (plus, when quantizing, one output file's tensors).
Crash safety: see destination.py. I/O: each source file is hashed on a background thread while
the main thread converts, so a shard is read from disk once and parsed from the page cache.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
from typing import Callable

import torch

from bloomconv import __version__
from bloomconv.atomic import atomic_write_bytes, commit, discard, open_temporary
from bloomconv.errors import DestinationError, SourceError
from bloomconv.format import (CONFIG_NAME, EMBEDDING_WEIGHT, FORMAT_VERSION, HF_INDEX_NAME,
                              PREFIX, QuantType, all_units, unit_file, unit_tensor_names)
from bloomconv.hashing import sha256_file
from bloomconv.manifest import FileEntry, Manifest, TensorEntry, read_manifest, write_manifest
from bloomconv.settings import QuantSettings
from bloomconv.progress import ProgressFactory, no_progress
from bloomconv.safetensors_io import st_dtype, write_safetensors

from .destination import Destination, explain_os_error
from .source import ShardCache, SourceCheckpoint, open_source, resolve_source

Log = Callable[[str], None]  # one line about the run as a whole ("resuming: …"), for the CLI to print


def _silent(message: str) -> None:
    pass


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, quantization: QuantSettings | None = None,
            progress: ProgressFactory = no_progress, log: Log = _silent) -> Manifest:
    """Convert the checkpoint in `src` into a bloomconv directory `dst`; return its manifest.

    `src` is a checkpoint folder, a Hugging Face cache repository or a Hub repo id found in the
    local cache (`source.resolve_source`). Re-running the same call after an interruption resumes
    (and says so through `log`); a finished `dst` is left as is.

    >>> convert("bloom-560m", "bloom-560m-blocks")              # doctest: +SKIP
    >>> convert("bigscience/bloom-560m", "bloom-560m-int8", quantization=QuantSettings("int8"),
    ...         log=print)                                       # doctest: +SKIP
    resuming: 12 of 26 weight files already written
    """
    source = open_source(src)
    job = _job_record(source, quantization)
    started_by = {"command": command_line(quantization), "source": str(source.root.resolve())}
    with Destination(dst) as destination:
        if destination.has_manifest():
            manifest = _already_finished(destination, source, quantization)
            log(f"already finished: {destination.path} holds this conversion; nothing was rewritten")
            return manifest
        try:
            resuming = destination.start_or_resume(job, started_by)
            manifest = _run(source, destination, quantization, progress, log if resuming else None)
            write_manifest(destination.path, manifest)
            destination.finish()
        except OSError as exc:
            raise explain_os_error(destination.path, exc) from exc
        return manifest


def quantize(src: str | os.PathLike, dst: str | os.PathLike, bits: int | None = None, *,
             quant_type: str | None = None, block_size: int | None = None, double_quant: bool | None = None,
             embeddings: bool | None = None, int8_scale_from: str | None = None, recipe: str | None = None,
             progress: ProgressFactory = no_progress, log: Log = _silent) -> Manifest:
    """`convert` with the block weights quantized: `bits` 8 (LLM.int8()) or 4 (`quant_type` nf4 or
    fp4), or a `recipe` from `bloomconv recipes`. Options left None take the preset, the same
    defaults as `bloomconv quantize`; every combination is validated before anything is read.

    >>> quantize("bloom-560m", "bloom-560m-int8", bits=8)                              # doctest: +SKIP
    >>> quantize("bloom-560m", "bloom-560m-nf4", bits=4, quant_type="nf4", block_size=64)  # doctest: +SKIP
    >>> quantize("bloom", "bloom-int8", recipe="bloom-176b-int8")                      # doctest: +SKIP
    """
    from bloomconv.recipes import quantization_for
    src = resolve_source(src)  # a recipe checks the source's config.json
    settings = quantization_for(src, bits=bits, recipe=recipe, quant_type=quant_type, block_size=block_size,
                                double_quant=double_quant, embeddings=embeddings, int8_scale_from=int8_scale_from)
    return convert(src, dst, quantization=settings, progress=progress, log=log)


def command_line(quantization: QuantSettings | None) -> str:
    """The `bloomconv` command (options, no paths) that asks for `quantization`.

    >>> command_line(QuantSettings(QuantType.INT8)), command_line(QuantSettings(QuantType.FP4, 64))
    ('quantize --bits 8', 'quantize --bits 4 --quant-type fp4 --block-size 64')
    """
    if quantization is None:
        return "convert"
    q, preset = quantization, QuantSettings(quantization.quant_type)
    words = ["quantize", "--bits", "8"] if q.quant_type is QuantType.INT8 else \
        ["quantize", "--bits", "4", "--quant-type", q.quant_type.value]
    if q.block_size != preset.block_size:
        words += ["--block-size", str(q.block_size)]
    if q.double_quant != preset.double_quant:
        words.append("--double-quant" if q.double_quant else "--no-double-quant")
    if q.embeddings != preset.embeddings:
        words.append("--embeddings" if q.embeddings else "--no-embeddings")
    if q.int8_scale_from != preset.int8_scale_from:
        words += ["--int8-scale-from", q.int8_scale_from]
    return " ".join(words)


def _job_record(source: SourceCheckpoint, quantization: QuantSettings | None) -> dict:
    files = []
    for name in (*source.weight_files, *source.side_files):
        stat = (source.root / name).stat()
        files.append({"name": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"tool_version": __version__, "format_version": FORMAT_VERSION, "source_layout": source.layout,
            "source_files": files, "quantization": quantization.to_dict() if quantization else None}


def _already_finished(destination: Destination, source: SourceCheckpoint,
                      quantization: QuantSettings | None) -> Manifest:
    manifest = read_manifest(destination.path)
    same_source = ({(f.name, f.size) for f in manifest.source_files}
                   == {(n, source.file_size(n)) for n in (*source.weight_files, *source.side_files)})
    if not same_source or manifest.quantization != quantization:
        raise DestinationError(destination.path, "already holds a finished conversion of a different "
                               "source or with different settings", "Choose another destination.")
    destination.finish()  # a run killed after its manifest may have left bookkeeping behind
    return manifest


def _run(source: SourceCheckpoint, destination: Destination, quantization: QuantSettings | None,
         progress: ProgressFactory, resume_log: Log | None) -> Manifest:
    """Write every file and return the manifest; `resume_log` (a resumed run) hears how much was kept."""
    units = all_units(source.geometry.n_layer)
    total = sum(source.file_size(n) for n in source.weight_files)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hash-source") as hasher, \
            progress(total=total, desc="convert", unit="B", unit_scale=True) as bar:
        # Queued in the order the units read the shards: the hash runs just ahead of (or just
        # behind) the conversion, so each shard comes off the disk once.
        source_hashes = {name: hasher.submit(_source_entry, source, destination, name)
                         for name in (*source.weight_files, *source.side_files)}
        shards = ShardCache(source.root)
        resumed = {unit: _resumed(destination, unit) for unit in units}
        remaining = [unit for unit in units if resumed[unit] is None]
        if resume_log is not None:
            resume_log(f"resuming: {len(units) - len(remaining)} of {len(units)} weight files already written")
        bar.update(sum(_unit_bytes(source, unit) for unit in units if resumed[unit] is not None))
        written = {}
        # Three stages overlap: the encoder reads (and quantizes) the next unit while this thread
        # hashes and writes the current one and the committer fsyncs the previous one. At most
        # two units' tensors are in memory at once; commits stay in order.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="encode") as encoder, \
                concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="commit") as committer:
            def encode(unit: str):
                return encoder.submit(_stored_tensors, source, shards, unit, quantization)
            upcoming = encode(remaining[0]) if remaining else None
            for position, unit in enumerate(remaining):
                stored = upcoming.result()
                upcoming = encode(remaining[position + 1]) if position + 1 < len(remaining) else None
                written[unit] = _write_stored(destination, unit, stored, committer)
                del stored
                bar.update(_unit_bytes(source, unit))
            outputs = [(resumed[unit] or written[unit]).result() for unit in units]
        shards.close()
        side_outputs = [_write_side_file(source, destination, name, quantization) for name in source.side_files]
        index = _write_hf_index(destination, outputs)
        source_files = tuple(future.result() for future in source_hashes.values())
    model = {**source.geometry.to_dict(), "dtype": str(source.dtype).removeprefix("torch.")}
    return Manifest(tool_version=__version__, model=model, source_layout=source.layout,
                    source_files=source_files, files=tuple([*side_outputs, *outputs, index]),
                    quantization=quantization)


def _unit_bytes(source: SourceCheckpoint, unit: str) -> int:
    """Source bytes of one unit's tensors (what the progress bar counts)."""
    return sum(math.prod(source.tensors[n].shape) for n in unit_tensor_names(unit)) * source.dtype.itemsize


def _source_entry(source: SourceCheckpoint, destination: Destination, name: str) -> FileEntry:
    key = f"source/{name}"
    entry = destination.recorded(key)
    if entry is None:
        path = source.root / name
        entry = FileEntry(name, path.stat().st_size, sha256_file(path))
        destination.record(key, entry)
    return entry


def _stored_tensors(source: SourceCheckpoint, shards: ShardCache, unit: str,
                    quantization: QuantSettings | None) -> list[tuple[str, torch.Tensor, QuantType]]:
    """The tensors one unit's file holds: source tensors, quantized where asked."""
    stored: list[tuple[str, torch.Tensor, QuantType]] = []
    for name in unit_tensor_names(unit):
        tensor = shards.get(source.tensors[name])
        if name == EMBEDDING_WEIGHT and source.tied_head is not None:
            _check_tied_head(source, shards, tensor)
            tensor = shards.get(source.tensors[name])  # the shard cache may have moved on
        stored.extend(_encode(PREFIX + name, tensor, quantization))
    return stored


def _write_stored(destination: Destination, unit: str, stored: list[tuple[str, torch.Tensor, QuantType]],
                  committer: concurrent.futures.Executor) -> concurrent.futures.Future:
    """Write one unit to a temporary file; its fsync, rename and journal entry run on `committer`."""
    relative = unit_file(unit)
    temporary = open_temporary(destination.path / relative)
    try:
        size, sha256 = write_safetensors(temporary, [(n, t) for n, t, _ in stored],
                                         {"format": "pt", "bloomconv_unit": unit})
    except BaseException:
        discard(temporary)
        raise
    entry = FileEntry(relative, size, sha256,
                      tuple(TensorEntry(n, st_dtype(t.dtype), tuple(t.shape), q) for n, t, q in stored))

    def finish() -> FileEntry:
        commit(temporary, destination.path / relative)
        destination.record(unit, entry)  # only after the rename: a journaled file is whole
        return entry
    return committer.submit(finish)


def _resumed(destination: Destination, unit: str) -> concurrent.futures.Future | None:
    entry = destination.completed_output(unit)
    if entry is None:
        return None
    done = concurrent.futures.Future()
    done.set_result(entry)
    return done


def _encode(name: str, tensor: torch.Tensor, quantization: QuantSettings | None):
    """The tensors stored for one source tensor: itself, or its quantized form and state."""
    if quantization is None:
        return [(name, tensor, QuantType.NONE)]
    from .encode import encode_for_storage  # quantization is the only user of bitsandbytes layouts
    return encode_for_storage(name, tensor, quantization)


def _check_tied_head(source: SourceCheckpoint, shards: ShardCache, embeddings: torch.Tensor) -> None:
    head = shards.get(source.tied_head)
    if not torch.equal(head, embeddings):
        raise SourceError(source.root / source.tied_head.file, "lm_head.weight differs from the word "
                          "embeddings", "bloomconv stores BLOOM with lm_head tied to the embeddings; "
                          "this checkpoint is not tied.")


def _write_side_file(source: SourceCheckpoint, destination: Destination, name: str,
                     quantization: QuantSettings | None) -> FileEntry:
    data = (source.root / name).read_bytes()
    if name == CONFIG_NAME and quantization is not None:
        from .encode import config_with_quantization
        data = config_with_quantization(data, quantization)
    return _write_small_file(destination, name, data)


def _write_hf_index(destination: Destination, outputs: list[FileEntry]) -> FileEntry:
    """model.safetensors.index.json, so `from_pretrained(DST)` reads the directory as is."""
    weight_map = {t.name: f.name for f in outputs for t in f.tensors}
    total = sum(f.size for f in outputs)
    data = (json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n").encode()
    return _write_small_file(destination, HF_INDEX_NAME, data)


def _write_small_file(destination: Destination, name: str, data: bytes) -> FileEntry:
    atomic_write_bytes(destination.path / name, data)
    return FileEntry(name, len(data), hashlib.sha256(data).hexdigest())
