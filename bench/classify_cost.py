"""What each scorer costs per unit, and how their scores rank the units, measured in ONE run.

Run `python -m bench.classify_cost --out DIR`. It materializes every stage for real, in one Dagster
run (the same assets as `make materialize`), into DIR/neuron_atlas.duckdb with a fresh response
cache DIR/llm_cache.sqlite (so nothing is answered from an earlier run): the embedded Gemma 3 270M
is the subject, the explainer, the simulator and the detection/fuzzing scorer unless NEURON_ATLAS_*
choose others. Then it prints, per unit explained, the requests and tokens spent by simulation
(every candidate on valid, the chosen ones on calibration and test, the controls: one request per
sequence simulated, as a server needs, and the tokens from the simulations materialization) and by
detection and fuzzing together (their prompts and their controls'), then `python -m pipeline.infra.report
classification` on the warehouse (each scorer's own cost and the rank correlations).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dagster import DagsterInstance, RunConfig, materialize

from assets.ablations import build_ablation_assets
from assets.checks import build_asset_checks
from assets.classification import build_classification_assets
from assets.config import ExplainConfig
from assets.interpret import build_interpret_assets
from assets.io import WarehouseIOManager
from assets.resources import CorpusResource, ExplainerResource, SimulatorResource, SubjectModelResource
from assets.stages import build_stage_assets, layer_partitions
from assets.viewer import build_viewer_assets
from pipeline.core.models import EMBEDDED, model_layer_count
from pipeline.infra.report import classification_report, print_classification
from pipeline.infra.warehouse import SCHEMA, open_warehouse

STAGES = ["subject_model", "corpus_tokens", "activation_records", "unit_examples", "explanations", "simulations",
          "scores", "ablations", "classification_scores", "neuron_viewer"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a new directory for the warehouse and the cache")
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--layers", default="0-1", help="first-last layer, e.g. 0-1")
    parser.add_argument("--neurons", type=int, default=4, help="neurons explained per layer (each has 1-2 units)")
    parser.add_argument("--samples", type=int, default=1, help="LLM explanations per unit")
    parser.add_argument("--n-sequences", type=int, default=64)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    database, cache = out / "neuron_atlas.duckdb", str(out / "llm_cache.sqlite")
    first, last = (int(v) for v in args.layers.split("-"))
    n_layers = model_layer_count(args.model)
    parts = layer_partitions(n_layers)
    assets = (
        build_stage_assets(n_layers)
        + build_interpret_assets(parts)
        + build_ablation_assets(parts)
        + build_classification_assets(parts)
        + build_viewer_assets(parts)
    )
    result = materialize(
        [*assets, *build_asset_checks()],
        selection=STAGES,
        resources={
            "subject": SubjectModelResource(model=args.model),
            "corpus": CorpusResource(n_sequences=args.n_sequences),
            "explainer": ExplainerResource(cache_path=cache),
            "simulator": SimulatorResource(cache_path=cache),
            "warehouse": WarehouseIOManager(database=str(database), schema=SCHEMA),
        },
        run_config=RunConfig(ops={"explanations": ExplainConfig(n_neurons=args.neurons, samples=args.samples)}),
        tags={"dagster/asset_partition_range_start": str(first), "dagster/asset_partition_range_end": str(last)},
        instance=DagsterInstance.ephemeral(),
    )
    meta = {
        e.asset_key.path[0]: {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }
    with open_warehouse(str(database), read_only=True) as conn:
        units = conn.execute("select count(*) from (select distinct layer, neuron, polarity from atlas.explanations)")
        n_units = units.fetchone()[0]
        # A server reads one sequence per simulation request (the in-process simulator batches an
        # explanation's sequences and counts one): the simulated sequences are the requests.
        sequences = conn.execute(
            "select count(*) from atlas.simulations where kind <> 'token_lookup' and seq_id is not null"
        ).fetchone()[0]
    print(f"\n{n_units} units explained ({args.neurons} neurons x layers {first}-{last}, {args.samples} sample(s))")
    sim = meta["simulations"]
    print(
        f"simulation per unit: {sequences / n_units:,.1f} requests (sequences simulated; in-process "
        f"{sim['simulator_requests'] / n_units:,.1f} batched calls), "
        f"{sim['simulator_prompt_tokens'] / n_units:,.0f} prompt + {sim['simulator_completion_tokens'] / n_units:,.0f}"
        f" completion tokens (cache hits {sim.get('simulator_cache_hits', 0)})"
    )
    cls = meta["classification_scores"]
    print(
        f"detection + fuzzing per unit: {cls['scorer_requests'] / n_units:,.1f} requests, "
        f"{cls['scorer_prompt_tokens'] / n_units:,.0f} prompt + {cls['scorer_completion_tokens'] / n_units:,.0f}"
        f" completion tokens (cache hits {cls.get('scorer_cache_hits', 0)})"
    )
    print()
    print_classification(classification_report(database))


if __name__ == "__main__":
    main()
