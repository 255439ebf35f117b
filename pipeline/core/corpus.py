"""Corpus sources and their cutting into fixed-length token sequences.

The embedded default is a small offline sample that ships with Python (the pydoc topic help and
standard-library docstrings): enough to try the pipeline, not to draw conclusions from. Real runs
read a Hugging Face dataset (`hf:NAME[:CONFIG]`, needs the `datasets` extra) or local
text/JSONL/Parquet files.
"""

from __future__ import annotations

import ast
import json
import logging
import random
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.core.errors import AtlasInputError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
# Pure-Python standard-library modules whose docstrings join the embedded sample, in this order.
_DOCSTRING_MODULES = (
    "argparse",
    "calendar",
    "collections/__init__",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email/message",
    "fractions",
    "functools",
    "heapq",
    "http/client",
    "inspect",
    "json/__init__",
    "logging/__init__",
    "pathlib",
    "pickle",
    "random",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest/case",
    "urllib/parse",
    "uuid",
    "zipfile",
)
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


@dataclass(frozen=True)
class CorpusSpec:
    source: str = EMBEDDED
    text_field: str = "text"
    split: str = "train"
    seq_len: int = 64
    n_sequences: int = 256
    seed: int = 0

    def validate(self) -> None:
        if self.seq_len < 2:
            raise AtlasInputError(f"sequence length must be at least 2 tokens, got {self.seq_len}")
        if self.n_sequences < 1:
            raise AtlasInputError(f"number of sequences must be at least 1, got {self.n_sequences}")


def _embedded_texts() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in _DOCSTRING_MODULES:
        path = stdlib / f"{name}.py"
        if not path.exists():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef)))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                yield doc


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("%s is not valid UTF-8; undecodable bytes are replaced with U+FFFD", path)
        return raw.decode("utf-8-sig", errors="replace")


def _file_texts(path: Path, text_field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in _TEXT_SUFFIXES:
        yield _read_text(path)
    elif suffix == ".jsonl":
        for lineno, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AtlasInputError(f"{path}:{lineno} is not valid JSON: {exc.msg}") from exc
            if not isinstance(row, dict) or text_field not in row:
                raise AtlasInputError(f"{path}:{lineno} has no field {text_field!r}")
            if row[text_field] is not None:
                yield str(row[text_field])
    elif suffix == ".parquet":
        frame = pl.read_parquet(path)
        if text_field not in frame.columns:
            raise AtlasInputError(f"{path} has no column {text_field!r} (columns: {frame.columns})")
        yield from (str(t) for t in frame[text_field].drop_nulls())
    else:
        raise AtlasInputError(f"{path}: unsupported corpus file type {suffix!r} (use .txt, .jsonl, .parquet)")


def _local_files(source: str) -> list[Path]:
    files: list[Path] = []
    for part in source.split(","):
        part = part.strip()
        path = Path(part).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            # pathlib refuses absolute patterns: glob the part below the anchor ("/" or "") instead
            matches = (
                sorted(p for p in Path(path.anchor).glob(str(path.relative_to(path.anchor))) if p.is_file())
                if any(c in part for c in "*?[")
                else []
            )
            if not matches:
                raise AtlasInputError(f"corpus path {part!r} does not exist (or matches no file)")
            files += matches
    return files


def _hf_texts(source: str, split: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:
        raise AtlasInputError("a Hugging Face corpus needs the 'datasets' package: pip install '.[hf]'") from exc
    name, _, config = source.removeprefix("hf:").partition(":")
    try:
        stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as exc:
        raise AtlasInputError(f"cannot open Hugging Face dataset {name!r}: {exc}") from exc
    for row in stream:
        if text_field not in row:
            raise AtlasInputError(f"dataset {name!r} has no field {text_field!r} (fields: {list(row)})")
        if row[text_field] is not None:
            yield str(row[text_field])


def corpus_texts(spec: CorpusSpec) -> Iterator[str]:
    """Documents of the configured source, in a fixed order."""
    if spec.source == EMBEDDED:
        return _embedded_texts()
    if spec.source.startswith("hf:"):
        return _hf_texts(spec.source, spec.split, spec.text_field)
    files = _local_files(spec.source)
    return (text for f in files for text in _file_texts(f, spec.text_field))


def corpus_fingerprint(spec: CorpusSpec) -> str:
    """A short hash of what the corpus stage would read: the settings plus, for local files, their
    paths and contents (the embedded corpus: the Python version it ships with). A Hugging Face
    dataset is identified by name only (no hub access to resolve its revision)."""
    import hashlib
    import json
    import sys
    from dataclasses import asdict

    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    if spec.source == EMBEDDED:
        digest.update(sys.version.encode())
    elif not spec.source.startswith("hf:"):
        for path in _local_files(spec.source):
            digest.update(str(path.resolve()).encode())
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def prefix_ids(tokenizer: Any) -> list[int]:
    """Tokens put before every sequence (Gemma's BOS): context for the model, never a record token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    encoded = tokenizer("a").input_ids
    return [bos] if encoded and encoded[0] == bos else []


def _token_stream(tokenizer: Any, texts: Iterable[str], limit: int) -> list[int]:
    """Documents tokenized without special tokens, joined by EOS, until `limit` tokens."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text in texts:
        if not text.strip():
            continue
        if stream and eos is not None:
            stream.append(eos)
        stream.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if len(stream) >= limit:
            break
    return stream


def token_strings(tokenizer: Any, ids: Iterable[int]) -> dict[int, str]:
    """How each token reads on its own: what the explainer is shown."""
    unique = sorted(set(int(i) for i in ids))
    return dict(zip(unique, tokenizer.batch_decode([[i] for i in unique]), strict=True))


def tokenize_corpus(tokenizer: Any, spec: CorpusSpec, oversample: int = 8) -> pl.DataFrame:
    """`n_sequences` fixed-length sequences drawn (seeded) from the first `oversample`x of the corpus."""
    spec.validate()
    needed = spec.seq_len * spec.n_sequences
    stream = _token_stream(tokenizer, corpus_texts(spec), limit=needed * oversample)
    n_chunks = len(stream) // spec.seq_len
    if n_chunks == 0:
        what = "is empty" if not stream else f"has only {len(stream)} tokens"
        raise AtlasInputError(
            f"corpus {spec.source!r} {what}: at least one sequence of {spec.seq_len} tokens is needed"
        )
    if n_chunks > spec.n_sequences:
        chosen = sorted(random.Random(spec.seed).sample(range(n_chunks), spec.n_sequences))
    else:
        if n_chunks < spec.n_sequences:
            log.warning("corpus yields %d sequences, fewer than the %d asked for", n_chunks, spec.n_sequences)
        chosen = list(range(n_chunks))
    sequences = [stream[c * spec.seq_len : (c + 1) * spec.seq_len] for c in chosen]
    strings = token_strings(tokenizer, (i for seq in sequences for i in seq))
    return pl.DataFrame(
        {
            "seq_id": list(range(len(sequences))),
            "chunk_index": chosen,
            "token_ids": sequences,
            "tokens": [[strings[i] for i in seq] for seq in sequences],
            "text": tokenizer.batch_decode(sequences),
        },
        schema={
            "seq_id": pl.Int32,
            "chunk_index": pl.Int32,
            "token_ids": pl.List(pl.Int32),
            "tokens": pl.List(pl.String),
            "text": pl.String,
        },
    )
