"""Per-asset knobs as Dagster run config: each asset takes its own `config: XConfig`, set per run in
the launchpad or a run request as `ops: {<asset>: {config: {...}}}`.

Resources (`assets.resources`) are kept for the external things several assets share: the subject
model, the corpus, the LLM endpoints and the warehouse. These knobs used to be resources too
(`sampling`, `explain`, `ablation`, `classify`); `refuse_moved_knobs` fails a run that still sets
them there, since Dagster would otherwise drop those settings without a word."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from dagster import AssetExecutionContext, Config, Permissive, ResourceDefinition, RunConfig
from pydantic import Field

from pipeline.core.classify import SCORERS, ClassifySpec
from pipeline.core.errors import AtlasInputError
from pipeline.core.llm import GenerationParams
from pipeline.core.prompts import explainer_few_shot_explanations
from pipeline.core.records import SamplingSpec


class SamplingConfig(Config):
    """How many records each neuron keeps (the `activation_records` asset)."""

    top_k: int = Field(20, description="top-activating sequences per neuron")
    random_k: int = Field(20, description="uniformly sampled sequences per neuron")
    quantile_bins: int = Field(4, description="activation-level bins for quantile samples")
    per_quantile: int = Field(5, description="quantile samples per bin")
    batch_size: int = Field(16, description="sequences per forward pass")
    seed: int = Field(0, description="seed of the random samples")
    negative: str = Field(
        "auto",
        description="capture the negative direction too (bottom-k by min activation, negative quantile samples):"
        " 'auto' = on for gated MLPs (act(gate) * up: Llama, Gemma, Qwen, Mistral), off for ReLU/GELU MLPs"
        " (GPT-2, OPT, GPT-NeoX), whose negative side is small; 'on'; 'off'",
    )

    def spec(self) -> SamplingSpec:
        return SamplingSpec(
            top_k=self.top_k,
            random_k=self.random_k,
            quantile_bins=self.quantile_bins,
            per_quantile=self.per_quantile,
            batch_size=self.batch_size,
            seed=self.seed,
            negative=self.negative,
        )


class TopTokensConfig(Config):
    """Which tokens `unit_examples` lists per unit."""

    n_top_tokens: int = Field(10, description="top tokens kept per neuron")
    min_token_count: int = Field(
        2, description="a top token must occur this often in the train+calibration records (one-offs say little)"
    )


class ExplainConfig(Config):
    """Which neurons to explain and how to sample explanations (each is a candidate, chosen on the
    valid split beside the token-space explanation). The later steps (simulations, scores, ablations,
    classification, viewer) work on the units that have explanations, so this selects for them too."""

    n_neurons: int | None = Field(8, description="explain the first N neurons of each layer (null: all)")
    neuron_ids: list[int] | None = Field(None, description="explicit neuron ids (overrides n_neurons)")
    samples: int = Field(2, description="explanations sampled per unit, best-of-N on the valid split")
    temperature: float = Field(0.8, description="sampling temperature (0 = greedy, which needs samples = 1)")
    max_tokens: int = Field(40, description="longest explanation, in tokens")
    seed: int = Field(0, description="sampling seed")
    avoid_few_shot_copies: bool = Field(
        True,
        description="in-process explainers may not reproduce three consecutive tokens of a few-shot explanation "
        "(small models copy them)",
    )

    def params(self) -> GenerationParams:
        if self.samples < 1:
            raise AtlasInputError(f"samples must be at least 1, got {self.samples}")
        if self.samples > 1 and self.temperature <= 0:
            raise AtlasInputError("several samples per neuron need a temperature above 0")
        return GenerationParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            n=self.samples,
            stop=("\n",),
            seed=self.seed,
            avoid=tuple(explainer_few_shot_explanations()) if self.avoid_few_shot_copies else (),
        )


class AblationConfig(Config):
    """Which neurons get ablation scores, and how the ablated passes are batched."""

    top_n: int = Field(4, description="ablate the N neurons with the best simulation score (corr_all) per layer")
    random_n: int = Field(0, description="also ablate this many other scored neurons, drawn at random")
    seed: int = Field(0, description="seed of the random draw")
    batch_size: int = Field(4, description="ablated sequences per forward pass (each row may ablate another neuron)")


class ClassifyConfig(Config):
    """Detection and fuzzing (on the simulator's model): how many held-out texts, and how many per prompt."""

    scorers: list[str] = Field(list(SCORERS), description="'detection' and/or 'fuzzing'")
    examples_per_prompt: int = Field(5, description="texts per prompt (the model answers one 0/1 label per text)")
    max_per_class: int = Field(
        10, description="activating quantile samples per unit (and as many non-activating texts); fuzzing shows"
        " each activating text twice, marked rightly and wrongly"
    )  # fmt: skip
    activating_level: int = Field(
        1, description="a text activates the unit where one of its tokens reaches this level (0-10 scale)"
    )
    seed: int = Field(0, description="seed of the choice of non-activating texts, the wrong markings and the order")
    window: int = Field(
        16, description="tokens per text shown: held-out sequences are cut to windows (the activating ones around"
        " their strongest token), so dense units have non-activating texts too"
    )  # fmt: skip

    def spec(self) -> ClassifySpec:
        spec = ClassifySpec(
            tuple(self.scorers),
            self.examples_per_prompt,
            self.max_per_class,
            self.activating_level,
            self.seed,
            self.window,
        )
        spec.validate()
        return spec


# The resource keys these knobs had, and the assets whose run config now holds each of their fields.
MOVED_KNOBS: dict[str, dict[str, type[Config]]] = {
    "sampling": {"activation_records": SamplingConfig, "unit_examples": TopTokensConfig},
    "explain": {"explanations": ExplainConfig},
    "ablation": {"ablations": AblationConfig},
    "classify": {"classification_scores": ClassifyConfig},
}


def moved_knob_resources() -> dict[str, ResourceDefinition]:
    """Placeholders under the old resource keys, which no asset requires: without them Dagster would
    reject `resources: {sampling: ...}` with a bare "unexpected config entry"; with them the run is
    accepted and `refuse_moved_knobs` fails its first such step saying where each setting went."""

    def placeholder(key: str) -> ResourceDefinition:
        where = ", ".join(f"ops: {{{a}: {{config: ...}}}}" for a in MOVED_KNOBS[key])
        return ResourceDefinition(
            resource_fn=lambda _: None,
            config_schema=Permissive(),
            description=f"Moved: these settings are run config of the assets now ({where}); a run that sets"
            " them here fails.",
        )

    return {key: placeholder(key) for key in MOVED_KNOBS}


def moved_to(key: str, fields: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The `ops:` run config that replaces `resources: {key: {config: fields}}`: each field under
    the asset that now has it (all of the key's assets when no fields are given)."""
    ops: dict[str, dict[str, Any]] = {}
    for asset_name, config_type in MOVED_KNOBS[key].items():
        mine = {k: v for k, v in (fields or {}).items() if k in config_type.model_fields}
        if mine or not fields:
            ops[asset_name] = {"config": mine}
    return ops


def refuse_moved_knobs(context: AssetExecutionContext) -> None:
    """Fail the step if the run still sets a knob as resource config (`resources: {sampling: ...}`):
    no asset reads those resources any more, and the settings would be dropped silently. The
    message gives the run config that says the same in its new place. (An entry that sets nothing
    loses nothing and passes.)"""
    resources = (context.run.run_config or {}).get("resources") or {}
    old: dict[str, Mapping[str, Any]] = {}
    for key in MOVED_KNOBS:
        entry = resources.get(key)
        fields = entry.get("config") if isinstance(entry, Mapping) else None
        if fields:
            old[key] = fields if isinstance(fields, Mapping) else {}
    if not old:
        return
    ops: dict[str, Any] = {}
    unknown: list[str] = []
    for key, fields in old.items():
        ops |= moved_to(key, fields)
        known = {f for config_type in MOVED_KNOBS[key].values() for f in config_type.model_fields}
        unknown += [f"{key}.{f}" for f in fields if f not in known]
    given = json.dumps({"resources": {key: {"config": dict(fields)} for key, fields in old.items()}}, default=str)
    raise AtlasInputError(
        f"resource config for {', '.join(old)} is no longer read: these settings are the assets' own run config"
        f" now (see the README's migration note). Instead of {given} give {json.dumps({'ops': ops}, default=str)}"
        + (f"; no asset has the fields {', '.join(unknown)}" if unknown else "")
    )


def sampling_of_run(run_config: Mapping[str, Any] | None) -> SamplingConfig:
    """The `activation_records` config a run was given (defaults where it gave none), for the asset
    check that counts its records in the same run."""
    ops = (run_config or {}).get("ops") or {}
    given = (ops.get("activation_records") or {}).get("config") or {}
    return SamplingConfig(**given)


def atlas_run_config(
    ops: Mapping[str, Config | Mapping[str, Any] | None] | None = None,
    resources: Mapping[str, Any] | None = None,
    selection: Collection[str] | None = None,
) -> RunConfig:
    """A `RunConfig` with each asset's config under `ops:` (assets left out of `selection` dropped:
    Dagster refuses op config for an op not in the run), for tests, benchmarks and run requests."""
    kept = {
        name: value
        for name, value in (ops or {}).items()
        if value is not None and (selection is None or name in selection)
    }
    return RunConfig(ops=dict(kept), resources=dict(resources or {}))
