"""Reading a source checkpoint as released, without trusting it.

Layouts:
  release-pickle-shards  pytorch_model_000NN-of-000MM.bin + pytorch_model.bin.index.json (bigscience/bloom)
  safetensors-shards     model-000NN-of-000MM.safetensors + model.safetensors.index.json
  pickle-single          pytorch_model.bin
  safetensors-single     model.safetensors
  bloomconv              a directory written by bloomconv convert (unquantized, format 1 or 2), read back

`resolve_source` also takes a Hugging Face cache repository (models--org--name, at the snapshot
refs/main names) or a Hub repo id (bigscience/bloom-560m), found in the local cache, offline.

Pickles are opened with `torch.load(weights_only=True, mmap=True)`: tensors stay file-backed
(page cache, not anonymous memory) and no pickled code can run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

from bloomconv.errors import SourceError, UnsafeCheckpointError
from bloomconv.format import (CONFIG_NAME, EMBEDDING_WEIGHT, FORMAT_NAME, HF_CACHE_MAIN_REF, HF_CACHE_REPO_PREFIX,
                              HF_CACHE_SNAPSHOTS, HF_INDEX_NAME, MANIFEST_NAME, PICKLE_INDEX_NAME,
                              PICKLE_SINGLE_NAME, PREFIX, SAFETENSORS_DTYPES, SAFETENSORS_SINGLE_NAME,
                              SOURCE_FLOAT_DTYPES, TIED_HEAD, TOKENIZER_NAMES, dtype_name,
                              is_carried_file)
from bloomconv.geometry import Geometry
from bloomconv.manifest import read_manifest
from bloomconv.safetensors_io import torch_dtype


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    file: str                   # relative path of the shard holding it
    stored_name: str            # the key inside that shard
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class SourceCheckpoint:
    root: Path
    layout: str
    geometry: Geometry
    dtype: torch.dtype
    weight_files: tuple[str, ...]        # relative paths, in reading order
    tensors: dict[str, TensorMeta]       # unprefixed name -> where it lives
    side_files: tuple[str, ...]          # config, tokenizer and the other files carried along, to copy
    tied_head: TensorMeta | None = None  # a stored lm_head.weight, checked equal to the embeddings

    def file_size(self, name: str) -> int:
        return (self.root / name).stat().st_size


def strip_prefix(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def _is_pickle(name: str) -> bool:
    return name.endswith(".bin") or name.endswith(".pt") or name.endswith(".pth")


def load_pickle_shard(path: Path) -> dict[str, torch.Tensor]:
    """Open a torch pickle shard memory-mapped, refusing anything but tensor data."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines() or ["unpickling failed"]
        # torch's message buries the refused global ("... GLOBAL posix.system ...") mid-text
        detail = next((line.strip() for line in lines if re.search(r"GLOBAL|[Uu]nsupported", line)), lines[0])
        raise UnsafeCheckpointError(path, detail[:300]) from None
    except FileNotFoundError:
        raise SourceError(path, "shard is missing", "Download the missing shard again.") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        first = str(exc).split("\n")[0][:200]
        raise SourceError(path, f"shard is truncated or damaged ({first})",
                          "Download this shard again and compare its size with the release.") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise SourceError(path, "shard is not a flat dict of tensors", "This is not a model state dict.")
    return state


class ShardCache:
    """Keeps the most recently used shard open so consecutive tensors do not reopen it."""

    def __init__(self, root: Path):
        self.root = root
        self._name: str | None = None
        self._handle = None

    def _open(self, name: str):
        if name != self._name:
            self.close()
            path = self.root / name
            if _is_pickle(name):
                self._handle = load_pickle_shard(path)
            else:
                self._handle = _open_safetensors(path)
            self._name = name
        return self._handle

    def get(self, meta: TensorMeta) -> torch.Tensor:
        handle = self._open(meta.file)
        if isinstance(handle, dict):
            return handle[meta.stored_name]
        return handle.get_tensor(meta.stored_name)

    def close(self) -> None:
        self._name, self._handle = None, None


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise SourceError(path, "shard is missing", "Download the missing shard again.") from None
    except Exception as exc:  # safetensors raises SafetensorError (not exported) for bad files
        raise SourceError(path, f"shard is truncated or damaged ({str(exc)[:200]})",
                          "Download this shard again and compare its size with the release.") from None


def _shard_contents(root: Path, name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    path = root / name
    if not path.is_file():
        raise SourceError(path, "shard named by the index is missing",
                          "Download the missing shard; every file in the index must be present.")
    if _is_pickle(name):
        return {k: (tuple(v.shape), v.dtype) for k, v in load_pickle_shard(path).items()}
    handle = _open_safetensors(path)
    out = {}
    for key in handle.keys():
        sl = handle.get_slice(key)
        code = sl.get_dtype()
        dtype = torch_dtype(code) if SAFETENSORS_DTYPES.get(code, ("",))[0] in SOURCE_FLOAT_DTYPES else None
        if dtype is None:
            raise SourceError(path, f"tensor {key!r} has dtype {sl.get_dtype()}, not a float type",
                              "bloomconv converts bf16, fp16 and fp32 checkpoints.")
        out[key] = (tuple(sl.get_shape()), dtype)
    return out


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise ValueError("weight_map must map tensor names to file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SourceError(path, f"index is unreadable ({exc})", "Download the index file again.") from None
    for file in set(weight_map.values()):
        if os.path.isabs(file) or ".." in Path(file).parts:
            raise SourceError(path, f"index names a file outside the checkpoint: {file!r}",
                              "Refusing to read it; fix the index.")
    return weight_map


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_source(src: str | os.PathLike) -> Path:
    """The folder holding the checkpoint `src` names: a folder as it is; a Hugging Face cache
    repository (models--org--name) at the snapshot its refs/main names; or, when no such path
    exists, a Hub repo id (bigscience/bloom-560m) looked up in the local Hugging Face cache
    ($HF_HUB_CACHE, else $HF_HOME/hub), offline.

    >>> resolve_source("bigscience/bloom-560m")   # doctest: +SKIP
    PosixPath('/root/.cache/huggingface/hub/models--bigscience--bloom-560m/snapshots/ac2ae5f…')
    """
    path = Path(src)
    if path.is_dir():
        if path.name.startswith(HF_CACHE_REPO_PREFIX) and (path / HF_CACHE_SNAPSHOTS).is_dir():
            return _main_snapshot(path)
        return path
    if not path.exists() and _REPO_ID.fullmatch(str(src)):
        return _snapshot_in_hub_cache(str(src))
    raise SourceError(path, "not a directory", "Point bloomconv at the checkpoint's folder.")


def _main_snapshot(repository: Path) -> Path:
    try:
        revision = (repository / HF_CACHE_MAIN_REF).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        revision = ""
    snapshot = repository / HF_CACHE_SNAPSHOTS / revision
    if not re.fullmatch(r"[0-9a-f]{40}", revision) or not snapshot.is_dir():
        raise SourceError(repository, f"has no {HF_CACHE_MAIN_REF} naming one of its snapshots",
                          f"Pass the snapshot folder itself ({repository.name}/{HF_CACHE_SNAPSHOTS}/<revision>).")
    return snapshot


def _hub_cache_dir() -> str:
    """Where `hf download` puts repositories, by the environment as it is now (huggingface_hub
    reads it once, when first imported)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expanduser(os.environ[variable])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _snapshot_in_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError
    cache = _hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, OSError, ValueError):  # ValueError: not a valid repo id
        raise SourceError(repo_id, f"is neither a folder nor a model in the Hugging Face cache ({cache})",
                          f"Run `hf download {repo_id}` first, or point bloomconv at the checkpoint's "
                          "folder.") from None


def open_source(root: str | os.PathLike) -> SourceCheckpoint:
    """Identify the layout, read the index and every shard's table of contents, and check that
    the checkpoint holds exactly the tensors its config.json implies. Reads no tensor data.
    `root` is anything `resolve_source` takes."""
    root = resolve_source(root)
    geometry = Geometry.from_file(root / CONFIG_NAME)
    if (root / MANIFEST_NAME).is_file():
        manifest = read_manifest(root)
        if manifest.quantization is not None:
            raise SourceError(root, f"is already {manifest.quantization.quant_type.value} (written by "
                              "`bloomconv quantize`)", "Quantize from the original checkpoint or a "
                              "`bloomconv convert` output.")
        layout, weight_map = FORMAT_NAME, None
        files = sorted(f.name for f in manifest.files if f.tensors)
    elif (root / HF_INDEX_NAME).is_file():
        layout, weight_map = "safetensors-shards", _read_index(root / HF_INDEX_NAME)
    elif (root / PICKLE_INDEX_NAME).is_file():
        layout, weight_map = "release-pickle-shards", _read_index(root / PICKLE_INDEX_NAME)
    elif (root / SAFETENSORS_SINGLE_NAME).is_file():
        layout, weight_map, files = "safetensors-single", None, [SAFETENSORS_SINGLE_NAME]
    elif (root / PICKLE_SINGLE_NAME).is_file():
        layout, weight_map, files = "pickle-single", None, [PICKLE_SINGLE_NAME]
    else:
        raise SourceError(root, "no weights found (no model.safetensors[.index.json] or "
                          "pytorch_model.bin[.index.json])", "Point bloomconv at a BLOOM checkpoint folder.")
    if weight_map is not None:
        files = sorted(set(weight_map.values()))

    tensors: dict[str, TensorMeta] = {}
    for file in files:
        for key, (shape, dtype) in _shard_contents(root, file).items():
            name = strip_prefix(key)
            if weight_map is not None and weight_map.get(key) != file:
                continue  # the index decides where a tensor lives; stray copies are ignored
            if name in tensors:
                raise SourceError(root / file, f"tensor {name!r} is stored twice", "Fix the checkpoint.")
            tensors[name] = TensorMeta(file, key, shape, dtype)
    if weight_map is not None:
        for key, file in weight_map.items():
            if strip_prefix(key) not in tensors:
                raise SourceError(root / file, f"the index places tensor {key!r} in this shard, "
                                  "but the shard does not hold it",
                                  "The shard or the index is from another checkpoint; download both again.")

    head = tensors.pop(TIED_HEAD, None)
    if head is not None:
        if head.shape != tensors.get(EMBEDDING_WEIGHT, head).shape:
            raise SourceError(root / head.file, "lm_head.weight has a different shape from the word "
                              "embeddings", "bloomconv needs lm_head tied to the embeddings, as released.")
    _check_against_config(root, geometry, tensors)
    dtypes = {meta.dtype for meta in tensors.values()}
    if len(dtypes) != 1:
        by_dtype = {dtype_name(d): sorted({m.file for m in tensors.values() if m.dtype == d})[:2]
                    for d in dtypes}
        raise SourceError(root, f"tensors have mixed dtypes {by_dtype}",
                          "Re-save the checkpoint in one dtype (bf16, fp16 or fp32).")
    (dtype,) = dtypes
    if dtype_name(dtype) not in SOURCE_FLOAT_DTYPES:
        raise SourceError(root, f"dtype {dtype} is not supported", "Use a bf16, fp16 or fp32 checkpoint.")
    return SourceCheckpoint(root, layout, geometry, dtype, tuple(files), tensors, _side_files(root), head)


def _side_files(root: Path) -> tuple[str, ...]:
    """Config and tokenizer files, then, sorted, every other file the repository carries
    (`format.is_carried_file`: README.md, LICENSE, generation_config.json, …)."""
    needed = [name for name in (CONFIG_NAME, *TOKENIZER_NAMES) if (root / name).is_file()]
    carried = sorted(p.name for p in root.iterdir()
                     if p.name not in needed and p.is_file() and is_carried_file(p.name, p.stat().st_size))
    return (*needed, *carried)


def _check_against_config(root: Path, geometry: Geometry, tensors: dict[str, TensorMeta]) -> None:
    expected = geometry.expected_shapes()
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SourceError(root, f"missing tensors {missing[:3]}{more} that config.json "
                          f"(n_layer={geometry.n_layer}) requires",
                          "A shard is missing or config.json belongs to another model.")
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        raise SourceError(root / tensors[unexpected[0]].file, f"unexpected tensors {unexpected[:3]} "
                          f"for a {geometry.n_layer}-layer BLOOM", "config.json belongs to another model.")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise SourceError(root / tensors[name].file, f"tensor {name!r} has shape "
                              f"{list(tensors[name].shape)}, config.json implies {list(shape)}",
                              "config.json does not match these weights; use the config released with them.")
