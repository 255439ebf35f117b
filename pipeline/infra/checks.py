"""Data checks on the warehouse tables, as SQL: each returns whether it passed, a sentence saying
why, and the offending rows' count. Dagster runs them as asset checks (blocking where bad rows
would poison the next stage); they also run on their own against any warehouse file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core.records import RECORD_KINDS
from pipeline.core.units import RECORD_LISTS
from pipeline.infra.warehouse import SCHEMA


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    bad_rows: int


def _count(conn: Any, sql: str, params: list | None = None) -> int:
    return int(conn.execute(sql.replace("{s}", SCHEMA), params or []).fetchone()[0])


def table_exists(conn: Any, table: str) -> bool:
    """An empty output writes no table: there is nothing to check then."""
    sql = "select count(*) from information_schema.tables where table_schema = ? and table_name = ?"
    return _count(conn, sql, [SCHEMA, table]) > 0


def _outcome(bad: int, what: str, ok: str) -> CheckOutcome:
    return CheckOutcome(bad == 0, f"{bad} {what}" if bad else ok, bad)


def activation_records_complete(conn: Any, top_k: int, random_k: int) -> CheckOutcome:
    """Finite statistics (min <= max), as many top and random records per neuron as configured (or
    as the corpus has sequences), and where the negative direction was captured as many bottom
    records as top ones and as many negative quantile samples as positive ones, none where it was not;
    `sequences` holds each listed sequence once, and no other."""
    n_seq = _count(conn, "select count(*) from {s}.corpus_tokens")
    listed = "flatten([" + ", ".join(f"list_transform({k}, lambda r: r.seq_id)" for k in RECORD_KINDS) + "])"
    stored = "list_transform(sequences, lambda s: s.seq_id)"
    bad = _count(
        conn,
        "select count(*) from {s}.activation_records where max_activation is null or mean_activation is null"
        " or variance is null or min_activation is null or negative_captured is null"
        " or not isfinite(max_activation) or not isfinite(mean_activation) or not isfinite(variance)"
        " or not isfinite(min_activation) or min_activation > max_activation"
        " or len(top) <> ? or len(random) <> ?"
        " or len(bottom) <> (case when negative_captured then len(top) else 0 end)"
        " or len(quantile_neg) <> (case when negative_captured then len(quantile) else 0 end)"
        # `sequences` holds each listed sequence exactly once
        f" or not list_has_all({stored}, {listed}) or len(list_distinct({listed})) <> len(sequences)"
        f" or len(list_distinct({stored})) <> len(sequences)",
        [min(top_k, n_seq), min(random_k, n_seq)],
    )
    return _outcome(bad, "neurons with missing/non-finite statistics or a wrong record count", "all neurons complete")


def examples_complete(conn: Any) -> CheckOutcome:
    """Every unit has a finite normalization max, and every split record refers to a record of the
    neuron's list in activation_records (where its activations are: `pipeline.core.units.source_list`),
    so the 0-10 levels the explainer and the views compute are defined."""
    no_max = _count(
        conn, "select count(*) from {s}.unit_examples where max_activation is null or not isfinite(max_activation)"
    )
    lists = " union all ".join(
        f"select model_id, model_revision, layer, neuron, '{name}' as list,"
        f" unnest(list_transform({name}, lambda r: r.seq_id)) as seq_id from {{s}}.activation_records"
        for name in RECORD_LISTS
    )
    dangling = _count(
        conn,
        "with refs as (select model_id, model_revision, layer, neuron, coalesce(polarity, '+') as polarity,"
        " unnest(records, recursive := true) from {s}.unit_examples),"
        f" stored as ({lists})"
        " select count(*) from refs r anti join stored s on s.model_id = r.model_id"
        " and s.model_revision = r.model_revision and s.layer = r.layer and s.neuron = r.neuron"
        " and s.seq_id = r.seq_id and s.list = case when r.kind = 'random' then 'random'"
        " when r.polarity = '-' then 'bottom' else 'top' end",
    )
    what = []
    if no_max:
        what.append(f"{no_max} units without a finite normalization max")
    if dangling:
        what.append(f"{dangling} split records not found in activation_records")
    return CheckOutcome(
        not what, "; ".join(what) or "every unit has its max and every record its activations", no_max + dangling
    )


def one_explanation_per_key(conn: Any) -> CheckOutcome:
    bad = _count(
        conn,
        "select count(*) from (select model_id, layer, neuron, polarity, kind, sample_index from {s}.explanations"
        " group by all having count(*) > 1)",
    )
    return _outcome(
        bad, "duplicated (model, layer, neuron, polarity, kind, sample) keys", "one explanation per unit, kind, sample"
    )


def simulations_in_range(conn: Any) -> CheckOutcome:
    bad = _count(
        conn,
        "select count(*) from {s}.simulations where simulated is not null and (len(simulated) <> len(true_acts)"
        " or len(list_filter(simulated, lambda v: v is null or not isfinite(v) or v < 0 or v > 10)) > 0)",
    )
    return _outcome(
        bad, "sequences with simulated levels outside 0..10 or of the wrong length", "all simulations in 0..10"
    )


def scores_in_range(conn: Any) -> CheckOutcome:
    """Correlations in [-1, 1], NULL only with a reason; the gap is score − control; every unit has
    at most one best explanation."""
    cols = ("corr_all", "corr_top", "corr_random", "control_corr_all")
    cond = " or ".join(f"({c} is not null and (isnan({c}) or {c} < -1 or {c} > 1))" for c in cols)
    nulls = " or ".join(
        f"({c} is null and {c}_reason is null and failure_reason is null)"
        for c in ("corr_all", "corr_top", "corr_random")
    )
    gap = "(gap is not null and abs(gap - (corr_all - control_corr_all)) > 1e-9)"
    bad = _count(conn, f"select count(*) from {{s}}.scores where {cond} or {nulls} or {gap}")
    bad += _count(
        conn,
        "select count(*) from (select model_id, layer, neuron, polarity, split from {s}.scores where best"
        " group by all having count(*) > 1)",
    )
    return _outcome(
        bad,
        "scores outside [-1, 1], NaN, NULL without a reason, a wrong gap, or two best explanations",
        "all scores within [-1, 1]",
    )


def ablations_sane(conn: Any) -> CheckOutcome:
    bad = _count(
        conn,
        "select count(*) from {s}.ablations where failure_reason is null and (kl_mean < 0 or kl_simulated < 0"
        " or (ablation_score is null and ablation_score_reason is null))",
    )
    return _outcome(bad, "ablations with negative KL or a NULL score without a reason", "all ablations sane")


def classification_in_range(conn: Any) -> CheckOutcome:
    bad = _count(
        conn,
        "select count(*) from {s}.classification_scores where"
        " not (coalesce(accuracy, 0) between 0 and 1 and coalesce(balanced_accuracy, 0) between 0 and 1"
        " and coalesce(f1, 0) between 0 and 1 and coalesce(auc, 0) between 0 and 1)"
        " or (balanced_accuracy is null and balanced_accuracy_reason is null and failure_reason is null)"
        " or (scorer = 'detection' and n_positive <> n_negative)",
    )
    return _outcome(
        bad,
        "classification scores outside [0, 1], NULL without a reason, or detection with unequal classes",
        "all classification scores in range",
    )
