"""Bad activations through the real Dagster assets: a dead neuron becomes NULL rows with a reason at
every stage (the layer completes), and an fp16 overflow stops the capture with an error that names
it instead of writing NaN statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import loopback_llm, query, run_stages
from loopback_llm import LoopbackServer, ServerState
from tiny_models import DIGIT_NEURON, build_digit_model, build_tokenizer

from assets.config import ExplainConfig, SamplingConfig
from assets.resources import CorpusResource, SubjectModelResource

DEAD = 9  # no input weights and a bias of -30: GELU(-30) is ~0 (never above 0) on every token
STAGES = ["subject_model", "corpus_tokens", "activation_records", "unit_examples"]
HOT = 11  # the digit neuron's input times 2e4: ~6e4 to 1.2e5 on digits, past float16's 65504


def write_model(directory: Path) -> Path:
    tokenizer = build_tokenizer()
    model = build_digit_model(tokenizer)
    with torch.no_grad():
        fc = model.transformer.h[0].mlp.c_fc
        fc.weight[:, DEAD] = 0.0
        fc.bias[DEAD] = -30.0
        fc.weight[:, HOT] = 0.0
        fc.weight[0, HOT] = 1.0e5
        fc.bias[HOT] = 0.0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("bad_model"))


def _resources(model_dir: Path, corpus: Path, dtype: str) -> dict:
    return {
        "subject": SubjectModelResource(model=str(model_dir), dtype=dtype),
        "corpus": CorpusResource(source=str(corpus), seq_len=16, n_sequences=40, seed=3),
        "sampling": SamplingConfig(top_k=8, random_k=8, quantile_bins=2, per_quantile=2),
    }


def test_a_dead_neuron_gets_null_rows_with_reasons_and_the_layer_completes(
    tmp_path: Path, model_dir: Path, digit_corpus: Path
) -> None:
    database = tmp_path / "neuron_atlas.duckdb"
    state = ServerState(
        replies=[("the main thing this neuron does is find", " digits.\n")], slot_probs=[{"0": 1.0}, {"10": 1.0}]
    )
    with LoopbackServer(state) as server:
        result = run_stages(
            database,
            n_layers=2,
            layers=(0, 0),
            **_resources(model_dir, digit_corpus, "float32"),
            **loopback_llm(server),
            explain=ExplainConfig(neuron_ids=[DIGIT_NEURON, DEAD], samples=1, temperature=0),
            selection=[*STAGES, "explanations", "simulations", "scores"],
        )
    assert result.success
    q = query(database)
    stats = q("select max_activation, mean_activation, variance, nonzero_frac from atlas.activation_records "
              "where layer = 0 and neuron = ?", [DEAD])  # fmt: skip
    assert stats[0][0] <= 0 and all(v == v for v in stats[0])  # no NaN
    levels = q("select list_distinct(flatten(list(levels))) from atlas.examples_long "
               "where layer = 0 and neuron = ?", [DEAD])  # fmt: skip
    assert levels == [([0],)]
    explained = dict(q("select neuron, failure_reason from atlas.explanations where kind = 'llm' and layer = 0"))
    assert explained[DIGIT_NEURON] is None and explained[DEAD].startswith("dead unit")
    simulated = q("select failure_reason from atlas.simulations where kind = 'llm' and neuron = ?", [DEAD])
    assert [r[0].startswith("no explanation: dead unit") for r in simulated] == [True]
    scored = dict(q("select neuron, corr_all from atlas.scores where kind = 'llm' and layer = 0 and split = 'valid'"))
    reason = q("select failure_reason from atlas.scores where kind = 'llm' and neuron = ?", [DEAD])
    assert scored[DEAD] is None and "dead unit" in reason[0][0] and scored[DIGIT_NEURON] is not None
    space = q("select failure_reason from atlas.explanations where kind = 'token_space' and neuron = ?", [DEAD])
    assert space[0][0].startswith("dead unit")


def test_fp16_overflow_is_named_and_nothing_is_written(tmp_path: Path, model_dir: Path, digit_corpus: Path) -> None:
    database = tmp_path / "neuron_atlas.duckdb"
    assert run_stages(database, 2, (0, 0), **_resources(model_dir, digit_corpus, "float32")).success
    good = query(database)("select max_activation from atlas.activation_records where layer = 0 and neuron = ?", [HOT])
    assert 6.0e4 < good[0][0] < 1.3e5  # finite in float32

    database16 = tmp_path / "fp16.duckdb"
    result = run_stages(database16, 2, (0, 0), **_resources(model_dir, digit_corpus, "float16"), raise_on_error=False)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = str(failures[0].event_specific_data.error)
    assert "NaN/inf activations" in message and "fp16 overflow" in message and "float32" in message
    tables = query(database16)("select table_name from information_schema.tables where table_schema = 'atlas'")
    assert "activation_records" not in {t[0] for t in tables}
