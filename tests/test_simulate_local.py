"""The fast local simulator (prefix KV cache, batched rows, hand-built masks, level rows of the head)
must give the naive full-prompt, full-head numbers — on Gemma 3 with a sliding window shorter than
the prompt and its two-token "10", and on GPT-2 with a single-token "10"."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    Gemma3ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from pipeline.core.errors import AtlasInputError
from pipeline.core.models import embedded_model_dir
from pipeline.core.simulate_local import LevelTokens, LocalSimulator, NaiveLocalSimulator
from pipeline.core.simulator import expected_level, parse_level

SEQUENCES = [
    ["The", " year", " 19", "87", " was", " cold", "."],
    ["Add", " 2", " cups", "\n", "of", "\tflour"],
    ["x"],
    ["He", " ate", " soup", " with", " bread", " and", " 10", " olives", " in", " 1999", "."],
]


@pytest.fixture(scope="module")
def gemma_tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_dir()[0])


def tiny_gemma(vocab_size: int, sliding_window: int = 24) -> Gemma3ForCausalLM:
    # sharp, varied distributions: a wrong mask shows up at once
    return tiny_models.tiny_gemma(vocab_size, seed=1, sliding_window=sliding_window, initializer_range=0.5)


def max_delta(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def test_gemma_levels_spell_ten_with_two_tokens(gemma_tokenizer) -> None:
    levels = LevelTokens.from_tokenizer(gemma_tokenizer)
    assert sorted(levels.single.values()) == list(range(10))
    ((first, (nxt, level)),) = levels.branches.items()
    assert (gemma_tokenizer.decode([first]), gemma_tokenizer.decode([nxt]), level) == ("1", "0", 10)


def test_fast_equals_naive_on_gemma_with_sliding_window(gemma_tokenizer) -> None:
    model = tiny_gemma(len(gemma_tokenizer))
    fast = LocalSimulator(model, gemma_tokenizer, "tiny-gemma", batch_size=3)  # 2 batches, padded rows
    naive = NaiveLocalSimulator(model, gemma_tokenizer, "tiny-gemma")
    assert len(fast.prompt.prefix("words")) > 10 * fast.sliding  # the window really cuts the prefix
    for explanation in ("words about food", "years"):  # the second reuses the few-shot KV cache
        got, want = fast.simulate(explanation, SEQUENCES), naive.simulate(explanation, SEQUENCES)
        assert max_delta(got, want) <= 1e-3
        assert np.concatenate(want).std() > 0.05  # the numbers vary, so agreement means something
    fast.sliding = None  # ignoring the window must be caught by the same comparison
    assert max_delta(fast.simulate("words about food", SEQUENCES), want) > 1e-2


def test_split_of_one_between_one_and_ten(gemma_tokenizer) -> None:
    """p("1") goes to 1 and 10 in the odds of "\\n" vs "0" after it: check on one slot by hand."""
    model = tiny_gemma(len(gemma_tokenizer))
    naive = NaiveLocalSimulator(model, gemma_tokenizer, "tiny-gemma")
    levels = naive.levels
    prompt = naive.prompt.prefix("e") + naive.prompt.row(["hi"]).ids[:-1]  # up to the tab, no branch token
    (one,) = [t for t, v in levels.single.items() if v == 1]
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double(), dim=0)
        q = torch.softmax(model(input_ids=torch.tensor([prompt + [one]])).logits[0, -1].double(), dim=0)
    zero, end = levels.branches[one][0], levels.end
    probs = {v: float(p[t]) for t, v in levels.single.items()}
    split = float(q[zero] / (q[zero] + q[end]))
    probs[10], probs[1] = probs[1] * split, probs[1] * (1 - split)
    (got,) = naive.simulate("e", [["hi"]])
    assert got[0] == pytest.approx(expected_level(probs), abs=1e-9)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace characters are their own tokens and "10" is one token, like GPT tokenizers."""
    words = "<unk> <s> \n \t \\ unknown <start> <end> Neuron Activations Explanation of neuron behavior".split(" ")
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*words, "\n", "\t", " ", *map(str, range(11))]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\w+|[^\w\s]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")


def test_fast_equals_naive_on_gpt2_with_single_token_ten() -> None:
    tokenizer = word_tokenizer()
    levels = LevelTokens.from_tokenizer(tokenizer)
    assert not levels.branches and sorted(levels.single.values()) == list(range(11))
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=4096, n_embd=16, n_head=2, n_layer=2, initializer_range=0.5
    )
    model = GPT2LMHeadModel(config).eval()
    fast = LocalSimulator(model, tokenizer, "tiny-gpt2", batch_size=2)
    naive = NaiveLocalSimulator(model, tokenizer, "tiny-gpt2")
    want = naive.simulate("x", SEQUENCES)
    assert max_delta(fast.simulate("x", SEQUENCES), want) <= 1e-3
    assert np.concatenate(want).std() > 0.05


def test_expected_level_and_parse_level() -> None:
    assert expected_level({0: 1.0, 10: 1.0}) == 5.0
    assert expected_level({3: 2.0, 11: 5.0}) == 3.0  # values outside 0..10 are ignored
    assert expected_level({0: 0.0}) is None
    assert [parse_level(t) for t in ["7", " 7", "10", "11", "07", "x", "٣"]] == [7, 7, 10, None, None, None, None]


def test_tokenizer_without_a_single_token_line_break_is_refused() -> None:
    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, **{str(i): i + 1 for i in range(11)}}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(AtlasInputError, match="line break"):
        LevelTokens.from_tokenizer(tokenizer)


def test_empty_input_gives_empty_output(gemma_tokenizer) -> None:
    assert LocalSimulator(tiny_gemma(len(gemma_tokenizer)), gemma_tokenizer, "t").simulate("e", []) == []
