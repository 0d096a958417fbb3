"""The trained example model that ships with bloomconv: what `bloomconv example` writes by default."""
from __future__ import annotations

import math

import torch
from click.testing import CliRunner

import bloomconv
from bloomconv.cli import main
from bloomconv.converters.example import TRAINED, write_example_checkpoint
from bloomconv.converters.trained_example import GEOMETRY, packaged_model, training_text


def test_example_writes_the_trained_model_and_it_predicts_text(tmp_path):
    result = CliRunner().invoke(main, ["example", str(tmp_path / "src")])
    assert result.exit_code == 0 and "trained example BLOOM" in result.output, result.output
    assert (tmp_path / "src" / "README.md").read_text().startswith("# bloomconv example model")
    bloomconv.convert(tmp_path / "src", tmp_path / "out")
    text = training_text()[-4000:]  # the held-out end of the training text
    with bloomconv.load(tmp_path / "out") as model:
        assert (model.geometry.hidden_size, model.geometry.n_layer) == GEOMETRY[:2]
        ids = torch.tensor([model.tokenizer.encode(text)[:256]])
        logits, _ = model.forward(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    # a random model of this vocabulary scores about ln(4096) = 8.3 nats; this one learned the text
    assert math.exp(nll.item()) < 60


def test_the_runtime_continues_it_as_transformers_does(tmp_path):
    from tokenizers import Tokenizer
    from transformers import BloomForCausalLM
    src = write_example_checkpoint(tmp_path / "src", TRAINED, "safetensors-single", torch.float32)
    bloomconv.convert(src, tmp_path / "out")
    tokenizer = Tokenizer.from_file(str(packaged_model() / "tokenizer.json"))
    prompt = torch.tensor([tokenizer.encode("Return the").ids])
    reference = BloomForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    expected = reference.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:]
    with bloomconv.load(tmp_path / "out") as model:
        text = model.generate("Return the", max_new_tokens=12)
    assert text == tokenizer.decode(expected.tolist())
