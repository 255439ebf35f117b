"""Asset checks: thin wrappers running `pipeline.infra.checks` against the warehouse file. Blocking
checks stop the run's downstream steps, so bad rows never reach the next stage."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation objects.

from contextlib import AbstractContextManager

import duckdb
from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetChecksDefinition, asset_check

from assets.config import sampling_of_run
from pipeline.infra import checks
from pipeline.infra.warehouse import open_warehouse

BLOCKING = {"activation_records", "unit_examples", "explanations", "simulations", "scores"}


def _result(outcome: checks.CheckOutcome) -> AssetCheckResult:
    return AssetCheckResult(
        passed=outcome.passed, description=outcome.description, metadata={"bad_rows": outcome.bad_rows}
    )


def _connect(context: AssetCheckExecutionContext) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
    return open_warehouse(context.resources.warehouse.database, read_only=True)


def build_asset_checks() -> list[AssetChecksDefinition]:
    @asset_check(asset="activation_records", blocking=True, required_resource_keys={"warehouse"})
    def activation_records_complete(context: AssetCheckExecutionContext) -> AssetCheckResult:
        """Finite statistics and the configured number of top, random (and, if captured, bottom) records per neuron."""
        # The counts activation_records was given in this run's config (the check runs right after it).
        sampling = sampling_of_run(context.run.run_config)
        with _connect(context) as conn:
            return _result(checks.activation_records_complete(conn, sampling.top_k, sampling.random_k))

    def simple(asset: str, fn_name: str, doc: str) -> AssetChecksDefinition:
        @asset_check(asset=asset, name=fn_name, blocking=asset in BLOCKING, required_resource_keys={"warehouse"})
        def check(context: AssetCheckExecutionContext) -> AssetCheckResult:
            with _connect(context) as conn:
                if not checks.table_exists(conn, asset):
                    return AssetCheckResult(passed=True, description="no rows written yet", metadata={"bad_rows": 0})
                return _result(getattr(checks, fn_name)(conn))

        check.__doc__ = doc
        return check

    return [
        activation_records_complete,
        simple(
            "unit_examples",
            "examples_complete",
            "A normalization max for every unit, and every split record found in activation_records.",
        ),
        simple("explanations", "one_explanation_per_key", "One explanation per model, layer, neuron, kind, sample."),
        simple("simulations", "simulations_in_range", "Simulated levels within 0..10, one per token."),
        simple("scores", "scores_in_range", "Correlations within [-1, 1]; NULL only with a reason."),
        simple("ablations", "ablations_sane", "KL non-negative; a NULL ablation score only with a reason."),
        simple(
            "classification_scores",
            "classification_in_range",
            "Accuracies, F1 and AUC within [0, 1]; NULL only with a reason; detection shows as many non-activating"
            " texts as activating ones.",
        ),
    ]
