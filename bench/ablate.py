"""Benchmark of ablation scoring: time and memory per neuron on the embedded model, in one run.

Run `python -m bench.ablate`. Each neuron is ablated on its own 10 held-out sequences of 64
tokens, two ways (mean and a calibrated simulation; random values stand in for the simulation,
the cost is the same). Optimized is `LayerAblator`: the unablated pass once per sequence, the
layers before the ablated one skipped (cached hidden states), rows of different neurons batched.
Naive is one full forward from the embeddings per (neuron, sequence): unablated, then each
ablation. Peak RSS growth over the loaded model is reported for the optimized run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from bench.capture import corpus_token_ids, fault_in_weights, peak_rss_kib, reset_peak_rss
from pipeline.core.ablation import LayerAblator, ablate_neurons
from pipeline.core.corpus import prefix_ids
from pipeline.core.mlp import mlp_projections
from pipeline.core.models import load_subject_model


def naive(model: torch.nn.Module, layer: int, ids: torch.Tensor, neuron: int, values: list[np.ndarray]) -> None:
    """Unablated forward, then one forward per replacement, nothing reused or batched."""
    projection = mlp_projections(model)[layer]
    with torch.inference_mode():
        base = torch.log_softmax(model(input_ids=ids[None]).logits[0], -1)
        for v in values:

            def hook(_m: torch.nn.Module, args: tuple, v: np.ndarray = v) -> tuple:
                x = args[0].clone()
                x[0, -len(v) :, neuron] = torch.tensor(v, dtype=x.dtype)
                return (x,)

            handle = projection.register_forward_pre_hook(hook)
            try:
                logp = torch.log_softmax(model(input_ids=ids[None]).logits[0], -1)
            finally:
                handle.remove()
            float((base.exp() * (base - logp)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    parser.add_argument("--neurons", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=10, help="held-out sequences per neuron")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    subject = load_subject_model(args.model)
    fault_in_weights(subject.model)
    layer = subject.n_layers // 2 if args.layer is None else args.layer
    prefix = prefix_ids(subject.tokenizer)
    pool = corpus_token_ids(subject.tokenizer, args.neurons * args.sequences, args.seq_len)
    rng = np.random.default_rng(0)
    # Each neuron gets its own sequences, as top records do.
    own = {n: list(range(n * args.sequences, (n + 1) * args.sequences)) for n in range(args.neurons)}
    sequences = {s: pool[s] for s in range(len(pool))}
    replacements = {
        (n, "+"): {
            "mean": {s: np.full(args.seq_len, 0.1) for s in own[n]},
            "simulated": {s: rng.normal(size=args.seq_len) for s in own[n]},
        }
        for n in own
    }
    print(f"model: {subject.identity.data_version}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"layer {layer} of {subject.n_layers}; {args.neurons} neurons x {args.sequences} sequences x "
        f"{args.seq_len} tokens, 2 ablations each; batch {args.batch_size}"
    )
    ablator = LayerAblator(subject.model, layer, args.batch_size)
    opt_s, naive_s, peak_growth = [], [], 0
    for _ in range(args.reps):
        reset_peak_rss()
        base_rss = peak_rss_kib()
        start = time.perf_counter()
        ablate_neurons(ablator, sequences, prefix, replacements)
        opt_s.append((time.perf_counter() - start) / args.neurons)
        peak_growth = max(peak_growth, peak_rss_kib() - base_rss)
        start = time.perf_counter()
        for n in own:
            for s in own[n]:
                ids = torch.tensor([*prefix, *pool[s].tolist()])
                naive(subject.model, layer, ids, n, [replacements[(n, "+")][m][s] for m in ("mean", "simulated")])
        naive_s.append((time.perf_counter() - start) / args.neurons)
    o, nv = statistics.median(opt_s), statistics.median(naive_s)
    print("\nseconds per neuron (median)   all runs")
    print(f"  naive       {nv:8.2f}        {' '.join(f'{x:.2f}' for x in naive_s)}")
    print(f"  optimized   {o:8.2f}        {' '.join(f'{x:.2f}' for x in opt_s)}")
    print(f"  speed-up naive / optimized: {nv / o:.2f}x")
    print(f"peak RSS growth during the optimized run: {peak_growth / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
