"""BLOOM geometry from config.json, and the shape every tensor must have.

Read directly from the JSON (both spellings BLOOM configs use) rather than through
`transformers.BloomConfig`: importing transformers takes seconds, which would dominate the
runtime's start-up and every CLI call.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .errors import NotBloomError, SourceError
from .format import EMBEDDING_TENSORS, FINAL_TENSORS


@dataclasses.dataclass(frozen=True)
class Geometry:
    hidden_size: int
    n_layer: int
    n_head: int
    vocab_size: int
    layer_norm_epsilon: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @classmethod
    def from_config(cls, config: dict, path: str | Path = "config.json") -> "Geometry":
        if config.get("model_type") != "bloom":
            raise NotBloomError(path, f"model_type is {config.get('model_type')!r}, not 'bloom'",
                                "bloomconv converts BLOOM checkpoints only (BloomForCausalLM).")

        def pick(*keys):
            for key in keys:
                if isinstance(config.get(key), int) and config[key] > 0:
                    return config[key]
            raise SourceError(path, f"config.json has no positive integer {' or '.join(keys)}",
                              "Use the config.json released with the checkpoint.")

        geometry = cls(
            hidden_size=pick("hidden_size", "n_embed"),
            n_layer=pick("n_layer", "num_hidden_layers"),
            n_head=pick("n_head", "num_attention_heads"),
            vocab_size=pick("vocab_size"),
            layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
        )
        if geometry.hidden_size % geometry.n_head:
            raise SourceError(path, f"hidden size {geometry.hidden_size} is not divisible by "
                              f"{geometry.n_head} heads", "Fix config.json.")
        if config.get("tie_word_embeddings", True) is False:
            raise SourceError(path, "tie_word_embeddings is false", "bloomconv stores lm_head tied "
                              "to the word embeddings, as every released BLOOM does.")
        return geometry

    @classmethod
    def from_file(cls, path: str | Path) -> "Geometry":
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SourceError(path, "config.json is missing", "Copy the checkpoint's config.json next to its weights.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(path, f"config.json is unreadable ({exc})", "Copy it again.") from None
        if not isinstance(config, dict):
            raise SourceError(path, "config.json is not a JSON object", "Copy it again.")
        return cls.from_config(config, path)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Unprefixed source name -> shape, for every tensor a BLOOM checkpoint stores."""
        h, v = self.hidden_size, self.vocab_size
        shapes = {EMBEDDING_TENSORS[0]: (v, h), EMBEDDING_TENSORS[1]: (h,), EMBEDDING_TENSORS[2]: (h,),
                  FINAL_TENSORS[0]: (h,), FINAL_TENSORS[1]: (h,)}
        block = self._block_shapes()
        for i in range(self.n_layer):
            shapes.update({f"h.{i}.{name}": shape for name, shape in block.items()})
        return shapes

    def _block_shapes(self) -> dict[str, tuple[int, ...]]:
        h = self.hidden_size
        return {
            "input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
            "self_attention.query_key_value.weight": (3 * h, h), "self_attention.query_key_value.bias": (3 * h,),
            "self_attention.dense.weight": (h, h), "self_attention.dense.bias": (h,),
            "post_attention_layernorm.weight": (h,), "post_attention_layernorm.bias": (h,),
            "mlp.dense_h_to_4h.weight": (4 * h, h), "mlp.dense_h_to_4h.bias": (4 * h,),
            "mlp.dense_4h_to_h.weight": (h, 4 * h), "mlp.dense_4h_to_h.bias": (h,),
        }

    def parameter_count(self) -> int:
        """Without listing every layer: a manifest may claim any number of them."""
        def count(shapes):
            return sum(math.prod(shape) for shape in shapes.values())
        outside_blocks = dataclasses.replace(self, n_layer=0).expected_shapes()
        return count(outside_blocks) + self.n_layer * count(self._block_shapes())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
