"""The neuron viewer for real: the digit model (with HTML-like tokens in its vocabulary) through every
stage with an OpenAI-compatible server on loopback whose explanations carry HTML too, rendered by
the `neuron_viewer` asset and opened from disk in headless Chromium."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from browser import artifacts_dir, chromium
from conftest import loopback_llm, query, run_stages
from loopback_llm import LoopbackServer, ServerState
from tiny_models import DIGIT_NEURON, write_digit_corpus, write_digit_model

from assets.resources import (
    AblationResource,
    CorpusResource,
    ExplainResource,
    SamplingResource,
    SubjectModelResource,
)
from pipeline.errors import AtlasInputError
from pipeline.viewer import LayerData, NeuronPage, UnitView, load_layer, write_layer
from pipeline.warehouse import open_warehouse

# Tokens a page must show as text: each would change the page title if it ever ran.
HOSTILE_TOKENS = (
    "<script>document.title='pwned-token'</script>",
    "<img/src=x/onerror=document.title='pwned-img'>",
    '"><b>bold</b>',
)
EXPLANATION = " digits <script>document.title='pwned-explanation'</script> & numbers.\n"
NEURONS = [DIGIT_NEURON, 5, 6]


@pytest.fixture(scope="module")
def viewer_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("viewer")
    model = write_digit_model(root / "model", extra_words=HOSTILE_TOKENS)
    corpus = write_digit_corpus(root / "corpus.jsonl", extra_words=HOSTILE_TOKENS)
    database = root / "neuron_atlas.duckdb"
    # Varied echo probabilities, so simulated rows differ from token to token.
    state = ServerState(
        replies=[("the main thing this neuron does is find", EXPLANATION)],
        slot_probs=[{"0": 1.0}, {"10": 0.7, "0": 0.3}, {"5": 1.0}],
    )
    with LoopbackServer(state) as server:
        result = run_stages(
            database,
            n_layers=2,
            layers=(0, 0),
            subject=SubjectModelResource(model=str(model)),
            corpus=CorpusResource(source=str(corpus), seq_len=16, n_sequences=48, seed=3),
            sampling=SamplingResource(top_k=8, random_k=8, quantile_bins=2, per_quantile=2),
            **loopback_llm(server, max_concurrency=2),
            explain=ExplainResource(neuron_ids=NEURONS),
            ablation=AblationResource(top_n=len(NEURONS), random_n=0),
        )
    assert result.success
    return database, result


def _html(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_the_asset_writes_an_index_and_a_page_per_explained_neuron(viewer_run: tuple) -> None:
    database, result = viewer_run
    layer_dir = database.parent / "viewer" / "layer_0"
    assert sorted(p.name for p in layer_dir.iterdir()) == ["index.html"] + [f"neuron_{n}.html" for n in sorted(NEURONS)]
    assert 'href="layer_0/index.html"' in _html(database.parent / "viewer" / "index.html")
    (event,) = result.asset_materializations_for_node("neuron_viewer")
    metadata = event.metadata
    assert metadata["index"].value == str(layer_dir / "index.html")
    assert metadata["open"].value == (layer_dir / "index.html").as_uri()
    assert metadata["pages"].value == len(NEURONS) + 1 and metadata["explained_neurons"].value == len(NEURONS)


def test_the_index_is_sorted_by_score_and_links_every_neuron(viewer_run: tuple) -> None:
    database, _ = viewer_run
    index = _html(database.parent / "viewer" / "layer_0" / "index.html")
    linked = [int(n) for n in re.findall(r'href="neuron_(\d+)\.html#pos"', index)]
    scores = dict(
        query(database)("select neuron, corr_all from atlas.scores where best and split = 'test' and layer = 0")
    )
    assert sorted(linked) == sorted(NEURONS)
    expected = sorted(NEURONS, key=lambda n: (-(scores[n] if scores[n] is not None else float("-inf")), n))
    assert linked == expected
    assert 'id="search"' in index and "<script>" in index  # the search script, the only script


def test_a_neuron_page_shows_every_record_as_a_heatmap_beside_its_simulation(viewer_run: tuple) -> None:
    database, _ = viewer_run
    page = _html(database.parent / "viewer" / "layer_0" / f"neuron_{DIGIT_NEURON}.html")
    q = query(database)
    n_records = q("select len(records) from atlas.top_k_examples where layer = 0 and neuron = ?", [DIGIT_NEURON])
    n_simulated = q(
        "select count(*) from atlas.simulations s join atlas.scores c"
        " using (layer, neuron, polarity, kind, sample_index)"
        " where c.best and c.split = 'test' and s.split = 'test' and not s.control and s.layer = 0 and s.neuron = ?"
        " and s.simulated is not null",
        [DIGIT_NEURON],
    )
    true_rows = page.count('<div class="record true">')
    sim_rows = page.count('<div class="record sim">')
    assert sim_rows == n_simulated[0][0] > 0
    assert true_rows == n_records[0][0] + sim_rows
    assert page.count('<span class="tok"') >= 16 * (true_rows + sim_rows)  # seq_len tokens per row
    ablation = q("select ablation_score from atlas.ablations where layer = 0 and neuron = ?", [DIGIT_NEURON])
    assert ablation and "class=ablation-score" in page
    top = q("select top_tokens[1].token from atlas.top_k_examples where layer = 0 and neuron = ?", [DIGIT_NEURON])
    assert top[0][0].isdigit() and f"<span class=tok>{top[0][0]}</span>" in page


def test_tokens_and_explanations_are_escaped_never_markup(viewer_run: tuple) -> None:
    database, _ = viewer_run
    pages = list((database.parent / "viewer").rglob("*.html"))
    shown = [
        t for t in HOSTILE_TOKENS if any(t.replace("<", "&lt;").replace(">", "&gt;")[:20] in _html(p) for p in pages)
    ]
    assert shown, "the hostile tokens should appear (escaped) in some record"
    for path in pages:
        text = _html(path)
        assert "pwned" not in text.replace("&#x27;pwned", "")  # only inside escaped attribute-safe text
        assert "<img" not in text and "<b>bold" not in text
        assert text.count("<script>") <= 1  # at most the index's own search script
        assert "Content-Security-Policy" in text


def test_the_pages_render_in_chromium_with_search_and_no_injected_script(viewer_run: tuple) -> None:
    from selenium.webdriver.common.by import By

    database, _ = viewer_run
    layer_dir = database.parent / "viewer" / "layer_0"
    out = artifacts_dir()
    with chromium() as driver:
        driver.get((layer_dir / "index.html").as_uri())
        assert driver.title == "Layer 0 neurons"
        rows = driver.find_elements(By.CSS_SELECTOR, "#neurons tbody tr")
        assert len(rows) == len(NEURONS)
        driver.save_screenshot(str(out / "viewer_index.png"))
        box = driver.find_element(By.ID, "search")
        box.send_keys("no such explanation anywhere")
        assert driver.find_element(By.ID, "shown").text == "0"
        assert all(not r.is_displayed() for r in rows)
        box.clear()
        box.send_keys("tokens")  # every unit's best explanation: the LLM's one reply is degenerate
        assert driver.find_element(By.ID, "shown").text == str(len(NEURONS))

        driver.get((layer_dir / f"neuron_{DIGIT_NEURON}.html").as_uri())
        assert driver.title == f"L0 N{DIGIT_NEURON}"  # no injected script changed it
        assert driver.find_elements(By.CSS_SELECTOR, ".record.true .tok")
        assert driver.find_elements(By.CSS_SELECTOR, ".record.sim .tok")
        assert not driver.find_elements(By.TAG_NAME, "img") and not driver.find_elements(By.TAG_NAME, "b")
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "<script>document.title='pwned-explanation'</script>" in body
        shaded = driver.execute_script(
            "return Array.from(document.querySelectorAll('.record.true .tok'))"
            ".filter(e => getComputedStyle(e).backgroundColor !== 'rgba(0, 140, 60, 0)').length"
        )
        assert shaded > 0  # digits are shaded
        driver.save_screenshot(str(out / "viewer_neuron.png"))
    for name in ("viewer_index.png", "viewer_neuron.png"):
        assert (out / name).stat().st_size > 5000


def test_a_failed_render_leaves_the_previous_pages(tmp_path: Path) -> None:
    good = LayerData("m", "r", 2, 1, [NeuronPage(7, [UnitView("+", 1.0, [], [], [], [])])])
    index = write_layer(good, tmp_path)
    before = _html(index)
    broken = LayerData("m", "r", 2, 1, [NeuronPage(7, [UnitView("+", 1.0, [{"no token": 1}], [], [], [])])])
    with pytest.raises(KeyError):
        write_layer(broken, tmp_path)
    assert _html(index) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "layer_2"]  # no staging left behind


def test_a_layer_without_records_is_a_clear_error(viewer_run: tuple) -> None:
    database, _ = viewer_run
    with open_warehouse(str(database), read_only=True) as conn:
        with pytest.raises(AtlasInputError, match="layer 1 has no top_k_examples"):
            load_layer(conn, 1)
