"""Benchmark of scaling out: two writers (two "machines", one layer each) against one writer
(both layers in one run), on one DuckLake with a Postgres-backed Dagster instance, in one run.

Run `python -m bench.scale_out` (needs Debian's postgresql package: the server is started here on
127.0.0.1, as in the tests). The work per layer is the records stages and explanations of a few
neurons of the hand-set digit model, with the embedded Gemma as explainer; each setup gets fresh
databases, so no run is answered from another's response cache. Only the writer phase is timed
(the unpartitioned stages are materialized first). A third line times the one writer on the
default DuckDB file, for the lake's overhead.

Both "machines" share this machine's cores, so the ratio says how much a second writer adds when
they compete for the same CPUs; on separate machines each writer has its own. On a machine busy
with other work, two processes also win a larger share of the CPUs than one, which flatters the
second writer: the CPU seconds (all writer processes together) show the cost without that.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from dagster_dev import SMALL_CONFIG, run_config  # noqa: E402
from postgres_server import postgres_server  # noqa: E402
from scale_out import Machine, new_machine, new_platform  # noqa: E402
from tiny_models import write_digit_corpus, write_digit_model  # noqa: E402

NEURONS = [5, 9, 13]  # fire in both layers of the digit model on the benchmark corpus
STAGES = ("--select", "activation_records,unit_examples,explanations")


def _config() -> dict:
    return run_config(ops={"explanations": {"neuron_ids": NEURONS}})


def _cpu_s() -> float:
    """User + system CPU seconds of the finished child processes (the writers and their workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_writer(machine: Machine) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run over both layers."""
    machine.run(SMALL_CONFIG, "--select", "subject_model,corpus_tokens", log_name="setup")
    start, cpu = time.monotonic(), _cpu_s()
    machine.run(_config(), *STAGES, "--partition-range", "0...1", log_name="both_layers")
    return time.monotonic() - start, _cpu_s() - cpu


def two_writers(a: Machine, b: Machine) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of two runs at once, one layer each."""
    a.run(SMALL_CONFIG, "--select", "subject_model,corpus_tokens", log_name="setup")
    start, cpu = time.monotonic(), _cpu_s()
    runs = [
        m.start(_config(), *STAGES, "--partition", str(layer), log_name=f"layer_{layer}")
        for layer, m in ((0, a), (1, b))
    ]
    for proc, log in runs:
        proc.wait(timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"a writer failed:\n{log.read_text(errors='replace')[-4000:]}")
    return time.monotonic() - start, _cpu_s() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the working directories (logs) and print where")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="atlas-scale-out-"))
    model, corpus = write_digit_model(root / "model"), write_digit_corpus(root / "digits.jsonl")
    work = 2 * len(NEURONS)
    with postgres_server() as pg:
        lake1 = new_platform(pg, root)
        t_one = one_writer(new_machine(lake1, root, "one_writer", model, corpus))
        lake2 = new_platform(pg, root)
        t_two = two_writers(*(new_machine(lake2, root, name, model, corpus) for name in ("writer_a", "writer_b")))
        file_machine = new_machine(lake1, root, "one_writer_file", model, corpus)
        (root / "file").mkdir()
        file_machine.env |= {"NEURON_ATLAS_DB": str(root / "file" / "neuron_atlas.duckdb")}
        file_machine.env.pop("NEURON_ATLAS_DATA_PATH")
        file_machine.env["NEURON_ATLAS_LLM_CACHE"] = str(root / "file" / "llm_cache.sqlite")
        t_file = one_writer(file_machine)
    print(f"work: 2 layers of the digit model, {len(NEURONS)} neurons explained per layer (embedded Gemma)")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    for label, (wall, cpu) in (("one writer, DuckLake", t_one), ("two writers, DuckLake", t_two),
                               ("one writer, DuckDB file", t_file)):  # fmt: skip
        print(f"{label:<24} {wall:7.1f} s wall  {cpu:7.1f} s CPU   {60 * work / wall:5.2f} neurons/min")
    print(
        f"two writers vs one writer (DuckLake): {t_one[0] / t_two[0]:.2f}x throughput, {t_two[1] / t_one[1]:.2f}x CPU"
    )
    print(f"DuckLake vs DuckDB file (one writer): {t_file[0] / t_one[0]:.2f}x throughput")
    if args.keep:
        print(f"logs under {root}")
    else:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
