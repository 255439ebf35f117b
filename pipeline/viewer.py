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
from pipeline.interpret import BASELINE, LLM


@dataclass
class NeuronPage:
    """What one neuron's page shows, read from the current model's rows."""

    neuron: int
    max_activation: float
    top_tokens: list[dict[str, Any]]
    records: list[dict[str, Any]]  # train/valid top and random records, with tokens
    explanations: list[dict[str, Any]]  # with their scores
    simulations: list[dict[str, Any]]  # held-out records of the best explanation: true vs simulated
    ablation: dict[str, Any] | None

    @property
    def best(self) -> dict[str, Any] | None:
        scored = [e for e in self.explanations if e["kind"] == LLM and _finite(e.get("corr_all"))]
        if scored:
            return max(scored, key=lambda e: e["corr_all"])
        return next((e for e in self.explanations if e["kind"] == LLM), None)

    @property
    def baseline(self) -> dict[str, Any] | None:
        return next((e for e in self.explanations if e["kind"] == BASELINE), None)


@dataclass
class LayerData:
    model_id: str
    model_revision: str
    layer: int
    n_neurons: int  # neurons with records in the layer; pages are written for the explained ones
    neurons: list[NeuronPage] = field(default_factory=list)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _tables(conn: duckdb.DuckDBPyConnection) -> set[str]:
    rows = conn.execute("select table_name from information_schema.tables where table_schema = 'atlas'").fetchall()
    return {r[0] for r in rows}


def _dicts(conn: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cursor = conn.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def load_layer(conn: duckdb.DuckDBPyConnection, layer: int) -> LayerData:
    """Reads one layer of the current model (the `current_*` views) for the explained neurons."""
    tables = _tables(conn)
    needed = {"current_top_k_examples", "current_corpus_tokens", "current_explanations"}
    if not needed <= tables:
        raise AtlasInputError(
            f"the warehouse has no {', '.join(sorted(needed - tables))} yet: materialize top_k_examples and "
            "explanations for this layer before the neuron viewer"
        )
    heads = _dicts(
        conn,
        "select model_id, model_revision, count(*) as n from atlas.current_top_k_examples where layer = ? group by all",
        [layer],
    )
    if not heads:
        raise AtlasInputError(f"layer {layer} has no top_k_examples for the current model: materialize it first")
    head = heads[0]
    explanations = _dicts(
        conn,
        "select e.neuron, e.kind, e.sample_index, e.explanation, e.failure_reason"
        + (
            ", s.corr_all, s.corr_top, s.corr_random, s.corr_all_reason, s.failure_reason as score_failure "
            "from atlas.current_explanations e left join atlas.current_scores s "
            "using (model_id, model_revision, layer, neuron, kind, sample_index) "
            if "current_scores" in tables
            else " from atlas.current_explanations e "
        )
        + "where e.layer = ? order by e.neuron, e.kind, e.sample_index",
        [layer],
    )
    by_neuron: dict[int, list[dict[str, Any]]] = {}
    for row in explanations:
        by_neuron.setdefault(row["neuron"], []).append(row)
    data = LayerData(head["model_id"], head["model_revision"], layer, head["n"])
    if not by_neuron:
        return data
    neurons = sorted(by_neuron)
    examples = {
        r["neuron"]: r
        for r in _dicts(
            conn,
            "select neuron, max_activation, top_tokens, records from atlas.current_top_k_examples "
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
    # Every held-out record of the layer's simulations in one query; each page keeps its best
    # explanation's. Held-out sequences are records of top_k_examples, so `tokens` has them.
    simulated: dict[tuple[int, str, int], list[dict[str, Any]]] = {}
    if "current_simulations" in tables:
        for row in _dicts(
            conn,
            "select neuron, kind, sample_index, record_kind, split_rank, seq_id, true_acts, simulated "
            "from atlas.current_simulations where layer = ? and list_contains(?, neuron) and simulated is not null "
            "order by neuron, kind, sample_index, record_kind desc, split_rank",
            [layer, neurons],
        ):
            key = (row["neuron"], row["kind"], row["sample_index"])
            simulated.setdefault(key, []).append(row | {"tokens": tokens.get(row["seq_id"], [])})
    ablations: dict[int, dict[str, Any]] = {}
    if "current_ablations" in tables:
        for row in _dicts(
            conn,
            "select neuron, sample_index, ablation_score, ablation_score_reason, kl_mean, kl_simulated, "
            "failure_reason from atlas.current_ablations where layer = ? and list_contains(?, neuron)",
            [layer, neurons],
        ):
            ablations[row["neuron"]] = row
    for neuron in neurons:
        ex = examples.get(neuron)
        if ex is None:
            continue
        records = [rec | {"tokens": tokens.get(rec["seq_id"], [])} for rec in ex["records"] or []]
        page = NeuronPage(
            neuron, ex["max_activation"], ex["top_tokens"] or [], records, by_neuron[neuron], [], ablations.get(neuron)
        )
        if (best := page.best) is not None:
            page.simulations = simulated.get((neuron, best["kind"], best["sample_index"]), [])
        data.neurons.append(page)
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
.true .tok { --c: 0, 140, 60; } .sim .tok { --c: 40, 90, 220; }
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


def heatmap(tokens: list[str], values: list[float], scale: float, css_class: str, label: str) -> str:
    """One record as a row of tokens shaded by value / scale (0..1; negatives unshaded)."""
    cells = []
    for token, value in zip(tokens, values, strict=False):
        alpha = min(1.0, max(0.0, value / scale)) if scale > 0 and _finite(value) else 0.0
        cells.append(
            f'<span class="tok" style="--a: {alpha:.3f}" title="{_e(repr(token))}: {value:.3f}">'
            f"{_e(_visible(token))}</span>"
        )
    return f'<div class="record {css_class}"><span class="label">{_e(label)}</span>{"".join(cells)}</div>'


def _score_row(e: dict[str, Any]) -> str:
    if e["explanation"] is None:
        text = f'<span class="fail">no explanation: {_e(e["failure_reason"])}</span>'
    else:
        text = _e(e["explanation"])
    reason = e.get("score_failure") or e.get("corr_all_reason")
    note = f' <span class="muted">({_e(reason)})</span>' if reason and not _finite(e.get("corr_all")) else ""
    return (
        f"<tr><td>{_e(e['kind'])}</td><td class=num>{_e(e['sample_index'])}</td><td>{text}{note}</td>"
        f"<td class=num>{_num(e.get('corr_all'))}</td><td class=num>{_num(e.get('corr_top'))}</td>"
        f"<td class=num>{_num(e.get('corr_random'))}</td></tr>"
    )


def render_neuron(data: LayerData, page: NeuronPage) -> str:
    parts = [
        '<p><a href="index.html">← layer index</a></p>',
        f"<h1>Layer {data.layer}, neuron {page.neuron}</h1>",
        f'<p class="muted">{_e(data.model_id)} @ {_e(data.model_revision)} · max activation '
        f"{_num(page.max_activation)}</p>",
        "<h2>Explanations and scores</h2>",
        "<table><tr><th>kind</th><th>#</th><th>explanation</th><th>corr (all)</th><th>corr (top)</th>"
        "<th>corr (random)</th></tr>",
        *(_score_row(e) for e in page.explanations),
        "</table>",
    ]
    if page.ablation is not None:
        a = page.ablation
        reason = a.get("ablation_score_reason") or a.get("failure_reason")
        parts += [
            "<h2>Ablation</h2>",
            f"<p>ablation score <strong id=ablation-score>{_num(a['ablation_score'])}</strong> (explanation #"
            f"{_e(a['sample_index'])}; KL mean-ablated {_num(a['kl_mean'], 4)}, simulated {_num(a['kl_simulated'], 4)})"
            + (f' <span class="muted">{_e(reason)}</span>' if reason else "")
            + "</p>",
        ]
    parts += ["<h2>Top tokens</h2>", "<table><tr><th>token</th><th>mean activation</th><th>count</th></tr>"]
    parts += [
        f"<tr><td><span class=tok>{_e(_visible(t['token']))}</span></td><td class=num>{_num(t['mean_activation'])}"
        f"</td><td class=num>{_e(t['count'])}</td></tr>"
        for t in page.top_tokens
    ]
    parts.append("</table>")
    scale = page.max_activation if _finite(page.max_activation) and page.max_activation > 0 else 1.0
    if page.simulations:
        best = page.best or {}
        parts += [
            "<h2>Held-out records: true activations (green) and simulated (blue)</h2>",
            f'<p class="muted">simulated from explanation #{_e(best.get("sample_index"))}: '
            f"{_e(best.get('explanation'))}</p>",
        ]
        for sim in page.simulations:
            label = f"{sim['record_kind']} {sim['split_rank']}"
            parts.append(heatmap(sim["tokens"], sim["true_acts"], scale, "true", f"{label} true"))
            parts.append(heatmap(sim["tokens"], sim["simulated"], 10.0, "sim", f"{label} sim"))
    for kind in ("top", "random"):
        records = [r for r in page.records if r["kind"] == kind]
        if records:
            parts.append(f"<h2>{kind.capitalize()} records</h2>")
            parts += [
                heatmap(r["tokens"], r["acts"], scale, "true", f"{r['split']} {r['split_rank']}") for r in records
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


def _sort_key(page: NeuronPage) -> tuple[float, int]:
    best = page.best
    score = best.get("corr_all") if best else None
    return (-score if _finite(score) else math.inf, page.neuron)


def render_index(data: LayerData) -> str:
    pages = sorted(data.neurons, key=_sort_key)
    rows = []
    for page in pages:
        best, base = page.best or {}, page.baseline or {}
        text = (
            _e(best.get("explanation"))
            if best.get("explanation")
            else (f'<span class="fail">{_e(best.get("failure_reason") or "no explanation")}</span>')
        )
        tokens = " ".join(f"<span class=tok>{_e(_visible(t['token']))}</span>" for t in page.top_tokens[:5])
        ablation = page.ablation["ablation_score"] if page.ablation else None
        rows.append(
            f'<tr><td class=num><a href="neuron_{page.neuron}.html">{page.neuron}</a></td>'
            f"<td class=num>{_num(best.get('corr_all'))}</td><td class=num>{_num(base.get('corr_all'))}</td>"
            f"<td class=num>{_num(ablation)}</td><td>{text}</td><td>{tokens}</td></tr>"
        )
    body = "\n".join(
        [
            f"<h1>Layer {data.layer}</h1>",
            f'<p class="muted">{_e(data.model_id)} @ {_e(data.model_revision)} · {len(pages)} explained of '
            f"{data.n_neurons} neurons · sorted by the best explanation's score</p>",
            '<input id="search" type="search" placeholder="search explanations and tokens…" autofocus>'
            f' <span class="muted"><span id="shown">{len(pages)}</span> shown</span>',
            '<table id="neurons"><thead><tr><th>neuron</th><th>score</th><th>baseline</th><th>ablation</th>'
            "<th>best explanation</th><th>top tokens</th></tr></thead><tbody>",
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
