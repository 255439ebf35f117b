"""The in-process explainer's prompt reuse (the kept prompt's KV cache, read once for all samples)
must write what `generate` on the whole prompt writes: the same token ids, greedy and seeded
sampling, on a tiny Gemma 3 whose sliding window is much shorter than the few-shot part the
prompts share, and on a tiny GPT-2 (no sliding window)."""

from __future__ import annotations

from typing import Any

import pytest
import tiny_models
import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM, GPT2Config, GPT2LMHeadModel

from pipeline.core.errors import AtlasInputError
from pipeline.core.llm import Completion, GenerationParams
from pipeline.core.llm_local import LocalBackend, shared_length
from pipeline.core.models import EMBEDDED, embedded_model_dir, load_subject_model
from pipeline.core.prompts import explainer_few_shot_explanations, explanation_prompt

RECORDS = [
    [[("The", 0), (" year", 0), (" 19", 10), ("87", 3), (" was", 0), (" cold", 0)]],
    [[("He", 0), (" ate", 2), (" soup", 10), (" with", 0), (" bread", 7)]],
    [[("Do", 0), (" not", 10), (" open", 0), (" the", 0), (" door", 1)], [("never", 8), (" again", 0)]],
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(embedded_model_dir()[0])


def tiny_gemma(vocab_size: int) -> Gemma3ForCausalLM:
    # sharp distributions: a wrong cache changes the tokens at once
    return tiny_models.tiny_gemma(vocab_size, seed=2, initializer_range=0.5)


def tiny_gpt2(vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=vocab_size, n_positions=4096, n_embd=32, n_head=2, n_layer=2, initializer_range=0.5)
    return GPT2LMHeadModel(config).eval()


def run(backend: LocalBackend, prompts: list[str], params: GenerationParams) -> tuple[list[Completion], list[list]]:
    """The completions and the token ids `generate` returned after each prompt."""
    ids: list[list] = []
    generate = type(backend.lm).generate

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = generate(backend.lm, *args, **kwargs)
        ids.append(out[:, args[0].shape[1] :].tolist())
        return out

    backend.lm.generate = recording
    try:
        results = backend.complete(prompts, params)
    finally:
        del backend.lm.generate
    assert all(isinstance(r, Completion) for r in results), results
    return results, ids  # type: ignore[return-value]


PARAMS = {
    "greedy": GenerationParams(max_tokens=10, temperature=0.0, stop=("\n",)),
    "greedy, few-shot text avoided": GenerationParams(
        max_tokens=10, temperature=0.0, stop=("\n",), avoid=tuple(explainer_few_shot_explanations())
    ),
    "sampled, 2 samples": GenerationParams(max_tokens=10, temperature=0.8, n=2, stop=("\n",), seed=7),
}


CASES = [(tiny_gemma, name) for name in PARAMS] + [(tiny_gpt2, "greedy, few-shot text avoided")]


@pytest.mark.parametrize(("build", "name"), CASES, ids=[f"{b.__name__}-{n}" for b, n in CASES])
def test_prompt_reuse_writes_what_generate_on_the_whole_prompt_writes(tokenizer: Any, build: Any, name: str) -> None:
    params = PARAMS[name]
    model = build(len(tokenizer))
    # The second prompt again (a redraw asks the same prompt): all of it but its last token is reused.
    prompts = [explanation_prompt(r) for r in RECORDS[1:]] + [explanation_prompt(RECORDS[2])]
    plain = LocalBackend(model, tokenizer, "tiny", plain=True)
    fast = LocalBackend(model, tokenizer, "tiny")
    assert fast.reuse and not plain.reuse
    want, want_ids = run(plain, prompts, params)
    got, got_ids = run(fast, prompts, params)
    assert got_ids == want_ids
    assert got == want  # texts, prompt tokens (the whole prompt), completion tokens, truncation
    assert fast.usage.snapshot() == plain.usage.snapshot()
    if params.temperature > 0:  # a random tiny model repeats one token greedily; sampled, the prompts differ
        assert len({tuple(map(tuple, i)) for i in want_ids}) > 1
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    shared = shared_length(*(tokenizer(p).input_ids for p in prompts[:2]))
    assert shared > 10 * 24  # the shared part is far longer than the sliding window
    ids = [tokenizer(p).input_ids[:-1] for p in prompts]
    assert fast.work["prompt_reused"] == shared_length(ids[0], ids[1]) + len(ids[2])
    assert fast.work["prompt_computed"] < plain.work["prompt_computed"] // 2
    assert plain.work["prompt_computed"] == params.n * sum(lengths)


def test_a_truncated_line_is_still_flagged_with_reuse(tokenizer: Any) -> None:
    model = tiny_gemma(len(tokenizer))
    fast = LocalBackend(model, tokenizer, "tiny")
    prompts = [explanation_prompt(r) for r in RECORDS[:2]]
    params = GenerationParams(max_tokens=3, temperature=0.0, stop=("\n",))
    results, _ = run(fast, prompts, params)
    # A random model almost never writes a line break in 3 tokens: cut off, as the plain path says too.
    plain, _ = run(LocalBackend(model, tokenizer, "tiny", plain=True), prompts, params)
    assert [r.truncated for r in results] == [(True,), (True,)]
    assert all(r.completion_tokens == 3 for r in results)
    assert results == plain


@pytest.mark.parametrize("build", [tiny_gemma, tiny_gpt2], ids=["gemma3-sliding", "gpt2"])
def test_the_reused_cache_gives_the_whole_prompts_next_token_logits(tokenizer: Any, build: Any) -> None:
    """What generation starts from: the next-token logits after the kept cache plus the last token
    are those of one forward over the whole prompt (the greedy check above cannot see this on a
    model that repeats one token)."""
    model = build(len(tokenizer))
    fast = LocalBackend(model, tokenizer, "tiny")
    for records in RECORDS:
        ids = tokenizer(explanation_prompt(records), return_tensors="pt").input_ids
        cache = fast._prompt_cache(ids, rows=2)
        with torch.inference_mode():
            want = model(input_ids=ids, logits_to_keep=1).logits[0, -1]
            got = model(input_ids=ids[:, -1:].expand(2, -1), cache=cache).logits[:, -1]
        assert torch.allclose(got, want.expand(2, -1), atol=1e-4), float((got - want).abs().max())
        assert want.std() > 1.0  # sharp, prompt-dependent logits: agreement means something
    assert fast.work["prompt_reused"] > 0


@pytest.mark.parametrize("build", [tiny_gemma, tiny_gpt2])
def test_requests_batched_together_write_what_each_writes_alone(tokenizer: Any, build: Any) -> None:
    """Sampled requests generated in one left-padded batch, each from its own seeded stream: the
    same completions as one request at a time (prompts of different lengths; a sliding window far
    shorter than them on Gemma). A batch drawing every request from one stream must fail this."""
    params = GenerationParams(
        max_tokens=12, temperature=0.8, n=2, stop=("\n",), seed=11, avoid=tuple(explainer_few_shot_explanations())
    )
    model = build(len(tokenizer))
    prompts = [explanation_prompt(r) for r in RECORDS] + [explanation_prompt(RECORDS[0][:1] * 2)]
    assert len({len(tokenizer(p).input_ids) for p in prompts}) == len(prompts)
    alone = LocalBackend(model, tokenizer, "tiny")
    together = LocalBackend(model, tokenizer, "tiny", batch_requests=3)  # a batch of 3, then 1
    want, want_ids = run(alone, prompts, params)
    got, got_ids = run(together, prompts, params)
    assert [len(i) for i in got_ids] == [3 * params.n, params.n]  # generate ran twice: really batched
    assert got == want
    assert together.usage.snapshot() == alone.usage.snapshot()
    assert all(len(set(c.texts)) == params.n for c in want)  # samples differ: the draws matter

    one_stream = LocalBackend(model, tokenizer, "tiny", batch_requests=3)
    shared = torch.Generator().manual_seed(params.seed)
    original = torch.Generator

    def same_generator(*args: Any, **kwargs: Any) -> torch.Generator:
        return shared

    torch.Generator = same_generator  # type: ignore[misc,assignment]
    try:
        mixed, _ = run(one_stream, prompts, params)
    finally:
        torch.Generator = original  # type: ignore[misc]
    assert mixed != want


def test_a_request_counts_the_tokens_it_generated_alone_or_batched() -> None:
    """completion_tokens counts each row's tokens before its end (EOS, or the padding after a stop
    string). On the embedded Gemma, whose rows end at different steps, a finished row is padded
    until its request's (alone) or its batch's (batched) last row ends, with EOS, Gemma's padding:
    counting that padding made a batched request count more than the same request alone."""
    subject = load_subject_model(EMBEDDED)
    params = GenerationParams(max_tokens=40, temperature=1.0, n=2, stop=("\n",), seed=3)
    prompts = [explanation_prompt(r) for r in RECORDS]
    alone, alone_ids = run(LocalBackend(subject.model, subject.tokenizer, "embedded"), prompts, params)
    together, together_ids = run(
        LocalBackend(subject.model, subject.tokenizer, "embedded", batch_requests=3), prompts, params
    )
    assert len(together_ids) == 1  # one batch
    assert [c.texts for c in together] == [c.texts for c in alone]
    ends = {subject.tokenizer.eos_token_id, subject.tokenizer.pad_token_id}

    def by_hand(rows: list[list[int]]) -> int:
        return sum(next((i for i, t in enumerate(row) if t in ends), len(row)) for row in rows)

    assert [c.completion_tokens for c in alone] == [by_hand(rows) for rows in alone_ids]
    assert [c.completion_tokens for c in together] == [c.completion_tokens for c in alone]
    # The case that matters happened: some request's rows were padded in the batch beyond its own end.
    batch_length = len(together_ids[0][0])
    assert any(len(rows[0]) < batch_length for rows in alone_ids)
    assert all(0 < c.completion_tokens < params.n * params.max_tokens for c in alone)


def test_a_batch_that_does_not_fit_runs_one_request_at_a_time(tokenizer: Any) -> None:
    params = GenerationParams(max_tokens=6, temperature=0.8, n=2, stop=("\n",), seed=5)
    model = tiny_gemma(len(tokenizer))
    prompts = [explanation_prompt(r) for r in RECORDS]
    want = LocalBackend(model, tokenizer, "tiny").complete(prompts, params)
    backend = LocalBackend(model, tokenizer, "tiny", batch_requests=3)

    def too_big(*args: Any) -> None:
        raise torch.OutOfMemoryError("injected")

    backend._many = too_big  # type: ignore[method-assign]
    assert backend.complete(prompts, params) == want
    with pytest.raises(AtlasInputError, match="batch_requests"):
        LocalBackend(model, tokenizer, "tiny", batch_requests=0)
