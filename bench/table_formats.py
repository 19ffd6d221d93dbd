"""The leaderboard in other formats, built from the same rows as the Markdown one (:func:`bench.table.task_rows`).

* :func:`sections` -- one entry per task/protocol table, exactly the tables of ``results/leaderboard.md``
  (the tasks with records, then the tasks that only have published reference numbers);
* :func:`leaderboard_latex` -- one booktabs ``table`` per task/protocol (``pandas`` Styler), the best value
  per metric column in bold (direction-aware: :func:`metric_direction`), ``mean $\\pm$ std`` over seeds,
  the Δ-vs-teacher 95% interval, published rows marked with a dagger and their sources in the table note;
* :func:`leaderboard_csv` -- one row per configuration, the per-seed values in columns of their own;
* the HTML page is :mod:`bench.leaderboard_html`.

``python -m bench table --format md|latex|csv|html`` (:func:`write_table`) writes
``results/leaderboard.{md,tex,csv,html}`` (``--output -``: stdout).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from .table import (
    TEACHER,
    format_mde,
    records_frame,
    reference_frame,
    task_mde,
    task_rows,
)

FORMATS = {"md": "leaderboard.md", "latex": "leaderboard.tex", "csv": "leaderboard.csv", "html": "leaderboard.html"}

# Which way is better, by metric name: depth errors, normal angle errors (rmse / mean / median) are lower-is-better;
# threshold accuracies (a1.., a11..), mIoU, correspondence recall and PCK are higher-is-better.
_LOWER = re.compile(r"^(rmse|abs_rel|sq_rel|log10|silog|mean|median|err|epe)", re.IGNORECASE)
_HIGHER = re.compile(r"^(a\d+|miou|recall|pck|acc|delta)", re.IGNORECASE)
PUBLISHED = " *(published)*"


def metric_direction(metric: str) -> int:
    """-1 when lower is better (rmse, abs_rel, mean angle...), +1 when higher is (mIoU, a1, recall...), 0 unknown."""
    if _LOWER.match(metric):
        return -1
    if _HIGHER.match(metric):
        return 1
    return 0


@dataclass
class Section:
    """One task/protocol table: its shown columns and rows (:func:`bench.table.task_rows`)."""

    task: str
    protocol: str
    dataset: str
    cols: List[str]
    rows: List[dict]
    reference_only: bool = False
    metrics: List[str] = field(default_factory=list)
    mde: str = ""  # the minimum detectable effect line (:func:`bench.table.format_mde`)

    @property
    def delta_col(self) -> str:
        return next((c for c in self.cols if c.startswith("Δ vs teacher")), "")

    @property
    def title(self) -> str:
        if self.reference_only:
            return f"{self.task} (published reference numbers only)"
        return f"{self.task} — protocol {self.protocol} (dataset: {self.dataset})"


def sections(results_dir: str | Path, ours: Optional[pd.DataFrame] = None, ref=None) -> List[Section]:
    """The task/protocol tables of the leaderboard, in the Markdown leaderboard's order."""
    ours = records_frame(results_dir) if ours is None else ours
    ref = reference_frame(results_dir) if ref is None else ref
    out = []
    seen = set()
    cells = ours[["task", "protocol"]].drop_duplicates().sort_values(["task", "protocol"]).itertuples(index=False)
    for task, protocol in cells:
        seen.add(task)
        g = ours[(ours.task == task) & (ours.protocol == protocol)]
        cols, rows = task_rows(ours, ref, task, protocol)
        mde = format_mde(task_mde(ours, task, protocol))
        out.append(Section(task, protocol, str(g["dataset"].iloc[0]), cols, rows, False, _metrics(rows, cols), mde))
    for task in sorted(set(ref["task"]) - seen):
        cols, rows = task_rows(ours, ref, task, "-")
        out.append(Section(task, "-", "", cols, rows, True, _metrics(rows, cols)))
    return out


def _metrics(rows: List[dict], cols: List[str]) -> List[str]:
    return list(rows[0]["_metrics"]) if rows else []


def row_mean(row: dict, metric: str) -> float:
    """The row's value of ``metric`` as shown: the mean over seeds (a published row: its number); nan if none."""
    vals = list((row.get("_values") or {}).get(metric, {}).values())
    return sum(vals) / len(vals) if vals else float("nan")


def best_rows(sec: Section, metric: str) -> set:
    """Indices of the rows holding the best value of ``metric`` (every row, published ones included); empty when
    the metric's direction is unknown or no row has a value."""
    d = metric_direction(metric)
    vals = {i: row_mean(r, metric) for i, r in enumerate(sec.rows)}
    vals = {i: v for i, v in vals.items() if not math.isnan(v)}
    if not d or not vals:
        return set()
    best = max(vals.values()) if d > 0 else min(vals.values())
    return {i for i, v in vals.items() if v == best}


def method_name(row: dict) -> str:
    """The method without the Markdown *(published)* mark."""
    return str(row["method"]).replace(PUBLISHED, "")


# --- LaTeX ------------------------------------------------------------------------------------------
_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    """Plain text -> LaTeX (special characters escaped; ± and Δ as math)."""
    out = "".join(_TEX.get(ch, ch) for ch in str(text))
    return out.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("—", "---")


def _tex_recipe(recipe: str) -> str:
    """``label `hash``` -> ``label \\texttt{hash}``."""
    m = re.fullmatch(r"(.*?)\s*`([^`]*)`", recipe or "")
    if not m:
        return tex_escape(recipe or "")
    return (tex_escape(m.group(1)) + " " if m.group(1) else "") + r"\texttt{" + tex_escape(m.group(2)) + "}"


def _tex_header(metric: str) -> str:
    arrow = {-1: r" $\downarrow$", 1: r" $\uparrow$"}.get(metric_direction(metric), "")
    return tex_escape(metric) + arrow


def section_latex(sec: Section) -> str:
    """One booktabs table (``table`` float) of a section, via pandas' Styler."""
    delta = sec.delta_col
    published = [r for r in sec.rows if r["_published"]]
    body: Dict[str, list] = {"method": [], "backbone": [], "recipe": []}
    heads = {"method": "method", "backbone": "backbone", "recipe": "recipe"}
    for m in sec.metrics:
        body[m], heads[m] = [], _tex_header(m)
    if delta:
        body[delta], heads[delta] = [], tex_escape(delta)
    body["seeds"], heads["seeds"] = [], "seeds"
    for r in sec.rows:
        name = tex_escape(method_name(r)) + (r"\textsuperscript{\dag}" if r["_published"] else "")
        body["method"].append(name)
        body["backbone"].append(tex_escape(r["backbone"]))
        body["recipe"].append(_tex_recipe(r.get("recipe", "")))
        for m in sec.metrics:
            body[m].append(tex_escape(r.get(m, "")))
        if delta:
            body[delta].append(tex_escape(r.get(delta, "")))
        body["seeds"].append(tex_escape(r.get("seeds", "")))
    df = pd.DataFrame(body)
    bold = {m: best_rows(sec, m) for m in sec.metrics}

    def style(col: pd.Series) -> List[str]:
        rows = bold.get(col.name, set())
        return ["textbf: --rwrap;" if i in rows else "" for i in range(len(col))]

    styler = df.style.apply(style, axis=0).hide(axis="index")
    styler = styler.relabel_index([heads[c] for c in df.columns], axis=1)
    caption = tex_escape(sec.title) + (
        r". Mean $\pm$ sample std over seeds; $\Delta$: difference of the first metric to the raw teacher "
        rf"(\texttt{{{tex_escape(TEACHER)}}}) evaluated the same way, with its 95\% t-interval over seeds; "
        r"bold: best per column ($\downarrow$ lower is better, $\uparrow$ higher)."
    )
    label = "tab:" + re.sub(r"[^A-Za-z0-9]+", "-", f"{sec.task}-{sec.protocol}").strip("-")
    tex = styler.to_latex(
        hrules=True,
        caption=caption,
        label=label,
        position_float="centering",
        column_format="lll" + "r" * (len(df.columns) - 3),
        environment="table",
    )
    if published:
        sources = "; ".join(dict.fromkeys(tex_escape(r["source"]) for r in published))
        note = (
            r"\par\smallskip{\footnotesize \textsuperscript{\dag}\,published numbers copied from the papers "
            rf"({sources}), not produced by bench.}}" + "\n"
        )
        tex = tex.replace(r"\end{table}", note + r"\end{table}")
    return tex


def leaderboard_latex(results_dir: str | Path) -> str:
    """Every task/protocol table as a booktabs LaTeX table; the preamble needs ``\\usepackage{booktabs}``."""
    secs = sections(results_dir)
    head = [
        f"% Generated by `python -m bench table --format latex` from the records in {Path(results_dir)}/runs/.",
        "% Needs \\usepackage{booktabs} in the preamble. Do not edit by hand.",
        "",
    ]
    return "\n".join(head) + "\n".join(section_latex(s) for s in secs)


# --- CSV ----------------------------------------------------------------------------------------------
def leaderboard_csv(results_dir: str | Path) -> str:
    """One row per configuration (published rows too): identity columns, per metric its mean, sample std
    and one column per seed (``<metric>_s<seed>``), the Δ-vs-teacher mean and interval."""
    out = []
    for sec in sections(results_dir):
        for r in sec.rows:
            row = {
                "task": sec.task,
                "protocol": sec.protocol,
                "dataset": sec.dataset,
                "method": method_name(r),
                "backbone": r["backbone"],
                "published": bool(r["_published"]),
                "source": r["source"],
                "recipe": r.get("recipe", ""),
                "row_fingerprint": r["_row"],
                "seeds": r.get("seeds", ""),
                "record_ids": " ".join(r["_ids"]),
            }
            for m in sec.metrics:
                vals = (r["_values"] or {}).get(m, {})
                xs = list(vals.values())
                row[f"{m}_mean"] = sum(xs) / len(xs) if xs else None
                row[f"{m}_std"] = float(pd.Series(xs).std(ddof=1)) if len(xs) > 1 else None
                for s, v in sorted(((s, v) for s, v in vals.items() if s is not None)):
                    row[f"{m}_s{s}"] = v
            d = r["_delta"]
            if sec.metrics:
                row["delta_metric"] = sec.metrics[0]
            if d is not None:
                mean, hw, n = d
                row.update({"delta_mean": mean, "delta_n": n})
                if not math.isnan(hw):
                    row.update({"delta_ci95_low": mean - hw, "delta_ci95_high": mean + hw})
            out.append(row)
    return pd.DataFrame(out).to_csv(index=False, float_format="%.10g", lineterminator="\n")
