"""Explanations, simulations and scores: per layer, thin wrappers over `pipeline.interpret`."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation objects.

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    BackfillPolicy,
    MetadataValue,
    StaticPartitionsDefinition,
    asset,
)

from assets.automation import RERUN
from assets.llm_metadata import usage_metadata
from assets.resources import ExplainerResource, ExplainResource, SimulatorResource
from assets.stages import LAYER_METADATA, WAREHOUSE, _layers, _lineage, _preview
from pipeline.failures import check_failure_share, explanation_outcomes, simulation_outcomes
from pipeline.interpret import (
    BASELINE,
    LLM,
    explain_layer,
    neuron_examples,
    score_layer,
    select_neurons,
    simulate_layer,
)
from pipeline.models import ModelIdentity

SCORE_COLUMNS = ("corr_all", "corr_top", "corr_random", "r2_all", "absdev_all")


def _identity(frame: pl.DataFrame) -> ModelIdentity:
    return ModelIdentity(frame["model_id"][0], frame["model_revision"][0])


def _strip(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.drop("model_id", "model_revision", "run_id", "code_version", strict=False)


def _histogram(values: list[float], bins: int = 10) -> str:
    """A text histogram over [-1, 1] for the materialization page."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v + 1) / 2 * bins)))] += 1
    top = max(counts) or 1
    lines = [
        f"{-1 + 2 * i / bins:+.1f}..{-1 + 2 * (i + 1) / bins:+.1f} | {'#' * round(20 * c / top)} {c}"
        for i, c in enumerate(counts)
    ]
    return "```\n" + "\n".join(lines) + "\n```"


def build_interpret_assets(layers_def: StaticPartitionsDefinition) -> list[AssetsDefinition]:
    common = dict(
        io_manager_key=WAREHOUSE,
        group_name="atlas",
        partitions_def=layers_def,
        backfill_policy=BackfillPolicy.single_run(),
        metadata=LAYER_METADATA,
    )

    @asset(code_version="1", automation_condition=RERUN, **common)
    def explanations(
        context: AssetExecutionContext,
        top_k_examples: pl.DataFrame,
        corpus_tokens: pl.DataFrame,
        explainer: ExplainerResource,
        explain: ExplainResource,
    ) -> pl.DataFrame:
        """Per neuron: the LLM's explanation(s) of its train top records, and the token-lookup baseline's."""
        identity = _identity(top_k_examples)
        examples = neuron_examples(_strip(top_k_examples), corpus_tokens)
        selected = []
        for layer in _layers(context):
            n = top_k_examples.filter(pl.col("layer") == layer).height
            selected += [examples[(layer, i)] for i in select_neurons(n, explain.n_neurons, explain.neuron_ids)]
        backend = explainer.client()
        context.log.info(f"explaining {len(selected)} neurons with {backend.backend}:{backend.model} ({backend.api})")
        before = backend.usage.snapshot()
        frame = explain_layer(selected, backend, explain.params(), progress=context.log.info)
        ok = frame.filter(pl.col("explanation").is_not_null())
        spent = usage_metadata(backend.usage, before, "explainer")
        context.log.info(f"explainer usage: {spent}")
        check_failure_share(explanation_outcomes(frame, LLM), explainer.max_failure_share, "explainer requests")
        context.add_output_metadata(
            spent
            | {
                "explanations": frame.height,
                "failed": frame.height - ok.height,
                "tokens_spent": int(
                    frame["prompt_tokens"].fill_null(0).sum() + frame["completion_tokens"].fill_null(0).sum()
                ),
                "preview": _preview(frame, ["layer", "neuron", "kind", "explanation", "failure_reason"], 16),
                "failure_reasons": _failure_reasons(frame),
            }
        )
        return _lineage(frame, identity, context)

    @asset(code_version="1", automation_condition=RERUN, **common)
    def simulations(
        context: AssetExecutionContext,
        explanations: pl.DataFrame,
        top_k_examples: pl.DataFrame,
        corpus_tokens: pl.DataFrame,
        simulator: SimulatorResource,
    ) -> pl.DataFrame:
        """Per explanation and held-out sequence (valid top + valid random): the simulated level per token."""
        identity = _identity(top_k_examples)
        examples = neuron_examples(_strip(top_k_examples), corpus_tokens)
        client = simulator.client() if (explanations["kind"] == LLM).any() else None
        before = client.usage.snapshot() if client else {}
        frame = simulate_layer(_strip(explanations), examples, client, progress=context.log.info)
        spent = usage_metadata(client.usage, before, "simulator") if client else {}
        context.log.info(f"simulator usage: {spent}")
        held_out = {key: len(ex.held_out) for key, ex in examples.items()}
        outcomes = simulation_outcomes(frame, _strip(explanations), LLM, held_out)
        check_failure_share(outcomes, simulator.max_failure_share, "simulated sequences")
        context.add_output_metadata(
            spent
            | {
                "rows": frame.height,
                "failed_explanations": frame.filter(pl.col("simulated").is_null()).height,
                "simulator": f"{client.backend}:{client.model} {client.prompt_version}" if client else "baseline",
                "failure_reasons": _failure_reasons(frame),
            }
        )
        return _lineage(frame, identity, context)

    @asset(code_version="1", automation_condition=RERUN, **common)
    def scores(context: AssetExecutionContext, simulations: pl.DataFrame, top_k_examples: pl.DataFrame) -> pl.DataFrame:
        """Per explanation: correlation (top+random, top, random), r² and absolute deviation explained."""
        identity = _identity(top_k_examples)
        maxes = {(r["layer"], r["neuron"]): r["max_activation"] for r in top_k_examples.iter_rows(named=True)}
        frame = score_layer(_strip(simulations), maxes)
        context.add_output_metadata(_score_metadata(frame))
        return _lineage(frame, identity, context)

    return [explanations, simulations, scores]


def _failure_reasons(frame: pl.DataFrame) -> MetadataValue:
    """Why rows failed, with counts: the run page says what went wrong without a query."""
    failed = frame.filter(pl.col("failure_reason").is_not_null())
    if failed.is_empty():
        return MetadataValue.md("no failures")
    counts = failed.group_by("failure_reason").agg(pl.len().alias("rows"), pl.col("neuron").unique().sort())
    counts = counts.sort("rows", descending=True).with_columns(
        pl.col("failure_reason").str.replace_all(r"[|\n]", " "),
        pl.col("neuron").cast(pl.List(pl.String)).list.join(", "),
    )
    return _preview(counts.rename({"neuron": "neurons"}), ["failure_reason", "rows", "neurons"], 20)


def _score_metadata(frame: pl.DataFrame) -> dict:
    meta: dict = {"explanations_scored": frame.filter(pl.col("corr_all").is_not_null()).height}
    for kind in (LLM, BASELINE):
        values = frame.filter((pl.col("kind") == kind) & pl.col("corr_all").is_not_null())["corr_all"]
        meta[f"mean_corr_{kind}"] = float(values.mean()) if len(values) else None
        meta[f"histogram_{kind}"] = MetadataValue.md(_histogram(values.to_list()))
    llm = frame.filter((pl.col("kind") == LLM) & pl.col("corr_all").is_not_null()).sort("corr_all", descending=True)
    columns = ["layer", "neuron", "sample_index", "corr_all", "r2_all"]
    meta["best"] = _preview(llm, columns, 5)
    meta["worst"] = _preview(llm.reverse(), columns, 5)
    return {k: v for k, v in meta.items() if v is not None}
