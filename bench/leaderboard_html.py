"""``results/leaderboard.html``: the leaderboard as one self-contained page (``bench table --format html``).

The tables are the Markdown leaderboard's (:func:`bench.table_formats.sections`, i.e. the rows of
:func:`bench.table.task_rows`), rendered with a small jinja2 template. The page needs no network and no
server (open it as ``file://``): the styles, the script and the figures (``results/figures/*.png`` as data
URIs) are inside it. It has

* sortable columns (click a header; numbers sort by the mean over seeds, blanks last) and filters by task,
  protocol and method;
* on hover: a row's recipe (the row fingerprint, its parts and the record ids) and the protocol's
  deviations from its anchor (id, key, our value, the anchor's value, why: ``protocol.deviation_details``
  of the records);
* per row the training curves found on this machine: the probe's loss (``<run_dir>/probe_history.jsonl``)
  and the trained backbone's loss (``history.jsonl`` beside its checkpoint), as small inline SVG plots;
* the best value per metric column in bold (direction-aware, as in the LaTeX tables).

The page reads its state from the URL query or hash as well, so a link (or a headless browser) can open it
sorted and filtered: ``leaderboard.html?task=synth_depth&protocol=linear&method=mef&sort=rmse&dir=asc``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from markupsafe import escape

from .records import load_records
from .table_formats import best_rows, method_name, metric_direction, row_mean, sections

SCREENSHOT_PREFIX = "leaderboard"  # figures named leaderboard*.png (screenshots of this page) are not embedded
MAX_POINTS = 200


def _read_curve(path: Path, key: str = "loss") -> List[Tuple[float, float]]:
    """(step, value) pairs of a history.jsonl (torn or non-finite lines skipped), at most MAX_POINTS."""
    pts = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            x, y = float(row["step"]), float(row[key])
        except (ValueError, KeyError, TypeError):
            continue
        if math.isfinite(y):
            pts.append((x, y))
    step = max(1, len(pts) // MAX_POINTS)
    return pts[::step]


def _candidates(path: Optional[str], results_dir: Path) -> List[Path]:
    """Where a path written into a record may be now: as written (relative to the working directory),
    or relative to the directory above the results directory (the checkout the records were made in)."""
    if not path:
        return []
    p = Path(path)
    return [p] if p.is_absolute() else [p, results_dir.resolve().parent / p]


def record_curves(rec: dict, results_dir: Path) -> Dict[str, Tuple[str, List[Tuple[float, float]]]]:
    """{'probe': (file, points), 'training': (file, points)} of one record, for the curves on this machine."""
    out = {}
    wanted = [("probe", rec.get("run_dir"), "probe_history.jsonl")]
    ck = (rec.get("checkpoint") or {}).get("path")
    if ck and (rec.get("checkpoint") or {}).get("kind") == "trained":
        wanted.append(("training", str(Path(ck).parent), "history.jsonl"))
    for name, where, fname in wanted:
        for d in _candidates(where, results_dir):
            f = d / fname
            if f.is_file():
                pts = _read_curve(f)
                if pts:
                    out[name] = (str(f), pts)
                break
    return out


def sparkline(points: Sequence[Tuple[float, float]], width: int = 120, height: int = 28) -> str:
    """An inline SVG polyline of (step, value) points scaled into width x height."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 2) / (x1 - x0) if x1 > x0 else 0.0
    sy = (height - 2) / (y1 - y0) if y1 > y0 else 0.0
    coords = " ".join(f"{1 + (x - x0) * sx:.1f},{height - 1 - (y - y0) * sy:.1f}" for x, y in points)
    return (
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'<polyline fill="none" stroke="#1f6feb" stroke-width="1.2" points="{coords}"/></svg>'
    )


def _deviations(recs: List[dict]) -> Tuple[List[str], str]:
    """The protocol deviations of a row's records: (ids, hover text)."""
    ids, lines = [], []
    for rec in recs:
        proto = rec.get("protocol") or {}
        for d in proto.get("deviation_details") or []:
            if d.get("id") in ids:
                continue
            ids.append(d.get("id"))
            lines.append(
                f"{d.get('id')}: {d.get('key')} = {json.dumps(d.get('value'))} "
                f"(anchor: {json.dumps(d.get('anchor'))}) — {d.get('why', '')}"
            )
        for d in proto.get("deviations") or []:
            if d not in ids:
                ids.append(d)
                lines.append(str(d))
    return ids, "\n".join(lines)


def _recipe_hover(row: dict, recs: List[dict]) -> str:
    if row["_published"]:
        return f"published: {row['source']}"
    ident = next((r.get("identity") for r in recs if isinstance(r.get("identity"), dict)), None)
    lines = [f"row fingerprint: {row['_row']}"]
    if ident:
        lines.append(f"label: {ident.get('label') or 'default'}")
        lines += [f"  {k}: {v}" for k, v in (ident.get("parts") or {}).items()]
    lines.append("records: " + ", ".join(row["_ids"]))
    return "\n".join(lines)


def _page_rows(sec, by_id: Dict[str, dict], results_dir: Path) -> List[dict]:
    """The cells of a section's rows for the template: text, sort key, bold flag, hover."""
    best = {m: best_rows(sec, m) for m in sec.metrics}
    out = []
    for i, r in enumerate(sec.rows):
        recs = [by_id[x] for x in r["_ids"] if x in by_id]
        dev_ids, dev_text = _deviations(recs)
        curves: Dict[str, Tuple[str, list]] = {}
        for rec in recs:
            for k, v in record_curves(rec, results_dir).items():
                curves.setdefault(k, v)
        cells = [
            {"text": method_name(r) + (" (published)" if r["_published"] else ""), "sort": method_name(r)},
            {"text": r["backbone"], "sort": r["backbone"]},
            {
                "text": r.get("recipe", "").replace("`", ""),
                "sort": r.get("recipe", ""),
                "title": _recipe_hover(r, recs),
            },
        ]
        for m in sec.metrics:
            v = row_mean(r, m)
            cells.append({"text": r.get(m, ""), "sort": "" if math.isnan(v) else repr(v), "bold": i in best[m]})
        if sec.delta_col:
            d = r["_delta"]
            cells.append({"text": r.get(sec.delta_col, ""), "sort": "" if d is None else repr(d[0])})
        cells.append({"text": str(r.get("seeds", "")), "sort": str(r.get("seeds", ""))})
        dev = {"text": ", ".join(dev_ids) or ("" if r["_published"] else "none"), "title": dev_text, "cls": "wrap"}
        cells.append(dev)
        cells.append(
            {
                "html": "".join(
                    f'<span class="curve" title="{escape(k)} loss: {escape(f)}">{escape(k)}{sparkline(pts)}</span>'
                    for k, (f, pts) in sorted(curves.items())
                ),
                "text": "" if curves else "—",
                "title": "" if curves else "no history.jsonl of this row's runs on this machine",
            }
        )
        cells.append({"text": r["source"], "sort": r["source"]})
        out.append({"method": method_name(r), "published": r["_published"], "cells": cells})
    return out


def _columns(sec) -> List[dict]:
    cols = [{"name": "method"}, {"name": "backbone"}, {"name": "recipe"}]
    for m in sec.metrics:
        arrow = {-1: " ↓", 1: " ↑"}.get(metric_direction(m), "")
        cols.append({"name": m, "label": m + arrow, "num": True})
    if sec.delta_col:
        cols.append({"name": "delta", "label": sec.delta_col, "num": True})
    cols += [{"name": "seeds", "num": True}, {"name": "deviations", "nosort": True}]
    cols += [{"name": "curves", "nosort": True}, {"name": "source"}]
    return cols


def figures(results_dir: Path) -> List[dict]:
    """The committed figures as data URIs (not the page's own screenshots)."""
    out = []
    for p in sorted((results_dir / "figures").glob("*.png")):
        if p.name.startswith(SCREENSHOT_PREFIX):
            continue
        out.append({"name": p.stem, "uri": "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()})
    return out


def leaderboard_html(results_dir: str | Path) -> str:
    """The page's HTML text (see the module docstring)."""
    import jinja2

    results_dir = Path(results_dir)
    by_id = {r["id"]: r for r in load_records(results_dir)} if (results_dir / "runs").is_dir() else {}
    secs = sections(results_dir)
    page = []
    for i, sec in enumerate(secs):
        page.append(
            {
                "id": f"sec-{i}",
                "task": sec.task,
                "protocol": sec.protocol,
                "title": sec.title,
                "columns": _columns(sec),
                "rows": _page_rows(sec, by_id, results_dir),
                "mde": sec.mde,
            }
        )
    methods = sorted({r["method"] for s in page for r in s["rows"]})
    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE).render(
        sections=page,
        tasks=sorted({s.task for s in secs}),
        protocols=sorted({s.protocol for s in secs}),
        methods=methods,
        figures=figures(results_dir),
        results=str(results_dir),
        created=f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        teacher="dinov2",
    )


TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>bench leaderboard</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; background: #f7f7f7; color: #1b1f24; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 22px 0 6px; }
p.note { max-width: 1100px; color: #444; }
#filters { margin: 10px 0; }
#filters label { margin-right: 14px; }
table { border-collapse: collapse; background: #ffffff; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; white-space: nowrap; }
th { background: #2d3e50; color: #ffffff; cursor: pointer; user-select: none; }
th.nosort { cursor: default; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: #eef3fb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; }
td.wrap { white-space: normal; min-width: 160px; max-width: 260px; font-size: 12px; }
tr.published td { font-style: italic; color: #555; }
td[title] { text-decoration: underline dotted #888; }
span.curve { display: inline-flex; align-items: center; gap: 3px; margin-right: 6px; font-size: 11px; }
figure { display: inline-block; margin: 8px; }
figure img { max-width: 560px; border: 1px solid #d0d7de; }
[hidden] { display: none !important; }
</style>
</head>
<body>
<h1>bench leaderboard</h1>
<p class="note">Generated by <code>python -m bench table --format html</code> from the records in
<code>{{ results }}/runs/</code> ({{ created }}). Do not edit by hand. Values: mean &plusmn; sample std over
seeds; one row = one configuration (hover the recipe for its fingerprint, the deviations for the protocol's
departures from its anchor). &Delta; vs teacher: the first metric's difference to the raw teacher
(<code>{{ teacher }}</code>) evaluated the same way, paired by seed, with its 95% t-interval. Bold: best per
column (&darr; lower is better, &uarr; higher). Rows marked <i>published</i> are numbers copied from the papers,
on real datasets and full schedules. Click a header to sort.</p>
<div id="filters">
<label>task <select id="f-task"><option value="">all</option>
{% for t in tasks %}<option value="{{ t }}">{{ t }}</option>{% endfor %}
</select></label>
<label>protocol <select id="f-protocol"><option value="">all</option>
{% for p in protocols %}<option value="{{ p }}">{{ p }}</option>{% endfor %}
</select></label>
<label>method <select id="f-method"><option value="">all</option>
{% for m in methods %}<option value="{{ m }}">{{ m }}</option>{% endfor %}
</select></label>
<span id="count"></span>
</div>
{% for s in sections %}
<section id="{{ s.id }}" data-task="{{ s.task }}" data-protocol="{{ s.protocol }}">
<h2>{{ s.title }}</h2>
<table>
<thead><tr>
{% for c in s.columns %}<th data-col="{{ c.name }}"{% if c.num %} data-num="1"{% endif %}{% if c.nosort %} class="nosort"{% endif %}>{{ c.label or c.name }}</th>{% endfor %}
</tr></thead>
<tbody>
{% for r in s.rows %}
<tr data-method="{{ r.method }}"{% if r.published %} class="published"{% endif %}>
{% for c in r.cells %}<td{% if c.sort is defined %} data-sort="{{ c.sort }}"{% endif %}{% if s.columns[loop.index0].num %} class="num{% if c.bold %} best{% endif %}"{% elif c.cls %} class="{{ c.cls }}"{% endif %}{% if c.title %} title="{{ c.title }}"{% endif %}>{% if c.html %}{{ c.html | safe }}{% else %}{{ c.text }}{% endif %}</td>{% endfor %}
</tr>
{% endfor %}
</tbody>
</table>
{% if s.mde %}<p class="note">{{ s.mde }}</p>{% endif %}
</section>
{% endfor %}
{% if figures %}
<h2 id="figures">Figures</h2>
{% for f in figures %}<figure><img alt="{{ f.name }}" src="{{ f.uri }}"><figcaption>{{ f.name }}</figcaption></figure>
{% endfor %}
{% endif %}
<script>
(function () {
  "use strict";
  var sel = { task: document.getElementById("f-task"), protocol: document.getElementById("f-protocol"),
              method: document.getElementById("f-method") };
  function key(td, num) {
    var v = td.getAttribute("data-sort");
    if (v === null) v = td.textContent;
    if (!num) return v.toLowerCase();
    return v === "" ? NaN : parseFloat(v);
  }
  function sortTable(table, col, dir) {
    var ths = table.tHead.rows[0].cells, idx = -1;
    for (var i = 0; i < ths.length; i++) {
      ths[i].removeAttribute("aria-sort");
      if (ths[i].getAttribute("data-col") === col) idx = i;
    }
    if (idx < 0 || ths[idx].classList.contains("nosort")) return false;
    var num = ths[idx].hasAttribute("data-num"), body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows), sign = dir === "desc" ? -1 : 1;
    rows.sort(function (a, b) {
      var x = key(a.cells[idx], num), y = key(b.cells[idx], num);
      if (num) {
        if (isNaN(x) && isNaN(y)) return 0;
        if (isNaN(x)) return 1;
        if (isNaN(y)) return -1;
        return sign * (x - y);
      }
      return sign * (x < y ? -1 : x > y ? 1 : 0);
    });
    rows.forEach(function (r) { body.appendChild(r); });
    ths[idx].setAttribute("aria-sort", dir === "desc" ? "descending" : "ascending");
    return true;
  }
  function apply() {
    var shown = 0, sections = document.querySelectorAll("section[data-task]");
    sections.forEach(function (s) {
      var ok = (!sel.task.value || s.dataset.task === sel.task.value) &&
               (!sel.protocol.value || s.dataset.protocol === sel.protocol.value);
      var visible = 0;
      s.querySelectorAll("tbody tr").forEach(function (tr) {
        var on = ok && (!sel.method.value || tr.dataset.method === sel.method.value);
        tr.hidden = !on;
        if (on) visible++;
      });
      s.hidden = visible === 0;
      shown += visible;
    });
    document.body.setAttribute("data-shown-rows", String(shown));
    document.getElementById("count").textContent = shown + " rows shown";
  }
  document.querySelectorAll("th").forEach(function (th) {
    th.addEventListener("click", function () {
      var table = th.closest("table");
      var dir = th.getAttribute("aria-sort") === "ascending" ? "desc" : "asc";
      sortTable(table, th.getAttribute("data-col"), dir);
    });
  });
  Object.keys(sel).forEach(function (k) { sel[k].addEventListener("change", apply); });
  var params = new URLSearchParams(location.search.slice(1) + "&" + location.hash.slice(1));
  Object.keys(sel).forEach(function (k) { if (params.get(k)) sel[k].value = params.get(k); });
  if (params.get("sort")) {
    document.querySelectorAll("table").forEach(function (t) {
      sortTable(t, params.get("sort"), params.get("dir") || "asc");
    });
  }
  apply();
})();
</script>
</body>
</html>
"""
