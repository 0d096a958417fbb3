"""The evaluation models of the quality benchmark: trained and random BLOOMs of several geometries.

    python bench/quality_models.py --out /work/quality-models [--only NAME ...] [--list]

One quantization default must hold on models it was not tuned on, so `bench_quality.py` runs every
scheme over this set (issue 12):

- the trained fixture `../shared/fixtures/bloom-tiny-trained`, copied with its heldout.txt;
- the packaged example model (`bloomconv example`, trained on pydoc text), copied with the split
  of its training text into train.txt and heldout.txt;
- small BLOOMs trained here, each on another kind of text found on this machine (Python source of
  the standard library, English prose of the section-1 manual pages, C headers of /usr/include),
  with other seeds and geometries; each text is split by file into `train.txt` (the only text the
  tokenizer and the model see, and the calibration text of calibrated methods) and `heldout.txt`;
- random-init checkpoints with LLM.int8()-style outlier features: a few input channels of every
  linear layer scaled by 4, 8 or 16. They have no perplexity to speak of; the benchmark compares
  them with their unquantized selves on `heldout.txt`, text in the shared tokenizer's language.

Every model is written as bf16 safetensors (the fixture: release pickle shards) with config and
tokenizer, what `bloomconv convert` reads, under OUT/NAME, deterministically from its seed and
this machine's files; a model already written (its `record.json` present) is kept, so the
command caches. Training runs on one thread.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from bloomconv.converters import trained_example

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "bloom-tiny-trained"
RECORD = "record.json"
TRAIN_TEXT, HELDOUT_TEXT = "train.txt", "heldout.txt"
HELDOUT_EVERY = 20          # every 20th source file is held out, never trained on
TRAIN_CHARS = 2_500_000     # enough text for a few hundred steps of 16 x 128 tokens
HELDOUT_CHARS = 250_000


# ----------------------------------------------------------------------------------- text sources

def _python_files() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(stdlib.glob("*.py"))]


def _c_headers() -> list[tuple[str, str]]:
    root = Path("/usr/include")
    files = sorted(p for p in root.rglob("*.h") if p.is_file() and not p.is_symlink())
    return [(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files]


def _man_pages() -> list[tuple[str, str]]:
    """Section-1 manual pages rendered as plain 80-column text, in name order."""
    names = sorted({p.name.split(".")[0] for p in Path("/usr/share/man/man1").iterdir()})
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    pages, total = [], 0
    for name in names:
        if total > (TRAIN_CHARS + HELDOUT_CHARS) * 1.2:
            break
        done = subprocess.run(["man", "-P", "cat", "1", name], capture_output=True, env=env, timeout=60)
        text = done.stdout.decode("utf-8", errors="replace")
        text = subprocess.run(["col", "-bx"], input=text.encode(), capture_output=True).stdout.decode()
        if done.returncode == 0 and len(text) > 500:
            pages.append((name, text))
            total += len(text)
    return pages


def split_text(files: list[tuple[str, str]]) -> tuple[str, str]:
    """(train, heldout): every HELDOUT_EVERY-th file held out, each side capped in size."""
    train, heldout = [], []
    for index, (_, text) in enumerate(files):
        side, cap = (heldout, HELDOUT_CHARS) if index % HELDOUT_EVERY == HELDOUT_EVERY // 2 else (train, TRAIN_CHARS)
        if sum(map(len, side)) < cap:
            side.append(text.replace("\r", ""))
    return "\n\n".join(train)[:TRAIN_CHARS], "\n\n".join(heldout)[:HELDOUT_CHARS]


# ---------------------------------------------------------------------------------------- models

@dataclass(frozen=True)
class Trained:
    """A BLOOM trained here on one kind of text."""
    name: str
    source: str                                   # key of SOURCES
    geometry: tuple[int, int, int, int]           # hidden, layers, heads, vocab
    steps: int
    seed: int


@dataclass(frozen=True)
class Outliers:
    """A random-init BLOOM whose linear layers have a few input channels scaled by `scale`."""
    name: str
    geometry: tuple[int, int, int, int]
    scale: float
    channels: int
    seed: int


SOURCES = {"python": _python_files, "prose": _man_pages, "c": _c_headers}
TRAINED = (
    Trained("python-stdlib", "python", (256, 6, 8, 4096), steps=350, seed=1),
    Trained("man-prose", "prose", (320, 4, 5, 4096), steps=450, seed=2),
    Trained("c-headers", "c", (256, 4, 4, 8192), steps=400, seed=3),
)
OUTLIERS = (
    Outliers("outliers-x4", (256, 4, 8, 4096), scale=4.0, channels=4, seed=11),
    Outliers("outliers-x8", (384, 3, 6, 4096), scale=8.0, channels=6, seed=12),
    Outliers("outliers-x16", (320, 3, 5, 4096), scale=16.0, channels=4, seed=13),
)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _card(spec: Trained, text: str):
    def card(record: dict) -> str:
        hidden, layers, heads, vocab = spec.geometry
        return (f"# {spec.name}\n\nEvaluation model of bloomconv's quality benchmark (bench/quality_models.py): "
                f"BLOOM hidden {hidden}, {layers} blocks, {heads} heads, vocab {vocab}, trained {record['steps']} "
                f"steps (seed {record['seed']}) on `{spec.source}` text (sha256 {_digest(text)}, {len(text):,} "
                f"characters). Held-out perplexity: {record['heldout_perplexity']}. Not for use.\n")
    return card


def build_trained(spec: Trained, out: Path) -> dict:
    train_text, heldout_text = split_text(SOURCES[spec.source]())
    torch.set_num_threads(1)
    record = trained_example.train(out, spec.steps, seed=spec.seed, text=train_text, heldout=heldout_text,
                                   geometry=spec.geometry, card=_card(spec, train_text))
    (out / TRAIN_TEXT).write_text(train_text)
    (out / HELDOUT_TEXT).write_text(heldout_text)
    return {**record, "kind": "trained", "source": spec.source, "geometry": spec.geometry,
            "train_sha256": _digest(train_text), "heldout_sha256": _digest(heldout_text)}


def build_outliers(spec: Outliers, out: Path, tokenizer_file: Path = FIXTURE / "tokenizer.json",
                   text: str | None = None) -> dict:
    """Write the random model of `spec` with `tokenizer_file`; its text (by default the fixture's
    held-out text, in the language of that tokenizer) is split in halves, train.txt and heldout.txt."""
    from tokenizers import Tokenizer
    from transformers import BloomConfig, BloomForCausalLM
    torch.manual_seed(spec.seed)
    hidden, layers, heads, vocab = spec.geometry
    config = BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads, vocab_size=vocab,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = BloomForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(spec.seed)
    scaled = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                columns = torch.randperm(module.in_features, generator=generator)[:spec.channels]
                module.weight[:, columns] *= spec.scale
                scaled[name] = sorted(columns.tolist())
    trained_example.write_model(out, model, Tokenizer.from_file(str(tokenizer_file)))
    text = (FIXTURE / HELDOUT_TEXT).read_text() if text is None else text
    (out / TRAIN_TEXT).write_text(text[: len(text) // 2])
    (out / HELDOUT_TEXT).write_text(text[len(text) // 2:])
    (out / "README.md").write_text(
        f"# {spec.name}\n\nRandom-init BLOOM (hidden {hidden}, {layers} blocks, {heads} heads, vocab {vocab}, "
        f"seed {spec.seed}) whose linear layers have {spec.channels} input channels scaled by {spec.scale:g}, "
        "like the emergent outlier features of large BLOOMs. Evaluation model of bloomconv's quality benchmark.\n")
    return {"kind": "outliers", "geometry": spec.geometry, "scale": spec.scale, "channels": spec.channels,
            "seed": spec.seed, "scaled_channels": scaled}


def build_fixture(out: Path) -> dict:
    """A copy of the trained fixture; its training text is not on this machine, so calibrated
    methods calibrate on the example model's pydoc text, documentation of the same library."""
    shutil.copytree(FIXTURE, out)
    for path in (out, *out.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    (out / TRAIN_TEXT).write_text(trained_example.training_text()[:TRAIN_CHARS])
    return {"kind": "trained", "source": str(FIXTURE), "calibration": "pydoc text of the example model"}


def build_example(out: Path) -> dict:
    """A copy of the packaged example model with its own split: the first 95 % of the tokens of its
    training text (train.txt) and the last 5 %, never trained on (heldout.txt)."""
    from tokenizers import Tokenizer
    packaged = trained_example.packaged_model()
    shutil.copytree(packaged, out)
    tokenizer = Tokenizer.from_file(str(packaged / "tokenizer.json"))
    ids = tokenizer.encode(trained_example.training_text()).ids
    split = int(len(ids) * 0.95)  # the split of trained_example.train
    (out / TRAIN_TEXT).write_text(tokenizer.decode(ids[:split]))
    (out / HELDOUT_TEXT).write_text(tokenizer.decode(ids[split:]))
    return {"kind": "trained", "source": str(packaged), "train_tokens": split, "heldout_tokens": len(ids) - split}


PACKAGED = {"fixture": build_fixture, "example": build_example}


def build(name: str, out: Path) -> dict:
    """Write model `name` under `out/name` unless already there; return its record."""
    target = out / name
    if (target / RECORD).exists():
        return json.loads((target / RECORD).read_text())
    partial = out / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    if name in PACKAGED:
        record = PACKAGED[name](partial)
    else:
        spec = {s.name: s for s in (*TRAINED, *OUTLIERS)}[name]
        record = build_trained(spec, partial) if isinstance(spec, Trained) else build_outliers(spec, partial)
    (partial / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return record


def names() -> list[str]:
    return [*PACKAGED, *(s.name for s in (*TRAINED, *OUTLIERS))]


def evaluation_models(out: Path) -> list[tuple[str, Path, dict]]:
    """(name, directory, record) of every model built under `out` (a folder with record.json), in
    the order of `names()`, others after.

    record["kind"] is "trained" (perplexity is meaningful) or "outliers" (agreement only).
    """
    known = names()
    built = sorted((p.parent.name for p in out.glob(f"*/{RECORD}")),
                   key=lambda n: (known.index(n) if n in known else len(known), n))
    return [(name, out / name, json.loads((out / name / RECORD).read_text())) for name in built]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/work/quality-models"))
    parser.add_argument("--only", nargs="*", help="names of the models to build (default: all)")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(names()))
        return
    for name in args.only or names():
        record = build(name, args.out)
        print(name, json.dumps({k: v for k, v in record.items() if k != "scaled_channels"}), flush=True)


if __name__ == "__main__":
    main()
