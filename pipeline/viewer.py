"""Static HTML neuron viewer: one folder per layer, opened straight from disk, no server.

Every string that comes from the warehouse (tokens, explanations, model ids) is HTML-escaped, and
each page carries a Content-Security-Policy that only lets the index's own search script run, so a
token such as `<script>` is shown, never executed, even if an escape were ever missed."""

from __future__ import annotations

import base64
import hashlib
import html
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from pipeline.errors import AtlasInputError
from pipeline.interpret import LLM, TOKEN_LOOKUP, TOKEN_SPACE, layer_discrimination
from pipeline.scoring import Discrimination


@dataclass
class UnitView:
    """One direction of a neuron as its section of the page shows it."""

    polarity: str
    max_activation: float
    top_tokens: list[dict[str, Any]]
    records: list[dict[str, Any]]  # top and random records with tokens and raw activations
    explanations: list[dict[str, Any]]  # every candidate, with valid and test scores
    simulations: list[dict[str, Any]]  # the best explanation's test records: true vs simulated
    ablation: dict[str, Any] | None = None
    classification: dict[str, dict[str, Any]] = field(default_factory=dict)  # scorer -> its row

    def balanced_accuracy(self, scorer: str) -> float | None:
        return (self.classification.get(scorer) or {}).get("balanced_accuracy")

    @property
    def best(self) -> dict[str, Any] | None:
        return next((e for e in self.explanations if e.get("best")), None)

    def chosen(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in self.explanations if e["kind"] == kind and e.get("selected")), None)


@dataclass
class NeuronPage:
    neuron: int
    units: list[UnitView]


@dataclass
class LayerData:
    model_id: str
    model_revision: str
    layer: int
    n_neurons: int  # neurons with records in the layer; pages are written for the explained ones
    neurons: list[NeuronPage] = field(default_factory=list)
    signal: Discrimination | None = None  # does the simulator beat its control on this layer?
    simulator: str | None = None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _tables(conn: duckdb.DuckDBPyConnection) -> set[str]:
    rows = conn.execute("select table_name from information_schema.tables where table_schema = 'atlas'").fetchall()
    return {r[0] for r in rows}


def _columns(conn: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    rows = conn.execute(
        "select column_name from information_schema.columns where table_schema = 'atlas' and table_name = ?", [table]
    ).fetchall()
    return {r[0] for r in rows}


def _dicts(conn: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cursor = conn.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def load_layer(conn: duckdb.DuckDBPyConnection, layer: int) -> LayerData:
    """Reads one layer of the current model (the `current_*` views) for the explained units."""
    tables = _tables(conn)
    needed = {"current_top_k_examples", "current_corpus_tokens", "current_explanations"}
    if not needed <= tables:
        raise AtlasInputError(
            f"the warehouse has no {', '.join(sorted(needed - tables))} yet: materialize top_k_examples and "
            "explanations for this layer before the neuron viewer"
        )
    heads = _dicts(
        conn,
        "select model_id, model_revision, count(distinct neuron) as n from atlas.current_top_k_examples "
        "where layer = ? group by all",
        [layer],
    )
    if not heads:
        raise AtlasInputError(f"layer {layer} has no top_k_examples for the current model: materialize it first")
    head = heads[0]
    scored = "current_scores" in tables
    score_cols = (
        ", v.corr_all as valid_score, t.corr_all as test_score, t.corr_all_reason as test_reason, "
        "coalesce(t.failure_reason, v.failure_reason) as score_failure, t.control_corr_all, t.control_reason, "
        "t.control_neuron, t.control_polarity, t.gap, t.r2_all, t.absdev_all, t.r2_all_reason, "
        "coalesce(v.selected, false) as selected, coalesce(v.best, false) as best "
        "from atlas.current_explanations e "
        "left join atlas.current_scores v on v.split = 'valid' and v.model_id = e.model_id and v.layer = e.layer "
        "and v.neuron = e.neuron and v.polarity = e.polarity and v.kind = e.kind and v.sample_index = e.sample_index "
        "left join atlas.current_scores t on t.split = 'test' and t.model_id = e.model_id and t.layer = e.layer "
        "and t.neuron = e.neuron and t.polarity = e.polarity and t.kind = e.kind and t.sample_index = e.sample_index "
        if scored
        else " from atlas.current_explanations e "
    )
    explanations = _dicts(
        conn,
        "select e.neuron, e.polarity, e.kind, e.sample_index, e.explanation, e.failure_reason, e.degenerate_reason"
        + score_cols
        + "where e.layer = ? order by e.neuron, e.polarity, e.kind, e.sample_index",
        [layer],
    )
    by_unit: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in explanations:
        by_unit.setdefault((row["neuron"], row["polarity"]), []).append(row)
    data = LayerData(head["model_id"], head["model_revision"], layer, head["n"])
    if not by_unit:
        return data
    neurons = sorted({n for n, _ in by_unit})
    polarity = (
        "coalesce(polarity, '+') as polarity"
        if "polarity" in _columns(conn, "current_top_k_examples")
        else "'+' as polarity"
    )
    examples = {
        (r["neuron"], r["polarity"]): r
        for r in _dicts(
            conn,
            f"select neuron, {polarity}, max_activation, top_tokens, records from atlas.current_top_k_examples "
            "where layer = ? and list_contains(?, neuron)",
            [layer, neurons],
        )
    }
    seq_ids = sorted({rec["seq_id"] for ex in examples.values() for rec in ex["records"] or []})
    tokens = dict(
        conn.execute(
            "select seq_id, tokens from atlas.current_corpus_tokens where list_contains(?, seq_id)", [seq_ids]
        ).fetchall()
    )
    # The best explanation's test records of every unit of the layer in one query.
    simulated: dict[tuple[int, str], list[dict[str, Any]]] = {}
    if scored and "current_simulations" in tables:
        for row in _dicts(
            conn,
            "select s.neuron, s.polarity, s.record_kind, s.split_rank, s.seq_id, s.true_acts, s.simulated "
            "from atlas.current_simulations s join atlas.current_scores b on b.best and b.split = 'test' "
            "and b.model_id = s.model_id and b.layer = s.layer and b.neuron = s.neuron and b.polarity = s.polarity "
            "and b.kind = s.kind and b.sample_index = s.sample_index "
            "where s.layer = ? and s.split = 'test' and not s.control and s.simulated is not null "
            "order by s.neuron, s.polarity, s.record_kind desc, s.split_rank",
            [layer],
        ):
            simulated.setdefault((row["neuron"], row["polarity"]), []).append(
                row | {"tokens": tokens.get(row["seq_id"], [])}
            )
    ablations: dict[tuple[int, str], dict[str, Any]] = {}
    if "current_ablations" in tables:
        for row in _dicts(
            conn,
            "select neuron, polarity, kind, sample_index, ablation_score, ablation_score_reason, kl_mean, "
            "kl_simulated, failure_reason from atlas.current_ablations where layer = ?",
            [layer],
        ):
            ablations[(row["neuron"], row["polarity"])] = row
    classified: dict[tuple[int, str], dict[str, dict[str, Any]]] = {}
    if "current_classification_scores" in tables:
        for row in _dicts(
            conn,
            "select neuron, polarity, scorer, kind, sample_index, balanced_accuracy, balanced_accuracy_reason, "
            "accuracy, f1, auc, control_balanced_accuracy, control_neuron, control_polarity, gap, n_positive, "
            "n_negative, n_answered, failure_reason from atlas.current_classification_scores where layer = ?",
            [layer],
        ):
            classified.setdefault((row["neuron"], row["polarity"]), {})[row["scorer"]] = row
    for neuron in neurons:
        units = []
        for sign in ("+", "-"):
            ex = examples.get((neuron, sign))
            if ex is None or (neuron, sign) not in by_unit:
                continue
            records = [rec | {"tokens": tokens.get(rec["seq_id"], [])} for rec in ex["records"] or []]
            units.append(
                UnitView(
                    sign,
                    ex["max_activation"],
                    ex["top_tokens"] or [],
                    records,
                    by_unit[(neuron, sign)],
                    simulated.get((neuron, sign), []),
                    ablations.get((neuron, sign)),
                    classified.get((neuron, sign), {}),
                )  # fmt: skip
            )
        if units:
            data.neurons.append(NeuronPage(neuron, units))
    if scored:
        frame = conn.sql(
            "select layer, neuron, polarity, kind, split, selected, best, corr_all, control_corr_all, "
            "simulator_backend, simulator_model from atlas.current_scores where layer = ?",
            params=[layer],
        ).pl()
        data.signal = layer_discrimination(frame, layer)
        sims = frame.filter(frame["kind"] != TOKEN_LOOKUP).select("simulator_backend", "simulator_model").unique()
        data.simulator = ", ".join(f"{b}:{m}" for b, m in sims.iter_rows()) or None
    return data


# ---------------------------------------------------------------- rendering

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: left; }
th { background: #f4f4f4; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #777; } .fail { color: #a33; }
.record { margin: 4px 0 10px; font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.9;
          padding-left: 9em; text-indent: -9em; }
.record .label { display: inline-block; width: 9em; text-indent: 0; color: #666; font-family: system-ui, sans-serif; }
.tok { white-space: pre-wrap; padding: 1px 0; border-right: 1px solid rgba(0, 0, 0, .07); }
.true .tok { --c: 0, 140, 60; } .true .tok.neg { --c: 130, 40, 170; } .sim .tok { --c: 40, 90, 220; }
.warn { background: #fff1e6; border: 1px solid #e0a060; padding: 8px 12px; } .ok { color: #286; }
.tok { background-color: rgba(var(--c), var(--a)); }
#search { font-size: 1em; padding: 4px 8px; width: 28em; margin-bottom: 1em; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _finite(value) else '<span class="muted">—</span>'


def _visible(token: str) -> str:
    """Whitespace-only tokens stay visible; newlines would otherwise break the row."""
    return token.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍") or "∅"


def _csp(script: str | None) -> str:
    if script is None:
        scripts = "'none'"
    else:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        scripts = f"'sha256-{digest}'"
    return f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src {scripts}"


def _page(title: str, body: str, script: str | None = None) -> str:
    script_tag = f"<script>{script}</script>" if script else ""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_csp(script)}">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n{script_tag}</body></html>\n"
    )


def heatmap(tokens: list[str], values: list[float], scale: float, css_class: str, label: str,
            negative_scale: float | None = None) -> str:  # fmt: skip
    """One record as a row of tokens shaded by value / scale (0..1). With `negative_scale`, negative
    values are shaded in their own colour by |value| / negative_scale; otherwise they stay unshaded."""
    cells = []
    for token, value in zip(tokens, values, strict=False):
        alpha, neg = 0.0, ""
        if _finite(value) and value >= 0 and scale > 0:
            alpha = min(1.0, value / scale)
        elif _finite(value) and value < 0 and negative_scale:
            alpha, neg = min(1.0, -value / negative_scale), " neg"
        cells.append(
            f'<span class="tok{neg}" style="--a: {alpha:.3f}" title="{_e(repr(token))}: {value:.3f}">'
            f"{_e(_visible(token))}</span>"
        )
    return f'<div class="record {css_class}"><span class="label">{_e(label)}</span>{"".join(cells)}</div>'


KIND_LABEL = {LLM: "LLM", TOKEN_SPACE: "token space", TOKEN_LOOKUP: "token lookup (reference)"}


def _explanation_row(e: dict[str, Any]) -> str:
    if e["explanation"] is None:
        text = f'<span class="fail">no explanation: {_e(e["failure_reason"])}</span>'
    else:
        text = _e(e["explanation"])
    if e.get("degenerate_reason"):
        text += f' <span class="fail">(degenerate: {_e(e["degenerate_reason"])})</span>'
    reason = e.get("score_failure") or (e.get("test_reason") if e.get("selected") else None)
    note = f' <span class="muted">({_e(reason)})</span>' if reason and not _finite(e.get("test_score")) else ""
    mark = " <strong>best</strong>" if e.get("best") else (" chosen" if e.get("selected") else "")
    return (
        f"<tr><td>{_e(KIND_LABEL.get(e['kind'], e['kind']))}{mark}</td><td class=num>{_e(e['sample_index'])}</td>"
        f"<td>{text}{note}</td><td class=num>{_num(e.get('valid_score'))}</td>"
        f"<td class=num>{_num(e.get('test_score'))}</td><td class=num>{_num(e.get('control_corr_all'))}</td>"
        f"<td class=num>{_num(e.get('gap'))}</td><td class=num>{_num(e.get('r2_all'))}</td></tr>"
    )


SCORER_NOTE = (
    "Detection: which held-out texts (activating quantile samples and as many non-activating texts) activate "
    "the unit, judged from the best explanation. Fuzzing: whether the marked tokens of an activating text are "
    "the ones it responds to. Balanced accuracy, 0.5 = chance; control = another unit's explanation on the same "
    "prompts; gap = score − control."
)


def _classification_table(unit: UnitView) -> list[str]:
    """The unit's detection and fuzzing rows (none when classification_scores was not materialized)."""
    if not unit.classification:
        return []
    rows = []
    for scorer in ("detection", "fuzzing"):
        c = unit.classification.get(scorer)
        if c is None:
            continue
        reason = c.get("failure_reason") or (
            c.get("balanced_accuracy_reason") if c.get("balanced_accuracy") is None else None
        )
        note = f' <span class="muted">{_e(reason)}</span>' if reason else ""
        counts = f"{_e(c.get('n_positive'))} + {_e(c.get('n_negative'))}" if c.get("n_positive") is not None else ""
        rows.append(
            f"<tr class=classification-{scorer}><td>{scorer}{note}</td>"
            f"<td class=num>{_num(c.get('balanced_accuracy'))}</td>"
            f"<td class=num>{_num(c.get('control_balanced_accuracy'))}</td>"
            f"<td class=num>{_num(c.get('gap'))}</td><td class=num>{_num(c.get('auc'))}</td>"
            f"<td class=num>{_num(c.get('f1'))}</td><td class=num>{counts}</td></tr>"
        )
    return [
        "<h3>Detection and fuzzing</h3>",
        f'<p class="muted">{_e(SCORER_NOTE)}</p>',
        "<table><tr><th>scorer</th><th>balanced accuracy</th><th>control</th><th>gap</th><th>AUC</th><th>F1</th>"
        "<th>texts (+ / −)</th></tr>",
        *rows,
        "</table>",
    ]


def _direction(polarity: str) -> str:
    return "positive (+)" if polarity == "+" else "negative (−)"


def _signal_banner(data: LayerData) -> str:
    """Says plainly, at the top, when the layer's scores carry no evidence."""
    signal = data.signal
    if signal is None:
        return '<p class="warn">Not scored yet: no number on this page is a result.</p>'
    if signal.passed:
        return f'<p class="ok">Control check passed: {_e(signal.verdict)}.</p>'
    return (
        '<div class="warn" id="no-signal"><strong>No signal here.</strong> '
        f"{_e(signal.verdict)} Simulator: {_e(data.simulator or 'unknown')}. "
        "A score only means something where it beats its control (the same text simulated from another unit's "
        "explanation). The offline default model (Gemma 3 270M, embedded) exercises the pipeline; meaningful "
        "explanations and scores need a capable explainer and simulator (see the README, "
        '"Capable models").</div>'
    )


def _scales(page: NeuronPage) -> tuple[float, float | None]:
    pos = next((u.max_activation for u in page.units if u.polarity == "+"), None)
    neg = next((u.max_activation for u in page.units if u.polarity == "-"), None)
    pos = pos if _finite(pos) and pos > 0 else 1.0
    return pos, (neg if _finite(neg) and neg > 0 else None)


def render_neuron(data: LayerData, page: NeuronPage) -> str:
    pos_scale, neg_scale = _scales(page)
    parts = [
        '<p><a href="index.html">← layer index</a></p>',
        f"<h1>Layer {data.layer}, neuron {page.neuron}</h1>",
        f'<p class="muted">{_e(data.model_id)} @ {_e(data.model_revision)}</p>',
        _signal_banner(data),
        '<p class="muted">Candidates are chosen on the valid split; the chosen one is calibrated on the '
        "calibration split and reported on the test split, beside its control (another unit's explanation "
        "simulated on the same test sequences). Gap = test − control. r² is on the calibrated simulation.</p>",
    ]
    for unit in page.units:
        anchor = "pos" if unit.polarity == "+" else "neg"
        parts += [
            f'<h2 id="{anchor}">Direction {_direction(unit.polarity)} · max {_num(unit.max_activation)}</h2>',
            "<table><tr><th>kind</th><th>#</th><th>explanation</th><th>valid</th><th>test</th><th>control</th>"
            "<th>gap</th><th>r²</th></tr>",
            *(_explanation_row(e) for e in unit.explanations),
            "</table>",
        ]
        if unit.ablation is not None:
            a = unit.ablation
            reason = a.get("ablation_score_reason") or a.get("failure_reason")
            parts.append(
                f"<p>ablation score <strong class=ablation-score>{_num(a['ablation_score'])}</strong> "
                f"({_e(KIND_LABEL.get(a['kind'], a['kind']))} #{_e(a['sample_index'])}; KL mean-ablated "
                f"{_num(a['kl_mean'], 4)}, simulated {_num(a['kl_simulated'], 4)})"
                + (f' <span class="muted">{_e(reason)}</span>' if reason else "")
                + "</p>"
            )
        parts += _classification_table(unit)
        parts += ["<h3>Top tokens</h3>", "<table><tr><th>token</th><th>mean activation</th><th>count</th></tr>"]
        parts += [
            f"<tr><td><span class=tok>{_e(_visible(t['token']))}</span></td>"
            f"<td class=num>{_num(t['mean_activation'])}</td><td class=num>{_e(t['count'])}</td></tr>"
            for t in unit.top_tokens
        ]
        parts.append("</table>")
        best = unit.best
        if unit.simulations and best is not None:
            colour = "green" if unit.polarity == "+" else "purple"
            parts += [
                f"<h3>Test records: true activations ({colour}) and simulated (blue)</h3>",
                f'<p class="muted">simulated from the best explanation ({_e(KIND_LABEL.get(best["kind"]))} '
                f"#{_e(best['sample_index'])}): {_e(best['explanation'])}</p>",
            ]
            for sim in unit.simulations:
                label = f"{sim['record_kind']} {sim['split_rank']}"
                # true_acts are in the unit's direction; shown with the neuron's own sign and colours.
                signed = [v * (1 if unit.polarity == "+" else -1) for v in sim["true_acts"]]
                parts.append(heatmap(sim["tokens"], signed, pos_scale, "true", f"{label} true", neg_scale))
                parts.append(heatmap(sim["tokens"], sim["simulated"], 10.0, "sim", f"{label} sim"))
        for kind in ("top", "random"):
            records = [r for r in unit.records if r["kind"] == kind]
            if records:
                parts.append(f"<h3>{kind.capitalize()} records ({_direction(unit.polarity)})</h3>")
                parts += [
                    heatmap(r["tokens"], r["acts"], pos_scale, "true", f"{r['split']} {r['split_rank']}", neg_scale)
                    for r in records
                ]
    return _page(f"L{data.layer} N{page.neuron}", "\n".join(parts))


SEARCH_SCRIPT = """
const box = document.getElementById('search');
const rows = Array.from(document.querySelectorAll('#neurons tbody tr'));
box.addEventListener('input', () => {
  const q = box.value.trim().toLowerCase();
  let shown = 0;
  for (const row of rows) {
    const hit = !q || row.textContent.toLowerCase().includes(q);
    row.style.display = hit ? '' : 'none';
    shown += hit;
  }
  document.getElementById('shown').textContent = shown;
});
"""


def _sort_key(row: tuple[NeuronPage, UnitView]) -> tuple[float, int, str]:
    page, unit = row
    best = unit.best or {}
    score = best.get("test_score")
    return (-score if _finite(score) else math.inf, page.neuron, unit.polarity)


def render_index(data: LayerData) -> str:
    units = sorted(((p, u) for p in data.neurons for u in p.units), key=_sort_key)
    rows = []
    for page, unit in units:
        best = unit.best or {}
        space, lookup = unit.chosen(TOKEN_SPACE) or {}, unit.chosen(TOKEN_LOOKUP) or {}
        if best.get("explanation"):
            text = f"{_e(best['explanation'])} <span class=muted>({_e(KIND_LABEL.get(best['kind']))})</span>"
        else:
            reason = next((e.get("failure_reason") for e in unit.explanations if e.get("failure_reason")), None)
            text = f'<span class="fail">{_e(reason or "no usable explanation")}</span>'
        tokens = " ".join(f"<span class=tok>{_e(_visible(t['token']))}</span>" for t in unit.top_tokens[:5])
        ablation = unit.ablation["ablation_score"] if unit.ablation else None
        anchor = "pos" if unit.polarity == "+" else "neg"
        rows.append(
            f'<tr><td class=num><a href="neuron_{page.neuron}.html#{anchor}">{page.neuron}</a></td>'
            f"<td>{_e(unit.polarity)}</td><td class=num>{_num(best.get('test_score'))}</td>"
            f"<td class=num>{_num(best.get('control_corr_all'))}</td><td class=num>{_num(best.get('gap'))}</td>"
            f"<td class=num>{_num(space.get('test_score'))}</td><td class=num>{_num(lookup.get('test_score'))}</td>"
            f"<td class=num>{_num(ablation)}</td><td class=num>{_num(unit.balanced_accuracy('detection'))}</td>"
            f"<td class=num>{_num(unit.balanced_accuracy('fuzzing'))}</td><td>{text}</td><td>{tokens}</td></tr>"
        )
    body = "\n".join(
        [
            f"<h1>Layer {data.layer}</h1>",
            f'<p class="muted">{_e(data.model_id)} @ {_e(data.model_revision)} · {len(units)} explained units '
            f"(neuron × direction) of {data.n_neurons} neurons · sorted by the best explanation's test score</p>",
            _signal_banner(data),
            '<input id="search" type="search" placeholder="search explanations and tokens…" autofocus>'
            f' <span class="muted"><span id="shown">{len(units)}</span> shown</span>',
            '<table id="neurons"><thead><tr><th>neuron</th><th>dir</th><th>test score</th><th>control</th>'
            "<th>gap</th><th>token space</th><th>lookup (ref.)</th><th>ablation</th><th>detection</th><th>fuzzing</th>"
            "<th>best explanation</th>"
            "<th>top tokens</th></tr></thead><tbody>",
            *rows,
            "</tbody></table>",
        ]
    )
    return _page(f"Layer {data.layer} neurons", body, SEARCH_SCRIPT)


def write_layer(data: LayerData, root: Path) -> Path:
    """Writes `root/layer_<n>/` whole, then swaps it in: a reader never sees a half-written layer
    and a failed render leaves the previous pages in place."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"layer_{data.layer}"
    staging = Path(tempfile.mkdtemp(prefix=f".layer_{data.layer}.", dir=root))
    try:
        (staging / "index.html").write_text(render_index(data), encoding="utf-8")
        for page in data.neurons:
            (staging / f"neuron_{page.neuron}.html").write_text(render_neuron(data, page), encoding="utf-8")
        old = root / f".layer_{data.layer}.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_root_index(root)
    return target / "index.html"


def write_root_index(root: Path) -> Path:
    """A contents page linking every rendered layer."""
    layers = sorted(
        int(p.name.removeprefix("layer_")) for p in root.glob("layer_*") if p.name.removeprefix("layer_").isdigit()
    )
    items = "".join(f'<li><a href="layer_{n}/index.html">layer {n}</a></li>' for n in layers)
    path = root / "index.html"
    tmp = root / ".index.html.tmp"
    tmp.write_text(_page("Neuron Atlas viewer", f"<h1>Neuron Atlas viewer</h1><ul>{items}</ul>"), encoding="utf-8")
    tmp.replace(path)
    return path
