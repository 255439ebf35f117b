"""Odd Unicode end to end: a byte-level BPE tokenizer (as GPT-2 and Llama use) on text with emoji,
ZWJ sequences, combining marks, right-to-left script, NUL and line separators, plus invalid UTF-8
bytes, through the real Dagster stages into DuckDB, and into the neuron viewer's data file."""

from __future__ import annotations

from pathlib import Path

from conftest import query, run_stages
from tiny_models import build_digit_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from assets.config import SamplingConfig
from assets.resources import CorpusResource, SubjectModelResource
from pipeline.infra.viewer import LayerData, NeuronPage, UnitView, read_data, render_data

ODD = [
    "the brain 🧠 and the family 👨\u200d👩\u200d👧 of 7 ",
    "cafe\u0301 nai\u0308ve 3 ",
    "שלום עולם 42 مرحبا ",
    "null\x00byte 9 ",
    "line\u2028separator\u2029para 5 ",
    "漢字かな交じり 8 ",
]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    backend.train_from_iterator(["the of and a to in 0 1 2 3 4 5 6 7 8 9"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def test_odd_unicode_and_bad_bytes_flow_through_every_stage(tmp_path: Path) -> None:
    tokenizer = byte_level_tokenizer()
    model_dir = tmp_path / "model"
    build_digit_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "odd.txt"
    raw = ("".join(ODD) * 6).encode() + b"bad \xff\xfe bytes 1 " + "".join(ODD).encode()
    corpus.write_bytes(raw)
    n_chunks = len(tokenizer(raw.decode(errors="replace"))["input_ids"]) // 24  # take every chunk
    database = tmp_path / "neuron_atlas.duckdb"
    result = run_stages(
        database,
        n_layers=2,
        layers=(0, 1),
        subject=SubjectModelResource(model=str(model_dir)),
        corpus=CorpusResource(source=str(corpus), seq_len=24, n_sequences=n_chunks, seed=0),
        sampling=SamplingConfig(top_k=4, random_k=4, quantile_bins=2, per_quantile=1),
    )
    assert result.success
    q = query(database)
    rows = q("select token_ids, tokens, text from atlas.corpus_tokens order by seq_id")
    assert rows and all(len(ids) == len(tokens) == 24 for ids, tokens, _ in rows)
    text = "".join(r[2] for r in rows)
    for piece in ("🧠", "👨\u200d👩\u200d👧", "e\u0301", "שלום", "مرحبا", "\x00", "\u2028", "漢字", "\ufffd bytes"):
        assert piece in text, piece  # stored intact in DuckDB, NUL included
    for _ids, tokens, seq_text in rows:
        # A token holding part of a multi-byte character shows U+FFFD; whole ones concatenate back.
        joined = "".join(tokens)
        assert joined == seq_text or "\ufffd" in joined
    per_layer = q("select layer, count(*) from atlas.unit_examples group by layer order by layer")
    assert per_layer == [(0, 16), (1, 16)]


def test_odd_unicode_keeps_every_code_point_through_the_viewer_data() -> None:
    """The viewer's data file holds tokens and explanations exactly (its escapes are JSON's), NUL,
    line separators, combining marks, ZWJ sequences and U+FFFD included; the page shows them as
    text (test_viewer.py renders them in Chromium)."""
    tokens = [*ODD, "\ufffd", "\x00", ""]
    unit = UnitView(
        "+",
        1.0,
        [{"token": t, "mean_activation": 1.0, "count": 2} for t in tokens],
        [
            {
                "record_kind": "top",
                "split": "train",
                "split_rank": 0,
                "seq_id": 5,
                "tokens": tokens,
                "acts": [1.0] * len(tokens),
            }
        ],
        [{"kind": "llm", "sample_index": 0, "explanation": "".join(ODD), "best": True}],
        [],
    )
    data = read_data(render_data(LayerData("m", "r", 0, 1, [NeuronPage(1, [unit])])))
    assert [data["vocab"][i] for i in data["seqs"]["5"]] == tokens
    (shown,) = data["neurons"][0]["units"]
    assert [t["token"] for t in shown["top_tokens"]] == tokens
    assert shown["explanations"][0]["explanation"] == "".join(ODD)
    # The tooltips' repr names the invisible characters (ZWJ, NUL, the line separators).
    reprs = {data["vocab"][int(i)]: r for i, r in data["reprs"].items()}
    assert "\\u200d" in reprs[ODD[0]] and reprs["\x00"] == "'\\x00'" and "\\u2028" in reprs[ODD[4]]
