"""The loaded model's transformers-style surface: config, tokenizer, repr, model(ids), stop strings
and the repetition penalty (against transformers where it has the same thing), and the
`generate` command's prompt sources and options."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import bloomconv
import bloomconv.runtime as runtime
from bloomconv.cli import main
from bloomconv.converters.convert import convert, quantize
from bloomconv.converters.example import write_example_checkpoint
from bloomconv.errors import OptionsError
from bloomconv.runtime.generate import _settled

from .conftest import streaming_everything

GEOMETRY = (64, 2, 4, 1024)  # hidden, layers, heads, vocab
PROMPT = "Return the"
SAMPLED = dict(max_new_tokens=24, temperature=1.0, seed=1)  # random weights: greedy repeats one token


def random_ids(batch=2, length=6):
    return torch.randint(4, GEOMETRY[3], (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(runtime model, transformers model) on one converted fp32 directory."""
    from transformers import BloomForCausalLM
    root = tmp_path_factory.mktemp("api")
    write_example_checkpoint(root / "src", GEOMETRY, dtype=torch.float32)
    convert(root / "src", root / "dst")
    reference = BloomForCausalLM.from_pretrained(root / "dst", dtype=torch.float32).eval()
    with runtime.load(root / "dst") as model:
        yield model, reference


@pytest.fixture(scope="module")
def model(pair):
    return pair[0]


# ------------------------------------------------------------------------ config, tokenizer, repr

def test_config_is_config_json_read_only(model):
    on_disk = json.loads((model.checkpoint.directory / "config.json").read_text())
    assert dict(model.config) == on_disk == model.config.to_dict()
    assert model.config["n_layer"] == model.config.n_layer == GEOMETRY[1]
    assert model.config.get("no such key", 7) == 7 and "hidden_size" in model.config
    with pytest.raises(AttributeError, match="no 'no_such_key'"):
        model.config.no_such_key
    with pytest.raises(AttributeError, match="read-only"):
        model.config.n_layer = 3
    copy = model.config.to_dict()
    copy["n_layer"] = 99
    assert model.config.n_layer == GEOMETRY[1]


def test_tokenizer_encodes_and_decodes_as_transformers_does(model):
    from transformers import PreTrainedTokenizerFast
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(model.checkpoint.directory / "tokenizer.json"))
    text = "Return the list of files.\n\nDone"
    ids = model.tokenizer(text)
    assert ids == model.tokenizer.encode(text) == theirs(text)["input_ids"] and all(type(i) is int for i in ids)
    assert model.tokenizer.decode(ids) == theirs.decode(ids) == text
    assert model.tokenizer.decode(torch.tensor(ids)) == text
    assert model.tokenizer([text, "x"]) == [ids, model.tokenizer("x")]
    with_eos = [*ids, model.eos_token_id]
    assert model.tokenizer.decode(with_eos) == theirs.decode(with_eos)
    assert model.tokenizer.decode(with_eos, skip_special_tokens=True) == text
    assert len(model.tokenizer) == theirs.backend_tokenizer.get_vocab_size()


def test_repr_names_directory_geometry_quantization_and_residency(model, tmp_path):
    text = repr(model)
    for expected in (str(model.checkpoint.directory), "hidden 64", "2 blocks", "4 heads", "vocab 1024",
                     "float32, not quantized", "4 files in RAM", "0 streamed", "computes float32 on cpu"):
        assert expected in text, text
    quantize(model.checkpoint.directory, tmp_path / "nf4", bits=4)
    with streaming_everything(tmp_path / "nf4") as nf4:
        text = repr(nf4)
    assert "nf4, block 32, double quant, embeddings int8" in text and "0 files in RAM" in text, text
    assert "4 streamed from disk" in text, text


def test_calling_the_model_gives_logits_as_transformers(pair):
    model, reference = pair
    ids = random_ids()
    logits = model(ids)
    assert torch.equal(logits, model.forward(ids)[0])
    with torch.no_grad():
        assert (logits - reference(ids).logits).abs().max() < 1e-4
    one = model(ids[0].tolist())  # a list of ids is one sequence
    assert one.shape == (1, ids.shape[1], GEOMETRY[3]) and torch.equal(one, model(ids[0]))
    assert (one[0] - logits[0]).abs().max() < 1e-5


# ----------------------------------------------------------------------------- repetition penalty

def test_repetition_penalty_is_transformers_rule_on_the_same_logits():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, generator=g) * 4
    logits[:, :5] = 0.0  # zero: neither divided nor multiplied
    ids = torch.randint(0, 500, (3, 40), generator=g)
    ids[:, :3] = torch.tensor([0, 1, 1])
    seen = torch.zeros(logits.shape, dtype=torch.bool).scatter_(1, ids, True)
    for penalty in (1.3, 0.7, 1.0):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        assert torch.equal(runtime.repetition_penalty(logits, seen, penalty), expected)


def test_greedy_generation_with_repetition_penalty_matches_transformers(pair):
    model, reference = pair
    ids = random_ids()
    penalized = model.generate_ids(ids, max_new_tokens=12, repetition_penalty=10.0)
    with torch.no_grad():
        theirs = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                    repetition_penalty=10.0)
    assert torch.equal(penalized, theirs)
    assert not torch.equal(penalized, model.generate_ids(ids, max_new_tokens=12))  # the penalty changed something


def test_sampling_with_repetition_penalty_is_reproducible(model):
    kwargs = dict(max_new_tokens=10, temperature=1.0, repetition_penalty=1.3, seed=4)
    assert model.generate(PROMPT, **kwargs) == model.generate(PROMPT, **kwargs)
    assert "".join(model.stream(PROMPT, **kwargs)) == model.generate(PROMPT, **kwargs)


# ----------------------------------------------------------------------------------- stop strings

@pytest.fixture(scope="module")
def free_run(model):
    """A sampled continuation of PROMPT without stop strings, and a stop string from its middle."""
    full = model.generate(PROMPT, **SAMPLED)
    start = next(k for k in range(len(full) // 2, len(full) - 2)
                 if (PROMPT + full).index(full[k:k + 2]) > len(PROMPT) and "\ufffd" not in full[k:k + 2])
    return full, full[start:start + 2]


def test_generation_ends_at_a_stop_string_it_does_not_return(model, free_run):
    full, stop = free_run
    expected = full[:full.index(stop)]
    stats = runtime.GenerationStats()
    assert model.generate(PROMPT, **SAMPLED, stop=stop, stats=stats) == expected
    assert stats.steps < 24  # it stopped, not only cut the text
    assert "".join(model.stream(PROMPT, **SAMPLED, stop=stop)) == expected
    assert model.generate(PROMPT, **SAMPLED, stop=["\u2603never", stop]) == expected
    assert model.generate(PROMPT, **SAMPLED, stop="\u2603never") == full


def test_stop_strings_end_where_transformers_stop_strings_do(pair):
    from transformers import PreTrainedTokenizerFast
    model, reference = pair
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(model.checkpoint.directory / "tokenizer.json"))
    ids = random_ids(batch=1)
    repeated = model.generate_ids(ids, max_new_tokens=2)[0, -2:].tolist()  # greedy repeats one token
    cases = [(model.tokenizer(PROMPT), "the the", ""),  # begins in the prompt: " the" completes it
             (model.tokenizer(PROMPT), " th", ""),      # the token " the" runs past it
             (ids[0].tolist(), model.tokenizer.decode(repeated), "")]  # two new tokens make it
    for prompt_ids, stop, text in cases:
        prompt_ids = torch.tensor([prompt_ids])
        ours = model.generate_ids(prompt_ids, max_new_tokens=12, stop=stop)
        with torch.no_grad():
            expected = reference.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=12,
                                          do_sample=False, stop_strings=stop, tokenizer=theirs)
        assert torch.equal(ours, expected), stop
        assert ours.shape[1] - prompt_ids.shape[1] < 12
    assert model.generate(PROMPT, max_new_tokens=12, stop="the the") == ""


def test_stop_strings_end_each_sequence_of_a_batch_on_its_own(model):
    prompts, stop = [PROMPT, "import os"], "the the the"  # greedy: " the the the…" and " os os os…"
    singles = [model.generate(p, max_new_tokens=12, stop=stop) for p in prompts]
    assert singles[0] == "" and len(singles[1]) > 20  # the first began in its prompt
    assert model.generate(prompts, max_new_tokens=12, stop=stop) == singles
    input_ids, mask = model.encode(prompts)
    output = model.generate_ids(input_ids, mask, max_new_tokens=12, stop=stop)
    assert output.shape[1] == input_ids.shape[1] + 12  # the second went on
    first = output[0, input_ids.shape[1]:].tolist()
    ended = next(i for i in range(len(first)) if stop in PROMPT + model.tokenizer.decode(first[:i + 1]))
    assert ended == 1 and all(t == model.pad_token_id for t in first[ended + 1:])  # padded after the stop


def test_stream_holds_back_what_may_start_a_stop_string(model, free_run):
    full, _ = free_run
    pending = full[len(full) // 3] + "\u2603"  # its first character occurs; the whole never does
    assert "".join(model.stream(PROMPT, **SAMPLED, stop=pending)) == full
    assert _settled("one\ntwo\n", ("\n\n",)) == "one\ntwo"
    assert _settled("one\n\ntwo", ("\n\n", "tw")) == "one"
    assert _settled("one", ()) == "one"
    assert _settled("\nA", ("\n\n",), context="x\n") == ""       # began in the prompt
    assert _settled(" of", ("the end of",), context="the end") == ""  # may still complete it
    assert _settled("z", ("\n\n",), context="\n\n") == "z"        # the prompt alone does not stop


# ------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("options, words", [
    (dict(temperature=-1), "temperature -1 is negative"),
    (dict(top_k=-2), "top_k -2 is negative"),
    (dict(top_p=0), "top_p 0 is outside"),
    (dict(repetition_penalty=0), "repetition_penalty 0 is not positive"),
    (dict(stop=["ok", ""]), "must be non-empty strings"),
    (dict(max_new_tokens=-1), "max_new_tokens -1 is negative"),
])
def test_bad_generation_options_are_typed_errors_before_any_work(model, options, words):
    with pytest.raises(OptionsError, match=words):
        model.generate(PROMPT, **options)
    with pytest.raises(OptionsError, match=words):
        model.stream(PROMPT, **options)  # on the call, not at the first piece


def test_an_empty_prompt_is_a_typed_error(model):
    with pytest.raises(OptionsError, match=r"prompt 2 of 2 \(''\) encodes to no tokens"):
        model.generate(["x", ""])
    with pytest.raises(OptionsError, match="no prompt given"):
        model.generate([])


def test_an_absent_device_is_a_typed_error(model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(OptionsError, match="device 'cuda' is not available"):
        bloomconv.load(model.checkpoint.directory, device="cuda")


# --------------------------------------------------------------------------------- the command

def invoke(*args, input=None):
    return CliRunner().invoke(main, ["generate", *map(str, args)], input=input)


def test_generate_command_reads_the_prompt_from_a_file_or_stdin(model, tmp_path):
    directory = model.checkpoint.directory
    expected = PROMPT + model.generate(PROMPT, max_new_tokens=6) + "\n"
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT + "\n")  # one trailing newline is dropped
    for result in (invoke(directory, "-f", prompt_file, "--max-new-tokens", 6),
                   invoke(directory, "-", "--max-new-tokens", 6, input=PROMPT + "\n"),
                   invoke(directory, "-f", "-", "--max-new-tokens", 6, input=PROMPT)):
        assert result.exit_code == 0, result.output
        assert result.stdout == expected


def test_generate_command_passes_stop_penalty_and_device(model, free_run):
    full, stop = free_run
    directory = model.checkpoint.directory
    result = invoke(directory, PROMPT, "--max-new-tokens", 24, "--temperature", 1, "--seed", 1,
                    "--stop", "\u2603never", "--stop", stop, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout == PROMPT + full[:full.index(stop)] + "\n"
    result = invoke(directory, PROMPT, "--max-new-tokens", 8, "--repetition-penalty", 10)
    assert result.exit_code == 0, result.output
    penalized = model.generate(PROMPT, max_new_tokens=8, repetition_penalty=10.0)
    assert result.stdout == PROMPT + penalized + "\n" and penalized != model.generate(PROMPT, max_new_tokens=8)


def test_generate_command_refusals_are_one_line(model):
    directory = model.checkpoint.directory
    for args, words in [((directory, ""), "encodes to no tokens. Give each prompt some text."),
                        ((directory, "-"), "encodes to no tokens"),  # empty stdin
                        ((directory, "x", "--stop", ""), "must be non-empty strings")]:
        result = invoke(*args, input="")
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("bloomconv: error: ") and result.stderr.count("\n") == 1, result.stderr
        assert words in result.stderr and "Traceback" not in result.output
    for args in [(directory,), (directory, "x", "-f", "-")]:  # no prompt; two prompts
        result = invoke(*args)
        assert result.exit_code == 2 and "PROMPT" in result.stderr and "-f FILE" in result.stderr
    for args in [(directory, "x", "--repetition-penalty", 0), (directory, "x", "--device", "tpu")]:
        assert invoke(*args).exit_code == 2
    if not torch.cuda.is_available():
        result = invoke(directory, "x", "--device", "cuda")
        assert result.exit_code == 2 and "device 'cuda' is not available" in result.stderr
