"""GPTQ calibration for `quantize --calibrate FILE.txt`: the calibration text runs through the model
one block at a time, in the order the converter writes the blocks (IST-DASLab/gptq `bloom.py`).

For block i: the calibration windows' hidden states at its input (those the already written,
quantized blocks produce, from the embeddings as stored) run through the block with its source
weights while each of its four linears accumulates the Hessian of its inputs, H = 2/n · Σ x xᵀ;
each linear is then rounded by GPTQ (`bloomconv.storage.gptq`) onto its storage type's grid, and
the hidden states run through the quantized block to become block i+1's inputs.

Memory: the calibration hidden states, one block's weights in fp32 and its four Hessians (3 of
hidden² and one of (4·hidden)² floats); `check_memory` refuses a machine that cannot hold them.
Resuming: a block written before the interruption is read back from its file and the calibration
text run through it, so the inputs of the next block are the same as in an uninterrupted run.

>>> text = CalibrationText.open("calibration.txt", settings, device="cpu")        # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bloomconv.errors import MemoryBudgetError, OptionsError, SourceError
from bloomconv.format import EMBEDDINGS_UNIT, PREFIX, QuantType, block_unit, unit_tensor_names
from bloomconv.geometry import Geometry
from bloomconv.process_stats import available_memory
from bloomconv.settings import QuantSettings
from bloomconv.storage import decode_module, storage_for
from bloomconv.storage.base import CHUNK_ELEMENTS
from bloomconv.storage.fallback import products_in
from bloomconv.storage.gptq import gptq_quantize
from bloomconv.runtime.model import KVCache, Transformer
from bloomconv.runtime.records import BLOCK_LINEARS, BlockWeights, LayerNormWeights, LinearWeights

from .reading import SourceReading
from .source import SourceCheckpoint

__all__ = ["CALIBRATION_WINDOW", "BlockCalibration", "CalibrationText", "calibration_bytes", "calibration_sha256",
           "check_memory", "check_whole_blocks"]

CALIBRATION_WINDOW = 512  # tokens per calibration sequence
_WINDOWS_PER_PASS = 8     # sequences run through a block together

# A finished unit's file and its tensors' quant tags, once it is committed.
FinishedUnit = Callable[[str], tuple[Path, dict[str, QuantType]]]


def calibration_sha256(path: str | os.PathLike) -> str:
    """sha256 of the calibration text file (what the manifest records), refusing a missing or
    non-UTF-8 file."""
    data = _read_text_bytes(path)
    return hashlib.sha256(data).hexdigest()


def _read_text_bytes(path: str | os.PathLike) -> bytes:
    try:
        data = Path(path).read_bytes()
        data.decode("utf-8")
    except OSError as exc:
        raise OptionsError(f"calibration text {path}: {exc.strerror or exc}. Give an existing text file.") from None
    except UnicodeDecodeError:
        raise OptionsError(f"calibration text {path} is not UTF-8 text. Give a plain-text file.") from None
    return data


@dataclasses.dataclass(frozen=True)
class CalibrationText:
    """The calibration text of a gptq quantization, checked against the hash its settings record."""

    path: Path
    text: str
    tokens: int           # at most this many are used
    device: torch.device  # where the Hessians and GPTQ live

    @classmethod
    def open(cls, path: str | os.PathLike | None, settings: QuantSettings, device: str = "cpu") -> "CalibrationText":
        if path is None:
            raise OptionsError("method gptq needs calibration text. Give --calibrate FILE.txt.")
        data = _read_text_bytes(path)
        if hashlib.sha256(data).hexdigest() != settings.calibration_sha256:
            raise OptionsError(f"calibration text {path} is not the text these settings record (sha256 "
                               f"{settings.calibration_sha256[:16]}…): it changed. Calibrate with the "
                               "recorded text, or start again in a new destination.")
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise OptionsError(f"device {device!r} is unknown. Use cpu or cuda.") from None
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise OptionsError("--device cuda: no CUDA device is available here. Use --device cpu.")
        if chosen.type not in ("cpu", "cuda"):
            raise OptionsError(f"device {device!r} is not supported for calibration. Use cpu or cuda.")
        return cls(Path(path), data.decode("utf-8"), settings.calibration_tokens, chosen)

    def windows(self, source: SourceCheckpoint) -> torch.Tensor:
        """The text tokenized with the source's tokenizer, as consecutive windows (n, T): up to
        `tokens` tokens in windows of CALIBRATION_WINDOW (one shorter window for a short text).
        Refuses (MemoryBudgetError) when GPTQ on this many tokens cannot fit."""
        tokenizer_path = source.root / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise SourceError(source.root, "has no tokenizer.json, which GPTQ needs to tokenize the calibration "
                              "text", "Put the model's tokenizer.json next to its weights, or use --method search.")
        from tokenizers import Tokenizer
        ids = Tokenizer.from_file(str(tokenizer_path)).encode(self.text).ids[:self.tokens]
        window = min(CALIBRATION_WINDOW, len(ids))
        if window < 16:
            raise OptionsError(f"calibration text {self.path} gives {len(ids)} tokens; GPTQ needs at least 16 "
                               "(a few thousand or more is sensible). Give a longer text.")
        count = len(ids) // window
        windows = torch.tensor(ids[:count * window], dtype=torch.long).view(count, window)
        check_memory(source.geometry, windows.numel(), self.device, self.path)
        return windows

    def checked_windows(self, source: SourceCheckpoint, settings: QuantSettings) -> torch.Tensor:
        """`windows`, after checking that GPTQ can quantize this source with `settings` at all."""
        check_whole_blocks(settings, source.geometry, source.root)
        return self.windows(source)


def check_whole_blocks(settings: QuantSettings, geometry: Geometry, where: Path) -> None:
    """GPTQ fixes a 4-bit block's scale at its first column, so a block must lie in one row: every
    linear's input width (hidden, and 4 × hidden) a multiple of the block size."""
    if settings.quant_type.is_4bit and geometry.hidden_size % settings.block_size:
        raise OptionsError(f"{where}: hidden size {geometry.hidden_size} is not a multiple of block size "
                           f"{settings.block_size}, which GPTQ needs (a block must lie in one row). Use a "
                           "block size that divides it, or --method search.")


def calibration_bytes(geometry: Geometry, tokens: int) -> int:
    """Memory GPTQ needs at least for a model of `geometry` calibrated on `tokens` tokens: the
    hidden states before and after a block, a block's weights in fp32, its four Hessians, and
    GPTQ's working copies of the largest (the inverse factor and the weight being rounded).

    >>> round(calibration_bytes(Geometry(14336, 70, 112, 250880), 65536) / 1e9)   # BLOOM-176B, GB
    53
    """
    hidden = geometry.hidden_size
    states = 2 * tokens * hidden * 4
    weights = 12 * hidden * hidden * 4                                  # qkv 3H², dense H², mlp 4H² + 4H²
    hessians = (3 * hidden * hidden + (4 * hidden) ** 2) * 4
    working = (4 * hidden) ** 2 * 4 + 2 * 4 * hidden * hidden * 4       # H⁻¹ factor of the widest input; W copies
    return states + weights + hessians + working


def check_memory(geometry: Geometry, tokens: int, device: torch.device, where: Path) -> None:
    needed = calibration_bytes(geometry, tokens)
    if device.type == "cuda":
        allowed = torch.cuda.mem_get_info(device)[0]
        place = f"{device} has"
    else:
        allowed = available_memory()
        place = "this machine has"
    if needed > allowed:
        raise MemoryBudgetError(where, needed, allowed,
                                f"GPTQ needs about {needed / 1e9:.1f} GB (calibration hidden states, one block in "
                                f"fp32 and its Hessians, the widest {4 * geometry.hidden_size}² = "
                                f"{(4 * geometry.hidden_size) ** 2 * 4 / 1e9:.1f} GB) but {place} "
                                f"{allowed / 1e9:.1f} GB free",
                                "Use a machine (or --device cuda) with that much free memory, fewer "
                                "--calibration-tokens, or --method search.")


class _BlockRunner(Transformer):
    """The runtime's block arithmetic (`Transformer._block`) over weights given one block at a time."""

    def __init__(self, geometry: Geometry, device: torch.device):
        self.geometry, self.device = geometry, device
        self.dtype = self.prefill_dtype = torch.float32
        self._biases: dict[tuple[int, int], torch.Tensor] = {}  # windows all alike: built once per shape

    def run(self, x: torch.Tensor, weights: BlockWeights) -> torch.Tensor:
        """x (B, T, H) through one block, with a full causal mask."""
        B, T, _ = x.shape
        if (B, T) not in self._biases:
            self._biases[B, T] = self.attention_bias(None, B, T, 0)                        # (B, nh, T, T)
        with torch.inference_mode():
            return self._block(x, weights, 0, self._biases[B, T], KVCache(1))


@dataclasses.dataclass
class _Recording:
    """A linear's source weight that adds the inputs it multiplies to their Hessian."""

    weight: torch.Tensor    # (out, in) fp32
    hessian: torch.Tensor   # (in, in) fp32: Σ x xᵀ so far
    count: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def matmul(self, x: torch.Tensor, products: torch.dtype | None = None) -> torch.Tensor:
        if products not in (None, x.dtype):  # the inputs as the products see them
            return products_in(products, x, self.matmul, lambda x, dtype: None)
        rows = x.reshape(-1, x.shape[-1]).float()                                           # (B*T, in)
        self.hessian.addmm_(rows.T, rows)
        self.count += rows.shape[0]
        return F.linear(x, self.weight.to(x.dtype))


class BlockCalibration:
    """Quantizes the four linears of each block with GPTQ, block after block (see the module doc).

    `finished(unit)` gives a written unit's file and quant tags, once committed: the embeddings as
    stored, and on a resumed run the blocks written before."""

    def __init__(self, device: torch.device, windows: torch.Tensor, source: SourceCheckpoint, settings: QuantSettings,
                 finished: FinishedUnit):
        self.device, self.windows, self.source, self.settings, self.finished = device, windows, source, settings, finished
        self.runner = _BlockRunner(source.geometry, self.device)
        self.hidden: torch.Tensor | None = None  # (n, T, H) fp32: the input of block `self.layer`
        self.layer = 0

    def quantize_block(self, index: int, reading: SourceReading) -> dict[str, dict[str, torch.Tensor]]:
        """Stored tensors of block `index`'s four linears, by prefixed weight name."""
        self._advance_to(index)
        tensors = {name: _read_float(reading, self.source, name) for name in unit_tensor_names(block_unit(index))}
        weights = self._recording_block(index, tensors)
        self._run(weights)  # the outputs are dropped: only the Hessians are wanted
        stored = {}
        for module in BLOCK_LINEARS:
            recording = getattr(weights, module.split(".")[-1]).weight
            hessian = recording.hessian.mul_(2 / max(recording.count, 1))
            name = f"{PREFIX}h.{index}.{module}.weight"
            grid = storage_for(self.settings.quant_type).gptq_grid(recording.weight, self.settings, name=name)
            gptq_quantize(recording.weight, hessian, grid, name=name)
            stored[name] = grid.stored()
            recording.hessian = None  # each Hessian freed as soon as its layer is done
        quant = {f"{name.removesuffix('.weight')}.{key}": self.settings.quant_type
                 for name, tensors_of in stored.items() for key in tensors_of}
        flat = {f"{name.removesuffix('.weight')}.{key}": value
                for name, tensors_of in stored.items() for key, value in tensors_of.items()}
        unit_tensors = {**{PREFIX + n: t for n, t in tensors.items()}, **flat}
        self._forward(index, unit_tensors.get, quant)
        return stored

    # -- the hidden states ---------------------------------------------------------------------
    def _advance_to(self, index: int) -> None:
        if self.hidden is None:
            self.hidden = self._embedded()
        while self.layer < index:  # blocks written before an interruption
            path, quant = self.finished(block_unit(self.layer))
            from safetensors.torch import load_file
            tensors = load_file(path)
            self._forward(self.layer, tensors.get, quant)

    def _forward(self, index: int, lookup: Callable[[str], torch.Tensor | None], quant: dict[str, QuantType]) -> None:
        """Hidden states through block `index` as stored (`lookup` by full name), then on to the next."""
        module = f"{PREFIX}h.{index}"

        def linear(name: str) -> LinearWeights:
            stored = decode_module(f"{module}.{name}", quant.get(f"{module}.{name}.weight", QuantType.NONE), lookup)
            return LinearWeights(_on(stored, self.device), lookup(f"{module}.{name}.bias").float().to(self.device))
        weights = BlockWeights(
            input_layernorm=self._layer_norm(lookup, f"{module}.input_layernorm"),
            query_key_value=linear("self_attention.query_key_value"), dense=linear("self_attention.dense"),
            post_attention_layernorm=self._layer_norm(lookup, f"{module}.post_attention_layernorm"),
            dense_h_to_4h=linear("mlp.dense_h_to_4h"), dense_4h_to_h=linear("mlp.dense_4h_to_h"))
        self.hidden = self._run(weights)
        self.layer = index + 1

    def _run(self, weights: BlockWeights) -> torch.Tensor:
        return torch.cat([self.runner.run(self.hidden[i:i + _WINDOWS_PER_PASS], weights)
                          for i in range(0, self.hidden.shape[0], _WINDOWS_PER_PASS)])

    def _embedded(self) -> torch.Tensor:
        """The windows' embeddings as the directory stores them, after their layer norm: (n, T, H)."""
        path, quant = self.finished(EMBEDDINGS_UNIT)
        from safetensors import safe_open
        with safe_open(path, framework="pt") as stored:
            lookup = lambda name: stored.get_tensor(name) if name in stored.keys() else None  # noqa: E731
            module = f"{PREFIX}word_embeddings"
            table = decode_module(module, quant.get(f"{module}.weight", QuantType.NONE), lookup)
            rows = table.rows(self.windows, torch.float32).to(self.device)                  # (n, T, H)
            norm = self._layer_norm(lookup, f"{PREFIX}word_embeddings_layernorm")
        return self.runner._layer_norm(rows, norm)

    def _layer_norm(self, lookup, module: str) -> LayerNormWeights:
        return LayerNormWeights(lookup(f"{module}.weight").float().to(self.device),
                                lookup(f"{module}.bias").float().to(self.device))

    def _recording_block(self, index: int, tensors: dict[str, torch.Tensor]) -> BlockWeights:
        """Block `index` from its source `tensors` (unprefixed names), each linear a `_Recording`."""
        prefix = f"h.{index}"

        def linear(module: str) -> LinearWeights:
            weight = tensors[f"{prefix}.{module}.weight"].to(self.device)
            inputs = weight.shape[1]
            hessian = torch.zeros(inputs, inputs, dtype=torch.float32, device=self.device)
            return LinearWeights(_Recording(weight, hessian), tensors[f"{prefix}.{module}.bias"].to(self.device))

        def norm(module: str) -> LayerNormWeights:
            return LayerNormWeights(tensors[f"{prefix}.{module}.weight"].to(self.device),
                                    tensors[f"{prefix}.{module}.bias"].to(self.device))
        return BlockWeights(input_layernorm=norm("input_layernorm"),
                            query_key_value=linear("self_attention.query_key_value"),
                            dense=linear("self_attention.dense"), post_attention_layernorm=norm("post_attention_layernorm"),
                            dense_h_to_4h=linear("mlp.dense_h_to_4h"), dense_4h_to_h=linear("mlp.dense_4h_to_h"))


def _on(stored, device: torch.device):
    """A decoded weight with its tensors on `device`."""
    if device.type == "cpu":
        return stored
    from bloomconv.storage.base import map_tensors
    return map_tensors(stored, lambda t: t.to(device))


def _read_float(reading: SourceReading, source: SourceCheckpoint, name: str) -> torch.Tensor:
    """A source tensor as fp32, read a chunk at a time and reported as read (the reading thread
    drops the pages behind)."""
    meta = source.tensors[name]
    shard = reading.open(meta.file)
    tensor, report = shard.tensor(meta.stored_name), shard.report(meta.stored_name)
    flat_in = tensor.reshape(-1)
    out = torch.empty(tensor.shape, dtype=torch.float32)
    flat_out = out.view(-1)
    for start in range(0, flat_in.numel(), CHUNK_ELEMENTS):
        end = min(start + CHUNK_ELEMENTS, flat_in.numel())
        report.reading(start, end)
        flat_out[start:end] = flat_in[start:end]
        report.done(start, end)
    return out
