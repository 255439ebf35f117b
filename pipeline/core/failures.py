"""Fail loudly: a layer where most explainer or simulator requests failed is an error, not a result.

A few failures are data (NULL rows with a reason, the layer completes); a misconfigured server fails
nearly every request, and a green step full of NULLs would hide that. Every finished answer is already
in the response cache when this check runs, so a rerun after fixing the cause only redoes the failures.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import polars as pl

from pipeline.core.errors import AtlasInputError


class TooManyFailures(RuntimeError):
    """More than the allowed share of a layer's requests failed."""


def check_failure_share(outcomes: Iterable[tuple[str | None, int]], max_share: float, what: str) -> None:
    """Raise `TooManyFailures` when the failed share of `(reason or None, weight)` outcomes exceeds
    `max_share`, naming the main reasons with their counts."""
    if not 0 <= max_share <= 1:
        raise AtlasInputError(f"max_failure_share must be between 0 and 1, got {max_share}")
    reasons: Counter[str] = Counter()
    total = 0
    for reason, weight in outcomes:
        total += weight
        if reason is not None:
            reasons[reason] += weight
    failed = sum(reasons.values())
    if total == 0 or failed / total <= max_share:
        return
    main = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(3))
    more = f"; and {len(reasons) - 3} other reasons" if len(reasons) > 3 else ""
    raise TooManyFailures(
        f"{failed} of {total} {what} failed (more than max_failure_share={max_share:g}): {main}{more}."
        " Finished requests are cached: fix the cause and rerun to resume."
    )


def explanation_outcomes(explanations: pl.DataFrame, kind: str) -> list[tuple[str | None, int]]:
    """One outcome per explainer request (a unit's samples share one), dead units (never asked) left out."""
    rows = explanations.filter((pl.col("kind") == kind) & pl.col("prompt_version").is_not_null())
    out = []
    for _, group in rows.group_by("layer", "neuron", "polarity", maintain_order=True):
        failed = group.filter(pl.col("explanation").is_null())
        out.append((failed["failure_reason"][0] if failed.height == group.height else None, 1))
    return out


SIMULATION_FAILED = "simulation failed: "


def simulation_outcomes(
    simulations: pl.DataFrame, kinds: Iterable[str], examples: Mapping[tuple[int, int, str, str], int]
) -> list[tuple[str | None, int]]:
    """One outcome per sequence the simulator was asked about (explanations never simulated, e.g.
    missing or degenerate ones, are left out); a simulation that failed as a whole counts once per
    sequence of its split (`examples[(layer, neuron, polarity, split)]` of them)."""
    rows = simulations.filter(pl.col("kind").is_in(list(kinds)))
    out: list[tuple[str | None, int]] = []
    for row in rows.iter_rows(named=True):
        if row["simulated"] is not None:
            out.append((None, 1))
        elif (row["failure_reason"] or "").startswith(SIMULATION_FAILED):
            key = (row["layer"], row["neuron"], row["polarity"], row["split"])
            out.append((row["failure_reason"], 1 if row["seq_id"] is not None else examples.get(key, 1)))
    return out
