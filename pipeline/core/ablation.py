"""Ablation scoring: replace a neuron's activations and measure how far the model's next-token
distribution moves (KL from the unablated model), by its mean vs by its calibrated simulation.

score = 1 − KL(simulated) / KL(mean): 1 when the simulation carries everything the neuron does
for the output, 0 when it is no better than a constant.

Speed: per held-out sequence the unablated pass runs once and caches the hidden states entering
the ablated layer; the ablated passes skip the layers before it (their blocks are swapped for a
pass-through returning the cached states) and run many (neuron, replacement) rows as one batch,
each row ablating its own neuron. The passes end at the logits (no loss, no cache).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.mlp import _decoder_blocks, check_layers, mlp_projections

KL_FLOOR = 1e-9  # KL(mean) below this: the neuron does not move the output, the ratio is undefined


class _PassThrough(nn.Module):
    """Stands in for a skipped block: returns its input in the shape the real block returns."""

    def __init__(self, tuple_len: int):
        super().__init__()
        self.tuple_len = tuple_len

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.tuple_len == 0:
            return hidden_states
        return (hidden_states,) + (None,) * (self.tuple_len - 1)


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class Row:
    """One ablated forward: sequence `seq` (an index) with `neuron` set to `values` from `start` on."""

    seq: int
    neuron: int
    values: np.ndarray


@dataclass
class Effects:
    base_loss: np.ndarray  # [S] unablated next-token loss, summed over positions start..
    kl: np.ndarray  # [R] KL(unablated || ablated), summed over positions start..
    loss: np.ndarray  # [R] ablated next-token loss, summed
    n_positions: int  # per sequence
    n_targets: int  # per sequence


class LayerAblator:
    """Ablates neurons of one layer; rows of one batch may hold different sequences and neurons."""

    def __init__(self, model: nn.Module, layer: int, batch_size: int = 4):
        check_layers(model, [layer])
        self.model, self.layer, self.batch_size = model.eval(), layer, max(1, batch_size)
        self.blocks = _decoder_blocks(model)
        self.projection = mlp_projections(model)[layer]

    @torch.inference_mode()
    def run(self, sequences: torch.Tensor, start: int, rows: Sequence[Row]) -> Effects:
        """sequences: [S, L] ids (prefix included); per row, KL and loss over positions start.."""
        n_seq, length = sequences.shape
        targets = sequences[:, start + 1 :]
        positions = torch.arange(start, length - 1, device=sequences.device)
        base_loss = np.zeros(n_seq)
        kl, loss = np.zeros(len(rows)), np.zeros(len(rows))
        by_seq: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_seq.setdefault(row.seq, []).append(i)
        for lo in range(0, n_seq, self.batch_size):
            group = list(range(lo, min(lo + self.batch_size, n_seq)))
            base_logp, hidden, tuple_len = self._unablated(sequences[group])
            for j, s in enumerate(group):
                base_loss[s] = float(-base_logp[j, positions, targets[s]].sum())
            pending = [i for s in group for i in by_seq.get(s, [])]
            for c in range(0, len(pending), self.batch_size):
                chunk = pending[c : c + self.batch_size]
                local = torch.tensor([rows[i].seq - lo for i in chunk], device=sequences.device)
                ids = sequences[[rows[i].seq for i in chunk]]
                logp = self._ablated(ids, start, hidden[local] if hidden is not None else None, tuple_len,
                                     [rows[i] for i in chunk])  # fmt: skip
                base = base_logp[local][:, start:]
                kl[chunk] = (base.exp() * (base - logp[:, start:])).sum(-1).sum(-1).double().cpu().numpy()
                chunk_targets = targets[[rows[i].seq for i in chunk]]
                gathered = logp[:, positions].gather(-1, chunk_targets[..., None])[..., 0]
                loss[chunk] = (-gathered.sum(-1)).double().cpu().numpy()
        return Effects(base_loss, kl, loss, length - start, length - start - 1)

    def _unablated(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(log-probs [B, L, V], hidden states entering the layer [B, L, H], the blocks' tuple length)."""
        store: dict[str, Any] = {}

        def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            store["hidden"] = _hidden_arg(args, kwargs).detach()

        def shape(_m: nn.Module, _args: tuple, output: Any) -> None:
            store["tuple_len"] = len(output) if isinstance(output, tuple) else 0

        handles = [self.blocks[0].register_forward_hook(shape)]
        if self.layer > 0:
            handles.append(self.blocks[self.layer].register_forward_pre_hook(grab, with_kwargs=True))
        with _hooks(handles):
            logits = self.model(input_ids=ids, use_cache=False).logits
        return torch.log_softmax(logits.float(), dim=-1), store.get("hidden"), store["tuple_len"]

    def _ablated(
        self, ids: torch.Tensor, start: int, hidden: torch.Tensor | None, tuple_len: int, rows: Sequence[Row]
    ) -> torch.Tensor:
        b, length = ids.shape
        neurons = torch.tensor([r.neuron for r in rows], device=ids.device)
        values = torch.tensor(np.stack([r.values for r in rows]), device=ids.device)

        def replace(_m: nn.Module, args: tuple) -> tuple:
            x = args[0]
            shaped = x.reshape(b, length, -1).clone()  # OPT flattens batch x sequence
            shaped[torch.arange(b), start:, neurons] = values.to(shaped.dtype)  # [b, T] by indexing rules
            return (shaped.reshape(x.shape), *args[1:])

        def inject(_m: nn.Module, args: tuple, kwargs: dict) -> tuple:
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handles = [self.projection.register_forward_pre_hook(replace)]
        originals = list(self.blocks[: self.layer])
        if self.layer > 0:
            handles.append(self.blocks[self.layer].register_forward_pre_hook(inject, with_kwargs=True))
            for i in range(self.layer):
                self.blocks[i] = _PassThrough(tuple_len)
        try:
            with _hooks(handles):
                logits = self.model(input_ids=ids, use_cache=False).logits
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block
        return torch.log_softmax(logits.float(), dim=-1)


@dataclass(frozen=True)
class NeuronAblation:
    kl_mean: float
    kl_simulated: float
    loss_unablated: float
    loss_mean: float
    loss_simulated: float
    ablation_score: float | None
    ablation_score_reason: str | None


def ablation_score(kl_simulated: float, kl_mean: float) -> tuple[float | None, str | None]:
    if not kl_mean > KL_FLOOR:
        return None, f"KL of the mean ablation is ~0 ({kl_mean:.2e}): the neuron does not move the output here"
    return float(1.0 - kl_simulated / kl_mean), None


def ablate_neurons(
    ablator: LayerAblator,
    sequences: dict[int, np.ndarray],
    prefix: Sequence[int],
    replacements: dict[tuple[int, str], dict[str, dict[int, np.ndarray]]],
) -> dict[tuple[int, str], NeuronAblation]:
    """sequences: seq_id -> token ids (equal lengths); replacements[(neuron, polarity)]["mean" |
    "simulated"][seq_id]: the activations to put in the neuron for that sequence's tokens. Units may
    use different sequences (and a neuron's two directions are ablated separately); all their rows
    share batches. KL is averaged over token positions, losses over next-token targets, of each
    unit's own sequences."""
    device = next(ablator.model.parameters()).device
    seq_ids = sorted(sequences)
    index = {sid: i for i, sid in enumerate(seq_ids)}
    ids = torch.tensor(np.stack([np.concatenate([np.asarray(prefix, dtype=np.int64), sequences[s]]) for s in seq_ids]),
                       device=device)  # fmt: skip
    modes = ("mean", "simulated")
    rows, keys = [], []
    for n in sorted(replacements):
        for m in modes:
            for sid, values in replacements[n][m].items():
                rows.append(Row(index[sid], n[0], np.asarray(values, dtype=np.float32)))
                keys.append((n, m, sid))
    eff = ablator.run(ids, len(prefix), rows)
    out = {}
    for n in sorted(replacements):
        mine = [i for i, k in enumerate(keys) if k[0] == n]
        own = sorted({keys[i][2] for i in mine})
        n_pos, n_tgt = eff.n_positions * len(own), max(eff.n_targets * len(own), 1)
        kl = {m: sum(eff.kl[i] for i in mine if keys[i][1] == m) / n_pos for m in modes}
        loss = {m: sum(eff.loss[i] for i in mine if keys[i][1] == m) / n_tgt for m in modes}
        score, reason = ablation_score(kl["simulated"], kl["mean"])
        out[n] = NeuronAblation(
            kl_mean=float(kl["mean"]),
            kl_simulated=float(kl["simulated"]),
            loss_unablated=float(sum(eff.base_loss[index[s]] for s in own) / n_tgt),
            loss_mean=float(loss["mean"]),
            loss_simulated=float(loss["simulated"]),
            ablation_score=score,
            ablation_score_reason=reason,
        )
    return out
