"""Configuration as Dagster resources: editable in the launchpad, shared by every stage of a run."""

from __future__ import annotations

import os

from dagster import ConfigurableResource
from pydantic import Field

from pipeline.corpus import CorpusSpec
from pipeline.errors import AtlasInputError
from pipeline.llm import GenerationParams, LLMBackend
from pipeline.llm_cache import CachedBackend, CachedSimulator, LLMCache, default_cache_path
from pipeline.llm_local import LocalBackend
from pipeline.llm_openai import OpenAIBackend
from pipeline.models import ModelIdentity, SubjectModel, load_subject_model, load_tokenizer
from pipeline.records import SamplingSpec
from pipeline.simulate_local import LocalSimulator
from pipeline.simulate_remote import EchoSimulator, JsonSimulator
from pipeline.simulator import Simulator


def _env(name: str, fallback: str | None) -> str | None:
    """A field's default from the environment of the process that loads the code location.

    It must be the field's default, not a value passed to the constructor: Dagster replaces a
    resource's constructed values wholesale with any run config given for it, so a launchpad edit
    of one field would silently reset the model or backend chosen by environment variable."""
    return os.environ.get(name) or fallback


class SubjectModelResource(ConfigurableResource):
    """The model whose neurons are explained."""

    model: str = Field(
        _env("NEURON_ATLAS_MODEL", "embedded"),
        description="'embedded' (Gemma 3 270M GGUF), a local checkpoint directory, or a Hugging Face id "
        "(default: $NEURON_ATLAS_MODEL)",
    )
    revision: str | None = Field(None, description="Hugging Face revision (branch, tag or commit)")
    device: str = Field(_env("NEURON_ATLAS_DEVICE", "cpu"), description="torch device: cpu, cuda, cuda:1 ...")
    dtype: str = Field(_env("NEURON_ATLAS_DTYPE", "float32"), description="float32, bfloat16 or float16")

    def load(self) -> SubjectModel:
        return load_subject_model(self.model, self.revision, self.device, self.dtype)

    def load_tokenizer(self) -> tuple[object, ModelIdentity]:
        return load_tokenizer(self.model, self.revision)


class CorpusResource(ConfigurableResource):
    """The text the neurons are read on."""

    source: str = Field(
        _env("NEURON_ATLAS_CORPUS", "embedded"),
        description="'embedded' (small offline sample), 'hf:NAME[:CONFIG]', or comma-separated local "
        ".txt/.jsonl/.parquet files, directories or globs (default: $NEURON_ATLAS_CORPUS)",
    )
    text_field: str = Field("text", description="field/column holding the text in JSONL, Parquet and HF datasets")
    split: str = Field("train", description="HF dataset split")
    seq_len: int = Field(64, description="tokens per sequence")
    n_sequences: int = Field(256, description="number of sequences")
    seed: int = Field(0, description="seed for choosing the sequences")

    def spec(self) -> CorpusSpec:
        return CorpusSpec(self.source, self.text_field, self.split, self.seq_len, self.n_sequences, self.seed)


class SamplingResource(ConfigurableResource):
    """How many records each neuron keeps."""

    top_k: int = Field(20, description="top-activating sequences per neuron")
    random_k: int = Field(20, description="uniformly sampled sequences per neuron")
    quantile_bins: int = Field(4, description="activation-level bins for quantile samples")
    per_quantile: int = Field(5, description="quantile samples per bin")
    batch_size: int = Field(16, description="sequences per forward pass")
    n_top_tokens: int = Field(10, description="top tokens kept per neuron")
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


class LLMResource(ConfigurableResource):
    """The explainer/simulator language model: in-process (exact probabilities) or any
    OpenAI-compatible server. The API key is read from the environment variable named here, never
    from config, so it is not stored in run config, logs or the warehouse."""

    backend: str = Field(
        _env("NEURON_ATLAS_LLM_BACKEND", "local"),
        description="'local' (in-process transformers) or 'openai' (any compatible server)",
    )
    model: str = Field(
        _env("NEURON_ATLAS_LLM_MODEL", "embedded"),
        description="local: 'embedded', a checkpoint directory or a Hugging Face id; openai: the served model name",
    )
    base_url: str | None = Field(
        _env("NEURON_ATLAS_LLM_BASE_URL", None), description="openai: server URL, e.g. http://localhost:8000/v1"
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: name of the environment variable with the key")
    simulator: str = Field(
        "echo",
        description="openai: 'echo' (completions with echo + logprobs: exact expected values) or 'json' "
        "(the fallback for chat-only servers: the model writes the levels as a JSON list)",
    )
    max_concurrency: int = Field(4, description="openai: requests in flight at once")
    max_attempts: int = Field(6, description="openai: attempts per request (429/5xx/timeouts are retried)")
    timeout_s: float = Field(60.0, description="openai: seconds per request")
    cache_path: str | None = Field(
        None,
        description="response cache (every finished explanation and simulation, so reruns and resumed runs redo"
        " nothing); default: llm_cache.sqlite beside the warehouse, or NEURON_ATLAS_LLM_CACHE",
    )
    device: str = Field(_env("NEURON_ATLAS_DEVICE", "cpu"), description="local: torch device")
    dtype: str = Field("float32", description="local: float32, bfloat16 or float16")
    simulation_batch_size: int = Field(16, description="local: held-out sequences per forward pass")

    def validate_choice(self) -> None:
        if self.backend not in ("local", "openai"):
            raise AtlasInputError(f"unknown LLM backend {self.backend!r}: use 'local' or 'openai'")
        if self.backend == "openai" and self.simulator not in ("echo", "json"):
            raise AtlasInputError(f"unknown simulator {self.simulator!r}: use 'echo' or 'json'")

    def load_local(self) -> SubjectModel:
        return load_subject_model(self.model, None, self.device, self.dtype)

    def backend_client(self) -> LLMBackend:
        """The explainer: completes prompts."""
        self.validate_choice()
        if self.backend == "local":
            loaded = self.load_local()
            return CachedBackend(
                LocalBackend(loaded.model, loaded.tokenizer, loaded.identity.data_version), self._cache()
            )
        return self._openai()

    def simulator_client(self) -> Simulator:
        self.validate_choice()
        if self.backend == "local":
            loaded = self.load_local()
            simulator = LocalSimulator(
                loaded.model, loaded.tokenizer, loaded.identity.data_version, self.simulation_batch_size
            )
            return CachedSimulator(simulator, self._cache())
        client = self._openai()
        return EchoSimulator(client) if self.simulator == "echo" else JsonSimulator(client)

    def _openai(self) -> LLMBackend:
        if not self.base_url:
            raise AtlasInputError("the openai backend needs base_url (e.g. https://api.openai.com/v1)")
        return OpenAIBackend(
            model=self.model,
            base_url=self.base_url,
            api_key_env=self.api_key_env,
            max_concurrency=self.max_concurrency,
            max_attempts=self.max_attempts,
            timeout_s=self.timeout_s,
            cache=self._cache(),
        )

    def _cache(self) -> LLMCache:
        return LLMCache(self.cache_path or default_cache_path())


class ExplainResource(ConfigurableResource):
    """Which neurons to explain and how to sample explanations."""

    n_neurons: int | None = Field(8, description="explain the first N neurons of each layer (null: all)")
    neuron_ids: list[int] | None = Field(None, description="explicit neuron ids (overrides n_neurons)")
    samples: int = Field(1, description="explanations sampled per neuron (several need temperature > 0)")
    temperature: float = Field(0.0, description="0 = greedy")
    max_tokens: int = Field(40, description="longest explanation, in tokens")
    seed: int = Field(0, description="sampling seed")

    def params(self) -> GenerationParams:
        if self.samples < 1:
            raise AtlasInputError(f"samples must be at least 1, got {self.samples}")
        if self.samples > 1 and self.temperature <= 0:
            raise AtlasInputError("several samples per neuron need a temperature above 0")
        return GenerationParams(
            max_tokens=self.max_tokens, temperature=self.temperature, n=self.samples, stop=("\n",), seed=self.seed
        )


class AblationResource(ConfigurableResource):
    """Which neurons get ablation scores, and how the ablated passes are batched."""

    top_n: int = Field(4, description="ablate the N neurons with the best simulation score (corr_all) per layer")
    random_n: int = Field(0, description="also ablate this many other scored neurons, drawn at random")
    seed: int = Field(0, description="seed of the random draw")
    batch_size: int = Field(4, description="ablated sequences per forward pass (each row may ablate another neuron)")
