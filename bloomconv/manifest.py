"""The manifest: what a converted directory must contain, byte for byte.

Records are small frozen dataclasses with `to_dict`/`from_dict`; `from_dict` validates keys,
types and the format version so a damaged or hostile manifest fails with a ManifestError.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
from pathlib import Path

from .atomic import atomic_write_bytes
from .errors import ManifestError
from .format import (CHECKSUMS_NAME, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, READABLE_FORMAT_VERSIONS,
                     QuantType, unit_file)
from .settings import QuantSettings

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def is_unicode(text: str) -> bool:
    """False for a str holding a lone surrogate: JSON can escape one, UTF-8 cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def safe_relative_name(name) -> str:
    """A file name from a manifest must stay inside its directory: relative, normalised, no '..'."""
    _require(isinstance(name, str) and name not in ("", "."), f"file name {name!r} does not name a file")
    _require("\\" not in name and "\x00" not in name, f"file name {name!r} has a backslash or NUL")
    _require(is_unicode(name), f"file name {name!r} is not valid Unicode")
    _require(not posixpath.isabs(name) and posixpath.normpath(name) == name
             and not name.startswith("../") and name != "..",
             f"file name {name!r} is not a normalised relative path inside the directory")
    return name


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str                  # safetensors code, e.g. "BF16", "I8", "U8"
    shape: tuple[int, ...]
    quant: QuantType = QuantType.NONE  # scheme this tensor belongs to (weight or its state)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "quant": self.quant.value}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorEntry":
        _require(isinstance(d, dict) and set(d) == {"name", "dtype", "shape", "quant"},
                 f"tensor entry {d!r} must have exactly name, dtype, shape, quant")
        _require(isinstance(d["name"], str) and isinstance(d["dtype"], str), "tensor name/dtype must be strings")
        _require(isinstance(d["shape"], list) and all(type(x) is int and x >= 0 for x in d["shape"]),
                 f"tensor {d['name']!r} has an invalid shape")
        return cls(d["name"], d["dtype"], tuple(d["shape"]), QuantType(d["quant"]))


@dataclasses.dataclass(frozen=True)
class FileEntry:
    name: str                   # relative path inside the directory, '/'-separated
    size: int
    sha256: str
    tensors: tuple[TensorEntry, ...] = ()

    def to_dict(self) -> dict:
        d = {"name": self.name, "size": self.size, "sha256": self.sha256}
        if self.tensors:
            d["tensors"] = [t.to_dict() for t in self.tensors]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FileEntry":
        _require(isinstance(d, dict) and {"name", "size", "sha256"} <= set(d) <= {"name", "size", "sha256", "tensors"},
                 f"file entry {d!r} must have name, size, sha256 (and optionally tensors)")
        _require(type(d["size"]) is int and d["size"] >= 0, f"file {d['name']!r} has an invalid size")
        _require(isinstance(d["sha256"], str) and _SHA256.fullmatch(d["sha256"]) is not None,
                 f"file {d['name']!r} has an invalid sha256")
        tensors = d.get("tensors", [])
        _require(isinstance(tensors, list), "tensors must be a list")
        return cls(safe_relative_name(d["name"]), d["size"], d["sha256"],
                   tuple(TensorEntry.from_dict(t) for t in tensors))


@dataclasses.dataclass(frozen=True)
class Manifest:
    tool_version: str
    model: dict                          # geometry: hidden_size, n_layer, n_head, vocab_size, dtype
    source_layout: str
    source_files: tuple[FileEntry, ...]  # name, size, sha256 of what was read
    files: tuple[FileEntry, ...]         # everything written except SHA256SUMS and the manifest
    quantization: QuantSettings | None = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "tool_version": self.tool_version,
            "model": self.model,
            "quantization": self.quantization.to_dict() if self.quantization else None,
            "source": {"layout": self.source_layout, "files": [f.to_dict() for f in self.source_files]},
            "files": [f.to_dict() for f in self.files],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        _require(isinstance(d, dict) and d.get("format") == FORMAT_NAME, "not a bloomconv manifest")
        version = d.get("format_version")
        if type(version) is not int or version not in READABLE_FORMAT_VERSIONS:
            raise _UnknownVersion(version)
        _require(set(d) == {"format", "format_version", "tool_version", "model", "quantization",
                            "source", "files"}, "manifest has unexpected keys")
        src = d["source"]
        _require(isinstance(src, dict) and set(src) == {"layout", "files"}, "invalid source record")
        _require(_valid_model_record(d["model"]), "invalid model record (geometry and dtype)")
        _require(isinstance(d["files"], list) and isinstance(src["files"], list), "files must be lists")
        files = tuple(FileEntry.from_dict(f) for f in d["files"])
        names = [f.name for f in files]
        _require(len(set(names)) == len(names), "a file is listed twice")
        return cls(
            tool_version=str(d["tool_version"]), model=d["model"], source_layout=str(src["layout"]),
            source_files=tuple(FileEntry.from_dict(f) for f in src["files"]), files=files,
            quantization=QuantSettings.from_dict(d["quantization"]) if d["quantization"] else None,
            format_version=version,
        )

    def unit_file(self, unit: str) -> str:
        """Relative path of the file holding `unit` (e.g. "block_003"), as this manifest's format
        version names it: readers take names from here, never from a template of their own."""
        return unit_file(unit, self.format_version)

    def file(self, name: str) -> FileEntry:
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1) + "\n").encode("utf-8")


def _valid_model_record(model) -> bool:
    """hidden_size, n_layer, n_head, vocab_size (positive ints), layer_norm_epsilon, dtype."""
    return (isinstance(model, dict)
            and set(model) == {"hidden_size", "n_layer", "n_head", "vocab_size", "layer_norm_epsilon", "dtype"}
            and all(type(model[k]) is int and model[k] > 0 for k in ("hidden_size", "n_layer", "n_head", "vocab_size"))
            and type(model["layer_norm_epsilon"]) in (int, float) and isinstance(model["dtype"], str))


class _UnknownVersion(Exception):
    def __init__(self, version):
        self.version = version


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Load and validate DIR/manifest.json. Raises ManifestError (exit 2) for anything wrong."""
    path = Path(directory) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(path, "no manifest", "This is not a finished bloomconv directory; "
                            "run `bloomconv convert` (or finish the interrupted run) first.") from None
    except OSError as exc:
        raise ManifestError(path, f"cannot read the manifest ({exc.strerror})") from None
    try:
        return Manifest.from_dict(json.loads(raw.decode("utf-8")))
    except _UnknownVersion as exc:
        raise ManifestError(path, f"format version {exc.version!r} is not one this bloomconv reads "
                            f"(it reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))})",
                            "Upgrade bloomconv, or convert again.") from None
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, RecursionError) as exc:
        raise ManifestError(path, f"manifest is unreadable ({str(exc)[:200]})",
                            "Copy manifest.json again from the source of this directory.") from None


def checksums_text(manifest: Manifest, manifest_json: bytes) -> bytes:
    """`sha256sum -c` input (binary mode marker, '/'-paths): every file the manifest lists, then
    manifest.json itself, hashed before it is written, so that damage to it is caught too."""
    lines = [(f.sha256, f.name) for f in manifest.files]
    lines.append((hashlib.sha256(manifest_json).hexdigest(), MANIFEST_NAME))
    return "".join(f"{sha256} *{name}\n" for sha256, name in lines).encode("utf-8")


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> None:
    """SHA256SUMS first, manifest.json last: a directory with a manifest is complete."""
    directory = Path(directory)
    manifest_json = manifest.to_json()
    atomic_write_bytes(directory / CHECKSUMS_NAME, checksums_text(manifest, manifest_json))
    atomic_write_bytes(directory / MANIFEST_NAME, manifest_json)
