"""Against a real llama.cpp server (llama-cpp-python) on 127.0.0.1: explanations, simulations and
scores through Dagster with `api: completions` (echo + logprobs) on the embedded Gemma GGUF, and the
agreement of the server's echoed expected values with the in-process simulator on the same weights;
and with `api: chat` (levels from the reply's top logprobs) on a small instruct GGUF
(Qwen2.5-Coder-0.5B-Instruct, `scripts/chat_gguf.sh`), since the base Gemma served with chat turns
writes no `token<TAB>level` lines at all (measured: 46 lines of quotes and words for 8 tokens).

The server sorts the whole 262k vocabulary in Python for every echoed token (about 0.5-1.3 s per
token here, so several minutes per echo of the ~570-token simulation prompt): the tests send three
echoes in all, on short sequences. Gemma 3 270M is a base model: it exercises the plumbing, not quality.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import query, run_stages
from llama_server import llama_server, require_llama_server

from assets.config import ExplainConfig, SamplingConfig
from assets.resources import CorpusResource, ExplainerResource, SimulatorResource, SubjectModelResource
from pipeline.core.classify import DETECTION, FUZZING, Answer, Shown
from pipeline.core.corpus import token_strings
from pipeline.core.interpret import LLM
from pipeline.core.llm import GenerationParams, LLMFailure
from pipeline.core.models import EMBEDDED, _embedded_gguf, load_subject_model, model_layer_count
from pipeline.core.prompts import EXPLAIN_CHAT_VERSION, EXPLAIN_VERSION, SIMULATE_CHAT_VERSION, SIMULATE_VERSION
from pipeline.core.simulate_local import LocalSimulator
from pipeline.infra.llm_cache import LLMCache
from pipeline.infra.llm_openai import OpenAIBackend
from pipeline.infra.simulate_remote import EchoSimulator

pytestmark = pytest.mark.slow

SERVED = "gemma-3-270m"
CHAT_SERVED = "qwen2.5-coder-0.5b-instruct"
STAGES = ["subject_model", "corpus_tokens", "activation_records", "unit_examples"]
LLM_STAGES = ["explanations", "simulations", "scores"]
# Text in which "numbers written with digits" (a few-shot explanation of the simulator's prompt) picks
# out some tokens: the simulator's levels vary, and "1","0" (Gemma's "10") comes up.
AGREEMENT_TEXTS = ["In 1987 we baked 12 pies", "It rained for 2 days"]
# One echo of the ~570-token simulation prompt takes minutes at full speed; `make test` runs these tests
# at low CPU priority beside the rest of the suite (scripts/run_tests.sh), where it can take several times that.
SERVER_TIMEOUT_S = 3600


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    require_llama_server()
    gguf, _ = _embedded_gguf()
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    # Gemma's GGUF carries no chat template: the server's built-in "gemma" turn format serves chat.
    with llama_server(gguf, log, "--chat_format", "gemma", "--model_alias", SERVED) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The instruct GGUF (its own chat template, ChatML) on its own server."""
    require_llama_server()
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["bash", str(root / "scripts" / "chat_gguf.sh"), sys.executable],
        capture_output=True,
        text=True,
        timeout=SERVER_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    log = tmp_path_factory.mktemp("chat_server") / "server.log"
    with llama_server(Path(done.stdout.strip()), log, "--model_alias", CHAT_SERVED) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """Layer 0's records of the embedded Gemma on short sequences, and its most active neuron."""
    database = tmp_path_factory.mktemp("wh") / "neuron_atlas.duckdb"
    result = run_stages(database, model_layer_count(EMBEDDED), (0, 0), **small_resources(), selection=STAGES)
    assert result.success
    ((neuron,),) = query(database)(
        "select neuron from atlas.unit_examples where layer = 0 order by max_activation desc limit 1"
    )
    return database, neuron


def small_resources() -> dict[str, Any]:
    return {
        "subject": SubjectModelResource(model=EMBEDDED),
        "corpus": CorpusResource(source=EMBEDDED, seq_len=8, n_sequences=48),
        # One train top record for the explainer, one valid top sequence to simulate (each echo costs minutes).
        # The positive direction only: each unit costs echoes of minutes, one unit is what is checked.
        "sampling": SamplingConfig(top_k=4, random_k=1, quantile_bins=1, per_quantile=1, negative="off"),
    }


def served(base_url: str, role: type, api: str, tmp: Path, model: str = SERVED, **extra: Any) -> Any:
    return role(
        backend="openai",
        model=model,
        base_url=base_url,
        api=api,
        max_concurrency=1,  # the server answers one request at a time: more would only queue (and time out)
        timeout_s=SERVER_TIMEOUT_S,
        cache_path=str(tmp / "llm_cache.sqlite"),
        **extra,
    )


def run_llm_stages(database: Path, neuron: int, explainer: Any, simulator: Any) -> Any:
    result = run_stages(
        database,
        model_layer_count(EMBEDDED),
        (0, 0),
        **small_resources(),
        explainer=explainer,
        simulator=simulator,
        # One sample: each unit's candidates (the sample and the token-space explanation) are echoed on
        # valid, the two chosen ones on calibration and test, their controls on test.
        explain=ExplainConfig(neuron_ids=[neuron], max_tokens=24, samples=1, temperature=0),
        selection=LLM_STAGES,
    )
    assert result.success
    return result


def check_run(database: Path, result: Any, explain_version: str, simulate_version: str) -> None:
    q = query(database)
    ((text, reason, version, backend, prompt_tokens),) = q(
        "select explanation, failure_reason, prompt_version, explainer_backend, prompt_tokens"
        " from atlas.explanations where kind = 'llm'"
    )
    assert (version, backend) == (explain_version, "openai") and prompt_tokens > 100
    assert text or reason, "an explanation, or the reason there is none"
    sims = q("select simulated, failure_reason, prompt_version from atlas.simulations where kind = ?", [LLM])
    if text:
        assert {v for _, _, v in sims} == {simulate_version}
        values = [x for s, _, _ in sims if s is not None for x in s]
        assert values and all(0.0 <= x <= 10.0 for x in values), sims
    meta = {step: result.asset_materializations_for_node(step)[0].metadata for step in ("explanations", "simulations")}
    assert meta["explanations"]["explainer_requests"].value == 1
    assert meta["explanations"]["explainer_prompt_tokens"].value > 100
    if text:
        assert meta["simulations"]["simulator_requests"].value >= 1
        assert meta["simulations"]["simulator_prompt_tokens"].value > 500
    print("explanation:", text or reason, "| simulated:", [s for s, _, _ in sims])


def test_completions_explain_simulate_and_score_through_dagster(
    server: str, warehouse: tuple[Path, int], tmp_path: Path
) -> None:
    database, neuron = warehouse
    result = run_llm_stages(
        database,
        neuron,
        served(server, ExplainerResource, "completions", tmp_path),
        served(server, SimulatorResource, "completions", tmp_path),
    )
    check_run(database, result, EXPLAIN_VERSION, SIMULATE_VERSION)
    scores = query(database)("select corr_all, failure_reason from atlas.scores where kind = 'llm' and split = 'valid'")
    assert len(scores) == 1 and (scores[0][0] is not None or scores[0][1])
    test = query(database)("select count(*) from atlas.scores where split = 'test' and best")
    assert test == [(1,)], "the unit's chosen explanation is reported on the test split"


def test_chat_explain_simulate_and_score_through_dagster(
    chat_server: str, warehouse: tuple[Path, int], tmp_path: Path
) -> None:
    """Both roles on `api: chat` through Dagster. A 0.5B model often cannot write a sequence back line
    by line (measured here: it drops a line's level, or stops one line short, even on "The cat sat on
    the mat"), so a sequence may end as a NULL row with the alignment reason (max_failure_share 1: the
    step completes); what is checked is that every row is one or the other, per sequence. Reading
    expected levels from chat logprobs is tested against scripted logprobs in test_llm_openai.py."""
    database, neuron = warehouse
    result = run_llm_stages(
        database,
        neuron,
        served(chat_server, ExplainerResource, "chat", tmp_path, CHAT_SERVED),
        served(chat_server, SimulatorResource, "chat", tmp_path, CHAT_SERVED, top_logprobs=10, max_failure_share=1.0),
    )
    q = query(database)
    ((text, version, prompt_tokens),) = q(
        "select explanation, prompt_version, prompt_tokens from atlas.explanations where kind = 'llm'"
    )
    assert text and version == EXPLAIN_CHAT_VERSION and prompt_tokens > 100
    sims = q("select simulated, failure_reason, prompt_version, seq_id from atlas.simulations where kind = ?", [LLM])
    assert sims and {v for _, _, v, _ in sims} == {SIMULATE_CHAT_VERSION}
    for simulated, reason, _, seq_id in sims:
        assert seq_id is not None, "a failure is the sequence's own, not the explanation's"
        assert (simulated is not None and all(0 <= x <= 10 for x in simulated)) or (
            reason.startswith("simulation failed: the reply does not match the tokens")
        ), (simulated, reason)
    meta = result.asset_materializations_for_node("simulations")[0].metadata
    assert meta["simulator_requests"].value >= 1 and meta["simulator_completion_tokens"].value > 0
    print("chat explanation:", text, "| simulations:", sims)


def test_echo_expected_values_agree_with_the_local_simulator_on_the_same_weights(server: str, tmp_path: Path) -> None:
    """The server runs the quantized GGUF with llama.cpp; the local simulator runs the same weights
    dequantized in torch. Same explanation, same short sequences: the expected values must correlate
    at >= 0.95 (with "10" split exactly on both sides). The negative control is the echo read the way it
    was before "10" was split (p("1") counted as 1): it must fail the check."""
    loaded = load_subject_model(EMBEDDED)
    tokenizer = loaded.tokenizer
    sequences = []
    for text in AGREEMENT_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        strings = token_strings(tokenizer, ids)
        sequences.append([strings[i] for i in ids])
    local = LocalSimulator(loaded.model, tokenizer, loaded.identity.data_version, batch_size=4)
    backend = OpenAIBackend(
        SERVED,
        server,
        max_concurrency=1,
        timeout_s=SERVER_TIMEOUT_S,
        echo_max_tokens=1,
        cache=LLMCache(tmp_path / "c.sqlite"),
    )

    def values(simulator: Any, explanation: str) -> np.ndarray:
        out = simulator.simulate(explanation, sequences)
        assert not isinstance(out, LLMFailure), out
        return np.concatenate(out)

    explanation = "numbers written with digits"
    truth = values(local, explanation)
    exact = values(EchoSimulator(backend, top_logprobs=15, branch_min_share=0.0), explanation)
    default = values(EchoSimulator(backend, top_logprobs=15), explanation)  # branch_min_share 0.01
    as_one = values(EchoSimulator(backend, top_logprobs=15, branch_min_share=2.0), explanation)  # p("1") = 1
    other = values(local, "words about weather")

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1])

    r_exact, r_default, r_one, r_other = (
        corr(exact, truth),
        corr(default, truth),
        corr(as_one, truth),
        corr(other, exact),
    )
    print(
        f"\nagreement over {truth.size} tokens: r(server exact 10, local) = {r_exact:.4f};"
        f" r(server, branch_min_share=0.01, local) = {r_default:.4f}; max |diff| {np.abs(exact - truth).max():.3f};"
        f" r(server counting p('1') as 1, local) = {r_one:.4f}; negative control r(other explanation) = {r_other:.4f}"
    )
    print("local :", np.round(truth, 2).tolist())
    print("server:", np.round(exact, 2).tolist())
    assert truth.std() > 0.5, "the explanation must make the levels vary, or a correlation says nothing"
    assert r_exact >= 0.95 and r_default >= 0.95
    assert r_one < 0.95, "the negative control must fail the check"


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_two_samples_per_request_from_the_real_server(api: str, request: pytest.FixtureRequest) -> None:
    """The explainer's default is two samples (`n=2`); llama-cpp-python answers some `n=2` requests
    with one choice (seen in CI on both endpoints), which the backend then completes with single
    requests: either way two texts come back, not a malformed response."""
    base_url, model = (request.getfixturevalue("server"), SERVED) if api == "completions" else (
        request.getfixturevalue("chat_server"), CHAT_SERVED)  # fmt: skip
    llm = OpenAIBackend(model, base_url, api=api, max_concurrency=1, timeout_s=SERVER_TIMEOUT_S)
    params = GenerationParams(max_tokens=6, temperature=1.0, n=2, seed=3, stop=("\n",))
    prompt = "Name a fruit:" if api == "completions" else [{"role": "user", "content": "Name a fruit."}]
    (done,) = llm.complete([prompt], params)
    assert not isinstance(done, LLMFailure), done
    assert len(done.texts) == 2 and 1 <= llm.usage.snapshot()["requests"] <= 2


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_detection_and_fuzzing_labels_from_the_real_server(
    api: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The classification scorer on a real server: one prompt of three texts per scorer, answered as a
    list of labels with P("1") from the label tokens' top logprobs (completions on the base Gemma,
    whose prompt ends in "Answer: ["; chat on the instruct model), or an unreadable answer with its
    reason; a second scoring is answered from the response cache. Small models: plumbing, not quality."""
    base_url, model = (request.getfixturevalue("server"), SERVED) if api == "completions" else (
        request.getfixturevalue("chat_server"), CHAT_SERVED)  # fmt: skip
    classifier = served(base_url, SimulatorResource, api, tmp_path, model).classifier()
    texts = [
        Shown(("In", " 1987", " we", " baked", " 12", " pies"), (False, True, False, False, True, False)),
        Shown(("The", " cat", " sat", " on", " the", " mat"), (False, True, False, False, False, False)),
        Shown(("It", " rained", " for", " 2", " days"), (False, False, False, True, False)),
    ]
    readable: dict[str, bool] = {}
    for scorer in (DETECTION, FUZZING):
        (answer,) = classifier.classify(scorer, "numbers written with digits", [texts])
        assert isinstance(answer, Answer), answer
        assert answer.prompt_tokens > 100
        print(api, scorer, answer)
        readable[scorer] = answer.problem is None
        if answer.problem is None:
            assert all(v in (0, 1) for v in answer.labels) and len(answer.labels) == 3
            assert answer.probabilities is not None and all(p is None or 0.0 <= p <= 1.0 for p in answer.probabilities)
        else:
            assert answer.problem.startswith("unreadable answer:") and answer.labels == [None] * 3
    # Whether the small base model writes exactly three labels varies (measured: '0, 1, 2' and
    # '1, 0, 0, 1' as well as readable lists), so either outcome passes, each checked above; reading
    # P("1") from label logprobs is tested on scripted replies in test_classify_backends.py.
    if readable[DETECTION]:  # a read answer is cached: scoring it again asks nothing
        before = classifier.usage.snapshot()
        classifier.classify(DETECTION, "numbers written with digits", [texts])
        assert classifier.usage.since(before)["requests"] == 0
