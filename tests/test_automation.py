"""Automation with Dagster's own evaluator: a changed checkpoint requests exactly the materialized
partitions downstream of it; an unchanged one (observed again) requests nothing."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
from conftest import run_stages
from dagster import AssetKey, DagsterInstance, evaluate_automation_conditions
from safetensors.torch import load_file, save_file

from assets.config import SamplingConfig
from assets.definitions import build_definitions
from assets.resources import CorpusResource, SubjectModelResource

warnings.filterwarnings("ignore", category=DeprecationWarning)


def requested(result) -> set[tuple[str, str | None]]:
    return {
        (key.to_user_string(), partition)
        for key, partitions in ((r.key, r.true_subset) for r in result.results if r.true_subset.size)
        for partition in (partitions.expensively_compute_partition_keys() if partitions.is_partitioned else [None])
    }


def test_changed_checkpoint_or_corpus_reruns_only_affected_partitions(
    tmp_path: Path, digit_model_dir: Path, digit_corpus: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(digit_model_dir, model)
    digit_corpus_copy = tmp_path / "digits.jsonl"
    shutil.copy(digit_corpus, digit_corpus_copy)
    digit_corpus = digit_corpus_copy
    database = tmp_path / "neuron_atlas.duckdb"
    defs = build_definitions(model=str(model), corpus=str(digit_corpus), database=str(database))
    instance = DagsterInstance.ephemeral()
    observe = defs.resolve_job_def("observe_model")
    assert observe.execute_in_process(instance=instance).success
    stage_args = dict(
        database=database,
        n_layers=2,
        layers=(0, 0),  # layer 1 stays missing: automation must not fill it in
        subject=SubjectModelResource(model=str(model)),
        corpus=CorpusResource(source=str(digit_corpus), seq_len=16, n_sequences=40, seed=3),
        sampling=SamplingConfig(top_k=4, random_k=4, quantile_bins=2, per_quantile=1, batch_size=8),
        instance=instance,
    )
    assert run_stages(**stage_args).success
    first = evaluate_automation_conditions(defs=defs, instance=instance)
    assert requested(first) == set()  # everything is up to date
    assert observe.execute_in_process(instance=instance).success  # same checkpoint, observed again
    unchanged = evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert requested(unchanged) == set()

    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if k.endswith("c_fc.weight"))
    weights[name] = weights[name] * 1.01
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert observe.execute_in_process(instance=instance).success
    changed = evaluate_automation_conditions(defs=defs, instance=instance, cursor=unchanged.cursor)
    assert requested(changed) == {("subject_model", None), ("corpus_tokens", None)}
    # Layer partitions cannot share a run with unpartitioned parents: they follow on the next tick.
    assert run_stages(**stage_args, selection=["subject_model", "corpus_tokens"]).success
    after = evaluate_automation_conditions(defs=defs, instance=instance, cursor=changed.cursor)
    assert requested(after) == {("activation_records", "0"), ("unit_examples", "0")}
    assert run_stages(**stage_args, selection=["activation_records", "unit_examples"]).success
    settled = evaluate_automation_conditions(defs=defs, instance=instance, cursor=after.cursor)
    assert requested(settled) == set()  # nothing downstream was ever materialized: nothing to rerun

    # A changed corpus file reruns the corpus and what it feeds, not the subject model.
    with open(digit_corpus_copy, "a") as fh:
        fh.write('\n{"text": "the 7 of 8"}')
    assert observe.execute_in_process(instance=instance).success
    corpus_changed = evaluate_automation_conditions(defs=defs, instance=instance, cursor=settled.cursor)
    assert requested(corpus_changed) == {("corpus_tokens", None)}


@pytest.mark.parametrize("name", ["observe_model_hourly"])
def test_observation_schedule_and_automation_sensor_are_defined(name: str) -> None:
    defs = build_definitions()
    assert defs.resolve_schedule_def(name).job_name == "observe_model"
    assert defs.resolve_sensor_def("atlas_automation") is not None
    # Detection and fuzzing are part of the default graph: rerun like the other LLM stages, and
    # the viewer (which shows them) follows them.
    graph = defs.resolve_asset_graph()
    classification = AssetKey("classification_scores")
    assert graph.get(classification).automation_condition is not None
    assert classification in graph.get(AssetKey("neuron_viewer")).parent_keys
    assert {AssetKey("scores"), AssetKey("explanations"), AssetKey("activation_records")} <= graph.get(
        classification
    ).parent_keys
