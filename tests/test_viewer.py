"""The neuron viewer for real: the digit model (with HTML-like tokens in its vocabulary) through every
stage, both directions captured, with an OpenAI-compatible server on loopback whose explanations
carry HTML too, rendered by the `neuron_viewer` asset and opened from disk in headless Chromium; and
a hand-made layer holding every kind of row the page shows, hostile and odd text in each string,
whose rendering in Chromium is compared cell by cell with what the data says."""

from __future__ import annotations

import html
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import artifacts_dir, chromium
from conftest import loopback_llm, query, run_stages
from loopback_llm import LoopbackServer, ServerState
from test_odd_unicode import ODD
from tiny_models import DIGIT_NEURON, write_digit_corpus, write_digit_model

from assets.config import AblationConfig, ExplainConfig, SamplingConfig
from assets.resources import CorpusResource, SubjectModelResource
from pipeline.core.errors import AtlasInputError
from pipeline.core.scoring import Discrimination
from pipeline.infra.viewer import DATA_FILE, LayerData, NeuronPage, UnitView, load_layer, read_data, write_layer
from pipeline.infra.warehouse import open_warehouse

# Tokens a page must show as text: each would change the page title if it ever ran.
HOSTILE_TOKENS = (
    "<script>document.title='pwned-token'</script>",
    "<img/src=x/onerror=document.title='pwned-img'>",
    '"><b>bold</b>',
)
EXPLANATION = " digits <script>document.title='pwned-explanation'</script> & numbers.\n"
NEURONS = [DIGIT_NEURON, 5, 6]
LINK = re.compile(r'href="#(\d+)/(pos|neg)"')
# What the page's script collects of a rendered neuron view.
RECORDS_JS = """return Array.from(document.querySelectorAll('#units .record')).map(r => ({
  cls: r.className, label: r.querySelector('.label').textContent,
  cells: Array.from(r.querySelectorAll('.tok')).map(t => [t.className, t.title, t.textContent,
    t.style.getPropertyValue('--a'), getComputedStyle(t).backgroundColor])}))"""
ROWS_JS = """return Array.from(document.querySelectorAll(arguments[0])).map(
  r => Array.from(r.children).map(c => c.textContent))"""


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
            # Both directions, so the page shows a '-' unit beside each '+' one.
            sampling=SamplingConfig(top_k=8, random_k=8, quantile_bins=2, per_quantile=2, negative="on"),
            **loopback_llm(server, max_concurrency=2),
            explain=ExplainConfig(neuron_ids=NEURONS),
            ablation=AblationConfig(top_n=2 * len(NEURONS), random_n=0),
        )
    assert result.success
    return database, result


def _html(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _scaled(value: float, decimals: int) -> int:
    """An activation in the data file: value * 10**decimals, an integer."""
    return int(f"{value:.{decimals}f}".replace(".", ""))


def _units(database: Path) -> list[tuple[int, str]]:
    return query(database)("select distinct neuron, polarity from atlas.explanations where layer = 0 order by all")


def test_the_asset_writes_one_page_and_one_data_file_per_layer(viewer_run: tuple) -> None:
    database, result = viewer_run
    layer_dir = database.parent / "viewer" / "layer_0"
    assert sorted(p.name for p in layer_dir.iterdir()) == [DATA_FILE, "index.html"]
    assert 'href="layer_0/index.html"' in _html(database.parent / "viewer" / "index.html")
    units = _units(database)
    assert {p for _, p in units} == {"+", "-"} and {n for n, _ in units} == set(NEURONS)
    (event,) = result.asset_materializations_for_node("neuron_viewer")
    metadata = event.metadata
    assert metadata["index"].value == str(layer_dir / "index.html")
    assert metadata["open"].value == (layer_dir / "index.html").as_uri()
    assert metadata["explained_neurons"].value == len(NEURONS) and metadata["units"].value == len(units)
    assert metadata["data_bytes"].value == (layer_dir / DATA_FILE).stat().st_size
    assert "pages" not in metadata


def test_the_index_is_sorted_by_score_and_links_every_unit(viewer_run: tuple) -> None:
    database, _ = viewer_run
    index = _html(database.parent / "viewer" / "layer_0" / "index.html")
    linked = [(int(n), "+" if d == "pos" else "-") for n, d in LINK.findall(index)]
    scores = {
        (n, p): s
        for n, p, s in query(database)(
            "select neuron, polarity, corr_all from atlas.scores where best and split = 'test' and layer = 0"
        )
    }
    units = _units(database)
    assert sorted(linked) == units

    def key(unit: tuple[int, str]) -> tuple[float, int, str]:
        score = scores.get(unit)
        return (-score if score is not None and math.isfinite(score) else math.inf, *unit)

    assert linked == sorted(units, key=key)
    assert 'id="search"' in index and index.count("<script") == 2  # the data file and the page's own script


def _stored_acts(q, neuron: int, polarity: str, kind: str, seq_id: int) -> list[float]:
    """A layer-0 record's activations as stored: unit_examples refers to the neuron's `top`
    (`bottom` for '-') or `random` list of activation_records, whose `sequences` keep 8-bit codes
    on each sequence's [min_act, max_act]."""
    name = "random" if kind == "random" else ("bottom" if polarity == "-" else "top")
    ((listed, rec),) = q(
        f"select len(list_filter({name}, lambda r: r.seq_id = {int(seq_id)})),"
        f" list_filter(sequences, lambda s: s.seq_id = {int(seq_id)})[1] from atlas.activation_records"
        " where layer = 0 and neuron = ?",
        [neuron],
    )
    assert listed == 1
    lo, hi = np.float64(rec["min_act"]), np.float64(rec["max_act"])
    return (lo + np.asarray(rec["codes"], np.float64) * (hi - lo) / 255).astype(np.float32).tolist()


def test_the_data_file_holds_every_record_and_simulation_of_both_directions(viewer_run: tuple) -> None:
    database, _ = viewer_run
    data = read_data(_html(database.parent / "viewer" / "layer_0" / DATA_FILE))
    q = query(database)
    corpus = dict(q("select seq_id, tokens from atlas.corpus_tokens"))
    neurons = {n["neuron"]: n for n in data["neurons"]}
    assert sorted(neurons) == sorted(NEURONS) and data["layer"] == 0
    for neuron, polarity in _units(database):
        (unit,) = [u for u in neurons[neuron]["units"] if u["polarity"] == polarity]
        ((records, max_activation, top),) = q(
            "select records, max_activation, top_tokens from atlas.unit_examples"
            " where layer = 0 and neuron = ? and polarity = ?",
            [neuron, polarity],
        )
        assert unit["max_activation"] == max_activation
        # Values keep 3 decimals, more for a neuron with a scale below 1 (so its shading keeps 3 too).
        smallest = min(u["max_activation"] for u in neurons[neuron]["units"] if u["max_activation"] > 0)
        decimals = neurons[neuron]["decimals"]
        assert decimals == min(12, 3 + max(0, math.ceil(-math.log10(smallest))))
        assert [t["token"] for t in unit["top_tokens"]] == [t["token"] for t in top]
        assert len(unit["records"]) == len(records) > 0
        for shown, rec in zip(unit["records"], records, strict=True):
            assert [shown[k] for k in ("record_kind", "split", "split_rank")] == [
                rec[k] for k in ("kind", "split", "split_rank")
            ]
            assert [data["vocab"][i] for i in data["seqs"][shown["seq"]]] == corpus[rec["seq_id"]]
            stored = _stored_acts(q, neuron, polarity, rec["kind"], rec["seq_id"])
            assert shown["acts"] == [_scaled(v, decimals) for v in stored]
        simulated = q(
            "select s.seq_id, s.true_acts, s.simulated from atlas.simulations s join atlas.scores c"
            " using (layer, neuron, polarity, kind, sample_index) where c.best and c.split = 'test'"
            " and s.split = 'test' and not s.control and s.layer = 0 and s.neuron = ? and s.polarity = ?"
            " and s.simulated is not null order by s.record_kind desc, s.split_rank",
            [neuron, polarity],
        )
        sign = 1 if polarity == "+" else -1
        assert [(s["seq"], s["true"], s["simulated"]) for s in unit["simulations"]] == [
            (str(seq), [_scaled(sign * v, decimals) for v in true], [_scaled(v, 3) for v in sim])
            for seq, true, sim in simulated
        ]
        explanations = q(
            "select kind, sample_index, explanation from atlas.explanations where layer = 0 and neuron = ?"
            " and polarity = ? order by kind, sample_index",
            [neuron, polarity],
        )
        assert [(e["kind"], e["sample_index"], e["explanation"]) for e in unit["explanations"]] == explanations
    # The digit neuron's negative side is GELU's tail on non-digits (about -1e-6): 3 decimals would show it blank.
    assert neurons[DIGIT_NEURON]["decimals"] > 6
    ablated = q("select neuron, polarity, ablation_score from atlas.ablations where layer = 0")
    assert ablated
    for neuron, polarity, score in ablated:
        (unit,) = [u for u in neurons[neuron]["units"] if u["polarity"] == polarity]
        assert unit["ablation"]["ablation_score"] == score


def test_tokens_and_explanations_are_escaped_never_markup(viewer_run: tuple) -> None:
    database, _ = viewer_run
    layer_dir = database.parent / "viewer" / "layer_0"
    data_js = _html(layer_dir / DATA_FILE)
    # Every string of the data file is JSON inside a script: no raw markup character at all.
    assert not set("<>&\u2028\u2029") & set(data_js)
    data = read_data(data_js)
    assert set(HOSTILE_TOKENS) <= set(data["vocab"]), "the hostile tokens should be in some record"
    explanations = {e["explanation"] for n in data["neurons"] for u in n["units"] for e in u["explanations"]}
    assert "digits <script>document.title='pwned-explanation'</script> & numbers" in explanations
    pages = list((database.parent / "viewer").rglob("*.html"))
    assert len(pages) == 2
    for path in pages:
        text = _html(path)
        assert "pwned" not in text.replace("&#x27;pwned", "")  # only inside escaped attribute-safe text
        assert "<img" not in text and "<b>bold" not in text
        assert "Content-Security-Policy" in text
    index = _html(layer_dir / "index.html")
    assert index.count("<script>") == 1 and index.count(f'<script src="{DATA_FILE}"></script>') == 1
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+' 'self'\"", index)


def _row_texts(index: Path) -> list[str]:
    """The text of each row of the index's table, read from the file."""
    rows = re.findall(r"<tr><td class=num><a href=.*?</tr>", _html(index))
    return [html.unescape(re.sub(r"<[^>]+>", "", row)) for row in rows]


def _titled(driver: Any, title: str) -> None:
    """Waits for the page's title: a link to `#...` changes the view on the `hashchange` event, a
    moment after the click."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, 10, poll_frequency=0.05).until(lambda d: d.title == title)
    except TimeoutException:
        pytest.fail(f"title {driver.title!r}, not {title!r}, at {driver.current_url}", pytrace=False)


def _shading(driver: Any) -> dict[str, int]:
    """Shaded token cells of the neuron view by colour (green: '+', purple: '-', blue: simulated)."""
    colours = {"0, 140, 60": "green", "130, 40, 170": "purple", "40, 90, 220": "blue"}
    counts = dict.fromkeys(colours.values(), 0)
    for record in driver.execute_script(RECORDS_JS):
        for _cls, _title, _text, alpha, colour in record["cells"]:
            rgb = ", ".join(re.findall(r"[\d.]+", colour)[:3])  # rgba(r, g, b, a), or rgb(r, g, b) at a = 1
            if float(alpha) > 0:
                counts[colours[rgb]] += 1
    return counts


def test_a_click_through_the_pages_in_chromium_shows_both_directions(viewer_run: tuple) -> None:
    from selenium.webdriver.common.by import By

    database, _ = viewer_run
    layer_dir = database.parent / "viewer" / "layer_0"
    data = read_data(_html(layer_dir / DATA_FILE))
    (neuron,) = [n for n in data["neurons"] if n["neuron"] == DIGIT_NEURON]
    expected_rows = {u["polarity"]: len(u["records"]) + 2 * len(u["simulations"]) for u in neuron["units"]}
    assert set(expected_rows) == {"+", "-"} and all(
        u["simulations"] for u in neuron["units"]
    )  # each direction has true vs simulated rows
    n_units = len(_units(database))
    out = artifacts_dir()
    with chromium() as driver:
        driver.get((database.parent / "viewer" / "index.html").as_uri())
        driver.find_element(By.LINK_TEXT, "layer 0").click()
        _titled(driver, "Layer 0 neurons")
        rows = driver.find_elements(By.CSS_SELECTOR, "#neurons tbody tr")
        assert len(rows) == n_units
        driver.save_screenshot(str(out / "viewer_index.png"))
        box = driver.find_element(By.ID, "search")
        box.send_keys("no such explanation anywhere")
        assert driver.find_element(By.ID, "shown").text == "0"
        assert all(not r.is_displayed() for r in rows)
        box.clear()
        box.send_keys("Tokens")  # the token-space explanations ("tokens ..."): the LLM's one reply is degenerate
        hits = [r.is_displayed() for r in rows]
        assert hits == ["tokens" in text.lower() for text in _row_texts(layer_dir / "index.html")] and any(hits)
        assert driver.find_element(By.ID, "shown").text == str(sum(hits))

        driver.find_element(By.CSS_SELECTOR, f'a[href="#{DIGIT_NEURON}/pos"]').click()
        _titled(driver, f"L0 N{DIGIT_NEURON}")
        assert driver.current_url.endswith(f"index.html#{DIGIT_NEURON}/pos")
        assert not driver.find_element(By.ID, "index-view").is_displayed()
        heading = driver.find_element(By.ID, "heading").text
        assert heading == f"Layer 0, neuron {DIGIT_NEURON}"
        headings = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#units h2")]
        assert [h.split(" · ")[0] for h in headings] == ["Direction positive (+)", "Direction negative (−)"]
        records = driver.execute_script(RECORDS_JS)
        assert len(records) == sum(expected_rows.values())
        assert all(len(r["cells"]) == 16 for r in records)  # seq_len tokens per row
        shading = _shading(driver)
        assert shading["green"] > 0 and shading["purple"] > 0 and shading["blue"] > 0, shading
        assert driver.find_elements(By.CSS_SELECTOR, ".ablation-score")
        top = neuron["units"][0]["top_tokens"][0]["token"]
        assert top.isdigit() and top in [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#units td .tok")]
        assert not driver.find_elements(By.TAG_NAME, "img") and not driver.find_elements(By.TAG_NAME, "b")
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "<script>document.title='pwned-explanation'</script>" in body
        ids = {t: i for i, t in enumerate(data["vocab"])}
        hostile = {t for u in neuron["units"] for r in u["records"] for t in HOSTILE_TOKENS
                   if ids.get(t, -1) in data["seqs"][r["seq"]]}  # fmt: skip
        assert hostile and all(t in body for t in hostile)  # the records' hostile tokens, shown as text
        driver.save_screenshot(str(out / "viewer_neuron.png"))

        driver.back()
        _titled(driver, "Layer 0 neurons")
        assert driver.find_element(By.ID, "index-view").is_displayed()
        assert not driver.find_elements(By.CSS_SELECTOR, "#units *")
        assert driver.find_element(By.ID, "search").get_attribute("value") == "Tokens"  # the same page, kept

        driver.find_element(By.CSS_SELECTOR, f'a[href="#{DIGIT_NEURON}/neg"]').click()
        _titled(driver, f"L0 N{DIGIT_NEURON}")
        neg = driver.find_element(By.ID, "neg")
        assert neg.text.startswith("Direction negative (−) · max ")
        assert driver.execute_script("return arguments[0].getBoundingClientRect().top", neg) < 50  # scrolled to
        driver.save_screenshot(str(out / "viewer_neuron_neg.png"))
        driver.find_element(By.LINK_TEXT, "← layer index").click()
        _titled(driver, "Layer 0 neurons")
        assert driver.find_element(By.ID, "neurons").is_displayed()
    for name in ("viewer_index.png", "viewer_neuron.png", "viewer_neuron_neg.png"):
        assert (out / name).stat().st_size > 5000


# ---------------------------------------------------------------- a hand-made layer

# Every string a record may hold, hostile to HTML, to the script holding the data, or odd Unicode.
TOKENS = [
    *HOSTILE_TOKENS,
    "</script><script>document.title='pwned-data'</script>",
    "]};document.title='pwned-js';//",
    "<!--",
    "&amp;",
    "line\u2028sep",
    "\u2029",
    "\x00",
    "\n",
    "\t\r",
    "",
    " ",
    "it's",
    'say "hi"',
    "back\\slash",
    *ODD,
]
ACTS = [round(0.3712 * i * (-1) ** i, 4) for i in range(len(TOKENS))]


def _explanation(kind: str, index: int, text: str | None, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "sample_index": index, "explanation": text, "failure_reason": None,
            "degenerate_reason": None, "selected": False, "best": False} | extra  # fmt: skip


def _unit(polarity: str, max_activation: float, sign: int, factor: float = 1.0) -> UnitView:
    acts = [factor * a for a in ACTS]
    records = [
        {"record_kind": "top", "split": "train", "split_rank": 0, "seq_id": 11, "tokens": TOKENS,
         "acts": [sign * abs(a) for a in acts]},
        {"record_kind": "top", "split": "test", "split_rank": 1, "seq_id": 12, "tokens": TOKENS[::-1],
         "acts": [sign * 0.5, math.nan, *acts]},
        {"record_kind": "random", "split": "valid", "split_rank": 0, "seq_id": 11, "tokens": TOKENS, "acts": acts},
    ]  # fmt: skip
    explanations = [
        _explanation("llm", 0, EXPLANATION + polarity, valid_score=0.41, test_score=0.3333, control_corr_all=0.1,
                     gap=0.2333, r2_all=0.05, selected=True, best=True),
        _explanation("llm", 1, "the same <i>reply</i>", degenerate_reason="copied <u>the</u> prompt",
                     valid_score=-0.2),
        _explanation("token_space", 0, '"1", "2"', valid_score=0.0625, test_score=0.0625, selected=True),
        _explanation("token_lookup", 0, None, failure_reason="no <b>tokens</b>", selected=True,
                     test_reason="constant <simulation>"),
    ]  # fmt: skip
    simulations = [
        {"record_kind": "top", "split_rank": 1, "seq_id": 12, "tokens": TOKENS[::-1],
         "true_acts": [abs(a) for a in acts], "simulated": [abs(a) % 10 for a in ACTS]},
    ]  # fmt: skip
    top_tokens = [{"token": t, "mean_activation": 1.5 - i / 8, "count": 3 + i} for i, t in enumerate(TOKENS[:5])]
    ablation = {"kind": "llm", "sample_index": 0, "ablation_score": 0.5625, "ablation_score_reason": None,
                "kl_mean": 0.12345, "kl_simulated": 0.01, "failure_reason": "partly <b>cut</b>"}  # fmt: skip
    classification = {
        "detection": {"balanced_accuracy": 0.75, "balanced_accuracy_reason": None, "control_balanced_accuracy": 0.5,
                      "gap": 0.25, "auc": 0.8125, "f1": 0.7, "n_positive": 4, "n_negative": 5, "failure_reason": None},
        "fuzzing": {"balanced_accuracy": None, "balanced_accuracy_reason": "one <class> only",
                    "control_balanced_accuracy": None, "gap": None, "auc": None, "f1": None, "n_positive": None,
                    "n_negative": None, "failure_reason": None},
    }  # fmt: skip
    return UnitView(polarity, max_activation, top_tokens, records, explanations, simulations, ablation, classification)


def hand_made_layer() -> LayerData:
    no_signal = Discrimination(2, 0.3, 0.3, 0.0, 0.9, False, "the <simulator> scores right and wrong alike.")
    return LayerData(
        "model <i>x</i>",
        "rev & 1",
        3,
        10,
        [
            NeuronPage(7, [_unit("+", 2.0, 1), _unit("-", 0.75, -1)]),
            NeuronPage(9, [_unit("+", math.nan, 1)]),
            NeuronPage(11, [_unit("+", 0.002, 1, factor=0.0003)]),  # a small scale: values kept to 6 decimals
        ],
        signal=no_signal,
        simulator="loop:<model>",
    )


def _visible(token: str) -> str:
    return token.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍") or "∅"


def _cells(
    tokens: list[str], values: list[float], decimals: int, scale: float, negative: float | None
) -> list[list[str]]:
    """What a heatmap row shows of each token, from the values (kept to `decimals`) and scales."""
    cells = []
    for token, value in zip(tokens, values, strict=False):
        # The data file keeps values to `decimals` (as integers: -0.000 is 0.000).
        shown = float(f"{value:.{decimals}f}") + 0.0 if math.isfinite(value) else value
        alpha, neg = 0.0, ""
        if math.isfinite(shown) and shown >= 0:
            alpha = min(1.0, shown / scale)
        elif math.isfinite(shown) and negative:
            alpha, neg = min(1.0, -shown / negative), " neg"
        cells.append([f"tok{neg}", f"{token!r}: {shown:.3f}", _visible(token), f"{alpha:.3f}"])
    return cells


def _expected_records(page: NeuronPage, decimals: int) -> list[tuple[str, str, list[list[str]]]]:
    pos = next(u.max_activation for u in page.units if u.polarity == "+")
    pos = pos if math.isfinite(pos) else 1.0
    neg = next((u.max_activation for u in page.units if u.polarity == "-"), None)
    rows = []
    for unit in page.units:
        sign = 1 if unit.polarity == "+" else -1
        for s in unit.simulations:
            label = f"{s['record_kind']} {s['split_rank']}"
            true = [sign * v for v in s["true_acts"]]
            rows.append(("record true", f"{label} true", _cells(s["tokens"], true, decimals, pos, neg)))
            rows.append(("record sim", f"{label} sim", _cells(s["tokens"], s["simulated"], 3, 10.0, None)))
        for kind in ("top", "random"):
            rows += [
                ("record true", f"{r['split']} {r['split_rank']}", _cells(r["tokens"], r["acts"], decimals, pos, neg))
                for r in unit.records
                if r["record_kind"] == kind
            ]
    return rows


def test_a_hand_made_layer_renders_every_section_exactly_and_safely(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    layer = hand_made_layer()
    index = write_layer(layer, tmp_path / "viewer")
    assert sorted(p.name for p in index.parent.iterdir()) == [DATA_FILE, "index.html"]
    broken = tmp_path / "no_data" / "layer_3"
    shutil.copytree(index.parent, broken)
    (broken / DATA_FILE).unlink()
    # A page whose data.js is from another render (the layer was rewritten while it loaded).
    stale = tmp_path / "stale" / "layer_3"
    shutil.copytree(index.parent, stale)
    page = _html(stale / "index.html")
    assert page.count('data-render="') == 1 and read_data(_html(stale / DATA_FILE))["render"] in page
    (stale / "index.html").write_text(re.sub(r'data-render="\w+"', 'data-render="0"', page), encoding="utf-8")
    with chromium() as driver:
        driver.get(index.as_uri())
        assert driver.title == "Layer 3 neurons"
        links = [a.get_attribute("href").rsplit("#", 1)[1] for a in driver.find_elements(By.CSS_SELECTOR, "#neurons a")]
        assert links == ["7/pos", "7/neg", "9/pos", "11/pos"]  # the same test score: by neuron, then direction
        index_row = driver.execute_script(ROWS_JS, "#neurons tbody tr")[0]
        assert index_row[2:11] == ["0.333", "0.100", "0.233", "0.062", "—", "0.562", "0.750", "—",
                                   EXPLANATION + "+ (LLM)"]  # fmt: skip
        assert driver.find_element(By.ID, "no-signal").is_displayed()

        driver.find_element(By.CSS_SELECTOR, 'a[href="#7/pos"]').click()
        _titled(driver, "L3 N7")
        assert (
            driver.find_element(By.ID, "no-signal").is_displayed() and driver.find_element(By.ID, "back").is_displayed()
        )
        assert not driver.find_element(By.ID, "index-view").is_displayed()
        assert not driver.find_elements(By.ID, "stale")
        _same_records(driver.execute_script(RECORDS_JS), _expected_records(layer.neurons[0], 4))  # scale 0.75
        explanations = driver.execute_script(ROWS_JS, "#units h2 + table tr")
        header = ["kind", "#", "explanation", "valid", "test", "control", "gap", "r²"]
        unit_rows = [
            header,
            ["LLM best", "0", EXPLANATION + "+", "0.410", "0.333", "0.100", "0.233", "0.050"],
            ["LLM", "1", "the same <i>reply</i> (degenerate: copied <u>the</u> prompt)", "-0.200", "—", "—", "—",
             "—"],
            ["token space chosen", "0", '"1", "2"', "0.062", "0.062", "—", "—", "—"],
            ["token lookup (reference) chosen", "0", "no explanation: no <b>tokens</b> (constant <simulation>)", "—",
             "—", "—", "—", "—"],
        ]  # fmt: skip
        assert explanations == unit_rows + [r if r[0] != "LLM best" else [*r[:2], EXPLANATION + "-", *r[3:]]
                                            for r in unit_rows]  # fmt: skip
        ablation = [e.text for e in driver.find_elements(By.XPATH, "//p[strong[@class='ablation-score']]")]
        assert ablation == [
            "ablation score 0.562 (LLM #0; KL mean-ablated 0.1235, simulated 0.0100) partly <b>cut</b>"
        ] * 2  # fmt: skip
        assert driver.execute_script(ROWS_JS, "#units tr[class^=classification-]") == [
            ["detection", "0.750", "0.500", "0.250", "0.812", "0.700", "4 + 5"],
            ["fuzzing one <class> only", "—", "—", "—", "—", "—", ""],
        ] * 2  # fmt: skip
        top = [r for r in driver.execute_script(ROWS_JS, "#units table tr") if len(r) == 3 and r[0] != "token"]
        assert top == [[_visible(t), f"{1.5 - i / 8:.3f}", str(3 + i)] for i, t in enumerate(TOKENS[:5])] * 2
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "simulated from the best explanation (LLM #0): " + EXPLANATION.strip() in body
        assert "Test records: true activations (purple) and simulated (blue)" in body
        assert "Top records (negative (−))" in body and "Random records (positive (+))" in body
        assert "model <i>x</i> @ rev & 1" in body and "loop:<model>" in body
        # Nothing hostile ran or became markup: the page's two scripts, no element from a string.
        assert driver.execute_script("return document.scripts.length") == 2
        for tag in ("img", "b", "i", "u", "class", "simulation", "model"):
            assert not driver.find_elements(By.TAG_NAME, tag), tag

        driver.get(index.as_uri() + "#9")  # a neuron opened directly; max activation NaN: scale 1
        _titled(driver, "L3 N9")
        assert driver.find_element(By.ID, "pos").text == "Direction positive (+) · max —"
        _same_records(driver.execute_script(RECORDS_JS), _expected_records(layer.neurons[1], 3))
        driver.get(index.as_uri() + "#11")
        _titled(driver, "L3 N11")
        _same_records(driver.execute_script(RECORDS_JS), _expected_records(layer.neurons[2], 6))
        assert driver.find_element(By.ID, "pos").text == "Direction positive (+) · max 0.002"
        driver.get(index.as_uri() + "#8")
        _titled(driver, "L3 N8")
        assert driver.find_element(By.ID, "units").text == "Neuron 8 has no explained unit in this layer."
        driver.get((stale / "index.html").as_uri() + "#7")
        assert driver.find_element(By.ID, "stale").text.endswith("(it was rewritten meanwhile): reload the page.")
        assert driver.find_elements(By.CSS_SELECTOR, "#units .record")  # shown all the same
        driver.get((broken / "index.html").as_uri() + "#7")
        assert "data file (data.js, beside this page) did not load" in driver.find_element(By.ID, "units").text
        driver.find_element(By.LINK_TEXT, "← layer index").click()
        _titled(driver, "Layer 3 neurons")
        assert (
            driver.find_element(By.ID, "index-view").is_displayed()
            and not driver.find_element(By.ID, "back").is_displayed()
        )
        assert len(driver.find_elements(By.CSS_SELECTOR, "#neurons tbody tr")) == 4  # the index needs no data


def _same_records(shown: list[dict], expected: list[tuple[str, str, list[list[str]]]]) -> None:
    assert [(r["cls"], r["label"]) for r in shown] == [(cls, label) for cls, label, _ in expected]
    for record, (_, label, cells) in zip(shown, expected, strict=True):
        assert [c[:4] for c in record["cells"]] == cells, label


def test_a_failed_render_leaves_the_previous_files(tmp_path: Path) -> None:
    good = LayerData("m", "r", 2, 1, [NeuronPage(7, [UnitView("+", 1.0, [], [], [], [])])])
    index = write_layer(good, tmp_path)
    before = {p.name: p.read_bytes() for p in index.parent.iterdir()}
    broken = LayerData("m", "r", 2, 1, [NeuronPage(7, [UnitView("+", 1.0, [{"no token": 1}], [], [], [])])])
    with pytest.raises(KeyError):
        write_layer(broken, tmp_path)
    assert {p.name: p.read_bytes() for p in index.parent.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "layer_2"]  # no staging left behind


def test_a_rewrite_removes_the_per_neuron_pages_of_older_versions(tmp_path: Path) -> None:
    old = tmp_path / "layer_2"
    old.mkdir()
    for name in ("index.html", "neuron_7.html", "neuron_8.html"):
        (old / name).write_text("<p>old</p>", encoding="utf-8")
    write_layer(LayerData("m", "r", 2, 1, [NeuronPage(7, [UnitView("+", 1.0, [], [], [], [])])]), tmp_path)
    assert sorted(p.name for p in old.iterdir()) == [DATA_FILE, "index.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "layer_2"]


def test_a_layer_without_records_is_a_clear_error(viewer_run: tuple) -> None:
    database, _ = viewer_run
    with open_warehouse(str(database), read_only=True) as conn:
        with pytest.raises(AtlasInputError, match="layer 1 has no unit_examples"):
            load_layer(conn, 1)
