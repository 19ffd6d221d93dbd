"""Leaderboard: latest record per cell, aggregated over seeds, published numbers beside ours.

A row aggregates the records of ONE configuration (``identity.row`` of :mod:`bench.identity`:
method + training data + backbone + task + protocol + evaluation data), so runs of different
recipes never share a row; the ``recipe`` column shows the readable label and the short hash.
Legacy records (written before fingerprints) get rows of their own, marked ``legacy``.

``python -m bench table`` reads ``results/runs/*.json`` with pandas and writes
``results/leaderboard.md`` with tabulate. Published reference numbers come from
``results/reference/*.csv`` (columns: source, method, backbone, task, metric, value, note)
and are shown in rows marked *published*.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any, Dict, List

import pandas as pd
from tabulate import tabulate

from .errors import BenchError, what_is_at
from .io import write_text
from .records import load_records, train_diagnostics

# code_version: the anchor code a published number came from (tasks.protocol_record.code_version names):
# a reference row is shown only beside records of the same code version
REFERENCE_COLUMNS = ["source", "method", "backbone", "task", "metric", "value", "note", "code_version"]


LEGACY = "legacy"


def md_text(text: str) -> str:
    """``text`` as literal Markdown table-cell text: HTML (``& < >``) as entities; the cell separator ``|``,
    backslash, backtick and ``*`` backslash-escaped; line breaks as spaces."""
    text = " ".join(str(text).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\|`*])", r"\\\1", text)


def record_identity(rec) -> tuple:
    """(cell, row, recipe) of a record; a legacy record's cell/row is its (method, backbone, task,
    protocol, seed) key, marked legacy. The recipe's user-given label is escaped for Markdown."""
    ident = rec.get("identity")
    if isinstance(ident, dict):
        return (
            ident["cell"],
            ident["row"],
            f"{md_text(ident.get('label') or 'default')} `{ident.get('short', ident['row'][:8])}`",
        )
    proto = (rec.get("protocol") or {}).get("name", "default")
    key = f"{LEGACY}:{rec['method']}/{rec['backbone']}/{rec['task']}/{proto}"
    return f"{key}/s{int(rec.get('seed', 0))}", key, f"{LEGACY} (no fingerprint)"


def _evaluation_key(rec) -> str:
    """What a method's row is compared with the teacher on: the backbone config and the task config
    (protocol and evaluation data included) from the fingerprint; a legacy record: its backbone name."""
    parts = (rec.get("identity") or {}).get("parts") if isinstance(rec.get("identity"), dict) else None
    if isinstance(parts, dict) and parts.get("task") and parts.get("backbone"):
        return f"{parts['backbone']}/{parts['task']}"
    return f"{LEGACY}:{rec.get('backbone')}"


FRAME_COLUMNS = (
    "method",
    "backbone",
    "task",
    "dataset",
    "protocol",
    "code_version",
    "seed",
    "metric",
    "value",
    "created",
    "id",
    "reported",
    "rank",
    "wall_s",
    "device",
    "threads",
    "cell",
    "row",
    "recipe",
    "evaluation",
)


def _frame_rows(rec: dict) -> List[dict]:
    """The rows of one record in :func:`records_frame`: one per metric (columns :data:`FRAME_COLUMNS`)."""
    proto = (rec.get("protocol") or {}).get("name", "default")
    cell, row_key, recipe = record_identity(rec)
    report = rec.get("report", [])
    device = rec.get("device") or {}
    return [
        {
            "method": rec["method"],
            "backbone": rec["backbone"],
            "task": rec["task"],
            "dataset": rec.get("dataset", ""),
            "protocol": proto,
            "code_version": (rec.get("protocol") or {}).get("code_version"),
            "seed": int(rec.get("seed", 0)),
            "metric": metric,
            "value": float(value),
            "created": rec.get("created", ""),
            "id": rec["id"],
            "reported": metric in report,
            "rank": report.index(metric) if metric in report else len(report),
            "wall_s": float((rec.get("wall_time_s") or {}).get("total", float("nan"))),
            "device": device.get("gpu") or device.get("cpu", ""),
            "threads": device.get("threads"),
            "cell": cell,
            "row": row_key,
            "recipe": recipe,
            "evaluation": _evaluation_key(rec),
        }
        for metric, value in rec["metrics"].items()
    ]


def records_frame(results_dir: str | Path, recs: List[dict] | None = None) -> pd.DataFrame:
    """One row per (record, metric), latest record per cell only (``recs``: the records of
    ``results_dir`` when already loaded)."""
    rows = [row for rec in (load_records(results_dir) if recs is None else recs) for row in _frame_rows(rec)]
    df = pd.DataFrame(rows, columns=list(FRAME_COLUMNS))
    if df.empty:
        return df
    latest = df.sort_values("created").groupby("cell")["id"].transform("last").reindex(df.index)
    return df[df["id"] == latest]


def reference_frame(results_dir: str | Path) -> pd.DataFrame:
    frames = []
    for p in sorted((Path(results_dir) / "reference").glob("*.csv")):
        ref = pd.read_csv(p)
        missing = set(REFERENCE_COLUMNS) - set(ref.columns)
        if missing:
            raise BenchError(
                f"reference table {p} lacks columns {sorted(missing)}",
                f"give it the columns {', '.join(REFERENCE_COLUMNS)}",
            )
        frames.append(ref[REFERENCE_COLUMNS])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=REFERENCE_COLUMNS)


def _fmt(mean: float, std: float, n: int) -> str:
    if pd.isna(mean):
        return ""
    digits = 4 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


TEACHER = "dinov2"  # the raw teacher: the backbone as loaded, no training


def delta_vs_teacher(
    sub: pd.DataFrame, method: str, backbone: str, metric: str, teacher: str = TEACHER, evaluation: str | None = None
):
    """Difference of ``method`` to the raw teacher on ``metric`` with a 95% interval over seeds.

    ``sub``: rows of one task and protocol (:func:`records_frame`). Per seed the difference is paired
    with the teacher's record of the same seed when there is one (the teacher's seeds vary only the
    probe), else taken against the teacher's mean over its seeds. Returns ``(mean, half_width, n)``
    with ``half_width = t_{0.975, n-1} * sd / sqrt(n)`` (nan for one seed), or None when either side
    has no value. ``evaluation``: only teacher records evaluated exactly as the method's row (same
    backbone config, task, protocol and evaluation data; :func:`_evaluation_key`).
    """
    from scipy import stats

    if method == teacher:
        return None
    mine = sub[(sub.method == method) & (sub.backbone == backbone) & (sub.metric == metric)]
    ref = sub[(sub.method == teacher) & (sub.backbone == backbone) & (sub.metric == metric)]
    if evaluation is not None and "evaluation" in sub:
        mine = mine[mine.evaluation == evaluation]
        ref = ref[ref.evaluation == evaluation]
    if mine.empty or ref.empty:
        return None
    ref_by_seed = ref.groupby("seed")["value"].mean()
    diffs = [
        float(v) - float(ref_by_seed.get(s, ref_by_seed.mean()))
        for s, v in mine.groupby("seed")["value"].mean().items()
    ]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, float("nan"), n
    sd = float(pd.Series(diffs).std(ddof=1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / n**0.5, n


def format_delta(d) -> str:
    """``+1.23 [0.45, 2.01]`` (95% interval over seeds), ``+1.23`` for one seed, '' for none."""
    if d is None:
        return ""
    mean, hw, n = d
    digits = 4 if abs(mean) < 10 else 2
    if n < 2 or pd.isna(hw):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{mean - hw:+.{digits}f}, {mean + hw:+.{digits}f}]"


ALPHA, POWER = 0.05, 0.8  # the minimum detectable effect's test: two-sided level and power


def min_detectable_effect(sd_diff: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true mean difference a paired t-test over ``n`` seeds detects with probability ``power``
    at two-sided level ``alpha``: ``(t_{1-alpha/2, n-1} + t_{power, n-1}) * sd_diff / sqrt(n)`` (the
    usual central-t approximation), ``sd_diff`` the sd of the per-seed differences; nan for ``n < 2``."""
    from scipy import stats

    if n < 2 or pd.isna(sd_diff):
        return float("nan")
    df = n - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd_diff / n**0.5)


def _reported_metrics(sub: pd.DataFrame) -> List[str]:
    """The reported metrics of a task table's records in report order (all of them when none is)."""
    shown = sub[sub["reported"].astype(bool)].sort_values("rank", kind="stable")
    return list(dict.fromkeys(shown["metric"])) or sorted(sub["metric"].unique())


def _pooled_paired_sd(sub: pd.DataFrame, teacher_row: pd.DataFrame, metric: str) -> tuple:
    """Pooled sd of the per-seed differences to ``teacher_row`` of the other rows evaluated the same way
    (same :func:`_evaluation_key`), over the seeds both have: ``(sd, rows)``; ``(nan, 0)`` when no row has
    two paired seeds. Pooled: ``sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1))``."""
    ref = teacher_row[teacher_row.metric == metric].groupby("seed")["value"].mean()
    evaluation = teacher_row["evaluation"].iloc[0]
    others = sub[(sub.method != TEACHER) & (sub.metric == metric) & (sub.evaluation == evaluation)]
    num = dof = rows = 0
    for _, g in others.groupby("row"):
        mine = g.groupby("seed")["value"].mean()
        diffs = pd.Series([float(v) - float(ref[s]) for s, v in mine.items() if s in ref.index])
        if len(diffs) >= 2:
            num += (len(diffs) - 1) * float(diffs.var(ddof=1))
            dof += len(diffs) - 1
            rows += 1
    return ((num / dof) ** 0.5, rows) if dof else (float("nan"), 0)


def task_mde(ours: pd.DataFrame, task: str, protocol: str) -> List[dict]:
    """The minimum detectable effect (:func:`min_detectable_effect`) of each reported metric of one task
    table, per raw-teacher row (one per backbone / evaluation), at that row's seed count ``n``.

    ``sd_diff`` (the sd of a method's per-seed difference to the teacher) is estimated from the teacher:
    ``sqrt(2) * sd_teacher``, the teacher's sample sd over its seeds (the probe's seed noise), which assumes
    a method's seed noise is as large as the teacher's and independent of it. Where the teacher's seeds
    are identical (a training-free task: no probe, sd 0) that says nothing about the methods' own training
    noise, so ``sd_diff`` is the pooled sd of the other rows' observed paired differences instead
    (``source: paired``). Returns ``[{"backbone", "n", "metrics": {metric: {"mde", "sd_diff", "source"}}}]``.
    """
    sub = ours[(ours.task == task) & (ours.protocol == protocol)]
    metrics = _reported_metrics(sub) if not sub.empty else []
    out = []
    for (backbone, _), trow in sub[sub.method == TEACHER].groupby(["backbone", "row"], sort=True):
        n = int(trow["seed"].nunique())
        entry = {"backbone": backbone, "n": n, "metrics": {}}
        for m in metrics:
            per_seed = trow[trow.metric == m].groupby("seed")["value"].mean()
            sd_t = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan")
            if n >= 2 and sd_t > 0:
                sd_diff, source = 2**0.5 * sd_t, "teacher"
            else:
                sd_diff, rows = _pooled_paired_sd(sub, trow, m) if n >= 2 else (float("nan"), 0)
                source = "paired" if rows else "none"
            entry["metrics"][m] = {"mde": min_detectable_effect(sd_diff, n), "sd_diff": sd_diff, "source": source}
        out.append(entry)
    return out


def format_mde(entries: List[dict]) -> str:
    """One line per teacher row of :func:`task_mde` ('' for none): ``MDE (...): rmse 33.0, a11 12.1``;
    values from the methods' paired differences marked †, not estimable ones '-'."""
    lines = []
    for e in entries:
        parts, dagger = [], False
        for m, d in e["metrics"].items():
            v = d["mde"]
            txt = "-" if pd.isna(v) else (f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}")
            if d["source"] == "paired" and not pd.isna(v):
                txt, dagger = txt + "†", True
            parts.append(f"{m} {txt}")
        note = (
            " († the teacher's seeds are identical, no probe: from the pooled sd of the methods' paired differences)"
            if dagger
            else ""
        )
        teacher = any(d["source"] == "teacher" for d in e["metrics"].values())
        lines.append(
            f"Minimum detectable effect vs the teacher ({e['backbone']}, n = {e['n']} seeds; paired, "
            f"α = {ALPHA} two-sided, power {POWER}"
            + ("; sd_diff = √2 × the teacher's seed sd): " if teacher else "): ")
            + ", ".join(parts)
            + note
            + "."
        )
    return "\n\n".join(lines)


def _row_family(row: dict) -> tuple:
    """Sort key: method family (``x`` for ``x``, ``x_official`` and published ``x``), ours first."""
    name = str(row["method"]).replace(" *(published)*", "")
    base = name[: -len("_official")] if name.endswith("_official") else name
    return (base, row["source"] != "ours", name, str(row["backbone"]))


def _published_of(ref: pd.DataFrame, sub: pd.DataFrame, task: str, protocol: str) -> pd.DataFrame:
    """The published numbers of ``task`` shown in a table: beside records (``protocol`` not ``-``) only
    those of the records' code versions."""
    if "code_version" not in ref:  # a frame from elsewhere without the column: its code is not stated
        ref = ref.assign(code_version=None)
    ref_t = ref[ref.task == task]
    if protocol != "-":  # beside records: only the published numbers of the same code version
        versions = set(sub["code_version"].dropna()) if "code_version" in sub else set()
        ref_t = ref_t[ref_t["code_version"].isin(versions)]
    return ref_t


def _our_row(sub: pd.DataFrame, g: pd.DataFrame, method: str, backbone: str, metrics: List[str], delta_col: str):
    """The table row of one configuration's records ``g`` (``sub``: the task table's records)."""
    row = {
        "method": method,
        "backbone": backbone,
        "recipe": g["recipe"].iloc[0],
        "source": "ours",
        "seeds": g["seed"].nunique(),
        "wall (s)": f"{g.groupby('seed')['wall_s'].first().mean():.0f}",
        "_published": False,
        "_row": g["row"].iloc[0],
        "_ids": sorted(g["id"].unique()),
        "_values": {},
        "_delta": None,
    }
    for m in metrics:
        v = g[g.metric == m]["value"]
        row[m] = _fmt(v.mean(), v.std(ddof=1) if len(v) > 1 else 0.0, len(v))
        row["_values"][m] = {int(s): float(x) for s, x in zip(g[g.metric == m]["seed"], v)}
    if metrics:
        same = sub[(sub.row == g["row"].iloc[0]) | (sub.method == TEACHER)]  # this row vs the teacher
        row["_delta"] = delta_vs_teacher(same, method, backbone, metrics[0], evaluation=g["evaluation"].iloc[0])
        row[delta_col] = format_delta(row["_delta"])
    return row


def _published_row(g: pd.DataFrame, source, method: str, backbone: str, code, metrics: List[str]) -> dict:
    """The table row of one published source's numbers ``g``."""
    row = {
        "method": f"{method} *(published)*",
        "backbone": backbone,
        "recipe": "",
        "source": f"{source} [code: {code}]",
        "seeds": "",
        "wall (s)": "",
        "_published": True,
        "_row": "",
        "_ids": [],
        "_values": {},
        "_delta": None,
    }
    for m in metrics:
        v = g[g.metric == m]["value"]
        row[m] = f"{float(v.iloc[0]):.4g}" if len(v) else ""
        if len(v):
            row["_values"][m] = {None: float(v.iloc[0])}
    return row


def task_rows(ours: pd.DataFrame, ref: pd.DataFrame, task: str, protocol: str) -> tuple:
    """The rows of one task/protocol table, shared by every output format (:mod:`bench.table_formats`).

    Returns ``(cols, rows)``: ``cols`` the shown columns in order, each row a dict with the shown
    (formatted) values under those names plus the numbers they came from: ``_values`` {metric: {seed:
    value}} (a published row: {metric: {None: value}}), ``_delta`` (:func:`delta_vs_teacher`'s tuple or
    None), ``_published``, ``_row`` (the row fingerprint), ``_ids`` (the record ids) and ``_metrics``.
    """
    sub = ours[(ours.task == task) & (ours.protocol == protocol)]
    metrics: List[str] = _reported_metrics(sub)
    ref_t = _published_of(ref, sub, task, protocol)
    metrics += [m for m in dict.fromkeys(ref_t["metric"]) if m not in metrics]
    delta_col = f"Δ vs teacher ({metrics[0]}, 95% CI)" if metrics else "Δ vs teacher"
    rows = [
        _our_row(sub, g, method, backbone, metrics, delta_col)
        for (method, backbone, _), g in sub.groupby(["method", "backbone", "row"], sort=True)
    ]
    for (source, method, backbone, code), g in ref_t.groupby(
        ["source", "method", "backbone", "code_version"], sort=True, dropna=False
    ):
        rows.append(_published_row(g, source, method, backbone, code, metrics))
    rows.sort(key=_row_family)  # published rows beside ours of the same method (mef, mef_official, mef published)
    cols = ["method", "backbone", "recipe"] + metrics + [delta_col, "seeds", "wall (s)", "source"]
    for row in rows:
        row["_metrics"] = metrics
    return cols, rows


def task_table(ours: pd.DataFrame, ref: pd.DataFrame, task: str, protocol: str) -> str:
    cols, rows = task_rows(ours, ref, task, protocol)
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


def config_rows(shown) -> List[List[str]]:
    """Per (method, backbone, task) of the shown records: seeds, hashes of the method and task config
    nodes (one hash = one configuration across seeds), the method's training data and the task data."""
    from .config import stable_hash

    rows: dict = {}
    for rec in shown:
        cfg = rec.get("config") or {}
        m, t = cfg.get("method") or {}, cfg.get("task") or {}
        trained = (rec.get("checkpoint") or {}).get("kind") == "trained"
        r = rows.setdefault(
            (rec["method"], rec["backbone"], rec["task"], record_identity(rec)[2]),
            {"seeds": set(), "m": set(), "t": set(), "train": set(), "data": set()},
        )
        r["seeds"].add(int(rec.get("seed", 0)))
        r["m"].add(stable_hash(m, 8))
        r["t"].add(stable_hash({k: v for k, v in t.items() if k != "protocols"}, 8))
        r["train"].add(_data_desc(m.get("data") or {}) if trained else "- (not trained)")
        r["data"].add(_data_desc(t.get("dataset") or {}))
    return [
        [
            *k,
            ",".join(map(str, sorted(v["seeds"]))),
            " ".join(sorted(v["m"])),
            " ".join(sorted(v["t"])),
            "; ".join(sorted(v["train"])),
            "; ".join(sorted(v["data"])),
        ]
        for k, v in sorted(rows.items())
    ]


DIAGNOSTIC_COLUMNS = [
    ("feature_change", "held-out feature change"),
    ("feature_1_minus_cos", "1 - cos"),
    ("adapted_weight_change", "adapted-weight change"),
    ("loss_first", "loss first"),
    ("loss_last", "loss last"),
    ("kl_first", "KL first"),
    ("kl_last", "KL last"),
    ("head_cos_first", "head cos first"),
    ("head_cos_last", "head cos last"),
    # collapse diagnostics (issue 30; docs/methods/splat_distill.md): entropy of the per-cell argmax prototype
    # histogram (0 = every cell on one prototype) and student/teacher argmax agreement
    ("student_argmax_entropy_first", "student argmax H first"),
    ("student_argmax_entropy_last", "student argmax H last"),
    ("teacher_argmax_entropy_first", "teacher argmax H first"),
    ("teacher_argmax_entropy_last", "teacher argmax H last"),
    ("agreement_first", "agreement first"),
    ("agreement_last", "agreement last"),
]


def record_diagnostics(rec, results_dir: str | Path) -> dict:
    """The training diagnostics of a trained record's backbone: ``checkpoint.train_diagnostics`` of the
    record, else ``<results>/diagnostics/<cache_key>.json`` (the backbone's train_info.json kept beside
    the records), else {}."""
    import json

    ck = rec.get("checkpoint") or {}
    if ck.get("kind") != "trained":
        return {}
    if ck.get("train_diagnostics"):
        return dict(ck["train_diagnostics"])
    path = Path(results_dir) / "diagnostics" / f"{ck.get('cache_key')}.json"
    if ck.get("cache_key") and path.is_file():
        return train_diagnostics(json.loads(path.read_text()))
    return {}


def diagnostics_rows(shown, results_dir: str | Path) -> List[List[str]]:
    """One row per trained backbone (cache key) of the shown records: method, backbone, the tasks that
    used it, seed, and the scalar diagnostics of :data:`DIAGNOSTIC_COLUMNS`."""
    rows: dict = {}
    for rec in shown:
        d = record_diagnostics(rec, results_dir)
        if not d:
            continue
        key = (rec["method"], rec["backbone"], int(rec.get("seed", 0)), (rec.get("checkpoint") or {}).get("cache_key"))
        r = rows.setdefault(key, {"tasks": set(), "d": d})
        r["tasks"].add(rec["task"])
    out = []
    for (method, bb, seed, key), r in sorted(
        rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], str(kv[0][3]))
    ):
        vals = [f"{r['d'][k]:.4g}" if isinstance(r["d"].get(k), (int, float)) else "" for k, _ in DIAGNOSTIC_COLUMNS]
        out.append([method, bb, seed, ", ".join(sorted(r["tasks"])), f"`{str(key)[-16:]}`", *vals])
    return out


LEADERBOARD_INTRO = (
    "Rows marked *(published)* are reference numbers copied from the papers "
    "(`results/reference/*.csv`), not produced by bench; they use real datasets and full "
    "schedules, so compare them only with ours on the same task.",
    "",
    "Values are the mean ± sample std over seeds (latest record per cell and seed). One row = one "
    "configuration: `recipe` is its label and the short hash of its fingerprint (method, training data, "
    "backbone, task, protocol, evaluation data); different configurations never share a row. "
    "`Δ vs teacher`: the first metric's difference to the raw teacher (`dinov2`) evaluated the same way "
    "(same backbone, task, protocol and evaluation data), paired by seed, with its 95% t-interval over seeds. "
    "Under each table, the minimum detectable effect per metric: the smallest true difference to the teacher "
    "that a paired t-test over the grid's seeds finds with power 0.8 at α = 0.05 (two-sided), "
    "`(t_0.975 + t_0.8) · sd_diff / √n` with n - 1 degrees of freedom and sd_diff = √2 × the teacher's "
    "sample sd over its seeds (a method's seed noise assumed as large as the teacher's and independent of "
    "it); a Δ smaller than it could not have been seen reliably.",
    "",
)


def _task_sections(ours: pd.DataFrame, ref: pd.DataFrame) -> List[str]:
    """One table per (task, protocol) of the records, each with its minimum detectable effects."""
    out: List[str] = []
    cells = ours[["task", "protocol"]].drop_duplicates().sort_values(["task", "protocol"]).itertuples(index=False)
    for task, protocol in cells:
        g = ours[(ours.task == task) & (ours.protocol == protocol)]
        out += [
            f"## {task} — protocol `{protocol}` (dataset: {g['dataset'].iloc[0]})",
            "",
            task_table(ours, ref, task, protocol),
            "",
        ]
        mde = format_mde(task_mde(ours, task, protocol))
        out += [mde, ""] if mde else []
    return out


def _reference_only_sections(ours: pd.DataFrame, ref: pd.DataFrame) -> List[str]:
    """The published numbers of tasks (and code versions) that no record shows yet."""
    shown = set(zip(ours["task"], ours["code_version"])) if not ours.empty else set()
    unmatched = ref[
        pd.Series([(t, c) not in shown for t, c in zip(ref["task"], ref["code_version"])], index=ref.index, dtype=bool)
    ]
    ref_only = sorted(set(unmatched["task"]))
    if not ref_only:
        return []
    out = ["## Published reference numbers (no bench records of their task and code version yet)", ""]
    for task in ref_only:
        out += [f"### {task}", "", task_table(ours, unmatched, task, protocol="-"), ""]
    return out


def _hardware_section(ours: pd.DataFrame) -> List[str]:
    """Records per (device, threads)."""
    hw = ours.drop_duplicates("id")
    return [
        "## Hardware",
        "",
        tabulate(
            hw.groupby(["device", "threads"], dropna=False).size().reset_index(name="records").values.tolist(),
            headers=["device", "threads", "records"],
            tablefmt="github",
        ),
        "",
    ]


CONFIG_HEADERS = (
    "method",
    "backbone",
    "task",
    "recipe",
    "seeds",
    "method cfg",
    "task cfg",
    "method training data",
    "task data",
)


def _configuration_section(ours: pd.DataFrame, shown: List[Dict[str, Any]]) -> List[str]:
    """Config hashes and training data of every row, the summed wall time, the legacy-row note."""
    recs = ours.drop_duplicates("id")
    out = [
        "## Configuration",
        "",
        "Config hashes: sha256 of the record's `method` / `task` node (full configs in the records); one "
        "hash per row = the same configuration for every seed. "
        f"Wall time: {recs['wall_s'].sum() / 60:.1f} min summed over the {len(recs)} records "
        "(training is included only in records whose checkpoint says `reused: false`; sweeps train in "
        "separate jobs, so their cells reuse the cached backbone).",
        "",
        tabulate(config_rows(shown), headers=list(CONFIG_HEADERS), tablefmt="github"),
        "",
    ]
    if ours["row"].str.startswith(LEGACY).any():
        out += [
            "Rows marked `legacy` come from records written before cell fingerprints: they cannot say "
            "which configuration they came from, so they never share a row with fingerprinted records "
            "and `sweep` re-runs their cells.",
            "",
        ]
    return out


def _diagnostics_section(shown: List[Dict[str, Any]], results_dir: Path) -> List[str]:
    """The training-side diagnostics of every trained backbone the rows use (none: no section)."""
    diag = diagnostics_rows(shown, results_dir)
    if not diag:
        return []
    headers = ["method", "backbone", "seed", "tasks", "backbone key", *[h for _, h in DIAGNOSTIC_COLUMNS]]
    return [
        "## Training diagnostics",
        "",
        "Per trained backbone (its cache key), from its `train_info.json`: relative change of the held-out "
        "features (and their 1 - cos), relative change of the adapted weights, first/last training loss, the "
        "KL part of the distillation cross-entropy, the head's mean pairwise embedding cosine, and the "
        "collapse diagnostics: the entropy (nats) of the histogram of each cell's most likely prototype "
        "(student and teacher; 0 = every cell on one prototype) and the fraction of cells where they agree, "
        "where the method has them (bench/diagnostics.py; first/last = means over the first/last tenth).",
        "",
        tabulate(diag, headers=headers, tablefmt="github"),
        "",
    ]


def leaderboard_markdown(results_dir: str | Path) -> str:
    """The leaderboard (markdown) of the records in ``results_dir``: a table per task and protocol, the
    published numbers no record covers yet, hardware, configuration, training diagnostics, figures."""
    results_dir = Path(results_dir)
    loaded = load_records(results_dir)  # once: each duplicate or refused record is reported once
    ours = records_frame(results_dir, loaded)
    ref = reference_frame(results_dir)
    out = [
        "# bench leaderboard",
        "",
        f"Generated by `python -m bench table` from the records in `{results_dir}/runs/` "
        f"({_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC). Do not edit by hand.",
        *LEADERBOARD_INTRO,
    ]
    if ours.empty:
        out += ["*No records yet: run a cell, e.g. `python -m bench run experiment=demo`.*", ""]
    out += _task_sections(ours, ref) + _reference_only_sections(ours, ref)
    if not ours.empty:
        ids = set(ours.drop_duplicates("id")["id"])
        shown = [rec for rec in loaded if rec["id"] in ids]
        out += _hardware_section(ours) + _configuration_section(ours, shown) + _diagnostics_section(shown, results_dir)
    figs = sorted((results_dir / "figures").glob("*.png"))
    if figs:
        out += ["## Figures", ""] + [f"- [{p.stem}](figures/{p.name})" for p in figs] + [""]
    return "\n".join(out)


def write_leaderboard(results_dir: str | Path) -> Path:
    if not Path(results_dir).is_dir():
        raise BenchError(
            f"results directory {results_dir} {what_is_at(results_dir, 'directory')}",
            "pass an existing results directory with --results (records are in <results>/runs/)",
        )
    path = Path(results_dir) / "leaderboard.md"
    write_text(path, leaderboard_markdown(results_dir))
    return path
