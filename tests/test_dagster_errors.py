"""Bad input reaches the Dagster user as a failed step whose message names the problem, and a
failed write leaves the warehouse as it was."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import query, run_stages
from dagster import DagsterInstance, RunConfig, StaticPartitionsDefinition, asset, materialize

from assets.config import SamplingConfig
from assets.io import WarehouseIOManager
from assets.resources import CorpusResource, SubjectModelResource
from assets.stages import build_stage_assets
from pipeline.infra.warehouse import SCHEMA


def _failure_messages(result) -> str:  # noqa: ANN001
    return "\n".join(
        str(event.event_specific_data.error) for event in result.all_events if event.event_type_value == "STEP_FAILURE"
    )


def _run(tmp_path: Path, model: str, corpus: CorpusResource, layers: tuple[int, int] = (0, 0), n_layers: int = 2):
    return materialize(
        build_stage_assets(n_layers),
        resources={
            "subject": SubjectModelResource(model=model),
            "corpus": corpus,
            "warehouse": WarehouseIOManager(database=str(tmp_path / "wh.duckdb"), schema=SCHEMA),
        },
        run_config=RunConfig(ops={"activation_records": SamplingConfig(top_k=4, random_k=4)}),
        tags={
            "dagster/asset_partition_range_start": str(layers[0]),
            "dagster/asset_partition_range_end": str(layers[1]),
        },
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def test_unknown_model_path(tmp_path: Path, digit_corpus: Path) -> None:
    result = _run(tmp_path, str(tmp_path / "no_such_model"), CorpusResource(source=str(digit_corpus)))
    assert not result.success
    assert "does not exist" in _failure_messages(result)


def test_layer_out_of_range(tmp_path: Path, digit_model_dir: Path, digit_corpus: Path) -> None:
    corpus = CorpusResource(source=str(digit_corpus), seq_len=16, n_sequences=8)
    result = _run(tmp_path, str(digit_model_dir), corpus, layers=(3, 3), n_layers=4)
    assert not result.success
    assert "layer 3 is out of range: the model has 2 layers" in _failure_messages(result)


@pytest.mark.parametrize(
    ("seq_len", "text", "message"),
    [(1, "the one", "sequence length must be at least 2"), (16, "", "is empty"), (16, "the one", "has only 2 tokens")],
)
def test_bad_corpus(tmp_path: Path, digit_model_dir: Path, seq_len: int, text: str, message: str) -> None:
    source = tmp_path / "c.txt"
    source.write_text(text)
    result = _run(tmp_path, str(digit_model_dir), CorpusResource(source=str(source), seq_len=seq_len))
    assert not result.success
    assert message in _failure_messages(result)


def test_failed_rerun_keeps_the_previous_rows(tmp_path: Path, digit_model_dir: Path, digit_corpus: Path) -> None:
    """A rerun whose corpus is now broken fails without touching what the warehouse held."""
    database = tmp_path / "neuron_atlas.duckdb"
    good = CorpusResource(source=str(digit_corpus), seq_len=16, n_sequences=8)
    sampling = SamplingConfig(top_k=4, random_k=4)
    subject = SubjectModelResource(model=str(digit_model_dir))
    first = run_stages(database, 2, (0, 1), subject, good, sampling)
    assert first.success
    before = query(database)("select count(*), min(run_id) from atlas.corpus_tokens")
    bad = CorpusResource(source=str(digit_corpus), seq_len=1)
    failed = materialize(
        build_stage_assets(2),
        selection="corpus_tokens",
        resources={
            "subject": subject,
            "corpus": bad,
            "warehouse": WarehouseIOManager(database=str(database), schema=SCHEMA),
        },
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not failed.success
    assert query(database)("select count(*), min(run_id) from atlas.corpus_tokens") == before


def test_a_write_that_fails_after_the_delete_rolls_back(tmp_path: Path) -> None:
    """The IO manager deletes a partition's rows, then inserts: if the insert fails, the delete must
    be rolled back too (upstream dagster-duckdb runs them in autocommit and would lose the rows)."""
    database = tmp_path / "neuron_atlas.duckdb"
    frames = {"good": pl.DataFrame({"layer": [0, 0], "x": [1, 2]}), "bad": pl.DataFrame({"layer": [0], "x": ["oops"]})}
    choice = {"frame": "good"}

    @asset(partitions_def=StaticPartitionsDefinition(["0", "1"]), metadata={"partition_expr": "layer"})
    def probe() -> pl.DataFrame:
        return frames[choice["frame"]]

    def run() -> bool:
        return materialize(
            [probe],
            partition_key="0",
            resources={"io_manager": WarehouseIOManager(database=str(database), schema=SCHEMA)},
            instance=DagsterInstance.ephemeral(),
            raise_on_error=False,
        ).success

    assert run()
    choice["frame"] = "bad"
    assert not run()  # 'oops' cannot be inserted into an integer column
    assert query(database)("select layer, x from atlas.probe order by x") == [(0, 1), (0, 2)]
