"""What explaining and simulating a selection of layers and neurons will ask of the LLMs, before launch:
`python -m pipeline.infra.cost --layers 0-3 --neurons 8 [--db FILE]`.

Counts come from the warehouse's `unit_examples` and `corpus_tokens` (materialize those first): the
explainer's prompts are built exactly as the `explanations` step builds them. The simulator's are
those the `simulations` step sends at most per unit: every candidate (the LLM's samples and the
token-space explanation) on the valid split, the two chosen ones on calibration and test, and their
controls on test (degenerate candidates and kinds chosen for one unit only ask less). The
explanations do not exist yet, so the simulator's prompts use a placeholder explanation of typical
length. Detection and fuzzing (`classification_scores`) are counted from the held-out texts
`activation_records` holds, packed into prompts exactly as that step packs them, each prompt asked
for the unit's explanation and for its control's. Tokens are counted with the tokenizer given
(default: the embedded Gemma's), a proxy for a server model's own tokenizer; completion tokens are upper
bounds where the model decides (explanations) and exact where the format fixes them (echo: the prompt).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import polars as pl

from pipeline.core.classify import (
    SCORERS,
    ClassifySpec,
    answer_text,
    classification_messages,
    classification_prompt,
    held_out,
    items,
    pack,
    with_quantiles,
)
from pipeline.core.errors import AtlasInputError
from pipeline.core.interpret import CANDIDATE_KINDS
from pipeline.core.llm import role_env
from pipeline.core.prompts import (
    chat_simulation_messages,
    explanation_messages,
    explanation_prompt,
    format_token,
    simulation_prompt,
)
from pipeline.core.units import RECORD_COLUMNS, Unit, select_units, units_from_frames

PLACEHOLDER_EXPLANATION = "words about food and cooking"  # the length of a typical explanation
CountTokens = Callable[[str], int]


@dataclass
class StageCost:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Requests that may be added: re-asks (chat) or the splits of p("1") between 1 and 10 (echo).
    extra_requests_max: int = 0
    notes: list[str] = field(default_factory=list)


def _text(prompt: str | list[dict]) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def explanation_cost(units: Sequence[Unit], count: CountTokens, api: str, samples: int, max_tokens: int) -> StageCost:
    """One request per live unit (its samples share it); completion tokens at most samples x max_tokens."""
    cost = StageCost()
    build = explanation_messages if api == "chat" else explanation_prompt
    for unit in units:
        if unit.dead:
            continue
        cost.requests += 1
        cost.prompt_tokens += count(_text(build(unit.train_records())))
        cost.completion_tokens += samples * max_tokens
    return cost


def simulated_sequences(unit: Unit, samples: int) -> list[tuple[tuple[str, ...], int]]:
    """(tokens, times simulated) at most: valid for every candidate (samples + the token-space
    explanation), calibration and test for each of the two kinds' chosen one, and the control on test."""
    times = {"valid": samples + len(CANDIDATE_KINDS) - 1, "calibration": 2, "test": 4}
    return [(e.tokens, times[e.split]) for e in unit.examples if e.split in times and e.tokens]


def simulation_cost(units: Sequence[Unit], count: CountTokens, backend: str, api: str, samples: int) -> StageCost:
    """Requests and tokens of the simulator (the lookup reference asks no LLM)."""
    cost = StageCost()
    for unit in units:
        if unit.dead:
            continue
        for tokens, times in simulated_sequences(unit, samples):
            if backend == "local":
                cost.prompt_tokens += times * count(simulation_prompt(PLACEHOLDER_EXPLANATION, tokens))
            elif api == "chat":
                prompt = _text(chat_simulation_messages(PLACEHOLDER_EXPLANATION, tokens))
                reply = "".join(f"{format_token(t)}\t0\n" for t in tokens)
                cost.requests += times
                cost.prompt_tokens += times * count(prompt)
                cost.completion_tokens += times * count(reply)
                cost.extra_requests_max += times  # one re-ask per sequence at most
            else:
                cost.requests += times
                cost.prompt_tokens += times * count(simulation_prompt(PLACEHOLDER_EXPLANATION, tokens))
                cost.completion_tokens += times  # echo generates one token (max_tokens=1)
                cost.extra_requests_max += times * len(tokens)  # "10" splits, one per token at most
        if backend == "local":  # in process: one batched pass per explanation and split group, nothing sent
            cost.requests += samples + len(CANDIDATE_KINDS) - 1 + 2 * len(CANDIDATE_KINDS)
    return cost


def classification_cost(units: Sequence[Unit], count: CountTokens, api: str, spec: ClassifySpec) -> StageCost:
    """Per live unit and scorer, its prompts, each asked twice (the unit's explanation and its control's).
    A unit that ends with no chosen explanation asks nothing: the figures are upper bounds."""
    cost = StageCost()
    build = classification_messages if api == "chat" else classification_prompt
    without: dict[str, int] = {}
    for unit in units:
        if unit.dead:
            continue
        data = held_out(unit, spec)
        for scorer in spec.scorers:
            shown, reason = items(unit, data, scorer, spec)
            if reason is not None:
                without[scorer] = without.get(scorer, 0) + 1
            for prompt in pack(shown, spec.per_prompt):
                texts = [item.shown for item in prompt]
                cost.requests += 2
                cost.prompt_tokens += 2 * count(_text(build(scorer, PLACEHOLDER_EXPLANATION, texts)))
                cost.completion_tokens += 2 * count(answer_text([0] * len(prompt)))
    for scorer, n in sorted(without.items()):
        cost.notes.append(f"{scorer}: {n} unit(s) have no held-out texts to ask about (NULL with the reason)")
    return cost


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'all', '3', '0-3' (or Dagster's '0...3') or '0,2,5', checked against the layers the warehouse holds."""
    text = text.replace("...", "-")
    if text == "all":
        return list(range(n_layers))
    layers: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            layers += list(range(int(lo), int(hi or lo) + 1))
        except ValueError as exc:
            raise AtlasInputError(f"layers must look like 3, 0-3 or 0,2,5 (or all), got {text!r}") from exc
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise AtlasInputError(f"layers {bad} are not in the warehouse (it holds layers 0..{n_layers - 1})")
    return sorted(set(layers))


def estimate(
    examples: pl.DataFrame,
    corpus_tokens: pl.DataFrame,
    activation_records: pl.DataFrame,
    layers: Sequence[int],
    count: CountTokens,
    *,
    n_neurons: int | None = 8,
    neuron_ids: Sequence[int] | None = None,
    samples: int = 2,
    max_tokens: int = 40,
    explainer_api: str = "completions",
    simulator_backend: str = "local",
    simulator_api: str = "completions",
    classify: ClassifySpec | None = None,
) -> dict[str, StageCost]:
    """Requests and tokens (at most) of the explanations and simulations steps for these layers and
    neurons, and of classification_scores (on the simulator's model) given `classify`;
    `activation_records` holds the records' activations (`units_from_frames`) and quantile samples."""
    units = units_from_frames(examples.filter(pl.col("layer").is_in(list(layers))), corpus_tokens, activation_records)
    chosen: list[Unit] = []
    for layer in layers:
        n = len({neuron for (lay, neuron, _) in units if lay == layer})
        chosen += select_units(units, layer, n, n_neurons, neuron_ids)
    costs = {
        "explanations": explanation_cost(chosen, count, explainer_api, samples, max_tokens),
        "simulations": simulation_cost(chosen, count, simulator_backend, simulator_api, samples),
    }
    if classify is not None:
        classify.validate()
        with_held_out = with_quantiles({u.key: u for u in chosen}, activation_records, corpus_tokens)
        costs["classification"] = classification_cost(list(with_held_out.values()), count, simulator_api, classify)
    return costs


def report(costs: dict[str, StageCost]) -> str:
    rows = [f"{'stage':<14}{'requests':>10}{'prompt tokens':>16}{'completion tokens':>20}  may add requests"]
    for name, c in [*costs.items(), ("total", _total(costs.values()))]:
        rows.append(
            f"{name:<14}{c.requests:>10,}{c.prompt_tokens:>16,}{c.completion_tokens:>20,}  "
            + (f"up to {c.extra_requests_max:,}" if c.extra_requests_max else "-")
        )
    rows += [f"note: {note}" for c in costs.values() for note in c.notes]
    return "\n".join(rows)


def _total(costs: Sequence[StageCost] | object) -> StageCost:
    total = StageCost()
    for c in costs:  # type: ignore[attr-defined]
        total.requests += c.requests
        total.prompt_tokens += c.prompt_tokens
        total.completion_tokens += c.completion_tokens
        total.extra_requests_max += c.extra_requests_max
    return total


def main(argv: list[str] | None = None) -> None:
    from pipeline.infra.warehouse import default_database, open_warehouse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=str(default_database()), help="warehouse file")
    parser.add_argument("--layers", default="all", help="'all', '3', '0-3' or '0,2,5'")
    parser.add_argument(
        "--neurons", type=int, default=8, help="the first N neurons of each layer (explanations.n_neurons)"
    )
    parser.add_argument("--neuron-ids", default=None, help="explicit neuron ids, e.g. 3,17 (explanations.neuron_ids)")
    parser.add_argument("--samples", type=int, default=2, help="explanations per unit (explanations.samples)")
    parser.add_argument("--max-tokens", type=int, default=40, help="longest explanation (explanations.max_tokens)")
    parser.add_argument("--explainer-api", default=role_env("EXPLAINER", "API") or "completions")
    parser.add_argument("--simulator-backend", default=role_env("SIMULATOR", "BACKEND") or "local")
    parser.add_argument("--simulator-api", default=role_env("SIMULATOR", "API") or "completions")
    parser.add_argument("--tokenizer", default="embedded", help="model whose tokenizer counts the tokens")
    parser.add_argument(
        "--scorers", default=",".join(SCORERS), help="classification scorers (classification_scores.scorers), or 'none'"
    )
    parser.add_argument("--examples-per-prompt", type=int, default=5, help="classification_scores.examples_per_prompt")
    parser.add_argument("--max-per-class", type=int, default=10, help="classification_scores.max_per_class")
    parser.add_argument("--window", type=int, default=16, help="classification_scores.window")
    args = parser.parse_args(argv)

    from pipeline.core.models import load_tokenizer

    tokenizer, identity = load_tokenizer(args.tokenizer)
    with open_warehouse(args.db, read_only=True) as conn:
        examples = conn.sql(
            "select * exclude (model_id, model_revision, run_id, code_version) from atlas.unit_examples"
        ).pl()
        corpus = conn.sql("select seq_id, tokens, token_ids from atlas.corpus_tokens").pl()
        records = conn.sql(
            f"select {', '.join(RECORD_COLUMNS)}, quantile, quantile_neg from atlas.activation_records"
        ).pl()
    if examples.is_empty():
        raise AtlasInputError("unit_examples is empty: materialize activation_records and unit_examples first")
    layers = parse_layers(args.layers, int(examples["layer"].max()) + 1)
    ids = [int(i) for i in args.neuron_ids.split(",")] if args.neuron_ids else None
    costs = estimate(
        examples,
        corpus,
        records,
        layers,
        lambda text: len(tokenizer.encode(text)),
        n_neurons=args.neurons,
        neuron_ids=ids,
        samples=args.samples,
        max_tokens=args.max_tokens,
        explainer_api=args.explainer_api,
        simulator_backend=args.simulator_backend,
        simulator_api=args.simulator_api,
        classify=None
        if args.scorers == "none"
        else ClassifySpec(
            scorers=tuple(s.strip() for s in args.scorers.split(",")),
            per_prompt=args.examples_per_prompt,
            max_per_class=args.max_per_class,
            window=args.window,
        ),
    )
    print(f"layers {layers[0]}..{layers[-1]} ({len(layers)}), tokens counted with {identity.model_id}'s tokenizer")
    print(f"explainer api: {args.explainer_api}; simulator: {args.simulator_backend}, api {args.simulator_api}")
    print(report(costs))
    if args.simulator_backend == "local":
        print("(the local simulator runs in process: its requests are batched forward passes, nothing is sent)")


if __name__ == "__main__":
    main()
