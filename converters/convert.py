"""`convert`: reshard a BLOOM checkpoint into one safetensors file per block, streaming.

Memory: tensors come from memory-mapped shards and are written straight from those pages, a
piece at a time; quantized tensors are computed piece by piece into one reused buffer as they are
written (`Storage.encode_stream`), so anonymous memory stays near start-up size whatever the size
of a tensor (BLOOM-176B's 250880×14336 embeddings included). Crash safety: see destination.py.
I/O: each source file is hashed from the pages the converter reads, by a thread that reads just
ahead of it and drops the pages both are done with (reading.py): the disk reads the source once
and the page cache does not fill with it.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from bloomconv import __version__
from bloomconv.atomic import atomic_write_bytes, commit, discard, open_temporary
from bloomconv.errors import BloomconvWarning, DestinationError, OptionsError, SourceError
from bloomconv.format import (CONFIG_NAME, EMBEDDING_WEIGHT, FORMAT_VERSION, HF_INDEX_NAME, JOB_SIGNATURE_KEY,
                              PREFIX, SIGNATURE_NAME, QuantType, all_units, dtype_name, unit_file,
                              unit_tensor_names)
from bloomconv.hashing import sha256_file
from bloomconv.manifest import FileEntry, Manifest, TensorEntry, read_manifest, write_manifest
from bloomconv.settings import DEFAULT_CALIBRATION_TOKENS, INT8_EMBEDDINGS, QuantSettings
from bloomconv.progress import ProgressFactory, no_progress
from bloomconv.signing import SigningKey, sign
from bloomconv.verification import signature_pending
from bloomconv.safetensors_io import StreamedTensor, st_dtype, write_safetensors
from bloomconv.storage.base import CHUNK_ELEMENTS, ReadReport

from .destination import Destination, explain_os_error
from .encode import stream_computed, stream_for_storage
from .reading import SourceReading
from .source import SourceCheckpoint, open_source, resolve_source

Log = Callable[[str], None]  # one line about the run as a whole ("resuming: …"), for the CLI to print


def _silent(message: str) -> None:
    pass


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, quantization: QuantSettings | None = None,
            calibrate: str | os.PathLike | None = None, device: str = "cpu",
            signing: SigningKey | None = None, progress: ProgressFactory = no_progress, log: Log = _silent) -> Manifest:
    """Convert the checkpoint in `src` into a bloomconv directory `dst`; return its manifest.

    `src` is a checkpoint folder, a Hugging Face cache repository or a Hub repo id found in the
    local cache (`source.resolve_source`). Re-running the same call after an interruption resumes
    (and says so through `log`); a finished `dst` is left as is.

    `signing`: sign the directory (`bloomconv.signing.sign`) as the last step, after the manifest.
    The job record says so: until model.sig is written the directory is incomplete (`verify` and
    `load` refuse it), and re-running the same call signs it.

    >>> convert("bloom-560m", "bloom-560m-blocks")              # doctest: +SKIP
    >>> convert("bigscience/bloom-560m", "bloom-560m-int8", quantization=QuantSettings("int8"),
    ...         log=print)                                       # doctest: +SKIP
    resuming: 12 of 26 weight files already written
    >>> convert("bloom-560m", "bloom-560m-blocks", signing=SigningKey("publisher.pem"))  # doctest: +SKIP

    `calibrate`: the calibration text of `quantization.method == "gptq"` (its sha256 must be the
    one the settings record); `device`: where GPTQ computes ("cpu", "cuda").
    """
    if signing is not None:
        signing.check()
    calibration = None
    if quantization is not None and quantization.method == "gptq":
        from .calibration import CalibrationText
        calibration = CalibrationText.open(calibrate, quantization, device)
    elif calibrate is not None:
        raise OptionsError("calibration text applies to method gptq only. Drop --calibrate, or use --method gptq.")
    source = open_source(src)
    if calibration is not None:  # tokenized, and the memory checked, before anything is written
        calibration = (calibration.device, calibration.checked_windows(source, quantization))
    job = _job_record(source, quantization, signing)
    started_by = {"command": command_line(quantization, signing, calibrate), "source": str(source.root.resolve())}
    with Destination(dst) as destination:
        if destination.has_manifest():
            manifest = _already_finished(destination, source, quantization, signing, job, log)
        else:
            try:
                resuming = destination.start_or_resume(job, started_by)
                manifest = _run(source, destination, quantization, progress, log if resuming else None, calibration)
                write_manifest(destination.path, manifest)
                if signing is not None:  # the job record stays until the signature is written
                    sign(destination.path, signing)
                destination.finish()
            except OSError as exc:
                raise explain_os_error(destination.path, exc) from exc
    _warn_where_bitsandbytes_misdecodes(dst, manifest)
    return manifest


def _warn_where_bitsandbytes_misdecodes(dst: str | os.PathLike, manifest: Manifest) -> None:
    from bloomconv.inspection import bitsandbytes_cpu_warning
    if (warning := bitsandbytes_cpu_warning(manifest)) is not None:
        warnings.warn(f"{dst}: {warning}", BloomconvWarning, stacklevel=3)


def quantize(src: str | os.PathLike, dst: str | os.PathLike, bits: int | None = None, *,
             quant_type: str | None = None, block_size: int | None = None, double_quant: bool | None = None,
             embeddings: bool | str | None = None, int8_scale_from: str | None = None, recipe: str | None = None,
             method: str | None = None, calibrate: str | os.PathLike | None = None,
             calibration_tokens: int | None = None, device: str = "cpu",
             signing: SigningKey | None = None, progress: ProgressFactory = no_progress,
             log: Log = _silent) -> Manifest:
    """`convert` with the block weights quantized: `bits` 8 (LLM.int8()) or 4 (`quant_type` nf4 or
    fp4), or a `recipe` from `bloomconv recipes`. Options left None take the preset, the same
    defaults as `bloomconv quantize`; every combination is validated before anything is read.
    `signing` signs the result as `convert`'s does. `embeddings` True quantizes the tied word
    embeddings as the blocks are; "int8" (4-bit only) stores them int8, as the int8 preset does.

    `method` (bloomconv.settings.METHODS): "rtn" (default, bitsandbytes' own rounding), "search"
    (each block's scale searched), "gptq" (calibrated on the text file `calibrate`, at most
    `calibration_tokens` of it, computed on `device`); `calibrate` alone means gptq.

    >>> quantize("bloom-560m", "bloom-560m-int8", bits=8)                              # doctest: +SKIP
    >>> quantize("bloom-560m", "bloom-560m-nf4", bits=4, quant_type="nf4", block_size=64)  # doctest: +SKIP
    >>> quantize("bloom", "bloom-int8", recipe="bloom-176b-int8")                      # doctest: +SKIP
    >>> quantize("bloom-560m", "bloom-560m-gptq", bits=4, calibrate="wiki.train.txt")  # doctest: +SKIP
    """
    from bloomconv.recipes import quantization_for
    if calibrate is not None and method is None:
        method = "gptq"
    calibration_sha256 = None
    if calibrate is not None and method == "gptq":
        from .calibration import calibration_sha256 as text_sha256
        calibration_sha256 = text_sha256(calibrate)
    src = resolve_source(src)  # a recipe checks the source's config.json
    settings = quantization_for(src, bits=bits, recipe=recipe, quant_type=quant_type, block_size=block_size,
                                double_quant=double_quant, embeddings=embeddings, int8_scale_from=int8_scale_from,
                                method=method, calibration_sha256=calibration_sha256,
                                calibration_tokens=calibration_tokens)
    return convert(src, dst, quantization=settings, calibrate=calibrate, device=device, signing=signing,
                   progress=progress, log=log)


def command_line(quantization: QuantSettings | None, signing: SigningKey | None = None,
                 calibrate: str | os.PathLike | None = None) -> str:
    """The `bloomconv` command (options, no source or destination) that asks for `quantization`
    and `signing` (whose files are named by absolute path, so that the command can be re-run), with
    `calibrate` the calibration text of gptq.

    >>> command_line(QuantSettings(QuantType.INT8)), command_line(QuantSettings(QuantType.FP4, 64))
    ('quantize --bits 8', 'quantize --bits 4 --quant-type fp4 --block-size 64')
    >>> command_line(None, SigningKey("/keys/private.pem"))
    'convert --sign-key /keys/private.pem'
    >>> command_line(QuantSettings(QuantType.NF4, method="gptq", calibration_sha256="0" * 64), None, "/t/c.txt")
    'quantize --bits 4 --quant-type nf4 --calibrate /t/c.txt'
    """
    words = ["convert"] if quantization is None else _quantize_words(quantization, calibrate)
    if signing is not None:
        words += ["--sign-key", str(signing.private_key.absolute())]
        if signing.certificate is not None:
            words += ["--sign-certificate", str(signing.certificate.absolute())]
        for path in signing.chain:
            words += ["--sign-chain", str(path.absolute())]
    return " ".join(words)


def _quantize_words(quantization: QuantSettings, calibrate: str | os.PathLike | None) -> list[str]:
    q, preset = quantization, QuantSettings(quantization.quant_type)
    words = ["quantize", "--bits", "8"] if q.quant_type is QuantType.INT8 else \
        ["quantize", "--bits", "4", "--quant-type", q.quant_type.value]
    if q.block_size != preset.block_size:
        words += ["--block-size", str(q.block_size)]
    if q.double_quant != preset.double_quant:
        words.append("--double-quant" if q.double_quant else "--no-double-quant")
    if q.embeddings != preset.embeddings:
        words.append("--int8-embeddings" if q.embeddings == INT8_EMBEDDINGS else
                     "--embeddings" if q.embeddings else "--no-embeddings")
    if q.int8_scale_from != (QuantSettings(q.quant_type, embeddings=q.embeddings).int8_scale_from):
        words += ["--int8-scale-from", q.int8_scale_from]
    if q.method == "search":
        words += ["--method", "search"]
    if q.method == "gptq":
        words += ["--calibrate", str(Path(calibrate).absolute()) if calibrate else f"<text of sha256 {q.calibration_sha256}>"]
        if q.calibration_tokens != DEFAULT_CALIBRATION_TOKENS:
            words += ["--calibration-tokens", str(q.calibration_tokens)]
    return words


def _job_record(source: SourceCheckpoint, quantization: QuantSettings | None, signing: SigningKey | None) -> dict:
    files = []
    for name in (*source.weight_files, *source.side_files):
        stat = (source.root / name).stat()
        files.append({"name": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"tool_version": __version__, "format_version": FORMAT_VERSION, "source_layout": source.layout,
            "source_files": files, "quantization": quantization.to_dict() if quantization else None,
            **({JOB_SIGNATURE_KEY: signing.method} if signing else {})}  # absent: records of unsigned runs unchanged


def _already_finished(destination: Destination, source: SourceCheckpoint, quantization: QuantSettings | None,
                      signing: SigningKey | None, job: dict, log: Log) -> Manifest:
    """The manifest of a finished `dst` holding this conversion; signed now if this run signs and
    the signature is not there yet (a run killed after its manifest, or signing asked afterwards)."""
    manifest = read_manifest(destination.path)
    same_source = ({(f.name, f.size) for f in manifest.source_files}
                   == {(n, source.file_size(n)) for n in (*source.weight_files, *source.side_files)})
    if not same_source or manifest.quantization != quantization:
        raise DestinationError(destination.path, "already holds a finished conversion of a different "
                               "source or with different settings", "Choose another destination.")
    signed = (destination.path / SIGNATURE_NAME).exists()
    if signature_pending(destination.path):  # refused unless this run signs too, naming the one that does
        destination.refuse_other_job(job)
    try:
        if signing is not None and not signed:
            sign(destination.path, signing)
            log(f"signed: {destination.path}/{SIGNATURE_NAME} ({signing.method}); nothing else was rewritten")
        else:
            log(f"already finished: {destination.path} holds this conversion"
                f"{' (signed)' if signed else ''}; nothing was rewritten")
        destination.finish()  # a run killed after its manifest may have left bookkeeping behind
    except OSError as exc:
        raise explain_os_error(destination.path, exc) from exc
    return manifest


def _run(source: SourceCheckpoint, destination: Destination, quantization: QuantSettings | None,
         progress: ProgressFactory, resume_log: Log | None,
         calibration: tuple[torch.device, torch.Tensor] | None = None) -> Manifest:
    """Write every file and return the manifest; `resume_log` (a resumed run) hears how much was kept.
    `calibration`: GPTQ's device and calibration windows (calibration.py), for method gptq."""
    units = all_units(source.geometry.n_layer)
    total = sum(source.file_size(n) for n in source.weight_files)
    recorded = {name: entry for name in source.weight_files
                if (entry := destination.recorded(f"source/{name}")) is not None}

    def record_hash(name: str, sha256: str) -> None:  # on the reading thread, as each shard is hashed
        destination.record(f"source/{name}", FileEntry(name, source.file_size(name), sha256))

    with progress(total=total, desc="convert", unit="B", unit_scale=True) as bar, \
            SourceReading(source.root, {n: e.sha256 for n, e in recorded.items()}, record_hash) as reading:
        resumed = {unit: _resumed(destination, unit) for unit in units}
        remaining = [unit for unit in units if resumed[unit] is None]
        if resume_log is not None:
            resume_log(f"resuming: {len(units) - len(remaining)} of {len(units)} weight files already written")
        bar.update(sum(_unit_bytes(source, unit) for unit in units if resumed[unit] is not None))
        last_use = {file: unit for unit in remaining for file in _unit_files(source, unit)}
        written = {}
        calibrator = None
        if calibration is not None:
            from .calibration import BlockCalibration

            def finished(unit: str) -> tuple[Path, dict[str, QuantType]]:
                entry = (resumed[unit] or written[unit]).result()  # waits for the commit
                return destination.path / entry.name, {t.name: QuantType(t.quant) for t in entry.tensors}
            calibrator = BlockCalibration(*calibration, source, quantization, finished)
        # This thread computes each unit's tensors piece by piece as it writes them (nothing of a
        # unit is held whole); the reading thread hashes the source just ahead of it and the
        # committer fsyncs the previous file. Commits stay in order.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="commit") as committer:
            for position, unit in enumerate(remaining):
                for upcoming in remaining[position:position + 2]:  # read ahead into the next unit's shards
                    for file in _unit_files(source, upcoming):
                        reading.open(file)
                calibrated = {} if calibrator is None or not unit.startswith("block_") else \
                    calibrator.quantize_block(int(unit.removeprefix("block_")), reading)
                written[unit] = _write_stored(destination, unit,
                                              _stored_streams(source, reading, unit, quantization, calibrated),
                                              committer)
                for file in _unit_files(source, unit):
                    if last_use[file] == unit:
                        reading.release(file)
                bar.update(_unit_bytes(source, unit))
            outputs = [(resumed[unit] or written[unit]).result() for unit in units]
        side_outputs = [_write_side_file(source, destination, name, quantization) for name in source.side_files]
        index = _write_hf_index(destination, outputs)
        hashes = reading.finish(list(source.weight_files))
    source_files = tuple([*(recorded.get(name) or FileEntry(name, source.file_size(name), hashes[name])
                            for name in source.weight_files),
                          *(_source_entry(source, destination, name) for name in source.side_files)])
    model = {**source.geometry.to_dict(), "dtype": dtype_name(source.dtype)}
    return Manifest(tool_version=__version__, model=model, source_layout=source.layout,
                    source_files=source_files, files=tuple([*side_outputs, *outputs, index]),
                    quantization=quantization)


def _unit_bytes(source: SourceCheckpoint, unit: str) -> int:
    """Source bytes of one unit's tensors (what the progress bar counts)."""
    return sum(math.prod(source.tensors[n].shape) for n in unit_tensor_names(unit)) * source.dtype.itemsize


def _unit_files(source: SourceCheckpoint, unit: str) -> list[str]:
    """The source files one unit reads, in the order it first reads them."""
    metas = [source.tensors[name] for name in unit_tensor_names(unit)]
    if EMBEDDING_WEIGHT in unit_tensor_names(unit) and source.tied_head is not None:
        metas.append(source.tied_head)
    return list(dict.fromkeys(meta.file for meta in metas))


def _source_entry(source: SourceCheckpoint, destination: Destination, name: str) -> FileEntry:
    key = f"source/{name}"
    entry = destination.recorded(key)
    if entry is None:
        path = source.root / name
        entry = FileEntry(name, path.stat().st_size, sha256_file(path))
        destination.record(key, entry)
    return entry


def _stored_streams(source: SourceCheckpoint, reading: SourceReading, unit: str, quantization: QuantSettings | None,
                    calibrated: dict[str, dict[str, torch.Tensor]] | None = None
                    ) -> list[tuple[str, StreamedTensor, QuantType]]:
    """The tensors one unit's file holds, each computed as it is written: source tensors, quantized
    where asked; a weight in `calibrated` (by prefixed name: GPTQ's) is stored as computed there."""
    stored: list[tuple[str, StreamedTensor, QuantType]] = []
    for name in unit_tensor_names(unit):
        if calibrated and PREFIX + name in calibrated:
            stored.extend(stream_computed(PREFIX + name, calibrated[PREFIX + name], quantization))
            continue
        meta = source.tensors[name]
        shard = reading.open(meta.file)
        tensor = shard.tensor(meta.stored_name)
        if name == EMBEDDING_WEIGHT and source.tied_head is not None:
            _check_tied_head(source, reading, tensor, shard.report(meta.stored_name))
        stored.extend(stream_for_storage(PREFIX + name, tensor, quantization, shard.report(meta.stored_name)))
    return stored


def _write_stored(destination: Destination, unit: str, stored: list[tuple[str, StreamedTensor, QuantType]],
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


def _check_tied_head(source: SourceCheckpoint, reading: SourceReading, embeddings: torch.Tensor,
                     embeddings_report: ReadReport) -> None:
    """A stored lm_head.weight must equal the embeddings; compared CHUNK_ELEMENTS at a time."""
    shard = reading.open(source.tied_head.file)
    head, head_report = shard.tensor(source.tied_head.stored_name), shard.report(source.tied_head.stored_name)
    flat_head, flat_embeddings = head.reshape(-1), embeddings.reshape(-1)
    for start in range(0, flat_head.numel(), CHUNK_ELEMENTS):
        end = min(start + CHUNK_ELEMENTS, flat_head.numel())
        head_report.reading(start, end)
        embeddings_report.reading(start, end)  # read again when encoded: not done
        if not torch.equal(flat_head[start:end], flat_embeddings[start:end]):
            raise SourceError(source.root / source.tied_head.file, "lm_head.weight differs from the word "
                              "embeddings", "bloomconv stores BLOOM with lm_head tied to the embeddings; "
                              "this checkpoint is not tied.")
        head_report.done(start, end)


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
