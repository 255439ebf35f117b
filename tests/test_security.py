"""Security: names with quotes cannot inject SQL, text from the model cannot break out of the viewer's
data file, and an API key never leaves the environment.

The key test runs a real `dagster asset materialize` against a loopback server that (like a
careless server) quotes the Authorization header back in an error body, then greps everything
the run left behind: Dagster's event and compute logs, the warehouse, the response cache and the
command's own output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import query, run_stages
from dagster import DagsterInstance, RunConfig, materialize
from dagster_dev import materialize_command, project_env, run_cli, run_config
from loopback_llm import LoopbackServer, ServerState
from tiny_models import DIGIT_NEURON

from assets.config import SamplingConfig
from assets.io import WarehouseIOManager
from assets.resources import CorpusResource, SubjectModelResource
from assets.stages import build_stage_assets
from pipeline.infra.viewer import (
    DATA_FILE,
    DATA_GLOBAL,
    LayerData,
    NeuronPage,
    UnitView,
    js_json,
    layer_payload,
    read_data,
    write_layer,
)
from pipeline.infra.warehouse import SCHEMA

HOSTILE = """it's "odd"'); drop table atlas.corpus_tokens; --"""
TABLES = ["activation_records", "corpus_tokens", "subject_model", "unit_examples"]


def test_quotes_in_model_and_corpus_names_are_data_not_sql(
    tmp_path: Path, digit_model_dir: Path, digit_corpus: Path
) -> None:
    model = tmp_path / HOSTILE / "model"
    shutil.copytree(digit_model_dir, model)
    corpus = tmp_path / HOSTILE / "corpus.jsonl"
    shutil.copy(digit_corpus, corpus)
    database = tmp_path / "neuron_atlas.duckdb"
    resources = {
        "subject": SubjectModelResource(model=str(model)),
        "corpus": CorpusResource(source=str(corpus), seq_len=16, n_sequences=24, seed=3),
        "sampling": SamplingConfig(top_k=4, random_k=4, quantile_bins=2, per_quantile=2),
    }
    for _ in range(2):  # the rerun deletes and rewrites the partition: the delete path too
        assert run_stages(database, n_layers=2, layers=(0, 1), **resources).success
    q = query(database)
    tables = [r[0] for r in q("select table_name from information_schema.tables where table_type = 'BASE TABLE'")]
    assert sorted(tables) == TABLES
    model_ids = {r[0] for r in q("select distinct model_id from atlas.current_activation_records")}
    assert model_ids == {str(model.resolve())} and HOSTILE in next(iter(model_ids))
    assert q("select count(distinct layer) from atlas.current_unit_examples") == [(2,)]


def test_a_partition_key_with_sql_in_it_is_refused(tmp_path: Path, digit_model_dir: Path, digit_corpus: Path) -> None:
    database = tmp_path / "neuron_atlas.duckdb"
    resources = {
        "subject": SubjectModelResource(model=str(digit_model_dir)),
        "corpus": CorpusResource(source=str(digit_corpus), seq_len=16, n_sequences=24, seed=3),
        "warehouse": WarehouseIOManager(database=str(database), schema=SCHEMA),
    }
    sampling = SamplingConfig(top_k=4, random_k=4, quantile_bins=2, per_quantile=2)
    stages = {k: v for k, v in resources.items() if k != "warehouse"}
    assert run_stages(database, n_layers=2, layers=(0, 0), **stages, sampling=sampling).success
    with pytest.raises(Exception, match="partition"):
        materialize(
            build_stage_assets(2),
            selection=["activation_records"],
            partition_key="0'); drop table atlas.corpus_tokens; --",
            resources=resources,
            run_config=RunConfig(ops={"activation_records": sampling}),
            instance=DagsterInstance.ephemeral(),
        )
    assert q_tables(database) == TABLES


def q_tables(database: Path) -> list[str]:
    sql = "select table_name from information_schema.tables where table_type = 'BASE TABLE'"
    return sorted(r[0] for r in query(database)(sql))


@pytest.mark.slow
def test_a_planted_api_key_appears_nowhere_a_run_writes(
    tmp_path: Path, digit_model_dir: Path, digit_corpus: Path
) -> None:
    key = "sk-planted-NEVER-STORE-314159"
    state = ServerState(replies=[("the main thing this neuron does is find", " digits.\n")], slot_probs=[{"0": 1.0}])
    state.plan = {"the main thing this neuron does is find": ["401"]}  # one neuron's error body quotes the key
    with LoopbackServer(state) as server:
        env = project_env(
            tmp_path,
            digit_model_dir,
            digit_corpus,
            NEURON_ATLAS_LLM_BACKEND="openai",
            NEURON_ATLAS_LLM_MODEL="loop-model",
            NEURON_ATLAS_LLM_BASE_URL=server.base_url,
            OPENAI_API_KEY=key,
        )
        config = run_config(
            ops={"explanations": {"neuron_ids": [DIGIT_NEURON, 5, 6]}}, resources={"explainer": {"max_concurrency": 1}}
        )
        outputs = []
        for select in ("subject_model,corpus_tokens", "activation_records,unit_examples,explanations,simulations"):
            extra = ["--select", select] + (["--partition", "0"] if "explanations" in select else [])
            done = run_cli(materialize_command(config, *extra), env)
            outputs.append(done.stdout + done.stderr)
    assert any(key in h for h in state.auth_headers)  # it was sent
    failures = query(Path(env["NEURON_ATLAS_DB"]))(
        "select failure_reason from atlas.explanations where failure_reason is not null"
    )
    assert failures and "HTTP 401" in failures[0][0]  # the quoting error was recorded, redacted
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in files) and any("compute_logs" in str(p) or p.suffix in {".out", ".err"}
                                                         for p in files)  # fmt: skip
    leaked = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert leaked == [] and not any(key in out for out in outputs)


# Strings that would end the data file's script or string if written raw (JSON alone escapes none of
# `</script>`, `<!--` or the line separators), and a lone surrogate, which UTF-8 cannot even write.
BREAKOUTS = [
    HOSTILE,
    "</script><script>document.title='pwned'</script>",
    "<!--<script>",
    "]};document.title='pwned';//",
    "\u2028document.title='pwned'\u2029",
    "\\\"});document.title='pwned';//",
    "`${document.title='pwned'}`",
    "\x00\x1f\x7f",
]


def test_the_viewer_data_keeps_hostile_text_inside_its_strings() -> None:
    strings = [*BREAKOUTS, "\ud800 lone"]
    text = js_json({"vocab": strings, "explanation": BREAKOUTS[1]})
    assert not set(text) & set("<>&\u2028\u2029") and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    assert "\\u003c/script\\u003e" in text and "\\u2028" in text and "\\ud800" in text
    assert json.loads(text) == {"vocab": strings, "explanation": BREAKOUTS[1]}
    text.encode("utf-8")  # a lone surrogate cannot stop the file being written


def test_hostile_text_reaches_the_viewer_page_as_data_never_as_script(tmp_path: Path) -> None:
    """In Chromium, the data file's value is exactly the strings written, and none of them ran."""
    from browser import chromium

    unit = UnitView(
        "+",
        1.0,
        [{"token": t, "mean_activation": 1.0, "count": 1} for t in BREAKOUTS],
        [{"record_kind": "top", "split": "train", "split_rank": 0, "seq_id": 1, "tokens": BREAKOUTS,
          "acts": [0.5] * len(BREAKOUTS)}],
        [{"kind": "llm", "sample_index": 0, "explanation": b, "best": i == 0} for i, b in enumerate(BREAKOUTS)],
        [],
    )  # fmt: skip
    layer = LayerData(BREAKOUTS[1], BREAKOUTS[4], 0, 1, [NeuronPage(3, [unit])])
    index = write_layer(layer, tmp_path)
    data = read_data((index.parent / DATA_FILE).read_text(encoding="utf-8"))
    assert data == json.loads(json.dumps(layer_payload(layer, data["render"])))
    with chromium() as driver:
        driver.get(index.as_uri() + "#3")
        assert driver.title == "L0 N3"
        assert driver.execute_script(f"return window.{DATA_GLOBAL}") == data
        shown = driver.execute_script(
            "return Array.from(document.querySelectorAll('#units td')).map(c => c.textContent)"
        )
        assert all(b in shown for b in BREAKOUTS)
        assert driver.execute_script("return document.scripts.length") == 2
