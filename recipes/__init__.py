"""Recipes: one JSON file per released BLOOM (geometry, dtype, source layouts) times the
quantization presets in presets.json. `bloom-176b-int8` = bloom-176b.json + preset "int8".

Output sizes are computed from the geometry with the size table in `bloomconv.format`, never typed in.
"""
from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from pathlib import Path

from bloomconv.errors import RecipeError
from bloomconv.format import CONFIG_NAME, is_quantized_weight, stored_bytes
from bloomconv.geometry import Geometry
from bloomconv.manifest import QuantSettings

_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    variants: tuple[str, ...]
    geometry: Geometry
    dtype: str
    source_layouts: tuple[str, ...]
    quantization: QuantSettings

    def stored_bytes(self, quantization: QuantSettings | None = None) -> int:
        """Weight bytes of the output (headers excluded); unquantized when `quantization` is None."""
        itemsize = _ITEMSIZE[self.dtype]
        total = 0
        for name, shape in self.geometry.expected_shapes().items():
            if quantization is not None and is_quantized_weight(name, quantization.embeddings):
                total += stored_bytes(shape, itemsize, quantization.quant_type,
                                      quantization.block_size, quantization.double_quant)
            else:
                total += stored_bytes(shape, itemsize)
        return total

    def check_source(self, source_dir: str | os.PathLike) -> None:
        """Refuse a source whose config.json is not this recipe's model."""
        found = Geometry.from_file(Path(source_dir) / CONFIG_NAME)
        mine = (self.geometry.hidden_size, self.geometry.n_layer, self.geometry.n_head, self.geometry.vocab_size)
        theirs = (found.hidden_size, found.n_layer, found.n_head, found.vocab_size)
        if mine != theirs:
            raise RecipeError(f"recipe {self.name} is for {self.model} (hidden, layers, heads, vocab = {mine}) "
                              f"but {source_dir} holds {theirs}. Pick the recipe of that model, or use --bits.")

    @property
    def output_bytes(self) -> int:
        return self.stored_bytes(self.quantization)

    @property
    def source_bytes(self) -> int:
        return self.stored_bytes(None)


def _load_json(name: str) -> dict:
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))


def preset_settings(preset: str) -> QuantSettings:
    """The quantization settings of a preset ("int8", "nf4", "fp4") from presets.json."""
    return QuantSettings.from_dict(_load_json("presets.json")[preset])


def all_recipes() -> list[Recipe]:
    presets = {k: QuantSettings.from_dict(v) for k, v in _load_json("presets.json").items()}
    recipes = []
    for path in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if not path.name.startswith("bloom-") or not path.name.endswith(".json"):
            continue
        spec = json.loads(path.read_text(encoding="utf-8"))
        geometry = Geometry(**spec["geometry"])
        for preset, settings in presets.items():
            recipes.append(Recipe(f"{spec['model']}-{preset}", spec["model"], tuple(spec["variants"]), geometry,
                                  spec["dtype"], tuple(spec["source_layouts"]), settings))
    return sorted(recipes, key=lambda r: (r.geometry.parameter_count(), r.name))


def get_recipe(name: str) -> Recipe:
    recipes = {r.name: r for r in all_recipes()}
    if name not in recipes:
        raise RecipeError(f"unknown recipe {name!r}. Choose one of: {', '.join(recipes)} "
                          "(`bloomconv recipes` lists them).")
    return recipes[name]
