"""Configuration as Dagster resources: editable in the launchpad, shared by every stage of a run."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from pipeline.corpus import CorpusSpec
from pipeline.models import ModelIdentity, SubjectModel, load_subject_model, load_tokenizer
from pipeline.records import SamplingSpec


class SubjectModelResource(ConfigurableResource):
    """The model whose neurons are explained."""

    model: str = Field(
        "embedded", description="'embedded' (Gemma 3 270M GGUF), a local checkpoint directory, or a Hugging Face id"
    )
    revision: str | None = Field(None, description="Hugging Face revision (branch, tag or commit)")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")

    def load(self) -> SubjectModel:
        return load_subject_model(self.model, self.revision, self.device, self.dtype)

    def load_tokenizer(self) -> tuple[object, ModelIdentity]:
        return load_tokenizer(self.model, self.revision)


class CorpusResource(ConfigurableResource):
    """The text the neurons are read on."""

    source: str = Field(
        "embedded",
        description="'embedded' (small offline sample), 'hf:NAME[:CONFIG]', or comma-separated local "
        ".txt/.jsonl/.parquet files, directories or globs",
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

    def spec(self) -> SamplingSpec:
        return SamplingSpec(
            self.top_k, self.random_k, self.quantile_bins, self.per_quantile, self.batch_size, self.seed
        )
