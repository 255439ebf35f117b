"""Benchmark of activation capture against a bare forward pass, and of capture memory vs corpus size.

Run `python -m bench.capture`. Throughput: the transformer body alone (no LM head, which the capture
never computes either) against `collect_activation_records` over all layers, on the same batches,
interleaved and reported as medians because the machine is shared. The capture runs with the
default sampling, so a gated model (the embedded Gemma) is captured in both directions;
`--positive-only` also times the capture without the negative direction, interleaved with the others.
Memory: each corpus size is captured in a fresh subprocess (`--child N`) whose peak RSS is compared
with its RSS after loading, to show that capture memory is O(neurons x k), not O(corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.corpus import CorpusSpec, prefix_ids, tokenize_corpus
from pipeline.core.mlp import mlp_is_gated
from pipeline.core.models import SubjectModel, load_subject_model
from pipeline.core.records import SamplingSpec, collect_activation_records

GOAL_RATIO = 1.15
CHILD_TAG = "BENCH_CHILD_RESULT "


def corpus_token_ids(tokenizer: Any, n_sequences: int, seq_len: int) -> np.ndarray:
    """[n_sequences, seq_len] int64 ids from the embedded offline corpus, as the pipeline cuts them."""
    frame = tokenize_corpus(tokenizer, CorpusSpec(n_sequences=n_sequences, seq_len=seq_len))
    return np.array(frame["token_ids"].to_list(), dtype=np.int64)


def input_batches(token_ids: np.ndarray, prefix: Sequence[int], batch_size: int) -> list[torch.Tensor]:
    """The model inputs `collect_activation_records` builds: each batch with the prefix prepended."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    prefix_t = torch.tensor(list(prefix), dtype=torch.long)
    return [torch.cat([prefix_t.expand(batch.shape[0], -1), batch], dim=1) for batch in ids.split(batch_size, dim=0)]


def time_bare(subject: SubjectModel, batches: Sequence[torch.Tensor]) -> float:
    """Seconds for the transformer body over all batches; `base_model` is the body for any HF LM."""
    body = subject.model.base_model
    start = time.perf_counter()
    with torch.inference_mode():
        for inputs in batches:
            body(input_ids=inputs, use_cache=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the forwards above are only queued on a GPU
    return time.perf_counter() - start


def time_capture(
    subject: SubjectModel, token_ids: np.ndarray, spec: SamplingSpec, prefix: Sequence[int]
) -> tuple[float, float]:
    """(total seconds, seconds of it spent after the last batch, i.e. in finalize) for all layers."""
    last_batch_done = 0.0

    def progress(_done: int, _total: int, _elapsed: float) -> None:
        nonlocal last_batch_done
        last_batch_done = time.perf_counter()

    start = time.perf_counter()
    collect_activation_records(
        subject, token_ids, list(range(subject.n_layers)), spec, prefix=prefix, progress=progress
    )
    end = time.perf_counter()
    return end - start, end - last_batch_done


@dataclass
class Throughput:
    n_sequences: int
    seq_len: int
    batch_size: int
    n_tokens: int  # corpus tokens per pass; the prefix is run too but is not counted
    negative_captured: bool = False
    bare_s: list[float] = field(default_factory=list)
    capture_s: list[float] = field(default_factory=list)
    finalize_s: list[float] = field(default_factory=list)
    positive_only_s: list[float] = field(default_factory=list)  # negative direction off, if asked for

    @property
    def bare_median(self) -> float:
        return statistics.median(self.bare_s)

    @property
    def capture_median(self) -> float:
        return statistics.median(self.capture_s)

    @property
    def ratio(self) -> float:
        return self.capture_median / self.bare_median

    def summary(self) -> dict[str, Any]:
        extra = {}
        if self.positive_only_s:
            positive = statistics.median(self.positive_only_s)
            extra = {
                "positive_only_median_s": positive,
                "positive_only_tokens_per_s": self.n_tokens / positive,
                "positive_only_ratio": positive / self.bare_median,
            }
        return {
            **asdict(self),
            "bare_median_s": self.bare_median,
            "capture_median_s": self.capture_median,
            "finalize_median_s": statistics.median(self.finalize_s),
            "bare_tokens_per_s": self.n_tokens / self.bare_median,
            "capture_tokens_per_s": self.n_tokens / self.capture_median,
            "ratio": self.ratio,
            "goal_ratio": GOAL_RATIO,
            "goal_met": self.ratio <= GOAL_RATIO,
            **extra,
        }


def measure_throughput(
    subject: SubjectModel,
    token_ids: np.ndarray,
    spec: SamplingSpec,
    prefix: Sequence[int],
    reps: int,
    positive_only: bool = False,
) -> Throughput:
    """Bare and capture passes (and the positive-only capture, if asked) interleaved `reps` times,
    after one warm-up of each on the first batch."""
    batches = input_batches(token_ids, prefix, spec.batch_size)
    positive = replace(spec, negative="off")
    time_bare(subject, batches[:1])
    time_capture(subject, token_ids[: spec.batch_size], spec, prefix)
    if positive_only:
        time_capture(subject, token_ids[: spec.batch_size], positive, prefix)
    negative = spec.captures_negative(mlp_is_gated(subject.model))
    result = Throughput(len(token_ids), token_ids.shape[1], spec.batch_size, int(token_ids.size), negative)
    for _ in range(reps):
        result.bare_s.append(time_bare(subject, batches))
        total, finalize = time_capture(subject, token_ids, spec, prefix)
        result.capture_s.append(total)
        result.finalize_s.append(finalize)
        if positive_only:
            result.positive_only_s.append(time_capture(subject, token_ids, positive, prefix)[0])
    return result


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_kib() -> int:
    """Resident set size now (Linux /proc), else the peak so far."""
    return _proc_status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> bool:
    """Reset the high-water mark (Linux >= 4.0), so a loading spike does not hide the capture's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def fault_in_weights(model: torch.nn.Module) -> None:
    """Read every weight once: safetensors weights are mmapped and paged in lazily (the embedding table
    only row by row), which would otherwise show up as growth with the corpus's vocabulary."""
    with torch.inference_mode():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()


@dataclass
class Memory:
    n_sequences: int
    seq_len: int
    corpus_bytes: int  # the int64 token array alive during capture
    rss_after_load_kib: int
    peak_rss_kib: int
    rss_after_capture_kib: int
    peak_was_reset: bool
    capture_s: float
    malloc_mmap_threshold: str | None = None  # glibc's, if fixed; by default it adapts and retains freed blocks

    @property
    def growth_kib(self) -> int:
        return self.peak_rss_kib - self.rss_after_load_kib


def child_memory(model: str, n_sequences: int, seq_len: int, batch_size: int) -> Memory:
    """In a fresh process: load, fault in the weights, note RSS, then capture all layers and read the peak."""
    subject = load_subject_model(model)
    fault_in_weights(subject.model)
    rss_after_load = current_rss_kib()
    token_ids = corpus_token_ids(subject.tokenizer, n_sequences, seq_len)
    prefix = prefix_ids(subject.tokenizer)
    was_reset = reset_peak_rss()
    capture_s, _ = time_capture(subject, token_ids, SamplingSpec(batch_size=batch_size), prefix)
    return Memory(
        len(token_ids),
        seq_len,
        token_ids.nbytes,
        rss_after_load,
        peak_rss_kib(),
        current_rss_kib(),
        was_reset,
        capture_s,
        os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    )


def run_child(model: str, n_sequences: int, seq_len: int, batch_size: int, mmap_threshold: int | None) -> Memory:
    """Spawn `python -m bench.capture --child N` and parse its one result line.

    A fixed `mmap_threshold` (bytes) makes glibc return large freed blocks at once, so the peak shows
    live memory rather than what the default adaptive allocator keeps around.
    """
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    cmd = [sys.executable, "-m", "bench.capture", "--child", str(n_sequences)]
    cmd += ["--model", model, "--seq-len", str(seq_len), "--batch-size", str(batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory child for {n_sequences} sequences failed:\n{proc.stderr[-4000:]}")
    return Memory(**json.loads(lines[-1].removeprefix(CHILD_TAG)))


def memory_verdict(small: Memory, large: Memory, tolerance_kib: int) -> dict[str, Any]:
    """Growth must not differ between corpus sizes by more than their corpus arrays do, plus a tolerance."""
    corpus_diff_kib = (large.corpus_bytes - small.corpus_bytes) / 1024
    growth_diff_kib = large.growth_kib - small.growth_kib
    return {
        "growth_diff_kib": growth_diff_kib,
        "corpus_diff_kib": corpus_diff_kib,
        "tolerance_kib": tolerance_kib,
        "within": growth_diff_kib <= corpus_diff_kib + tolerance_kib,
    }


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def format_report(header: dict[str, Any], thr: Throughput, mems: list[Memory], verdict: dict[str, Any]) -> str:
    s = thr.summary()
    out = [f"{key}: {value}" for key, value in header.items()]
    out += [
        "",
        f"Throughput: {thr.n_sequences} sequences x {thr.seq_len} tokens (+ prefix), batch {thr.batch_size}, "
        f"{len(thr.bare_s)} interleaved reps, medians",
        f"  {'':<30}{'median s':>10}{'tokens/s':>12}   all reps (s)",
        f"  {'bare forward (body, no head)':<30}{s['bare_median_s']:>10.3f}{s['bare_tokens_per_s']:>12.1f}   "
        + " ".join(f"{t:.3f}" for t in thr.bare_s),
        f"  {'capture, all layers' + (' (+/-)' if thr.negative_captured else ' (+)'):<30}"
        f"{s['capture_median_s']:>10.3f}{s['capture_tokens_per_s']:>12.1f}   "
        + " ".join(f"{t:.3f}" for t in thr.capture_s),
        f"  {'  of which finalize':<30}{s['finalize_median_s']:>10.3f}",
    ]
    if thr.positive_only_s:
        out.append(
            f"  {'capture, positive only':<30}{s['positive_only_median_s']:>10.3f}"
            f"{s['positive_only_tokens_per_s']:>12.1f}   " + " ".join(f"{t:.3f}" for t in thr.positive_only_s)
        )
    out.append(
        f"  ratio capture / bare: {s['ratio']:.3f}   goal <= {GOAL_RATIO}: {'MET' if s['goal_met'] else 'NOT MET'}"
        + (f"   (positive only: {s['positive_only_ratio']:.3f})" if thr.positive_only_s else "")
    )
    if not mems:
        return "\n".join(out)
    out += [
        "",
        "Peak memory: one fresh process per corpus size. RSS after load is with every weight paged in; peak is"
        " ru_maxrss"
        + (", its high-water mark reset after loading" if all(m.peak_was_reset for m in mems) else "")
        + "; glibc malloc "
        + (f"MALLOC_MMAP_THRESHOLD_={mems[0].malloc_mmap_threshold}" if mems[0].malloc_mmap_threshold else "default"),
        f"  {'sequences':>9} {'corpus array':>13} {'RSS after load':>15} {'peak RSS':>11} {'growth':>11} "
        f"{'RSS at end':>11} {'capture s':>9}",
    ]
    for m in mems:
        out.append(
            f"  {m.n_sequences:>9} {m.corpus_bytes / 1024:>9.1f} KiB {_mib(m.rss_after_load_kib):>15} "
            f"{_mib(m.peak_rss_kib):>11} {_mib(m.growth_kib):>11} {_mib(m.rss_after_capture_kib):>11} "
            f"{m.capture_s:>9.2f}"
        )
    out += [
        f"  growth, large - small: {verdict['growth_diff_kib'] / 1024:.1f} MiB; corpus arrays, large - small: "
        f"{verdict['corpus_diff_kib']:.1f} KiB; tolerance: {verdict['tolerance_kib'] / 1024:.0f} MiB",
        "  growth stays within the corpus + tolerance: " + ("YES" if verdict["within"] else "NO"),
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of bare and capture")
    parser.add_argument("--sequences", type=int, default=CorpusSpec().n_sequences, help="throughput corpus size")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=SamplingSpec().batch_size)
    parser.add_argument(
        "--small", type=int, default=64, help="smaller memory corpus (sequences); at least 40 so the records fill up"
    )
    parser.add_argument("--large", type=int, default=256, help="larger memory corpus (sequences)")
    parser.add_argument("--tolerance-mib", type=float, default=32.0, help="allowed extra growth, large vs small")
    parser.add_argument(
        "--malloc-mmap-threshold", type=int, help="bytes: fix glibc's mmap threshold in the memory subprocesses"
    )
    parser.add_argument(
        "--positive-only", action="store_true", help="also time the capture without the negative direction"
    )
    parser.add_argument("--skip-memory", action="store_true", help="throughput only (no memory subprocesses)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        mem = child_memory(args.model, args.child, args.seq_len, args.batch_size)
        print(CHILD_TAG + json.dumps(asdict(mem)), flush=True)
        return

    # Children first: a child's ru_maxrss starts at its parent's peak (kept across exec), so the parent
    # must not hold the model yet.
    mems: list[Memory] = []
    verdict: dict[str, Any] = {}
    if not args.skip_memory:
        sizes = (args.small, args.large)
        mems = [run_child(args.model, n, args.seq_len, args.batch_size, args.malloc_mmap_threshold) for n in sizes]
        verdict = memory_verdict(mems[0], mems[1], int(args.tolerance_mib * 1024))

    subject = load_subject_model(args.model)
    fault_in_weights(subject.model)
    prefix = prefix_ids(subject.tokenizer)
    token_ids = corpus_token_ids(subject.tokenizer, args.sequences, args.seq_len)
    thr = measure_throughput(
        subject, token_ids, SamplingSpec(batch_size=args.batch_size), prefix, args.reps, args.positive_only
    )
    header = {
        "model": subject.identity.data_version,
        "layers": subject.n_layers,
        "prefix": prefix,
        "torch": f"{torch.__version__}, {torch.get_num_threads()} threads",
        "negative direction": "captured (gated MLP)" if thr.negative_captured else "not captured",
    }
    print(format_report(header, thr, mems, verdict))
    if args.json:
        payload = {"header": header, "throughput": thr.summary(), "memory": [asdict(m) for m in mems], **verdict}
        args.json.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
