"""Streaming activation records: one pass over the corpus, memory O(neurons x k), never O(corpus).

Per neuron and layer we keep, in one pass:
- the top-k sequences by max activation (ties: lower sequence id first);
- when the negative direction is captured, the bottom-k sequences by min activation (the most
  negative first; ties: lower sequence id first);
- a uniform random sample without replacement, per neuron (drawn up front, knowing the number of
  sequences), of the sequences that are not among its top (or bottom) records, so held-out random
  records never repeat what the explainer was shown; it comes from a larger reservoir of the same
  kind from which the quantile samples are drawn by activation level: by max for the positive
  direction, by -min for the negative one;
- running mean/variance (Chan's parallel merge in float64), max, min, and positive/negative counts.

In the warehouse each sequence of a neuron's records is stored once (`sequences`; the lists hold
rank, seq_id and bin), its activations as 8-bit codes on the sequence's own range: code c stands
for min_act + c * (max_act - min_act) / 255 (`quantize`, `dequantize`). Min and max stay exact
float32; every other activation is within (max_act - min_act) / 510 of the captured value, a
fiftieth of one 0-10 level of a top record. A gated neuron's 100 records (about 72 distinct
sequences at the defaults) take about 4.6 KB instead of 25.6 KB in float32.

Gated MLPs (`act(gate) * up`) fire both ways, so the negative direction defaults on for them and
off for ReLU/GELU MLPs (`SamplingSpec.negative`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from pipeline.core.errors import AtlasInputError
from pipeline.core.mlp import (
    check_layers,
    mlp_capture,
    mlp_is_gated,
    mlp_projections,
    neuron_count,
    run_until_captured,
)
from pipeline.core.models import SubjectModel

NEGATIVE_CHOICES = ("auto", "on", "off")
# Above this share of (sequence, neuron) pairs entering the pools in a batch, entrants are copied
# from a transposed batch ([B, N, T], one contiguous row each) rather than gathered with stride N.
_TRANSPOSE_ABOVE = 0.3


@dataclass(frozen=True)
class SamplingSpec:
    top_k: int = 20
    random_k: int = 20
    quantile_bins: int = 4
    per_quantile: int = 5
    batch_size: int = 16
    seed: int = 0
    negative: str = "auto"  # capture the negative direction: 'auto' = for gated MLPs only, 'on', 'off'

    def reservoir_size(self, negative: bool, n_sequences: int) -> int:
        """Random candidates kept per neuron: enough to stratify quantile samples from, and enough
        that `random_k` of them remain once the neuron's top (and bottom) sequences are left out.

        Of R uniform draws, about R * p are top or bottom sequences (p = their share of the corpus):
        R is the smallest size whose expected remainder stays `random_k` or more three standard
        deviations below its mean (all of a small corpus, so there it is certain); a shortfall
        leaves the random sample a little smaller, never holding a top or bottom sequence."""
        need = max(2 * self.quantile_bins * self.per_quantile, 1)
        shown = min(self.top_k * (2 if negative else 1), n_sequences)
        if self.random_k == 0 or shown >= n_sequences:
            return need
        p = shown / n_sequences
        size = self.random_k
        while size < n_sequences and size * (1 - p) - 3 * math.sqrt(size * p * (1 - p)) < self.random_k:
            size += 1
        return max(size, need)

    def validate(self) -> None:
        for name in ("top_k", "batch_size", "quantile_bins"):
            if getattr(self, name) < 1:
                raise AtlasInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("random_k", "per_quantile"):
            if getattr(self, name) < 0:
                raise AtlasInputError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.negative not in NEGATIVE_CHOICES:
            raise AtlasInputError(f"negative must be one of {', '.join(NEGATIVE_CHOICES)}, got {self.negative!r}")

    def captures_negative(self, gated: bool) -> bool:
        """Whether the negative direction is captured for an MLP of this kind."""
        return self.negative == "on" or (self.negative == "auto" and gated)


CODE_MAX = 255  # codes are 0..CODE_MAX (uint8)


def quantize(acts: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """[..., T] activations -> uint8 codes on each record's [lo, hi] (lo = its min, hi = its max)."""
    lo64, hi64 = np.asarray(lo, np.float64)[..., None], np.asarray(hi, np.float64)[..., None]
    span = hi64 - lo64
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(span > 0, (np.asarray(acts, np.float64) - lo64) / span, 0.0)
    return np.rint(np.clip(scaled, 0.0, 1.0) * CODE_MAX).astype(np.uint8)


def dequantize(codes: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """uint8 codes [..., T] -> float32 activations; codes 0 and CODE_MAX give lo and hi exactly.
    The `sequences_long` view computes the same expression in SQL."""
    lo64, hi64 = np.asarray(lo, np.float64)[..., None], np.asarray(hi, np.float64)[..., None]
    return (lo64 + np.asarray(codes, np.float64) * (hi64 - lo64) / CODE_MAX).astype(np.float32)


def codes_to_acts(frame: pl.DataFrame) -> pl.DataFrame:
    """A long frame of records (columns codes, min_act, max_act; codes of equal lengths) with
    `acts` (List[Float32]) in place of `codes`."""
    if frame.height == 0:
        return frame.drop("codes").with_columns(pl.lit([], dtype=pl.List(pl.Float32)).alias("acts"))
    width = frame["codes"].list.len().max()
    codes = frame["codes"].cast(pl.Array(pl.UInt8, width)).to_numpy()
    acts = dequantize(codes, frame["min_act"].to_numpy(), frame["max_act"].to_numpy())
    return frame.drop("codes").with_columns(
        pl.Series("acts", acts, dtype=pl.Array(pl.Float32, width)).cast(pl.List(pl.Float32))
    )


@dataclass
class RecordSet:
    """Records of one kind for every neuron of a layer; neurons on the first axis, best first."""

    ids: np.ndarray  # [N, k] sequence ids
    max: np.ndarray  # [N, k] each sequence's max activation
    min: np.ndarray  # [N, k] each sequence's min activation
    acts: np.ndarray  # [N, k, T]
    bin: np.ndarray | None = None  # [N, k] quantile bin, 0 = the least active (least negative for '-')


@dataclass
class LayerRecords:
    """Finished records and statistics of one layer, as numpy arrays with neurons on the first axis."""

    layer: int
    n_tokens: int
    negative_captured: bool
    max: np.ndarray
    min: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    nonzero_frac: np.ndarray
    positive_frac: np.ndarray
    negative_frac: np.ndarray
    top: RecordSet  # by max, descending
    bottom: RecordSet  # by min, ascending (empty when the negative direction is not captured)
    random: RecordSet
    quantile: RecordSet  # binned by max
    quantile_neg: RecordSet  # binned by -min (empty when the negative direction is not captured)


@dataclass
class _Admitted:
    """Where a batch's entrants go (flat slot in the pool) and where they come from (batch column, row)."""

    dst: torch.Tensor
    col: torch.Tensor
    row: torch.Tensor


def _bits(x: torch.Tensor) -> torch.Tensor:
    """float32 rows of even length seen as int64 pairs: copies move half as many elements, bit for bit."""
    return x.view(torch.int64)


class _SlotPool:
    """What `rows x k` kept entries hold, by flat slot (row * k + slot): sequence id, max and min,
    activations [T]. Slots are never permuted; only entrants are written, so a batch costs
    O(entrants x T)."""

    def __init__(self, rows: int, k: int, seq_len: int, device: torch.device):
        self.rows, self.k = rows, k
        # Left uninitialized: a slot is read only after an entrant was written into it.
        self.ids = torch.empty((rows * k,), device=device, dtype=torch.int64)
        self.extrema = torch.empty((rows * k, 2), device=device)  # max, min
        self.acts = torch.empty((rows * k, seq_len), device=device)

    def write(self, dst: torch.Tensor, ids: torch.Tensor, extrema: torch.Tensor, acts: torch.Tensor) -> None:
        self.ids.index_copy_(0, dst, ids)
        self.extrema.index_copy_(0, dst, extrema)
        if acts.shape[1] % 2:
            self.acts.index_copy_(0, dst, acts)
        else:
            _bits(self.acts).index_copy_(0, dst, _bits(acts))

    def records(self, slots: torch.Tensor, rows: slice = slice(None), bins: np.ndarray | None = None) -> RecordSet:
        """The entries at `slots` [R', c] (slot numbers within each of the given rows), as numpy."""
        flat = (torch.arange(self.rows, device=slots.device)[rows].unsqueeze(1) * self.k + slots).reshape(-1)
        shape = slots.shape
        extrema = self.extrema.index_select(0, flat).view(*shape, 2).cpu().numpy()
        return RecordSet(
            ids=self.ids.index_select(0, flat).view(shape).cpu().numpy(),
            max=extrema[..., 0],
            min=extrema[..., 1],
            acts=self.acts.index_select(0, flat).view(*shape, self.acts.shape[1]).cpu().numpy(),
            bin=bins,
        )


class _Kept(_SlotPool):
    """The k largest keys of a stream per row. Keys and slot numbers stay sorted by rank (small
    [R, k] arrays); the entries themselves stay in their slots."""

    def __init__(self, rows: int, k: int, seq_len: int, device: torch.device):
        super().__init__(rows, k, seq_len, device)
        self.keys = torch.full((rows, k), -torch.inf, device=device)
        self.slots = torch.arange(k, device=device).repeat(rows, 1)  # rank -> slot of the row

    def admit(self, new_keys: torch.Tensor) -> _Admitted | None:
        """Merge new keys [R, B] (column j = the batch's j-th sequence) into the kept ones.

        A stable sort over [kept..., new...] keeps ties in sequence-id order, because kept entries
        are ordered and every new sequence id exceeds every kept one."""
        k = self.k
        rows = (new_keys > self.keys[:, -1:]).any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return None
        dense = 2 * rows.numel() > self.rows
        sel: slice | torch.Tensor = slice(None) if dense else rows
        if dense:
            rows = torch.arange(self.rows, device=new_keys.device)
        cand = torch.cat([self.keys[sel], new_keys[sel]], dim=1)
        ranked, order = torch.sort(cand, dim=1, descending=True, stable=True)
        order = order[:, :k]
        is_new = order >= k
        # The i-th entrant of a row (in rank order) takes the slot of its (k-1-i)-th kept entry: the
        # evicted are the last n_new, since kept entries keep their relative order.
        slots = self.slots[sel].gather(1, torch.where(is_new, k - is_new.cumsum(dim=1), order))
        self.keys[sel] = ranked[:, :k]
        self.slots[sel] = slots
        row_of, rank_of = is_new.nonzero(as_tuple=True)
        return _Admitted(
            dst=rows[row_of] * k + slots[row_of, rank_of], col=order[row_of, rank_of] - k, row=rows[row_of]
        )

    def ranked(self, rows: slice, count: int) -> RecordSet:
        """The best `count` entries of the given rows, best first."""
        return self.records(self.slots[rows, :count], rows)


class _Reservoir(_SlotPool):
    """A uniform sample of k of the stream's `total` sequences without replacement, per row.

    Knowing the corpus size, each row's k sequence positions are drawn up front (Floyd's
    algorithm), so streaming only copies the chosen sequences into their slots: no keys are
    compared or sorted, every slot is written once, and the sample does not depend on batching.
    Drawing costs O(k^2) comparisons per row, once. `shuffled_slots` gives the sample in a random
    order."""

    def __init__(self, rows: int, k: int, total: int, seq_len: int, generator: torch.Generator):
        device = generator.device
        k = min(k, total)
        super().__init__(rows, k, seq_len, device)
        self.total, self.seen, self.generator = total, 0, generator
        chosen = torch.empty((rows, k), device=device, dtype=torch.int64)
        for i, j in enumerate(range(total - k, total)):
            pick = torch.randint(0, j + 1, (rows,), generator=generator, device=device)
            taken = (chosen[:, :i] == pick.unsqueeze(1)).any(dim=1)
            chosen[:, i] = torch.where(taken, j, pick)
        self.chosen = chosen.sort(dim=1).values  # stream positions, ascending; slot = column

    def admit(self, b: int) -> _Admitted | None:
        """The chosen among the next `b` sequences of the stream."""
        if self.seen + b > self.total:
            raise AtlasInputError(f"more than the announced {self.total} sequences were streamed")
        lo, self.seen = self.seen, self.seen + b
        row, slot = ((self.chosen >= lo) & (self.chosen < lo + b)).nonzero(as_tuple=True)
        if row.numel() == 0:
            return None
        return _Admitted(dst=row * self.k + slot, col=self.chosen[row, slot] - lo, row=row)

    def shuffled_slots(self) -> torch.Tensor:
        """[rows, k] slots in a uniformly random order per row."""
        if self.seen != self.total:
            raise AtlasInputError(f"{self.seen} sequences were streamed, {self.total} were announced")
        return torch.argsort(torch.rand((self.rows, self.k), generator=self.generator, device=self.chosen.device))


def _empty(n: int, seq_len: int, binned: bool = False) -> RecordSet:
    return RecordSet(
        ids=np.zeros((n, 0), dtype=np.int64),
        max=np.zeros((n, 0), dtype=np.float32),
        min=np.zeros((n, 0), dtype=np.float32),
        acts=np.zeros((n, 0, seq_len), dtype=np.float32),
        bin=np.zeros((n, 0), dtype=np.int64) if binned else None,
    )


class LayerAccumulator:
    """Per-layer streaming state; `update` with each batch, `finalize` once."""

    def __init__(
        self,
        layer: int,
        n_neurons: int,
        n_sequences: int,
        seq_len: int,
        spec: SamplingSpec,
        device: torch.device,
        negative: bool = False,
    ):
        """`n_sequences`: how many sequences will be streamed (the random sample is drawn knowing it);
        `negative`: also keep the bottom-k by min and the negative quantile samples."""
        self.layer, self.spec, self.negative = layer, spec, negative
        self.n_neurons, self.seq_len = n_neurons, seq_len
        n = n_neurons
        # One pool for both directions: rows [0, N) keep the largest maxima, rows [N, 2N) the
        # largest -minima, so the two directions share every merge operation.
        self.extremes = _Kept(2 * n if negative else n, spec.top_k, seq_len, device)
        self.generator = torch.Generator(device=device).manual_seed(spec.seed * 1_000_003 + layer)
        self.reservoir = _Reservoir(n, spec.reservoir_size(negative, n_sequences), n_sequences, seq_len, self.generator)
        self.sequences = 0
        self.count = 0
        self.mean = torch.zeros(n, device=device, dtype=torch.float64)
        self.m2 = torch.zeros(n, device=device, dtype=torch.float64)
        self.max = torch.full((n,), -torch.inf, device=device)
        self.min = torch.full((n,), torch.inf, device=device)
        self.positive = torch.zeros(n, device=device, dtype=torch.int64)
        self.negative_count = torch.zeros(n, device=device, dtype=torch.int64)

    @torch.inference_mode()
    def update(self, acts: torch.Tensor, seq_ids: torch.Tensor) -> None:
        """acts: [B, T, N] float32 activations of sequences `seq_ids` (increasing across calls).

        Every full pass reduces over T (dim 1), where N is contiguous and the kernels vectorize:
        reductions over a flattened token axis, var_mean and boolean counts are several times slower."""
        b, t, n = acts.shape
        seq_max, seq_min = acts.amax(dim=1), acts.amin(dim=1)  # [B, N]
        total = acts.sum(dim=1).sum(dim=0)
        if not bool(torch.isfinite(total).all()) and not bool(torch.isfinite(acts).all()):
            raise AtlasInputError(
                f"layer {self.layer} produced NaN/inf activations in sequences"
                f" {int(seq_ids[0])}..{int(seq_ids[-1])} (fp16 overflow?): use dtype float32 or bfloat16"
            )
        mean_b = total / (b * t)
        # Two-pass variance (accurate where the mean dwarfs the spread); mse_loss is (x - m)^2 in one kernel.
        scratch = F.mse_loss(acts, mean_b.expand_as(acts), reduction="none")
        m2_b = scratch.sum(dim=1).sum(dim=0)
        signs = torch.sign(acts, out=scratch)
        # Sums of -1/0/1 over at most B*T tokens are exact integers in float32.
        pos_minus_neg = signs.sum(dim=1).sum(dim=0)
        pos_plus_neg = signs.abs_().sum(dim=1).sum(dim=0)
        self.positive += ((pos_plus_neg + pos_minus_neg) / 2).round().long()
        self.negative_count += ((pos_plus_neg - pos_minus_neg) / 2).round().long()

        n_b, count = b * t, self.count + b * t
        delta = mean_b.double() - self.mean
        self.mean += delta * (n_b / count)
        self.m2 += m2_b.double() + delta.square() * (self.count * n_b / count)
        self.count = count
        self.sequences += b
        self.max = torch.maximum(self.max, seq_max.amax(dim=0))
        self.min = torch.minimum(self.min, seq_min.amin(dim=0))

        keys = torch.cat([seq_max.T, -seq_min.T]) if self.negative else seq_max.T.contiguous()
        admitted = [(self.extremes, self.extremes.admit(keys)), (self.reservoir, self.reservoir.admit(b))]
        admitted = [(pool, a) for pool, a in admitted if a is not None]
        if not admitted:
            return
        # One gather for every pool's entrants: index (batch column, neuron) of the [B * N] pairs.
        src = torch.cat([a.col * n + a.row % n for _, a in admitted])
        if src.numel() > _TRANSPOSE_ABOVE * b * n:
            rows = acts.transpose(1, 2).contiguous().view(b * n, t).index_select(0, src)
        else:
            rows = acts[src // n, :, src % n]
        extrema = torch.stack([seq_max, seq_min], dim=-1).view(b * n, 2).index_select(0, src)
        ids = seq_ids.to(torch.int64)[src // n]
        start = 0
        for pool, a in admitted:
            end = start + a.dst.numel()
            pool.write(a.dst, ids[start:end], extrema[start:end], rows[start:end])
            start = end

    def finalize(self) -> LayerRecords:
        if self.count == 0:
            raise AtlasInputError("no sequences were processed")
        n, spec, pool = self.n_neurons, self.spec, self.reservoir
        top_n = min(spec.top_k, self.sequences)
        slots = pool.shuffled_slots()  # the reservoir in random order
        # The quantile samples are taken from the other end of that order than the random sample,
        # so the two overlap only where the reservoir is too small to keep them apart (held-out
        # scorers want quantile samples the explainer's train records do not repeat).
        q_slots = slots.flip(1)
        extrema = pool.extrema[torch.arange(n, device=slots.device).unsqueeze(1) * pool.k + q_slots].cpu().numpy()

        def quantiles(level: np.ndarray) -> RecordSet:
            positions, bins = _quantile_positions(level, spec.quantile_bins, spec.per_quantile)
            return pool.records(q_slots.gather(1, torch.as_tensor(positions, device=slots.device)), bins=bins)

        top = self.extremes.ranked(slice(0, n), top_n)
        if self.negative:
            bottom, quantile_neg = self.extremes.ranked(slice(n, 2 * n), top_n), quantiles(-extrema[..., 1])
        else:
            bottom, quantile_neg = _empty(n, self.seq_len), _empty(n, self.seq_len, binned=True)
        # The random sample: the first random_k reservoir entries (in random order) whose sequence
        # is none of the neuron's top or bottom records.
        shown = torch.as_tensor(np.concatenate([top.ids, bottom.ids], axis=1), device=slots.device)
        drawn = pool.ids.view(n, pool.k).gather(1, slots)
        repeats = (drawn.unsqueeze(2) == shown.unsqueeze(1)).any(dim=2)
        unseen_first = torch.argsort(repeats.to(torch.int8), dim=1, stable=True)[:, : spec.random_k]
        np_ = lambda x: x.cpu().numpy()  # noqa: E731
        return LayerRecords(
            layer=self.layer,
            n_tokens=self.count,
            negative_captured=self.negative,
            max=np_(self.max),
            min=np_(self.min),
            mean=np_(self.mean),
            variance=np_(self.m2 / self.count),
            nonzero_frac=np_((self.positive + self.negative_count).double() / self.count),
            positive_frac=np_(self.positive.double() / self.count),
            negative_frac=np_(self.negative_count.double() / self.count),
            top=top,
            bottom=bottom,
            random=pool.records(slots.gather(1, unseen_first)),
            quantile=quantiles(extrema[..., 0]),
            quantile_neg=quantile_neg,
        )


def _quantile_positions(level: np.ndarray, bins: int, per_bin: int) -> tuple[np.ndarray, np.ndarray]:
    """Reservoir positions of the quantile samples: bins by rank of `level` (max, or -min for the
    negative direction), and within a bin the first entries in the reservoir's (random) order, so
    the draw stays uniform."""
    n, s = level.shape
    if s == 0 or per_bin == 0:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.int64)
    order = torch.argsort(torch.as_tensor(level), dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s).expand(n, s))
    sizes = [len(part) for part in np.array_split(np.arange(s), min(bins, s))]
    bin_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[rank]  # [N, S]
    # Grouped by bin (every row has the same bin sizes), in reservoir order within a bin.
    by_bin = torch.argsort(bin_of, dim=1, stable=True)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    taken = np.minimum(sizes, per_bin)
    columns = np.concatenate([np.arange(start, start + m) for start, m in zip(starts, taken, strict=True)])
    labels = np.repeat(np.arange(len(sizes)), taken)
    return by_bin[:, columns].numpy(), np.broadcast_to(labels, (n, len(labels))).copy()


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
    negative = spec.captures_negative(mlp_is_gated(model))
    accs = {
        layer: LayerAccumulator(layer, neuron_count(projections[layer]), n_seq, seq_len, spec, device, negative)
        for layer in layers
    }
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


RECORD_KINDS = ("top", "random", "quantile", "bottom", "quantile_neg")  # activation_records' lists


def _nested(neurons: np.ndarray, records: RecordSet, name: str) -> pl.DataFrame:
    """[N, k] records -> one row per neuron with a list of structs {rank, seq_id[, bin]}; the
    activations are in the neuron's `sequences` (`_sequences`)."""
    n, k = records.ids.shape
    columns = {
        "neuron": np.repeat(neurons, k).astype(np.int32),
        "rank": np.tile(np.arange(k, dtype=np.int16), n),
        "seq_id": records.ids.reshape(-1).astype(np.int32),
    }
    if records.bin is not None:
        columns["bin"] = records.bin.reshape(-1).astype(np.int16)
    flat = pl.DataFrame(columns)
    fields = [c for c in flat.columns if c != "neuron"]
    nested = flat.group_by("neuron", maintain_order=True).agg(pl.struct(fields).alias(name))
    if k == 0:
        empty = pl.Series(name, [[] for _ in range(n)], dtype=nested.schema[name])
        return pl.DataFrame({"neuron": neurons.astype(np.int32)}).with_columns(empty)
    return nested


SEQUENCE_TYPE = pl.List(
    pl.Struct({"seq_id": pl.Int32, "max_act": pl.Float32, "min_act": pl.Float32, "codes": pl.List(pl.UInt8)})
)


def _sequences(neurons: np.ndarray, sets: Sequence[RecordSet]) -> pl.DataFrame:
    """One row per neuron: `sequences`, each distinct sequence of its records once (a sequence is
    often in several lists: the random and both quantile samples share one reservoir), in seq_id
    order, with its max, min and activations as 8-bit codes on [min_act, max_act] (`quantize`)."""
    present = [s for s in sets if s.ids.shape[1] > 0]
    if not present:
        empty = pl.Series("sequences", [[] for _ in neurons], dtype=SEQUENCE_TYPE)
        return pl.DataFrame({"neuron": neurons.astype(np.int32)}).with_columns(empty)
    ids = np.concatenate([s.ids for s in present], axis=1)  # [N, K]
    order = np.argsort(ids, axis=1, kind="stable")
    ranked = np.take_along_axis(ids, order, axis=1)
    first = np.ones(ranked.shape, dtype=bool)
    first[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    rows, cols = np.nonzero(first)  # row-major: each neuron's sequences in seq_id order
    src = order[rows, cols]  # column of the first list entry holding it
    widths = np.cumsum([0] + [s.ids.shape[1] for s in present])
    which = np.searchsorted(widths, src, side="right") - 1
    t = present[0].acts.shape[-1]
    acts = np.empty((len(rows), t), dtype=np.float32)
    hi, lo = np.empty(len(rows), np.float32), np.empty(len(rows), np.float32)
    for i, s in enumerate(present):
        pick = which == i
        r, c = rows[pick], src[pick] - widths[i]
        acts[pick], hi[pick], lo[pick] = s.acts[r, c], s.max[r, c], s.min[r, c]
    flat = pl.DataFrame(
        {
            "neuron": neurons[rows].astype(np.int32),
            "seq_id": ranked[rows, cols].astype(np.int32),
            "max_act": hi,
            "min_act": lo,
            "codes": quantize(acts, lo, hi),
        }
    ).with_columns(pl.col("codes").cast(pl.List(pl.UInt8)))
    nested = flat.group_by("neuron", maintain_order=True).agg(
        pl.struct("seq_id", "max_act", "min_act", "codes").alias("sequences")
    )
    return (
        pl.DataFrame({"neuron": neurons.astype(np.int32)})
        .join(nested, on="neuron", how="left", maintain_order="left")
        .with_columns(pl.col("sequences").fill_null(pl.lit([], dtype=SEQUENCE_TYPE)))
    )


def record_acts(activation_records: pl.DataFrame, kinds: Sequence[str]) -> pl.DataFrame:
    """The records of the given lists, one row each: layer, neuron, kind (the list), rank, seq_id,
    bin (NULL outside the quantile lists), max_act, min_act and `acts` (float32, decoded from the
    neuron's `sequences`). The one reader of the storage format; `sequences_long` is its SQL twin."""
    parts = [
        activation_records.select("layer", "neuron", kind)
        .explode(kind)
        .drop_nulls(kind)
        .unnest(kind)
        .with_columns(pl.lit(kind).alias("kind"))
        for kind in kinds
        if kind in activation_records.columns
    ]
    listed = pl.concat(parts, how="diagonal_relaxed") if parts else pl.DataFrame()
    if listed.height == 0:
        schema = {"layer": pl.Int32, "neuron": pl.Int32, "kind": pl.String, "rank": pl.Int16, "seq_id": pl.Int32}
        schema |= {"bin": pl.Int16, "max_act": pl.Float32, "min_act": pl.Float32, "acts": pl.List(pl.Float32)}
        return pl.DataFrame(schema=schema)
    if "bin" not in listed.columns:
        listed = listed.with_columns(pl.lit(None, dtype=pl.Int16).alias("bin"))
    stored = (
        activation_records.select("layer", "neuron", "sequences")
        .join(listed.select("layer", "neuron").unique(), on=["layer", "neuron"], how="semi")
        .explode("sequences")
        .drop_nulls("sequences")
        .unnest("sequences")
    )
    joined = listed.select("layer", "neuron", "kind", "rank", "seq_id", "bin").join(
        stored, on=["layer", "neuron", "seq_id"], how="left", maintain_order="left"
    )
    missing = joined.filter(pl.col("codes").is_null())
    if missing.height:
        row = missing.row(0, named=True)
        raise AtlasInputError(
            f"activation_records of layer {row['layer']}, neuron {row['neuron']} lists sequence {row['seq_id']}"
            f" ({row['kind']}) without its activations: materialize activation_records of the layer again"
        )
    return codes_to_acts(joined)


def records_frame(rec: LayerRecords) -> pl.DataFrame:
    """One row per neuron: statistics and the top, random and quantile records, then (appended, so
    older tables migrate by adding columns) the min, the negative share, whether the negative
    direction was captured, the bottom and quantile_neg records (empty lists when it was not), and
    the activations of all of them, each sequence once (`sequences`)."""
    n = rec.max.shape[0]
    neurons = np.arange(n)
    frame = pl.DataFrame(
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
    for name in ("top", "random", "quantile"):
        frame = frame.join(_nested(neurons, getattr(rec, name), name), on="neuron", how="left", maintain_order="left")
    frame = frame.with_columns(
        pl.Series("min_activation", rec.min.astype(np.float32)),
        pl.Series("negative_frac", rec.negative_frac),
        pl.lit(rec.negative_captured).alias("negative_captured"),
    )
    for name in ("bottom", "quantile_neg"):
        frame = frame.join(_nested(neurons, getattr(rec, name), name), on="neuron", how="left", maintain_order="left")
    sequences = _sequences(neurons, [getattr(rec, name) for name in RECORD_KINDS])
    return frame.join(sequences, on="neuron", how="left", maintain_order="left")
