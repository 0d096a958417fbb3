"""bench/profile_step.py: a decoding step's parts are timed, and the model is left as it was."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import bloomconv
from bloomconv import kernels
from bloomconv.runtime import model as model_module

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import profile_step  # noqa: E402


def test_every_part_of_a_step_is_timed_and_the_wrappers_are_removed_after(converted):
    originals = (model_module.Transformer._linear, model_module.Transformer._layer_norm, model_module.gelu,
                 model_module.embedding_weights, model_module.F.scaled_dot_product_attention,
                 model_module.step_ops.attention_step)
    timers = profile_step.Timers()
    with bloomconv.load(converted, threads=1) as model:
        ids = torch.tensor([[5, 6, 7]])
        expected = model.forward(ids)[0]
        with profile_step.instrumented(timers):
            assert torch.equal(model.forward(ids)[0], expected)  # timing changes nothing computed
            timers.clear()
            profile_step.step_seconds(model, batch=2, steps=3, timers=timers)
        H, layers = model.geometry.hidden_size, model.geometry.n_layer
    assert set(timers.seconds) == {"lm_head", "attention", "layer norms", "gelu", f"product {(3 * H, H)}",
                                   f"product {(H, H)}", f"product {(4 * H, H)}", f"product {(H, 4 * H)}"}
    assert all(seconds > 0 for seconds in timers.seconds.values())
    # 3 steps: each product's weight counted once per block and step, as held in RAM (bf16 as stored;
    # widened to fp32 where the kernels were not built)
    itemsize = 2 if kernels.available() else 4
    assert timers.bytes[f"product {(H, H)}"] == 3 * layers * H * H * itemsize
    assert timers.bytes["lm_head"] == 3 * model.geometry.vocab_size * H * itemsize
    assert (model_module.Transformer._linear, model_module.Transformer._layer_norm, model_module.gelu,
            model_module.embedding_weights, model_module.F.scaled_dot_product_attention,
            model_module.step_ops.attention_step) == originals
