"""Smoke test of the capture benchmark's measurement functions on a tiny random GPT-2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bench.capture import Memory, Throughput, input_batches, measure_throughput, memory_verdict
from pipeline.core.models import ModelIdentity, SubjectModel
from pipeline.core.records import SamplingSpec


def tiny_subject() -> SubjectModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=80)
    model = GPT2LMHeadModel(config).eval()
    return SubjectModel(model=model, tokenizer=None, identity=ModelIdentity("tiny", "0"), path=Path("."))


def test_input_batches_prepend_prefix_to_every_batch() -> None:
    ids = np.arange(5 * 4, dtype=np.int64).reshape(5, 4)
    batches = input_batches(ids, [99], batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 5), (2, 5), (1, 5)]
    assert all((b[:, 0] == 99).all() for b in batches)
    assert torch.equal(torch.cat([b[:, 1:] for b in batches]), torch.as_tensor(ids))


def test_measure_throughput_on_tiny_gpt2() -> None:
    ids = np.random.default_rng(0).integers(0, 100, size=(6, 8), dtype=np.int64)
    result = measure_throughput(tiny_subject(), ids, SamplingSpec(batch_size=4), prefix=[0], reps=2)
    assert isinstance(result, Throughput) and result.n_tokens == 6 * 8
    summary = result.summary()
    assert len(result.bare_s) == len(result.capture_s) == 2
    assert summary["bare_tokens_per_s"] > 0 and summary["capture_tokens_per_s"] > 0 and summary["ratio"] > 0


def test_measure_throughput_reports_the_directions_captured() -> None:
    """A gated model is timed capturing both directions; --positive-only adds the one-direction time."""
    from tiny_models import build_signed_model, build_signed_tokenizer

    model = build_signed_model(build_signed_tokenizer())
    subject = SubjectModel(model=model, tokenizer=None, identity=ModelIdentity("signed", "0"), path=Path("."))
    ids = np.random.default_rng(0).integers(0, 50, size=(6, 8), dtype=np.int64)
    result = measure_throughput(subject, ids, SamplingSpec(batch_size=4), prefix=[], reps=2, positive_only=True)
    summary = result.summary()
    assert result.negative_captured and len(result.positive_only_s) == 2
    assert summary["positive_only_ratio"] > 0
    gpt2 = measure_throughput(tiny_subject(), ids, SamplingSpec(batch_size=4), prefix=[0], reps=1)
    assert not gpt2.negative_captured and "positive_only_ratio" not in gpt2.summary()


def test_memory_verdict_allows_only_corpus_growth_plus_tolerance() -> None:
    small = Memory(64, 64, 64 * 64 * 8, 1000, 2000, 1500, True, 1.0)
    flat = Memory(256, 64, 256 * 64 * 8, 1000, 2010, 1500, True, 4.0)
    grown = Memory(256, 64, 256 * 64 * 8, 1000, 9000, 1500, True, 4.0)
    assert memory_verdict(small, flat, tolerance_kib=16)["within"]
    assert not memory_verdict(small, grown, tolerance_kib=16)["within"]
