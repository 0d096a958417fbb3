"""Recipes: one JSON file per released BLOOM (geometry, dtype, source layouts) times the
quantization presets (`bloomconv.settings.PRESETS`). `bloom-176b-int8` = bloom-176b.json + preset int8.

Output sizes are computed from the geometry by each storage type's `stored_bytes`, never typed in.
"""
from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from pathlib import Path

from bloomconv.errors import RecipeError
from bloomconv.format import CONFIG_NAME, ITEMSIZE, QuantType
from bloomconv.geometry import Geometry
from bloomconv.settings import PRESETS, QuantSettings, settings_from_options
from bloomconv.storage import storage_for


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
        itemsize = ITEMSIZE[self.dtype]
        total = 0
        for name, shape in self.geometry.expected_shapes().items():
            chosen = quantization.settings_for(name) if quantization is not None else None
            storage = storage_for(chosen.quant_type if chosen is not None else QuantType.NONE)
            total += storage.stored_bytes(shape, itemsize, chosen)
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


def all_recipes() -> list[Recipe]:
    presets = {quant_type.value: QuantSettings(quant_type) for quant_type in PRESETS}
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


def quantization_for(src: str | os.PathLike, *, bits: int | str | None = None, recipe: str | None = None,
                     quant_type: str | None = None, **options) -> QuantSettings:
    """The settings `quantize` uses for `src`: `bits` (8 or 4) or a `recipe` (checked against the
    source's config), with `options` (block_size, double_quant, embeddings, int8_scale_from, and
    the method: method, calibration_sha256, calibration_tokens) overriding the preset.
    Contradicting or inapplicable options raise OptionsError.

    >>> quantization_for("bloom-560m", recipe="bloom-560m-nf4", block_size=64)  # doctest: +SKIP
    """
    if recipe is None:
        return settings_from_options(bits, quant_type=quant_type, **options)
    chosen = get_recipe(recipe)
    settings = settings_from_options(bits, quant_type=quant_type, base=chosen.quantization, **options)
    chosen.check_source(src)  # after the options: a contradiction is reported without reading anything
    return settings
