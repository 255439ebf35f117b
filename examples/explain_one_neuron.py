"""Explain and score one neuron from Python, without Dagster (docs/ARCHITECTURE.md shows this file).
Run: `python -m examples.explain_one_neuron [LAYER NEURON]` (the embedded Gemma explains and simulates)."""

import numpy as np

from pipeline.core.corpus import CorpusSpec, prefix_ids, tokenize_corpus
from pipeline.core.examples import unit_examples
from pipeline.core.llm import Completion, GenerationParams, LLMBackend, LLMFailure
from pipeline.core.models import load_subject_model
from pipeline.core.prompts import explanation_prompt, parse_explanation
from pipeline.core.records import SamplingSpec, collect_activation_records, records_frame
from pipeline.core.scoring import correlation
from pipeline.core.simulator import Simulator
from pipeline.core.units import units_from_frames


def explain_and_score(
    model: str, corpus: CorpusSpec, sampling: SamplingSpec, layer: int, neuron: int, explainer: LLMBackend,
    simulator: Simulator,
) -> tuple[str, float | None]:  # fmt: skip
    subject = load_subject_model(model)  # what the subject_model asset loads
    tokens = tokenize_corpus(subject.tokenizer, corpus).sort("seq_id")  # corpus_tokens
    ids = np.asarray(tokens["token_ids"].to_list(), dtype=np.int64)
    captured = collect_activation_records(subject, ids, [layer], sampling, prefix=prefix_ids(subject.tokenizer))
    records = records_frame(captured[layer])  # activation_records: the paper's ActivationRecords, per neuron
    examples = unit_examples(records, tokens.select("seq_id", "token_ids", "tokens"))  # splits, top tokens
    unit = units_from_frames(examples, tokens, records)[(layer, neuron, "+")]  # the paper's NeuronRecord
    # Explain: the few-shot prompt over the unit's train top records (levels 0-10), first line kept.
    reply = explainer.complete([explanation_prompt(unit.train_records())], GenerationParams(temperature=0.0))[0]
    explanation, why_not = parse_explanation(reply.texts[0]) if isinstance(reply, Completion) else (None, reply)
    if explanation is None:
        raise RuntimeError(f"no explanation: {why_not}")
    # Simulate the test split (top and random records), then score: the paper's ev_correlation_score.
    test = unit.split("test")
    simulated = simulator.simulate(explanation, [e.tokens for e in test])
    if isinstance(simulated, LLMFailure):
        raise RuntimeError(f"simulation failed: {simulated.reason}")
    score = correlation([unit.true(e) for e in test], simulated)  # corr_all of the scores table
    return explanation, score.value


if __name__ == "__main__":
    import sys

    from pipeline.core.llm_local import LocalBackend
    from pipeline.core.models import EMBEDDED
    from pipeline.core.simulate_local import LocalSimulator

    layer, neuron = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (6, 0)
    gemma = load_subject_model(EMBEDDED)
    name = gemma.identity.data_version
    backend, sim = LocalBackend(gemma.model, gemma.tokenizer, name), LocalSimulator(gemma.model, gemma.tokenizer, name)
    print(explain_and_score(EMBEDDED, CorpusSpec(n_sequences=64), SamplingSpec(), layer, neuron, backend, sim))
