"""Explain, simulate and score for real: the hand-set digit neuron through the Dagster assets, with the
embedded Gemma as explainer and simulator, and with an OpenAI-compatible server on loopback."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pytest
from conftest import local_llm, loopback_llm, query, run_stages
from loopback_llm import LoopbackServer, ServerState
from tiny_models import DIGIT_NEURON, DIGITS

from assets.config import ClassifyConfig, ExplainConfig, SamplingConfig
from assets.resources import CorpusResource, SubjectModelResource
from pipeline.core.errors import AtlasInputError
from pipeline.core.interpret import KINDS, LLM, TOKEN_LOOKUP, TOKEN_SPACE, score_layer, simulate_layer
from pipeline.core.llm import Completion, GenerationParams, LLMFailure
from pipeline.core.llm_local import LocalBackend
from pipeline.core.models import load_subject_model
from pipeline.core.simulate_local import LocalSimulator
from pipeline.core.simulator import Simulator
from pipeline.core.units import units_from_frames

NEURONS = [DIGIT_NEURON, 5]


def digit_resources(model_dir: Path, corpus: Path) -> dict:
    return {
        "subject": SubjectModelResource(model=str(model_dir)),
        "corpus": CorpusResource(source=str(corpus), seq_len=16, n_sequences=64, seed=3),
        "sampling": SamplingConfig(top_k=20, random_k=20, quantile_bins=2, per_quantile=2, batch_size=8),
    }


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, digit_model_dir: Path, digit_corpus: Path) -> tuple:
    database = tmp_path_factory.mktemp("wh") / "neuron_atlas.duckdb"
    result = run_stages(
        database,
        n_layers=2,
        layers=(0, 0),
        **digit_resources(digit_model_dir, digit_corpus),
        **local_llm(),
        explain=ExplainConfig(neuron_ids=NEURONS),
        classify=ClassifyConfig(max_per_class=4),
    )
    assert result.success
    return database, result


def test_explanations_hold_llm_token_space_and_lookup_rows_with_lineage(local_run: tuple) -> None:
    q = query(local_run[0])
    rows = q(
        "select neuron, polarity, kind, explanation, failure_reason, explainer_model, prompt_version, prompt_tokens,"
        " model_id, run_id from atlas.explanations order by neuron, kind"
    )
    samples = ExplainConfig().samples
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (n, "+", k) for n in NEURONS for k in sorted(KINDS) for _ in range(samples if k == LLM else 1)
    ]
    for _neuron, _pol, kind, text, reason, explainer, version, prompt_tokens, model_id, run_id in rows:
        assert (text and reason is None) or (kind == LLM and reason), (text, reason)  # a sample may be cut off
        assert model_id and run_id == local_run[1].run_id
        if kind == LLM:
            assert "gemma-3-270m" in explainer and version.startswith("explain-") and prompt_tokens > 100
    space = dict(q("select neuron, explanation from atlas.explanations where kind = ?", [TOKEN_SPACE]))
    quoted = [part for part in space[DIGIT_NEURON].split('"')[1::2]]
    assert quoted and set(quoted) <= set(DIGITS)
    assert q(
        "select count(*) from atlas.explanations where kind = ? and explanation <> ?",
        [TOKEN_LOOKUP, space[DIGIT_NEURON]],
    )


def test_simulations_cover_valid_for_candidates_and_calibration_test_and_control_for_the_chosen(
    local_run: tuple,
) -> None:
    q = query(local_run[0])
    examples = {
        (neuron, split): n
        for neuron, split, n in q("select neuron, split, count(*) from atlas.examples_long group by all")
    }
    rows = q(
        "select neuron, kind, sample_index, split, control, count(*), count(simulated), min(len(simulated)),"
        " max(len(true_acts)) from atlas.simulations group by all order by all"
    )
    per: dict = {}
    for neuron, kind, sample, split, control, n, done, min_len, max_len in rows:
        per[(neuron, kind, sample, split, control)] = n
        if done:
            assert n == done == examples[(neuron, split)] and min_len == max_len == 16, (neuron, kind, split)
    chosen = q("select neuron, kind, sample_index from atlas.scores where selected and split = 'valid'")
    assert {(n, k) for n, k, _ in chosen} >= {(n, k) for n in NEURONS for k in (TOKEN_SPACE, TOKEN_LOOKUP)}
    units_per_kind = {k: sum(1 for _, kind, _ in chosen if kind == k) for _, k, _ in chosen}
    for neuron, kind, sample in chosen:
        # A control needs another unit with a chosen explanation of the kind (an LLM sample may be unusable).
        control = [("test", True)] if units_per_kind[kind] > 1 else []
        for split, is_control in (("valid", False), ("calibration", False), ("test", False), *control):
            assert (neuron, kind, sample, split, is_control) in per, (neuron, kind, split, is_control)
    # No unchosen candidate is simulated past the valid split, and controls come from the other unit.
    assert {k[3] for k in per if (k[0], k[1], k[2]) not in set(chosen)} <= {"valid"}
    controls = q("select distinct neuron, control_neuron from atlas.simulations where control")
    assert sorted(controls) == [(DIGIT_NEURON, 5), (5, DIGIT_NEURON)]
    held = q(
        "select r.acts, s.true_acts from atlas.simulations s join atlas.examples_long r using (layer, neuron, seq_id)"
        " where r.split = s.split and r.record_kind = s.record_kind"
    )
    assert held and all(np.allclose(a, b, atol=1e-6) for a, b in held)


def test_the_lookup_reference_finds_the_digit_neuron_on_the_test_split(local_run: tuple) -> None:
    q = query(local_run[0])
    rows = {
        (n, k, split): (c, ct, cr, r2, ad)
        for n, k, split, c, ct, cr, r2, ad in q(
            "select neuron, kind, split, corr_all, corr_top, corr_random, r2_all, absdev_all from atlas.scores"
        )
    }
    assert {(n, k) for n, k, _ in rows} >= {(n, k) for n in NEURONS for k in (TOKEN_SPACE, TOKEN_LOOKUP)}
    # The digit neuron's activation is a function of the token alone: a token lookup predicts it.
    digit = rows[(DIGIT_NEURON, TOKEN_LOOKUP, "test")]
    assert digit[0] > 0.99 and digit[3] > 0.9  # correlation, and r² of the calibrated lookup in activation space
    for values in rows.values():
        assert all(v is None or -1.0 <= v <= 1.0 for v in values[:3])


def test_scores_metadata_has_the_control_verdict_histograms_and_best_units(local_run: tuple) -> None:
    (mat,) = [
        e.materialization
        for e in local_run[1].get_asset_materialization_events()
        if e.materialization.asset_key.path == ["scores"]
    ]
    assert {"histogram_best_test", "best", "worst", "signal"} <= set(mat.metadata)
    assert "layer 0:" in mat.metadata["signal"].value


class TruePattern(Simulator):
    """Simulates the unit its explanation names: its true activations, on another scale and offset."""

    backend, model, prompt_version = "stub", "truth", "stub-v1"

    def __init__(self, truth: dict[tuple[str, tuple[str, ...]], np.ndarray]):
        self.truth = truth

    def simulate(self, explanation: str, sequences) -> list[np.ndarray] | LLMFailure:
        return [self.truth.get((explanation, tuple(s)), np.zeros(len(s))) for s in sequences]


def _digit_units(database: Path) -> dict:
    with duckdb.connect(str(database), read_only=True) as conn:
        examples = conn.sql(
            "select * exclude (model_id, model_revision, run_id, code_version) from atlas.unit_examples"
        ).pl()
        corpus = conn.sql("select seq_id, tokens, token_ids from atlas.corpus_tokens").pl()
        records = conn.sql("select layer, neuron, top, bottom, random, sequences from atlas.activation_records").pl()
    return units_from_frames(examples, corpus, records)


def _explanations(neuron: int, *texts: str, kind: str = LLM) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "layer": [0] * len(texts),
            "neuron": [neuron] * len(texts),
            "polarity": ["+"] * len(texts),
            "kind": [kind] * len(texts),
            "sample_index": list(range(len(texts))),
            "explanation": list(texts),
            "failure_reason": [None] * len(texts),
        },
        schema_overrides={"layer": pl.Int32, "neuron": pl.Int32, "sample_index": pl.Int16},
    )


def test_a_simulator_returning_the_true_pattern_scores_one_after_calibration(local_run: tuple) -> None:
    units = _digit_units(local_run[0])
    truth = {}
    for neuron in NEURONS:
        unit = units[(0, neuron, "+")]
        for e in unit.examples:
            truth[(f"unit {neuron}", e.tokens)] = 2.5 * unit.true(e) + 4.0  # any scale and offset
    explanations = pl.concat([_explanations(n, f"unit {n}") for n in NEURONS])
    scores = score_layer(simulate_layer(explanations, units, TruePattern(truth)))
    (row,) = scores.filter((pl.col("neuron") == DIGIT_NEURON) & (pl.col("split") == "test")).iter_rows(named=True)
    for score in ("corr_all", "corr_top", "r2_all", "absdev_all"):
        assert row[score] == pytest.approx(1.0, abs=1e-5), score  # float32 storage
    assert row["calibration_slope"] == pytest.approx(1 / 2.5, rel=1e-5) and row["best"]
    # The control simulates unit 5's text: its truth where a sequence is also one of unit 5's, else zeros.
    assert row["control_neuron"] == 5 and (row["control_corr_all"] is None or row["control_corr_all"] < 0.5)


def test_embedded_simulator_prefers_the_true_explanation(local_run: tuple) -> None:
    units = _digit_units(local_run[0])
    gemma = load_subject_model("embedded")
    simulator = LocalSimulator(gemma.model, gemma.tokenizer, "embedded")
    explanations = _explanations(DIGIT_NEURON, "numbers written with digits", "words about food and cooking")
    scores = score_layer(simulate_layer(explanations, units, simulator)).filter(pl.col("split") == "valid")
    true_score, wrong_score = scores.sort("sample_index")["corr_all"].to_list()
    assert true_score > wrong_score + 0.05, (true_score, wrong_score)


def test_embedded_explainer_flags_a_line_cut_off_by_max_tokens() -> None:
    gemma = load_subject_model("embedded")
    explainer = LocalBackend(gemma.model, gemma.tokenizer, "embedded")
    prompt = "A list of fruit, one per line:\napple\npear\n"
    (short,) = explainer.complete([prompt], GenerationParams(max_tokens=1, stop=("\n",)))
    assert isinstance(short, Completion) and short.truncated == (True,), short  # one token cannot end the line
    (roomy,) = explainer.complete([prompt], GenerationParams(max_tokens=12, stop=("\n",)))
    assert isinstance(roomy, Completion) and roomy.texts[0].strip() and roomy.truncated == (False,), roomy


def test_the_embedded_explainer_can_be_kept_from_copying_its_examples() -> None:
    gemma = load_subject_model("embedded")
    explainer = LocalBackend(gemma.model, gemma.tokenizer, "embedded")
    prompt = "Favourite food: apple pie and cream.\nFavourite food: apple pie and cream.\nFavourite food:"
    params = GenerationParams(max_tokens=12, temperature=0, stop=("\n",))
    (copied,) = explainer.complete([prompt], params)
    assert "apple pie and cream" in copied.texts[0]  # the control: it copies when allowed
    (kept,) = explainer.complete([prompt], dataclasses.replace(params, avoid=("apple pie and cream",)))
    assert kept.texts[0].strip() and "apple pie and cream" not in kept.texts[0], kept.texts


GEMMA_TURNS = (  # Gemma's turn format, as an instruct model's tokenizer would carry it
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_local_chat_explainer_renders_the_turns_through_the_models_chat_template() -> None:
    import copy

    from pipeline.core.errors import AtlasInputError
    from pipeline.core.prompts import FEW_SHOT, explanation_messages

    gemma = load_subject_model("embedded")
    with pytest.raises(AtlasInputError, match="needs a model with a chat template"):
        LocalBackend(gemma.model, gemma.tokenizer, "embedded", api="chat")  # the embedded Gemma is a base model
    tokenizer = copy.copy(gemma.tokenizer)
    tokenizer.chat_template = GEMMA_TURNS
    explainer = LocalBackend(gemma.model, tokenizer, "embedded+turns", api="chat")
    assert explainer.render([{"role": "user", "content": "Hi"}]) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    messages = explanation_messages([[("a", 0), ("7", 10)]])
    text = explainer.render(messages)
    assert text.count("<start_of_turn>model\n") == len(FEW_SHOT) + 1
    assert f"<start_of_turn>model\n{FEW_SHOT[0].explanation}.<end_of_turn>" in text
    (reply,) = explainer.complete([messages], GenerationParams(max_tokens=4, temperature=0.0, stop=("\n",)))
    assert isinstance(reply, Completion)
    assert reply.prompt_tokens == len(tokenizer(text, add_special_tokens=False).input_ids), (
        "one <bos>, from the template"
    )
    assert explainer.usage.snapshot()["requests"] == 1


def test_openai_backend_on_loopback_records_failures_per_neuron(
    tmp_path: Path, digit_model_dir: Path, digit_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOP_KEY", "sk-test-PLANTED-777")
    state = ServerState(
        plan={"the main thing this neuron does is find": ["500", "500"]},  # 2 of 3 explain requests fail
        replies=[("the main thing this neuron does is find", " digits and numbers.\n")],
        slot_probs=[{"0": 0.5, "10": 0.25, "5": 0.25}],
    )
    database = tmp_path / "neuron_atlas.duckdb"
    with LoopbackServer(state) as server:
        result = run_stages(
            database,
            n_layers=2,
            layers=(0, 0),
            **digit_resources(digit_model_dir, digit_corpus),
            **loopback_llm(
                server,
                api_key_env="LOOP_KEY",
                max_attempts=1,
                cache_path=str(tmp_path / "cache.sqlite"),
                explainer={"max_failure_share": 0.7},  # 2 of 3 failing is allowed here: the layer completes
            ),
            explain=ExplainConfig(neuron_ids=[DIGIT_NEURON, 5, 6], samples=1, temperature=0),
        )
    assert result.success
    q = query(database)
    llm = q("select explanation, failure_reason, explainer_backend from atlas.explanations where kind = 'llm'")
    assert sorted(r[0] is None for r in llm) == [False, True, True]
    assert all("500" in r[1] for r in llm if r[0] is None) and {r[2] for r in llm} == {"openai"}
    scores = q("select corr_all, failure_reason from atlas.scores where kind = 'llm' and split = 'valid'")
    failed = [r for r in scores if r[1] is not None]
    assert len(failed) == 2 and all(r[0] is None and "no explanation" in r[1] for r in failed)
    # Every slot got (0 * .5 + 10 * .25 + 5 * .25) = 3.75 from the echoed logprobs.
    sims = q("select simulated from atlas.simulations where kind in ('llm', 'token_space') and simulated is not null")
    assert sims and all(v == pytest.approx(3.75) for (s,) in sims for v in s)
    assert "sk-test-PLANTED-777" not in database.read_bytes().decode("latin-1")


def test_unusable_explanations_are_recorded_per_neuron_with_reasons_in_table_and_metadata(
    tmp_path: Path, digit_model_dir: Path, digit_corpus: Path
) -> None:
    state = ServerState(
        # In request order: empty, absurdly long, cut off by max_tokens (no line end), fine.
        queued=["  \n", "finds " * 80 + "\n", " numbers and dig", " numbers and digits.\n"],
        slot_probs=[{"0": 0.9, "10": 0.1}, {"0": 0.2, "10": 0.8}, {"0": 0.6, "10": 0.4}],
    )
    database = tmp_path / "neuron_atlas.duckdb"
    neurons = [DIGIT_NEURON, 5, 6, 7]
    with LoopbackServer(state) as server:
        result = run_stages(
            database,
            n_layers=2,
            layers=(0, 0),
            **digit_resources(digit_model_dir, digit_corpus),
            **loopback_llm(
                server,
                max_concurrency=1,
                max_attempts=3,
                cache_path=str(tmp_path / "cache.sqlite"),
                explainer={"max_failure_share": 0.8},  # 3 of 4 unusable is allowed here: the layer completes
            ),
            explain=ExplainConfig(neuron_ids=neurons, samples=1, temperature=0),
        )
    assert result.success
    q = query(database)
    rows = q("select neuron, explanation, failure_reason from atlas.explanations where kind = 'llm' order by neuron")
    assert rows == [
        (neurons[0], None, "empty explanation"),
        (5, None, "explanation longer than 300 characters"),
        (6, None, "explanation cut off at max_tokens (raise explanations.max_tokens): 'numbers and dig'"),
        (7, "numbers and digits", None),
    ]
    scores = q(
        "select neuron, corr_all is null, failure_reason from atlas.scores where kind = 'llm' and split = 'valid'"
        " order by neuron"
    )
    assert [(n, null) for n, null, _ in scores] == [(neurons[0], True), (5, True), (6, True), (7, False)]
    assert "no explanation: empty explanation" in scores[0][2]
    meta = result.asset_materializations_for_node("explanations")[0].metadata
    assert meta["llm_failed"].value == 3
    reasons = meta["failure_reasons"].value
    assert "| empty explanation | 1 | " in reasons and "| explanation longer than 300 characters | 1 | 5 |" in reasons
    sim_meta = result.asset_materializations_for_node("simulations")[0].metadata
    assert "no explanation: empty explanation" in sim_meta["failure_reasons"].value


def step_error(result: Any, step: str) -> str:
    (event,) = [e for e in result.get_step_failure_events() if e.step_key == step]
    error = event.event_specific_data.error
    return "\n".join(e.message for e in [error, *([error.cause] if error.cause else [])])


def test_a_server_failing_most_requests_fails_the_step_naming_the_reason_and_a_rerun_resumes(
    tmp_path: Path, digit_model_dir: Path, digit_corpus: Path
) -> None:
    """More than max_failure_share (0.5) of a layer's requests failing is an error naming the main
    reasons with counts, not a green step of NULLs; the answers that did arrive are cached, so the rerun
    asks only for the rest. The same for the simulator's requests."""
    neurons = [DIGIT_NEURON, 5, 6, 7]
    state = ServerState(
        plan={"the main thing this neuron does is find": ["500"] * 3},  # one at a time: the first three fail
        replies=[("the main thing this neuron does is find", " digits.\n")],
        slot_probs=[{"0": 0.5, "10": 0.5}],
    )
    database = tmp_path / "neuron_atlas.duckdb"
    settings = {"max_concurrency": 1, "max_attempts": 1, "cache_path": str(tmp_path / "cache.sqlite")}
    stages = {"activation_records", "unit_examples", "subject_model", "corpus_tokens"}

    def run(selection: set[str]) -> Any:
        return run_stages(
            database,
            n_layers=2,
            layers=(0, 0),
            **digit_resources(digit_model_dir, digit_corpus),
            **loopback_llm(server, **settings),
            explain=ExplainConfig(neuron_ids=neurons),
            selection=sorted(selection),
            raise_on_error=False,
        )

    with LoopbackServer(state) as server:
        failed = run(stages | {"explanations"})
        assert not failed.success
        message = step_error(failed, "explanations")
        assert "3 of 4 explainer requests failed (more than max_failure_share=0.5)" in message
        assert "3 x explainer request failed after 1 attempt(s): HTTP 500" in message
        assert state.requests == 4

        rerun = run({"explanations"})
        assert rerun.success and state.requests == 4 + 3, "the neuron answered before came from the cache"
        meta = rerun.asset_materializations_for_node("explanations")[0].metadata
        assert (meta["explainer_requests"].value, meta["explainer_cache_hits"].value) == (3, 1)

        state.plan = {"\tunknown": ["500"] * 1000}  # every simulation request fails
        sims = run({"simulations"})
        assert not sims.success
        message = step_error(sims, "simulations")
        failed_share = re.search(r"(\d+) of (\d+) simulated sequences failed", message)
        assert failed_share and failed_share[1] == failed_share[2] and "HTTP 500" in message, message
    written = query(database)("select count(explanation) from atlas.explanations where kind = 'llm'")
    assert written == [(len(neurons) * ExplainConfig().samples,)]


def test_cost_command_predicts_the_requests_and_tokens_the_run_spent(
    local_run: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    """The estimate, made from the warehouse before explaining, against what the run recorded: the
    explainer's (the embedded Gemma's) prompt tokens per request exactly, and the simulator's
    requests at most what the flow can ask (per unit: every candidate on valid, two chosen ones on
    calibration and test, their controls on test)."""
    from pipeline.infra.cost import main

    database, result = local_run
    q = query(database)
    spent = q("select count(distinct neuron), sum(prompt_tokens) / 2 from atlas.explanations where kind = 'llm'")[0]
    asked = q("select count(*) from atlas.simulations where kind in ('llm', 'token_space') and seq_id is not null")
    split = dict(
        q(
            "select split, count(*) from atlas.examples_long where split <> 'train' and list_contains(?, neuron)"
            " group by all",
            [NEURONS],
        )
    )
    samples = ExplainConfig().samples
    bound = split["valid"] * (samples + 1) + split["calibration"] * 2 + split["test"] * 4
    ids = ",".join(map(str, NEURONS))
    common = ["--db", str(database), "--layers", "0", "--neuron-ids", ids]  # tokens counted as Gemma counts them
    main([*common, "--simulator-backend", "openai", "--simulator-api", "completions", "--max-per-class", "4"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    # Detection and fuzzing: the prompts the step asked (each for the explanation and its control).
    prompts, tokens = q(
        "select sum(n_prompts * (1 + (control_neuron is not null)::int)),"
        " sum(prompt_tokens + coalesce(control_prompt_tokens, 0)) from atlas.classification_scores"
    )[0]
    assert int(rows["classification"][1].replace(",", "")) == prompts > 0  # every unit here has a control
    # The explanations are unknown before the run: a placeholder of typical length stands in.
    assert int(rows["classification"][2].replace(",", "")) == pytest.approx(tokens, rel=0.25)
    ((without,),) = q("select count(*) from atlas.classification_scores where failure_reason like 'no held-out%'")
    assert without == 0 or f"note: detection: {without} unit(s) have no held-out texts" in out
    assert rows["explanations"][1:3] == [str(spent[0]), f"{int(spent[1]):,}"]  # samples share a request
    assert int(rows["simulations"][1].replace(",", "")) == bound >= asked[0][0] > 0
    assert rows["explanations"][3] == f"{len(NEURONS) * samples * 40}", "samples x max_tokens"

    main([*common, "--simulator-backend", "openai", "--simulator-api", "chat"])
    chat = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.split()}
    assert chat["simulations"][1] == f"{bound:,}" and chat["simulations"][-1] == f"{bound:,}", "one re-ask each"
    assert int(chat["simulations"][3].replace(",", "")) >= 3 * 16 * bound  # token, tab, level per line
    with pytest.raises(AtlasInputError, match="not in the warehouse"):
        main([*common, "--layers", "0-5"])


def test_every_shipped_query_runs(local_run: tuple) -> None:
    q = query(local_run[0])
    for path in sorted((Path(__file__).parents[1] / "warehouse" / "queries").glob("*.sql")):
        assert q(path.read_text()), path.name
    best = q((Path(__file__).parents[1] / "warehouse" / "queries" / "best_explained_neurons.sql").read_text())
    assert [r[4] for r in best] == sorted((r[4] for r in best), reverse=True)


def test_ablations_record_an_undefined_score_with_its_reason(local_run: tuple) -> None:
    """Layer 0's output projection of the digit model is all zeros: no neuron moves the output, so
    KL(mean) is 0 and the ablation score is NULL with the reason (the known-answer values of a
    neuron that does move it are in test_ablation)."""
    q = query(local_run[0])
    rows = q(
        "select neuron, selection, kl_mean, kl_simulated, ablation_score, ablation_score_reason, calibration_slope,"
        " n_sequences from atlas.ablations order by neuron"
    )
    tests = dict(q("select neuron, count(*) from atlas.examples_long where split = 'test' group by all"))
    assert [r[0] for r in rows] == sorted(NEURONS) and {r[1] for r in rows} == {"top"}
    for neuron, _, kl_mean, kl_sim, score, reason, slope, n_seq in rows:
        assert kl_mean == pytest.approx(0.0, abs=1e-12) and kl_sim == pytest.approx(0.0, abs=1e-12)
        assert score is None and "~0" in reason and slope is not None and n_seq == tests[neuron]


def test_ablation_report_command_runs_on_the_warehouse(local_run: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.infra.report import main

    main(["ablation", "--db", str(local_run[0])])
    out = capsys.readouterr().out
    assert "over 0 units: undefined" in out  # the digit model's layer 0 moves nothing (see above)


def test_every_asset_check_passes_on_good_data(local_run: tuple) -> None:
    evaluations = local_run[1].get_asset_check_evaluations()
    names = {e.check_name for e in evaluations}
    assert {"activation_records_complete", "examples_complete", "one_explanation_per_key"} <= names
    assert {"simulations_in_range", "scores_in_range", "ablations_sane"} <= names
    assert {"simulator_discriminates", "classifier_discriminates", "classification_in_range"} <= names
    warnings = {"simulator_discriminates", "classifier_discriminates"}  # about the models, not the data
    bad = [(e.check_name, e.description) for e in evaluations if not e.passed and e.check_name not in warnings]
    assert not bad


CORRUPTIONS = {
    "activation_records_complete": "update atlas.activation_records set mean_activation = 'nan' where neuron = 3",
    "examples_complete": "update atlas.unit_examples set max_activation = null where neuron = 3",
    "one_explanation_per_key": "insert into atlas.explanations select * from atlas.explanations limit 1",
    "simulations_in_range": "update atlas.simulations set simulated = list_transform(simulated, lambda v: v + 11)",
    "scores_in_range": "update atlas.scores set corr_all = 1.5 where corr_all is not null",
    "ablations_sane": "update atlas.ablations set kl_mean = -1",
    "classification_in_range": "update atlas.classification_scores set balanced_accuracy = null,"
    " balanced_accuracy_reason = null, failure_reason = null",
}


@pytest.mark.parametrize("check", sorted(CORRUPTIONS))
def test_each_check_fails_on_corrupted_data(local_run: tuple, tmp_path: Path, check: str) -> None:
    from pipeline.infra import checks

    database = tmp_path / "corrupt.duckdb"
    database.write_bytes(local_run[0].read_bytes())
    run = {"activation_records_complete": lambda c: checks.activation_records_complete(c, 20, 20)}
    fn = run.get(check) or getattr(checks, check)
    with duckdb.connect(str(database)) as conn:
        assert fn(conn).passed
        conn.execute(CORRUPTIONS[check])
        outcome = fn(conn)
    assert not outcome.passed and outcome.bad_rows > 0 and outcome.description


def test_examples_complete_fails_when_a_record_has_no_activations(local_run: tuple, tmp_path: Path) -> None:
    """unit_examples refers to activation_records' lists: a reference left dangling (the records
    rewritten without the examples) is caught, one count per lost record."""
    from pipeline.infra import checks

    database = tmp_path / "dangling.duckdb"
    database.write_bytes(local_run[0].read_bytes())
    with duckdb.connect(str(database)) as conn:
        assert checks.examples_complete(conn).passed
        (lost,) = conn.execute(
            "select count(*) from atlas.examples_long where neuron = 3 and polarity = '+' and record_kind = 'top'"
        ).fetchone()
        conn.execute("update atlas.activation_records set top = [] where neuron = 3")
        outcome = checks.examples_complete(conn)
    assert lost > 0 and not outcome.passed and outcome.bad_rows == lost
    assert "not found in activation_records" in outcome.description


def test_a_failing_blocking_check_stops_the_next_stage(
    local_run: tuple, tmp_path: Path, digit_model_dir: Path, digit_corpus: Path
) -> None:
    database = tmp_path / "neuron_atlas.duckdb"
    database.write_bytes(local_run[0].read_bytes())
    with duckdb.connect(str(database)) as conn:  # layer 0's rows are bad; the run writes layer 1
        conn.execute(CORRUPTIONS["activation_records_complete"])
    result = run_stages(
        database,
        n_layers=2,
        layers=(1, 1),
        **digit_resources(digit_model_dir, digit_corpus),
        selection=["activation_records", "unit_examples"],
        raise_on_error=False,
    )
    assert not result.success
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "activation_records_complete"]
    assert not evaluation.passed
    materialized = {e.asset_key.path[0] for e in result.get_asset_materialization_events()}
    assert materialized == {"activation_records"}  # unit_examples never ran
    layers = query(database)("select distinct layer from atlas.unit_examples order by 1")
    assert layers == [(0,)]


def test_every_row_carries_lineage_and_the_summary_view_joins_correctly(local_run: tuple) -> None:
    q = query(local_run[0])
    tables = ("corpus_tokens", "activation_records", "unit_examples", "explanations", "simulations", "scores")
    for table in (*tables, "classification_scores"):
        bad = q(f"select count(*) from atlas.{table} where model_id is null or run_id is null or code_version is null")
        assert bad == [(0,)], table
    rows = q(
        "select layer, neuron, polarity, explanation, score, gap, token_space_score, token_lookup_score,"
        " ablation_score, top_tokens, detection_score, detection_gap, fuzzing_score, fuzzing_gap"
        " from atlas.neuron_summary order by neuron"
    )
    assert [r[1] for r in rows] == sorted(NEURONS)
    for layer, neuron, polarity, explanation, score, gap, space, lookup, ablation, top_tokens, *classified in rows:
        # The embedded Gemma's detection and fuzzing of the best explanation, as the table holds them.
        scored = dict(
            q(
                "select scorer, [balanced_accuracy, gap] from atlas.classification_scores"
                " where layer = ? and neuron = ? and polarity = ?",
                [layer, neuron, polarity],
            )
        )
        assert classified == [*scored["detection"], *scored["fuzzing"]]
        want = q(
            "select e.explanation, s.corr_all, s.gap from atlas.scores s join atlas.explanations e"
            " using (layer, neuron, polarity, kind, sample_index) where s.best and s.split = 'test'"
            " and layer = ? and neuron = ? and polarity = ?",
            [layer, neuron, polarity],
        )
        assert (explanation, score, gap) == want[0]
        test = dict(
            q(
                "select kind, corr_all from atlas.scores where split = 'test' and selected"
                " and layer = ? and neuron = ?",
                [layer, neuron],
            )
        )
        assert (space, lookup) == (test[TOKEN_SPACE], test[TOKEN_LOOKUP])
        assert ablation is None  # the digit model's layer 0 moves nothing (see the ablation test)
        if neuron == DIGIT_NEURON:
            assert top_tokens and set(top_tokens) <= set(DIGITS)


def test_the_ui_column_schema_is_the_written_table(local_run: tuple) -> None:
    """Each table asset's column schema (the Dagster UI's Columns tab, shown before a first run)
    lists the columns the warehouse table has, in order, with DuckDB's types; the score columns
    say which of the paper's scores they are."""
    from dagster import AssetKey

    from assets.definitions import defs

    graph = defs.resolve_asset_graph()
    scalars = {"String": "VARCHAR", "Int8": "TINYINT", "Int16": "SMALLINT", "Int32": "INTEGER", "Int64": "BIGINT"}
    scalars |= {"Float32": "FLOAT", "Float64": "DOUBLE", "Boolean": "BOOLEAN"}

    def duck_type(polars_type: str) -> str:
        inner = polars_type.removeprefix("List(").removesuffix(")")
        return scalars[polars_type] if inner == polars_type else duck_type(inner) + "[]"

    with duckdb.connect(str(local_run[0]), read_only=True) as conn:
        for table in ("explanations", "simulations", "scores", "ablations", "classification_scores"):
            schema = graph.get(AssetKey(table)).metadata["dagster/column_schema"]
            stored = conn.execute(
                "select column_name, data_type from information_schema.columns"
                " where table_schema = 'atlas' and table_name = ? order by ordinal_position",
                [table],
            ).fetchall()
            assert [(c.name, duck_type(c.type)) for c in schema.columns] == stored, table
    docs = {c.name: c.description for c in graph.get(AssetKey("scores")).metadata["dagster/column_schema"].columns}
    assert "ev_correlation_score" in docs["corr_all"]
    assert "rsquared_score" in docs["r2_all"] and "absolute_dev_explained_score" in docs["absdev_all"]


def test_current_views_keep_only_the_current_models_rows(local_run: tuple, tmp_path: Path) -> None:
    database = tmp_path / "copy.duckdb"
    database.write_bytes(local_run[0].read_bytes())
    stages = ("corpus_tokens", "activation_records", "unit_examples", "explanations", "simulations", "scores")
    with duckdb.connect(str(database)) as conn:
        for table in (*stages, "ablations", "classification_scores"):
            total = conn.execute(f"select count(*) from atlas.{table}").fetchone()[0]
            assert conn.execute(f"select count(*) from atlas.current_{table}").fetchone()[0] == total > 0
        conn.execute("update atlas.scores set model_revision = 'an-older-checkpoint' where neuron = 5")
        stale = conn.execute("select count(*) from atlas.scores where neuron = 5").fetchone()[0]
        current = conn.execute("select count(*) from atlas.current_scores").fetchone()[0]
        assert stale > 0 and current == conn.execute("select count(*) from atlas.scores").fetchone()[0] - stale
