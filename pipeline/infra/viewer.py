"""Static HTML neuron viewer: one folder per layer, opened straight from disk, no server.

A layer is two files however many neurons it has: `index.html`, the page, and `data.js`, the data
of every explained unit. The page's own script shows a neuron's detail at `index.html#<neuron>`.

Every string that comes from the warehouse (tokens, explanations, model ids) is HTML-escaped in the
page, escaped for script in the data file (`js_json`), and only ever made into text nodes by the
page's script. Each page carries a Content-Security-Policy that lets only its own script (by hash)
and its data file run, so a token such as `<script>` is shown, never executed, even if an escape
were ever missed."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from pipeline.core.errors import AtlasInputError
from pipeline.core.interpret import LLM, TOKEN_LOOKUP, TOKEN_SPACE, layer_discrimination
from pipeline.core.scoring import Discrimination


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
    n_neurons: int  # neurons with records in the layer; the viewer shows the explained ones
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
    needed = {"current_unit_examples", "current_corpus_tokens", "current_explanations", "examples_long"}
    if not needed <= tables:
        raise AtlasInputError(
            f"the warehouse has no {', '.join(sorted(needed - tables))} yet: materialize unit_examples and "
            "explanations for this layer before the neuron viewer"
        )
    heads = _dicts(
        conn,
        "select model_id, model_revision, count(distinct neuron) as n from atlas.current_unit_examples "
        "where layer = ? group by all",
        [layer],
    )
    if not heads:
        raise AtlasInputError(f"layer {layer} has no unit_examples for the current model: materialize it first")
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
        if "polarity" in _columns(conn, "current_unit_examples")
        else "'+' as polarity"
    )
    examples = {
        (r["neuron"], r["polarity"]): r
        for r in _dicts(
            conn,
            f"select neuron, {polarity}, max_activation, top_tokens from atlas.current_unit_examples "
            "where layer = ? and list_contains(?, neuron)",
            [layer, neurons],
        )
    }
    # The units' records with their tokens and activations (unit_examples holds references), top first.
    records: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in _dicts(
        conn,
        "select neuron, polarity, record_kind, split, split_rank, seq_id, tokens, acts from atlas.examples_long "
        "where model_id = ? and model_revision = ? and layer = ? and list_contains(?, neuron) "
        "order by neuron, polarity, record_kind desc, rank",
        [head["model_id"], head["model_revision"], layer, neurons],
    ):
        records.setdefault((row["neuron"], row["polarity"]), []).append(row)
    seq_ids = sorted({rec["seq_id"] for recs in records.values() for rec in recs})
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
            units.append(
                UnitView(
                    sign,
                    ex["max_activation"],
                    ex["top_tokens"] or [],
                    records.get((neuron, sign), []),
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
#
# A layer is two files: `index.html`, the page (the index table rendered here, every string
# escaped), and `data.js`, the layer's units as JSON assigned to a global. The page loads the data
# with <script src> (Chromium refuses fetch() of file:// URLs) and its own script, APP_SCRIPT,
# builds a neuron's view for `index.html#<neuron>` with DOM calls that only ever make text nodes.

DATA_FILE = "data.js"
DATA_GLOBAL = "neuronAtlasLayer"
DATA_FORMAT = 1

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
[hidden] { display: none !important; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _finite(value) else '<span class="muted">—</span>'


def _visible(token: str) -> str:
    """Whitespace-only tokens stay visible; newlines would otherwise break the row."""
    return token.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍") or "∅"


def _csp(script: str | None, external: bool = False) -> str:
    """Only the page's own inline script (by its hash) and, with `external`, the layer's data file
    (`'self'`) may run: no inline handler, no other inline script, nothing remote. Opened from disk,
    `'self'` lets Chromium load any file: URL a <script src> names (a hash with SRI `integrity` does
    not load from file:// at all), so keeping text out of markup is what keeps other files out."""
    if script is None:
        scripts = "'none'"
    else:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        scripts = f"'sha256-{digest}'" + (" 'self'" if external else "")
    return f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src {scripts}"


def _page(title: str, body: str, script: str | None = None, data_file: str | None = None) -> str:
    data_tag = f'<script src="{_e(data_file)}"></script>' if data_file else ""
    script_tag = f"<script>{script}</script>" if script else ""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_csp(script, data_file is not None)}">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n{data_tag}{script_tag}</body></html>\n"
    )


# Characters a JSON text may hold raw that must not reach a page's script raw: markup (`</script>`,
# `<!--`), the line separators that older JavaScript refuses in strings, and lone surrogates (which
# UTF-8 cannot encode). They only occur inside JSON strings, where \\uXXXX means the same.
_JS_UNSAFE = re.compile("[<>&\u2028\u2029\ud800-\udfff]")


def js_json(value: Any) -> str:
    """JSON that is also a safe JavaScript expression, whatever its strings hold."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return _JS_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _plain(value: Any) -> Any:
    """JSON-ready: a non-finite float becomes its Python text ('nan', 'inf', '-inf'), shown as text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _decimals(page: NeuronPage) -> int:
    """Decimals kept of a neuron's activations: the 3 the page prints, more where its scale (a max
    activation) is below 1, so that its shading (value / scale) keeps 3 decimals too; at most 12."""
    smallest = min((u.max_activation for u in page.units if _finite(u.max_activation) and u.max_activation > 0),
                   default=1.0)  # fmt: skip
    return min(12, 3 + max(0, math.ceil(-math.log10(smallest))))


def _scaled(value: Any, decimals: int) -> Any:
    """A value to `decimals` decimals as an integer (value * 10**decimals: a smaller file than a float)."""
    return int(f"{value:.{decimals}f}".replace(".", "")) if _finite(value) else _plain(value)


KIND_LABEL = {LLM: "LLM", TOKEN_SPACE: "token space", TOKEN_LOOKUP: "token lookup (reference)"}

SCORER_NOTE = (
    "Detection: which held-out texts (activating quantile samples and as many non-activating texts) activate "
    "the unit, judged from the best explanation. Fuzzing: whether the marked tokens of an activating text are "
    "the ones it responds to. Balanced accuracy, 0.5 = chance; control = another unit's explanation on the same "
    "prompts; gap = score − control."
)

EXPLANATION_FIELDS = (
    "kind", "sample_index", "explanation", "failure_reason", "degenerate_reason", "valid_score", "test_score",
    "test_reason", "score_failure", "control_corr_all", "gap", "r2_all", "selected", "best",
)  # fmt: skip
ABLATION_FIELDS = (
    "kind", "sample_index", "ablation_score", "ablation_score_reason", "kl_mean", "kl_simulated", "failure_reason",
)  # fmt: skip
CLASSIFICATION_FIELDS = (
    "balanced_accuracy", "balanced_accuracy_reason", "control_balanced_accuracy", "gap", "auc", "f1", "n_positive",
    "n_negative", "failure_reason",
)  # fmt: skip
SCORERS = ("detection", "fuzzing")


def layer_payload(data: LayerData, render: str = "") -> dict[str, Any]:
    """What `data.js` holds: every explained unit with all its page shows. Token texts are stored once
    per layer (`vocab`, with Python's repr of those whose repr is not just quoted, for the tooltips)
    and each record's sequence once (`seqs`: seq_id -> vocab indices). Activations (`acts`, `true`) are
    integers in units of 10**-decimals (the neuron's `decimals`: `_decimals`), simulated levels
    (0-10) in thousandths; a non-finite value is its text."""
    vocab: dict[str, int] = {}
    seqs: dict[str, list[int]] = {}

    def seq(seq_id: Any, tokens: list[str]) -> str:
        key = str(seq_id)
        if key not in seqs:
            seqs[key] = [vocab.setdefault(t, len(vocab)) for t in tokens]
        return key

    neurons = []
    for page in data.neurons:
        units = []
        decimals = _decimals(page)
        for unit in page.units:
            sign = 1 if unit.polarity == "+" else -1
            units.append(
                _plain(
                    {
                        "polarity": unit.polarity,
                        "max_activation": unit.max_activation,
                        "top_tokens": [
                            {k: t.get(k) for k in ("token", "mean_activation", "count")} for t in unit.top_tokens
                        ],
                        "explanations": [{k: e.get(k) for k in EXPLANATION_FIELDS} for e in unit.explanations],
                        "ablation": unit.ablation and {k: unit.ablation.get(k) for k in ABLATION_FIELDS},
                        "classification": {
                            s: {k: unit.classification[s].get(k) for k in CLASSIFICATION_FIELDS}
                            for s in SCORERS
                            if unit.classification.get(s) is not None
                        },
                    }
                )
                | {
                    # true_acts are in the unit's direction; shown with the neuron's own sign and colours.
                    "simulations": [
                        {
                            "record_kind": _plain(s["record_kind"]),
                            "split_rank": _plain(s["split_rank"]),
                            "seq": seq(s["seq_id"], s["tokens"]),
                            "true": [_scaled(v * sign, decimals) for v in s["true_acts"]],
                            "simulated": [_scaled(v, 3) for v in s["simulated"]],
                        }
                        for s in unit.simulations
                    ],
                    "records": [
                        {
                            "record_kind": _plain(r["record_kind"]),
                            "split": _plain(r["split"]),
                            "split_rank": _plain(r["split_rank"]),
                            "seq": seq(r["seq_id"], r["tokens"]),
                            "acts": [_scaled(v, decimals) for v in r["acts"]],
                        }
                        for r in unit.records
                    ],
                }
            )
        neurons.append({"neuron": page.neuron, "decimals": decimals, "units": units})
    return {
        "format": DATA_FORMAT,
        "render": render,
        "layer": data.layer,
        "model_id": data.model_id,
        "model_revision": data.model_revision,
        "vocab": list(vocab),
        "reprs": {str(i): repr(t) for t, i in vocab.items() if repr(t) != f"'{t}'"},
        "seqs": seqs,
        "neurons": neurons,
    }


def render_data(data: LayerData, render: str = "") -> str:
    """`data.js`: `window.neuronAtlasLayer = JSON.parse('<the payload as JSON>');`. JSON.parse of a
    string loads a large layer faster than the same JSON as an object literal (measured: about 1.2 s
    against 2 s for 12 MiB in headless Chromium), and reads `__proto__` as a plain key."""
    text = js_json(layer_payload(data, render)).replace("\\", "\\\\").replace("'", "\\'")
    return f"window.{DATA_GLOBAL} = JSON.parse('{text}');\n"


def read_data(text: str) -> dict[str, Any]:
    """The payload back from a `data.js` text (for tests and tools)."""
    head, tail = f"window.{DATA_GLOBAL} = JSON.parse('", "');\n"
    if not (text.startswith(head) and text.endswith(tail)):
        raise ValueError(f"not a {DATA_FILE} written by the viewer")
    return json.loads(re.sub(r"\\(.)", r"\1", text[len(head) : -len(tail)]))


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


# The page's one inline script: the index's search, and the neuron view for `#<neuron>` (and
# `#<neuron>/pos`, `#<neuron>/neg`, which scroll to that direction), built from the data file.
# Every string from the data becomes a text node or an attribute value; nothing is parsed as HTML.
APP_JS = r"""
'use strict';
(() => {
const KIND = new Map(Object.entries(__KIND_LABEL__));
const SCORER_NOTE = __SCORER_NOTE__;
const data = window.__DATA_GLOBAL__;
const $ = (id) => document.getElementById(id);

function h(tag, attrs, ...kids) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) node.append(kid);
  return node;
}
const str = (v) => (v === null || v === undefined ? '' : String(v));
const finite = (v) => typeof v === 'number' && Number.isFinite(v);
// As Python's f'{x:.{d}f}' (so the index and this view print a number alike): an exact tie rounds to even.
function fixed(x, d) {
  const exact = Math.abs(x).toFixed(d + 25);
  const cut = exact.indexOf('.') + d + 1;
  if (exact[cut] === '5' && /^0*$/.test(exact.slice(cut + 1)) && Number(exact[cut - 1]) % 2 === 0) {
    return (x < 0 ? '-' : '') + exact.slice(0, cut);
  }
  return x.toFixed(d);
}
const num = (v, d = 3) => (finite(v) ? fixed(v, d) : h('span', {class: 'muted'}, '\u2014'));
const numCell = (v, d) => h('td', {class: 'num'}, num(v, d));
const kindLabel = (k) => (KIND.has(k) ? KIND.get(k) : str(k));
const visible = (t) => t.replace(/\n/g, '\u21b5').replace(/\t/g, '\u21e5').replace(/\r/g, '\u240d') || '\u2205';
const direction = (p) => (p === '+' ? 'positive (+)' : 'negative (\u2212)');
const headRow = (...names) => h('tr', null, names.map((n) => h('th', null, n)));

// A record's tokens shaded by value / scale (the data holds value * 10**decimals); with negScale,
// negative values in their own colour by |value| / negScale.
function heatmap(seq, values, decimals, scale, cls, label, negScale) {
  const ids = (data.seqs[seq] || []).slice(0, values.length);
  const row = h('div', {class: 'record ' + cls}, h('span', {class: 'label'}, label));
  ids.forEach((id, i) => {
    const token = str(data.vocab[id]), v = finite(values[i]) ? values[i] / 10 ** decimals : values[i];
    let alpha = 0, neg = '';
    if (finite(v) && v >= 0 && scale > 0) alpha = Math.min(1, v / scale);
    else if (finite(v) && v < 0 && negScale) { alpha = Math.min(1, -v / negScale); neg = ' neg'; }
    const repr = str(data.reprs[id]) || "'" + token + "'";
    const title = repr + ': ' + (finite(v) ? fixed(v, 3) : str(v));
    const cell = h('span', {class: 'tok' + neg, title}, visible(token));
    cell.style.setProperty('--a', fixed(alpha, 3));
    row.append(cell);
  });
  return row;
}

function explanationRow(e) {
  const text = e.explanation === null || e.explanation === undefined
    ? [h('span', {class: 'fail'}, 'no explanation: ' + str(e.failure_reason))] : [e.explanation];
  if (e.degenerate_reason) text.push(' ', h('span', {class: 'fail'}, '(degenerate: ' + e.degenerate_reason + ')'));
  const reason = e.score_failure || (e.selected ? e.test_reason : null);
  if (reason && !finite(e.test_score)) text.push(' ', h('span', {class: 'muted'}, '(' + reason + ')'));
  const mark = e.best ? [' ', h('strong', null, 'best')] : e.selected ? [' chosen'] : [];
  return h('tr', null, h('td', null, kindLabel(e.kind), mark), h('td', {class: 'num'}, str(e.sample_index)),
    h('td', null, text), numCell(e.valid_score), numCell(e.test_score), numCell(e.control_corr_all),
    numCell(e.gap), numCell(e.r2_all));
}

function classification(unit) {
  const rows = [];
  for (const scorer of ['detection', 'fuzzing']) {
    const c = unit.classification[scorer];
    if (!c) continue;
    const reason = c.failure_reason || (c.balanced_accuracy === null ? c.balanced_accuracy_reason : null);
    const counts = c.n_positive === null ? '' : str(c.n_positive) + ' + ' + str(c.n_negative);
    rows.push(h('tr', {class: 'classification-' + scorer},
      h('td', null, scorer, reason ? [' ', h('span', {class: 'muted'}, reason)] : []),
      numCell(c.balanced_accuracy), numCell(c.control_balanced_accuracy), numCell(c.gap), numCell(c.auc),
      numCell(c.f1), h('td', {class: 'num'}, counts)));
  }
  if (!rows.length) return [];
  return [h('h3', null, 'Detection and fuzzing'), h('p', {class: 'muted'}, SCORER_NOTE),
    h('table', null, headRow('scorer', 'balanced accuracy', 'control', 'gap', 'AUC', 'F1', 'texts (+ / \u2212)'),
      rows)];
}

function unitSection(unit, decimals, posScale, negScale) {
  const parts = [
    h('h2', {id: unit.polarity === '+' ? 'pos' : 'neg'}, 'Direction ' + direction(unit.polarity) + ' \u00b7 max ',
      num(unit.max_activation)),
    h('table', null, headRow('kind', '#', 'explanation', 'valid', 'test', 'control', 'gap', 'r\u00b2'),
      unit.explanations.map(explanationRow)),
  ];
  const a = unit.ablation;
  if (a) {
    const reason = a.ablation_score_reason || a.failure_reason;
    parts.push(h('p', null, 'ablation score ', h('strong', {class: 'ablation-score'}, num(a.ablation_score)),
      ' (' + kindLabel(a.kind) + ' #' + str(a.sample_index) + '; KL mean-ablated ', num(a.kl_mean, 4),
      ', simulated ', num(a.kl_simulated, 4), ')', reason ? [' ', h('span', {class: 'muted'}, reason)] : []));
  }
  parts.push(...classification(unit), h('h3', null, 'Top tokens'),
    h('table', null, headRow('token', 'mean activation', 'count'), unit.top_tokens.map((t) => h('tr', null,
      h('td', null, h('span', {class: 'tok'}, visible(str(t.token)))), numCell(t.mean_activation),
      h('td', {class: 'num'}, str(t.count))))));
  const best = unit.explanations.find((e) => e.best);
  if (unit.simulations.length && best) {
    const colour = unit.polarity === '+' ? 'green' : 'purple';
    parts.push(h('h3', null, 'Test records: true activations (' + colour + ') and simulated (blue)'),
      h('p', {class: 'muted'}, 'simulated from the best explanation (' + str(KIND.get(best.kind)) + ' #'
        + str(best.sample_index) + '): ' + str(best.explanation)));
    for (const s of unit.simulations) {
      const label = str(s.record_kind) + ' ' + str(s.split_rank);
      parts.push(heatmap(s.seq, s.true, decimals, posScale, 'true', label + ' true', negScale),
        heatmap(s.seq, s.simulated, 3, 10, 'sim', label + ' sim'));
    }
  }
  for (const kind of ['top', 'random']) {
    const records = unit.records.filter((r) => r.record_kind === kind);
    if (!records.length) continue;
    parts.push(h('h3', null, kind[0].toUpperCase() + kind.slice(1) + ' records (' + direction(unit.polarity) + ')'));
    for (const r of records) {
      parts.push(heatmap(r.seq, r.acts, decimals, posScale, 'true', str(r.split) + ' ' + str(r.split_rank),
        negScale));
    }
  }
  return parts;
}

function scale(page, polarity) {
  const unit = page.units.find((u) => u.polarity === polarity);
  return unit && finite(unit.max_activation) && unit.max_activation > 0 ? unit.max_activation : null;
}

const neurons = new Map((data ? data.neurons : []).map((n) => [n.neuron, n]));
const layer = $('heading').dataset.layer;
const indexTitle = document.title, indexHeading = $('heading').textContent;
let indexScroll = 0;

function showNeuron(neuron, anchor) {
  const page = neurons.get(neuron);
  let content;
  if (!data) content = [h('p', {class: 'fail'}, 'The layer\'s data file (data.js, beside this page) did not load.')];
  else if (!page) content = [h('p', {class: 'fail'}, 'Neuron ' + neuron + ' has no explained unit in this layer.')];
  else content = page.units.flatMap((u) => unitSection(u, page.decimals, scale(page, '+') || 1, scale(page, '-')));
  // The layer was rewritten between loading this page and its data.js (a rerun swapped the folder).
  if (data && data.render !== $('heading').dataset.render) {
    content.unshift(h('p', {class: 'warn', id: 'stale'}, 'This page and its data.js come from different renders '
      + 'of the layer (it was rewritten meanwhile): reload the page.'));
  }
  if ($('neuron-view').hidden) indexScroll = window.scrollY;
  $('units').replaceChildren(...content);
  document.title = 'L' + layer + ' N' + neuron;
  $('heading').textContent = 'Layer ' + layer + ', neuron ' + neuron;
  for (const node of document.querySelectorAll('.index-only')) node.hidden = true;
  $('back').hidden = $('neuron-view').hidden = false;
  $('index-view').hidden = true;
  const target = anchor && document.getElementById(anchor);
  if (target) target.scrollIntoView(); else window.scrollTo(0, 0);
}

function showIndex() {
  const from = !$('neuron-view').hidden;
  $('units').replaceChildren();
  document.title = indexTitle;
  $('heading').textContent = indexHeading;
  for (const node of document.querySelectorAll('.index-only')) node.hidden = false;
  $('back').hidden = $('neuron-view').hidden = true;
  $('index-view').hidden = false;
  if (from) window.scrollTo(0, indexScroll);
}

function route() {
  const m = /^#(\d+)(?:\/(pos|neg))?$/.exec(location.hash);
  if (m) showNeuron(Number(m[1]), m[2]); else showIndex();
}

const box = $('search');
const rows = Array.from(document.querySelectorAll('#neurons tbody tr'));
box.addEventListener('input', () => {
  const q = box.value.trim().toLowerCase();
  let shown = 0;
  for (const row of rows) {
    const hit = !q || row.textContent.toLowerCase().includes(q);
    row.style.display = hit ? '' : 'none';
    shown += hit;
  }
  $('shown').textContent = shown;
});
window.addEventListener('hashchange', route);
route();
})();
"""
APP_SCRIPT = (
    APP_JS.replace("__KIND_LABEL__", js_json(KIND_LABEL))
    .replace("__SCORER_NOTE__", js_json(SCORER_NOTE))
    .replace("__DATA_GLOBAL__", DATA_GLOBAL)
)

NEURON_NOTE = (
    "Candidates are chosen on the valid split; the chosen one is calibrated on the calibration split and reported "
    "on the test split, beside its control (another unit's explanation simulated on the same test sequences). "
    "Gap = test − control. r² is on the calibrated simulation."
)


def _sort_key(row: tuple[NeuronPage, UnitView]) -> tuple[float, int, str]:
    page, unit = row
    best = unit.best or {}
    score = best.get("test_score")
    return (-score if _finite(score) else math.inf, page.neuron, unit.polarity)


def render_index(data: LayerData, render: str = "") -> str:
    """The layer's page: its index table (sorted by score, with search) and the neuron view that its
    script fills from `data.js` for `#<neuron>`. `render` names the render, as in its `data.js`."""
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
            f'<tr><td class=num><a href="#{page.neuron}/{anchor}">{page.neuron}</a></td>'
            f"<td>{_e(unit.polarity)}</td><td class=num>{_num(best.get('test_score'))}</td>"
            f"<td class=num>{_num(best.get('control_corr_all'))}</td><td class=num>{_num(best.get('gap'))}</td>"
            f"<td class=num>{_num(space.get('test_score'))}</td><td class=num>{_num(lookup.get('test_score'))}</td>"
            f"<td class=num>{_num(ablation)}</td><td class=num>{_num(unit.balanced_accuracy('detection'))}</td>"
            f"<td class=num>{_num(unit.balanced_accuracy('fuzzing'))}</td><td>{text}</td><td>{tokens}</td></tr>"
        )
    body = "\n".join(
        [
            '<p id="back" hidden><a href="#">← layer index</a></p>',
            f'<h1 id="heading" data-layer="{data.layer}" data-render="{_e(render)}">Layer {data.layer}</h1>',
            f'<p class="muted">{_e(data.model_id)} @ {_e(data.model_revision)}<span class="index-only"> · '
            f"{len(units)} explained units (neuron × direction) of {data.n_neurons} neurons · sorted by the best "
            "explanation's test score</span></p>",
            _signal_banner(data),
            '<div id="index-view">',
            '<input id="search" type="search" placeholder="search explanations and tokens…" autofocus>'
            f' <span class="muted"><span id="shown">{len(units)}</span> shown</span>',
            '<table id="neurons"><thead><tr><th>neuron</th><th>dir</th><th>test score</th><th>control</th>'
            "<th>gap</th><th>token space</th><th>lookup (ref.)</th><th>ablation</th><th>detection</th><th>fuzzing</th>"
            "<th>best explanation</th>"
            "<th>top tokens</th></tr></thead><tbody>",
            *rows,
            "</tbody></table>",
            "</div>",
            f'<div id="neuron-view" hidden><p class="muted">{_e(NEURON_NOTE)}</p><div id="units"></div></div>',
        ]
    )
    return _page(f"Layer {data.layer} neurons", body, APP_SCRIPT, DATA_FILE)


def write_layer(data: LayerData, root: Path) -> Path:
    """Writes `root/layer_<n>/` (index.html and data.js) whole, then swaps it in: a reader never sees a
    half-written layer, a failed render leaves the previous files in place, and files of an older
    layout (one page per neuron) go with the folder they were in."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"layer_{data.layer}"
    staging = Path(tempfile.mkdtemp(prefix=f".layer_{data.layer}.", dir=root))
    try:
        render = secrets.token_hex(8)  # in both files: the page can tell a data.js of another render
        (staging / DATA_FILE).write_text(render_data(data, render), encoding="utf-8")
        (staging / "index.html").write_text(render_index(data, render), encoding="utf-8")
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
