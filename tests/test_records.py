"""The streaming accumulator against brute force on synthetic activations: it must find the
exact top-k (ties by lower sequence id), exact statistics, and samples that do not depend on how
the corpus was batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.records import LayerAccumulator, SamplingSpec, _quantile_positions

N_SEQ, T, N = 37, 6, 5


def _acts(seed: int = 0, ties: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(N_SEQ, T, N, generator=gen)
    if ties:  # quantized values make equal sequence maxima common
        acts = torch.round(acts * 2) / 2
    acts[:, :, 4] = 0.0  # a dead neuron
    return acts


def _stream(acts: torch.Tensor, spec: SamplingSpec, batch: int) -> object:
    acc = LayerAccumulator(0, N, acts.shape[0], T, spec, torch.device("cpu"))
    for lo in range(0, acts.shape[0], batch):
        chunk = acts[lo : lo + batch]
        acc.update(chunk, torch.arange(lo, lo + chunk.shape[0]))
    return acc.finalize()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("batch", [1, 4, 37])
def test_top_k_matches_brute_force(ties: bool, batch: int) -> None:
    acts = _acts(ties=ties)
    spec = SamplingSpec(top_k=7, random_k=5, quantile_bins=2, per_quantile=2)
    rec = _stream(acts, spec, batch)
    seq_max = acts.amax(dim=1).numpy()
    for n in range(N):
        expected = sorted(range(N_SEQ), key=lambda s: (-seq_max[s, n], s))[:7]
        assert rec.top.ids[n].tolist() == expected
        np.testing.assert_array_equal(rec.top.max[n], seq_max[expected, n])
        np.testing.assert_array_equal(rec.top.acts[n], acts[expected, :, n].numpy())


@pytest.mark.parametrize("batch", [1, 5, 37])
def test_statistics_match_numpy(batch: int) -> None:
    acts = _acts(1)
    rec = _stream(acts, SamplingSpec(), batch)
    flat = acts.reshape(-1, N).double().numpy()
    np.testing.assert_allclose(rec.mean, flat.mean(0), atol=1e-6)  # per-batch moments are float32
    np.testing.assert_allclose(rec.variance, flat.var(0), rtol=1e-5)
    np.testing.assert_allclose(rec.max, flat.max(0).astype(np.float32))
    np.testing.assert_allclose(rec.nonzero_frac, (flat != 0).mean(0))
    np.testing.assert_allclose(rec.positive_frac, (flat > 0).mean(0))
    assert rec.n_tokens == N_SEQ * T


def test_random_sample_is_without_replacement_and_holds_true_activations() -> None:
    acts = _acts(2)
    rec = _stream(acts, SamplingSpec(top_k=3, random_k=10, quantile_bins=3, per_quantile=2), batch=4)
    for n in range(N):
        ids = rec.random.ids[n].tolist()
        assert len(ids) == len(set(ids)) == 10
        np.testing.assert_array_equal(rec.random.acts[n], acts[ids, :, n].numpy())
        np.testing.assert_array_equal(rec.random.max[n], acts[ids, :, n].amax(dim=1).numpy())
    # neurons draw their own samples
    assert len({tuple(r) for r in rec.random.ids.tolist()}) > 1


def test_random_sample_is_uniform() -> None:
    """Over many seeds every sequence is drawn about equally often (chi-square-free bound check)."""
    acts = _acts(3)
    counts = np.zeros(N_SEQ)
    for seed in range(200):
        rec = _stream(acts, SamplingSpec(top_k=1, random_k=5, quantile_bins=1, per_quantile=0, seed=seed), batch=8)
        np.add.at(counts, rec.random.ids.reshape(-1), 1)
    expected = 200 * N * 5 / N_SEQ  # ~135 per sequence
    assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected


def test_quantile_samples_cover_the_activation_range() -> None:
    res_max = np.array([[5.0, 1.0, 3.0, 0.0, 4.0, 2.0, 7.0, 6.0]])  # reservoir order = random-key order
    pos, bins = _quantile_positions(res_max, bins=2, per_bin=2)
    # low bin (ranks 0-3: values 0,1,2,3) -> first two in reservoir order: 1.0 (pos 1), 3.0 (pos 2)
    # high bin (values 4,5,6,7) -> 5.0 (pos 0), 4.0 (pos 4)
    assert sorted(zip(bins[0].tolist(), pos[0].tolist(), strict=False)) == [(0, 1), (0, 2), (1, 0), (1, 4)]


def test_fewer_sequences_than_k_keeps_what_exists() -> None:
    acts = _acts(4)[:3]
    acc = LayerAccumulator(0, N, 3, T, SamplingSpec(top_k=20, random_k=20), torch.device("cpu"))
    acc.update(acts, torch.arange(3))
    rec = acc.finalize()
    assert rec.top.ids.shape == (N, 3) and rec.random.ids.shape == (N, 3)
    assert (rec.top.ids >= 0).all()
