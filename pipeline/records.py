"""Streaming activation records: one pass over the corpus, memory O(neurons x k), never O(corpus).

Per neuron and layer we keep the top-k sequences by max activation (ties: lower sequence id
first), a uniform random sample (bottom-k of per-(sequence, neuron) random keys, so each neuron
gets its own sample), quantile samples drawn by activation level from a larger reservoir of the
same kind, and running mean/variance (Chan's parallel merge in float64)/max/nonzero counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from pipeline.errors import AtlasInputError
from pipeline.mlp import check_layers, mlp_capture, mlp_projections, neuron_count, run_until_captured
from pipeline.models import SubjectModel


@dataclass(frozen=True)
class SamplingSpec:
    top_k: int = 20
    random_k: int = 20
    quantile_bins: int = 4
    per_quantile: int = 5
    batch_size: int = 16
    seed: int = 0

    @property
    def reservoir_size(self) -> int:
        """Random candidates kept per neuron: enough to stratify quantile samples from."""
        return max(self.random_k, 2 * self.quantile_bins * self.per_quantile, 1)

    def validate(self) -> None:
        for name in ("top_k", "batch_size", "quantile_bins"):
            if getattr(self, name) < 1:
                raise AtlasInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("random_k", "per_quantile"):
            if getattr(self, name) < 0:
                raise AtlasInputError(f"{name} must not be negative, got {getattr(self, name)}")


@dataclass
class LayerRecords:
    """Finished records of one layer, as numpy arrays with neurons on the first axis."""

    layer: int
    n_tokens: int
    max: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    nonzero_frac: np.ndarray
    positive_frac: np.ndarray
    top_ids: np.ndarray  # [N, k] sequence ids, best first
    top_max: np.ndarray
    top_acts: np.ndarray  # [N, k, T]
    random_ids: np.ndarray
    random_max: np.ndarray
    random_acts: np.ndarray
    quantile_ids: np.ndarray
    quantile_bin: np.ndarray  # [N, q] bin of each quantile sample, 0 = lowest activations
    quantile_max: np.ndarray
    quantile_acts: np.ndarray


class _Kept:
    """The best k of a stream per neuron, by key. Keys, ids and maxes stay sorted (small arrays);
    activations [N, k, T] live in a slot pool that is never permuted: a merge writes only the
    entrants' activations into the slots of the evicted, so a batch costs O(entrants x T)."""

    def __init__(self, n: int, k: int, seq_len: int, fill: float, descending: bool, device: torch.device):
        f32 = dict(device=device, dtype=torch.float32)
        self.k, self.descending = k, descending
        self.keys = torch.full((n, k), fill, **f32)
        self.ids = torch.full((n, k), -1, device=device, dtype=torch.int64)
        self.maxes = torch.full((n, k), -torch.inf, **f32)
        self.slots = torch.arange(k, device=device).repeat(n, 1)  # rank -> slot in `pool`
        self.pool = torch.zeros((n * k, seq_len), **f32)

    def merge(self, new_keys: torch.Tensor, new_ids: torch.Tensor, new_max: torch.Tensor, acts: torch.Tensor) -> None:
        """new_*: [N, B]; acts: [B, T, N]. Stable sort over [kept..., new...] keeps ties in sequence-id
        order, because kept entries are ordered and every new sequence id exceeds every kept one."""
        k = self.k
        if k == 0:
            return
        worst = self.keys[:, -1:]
        enters = (new_keys > worst) if self.descending else (new_keys < worst)
        rows = enters.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        cand = torch.cat([self.keys[rows], new_keys[rows]], dim=1)
        order = torch.sort(cand, dim=1, descending=self.descending, stable=True).indices[:, :k]
        ids = torch.cat([self.ids[rows], new_ids.expand(rows.numel(), -1)], dim=1)
        maxes = torch.cat([self.maxes[rows], new_max[rows]], dim=1)
        kept_slots = self.slots[rows]
        is_new = order >= k
        survives = torch.zeros_like(kept_slots, dtype=torch.bool).scatter_(1, order.clamp(max=k - 1), ~is_new)
        # Each row evicts exactly as many kept entries as it admits; row-major order pairs them up.
        freed = kept_slots[~survives]
        slots = kept_slots.gather(1, order.clamp(max=k - 1))
        slots[is_new] = freed
        row_of, rank_of = is_new.nonzero(as_tuple=True)
        neuron = rows[row_of]
        self.pool[neuron * k + freed] = acts[order[row_of, rank_of] - k, :, neuron]
        self.keys[rows] = cand.gather(1, order)
        self.ids[rows] = ids.gather(1, order)
        self.maxes[rows] = maxes.gather(1, order)
        self.slots[rows] = slots

    def activations(self, count: int) -> torch.Tensor:
        """[N, count, T] activations of the best `count`, best first."""
        n = self.keys.shape[0]
        flat = torch.arange(n, device=self.pool.device).unsqueeze(1) * self.k + self.slots[:, :count]
        return self.pool[flat]


class LayerAccumulator:
    """Per-layer streaming state; `update` with each batch, `finalize` once."""

    def __init__(self, layer: int, n_neurons: int, seq_len: int, spec: SamplingSpec, device: torch.device):
        self.layer, self.spec = layer, spec
        n = n_neurons
        self.top = _Kept(n, spec.top_k, seq_len, -torch.inf, descending=True, device=device)
        # Random keys lie in [0, 1): the bottom-k of them is a uniform sample without replacement.
        self.reservoir = _Kept(n, spec.reservoir_size, seq_len, 2.0, descending=False, device=device)
        self.count = 0
        self.mean = torch.zeros(n, device=device, dtype=torch.float64)
        self.m2 = torch.zeros(n, device=device, dtype=torch.float64)
        self.max = torch.full((n,), -torch.inf, device=device, dtype=torch.float32)
        self.nonzero = torch.zeros(n, device=device, dtype=torch.int64)
        self.positive = torch.zeros(n, device=device, dtype=torch.int64)
        self.generator = torch.Generator(device=device).manual_seed(spec.seed * 1_000_003 + layer)

    @torch.inference_mode()
    def update(self, acts: torch.Tensor, seq_ids: torch.Tensor) -> None:
        """acts: [B, T, N] float32 activations of sequences `seq_ids` (increasing across calls)."""
        b, t, n = acts.shape
        flat = acts.reshape(b * t, n)
        mean_b = flat.mean(dim=0)
        if not bool(torch.isfinite(mean_b).all()) and not bool(torch.isfinite(acts).all()):
            raise AtlasInputError(
                f"layer {self.layer} produced NaN/inf activations in sequences"
                f" {int(seq_ids[0])}..{int(seq_ids[-1])} (fp16 overflow?): use dtype float32 or bfloat16"
            )
        seq_max = acts.amax(dim=1).T.contiguous()  # [N, B]
        ids = seq_ids.view(1, b)
        self.top.merge(seq_max, ids, seq_max, acts)
        keys = torch.rand((n, b), generator=self.generator, device=acts.device)
        self.reservoir.merge(keys, ids, seq_max, acts)

        var_b = (flat - mean_b).square().mean(dim=0)  # two-pass: torch.var_mean is ~4x slower on CPU
        n_b, total = b * t, self.count + b * t
        delta = mean_b.double() - self.mean
        self.mean += delta * (n_b / total)
        self.m2 += var_b.double() * n_b + delta.square() * (self.count * n_b / total)
        self.count = total
        self.max = torch.maximum(self.max, seq_max.amax(dim=1))
        self.nonzero += torch.count_nonzero(flat, dim=0)
        self.positive += (flat > 0).sum(dim=0)

    def finalize(self) -> LayerRecords:
        if self.count == 0:
            raise AtlasInputError("no sequences were processed")
        top_n = int((self.top.ids[0] >= 0).sum())
        res_n = int((self.reservoir.ids[0] >= 0).sum())
        np_ = lambda x: x.cpu().numpy()  # noqa: E731
        res_ids, res_max, res_acts = (
            np_(self.reservoir.ids[:, :res_n]),
            np_(self.reservoir.maxes[:, :res_n]),
            np_(self.reservoir.activations(res_n)),
        )
        rand_n = min(self.spec.random_k, res_n)
        q_pos, q_bin = _quantile_positions(res_max, self.spec.quantile_bins, self.spec.per_quantile)
        return LayerRecords(
            layer=self.layer,
            n_tokens=self.count,
            max=np_(self.max),
            mean=np_(self.mean),
            variance=np_(self.m2 / self.count),
            nonzero_frac=np_(self.nonzero.double() / self.count),
            positive_frac=np_(self.positive.double() / self.count),
            top_ids=np_(self.top.ids[:, :top_n]),
            top_max=np_(self.top.maxes[:, :top_n]),
            top_acts=np_(self.top.activations(top_n)),
            random_ids=res_ids[:, :rand_n],
            random_max=res_max[:, :rand_n],
            random_acts=res_acts[:, :rand_n],
            quantile_ids=np.take_along_axis(res_ids, q_pos, axis=1),
            quantile_bin=q_bin,
            quantile_max=np.take_along_axis(res_max, q_pos, axis=1),
            quantile_acts=np.take_along_axis(res_acts, q_pos[..., None], axis=1),
        )


def _quantile_positions(res_max: np.ndarray, bins: int, per_bin: int) -> tuple[np.ndarray, np.ndarray]:
    """Reservoir positions of the quantile samples: bins by rank of max activation, and within a
    bin the entries with the smallest random keys (reservoir order), so the draw stays uniform."""
    n, s = res_max.shape
    if s == 0 or per_bin == 0:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.int64)
    rank = np.argsort(np.argsort(res_max, axis=1, kind="stable"), axis=1, kind="stable")
    edges = np.cumsum([len(part) for part in np.array_split(np.arange(s), min(bins, s))])
    bin_of = np.searchsorted(edges, rank, side="right")  # [N, S], bin of each reservoir entry
    positions, labels = [], []
    for q in range(len(edges)):
        mask = bin_of == q
        take = mask & (np.cumsum(mask, axis=1) <= per_bin)
        count = int(take[0].sum())
        positions.append(np.nonzero(take)[1].reshape(n, count))
        labels.append(np.full((n, count), q))
    return np.concatenate(positions, axis=1), np.concatenate(labels, axis=1)


def collect_activation_records(
    subject: SubjectModel,
    token_ids: np.ndarray,
    layers: Sequence[int],
    spec: SamplingSpec,
    prefix: Sequence[int] = (),
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[int, LayerRecords]:
    """One forward pass per batch for all requested layers, stopping after the deepest of them."""
    spec.validate()
    model = subject.model
    layers = check_layers(model, list(layers))
    if token_ids.ndim != 2 or token_ids.shape[0] == 0:
        raise AtlasInputError("the corpus has no sequences")
    n_seq, seq_len = token_ids.shape
    device = next(model.parameters()).device
    projections = mlp_projections(model)
    accs = {layer: LayerAccumulator(layer, neuron_count(projections[layer]), seq_len, spec, device) for layer in layers}
    prefix_t = torch.tensor(list(prefix), dtype=torch.long, device=device)
    ids_all = torch.as_tensor(token_ids, dtype=torch.long)
    start = time.monotonic()
    with torch.inference_mode(), mlp_capture(model, layers) as store:
        for lo in range(0, n_seq, spec.batch_size):
            batch = ids_all[lo : lo + spec.batch_size].to(device)
            inputs = torch.cat([prefix_t.expand(batch.shape[0], -1), batch], dim=1)
            run_until_captured(model, inputs)
            seq_ids = torch.arange(lo, lo + batch.shape[0], device=device)
            for layer in layers:
                acts = store.pop(layer).reshape(*inputs.shape, -1)  # OPT flattens batch x sequence
                acts = acts[:, len(prefix) :, :].float()
                accs[layer].update(acts, seq_ids)
            if progress is not None:
                progress(min(lo + spec.batch_size, n_seq), n_seq, time.monotonic() - start)
    return {layer: acc.finalize() for layer, acc in accs.items()}


def _nested(
    neurons: np.ndarray,
    ids: np.ndarray,
    maxes: np.ndarray,
    acts: np.ndarray,
    name: str,
    extra: dict[str, np.ndarray] | None = None,
) -> pl.DataFrame:
    """[N, k] arrays -> one row per neuron with a list of structs (rank, seq_id, max_act, acts)."""
    n, k = ids.shape
    flat = pl.DataFrame(
        {
            "neuron": np.repeat(neurons, k).astype(np.int32),
            "rank": np.tile(np.arange(k, dtype=np.int16), n),
            "seq_id": ids.reshape(-1).astype(np.int32),
            "max_act": maxes.reshape(-1).astype(np.float32),
            **{key: v.reshape(-1) for key, v in (extra or {}).items()},
            "acts": acts.reshape(n * k, -1).astype(np.float32),
        }
    ).with_columns(pl.col("acts").cast(pl.List(pl.Float32)))
    fields = [c for c in flat.columns if c != "neuron"]
    nested = flat.group_by("neuron", maintain_order=True).agg(pl.struct(fields).alias(name))
    if k == 0:
        empty = pl.Series(name, [[] for _ in range(n)], dtype=nested.schema[name])
        return pl.DataFrame({"neuron": neurons.astype(np.int32)}).with_columns(empty)
    return nested


def records_frame(rec: LayerRecords) -> pl.DataFrame:
    """One row per neuron: statistics plus the top, random and quantile records."""
    n = rec.max.shape[0]
    neurons = np.arange(n)
    stats = pl.DataFrame(
        {
            "layer": np.full(n, rec.layer, dtype=np.int32),
            "neuron": neurons.astype(np.int32),
            "n_tokens": np.full(n, rec.n_tokens, dtype=np.int64),
            "max_activation": rec.max.astype(np.float32),
            "mean_activation": rec.mean,
            "variance": rec.variance,
            "nonzero_frac": rec.nonzero_frac,
            "positive_frac": rec.positive_frac,
        }
    )
    parts = [
        _nested(neurons, rec.top_ids, rec.top_max, rec.top_acts, "top"),
        _nested(neurons, rec.random_ids, rec.random_max, rec.random_acts, "random"),
        _nested(
            neurons,
            rec.quantile_ids,
            rec.quantile_max,
            rec.quantile_acts,
            "quantile",
            {"bin": rec.quantile_bin.astype(np.int16)},
        ),
    ]
    for part in parts:
        stats = stats.join(part, on="neuron", how="left", maintain_order="left")
    return stats
