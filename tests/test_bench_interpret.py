"""The interpret benchmark, run tiny: a random tiny Gemma 3 (the embedded tokenizer) as subject,
explainer and simulator, 2 units, 1 rep. Checks the report's structure and sanity, not timings."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import tiny_gemma
from transformers import AutoTokenizer

from bench.interpret import PATHS, format_report, make_units, measure
from pipeline.core.llm import GenerationParams
from pipeline.core.models import ModelIdentity, SubjectModel, embedded_model_dir
from pipeline.core.prompts import explainer_few_shot_explanations
from pipeline.core.records import SamplingSpec


def tiny_subject() -> SubjectModel:
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir()[0])
    model = tiny_gemma(
        len(tokenizer), seed=4, sliding_window=32, layer_types=("sliding_attention", "full_attention"),
        max_position_embeddings=8192,
    )  # fmt: skip
    return SubjectModel(model=model, tokenizer=tokenizer, identity=ModelIdentity("tiny-gemma", "0"), path=Path("."))


def test_bench_interpret_reports_both_paths_and_the_floor() -> None:
    subject = tiny_subject()
    units = make_units(subject, layer=0, n_units=2, n_sequences=24, seq_len=12, spec=SamplingSpec(top_k=4, random_k=4))
    assert len(units) == 2 and all(u.split("valid") for u in units)
    params = GenerationParams(
        max_tokens=4, temperature=0.8, n=2, stop=("\n",), avoid=tuple(explainer_few_shot_explanations())
    )
    bare = [torch.randint(0, 1000, (2, 16))]
    result = measure(subject, units, params, reps=1, bare_batches=bare, batch_requests=2)
    for path in PATHS:
        (run,) = result.runs[path]
        assert run.explain_s > 0 and run.simulate_s > 0 and run.simulations > 0 and run.cache_hits == 0
        assert len(run.explanations) == 2 * len(units)  # two samples per unit
    today, fast = result.runs["today"][0], result.runs["optimized"][0]
    # Reuse: the optimized path computes far fewer prompt tokens; the simulations are the same work.
    assert fast.explain_tokens < today.explain_tokens * 0.75
    assert fast.simulate_tokens == today.simulate_tokens > 0
    assert result.identical() == (2 * len(units), 2 * len(units))  # same seeds, same samples
    assert today.simulated.size > 20 and result.simulated_delta() <= 1e-3  # batched across jobs: same levels
    summary = result.summary()
    assert all(v > 0 for v in summary.values()), summary
    assert summary["today_total_floor_s"] > summary["optimized_total_floor_s"]
    report = format_report(result)
    for text in ("seconds per unit", "today", "optimized", "speed-up today / optimized", "floor", "time / floor"):
        assert text in report
    assert "MET" in report and f"{2 * len(units)} of {2 * len(units)}" in report
