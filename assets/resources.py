"""The external things the assets use, as Dagster resources: the subject model, the corpus, and the LLM
endpoints (explainer, simulator); editable in the launchpad and shared by every stage of a run. Per-asset
knobs are run config on the assets instead (`assets.config`)."""

from __future__ import annotations

import os
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr

from pipeline.core.classify import Classifier
from pipeline.core.corpus import CorpusSpec
from pipeline.core.errors import AtlasInputError
from pipeline.core.llm import APIS, LLMBackend, role_env
from pipeline.core.llm_local import DEFAULT_BATCH_REQUESTS, LocalBackend
from pipeline.core.models import ModelIdentity, SubjectModel, load_subject_model, load_tokenizer
from pipeline.core.simulate_local import LocalSimulator
from pipeline.core.simulator import Simulator
from pipeline.infra.classify_backends import LABEL_TOP_LOGPROBS, CachedClassifier, LocalClassifier, ServerClassifier
from pipeline.infra.llm_cache import CachedBackend, CachedSimulator, LLMCache, default_cache_path
from pipeline.infra.llm_openai import OpenAIBackend
from pipeline.infra.simulate_remote import MAX_TOP_LOGPROBS, ChatSimulator, EchoSimulator

BACKENDS = ("local", "openai")


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


def _role_env(role: str, name: str, fallback: str | None) -> str | None:
    """A field default: NEURON_ATLAS_<ROLE>_<NAME>, else the shared NEURON_ATLAS_LLM_<NAME> (see `_env`)."""
    return role_env(role, name) or fallback


class _LLMSettings(ConfigurableResource):
    """What the explainer and the simulator share: limits of a server and of the response cache.

    The API key is read from the environment variable named by `api_key_env`, never from config,
    so it is not stored in run config, logs or the warehouse."""

    max_concurrency: int = Field(4, description="openai: requests in flight at once (1 for a llama.cpp server)")
    max_attempts: int = Field(6, description="openai: attempts per request (429, 5xx, connection errors)")
    timeout_s: float = Field(300.0, description="openai: seconds per request, time queued at the server included")
    retry_timeouts: bool = Field(
        False,
        description="openai: resend a request that timed out (off: the server may still be working on it, and"
        " a resend would queue the same work again)",
    )
    client_processes: int = Field(
        1,
        description="openai: processes that send the requests and read the replies (1: this one). One Python"
        " process tops out near 150 requests/s, whatever the cores; more spread that CPU over cores, under the"
        " same max_concurrency. Each reads the key from api_key_env",
    )
    max_failure_share: float = Field(
        0.5,
        description="fail the step when more than this share of a layer's requests fail (finished ones stay "
        "cached, so a rerun resumes); below it, failures are NULL rows with a reason",
    )
    cache_path: str | None = Field(
        None,
        description="response cache (every finished explanation and simulation, so reruns and resumed runs redo"
        " nothing); default: llm_cache.sqlite beside the warehouse, or NEURON_ATLAS_LLM_CACHE",
    )
    device: str = Field(_env("NEURON_ATLAS_DEVICE", "cpu"), description="local: torch device")
    dtype: str = Field("float32", description="local: float32, bfloat16 or float16")

    _client: Any = PrivateAttr(default=None)

    def _check(self, backend: str, api: str, base_url: str | None, role: str) -> None:
        if backend not in BACKENDS:
            raise AtlasInputError(f"unknown {role} backend {backend!r}: use 'local' or 'openai'")
        if api not in APIS:
            raise AtlasInputError(f"unknown {role} api {api!r}: use 'completions' or 'chat'")
        if backend == "openai" and not base_url:
            raise AtlasInputError(f"the {role}'s openai backend needs base_url (e.g. https://api.openai.com/v1)")
        if not 0 <= self.max_failure_share <= 1:
            raise AtlasInputError(f"{role}.max_failure_share must be between 0 and 1, got {self.max_failure_share}")

    def _openai(self, model: str, base_url: str | None, api: str, api_key_env: str, **extra: Any) -> OpenAIBackend:
        return OpenAIBackend(
            model=model,
            base_url=base_url,
            api=api,
            api_key_env=api_key_env,
            max_concurrency=self.max_concurrency,
            max_attempts=self.max_attempts,
            timeout_s=self.timeout_s,
            retry_timeouts=self.retry_timeouts,
            client_processes=self.client_processes,
            cache=self._cache(),
            **extra,
        )

    def _load_local(self, model: str) -> SubjectModel:
        return load_subject_model(model, None, self.device, self.dtype)

    def _cache(self) -> LLMCache:
        return LLMCache(self.cache_path or default_cache_path())


class ExplainerResource(_LLMSettings):
    """The model that writes explanations: in-process, or any OpenAI-compatible server, with a
    completion-style prompt (base models) or the same few-shot prompt as chat turns (chat models)."""

    backend: str = Field(
        _role_env("EXPLAINER", "BACKEND", "local"),
        description="'local' (in-process transformers) or 'openai' (any OpenAI-compatible server)"
        " (default: $NEURON_ATLAS_EXPLAINER_BACKEND, else $NEURON_ATLAS_LLM_BACKEND)",
    )
    model: str = Field(
        _role_env("EXPLAINER", "MODEL", "embedded"),
        description="local: 'embedded', a checkpoint directory or a Hugging Face id; openai: the served model"
        " name (default: $NEURON_ATLAS_EXPLAINER_MODEL, else $NEURON_ATLAS_LLM_MODEL)",
    )
    base_url: str | None = Field(
        _role_env("EXPLAINER", "BASE_URL", None),
        description="openai: server URL, e.g. http://127.0.0.1:8000/v1 (default: $NEURON_ATLAS_EXPLAINER_BASE_URL,"
        " else $NEURON_ATLAS_LLM_BASE_URL)",
    )
    api: str = Field(
        _role_env("EXPLAINER", "API", "completions"),
        description="'completions' (the prompt continued as text: base models) or 'chat' (system/user/assistant"
        " turns: chat and instruct models; local: through the model's chat template)",
    )
    api_key_env: str = Field(
        _role_env("EXPLAINER", "API_KEY_ENV", "OPENAI_API_KEY"),
        description="openai: name of the environment variable holding the key",
    )
    batch_requests: int = Field(
        DEFAULT_BATCH_REQUESTS,
        description="local: sampled requests (units) generated together in one batch, each from its own seeded"
        " stream, so the samples match those of one request alone up to float rounding (1: one at a time;"
        " a batch that runs out of memory is rerun one request at a time)",
    )

    def client(self) -> LLMBackend:
        """The explainer backend (made once per resource instance); answers are cached on disk."""
        if self._client is None:
            self._check(self.backend, self.api, self.base_url, "explainer")
            if self.backend == "local":
                loaded = self._load_local(self.model)
                local = LocalBackend(
                    loaded.model,
                    loaded.tokenizer,
                    loaded.identity.data_version,
                    api=self.api,
                    batch_requests=self.batch_requests,
                )
                self._client = CachedBackend(local, self._cache())
            else:
                self._client = self._openai(self.model, self.base_url, self.api, self.api_key_env)
        return self._client


class SimulatorResource(_LLMSettings):
    """The model that predicts activations from an explanation: in-process (exact probabilities),
    a completions server with echoed prompt logprobs, or a chat server (levels written back, read
    from the reply's logprobs, or taken as written where the server gives none)."""

    backend: str = Field(
        _role_env("SIMULATOR", "BACKEND", "local"),
        description="'local' (in-process transformers, exact) or 'openai' (any OpenAI-compatible server)"
        " (default: $NEURON_ATLAS_SIMULATOR_BACKEND, else $NEURON_ATLAS_LLM_BACKEND)",
    )
    model: str = Field(
        _role_env("SIMULATOR", "MODEL", "embedded"),
        description="local: 'embedded', a checkpoint directory or a Hugging Face id; openai: the served model"
        " name (default: $NEURON_ATLAS_SIMULATOR_MODEL, else $NEURON_ATLAS_LLM_MODEL)",
    )
    base_url: str | None = Field(
        _role_env("SIMULATOR", "BASE_URL", None),
        description="openai: server URL (default: $NEURON_ATLAS_SIMULATOR_BASE_URL, else $NEURON_ATLAS_LLM_BASE_URL)",
    )
    api: str = Field(
        _role_env("SIMULATOR", "API", "completions"),
        description="openai: 'completions' (echo + logprobs of the prompt: vLLM, llama-cpp-python) or 'chat'"
        " (the model writes token<TAB>level lines: OpenAI chat models, llama.cpp, Ollama); local: completions",
    )
    api_key_env: str = Field(
        _role_env("SIMULATOR", "API_KEY_ENV", "OPENAI_API_KEY"),
        description="openai: name of the environment variable holding the key",
    )
    logprobs: bool = Field(
        True,
        description="chat: read expected levels from the reply's top logprobs; false for servers without"
        " logprobs (the written levels are taken, under another prompt version)",
    )
    top_logprobs: int = Field(15, description="openai: top logprobs per position (the paper: 15; chat: at most 20)")
    branch_min_share: float = Field(
        0.01,
        description="completions, tokenizers that write 10 as '1','0': one more request per token whose p('1') is"
        " at least this share of its level mass, to split it exactly between 1 and 10 (0: every token)",
    )
    echo_max_tokens: int = Field(
        1, description="completions: tokens generated after the echoed prompt (1; 0 only where the server allows)"
    )
    simulation_batch_size: int = Field(
        16,
        description="local: held-out sequences per forward pass; on a GPU the sequences of several"
        " explanations share a pass (raise it there)",
    )

    def client(self) -> Simulator:
        """The simulator (made once per resource instance); answers are cached on disk."""
        if self._client is None:
            self._check(self.backend, self.api, self.base_url, "simulator")
            if self.backend == "local":
                if self.api != "completions":
                    raise AtlasInputError(
                        "the local simulator reads exact level probabilities from the completion-style prompt;"
                        " simulator.api: chat needs the openai backend"
                    )
                loaded = self._load_local(self.model)
                simulator = LocalSimulator(
                    loaded.model, loaded.tokenizer, loaded.identity.data_version, self.simulation_batch_size
                )
                self._client = CachedSimulator(simulator, self._cache())
            elif self.api == "completions":
                if not self.logprobs:
                    raise AtlasInputError(
                        "the completions simulator reads echoed logprobs; for a server without logprobs use"
                        " simulator.api: chat with logprobs: false"
                    )
                if self.top_logprobs < 1:
                    raise AtlasInputError(f"simulator.top_logprobs must be at least 1, got {self.top_logprobs}")
                backend = self._openai(
                    self.model, self.base_url, self.api, self.api_key_env, echo_max_tokens=self.echo_max_tokens
                )
                self._client = EchoSimulator(backend, self.top_logprobs, self.branch_min_share)
            else:
                if self.logprobs and not 1 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                    raise AtlasInputError(
                        f"simulator.top_logprobs must be between 1 and {MAX_TOP_LOGPROBS} for chat, got"
                        f" {self.top_logprobs}"
                    )
                backend = self._openai(self.model, self.base_url, self.api, self.api_key_env)
                self._client = ChatSimulator(backend, self.top_logprobs if self.logprobs else None)
        return self._client

    _classifier: Any = PrivateAttr(default=None)

    def classifier(self) -> Classifier:
        """The detection/fuzzing scorer on the simulator's model (`pipeline.infra.classify_backends`):
        in-process label probabilities from logits, or the server's labels (with their top
        logprobs unless logprobs: false). Made once per resource instance; answers are cached."""
        if self._classifier is None:
            self._check(self.backend, self.api, self.base_url, "simulator")
            if self.backend == "local":
                if self.api != "completions":
                    raise AtlasInputError("the local scorer reads label probabilities from a completion-style prompt")
                loaded = self._load_local(self.model)
                local = LocalClassifier(loaded.model, loaded.tokenizer, loaded.identity.data_version)
                self._classifier = CachedClassifier(local, self._cache())
            else:
                backend = self._openai(self.model, self.base_url, self.api, self.api_key_env)
                top = min(self.top_logprobs, LABEL_TOP_LOGPROBS) if self.logprobs and self.top_logprobs > 0 else None
                self._classifier = ServerClassifier(backend, top)
        return self._classifier
