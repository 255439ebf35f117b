"""The embedded Gemma 3 270M through every stage up to unit_examples, with real Dagster runs into
a real DuckDB file, checked against a plain forward pass that does not use the pipeline's hooks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import code_step, query, run_stages

from assets.config import SamplingConfig
from assets.resources import CorpusResource, SubjectModelResource
from pipeline.core.models import EMBEDDED, load_subject_model, model_layer_count

N_SEQ, SEQ_LEN, TOP_K, RANDOM_K, Q_BINS, PER_Q = 24, 32, 8, 8, 2, 2
LAYERS = (0, 1)


def _resources() -> dict:
    return {
        "subject": SubjectModelResource(model=EMBEDDED),
        "corpus": CorpusResource(seq_len=SEQ_LEN, n_sequences=N_SEQ, seed=0),
        "sampling": SamplingConfig(
            top_k=TOP_K, random_k=RANDOM_K, quantile_bins=Q_BINS, per_quantile=PER_Q, batch_size=8
        ),
    }


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    database = tmp_path_factory.mktemp("wh") / "neuron_atlas.duckdb"
    result = run_stages(database, model_layer_count(EMBEDDED), LAYERS, **_resources())
    assert result.success
    return database, result


def _plain_activations(layer: int, token_ids: np.ndarray) -> np.ndarray:
    """[S, T, d_mlp] neuron activations from an ordinary forward pass: the MLP's input is grabbed
    with a standard forward hook and act(gate(x)) * up(x) is computed by hand."""
    subject = load_subject_model(EMBEDDED)
    mlp = subject.model.model.layers[layer].mlp
    grabbed: list[torch.Tensor] = []
    handle = mlp.register_forward_hook(lambda _m, args, _out: grabbed.append(args[0]))
    try:
        bos = torch.full((token_ids.shape[0], 1), subject.tokenizer.bos_token_id)
        with torch.no_grad():
            subject.model(input_ids=torch.cat([bos, torch.as_tensor(token_ids)], dim=1))
            x = grabbed[0][:, 1:, :]
            acts = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    finally:
        handle.remove()
    return acts.numpy()


def test_row_counts_and_lineage(warehouse: tuple[Path, object]) -> None:
    database, result = warehouse
    q = query(database)
    run_id = result.run_id
    assert q("select count(*), count(distinct model_revision) from atlas.subject_model") == [(1, 1)]
    assert q("select count(*), min(len(token_ids)), max(len(tokens)) from atlas.corpus_tokens") == [
        (N_SEQ, SEQ_LEN, SEQ_LEN)
    ]
    d_mlp = q("select d_mlp from atlas.subject_model")[0][0]
    for table, units_per_neuron in (("activation_records", 1), ("unit_examples", 2)):  # Gemma: both directions
        rows = q(
            f"select layer, count(*), count(distinct neuron), count(distinct run_id), min(run_id) "
            f"from atlas.{table} group by layer order by layer"
        )
        assert rows == [(layer, units_per_neuron * d_mlp, d_mlp, 1, run_id) for layer in LAYERS]
    polarities = q("select polarity, count(*) from atlas.unit_examples group by all order by all")
    assert polarities == [("+", len(LAYERS) * d_mlp), ("-", len(LAYERS) * d_mlp)]
    sizes = q("select distinct len(top), len(random), len(quantile) from atlas.activation_records")
    assert sizes == [(TOP_K, RANDOM_K, Q_BINS * PER_Q)]
    nulls = q("select count(*) from atlas.activation_records where model_id is null or model_revision is null")
    assert nulls == [(0,)]


def test_both_layers_come_from_one_step(warehouse: tuple[Path, object]) -> None:
    _, result = warehouse
    events = [e for e in result.get_asset_materialization_events() if e.asset_key.path == ["activation_records"]]
    assert sorted(e.partition for e in events) == [str(layer) for layer in LAYERS]
    assert len({e.step_key for e in events}) == 1


@pytest.mark.parametrize("layer", LAYERS)
def test_top_records_are_the_true_top(warehouse: tuple[Path, object], layer: int) -> None:
    database, _ = warehouse
    q = query(database)
    token_ids = np.array([r[0] for r in q("select token_ids from atlas.corpus_tokens order by seq_id")])
    acts = _plain_activations(layer, token_ids)  # [S, T, N]
    seq_max = acts.max(axis=1)  # [S, N]
    neuron = int(seq_max.max(axis=0).argmax())  # the layer's most active neuron, plus two fixed ones
    for n in (neuron, 7, 1000):
        expected = sorted(range(len(token_ids)), key=lambda s: (-seq_max[s, n], s))[:TOP_K]
        stored = q(
            "select rank, seq_id, max_act, acts, min_act from atlas.records_long where layer = ? and neuron = ? "
            "and record_list = 'top' order by rank",
            [layer, n],
        )
        assert [r[1] for r in stored] == expected
        for _, seq_id, max_act, stored_acts, min_act in stored:
            step = code_step(max_act, min_act)  # 8-bit storage
            np.testing.assert_allclose(stored_acts, acts[seq_id, :, n], atol=1e-4 + step, rtol=1e-4)
            assert max_act == pytest.approx(float(seq_max[seq_id, n]), abs=1e-4)
        stats = q(
            "select max_activation, mean_activation, variance, n_tokens from atlas.activation_records "
            "where layer = ? and neuron = ?",
            [layer, n],
        )[0]
        column = acts[:, :, n].astype(np.float64)
        assert stats[0] == pytest.approx(column.max(), abs=1e-4)
        assert stats[1] == pytest.approx(column.mean(), abs=1e-5)
        assert stats[2] == pytest.approx(column.var(), rel=1e-4, abs=1e-6)
        assert stats[3] == column.size


def test_random_and_quantile_records_hold_true_activations(warehouse: tuple[Path, object]) -> None:
    database, _ = warehouse
    q = query(database)
    token_ids = np.array([r[0] for r in q("select token_ids from atlas.corpus_tokens order by seq_id")])
    acts = _plain_activations(0, token_ids)
    rows = q(
        "select neuron, record_list, seq_id, acts, max_act, min_act from atlas.records_long where layer = 0"
        " and neuron in (3, 500) and record_list in ('random', 'quantile')"
    )
    assert len(rows) == 2 * (RANDOM_K + Q_BINS * PER_Q)
    for neuron, _, seq_id, stored, max_act, min_act in rows:
        step = code_step(max_act, min_act)  # 8-bit storage
        np.testing.assert_allclose(stored, acts[seq_id, :, neuron], atol=1e-4 + step, rtol=1e-4)
    distinct = q(
        "select neuron, count(distinct seq_id) from atlas.records_long where layer = 0 and record_list = 'random' "
        "group by neuron having count(distinct seq_id) < ?",
        [RANDOM_K],
    )
    assert distinct == []  # sampled without replacement


def test_splits_are_disjoint_and_levels_in_range(warehouse: tuple[Path, object]) -> None:
    database, _ = warehouse
    q = query(database)
    overlaps = q("""
        select layer, neuron, polarity, record_kind, seq_id, count(distinct split) as n
        from atlas.examples_long group by all having n > 1""")
    assert overlaps == []
    per_split = q(
        "select distinct record_kind, split, count(*) over (partition by layer, neuron, polarity, record_kind, split) "
        "from atlas.examples_long order by all"
    )
    assert per_split == sorted(
        [
            (k, s, n // 4)
            for k, n in (("random", RANDOM_K), ("top", TOP_K))
            for s in ("calibration", "test", "train", "valid")
        ]
    )
    bad = q("""
        select count(*) from (
            select max_activation, if(polarity = '-', -1, 1) as sign, unnest(acts) as a, unnest(levels) as lv
            from atlas.examples_long)
        where lv < 0 or lv > 10
           or lv != least(10, floor(10 * greatest(a::double * sign, 0) / max_activation::double))""")
    assert bad == [(0,)]
    top_is_max = q("""
        select count(*) from atlas.unit_examples e join atlas.activation_records a using (layer, neuron)
        where e.max_activation != if(e.polarity = '-', -a.min_activation, a.max_activation)""")
    assert top_is_max == [(0,)]


def test_rewriting_a_partition_replaces_only_its_rows(tmp_path: Path) -> None:
    database = tmp_path / "neuron_atlas.duckdb"
    n_layers = model_layer_count(EMBEDDED)
    first = run_stages(database, n_layers, LAYERS, **_resources())
    second = run_stages(database, n_layers, (1, 1), **_resources(), selection="activation_records*")
    assert first.success and second.success
    rows = query(database)("select layer, run_id, count(*) from atlas.activation_records group by all order by all")
    d_mlp = rows[0][2]
    assert rows == [(0, first.run_id, d_mlp), (1, second.run_id, d_mlp)]
    tk = query(database)("select layer, run_id, count(*) from atlas.unit_examples group by all order by all")
    assert tk == [(0, first.run_id, 2 * d_mlp), (1, second.run_id, 2 * d_mlp)]
