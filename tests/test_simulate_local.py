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
from pipeline.core.llm import LLMFailure
from pipeline.core.models import embedded_model_dir
from pipeline.core.simulate_local import (
    LevelTokens,
    LocalSimulator,
    NaiveLocalSimulator,
    _expected_levels,
    _levels_from_logits,
)
from pipeline.core.simulator import Job, expected_level, parse_level
from pipeline.infra.llm_cache import CachedSimulator, LLMCache

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


def test_batched_readout_equals_the_per_slot_one(gemma_tokenizer) -> None:
    """The fast path reads all slots of a batch at once; the naive one slot by slot: same numbers."""
    levels = LevelTokens.from_tokenizer(gemma_tokenizer)
    generator = torch.Generator().manual_seed(0)
    first = torch.randn((50, len(levels.rows)), generator=generator, dtype=torch.float64) * 4
    branch = torch.randn((50, len(levels.rows)), generator=generator, dtype=torch.float64) * 4
    for b in (branch, None):
        got = _expected_levels(first.numpy(), None if b is None else b.numpy(), levels)
        want = [_levels_from_logits(first[i], None if b is None else b[i], levels) for i in range(50)]
        assert np.allclose(got, want, atol=1e-12, rtol=0) and np.std(want) > 0.5


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


# Jobs whose explanations tokenize to different lengths, so a shared batch pads own prefixes.
JOBS = [
    Job("words about food", SEQUENCES),
    Job("years", SEQUENCES[:2]),
    Job("x", []),
    Job("a much longer explanation of what this neuron does, with many more words in it", SEQUENCES[1:]),
    Job("numbers", SEQUENCES[2:]),
]


def simulate_many_logged(fast: LocalSimulator, jobs: list[Job]) -> tuple[list, list[int], list[int]]:
    """simulate_many's results, the jobs reported (in report order), and the jobs mixed into each batch."""
    reported: list[int] = []
    mixed: list[int] = []
    prefix_cache = fast._prefix_cache

    def spy(owns, job_of):
        mixed.append(len(set(job_of)))
        return prefix_cache(owns, job_of)

    fast._prefix_cache = spy  # type: ignore[method-assign]
    results = fast.simulate_many(jobs, on_result=lambda i, _: reported.append(i))
    del fast._prefix_cache
    return results, reported, mixed


def test_many_jobs_share_batches_and_equal_naive(gemma_tokenizer) -> None:
    """Rows of different explanations in one forward pass (padded, masked own prefixes) give each
    explanation's naive numbers; a padding mask that leaks is caught by the same comparison."""
    model = tiny_gemma(len(gemma_tokenizer))
    fast = LocalSimulator(model, gemma_tokenizer, "tiny-gemma", batch_size=4, mix_jobs=True)
    naive = NaiveLocalSimulator(model, gemma_tokenizer, "tiny-gemma")
    own = {len(fast.prompt.prefix_parts(job.explanation)[1]) for job in JOBS}
    assert len(own) >= 3  # the own prefixes really differ in length
    got, reported, mixed = simulate_many_logged(fast, JOBS)
    assert max(mixed) >= 2 and len(mixed) < sum(1 for j in JOBS if j.sequences)  # jobs really share passes
    assert sorted(reported) == list(range(len(JOBS)))  # each job reported once, the empty one too
    assert got[2] == []
    for job, values in zip(JOBS, got, strict=True):
        if job.sequences:
            assert max_delta(values, naive.simulate(*job)) <= 1e-3
    assert fast.usage.snapshot()["requests"] == sum(1 for j in JOBS if j.sequences)

    on_cpu = LocalSimulator(model, gemma_tokenizer, "tiny-gemma", batch_size=4)  # default: mixed only on a GPU
    alone, _, mixed = simulate_many_logged(on_cpu, JOBS)
    assert not on_cpu.mix_jobs and set(mixed) == {1}
    assert all(max_delta(a, b) <= 1e-4 for a, b in zip(alone, got, strict=True) if a)

    mask = fast._mask
    fast._mask = lambda visible, pos, n_prefix, window: mask(
        visible, pos, torch.full_like(n_prefix, n_prefix.max()), window
    )
    leaky = fast.simulate_many(JOBS)
    assert max(max_delta(a, b) for a, b in zip(leaky, got, strict=True) if a) > 1e-2


def test_many_jobs_on_gpt2_absolute_positions() -> None:
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=4096, n_embd=16, n_head=2, n_layer=2, initializer_range=0.5
    )
    model = GPT2LMHeadModel(config).eval()
    fast = LocalSimulator(model, tokenizer, "tiny-gpt2", batch_size=5, mix_jobs=True)
    naive = NaiveLocalSimulator(model, tokenizer, "tiny-gpt2")
    jobs = [Job("x", SEQUENCES), Job("Neuron behavior of x", SEQUENCES[1:3])]
    got, _, mixed = simulate_many_logged(fast, jobs)
    assert max(mixed) == 2
    for job, values in zip(jobs, got, strict=True):
        assert max_delta(values, naive.simulate(*job)) <= 1e-3


def test_many_jobs_out_of_memory_retries_one_job_at_a_time(gemma_tokenizer) -> None:
    """A window that does not fit is rerun job by job: the jobs that fit alone get their numbers,
    the one that does not gets a failure, and the rest of the layer goes on."""
    fast = LocalSimulator(tiny_gemma(len(gemma_tokenizer)), gemma_tokenizer, "tiny-gemma", batch_size=4, mix_jobs=True)
    want = fast.simulate_many(JOBS)
    real = fast._simulate_jobs
    too_big = JOBS[3].explanation

    def fits(jobs):
        if len(jobs) > 1 or jobs[0].explanation == too_big:
            raise torch.OutOfMemoryError("injected")
        return real(jobs)

    fast._simulate_jobs = fits  # type: ignore[method-assign]
    got = fast.simulate_many(JOBS)
    assert isinstance(got[3], LLMFailure) and "out of memory" in got[3].reason
    for i in (0, 1, 4):
        assert max_delta(got[i], want[i]) <= 1e-4  # float32 sums differ with the batch a row is in
    assert got[2] == []


def test_cached_simulate_many_stores_and_answers_jobs(gemma_tokenizer, tmp_path) -> None:
    fast = LocalSimulator(tiny_gemma(len(gemma_tokenizer)), gemma_tokenizer, "tiny-gemma", batch_size=4, mix_jobs=True)
    cached = CachedSimulator(fast, LLMCache(tmp_path / "cache.sqlite"))
    first = cached.simulate(*JOBS[1])  # one job cached beforehand
    reported: list[int] = []
    got = cached.simulate_many(JOBS, on_result=lambda i, _: reported.append(i))
    assert sorted(reported) == list(range(len(JOBS)))
    assert max_delta(got[1], first) == 0.0 and fast.usage.snapshot()["cache_hits"] == 1
    again = cached.simulate_many(JOBS)
    assert fast.usage.snapshot()["cache_hits"] == 1 + len(JOBS)  # every job, from the cache
    for a, b in zip(again, got, strict=True):
        assert len(a) == len(b) and (not a or max_delta(a, b) == 0.0)
