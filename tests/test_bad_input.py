"""Bad settings and bad data must stop the pipeline with an AtlasInputError whose message names the
problem (the Dagster layer shows it as-is), never with a traceback from deep inside a library."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import huggingface_hub.constants
import polars as pl
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pipeline.core.corpus import CorpusSpec, tokenize_corpus
from pipeline.core.errors import AtlasInputError
from pipeline.core.mlp import check_layers
from pipeline.core.models import load_subject_model, load_tokenizer, model_layer_count, resolve_model
from pipeline.core.records import SamplingSpec

WORDS = (
    "the a of and to in is was for on that with as by at from it this be are or an his her they which one all "
    "were we when there can more if no out so said what up"
).split()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: every known word is exactly one token, so token counts are obvious."""
    vocab = {tok: i for i, tok in enumerate(["[UNK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Content hashes of local checkpoints are memoized under the cache root: keep them out of $HOME."""
    monkeypatch.setenv("NEURON_ATLAS_CACHE", str(tmp_path / "cache"))


def _corpus(tokenizer: PreTrainedTokenizerFast, source: Path | str, **kwargs: int | str) -> pl.DataFrame:
    return tokenize_corpus(tokenizer, CorpusSpec(source=str(source), **kwargs))


def _words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


# --- models -------------------------------------------------------------------------------------


def test_nonexistent_model_path(tmp_path: Path) -> None:
    """A typo in a local path says the path does not exist (not 'cannot reach the hub')."""
    for source in ("/nonexistent/model", str(tmp_path / "missing"), "./missing-model"):
        with pytest.raises(AtlasInputError, match=r"model path .*does not exist"):
            resolve_model(source)
    with pytest.raises(AtlasInputError, match="/nonexistent/model.*does not exist"):
        load_subject_model("/nonexistent/model")
    with pytest.raises(AtlasInputError, match="does not exist"):
        load_tokenizer("/nonexistent/model")


def test_empty_model_setting() -> None:
    """A blank model setting is refused rather than treated as the current directory."""
    for source in ("", "   "):
        with pytest.raises(AtlasInputError, match="model is empty"):
            resolve_model(source)


def test_directory_without_config(tmp_path: Path) -> None:
    """A directory that is not a transformers checkpoint is named as such."""
    (tmp_path / "weights.txt").write_text("not a model")
    with pytest.raises(AtlasInputError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(AtlasInputError, match=r"has no config\.json"):
        load_subject_model(str(tmp_path))
    with pytest.raises(AtlasInputError, match=r"has no config\.json"):
        model_layer_count(str(tmp_path))


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """An id that looks like a Hub model but cannot be resolved names the model, even offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import; it may already be imported by now.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(AtlasInputError, match=r"unknown model 'no-such-org/no-such-model-xyz'"):
        resolve_model("no-such-org/no-such-model-xyz")
    with pytest.raises(AtlasInputError, match=r"unknown model 'no-such-org/no-such-model-xyz'"):
        load_subject_model("no-such-org/no-such-model-xyz")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A saved 2-layer GPT-2: a real checkpoint, so only the setting under test is wrong."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=8, n_head=2, n_layer=2, n_inner=16)
    directory = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp32", ""])
def test_bad_dtype(tiny_checkpoint: Path, dtype: str) -> None:
    """The message lists the dtypes that are accepted."""
    with pytest.raises(AtlasInputError, match=rf"dtype '{dtype}' is not one of float32, bfloat16, float16"):
        load_subject_model(str(tiny_checkpoint), dtype=dtype)


def test_cuda_requested_without_cuda(tiny_checkpoint: Path) -> None:
    """Asking for a GPU on a machine without one is a settings error, not a CUDA driver traceback."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(AtlasInputError, match="CUDA is not available"):
        load_subject_model(str(tiny_checkpoint), device="cuda")


def test_layer_out_of_range(tiny_checkpoint: Path) -> None:
    """A layer past the end, or a negative one (no Python-style indexing from the end), is refused with the count."""
    model = load_subject_model(str(tiny_checkpoint)).model
    assert model_layer_count(str(tiny_checkpoint)) == 2
    assert check_layers(model, [1, 0]) == [0, 1]
    with pytest.raises(AtlasInputError, match=r"layer 5 is out of range: the model has 2 layers \(0\.\.1\)"):
        check_layers(model, [5])
    with pytest.raises(AtlasInputError, match=r"layer 2 is out of range: the model has 2 layers"):
        check_layers(model, [0, 2])
    with pytest.raises(AtlasInputError, match=r"layer -1 is out of range: the model has 2 layers"):
        check_layers(model, [-1])
    with pytest.raises(AtlasInputError, match="no layers selected"):
        check_layers(model, [])


# --- corpus -------------------------------------------------------------------------------------


def test_empty_text_file(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """An empty corpus is reported as empty, with the source named."""
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(AtlasInputError, match=r"empty\.txt' is empty"):
        _corpus(tokenizer, path, seq_len=4, n_sequences=2)


def test_directory_of_whitespace_files(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """Files holding only whitespace add no tokens: the corpus is still empty."""
    (tmp_path / "a.txt").write_text("   \n\n\t ")
    (tmp_path / "b.md").write_text("\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "  "}\n\n{"text": "\\n"}\n')
    with pytest.raises(AtlasInputError, match="is empty"):
        _corpus(tokenizer, tmp_path, seq_len=4, n_sequences=2)


def test_empty_directory(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """A directory with no files at all is an empty corpus, not a crash."""
    with pytest.raises(AtlasInputError, match="is empty"):
        _corpus(tokenizer, tmp_path, seq_len=4, n_sequences=2)


def test_corpus_shorter_than_one_sequence(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """The message says how many tokens there are and how many one sequence needs."""
    path = tmp_path / "short.txt"
    path.write_text(_words(5))
    with pytest.raises(AtlasInputError, match=r"has only 5 tokens: at least one sequence of 6 tokens is needed"):
        _corpus(tokenizer, path, seq_len=6, n_sequences=3)
    # Exactly one sequence is enough (fewer than asked for is a warning, not an error).
    assert _corpus(tokenizer, path, seq_len=5, n_sequences=3)["token_ids"].to_list() == [list(range(1, 6))]


@pytest.mark.parametrize("seq_len", [0, 1, -3])
def test_sequence_length_below_two(tokenizer: PreTrainedTokenizerFast, tmp_path: Path, seq_len: int) -> None:
    """Sequences need at least two tokens; checked before any file is read."""
    with pytest.raises(AtlasInputError, match=rf"sequence length must be at least 2 tokens, got {seq_len}"):
        _corpus(tokenizer, tmp_path / "never-read.txt", seq_len=seq_len)


@pytest.mark.parametrize("n_sequences", [0, -1])
def test_n_sequences_below_one(tokenizer: PreTrainedTokenizerFast, tmp_path: Path, n_sequences: int) -> None:
    """Asking for no sequences is a settings error."""
    with pytest.raises(AtlasInputError, match=rf"number of sequences must be at least 1, got {n_sequences}"):
        _corpus(tokenizer, tmp_path / "never-read.txt", n_sequences=n_sequences)


def test_nonexistent_corpus_path(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """Missing files, one missing part of a comma-separated list, or a glob with no match are named."""
    present = tmp_path / "present.txt"
    present.write_text(_words(40))
    missing = tmp_path / "missing.txt"
    for source, named in (
        (missing, "missing.txt"),
        (f"{present},{missing}", "missing.txt"),
        (tmp_path / "nothing-*.txt", r"nothing-\*\.txt"),
    ):
        with pytest.raises(AtlasInputError, match=rf"corpus path '.*{named}' does not exist"):
            _corpus(tokenizer, source, seq_len=4, n_sequences=2)


def test_absolute_glob_is_expanded(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """An absolute glob pattern reads the matching files (pathlib alone refuses absolute patterns)."""
    (tmp_path / "one.txt").write_text(_words(8))
    (tmp_path / "two.txt").write_text(_words(8))
    (tmp_path / "skip.md").write_text(_words(8))
    frame = _corpus(tokenizer, tmp_path / "*.txt", seq_len=4, n_sequences=100)
    assert frame.height == 4


def test_jsonl_with_bad_line(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """Invalid JSON is reported with file and line number."""
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": _words(10)}) + "\n\n{not json\n")
    with pytest.raises(AtlasInputError, match=r"docs\.jsonl:3 is not valid JSON"):
        _corpus(tokenizer, path, seq_len=4, n_sequences=100)


@pytest.mark.parametrize("bad_row", [{"body": "the a of"}, ["the", "a"], "the a"], ids=["other-field", "list", "str"])
def test_jsonl_without_text_field(tokenizer: PreTrainedTokenizerFast, tmp_path: Path, bad_row: object) -> None:
    """A row without the configured text field (or not an object at all) names the line and field."""
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": _words(10)}) + "\n" + json.dumps(bad_row) + "\n")
    with pytest.raises(AtlasInputError, match=r"docs\.jsonl:2 has no field 'text'"):
        _corpus(tokenizer, path, seq_len=4, n_sequences=100)
    path.write_text(json.dumps({"body": _words(10)}) + "\n")
    with pytest.raises(AtlasInputError, match=r"docs\.jsonl:1 has no field 'content'"):
        _corpus(tokenizer, path, seq_len=4, text_field="content")


def test_parquet_missing_column(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """The message lists the columns the file does have."""
    path = tmp_path / "docs.parquet"
    pl.DataFrame({"body": [_words(10)], "id": [1]}).write_parquet(path)
    with pytest.raises(AtlasInputError, match=r"docs\.parquet has no column 'text' \(columns: \['body', 'id'\]\)"):
        _corpus(tokenizer, path, seq_len=4)
    assert _corpus(tokenizer, path, seq_len=5, text_field="body").height == 2


@pytest.mark.parametrize("suffix", [".csv", ".json", ".pdf", ""])
def test_unsupported_suffix(tokenizer: PreTrainedTokenizerFast, tmp_path: Path, suffix: str) -> None:
    """Files of an unknown type are refused by name rather than read as text."""
    path = tmp_path / f"docs{suffix}"
    path.write_text(_words(20))
    with pytest.raises(AtlasInputError, match=rf"unsupported corpus file type '{suffix}'"):
        _corpus(tokenizer, path, seq_len=4)


def test_non_utf8_text_is_read_with_replacement(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Latin-1 bytes in a text file become U+FFFD (with a warning) instead of aborting the run."""
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"the caf\xe9 of the \xff\xfe world and a " + _words(10).encode())
    with caplog.at_level(logging.WARNING, logger="pipeline.core.corpus"):
        frame = _corpus(tokenizer, path, seq_len=4, n_sequences=100)
    assert "not valid UTF-8" in caplog.text
    tokens = [t for seq in frame["tokens"].to_list() for t in seq]
    assert tokens[:3] == ["the", "[UNK]", "[UNK]"]  # "caf" and the replacement character are unknown words
    assert "of" in tokens


# --- sampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("top_k", 0, "top_k must be at least 1, got 0"),
        ("batch_size", 0, "batch_size must be at least 1, got 0"),
        ("quantile_bins", -2, "quantile_bins must be at least 1, got -2"),
        ("random_k", -1, "random_k must not be negative, got -1"),
        ("per_quantile", -1, "per_quantile must not be negative, got -1"),
    ],
)
def test_sampling_spec_validation(field: str, value: int, message: str) -> None:
    """Impossible sampling settings are caught before any model runs."""
    with pytest.raises(AtlasInputError, match=message):
        SamplingSpec(**{field: value}).validate()
    SamplingSpec(random_k=0, per_quantile=0).validate()  # zero random/quantile samples is allowed
