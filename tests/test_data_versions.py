"""Settings that change results change the data version, so Dagster marks downstream stale; a rerun
with the same settings, which writes the same rows, keeps it. Read from the materializations'
version tags, which are what the UI's staleness compares: a downstream partition is stale when the
upstream version it recorded on reading differs from the one it would record now, i.e. from what
its next run records.

Dagster's default version (a hash of the code version and the inputs' versions) fails this test:
it stays the same when `activation_records.top_k` changes."""

from __future__ import annotations

from pathlib import Path

from conftest import loopback_llm, run_stages
from dagster import AssetKey, DagsterInstance
from loopback_llm import LoopbackServer, ServerState
from tiny_models import DIGIT_NEURON

from assets.config import ExplainConfig, SamplingConfig
from assets.resources import CorpusResource, SubjectModelResource

VERSION = "dagster/data_version"


def tags(instance: DagsterInstance, asset: str) -> dict[str, str]:
    event = instance.get_latest_materialization_event(AssetKey(asset))
    assert event is not None and event.asset_materialization is not None
    return dict(event.asset_materialization.tags or {})


def test_a_changed_setting_marks_downstream_stale(tmp_path: Path, digit_model_dir: Path, digit_corpus: Path) -> None:
    instance = DagsterInstance.ephemeral()
    sampling = dict(top_k=4, random_k=4, quantile_bins=2, per_quantile=1, batch_size=8)

    def run(selection: list[str], **changed: int) -> None:
        result = run_stages(
            database=tmp_path / "neuron_atlas.duckdb",
            n_layers=2,
            layers=(0, 0),
            subject=SubjectModelResource(model=str(digit_model_dir)),
            corpus=CorpusResource(source=str(digit_corpus), seq_len=16, n_sequences=40, seed=3),
            sampling=SamplingConfig(**sampling | changed),
            selection=selection,
            instance=instance,
        )
        assert result.success

    def version(asset: str) -> str:
        return tags(instance, asset)[VERSION]

    def read_by_unit_examples() -> str:
        return tags(instance, "unit_examples")["dagster/input_data_version/activation_records"]

    run(["subject_model", "corpus_tokens", "activation_records", "unit_examples"])
    first, read = version("activation_records"), read_by_unit_examples()

    # A rerun with the same settings writes the same rows: the same version, so unit_examples was
    # not stale (rerun, it records reading what it read before). (Another batch size is not enough:
    # the batched matmuls round differently, so the float32 extremes move in their last bits.)
    run(["activation_records"])
    assert version("activation_records") == first
    run(["unit_examples"])
    assert read_by_unit_examples() == read

    # More top records per neuron are other rows: a new version, so unit_examples was stale.
    run(["activation_records"], top_k=5)
    assert version("activation_records") != first
    run(["unit_examples"], top_k=5)
    assert read_by_unit_examples() != read

    # Back to the first settings: the first rows, so the first version again.
    run(["activation_records"])
    assert version("activation_records") == first


def test_llm_stages_rerun_from_the_cache_keep_their_versions(
    tmp_path: Path, digit_model_dir: Path, digit_corpus: Path
) -> None:
    """The LLM steps' rows say whether they came from the response cache and for how many tokens:
    that is left out of the version, so a rerun answered from the cache marks nothing stale, while
    another explainer model (the same words from the loopback server) is a new version."""
    instance = DagsterInstance.ephemeral()
    state = ServerState(
        replies=[("the main thing this neuron does is find", " digits and numbers.\n")],
        slot_probs=[{"0": 0.5, "10": 0.25, "5": 0.25}],
    )
    llm_assets = ["explanations", "simulations", "scores"]

    def run(selection: list[str], **explainer: str) -> dict[str, str]:
        result = run_stages(
            database=tmp_path / "neuron_atlas.duckdb",
            n_layers=2,
            layers=(0, 0),
            subject=SubjectModelResource(model=str(digit_model_dir)),
            corpus=CorpusResource(source=str(digit_corpus), seq_len=16, n_sequences=40, seed=3),
            sampling=SamplingConfig(top_k=4, random_k=4, quantile_bins=2, per_quantile=1, batch_size=8),
            selection=selection,
            instance=instance,
            explain=ExplainConfig(neuron_ids=[DIGIT_NEURON, 5], samples=1, temperature=0),
            **loopback_llm(server, cache_path=str(tmp_path / "cache.sqlite"), explainer=explainer),
        )
        assert result.success
        return {asset: tags(instance, asset)[VERSION] for asset in llm_assets}

    with LoopbackServer(state) as server:
        first = run(["subject_model", "corpus_tokens", "activation_records", "unit_examples", *llm_assets])
        requests = state.requests
        assert run(llm_assets) == first
        assert state.requests == requests, "the rerun was answered from the response cache"
        other = run(llm_assets, model="loop-model-2")
    assert other["explanations"] != first["explanations"]
