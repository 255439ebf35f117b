"""The streaming accumulator against brute force on synthetic activations: it must find the
exact top-k by max and bottom-k by min (ties by lower sequence id), exact statistics, and random
and quantile samples that hold true activations and do not depend on how the corpus was batched."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.core.errors import AtlasInputError
from pipeline.core.records import (
    LayerAccumulator,
    LayerRecords,
    SamplingSpec,
    _quantile_positions,
    dequantize,
    quantize,
    records_frame,
)

N_SEQ, T, N = 37, 6, 5


def _acts(seed: int = 0, ties: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(N_SEQ, T, N, generator=gen)
    if ties:  # quantized values make equal sequence maxima and minima common
        acts = torch.round(acts * 2) / 2
    acts[:, :, 4] = 0.0  # a dead neuron
    return acts


def _stream(acts: torch.Tensor, spec: SamplingSpec, batch: int, negative: bool = True) -> LayerRecords:
    acc = LayerAccumulator(0, N, acts.shape[0], T, spec, torch.device("cpu"), negative=negative)
    for lo in range(0, acts.shape[0], batch):
        chunk = acts[lo : lo + batch]
        acc.update(chunk, torch.arange(lo, lo + chunk.shape[0]))
    return acc.finalize()


def _brute_force(key: np.ndarray, k: int) -> list[int]:
    """Sequence ids by key ascending, ties to the lower id."""
    return sorted(range(len(key)), key=lambda s: (key[s], s))[:k]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("batch", [1, 4, 37])
def test_top_and_bottom_match_brute_force(ties: bool, batch: int) -> None:
    acts = _acts(ties=ties)
    spec = SamplingSpec(top_k=7, random_k=5, quantile_bins=2, per_quantile=2)
    rec = _stream(acts, spec, batch)
    seq_max, seq_min = acts.amax(dim=1).numpy(), acts.amin(dim=1).numpy()
    for n in range(N):
        top, bottom = _brute_force(-seq_max[:, n], 7), _brute_force(seq_min[:, n], 7)
        assert rec.top.ids[n].tolist() == top
        assert rec.bottom.ids[n].tolist() == bottom
        for records, ids in ((rec.top, top), (rec.bottom, bottom)):
            np.testing.assert_array_equal(records.max[n], seq_max[ids, n])
            np.testing.assert_array_equal(records.min[n], seq_min[ids, n])
            np.testing.assert_array_equal(records.acts[n], acts[ids, :, n].numpy())
    if ties:
        # Negative control: with ties broken towards the higher sequence id the expected lists differ
        # for some neurons, and the accumulator's lists must not match those.
        for key, records in ((-seq_max, rec.top), (seq_min, rec.bottom)):
            flipped = {n: sorted(range(N_SEQ), key=lambda s, n=n: (key[s, n], -s))[:7] for n in range(4)}
            differing = [n for n in range(4) if flipped[n] != _brute_force(key[:, n], 7)]
            assert differing
            assert all(records.ids[n].tolist() != flipped[n] for n in differing)


@pytest.mark.parametrize("batch", [1, 5, 37])
def test_statistics_match_numpy(batch: int) -> None:
    acts = _acts(1)
    acts[:3, :2, 1] = 0.0  # exact zeros ...
    acts[3:5, :2, 2] = -0.0  # ... and negative zeros count as neither sign
    rec = _stream(acts, SamplingSpec(), batch)
    flat = acts.reshape(-1, N).double().numpy()
    np.testing.assert_allclose(rec.mean, flat.mean(0), atol=1e-6)  # per-batch moments are float32
    np.testing.assert_allclose(rec.variance, flat.var(0), rtol=1e-5)
    np.testing.assert_array_equal(rec.max, flat.max(0).astype(np.float32))
    np.testing.assert_array_equal(rec.min, flat.min(0).astype(np.float32))
    np.testing.assert_array_equal(rec.nonzero_frac, (flat != 0).mean(0))
    np.testing.assert_array_equal(rec.positive_frac, (flat > 0).mean(0))
    np.testing.assert_array_equal(rec.negative_frac, (flat < 0).mean(0))
    assert rec.n_tokens == N_SEQ * T


def test_variance_stays_accurate_when_the_mean_is_far_from_zero() -> None:
    acts = _acts(2) * 0.1 + 10.0  # an always-on neuron: mean 100x its spread
    rec = _stream(acts, SamplingSpec(), batch=8)
    np.testing.assert_allclose(rec.variance[:4], acts.reshape(-1, N).double().numpy().var(0)[:4], rtol=1e-5)


def test_nan_activations_are_refused_naming_the_sequences() -> None:
    acts = _acts(3)
    acts[9, 2, 1] = float("nan")
    with pytest.raises(AtlasInputError, match=r"layer 0 produced NaN/inf activations in sequences 8\.\.11"):
        _stream(acts, SamplingSpec(), batch=4)


def test_random_sample_is_without_replacement_and_holds_true_activations() -> None:
    acts = _acts(2)
    rec = _stream(acts, SamplingSpec(top_k=3, random_k=10, quantile_bins=3, per_quantile=2), batch=4)
    for n in range(N):
        ids = rec.random.ids[n].tolist()
        assert len(ids) == len(set(ids)) == 10
        np.testing.assert_array_equal(rec.random.acts[n], acts[ids, :, n].numpy())
        np.testing.assert_array_equal(rec.random.max[n], acts[ids, :, n].amax(dim=1).numpy())
        np.testing.assert_array_equal(rec.random.min[n], acts[ids, :, n].amin(dim=1).numpy())
    # neurons draw their own samples
    assert len({tuple(r) for r in rec.random.ids.tolist()}) > 1


def test_random_sample_does_not_depend_on_batching() -> None:
    acts = _acts(4)
    spec = SamplingSpec(top_k=3, random_k=6, quantile_bins=2, per_quantile=2, seed=7)
    runs = [_stream(acts, spec, batch) for batch in (1, 6, 37)]
    for rec in runs[1:]:
        for name in ("random", "quantile", "quantile_neg"):
            np.testing.assert_array_equal(getattr(rec, name).ids, getattr(runs[0], name).ids)
    assert not np.array_equal(_stream(acts, SamplingSpec(random_k=6, seed=8), 6).random.ids, runs[0].random.ids)


def test_random_sample_is_uniform_over_the_sequences_not_shown_as_top_or_bottom() -> None:
    """Over many seeds each neuron's sample never holds one of its top or bottom sequences, and
    every other sequence is drawn about equally often, in every position of the sample."""
    acts = _acts(3)
    shown = [{int(acts[:, :, n].amax(dim=1).argmax()), int(acts[:, :, n].amin(dim=1).argmin())} for n in range(N)]
    counts = np.zeros((N, N_SEQ))
    first = np.zeros((N, N_SEQ))
    for seed in range(200):
        rec = _stream(acts, SamplingSpec(top_k=1, random_k=5, quantile_bins=1, per_quantile=0, seed=seed), batch=8)
        for n in range(N):
            np.add.at(counts[n], rec.random.ids[n], 1)
            first[n, rec.random.ids[n, 0]] += 1
    for n in range(N):
        unseen = [s for s in range(N_SEQ) if s not in shown[n]]
        assert counts[n, sorted(shown[n])].sum() == 0
        expected = 200 * 5 / len(unseen)  # ~29 per sequence
        assert counts[n, unseen].min() > 0.4 * expected and counts[n, unseen].max() < 1.8 * expected
        assert first[n, unseen].max() < 4 * 200 / len(unseen)  # the sample's order is random too


def test_quantile_samples_cover_the_activation_range() -> None:
    res_max = np.array([[5.0, 1.0, 3.0, 0.0, 4.0, 2.0, 7.0, 6.0]])  # reservoir order = random order
    pos, bins = _quantile_positions(res_max, bins=2, per_bin=2)
    # low bin (ranks 0-3: values 0,1,2,3) -> first two in reservoir order: 1.0 (pos 1), 3.0 (pos 2)
    # high bin (values 4,5,6,7) -> 5.0 (pos 0), 4.0 (pos 4)
    assert sorted(zip(bins[0].tolist(), pos[0].tolist(), strict=False)) == [(0, 1), (0, 2), (1, 0), (1, 4)]


def test_negative_quantile_samples_are_binned_by_minimum() -> None:
    acts = _acts(5)
    rec = _stream(acts, SamplingSpec(top_k=2, random_k=4, quantile_bins=3, per_quantile=2), batch=5)
    for n in range(4):
        q = rec.quantile_neg
        ids = q.ids[n].tolist()
        assert len(ids) == len(set(ids)) == 6 and q.bin[n].tolist() == [0, 0, 1, 1, 2, 2]
        np.testing.assert_array_equal(q.acts[n], acts[ids, :, n].numpy())
        np.testing.assert_array_equal(q.min[n], acts[ids, :, n].amin(dim=1).numpy())
        # bin 0 is the least negative
        assert q.min[n][:2].min() >= q.min[n][2:4].max() and q.min[n][2:4].min() >= q.min[n][4:].max()


def test_off_switch_keeps_the_positive_direction_unchanged() -> None:
    acts = _acts(6)
    spec = SamplingSpec(top_k=4, random_k=4, quantile_bins=2, per_quantile=2)
    on, off = _stream(acts, spec, 5, negative=True), _stream(acts, spec, 5, negative=False)
    assert on.negative_captured and not off.negative_captured
    assert (
        off.bottom.ids.shape == (N, 0) and off.bottom.acts.shape == (N, 0, T) and off.quantile_neg.ids.shape == (N, 0)
    )
    np.testing.assert_array_equal(on.top.ids, off.top.ids)
    np.testing.assert_array_equal(on.top.acts, off.top.acts)
    np.testing.assert_array_equal(on.min, off.min)
    # The random sample leaves out what each direction shows: top records always, bottom ones when captured.
    for rec, shown in ((off, (off.top,)), (on, (on.top, on.bottom))):
        for n in range(N):
            assert not set(rec.random.ids[n].tolist()) & {i for s in shown for i in s.ids[n].tolist()}


def test_fewer_sequences_than_k_keeps_what_exists() -> None:
    acts = _acts(4)[:3]
    acc = LayerAccumulator(0, N, 3, T, SamplingSpec(top_k=20, random_k=20), torch.device("cpu"), negative=True)
    acc.update(acts, torch.arange(3))
    rec = acc.finalize()
    for records in (rec.top, rec.bottom, rec.random):
        assert records.ids.shape == (N, 3)
        assert sorted(records.ids[0].tolist()) == [0, 1, 2]
    seq_min = acts.amin(dim=1).numpy()
    assert rec.bottom.ids[1].tolist() == _brute_force(seq_min[:, 1], 3)
    assert rec.quantile.ids.shape == rec.quantile_neg.ids.shape == (N, 3)  # 3 reservoir entries in 3 of 4 bins


def test_streaming_more_or_fewer_sequences_than_announced_is_an_error() -> None:
    acts = _acts(7)
    acc = LayerAccumulator(0, N, 8, T, SamplingSpec(), torch.device("cpu"))
    acc.update(acts[:6], torch.arange(6))
    with pytest.raises(AtlasInputError, match="6 sequences were streamed, 8 were announced"):
        acc.finalize()
    with pytest.raises(AtlasInputError, match="more than the announced 8 sequences"):
        acc.update(acts[6:9], torch.arange(6, 9))


def test_records_frame_holds_both_directions() -> None:
    acts = _acts(8)
    spec = SamplingSpec(top_k=3, random_k=3, quantile_bins=2, per_quantile=1)
    on, off = records_frame(_stream(acts, spec, 10)), records_frame(_stream(acts, spec, 10, negative=False))
    assert on.columns == off.columns
    assert on.columns[:11] == [
        "layer",
        "neuron",
        "n_tokens",
        "max_activation",
        "mean_activation",
        "variance",
        "nonzero_frac",
        "positive_frac",
        "top",
        "random",
        "quantile",
    ]  # as before this change; what is new comes after
    assert on.columns[11:] == [
        "min_activation",
        "negative_frac",
        "negative_captured",
        "bottom",
        "quantile_neg",
        "sequences",
    ]
    assert [f.name for f in on.schema["bottom"].inner.fields] == ["rank", "seq_id"]
    assert [f.name for f in on.schema["quantile_neg"].inner.fields] == ["rank", "seq_id", "bin"]
    assert [f.name for f in on.schema["sequences"].inner.fields] == ["seq_id", "max_act", "min_act", "codes"]
    assert on["negative_captured"].to_list() == [True] * N and off["negative_captured"].to_list() == [False] * N
    assert on["bottom"].list.len().to_list() == [3] * N and off["bottom"].list.len().to_list() == [0] * N
    assert off.schema["bottom"] == on.schema["bottom"]
    row = on.filter(pl.col("neuron") == 0).row(0, named=True)
    seq_min = acts.amin(dim=1).numpy()[:, 0]
    best = _brute_force(seq_min, 1)[0]
    assert row["bottom"][0]["seq_id"] == best
    # Each listed sequence once in `sequences`, in seq_id order, and no other.
    listed = {r["seq_id"] for name in ("top", "random", "quantile", "bottom", "quantile_neg") for r in row[name]}
    assert [s["seq_id"] for s in row["sequences"]] == sorted(listed)
    assert len(listed) < sum(len(row[name]) for name in ("top", "random", "quantile", "bottom", "quantile_neg"))
    (first,) = [s for s in row["sequences"] if s["seq_id"] == best]
    assert first["min_act"] == pytest.approx(float(seq_min[best]))
    # Stored as 8-bit codes on the sequence's [min, max]: both ends exact, the rest within half a step.
    true = acts[best, :, 0].numpy().astype(np.float64)
    lo, hi = float(first["min_act"]), float(first["max_act"])
    assert (lo, hi) == (float(np.float32(true.min())), float(np.float32(true.max())))
    decoded = dequantize(np.asarray(first["codes"]), lo, hi).astype(np.float64)
    assert decoded.min() == lo and decoded.max() == hi
    assert np.abs(decoded - true).max() <= (hi - lo) / 510 * (1 + 1e-6)
    assert np.abs(decoded - true).max() > 0  # lossy: the bound is the one that matters


def test_codes_hand_values() -> None:
    """8-bit codes on [min, max]: code = round(255 * (a - min) / (max - min)), read back as
    min + code * (max - min) / 255; a constant record (max = min) is all code 0."""
    acts = np.array([[-1.0, 0.0, 0.5, 3.0], [2.0, 2.0, 2.0, 2.0]], dtype=np.float32)
    lo, hi = np.array([-1.0, 2.0], np.float32), np.array([3.0, 2.0], np.float32)
    codes = quantize(acts, lo, hi)
    assert codes.dtype == np.uint8 and codes.tolist() == [[0, 64, 96, 255], [0, 0, 0, 0]]  # 63.75, 95.625
    back = dequantize(codes, lo, hi)
    assert back.dtype == np.float32
    assert back[0].tolist() == pytest.approx([-1.0, -1.0 + 64 * 4 / 255, -1.0 + 96 * 4 / 255, 3.0])
    assert back[1].tolist() == [2.0] * 4
