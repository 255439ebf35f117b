"""Benchmark of the local simulator: optimized vs naive seconds per neuron, measured in one run.

Run `python -m bench.simulate`. One "neuron" is one explanation simulated on the scoring split's
held-out sequences (default 10 sequences of 64 tokens: valid top + valid random). Naive is the
obvious way: the whole prompt through the whole model, full vocabulary head, one forward per
sequence (and it does not even score the two-token "10", which would cost one more forward per
slot — so the ratio is conservative). Optimized is `LocalSimulator`: prefix KV cache once per
explanation, sequences batched, only the level rows of the head. Reps are interleaved and
reported as medians because the machine is shared. The optimized values are checked against the
exact naive reference (`NaiveLocalSimulator`) on the first sequences.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from pipeline.core.corpus import CorpusSpec, tokenize_corpus
from pipeline.core.models import load_subject_model
from pipeline.core.simulate_local import LocalSimulator, NaiveLocalSimulator

EXPLANATIONS = ("numbers written with digits", "words about programming", "punctuation at the end of a sentence")
GOAL = 5.0


def naive_paper_style(sim: NaiveLocalSimulator, explanation: str, sequences: list[list[str]]) -> None:
    """One full-prompt, full-head forward per sequence (what a completion server computes)."""
    prefix = sim.prompt.prefix(explanation)
    with torch.inference_mode():
        for tokens in sequences:
            row = sim.prompt.row(tokens)
            n_body = row.branch_of[0] if row.branch_of and row.branch_of[0] is not None else len(row.ids)
            sim.lm(input_ids=torch.tensor([prefix + row.ids[:n_body]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--sequences", type=int, default=10, help="held-out sequences per neuron")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions (each over all explanations)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--check", type=int, default=2, help="sequences checked against the exact naive reference")
    parser.add_argument("--check-len", type=int, default=12, help="tokens of each checked sequence")
    args = parser.parse_args()

    subject = load_subject_model(args.model)
    frame = tokenize_corpus(subject.tokenizer, CorpusSpec(n_sequences=args.sequences, seq_len=args.seq_len))
    sequences = frame["tokens"].to_list()
    fast = LocalSimulator(subject.model, subject.tokenizer, args.model, batch_size=args.batch_size)
    naive = NaiveLocalSimulator(subject.model, subject.tokenizer, args.model)
    print(f"model: {subject.identity.data_version}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"workload per neuron: {len(sequences)} sequences x {args.seq_len} tokens; prompt prefix "
        f"{len(fast.prompt.prefix(EXPLANATIONS[0]))} tokens; {len(EXPLANATIONS)} explanations per rep"
    )

    check = [tokens[: args.check_len] for tokens in sequences[: args.check]]
    got, want = fast.simulate(EXPLANATIONS[0], check), naive.simulate(EXPLANATIONS[0], check)
    delta = max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))  # type: ignore[arg-type]
    print(
        f"optimized vs exact naive on {len(check)} sequences of {args.check_len} tokens:"
        f" max |delta| = {delta:.2e} (must be <= 1e-3)"
    )

    naive_s, fast_s = [], []
    for _ in range(args.reps):
        for explanation in EXPLANATIONS:
            start = time.perf_counter()
            naive_paper_style(naive, explanation, sequences)
            naive_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            fast.simulate(explanation, sequences)
            fast_s.append(time.perf_counter() - start)
    naive_med, fast_med = statistics.median(naive_s), statistics.median(fast_s)
    ratio = naive_med / fast_med
    print("\nseconds per neuron (median)         all runs")
    print(f"  naive, full prompt + full head   {naive_med:7.2f}   {' '.join(f'{s:.2f}' for s in naive_s)}")
    print(f"  optimized (prefix KV, batched,   {fast_med:7.2f}   {' '.join(f'{s:.2f}' for s in fast_s)}")
    print("             level rows of head)")
    print(f"  speed-up naive / optimized: {ratio:.1f}x   goal >= {GOAL:.0f}x: {'MET' if ratio >= GOAL else 'NOT MET'}")


if __name__ == "__main__":
    main()
