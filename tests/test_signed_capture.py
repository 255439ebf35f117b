"""Known answer for both directions: a tiny Llama (gated MLP) whose neuron SIGNED_NEURON is positive
on digits and negative on NEG_WORDS in both layers (tests/tiny_models.py). The capture must keep
exactly the right top sequences by max and bottom sequences by min, ties going to the lower sequence
id, checked against activations computed from the weights' formula per token, never by the
accumulator. A GELU model gets no negative direction unless asked for it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import code_step, loopback_llm, query, run_stages
from loopback_llm import LoopbackServer, ServerState
from rule_simulators import RuleSimulator
from tiny_models import (
    DIGIT_NEURON,
    DIGITS,
    NEG_WORDS,
    SIGNED_NEURON,
    build_digit_model,
    build_signed_model,
    build_signed_tokenizer,
    build_tokenizer,
    digit_activation,
    signed_activation,
    write_digit_corpus,
    write_signed_corpus,
    write_signed_model,
)

from assets.config import ClassifyConfig, ExplainConfig, SamplingConfig, TopTokensConfig
from assets.resources import CorpusResource, SubjectModelResource
from pipeline.core.corpus import CorpusSpec, tokenize_corpus
from pipeline.core.errors import AtlasInputError
from pipeline.core.models import ModelIdentity, SubjectModel
from pipeline.core.records import LayerRecords, RecordSet, SamplingSpec, collect_activation_records, records_frame
from pipeline.infra import checks

SEQ_LEN, N_SEQ, K = 16, 64, 8
# The pipeline run: a larger corpus and top_k/random_k, so every digit and NEG_WORDS word occurs in
# the train and calibration records and each direction's token-space explanation names them all.
RUN_N_SEQ, RUN_K = 256, 16
RUN_QUANTILE = 8  # the run's samples per quantile bin (2 bins): enough held-out texts to classify each direction
SPEC = SamplingSpec(top_k=K, random_k=K, quantile_bins=2, per_quantile=3, batch_size=5, seed=0)


def _corpus(tokenizer: object, path: Path) -> tuple[np.ndarray, list[list[str]]]:
    frame = tokenize_corpus(tokenizer, CorpusSpec(source=str(path), seq_len=SEQ_LEN, n_sequences=N_SEQ, seed=3))
    return np.array(frame["token_ids"].to_list(), dtype=np.int64), frame["tokens"].to_list()


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[SubjectModel, np.ndarray, np.ndarray]:
    """The gated model, the corpus token ids, and the true activations [S, T] from the formula."""
    tokenizer = build_signed_tokenizer()
    model = build_signed_model(tokenizer)
    ids, tokens = _corpus(tokenizer, write_signed_corpus(tmp_path_factory.mktemp("corpus") / "signed.jsonl"))
    truth = np.array([[signed_activation(t) for t in seq] for seq in tokens])
    subject = SubjectModel(model=model, tokenizer=tokenizer, identity=ModelIdentity("signed", "0"), path=Path("."))
    return subject, ids, truth


@pytest.fixture(scope="module")
def captured(signed: tuple) -> dict[int, LayerRecords]:
    subject, ids, _ = signed
    return collect_activation_records(subject, ids, [0, 1], SPEC)


def _ranked(truth: np.ndarray, key: np.ndarray, k: int) -> list[int]:
    """Sequence ids by key ascending, ties to the lower id: brute force over the whole corpus."""
    return sorted(range(truth.shape[0]), key=lambda s: (key[s], s))[:k]


def _matches(records: RecordSet, neuron: int, truth: np.ndarray, expected_ids: list[int]) -> bool:
    """One neuron's records are exactly the expected sequences, in order, with their true activations."""
    return records.ids[neuron].tolist() == expected_ids and np.allclose(
        records.acts[neuron], truth[expected_ids], atol=1e-4
    )


@pytest.mark.parametrize("layer", [0, 1])
def test_top_and_bottom_records_are_exact(captured: dict, signed: tuple, layer: int) -> None:
    _, _, truth = signed
    rec = captured[layer]
    seq_max, seq_min = truth.max(axis=1), truth.min(axis=1)
    expected_top = _ranked(truth, -seq_max, K)
    expected_bottom = _ranked(truth, seq_min, K)
    assert rec.negative_captured
    assert _matches(rec.top, SIGNED_NEURON, truth, expected_top)
    assert _matches(rec.bottom, SIGNED_NEURON, truth, expected_bottom)
    np.testing.assert_allclose(rec.top.max[SIGNED_NEURON], seq_max[expected_top], atol=1e-4)
    np.testing.assert_allclose(rec.top.min[SIGNED_NEURON], seq_min[expected_top], atol=1e-4)
    np.testing.assert_allclose(rec.bottom.min[SIGNED_NEURON], seq_min[expected_bottom], atol=1e-4)
    np.testing.assert_allclose(rec.bottom.max[SIGNED_NEURON], seq_max[expected_bottom], atol=1e-4)
    # The answer is discriminating: the directions differ, and equal maxima/minima inside the kept
    # lists are decided by sequence id (a check that ignored ties would have to pass them by luck).
    assert expected_top != expected_bottom
    assert len(set(seq_max[expected_top])) < K and len(set(seq_min[expected_bottom])) < K
    # Negative control: the same comparison fails for a neuron the weights did not plant.
    assert not _matches(rec.top, SIGNED_NEURON - 1, truth, expected_top)
    assert not _matches(rec.bottom, SIGNED_NEURON - 1, truth, expected_bottom)


def test_statistics_count_both_signs(captured: dict, signed: tuple) -> None:
    _, _, truth = signed
    for rec in captured.values():
        n = SIGNED_NEURON
        assert rec.min[n] == pytest.approx(truth.min(), abs=1e-4) and rec.max[n] == pytest.approx(truth.max(), abs=1e-4)
        assert rec.positive_frac[n] == (truth > 0).mean()  # digits
        assert rec.negative_frac[n] == (truth < 0).mean()  # NEG_WORDS
        assert rec.nonzero_frac[n] == (truth != 0).mean()
        assert 0 < rec.negative_frac[n] < 1 and 0 < rec.positive_frac[n] < 1
        assert rec.mean[n] == pytest.approx(truth.mean(), abs=1e-5)
        assert rec.variance[n] == pytest.approx(truth.var(), rel=1e-5)


def test_random_and_quantile_samples_hold_true_activations(captured: dict, signed: tuple) -> None:
    _, _, truth = signed
    rec = captured[0]
    n = SIGNED_NEURON
    for records in (rec.random, rec.quantile, rec.quantile_neg):
        ids = records.ids[n].tolist()
        assert len(ids) == len(set(ids)) > 0
        np.testing.assert_allclose(records.acts[n], truth[ids], atol=1e-4)
        np.testing.assert_allclose(records.max[n], truth[ids].max(axis=1), atol=1e-4)
        np.testing.assert_allclose(records.min[n], truth[ids].min(axis=1), atol=1e-4)
    # Negative quantile bins go from the least to the most negative minimum.
    bins, mins = rec.quantile_neg.bin[n], rec.quantile_neg.min[n]
    assert sorted(set(bins.tolist())) == [0, 1]
    assert mins[bins == 0].min() >= mins[bins == 1].max()
    assert set(rec.quantile_neg.ids[n].tolist()) | set(rec.quantile.ids[n].tolist()) <= set(range(N_SEQ))


def test_off_switch_drops_only_the_negative_direction(captured: dict, signed: tuple) -> None:
    subject, ids, _ = signed
    off = collect_activation_records(subject, ids, [0], replace(SPEC, negative="off"))[0]
    on = captured[0]
    assert not off.negative_captured
    assert off.bottom.ids.shape == (16, 0) and off.quantile_neg.ids.shape == (16, 0)
    np.testing.assert_array_equal(off.top.ids, on.top.ids)
    np.testing.assert_array_equal(off.top.acts, on.top.acts)
    # Off, the random sample need not leave out bottom sequences; on, it leaves out both.
    n = SIGNED_NEURON
    assert not set(off.random.ids[n].tolist()) & set(off.top.ids[n].tolist())
    assert not set(on.random.ids[n].tolist()) & (set(on.top.ids[n].tolist()) | set(on.bottom.ids[n].tolist()))
    np.testing.assert_array_equal(off.min, on.min)  # the statistics are kept either way
    np.testing.assert_array_equal(off.negative_frac, on.negative_frac)
    frame = records_frame(off)
    assert frame["negative_captured"].to_list() == [False] * 16
    assert frame["bottom"].list.len().to_list() == [0] * 16 and frame["quantile_neg"].list.len().sum() == 0


def test_gelu_model_defaults_to_positive_only_and_can_be_switched_on(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    model = build_digit_model(tokenizer)
    subject = SubjectModel(model=model, tokenizer=tokenizer, identity=ModelIdentity("digits", "0"), path=Path("."))
    ids, tokens = _corpus(tokenizer, write_digit_corpus(tmp_path / "digits.jsonl"))
    truth = np.array([[digit_activation(t) for t in seq] for seq in tokens])
    auto = collect_activation_records(subject, ids, [0], SPEC)[0]
    assert not auto.negative_captured and auto.bottom.ids.shape[1] == 0
    assert _matches(auto.top, DIGIT_NEURON, truth, _ranked(truth, -truth.max(axis=1), K))
    on = collect_activation_records(subject, ids, [0], replace(SPEC, negative="on"))[0]
    assert on.negative_captured
    np.testing.assert_array_equal(on.top.ids, auto.top.ids)
    # GELU's negative side is tiny: gelu(-5) ~ -3e-7 on every non-digit token, so which sequences are
    # the most negative is float noise. The bottom records still hold true activations, and are at
    # least as negative as any other sequence.
    bottom = on.bottom.ids[DIGIT_NEURON]
    assert len(set(bottom.tolist())) == K
    np.testing.assert_allclose(on.bottom.acts[DIGIT_NEURON], truth[bottom], atol=1e-4)
    others = np.setdiff1d(np.arange(N_SEQ), bottom)
    assert on.bottom.min[DIGIT_NEURON].max() <= truth[others].min(axis=1).min() + 1e-6
    assert on.min[DIGIT_NEURON] < 0 and abs(on.min[DIGIT_NEURON]) < 1e-5 * on.max[DIGIT_NEURON]


def test_unknown_negative_setting_is_refused(signed: tuple) -> None:
    subject, ids, _ = signed
    with pytest.raises(AtlasInputError, match="negative must be one of auto, on, off, got 'both'"):
        collect_activation_records(subject, ids, [0], SamplingSpec(negative="both"))


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """Capture of both layers, and the signed neuron explained and scored in layer 1 (its
    token-space explanation simulated, and classified, by rules that follow the tokens it quotes)."""
    root = tmp_path_factory.mktemp("signed_run")
    database = root / "neuron_atlas.duckdb"
    with LoopbackServer(ServerState(replies=[("neuron", " a pattern the explainer double always writes.\n")])) as srv:
        result = run_stages(
            database,
            n_layers=2,
            layers=(0, 1),
            subject=SubjectModelResource(model=str(write_signed_model(root / "model"))),
            corpus=CorpusResource(
                source=str(write_signed_corpus(root / "signed.jsonl", n_docs=240)),
                seq_len=SEQ_LEN,
                n_sequences=RUN_N_SEQ,
                seed=3,
            ),
            # min_token_count 1: on short sequences a digit may occur once in the train records.
            sampling=SamplingConfig(
                top_k=RUN_K, random_k=RUN_K, quantile_bins=2, per_quantile=RUN_QUANTILE, batch_size=5
            ),
            top_tokens=TopTokensConfig(min_token_count=1),
            explainer=loopback_llm(srv, cache_path=str(root / "cache.sqlite"))["explainer"],
            simulator=RuleSimulator(rule="quoted"),
            explain=ExplainConfig(neuron_ids=[SIGNED_NEURON], samples=1),
            selection=["subject_model", "corpus_tokens", "activation_records", "unit_examples"]
            + ["explanations", "simulations", "scores", "ablations", "classification_scores"],
            classify=ClassifyConfig(),
        )
    assert result.success
    return database, result


def test_each_direction_is_a_unit_with_exact_records_and_top_tokens(signed_run: tuple) -> None:
    """The '-' unit reads the bottom records as its top records, levels from relu(-a)/|min|; its top
    tokens are NEG_WORDS by mean -a, the '+' unit's are digits: both exact from the formula."""
    database, _ = signed_run
    q = query(database)
    for polarity, sign, words in (("+", 1.0, DIGITS), ("-", -1.0, NEG_WORDS)):
        ((max_activation, top_tokens),) = q(
            "select max_activation, top_tokens from atlas.unit_examples where layer = 1 and neuron = ?"
            " and polarity = ?",
            [SIGNED_NEURON, polarity],
        )
        column = "top" if polarity == "+" else "bottom"
        captured = q(
            f"select seq_id, max_act, min_act from atlas.records_long where layer = 1 and neuron = ?"
            f" and record_list = '{column}' order by rank",
            [SIGNED_NEURON],
        )
        step = {seq: code_step(hi, lo) for seq, hi, lo in captured}  # 8-bit storage
        shown = q(
            "select seq_id, tokens, acts, levels from atlas.examples_long where layer = 1 and neuron = ?"
            " and polarity = ? and record_kind = 'top' order by rank",
            [SIGNED_NEURON, polarity],
        )
        assert [r[0] for r in shown] == [r[0] for r in captured]
        strongest = max(sign * signed_activation(t) for _, tokens, _, _ in shown for t in tokens)
        assert max_activation == pytest.approx(strongest, abs=1e-4) and strongest > 1
        for seq_id, tokens, acts, levels in shown:
            assert any(t in words for t in tokens)
            truth = [signed_activation(t) for t in tokens]
            assert acts == pytest.approx(truth, abs=1e-4 + step[seq_id])  # raw, signed
            expected = [min(10, int(10 * max(sign * signed_activation(t), 0) / strongest + 1e-6)) for t in tokens]
            assert [abs(a - b) <= (1 if 0 < a < 10 else 0) for a, b in zip(levels, expected, strict=True)]
        assert top_tokens, polarity
        names = [t["token"] for t in top_tokens]
        assert set(names) <= set(words), (polarity, names)
        ((widest,),) = q(  # the means are over top and random records, each within its own step
            "select max(max_act - min_act) / 510 from atlas.records_long where layer = 1 and neuron = ?",
            [SIGNED_NEURON],
        )
        for t in top_tokens:
            assert t["mean_activation"] == pytest.approx(sign * signed_activation(t["token"]), abs=1e-4 + widest)
        assert names == sorted(names, key=lambda w: -sign * signed_activation(w))


def test_the_token_space_baseline_scores_each_direction(signed_run: tuple) -> None:
    database, _ = signed_run
    rows = query(database)(
        "select polarity, control_polarity, corr_all, control_corr_all from atlas.scores"
        " where layer = 1 and neuron = ? and split = 'test' and kind = 'token_space' order by polarity",
        [SIGNED_NEURON],
    )
    print("token-space test scores:", rows)
    assert [r[:2] for r in rows] == [("+", "-"), ("-", "+")]  # each direction is the other's control
    assert all(score >= 0.95 for _, _, score, _ in rows), rows
    # The negative control: the other direction's tokens explain nothing of this one.
    assert all(control < 0.2 for _, _, _, control in rows), rows


def test_each_direction_is_ablated_on_its_own(signed_run: tuple) -> None:
    """Each unit replaces its own side of the neuron by its calibrated simulation (the other side
    keeps its true activations): both directions get an ablation row, with a score or its reason."""
    database, _ = signed_run
    rows = query(database)(
        "select polarity, kind, ablation_score, ablation_score_reason, failure_reason, mean_activation"
        " from atlas.ablations where layer = 1 and neuron = ? order by polarity",
        [SIGNED_NEURON],
    )
    print("ablations:", rows)
    assert [r[0] for r in rows] == ["+", "-"]
    for polarity, kind, score, reason, failure, mean in rows:
        assert failure is None and kind == "token_space", rows
        assert score is not None or reason, rows
        assert (mean > 0) if polarity == "+" else (mean < 0)  # the direction's mean, with the neuron's sign


def test_each_direction_is_classified_on_its_own_quantile_samples(signed_run: tuple) -> None:
    """The '-' unit's activating texts are its `quantile_neg` samples (bins by -min) and hold a
    NEG_WORDS word; the '+' unit's are `quantile` samples holding a digit; neither shows a sequence
    its explainer read. A rule following each unit's own (token-space) explanation scores ~1 on
    both scorers, judged in the unit's direction."""
    database, _ = signed_run
    q = query(database)
    rows = q(
        "select polarity, scorer, balanced_accuracy, n_positive, n_negative, seq_ids, labels, control_polarity"
        " from atlas.classification_scores where layer = 1 and neuron = ? order by polarity, scorer",
        [SIGNED_NEURON],
    )
    print("classification:", [r[:5] for r in rows], q("select failure_reason from atlas.classification_scores"))
    assert [(r[0], r[1]) for r in rows] == [(p, s) for p in "+-" for s in ("detection", "fuzzing")]
    tokens = dict(q("select seq_id, tokens from atlas.corpus_tokens"))
    for polarity, scorer, score, pos, neg, seq_ids, labels, control in rows:
        kind, words = ("quantile", DIGITS) if polarity == "+" else ("quantile_neg", NEG_WORDS)
        samples = {
            r[0]
            for r in q(
                "select seq_id from atlas.records_long where layer = 1 and neuron = ? and record_list = ?",
                [SIGNED_NEURON, kind],
            )
        }
        seen = {
            r[0]
            for r in q(
                "select seq_id from atlas.examples_long where layer = 1 and neuron = ? and polarity = ?"
                " and (record_kind = 'top' or split in ('train', 'calibration'))",
                [SIGNED_NEURON, polarity],
            )
        }
        assert control == ("-" if polarity == "+" else "+")
        assert pos >= 2 and (scorer == "fuzzing" or pos == neg), (polarity, scorer, pos, neg)
        assert not set(seq_ids) & seen
        for seq, label in zip(seq_ids, labels, strict=True):
            if label == 1 or scorer == "fuzzing":
                assert seq in samples and any(t in words for t in tokens[seq]), (polarity, seq)
            else:  # a quiet text: nothing of this direction in it
                assert not any(t in words for t in tokens[seq]), (polarity, seq)
        assert score >= 0.9, (polarity, scorer, score)


def test_warehouse_holds_both_directions_and_the_choice(signed_run: tuple) -> None:
    database, result = signed_run
    q = query(database)
    assert q("select distinct negative_captured from atlas.activation_records") == [(True,)]
    kinds = q("select record_list, count(*) from atlas.records_long where layer = 0 group by all order by all")
    assert kinds == [
        ("bottom", 16 * RUN_K),
        ("quantile", 16 * 2 * RUN_QUANTILE),
        ("quantile_neg", 16 * 2 * RUN_QUANTILE),
        ("random", 16 * RUN_K),
        ("top", 16 * RUN_K),
    ]
    rows = q(
        "select rank, seq_id, min_act, tokens, acts, max_act from atlas.records_long where layer = 1 and neuron = ?"
        " and record_list = 'bottom' order by rank",
        [SIGNED_NEURON],
    )
    assert [r[0] for r in rows] == list(range(RUN_K))
    for _rank, _seq, min_act, tokens, acts, max_act in rows:
        assert any(t in NEG_WORDS for t in tokens)
        assert min_act == pytest.approx(min(signed_activation(t) for t in tokens), abs=1e-4)
        truth = [signed_activation(t) for t in tokens]
        assert acts == pytest.approx(truth, abs=1e-4 + code_step(max_act, min_act))  # 8-bit storage
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "activation_records_complete"]
    assert evaluation.passed
    assert result.asset_materializations_for_node("activation_records")[0].metadata["negative_captured"].value is True


@pytest.mark.parametrize(
    "corruption",
    [
        "update atlas.activation_records set bottom = [] where layer = 0 and neuron = 3",
        "update atlas.activation_records set quantile_neg = [] where layer = 0 and neuron = 3",
        "update atlas.activation_records set negative_captured = false where layer = 0 and neuron = 3",
        "update atlas.activation_records set min_activation = max_activation + 1 where layer = 0 and neuron = 3",
        "update atlas.activation_records set min_activation = 'nan' where layer = 0 and neuron = 3",
    ],
)
def test_records_check_fails_on_a_missing_direction(signed_run: tuple, tmp_path: Path, corruption: str) -> None:
    database = tmp_path / "corrupt.duckdb"
    database.write_bytes(signed_run[0].read_bytes())
    with duckdb.connect(str(database)) as conn:
        assert checks.activation_records_complete(conn, RUN_K, RUN_K).passed
        conn.execute(corruption)
        outcome = checks.activation_records_complete(conn, RUN_K, RUN_K)
    assert not outcome.passed and outcome.bad_rows == 1
