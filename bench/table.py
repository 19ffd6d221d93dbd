"""Leaderboard: latest record per cell, aggregated over seeds, published numbers beside ours.

``python -m bench table`` reads ``results/runs/*.json`` with pandas and writes
``results/leaderboard.md`` with tabulate. Published reference numbers come from
``results/reference/*.csv`` (columns: source, method, backbone, task, metric, value, note)
and are shown in rows marked *published*.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import List

import pandas as pd
from tabulate import tabulate

from .errors import BenchError
from .io import write_text
from .records import load_records

REFERENCE_COLUMNS = ["source", "method", "backbone", "task", "metric", "value", "note"]


def records_frame(results_dir: str | Path) -> pd.DataFrame:
    """One row per (record, metric), latest record per cell only."""
    rows = []
    for rec in load_records(results_dir):
        proto = (rec.get("protocol") or {}).get("name", "default")
        for metric, value in rec["metrics"].items():
            rows.append({"method": rec["method"], "backbone": rec["backbone"], "task": rec["task"],
                         "dataset": rec.get("dataset", ""), "protocol": proto, "seed": int(rec.get("seed", 0)),
                         "metric": metric, "value": float(value), "created": rec.get("created", ""),
                         "id": rec["id"], "reported": metric in rec.get("report", []),
                         "rank": (rec.get("report", []).index(metric) if metric in rec.get("report", [])
                                  else len(rec.get("report", []))),
                         "wall_s": float((rec.get("wall_time_s") or {}).get("total", float("nan"))),
                         "device": (rec.get("device") or {}).get("gpu") or (rec.get("device") or {}).get("cpu", ""),
                         "threads": (rec.get("device") or {}).get("threads")})
    cols = ["method", "backbone", "task", "dataset", "protocol", "seed", "metric", "value", "created", "id",
            "reported", "rank", "wall_s", "device", "threads"]
    df = pd.DataFrame(rows, columns=cols)
    if df.empty:
        return df
    cell = ["method", "backbone", "task", "protocol", "seed"]
    latest = df.sort_values("created").groupby(cell)["id"].transform("last").reindex(df.index)
    return df[df["id"] == latest]


def reference_frame(results_dir: str | Path) -> pd.DataFrame:
    frames = []
    for p in sorted((Path(results_dir) / "reference").glob("*.csv")):
        ref = pd.read_csv(p)
        missing = set(REFERENCE_COLUMNS) - set(ref.columns)
        if missing:
            raise BenchError(f"reference table {p} lacks columns {sorted(missing)}",
                             f"give it the columns {', '.join(REFERENCE_COLUMNS)}")
        frames.append(ref[REFERENCE_COLUMNS])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=REFERENCE_COLUMNS)


def _fmt(mean: float, std: float, n: int) -> str:
    if pd.isna(mean):
        return ""
    digits = 4 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _row_family(row: dict) -> tuple:
    """Sort key: method family (``x`` for ``x``, ``x_official`` and published ``x``), ours first."""
    name = str(row["method"]).replace(" *(published)*", "")
    base = name[: -len("_official")] if name.endswith("_official") else name
    return (base, row["source"] != "ours", name, str(row["backbone"]))


def task_table(ours: pd.DataFrame, ref: pd.DataFrame, task: str, protocol: str) -> str:
    sub = ours[(ours.task == task) & (ours.protocol == protocol)]
    shown = sub[sub["reported"].astype(bool)].sort_values("rank", kind="stable")
    metrics: List[str] = list(dict.fromkeys(shown["metric"])) or sorted(sub["metric"].unique())
    ref_t = ref[ref.task == task]
    metrics += [m for m in dict.fromkeys(ref_t["metric"]) if m not in metrics]
    rows = []
    for (method, backbone), g in sub.groupby(["method", "backbone"], sort=True):
        row = {"method": method, "backbone": backbone, "source": "ours",
               "seeds": g["seed"].nunique(), "wall (s)": f"{g.groupby('seed')['wall_s'].first().mean():.0f}"}
        for m in metrics:
            v = g[g.metric == m]["value"]
            row[m] = _fmt(v.mean(), v.std(ddof=1) if len(v) > 1 else 0.0, len(v))
        rows.append(row)
    for (source, method, backbone), g in ref_t.groupby(["source", "method", "backbone"], sort=True):
        row = {"method": f"{method} *(published)*", "backbone": backbone, "source": source, "seeds": "",
               "wall (s)": ""}
        for m in metrics:
            v = g[g.metric == m]["value"]
            row[m] = f"{float(v.iloc[0]):.4g}" if len(v) else ""
        rows.append(row)
    rows.sort(key=_row_family)  # published rows beside ours of the same method (mef, mef_official, mef published)
    cols = ["method", "backbone"] + metrics + ["seeds", "wall (s)", "source"]
    return tabulate([[r.get(c, "") for c in cols] for r in rows], headers=cols, tablefmt="github")


def _data_desc(d: dict) -> str:
    """One-line description of a dataset/data config node (name/dataset, generator seed, counts, size)."""
    if not d:
        return "-"
    parts = [str(d.get("name", d.get("dataset", "")))]
    if d.get("seed") is not None:
        parts.append(f"gen. seed {d['seed']}")
    if d.get("scenes") is not None:
        parts.append(f"{d['scenes']} scenes x {d.get('views', '?')} views")
    if d.get("size") is not None:
        parts.append(f"{d['size']} px")
    if d.get("held_out") is not None:
        parts.append(f"held out {d['held_out']}")
    return ", ".join(parts)


def config_rows(results_dir: str | Path, ids) -> List[List[str]]:
    """Per (method, backbone, task) of the shown records: seeds, hashes of the method and task config
    nodes (one hash = one configuration across seeds), the method's training data and the task data."""
    from .config import stable_hash

    rows: dict = {}
    for rec in load_records(results_dir):
        if rec["id"] not in ids:
            continue
        cfg = rec.get("config") or {}
        m, t = cfg.get("method") or {}, cfg.get("task") or {}
        trained = (rec.get("checkpoint") or {}).get("kind") == "trained"
        r = rows.setdefault((rec["method"], rec["backbone"], rec["task"]),
                            {"seeds": set(), "m": set(), "t": set(), "train": set(), "data": set()})
        r["seeds"].add(int(rec.get("seed", 0)))
        r["m"].add(stable_hash(m, 8))
        r["t"].add(stable_hash({k: v for k, v in t.items() if k != "protocols"}, 8))
        r["train"].add(_data_desc(m.get("data") or {}) if trained else "- (not trained)")
        r["data"].add(_data_desc(t.get("dataset") or {}))
    return [[*k, ",".join(map(str, sorted(v["seeds"]))), " ".join(sorted(v["m"])), " ".join(sorted(v["t"])),
             "; ".join(sorted(v["train"])), "; ".join(sorted(v["data"]))] for k, v in sorted(rows.items())]


def leaderboard_markdown(results_dir: str | Path) -> str:
    results_dir = Path(results_dir)
    ours = records_frame(results_dir)
    ref = reference_frame(results_dir)
    out = ["# bench leaderboard", "",
           "Generated by `python -m bench table` from the records in `results/runs/` "
           f"({_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC). Do not edit by hand.",
           "Rows marked *(published)* are reference numbers copied from the papers "
           "(`results/reference/*.csv`), not produced by bench; they use real datasets and full "
           "schedules, so compare them only with ours on the same task.", "",
           "Values are the mean ± sample std over seeds (latest record per cell and seed).", ""]
    if ours.empty:
        out += ["*No records yet: run a cell, e.g. `python -m bench run experiment=demo`.*", ""]
    cells = ours[["task", "protocol"]].drop_duplicates().sort_values(["task", "protocol"]).itertuples(index=False)
    seen_tasks = set()
    for task, protocol in cells:
        seen_tasks.add(task)
        g = ours[(ours.task == task) & (ours.protocol == protocol)]
        out += [f"## {task} — protocol `{protocol}` (dataset: {g['dataset'].iloc[0]})", "",
                task_table(ours, ref, task, protocol), ""]
    ref_only = sorted(set(ref["task"]) - seen_tasks)
    if ref_only:
        out += ["## Published reference numbers (no bench records yet for these tasks)", ""]
        for task in ref_only:
            out += [f"### {task}", "", task_table(ours, ref, task, protocol="-"), ""]
    if not ours.empty:
        hw = ours.drop_duplicates("id")
        out += ["## Hardware", "", tabulate(
            hw.groupby(["device", "threads"], dropna=False).size().reset_index(name="records").values.tolist(),
            headers=["device", "threads", "records"], tablefmt="github"), ""]
    if not ours.empty:
        recs = ours.drop_duplicates("id")
        out += ["## Configuration", "",
                "Config hashes: sha256 of the record's `method` / `task` node (full configs in the records); one "
                "hash per row = the same configuration for every seed. "
                f"Wall time: {recs['wall_s'].sum() / 60:.1f} min summed over the {len(recs)} records "
                "(training is included only in records whose checkpoint says `reused: false`; sweeps train in "
                "separate jobs, so their cells reuse the cached backbone).", "",
                tabulate(config_rows(results_dir, set(recs["id"])),
                         headers=["method", "backbone", "task", "seeds", "method cfg", "task cfg",
                                  "method training data", "task data"], tablefmt="github"), ""]
    figs = sorted((results_dir / "figures").glob("*.png"))
    if figs:
        out += ["## Figures", ""] + [f"- [{p.stem}](figures/{p.name})" for p in figs] + [""]
    return "\n".join(out)


def write_leaderboard(results_dir: str | Path) -> Path:
    path = Path(results_dir) / "leaderboard.md"
    write_text(path, leaderboard_markdown(results_dir))
    return path
