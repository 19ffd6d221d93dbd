"""``bench table --format md|latex|csv|html``: every format from the same rows (tests/leaderboard_fixture.py)."""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from leaderboard_fixture import make_results

from bench import table, table_formats, table_output
from bench.cli import main

HW = 6.353102368087347  # t(0.975, 1) * sd([-0.5, -1.5]) / sqrt(2)
REPO = Path(__file__).resolve().parents[1]


def test_metric_direction():
    for m in ("rmse", "abs_rel", "mean", "median", "rmse_log"):
        assert table_formats.metric_direction(m) == -1, m
    for m in ("mIoU", "a1", "a11", "a30", "recall_5px", "pck_0.1"):
        assert table_formats.metric_direction(m) == 1, m
    assert table_formats.metric_direction("something") == 0


def test_sections_are_the_markdown_tables(tmp_path):
    res = make_results(tmp_path)
    secs = table_formats.sections(res)
    assert [(s.task, s.protocol, s.reference_only) for s in secs] == [
        ("synth_depth", "linear", False),
        ("synth_seg", "linear", False),
        ("nyu_depth", "-", True),
    ]
    md = table.leaderboard_markdown(res)
    for s in secs:  # the Markdown tables are rendered from exactly these rows
        ours = table.records_frame(res)
        assert table.task_table(ours, table.reference_frame(res), s.task, s.protocol) in md
    depth = secs[0]
    assert [table_formats.method_name(r) for r in depth.rows] == ["dinov2", "mef", "splat_distill"]
    assert table_formats.best_rows(depth, "rmse") == {2} and table_formats.best_rows(depth, "a1") == {0}
    splat = depth.rows[2]
    assert splat["_values"]["rmse"] == {0: 0.5, 1: 1.5}
    mean, hw, n = splat["_delta"]
    assert (mean, n) == (-1.0, 2) and hw == pytest.approx(HW)


def test_committed_markdown_regenerates_byte_identical_but_the_date(monkeypatch):
    monkeypatch.chdir(REPO)
    committed = (REPO / "results" / "leaderboard.md").read_text()
    fresh = table_output.render("results", "md")
    date = re.compile(r"\(\d{4}-\d\d-\d\d \d\d:\d\d UTC\)")
    old, new = committed.splitlines(), fresh.splitlines()
    assert len(old) == len(new)
    diff = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
    assert diff in ([], [2]) and date.sub("", old[2]) == date.sub("", new[2])
    assert committed.endswith("\n") == fresh.endswith("\n")


def test_latex_booktabs_bold_and_published(tmp_path):
    res = make_results(tmp_path)
    tex = table_formats.leaderboard_latex(res)
    tables = re.findall(r"\\begin\{table\}.*?\\end\{table\}", tex, re.S)
    assert len(tables) == 3  # one table per task/protocol
    for t in tables:
        assert t.count(r"\toprule") == t.count(r"\midrule") == t.count(r"\bottomrule") == 1
        spec = re.search(r"\\begin\{tabular\}\{([lr]+)\}", t).group(1)
        body = t.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
        head = t.split(r"\toprule")[1].split(r"\midrule")[0].strip()
        for line in [head, *body]:  # every line has as many cells as the column spec
            assert line.endswith(r"\\") and len(re.split(r"(?<!\\)&", line)) == len(spec), line
    depth = tables[0]
    rows = {line.split(" & ")[0]: line for line in depth.split(r"\midrule")[1].splitlines() if " & " in line}
    assert r"\textbf{1.0000 $\pm$ 0.7071}" in rows[r"splat\_distill"]  # rmse: lower is better
    assert r"\textbf{0.8000 $\pm$ 0.1414}" in rows["dinov2"]  # a1: higher is better
    assert r"\textbf" not in rows["mef"]
    assert f"-1.0000 [{-1 - HW:+.4f}, {-1 + HW:+.4f}]" in rows[r"splat\_distill"]
    assert r"rmse $\downarrow$" in depth and r"a1 $\uparrow$" in depth and r"\texttt{" in depth
    nyu = tables[2]
    assert r"fit3d\textsuperscript{\dag}" in nyu and r"\textbf{0.42}" in nyu
    assert "SnD paper" in nyu and "FiT3D paper" in nyu


def test_latex_compiles_when_a_tex_engine_is_installed(tmp_path):
    engine = next((e for e in ("pdflatex", "lualatex", "xelatex") if shutil.which(e)), None)
    if engine is None:
        pytest.skip(
            "no TeX engine (pdflatex/lualatex/xelatex) installed: test_latex_booktabs_bold_and_published "
            "checks the structure"
        )
    res = make_results(tmp_path)
    doc = tmp_path / "doc.tex"
    doc.write_text(
        "\\documentclass{article}\n\\usepackage[utf8]{inputenc}\n\\usepackage{booktabs}\n\\begin{document}\n"
        + table_formats.leaderboard_latex(res)
        + "\n\\end{document}\n"
    )
    run = subprocess.run(
        [engine, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path, capture_output=True, timeout=300
    )
    assert run.returncode == 0, run.stdout.decode()[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_csv_one_row_per_configuration_with_seed_columns(tmp_path):
    res = make_results(tmp_path)
    rows = list(csv.DictReader(io.StringIO(table_formats.leaderboard_csv(res))))
    assert [(r["task"], r["method"]) for r in rows] == [
        ("synth_depth", "dinov2"),
        ("synth_depth", "mef"),
        ("synth_depth", "splat_distill"),
        ("synth_seg", "dinov2"),
        ("synth_seg", "splat_distill"),
        ("nyu_depth", "fit3d"),
        ("nyu_depth", "splat_distill"),
    ]
    splat = rows[2]
    assert float(splat["rmse_s0"]) == 0.5 and float(splat["rmse_s1"]) == 1.5
    assert float(splat["rmse_mean"]) == 1.0 and float(splat["rmse_std"]) == pytest.approx(0.5**0.5)
    assert float(splat["delta_mean"]) == -1.0 and splat["delta_metric"] == "rmse"
    assert float(splat["delta_ci95_low"]) == pytest.approx(-1 - HW) and splat["published"] == "False"
    assert splat["record_ids"].count("splat_distill_synth_depth") == 2
    assert rows[1]["rmse_s1"] == "" and rows[1]["delta_ci95_low"] == ""  # mef: one seed, no interval
    assert (
        rows[5]["published"] == "True"
        and float(rows[5]["rmse_mean"]) == 0.42
        and rows[5]["source"] == "FiT3D paper [code: fit3d_evaluation]"
    )


class _Cells(HTMLParser):
    """Sections -> rows -> (cell attributes, text) of the leaderboard page."""

    def __init__(self):
        super().__init__()
        self.sections, self.imgs, self._cell, self._row = [], [], None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append({"attrs": a, "rows": []})
        elif tag == "tr" and self.sections and "data-method" in a:
            self._row = {"attrs": a, "cells": []}
            self.sections[-1]["rows"].append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = [a, ""]
            self._row["cells"].append(self._cell)
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "polyline" and self._cell is not None:
            self._cell[0]["_polyline"] = a["points"]

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data


def parse_page(text: str) -> _Cells:
    p = _Cells()
    p.feed(text)
    return p


def test_html_page_is_self_contained_with_hover_curves_and_figures(tmp_path):
    from PIL import Image

    res = make_results(tmp_path)
    (res / "figures").mkdir()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(res / "figures" / "depth_normals.png")
    Image.new("RGB", (4, 3), (0, 0, 0)).save(res / "figures" / "leaderboard_page.png")  # the page's screenshot
    assert main(["table", "--results", str(res), "--format", "html"]) == 0
    text = (res / "leaderboard.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing from the network
    page = parse_page(text)
    assert [s["attrs"]["data-task"] for s in page.sections] == ["synth_depth", "synth_seg", "nyu_depth"]
    assert [i["alt"] for i in page.imgs] == ["depth_normals"] and page.imgs[0]["src"].startswith("data:image/png;")
    depth = page.sections[0]["rows"]
    assert [r["attrs"]["data-method"] for r in depth] == ["dinov2", "mef", "splat_distill"]
    splat = {i: c for i, c in enumerate(depth[2]["cells"])}
    assert "row fingerprint" in splat[2][0]["title"] and "splat_distill_synth_depth_s1" in splat[2][0]["title"]
    assert "best" in splat[3][0]["class"] and float(splat[3][0]["data-sort"]) == 1.0  # rmse, bold
    assert "best" not in splat[4][0]["class"]  # a1: dinov2's
    assert splat[7][1] == "schedule_length" and "anchor: 40000" in splat[7][0]["title"]
    pts = [tuple(map(float, p.split(","))) for p in splat[8][0]["_polyline"].split()]
    assert len(pts) == 40 and pts[0] == (1.0, 1.0) and pts[-1][0] == 119.0  # loss 1/step falls: y grows
    assert all(b[1] >= a[1] for a, b in zip(pts, pts[1:]))
    assert depth[0]["cells"][8][1] == "—"  # no curves on this machine for dinov2
    nyu = page.sections[2]["rows"]
    assert all(r["attrs"].get("class") == "published" for r in nyu)


def test_table_cli_formats_and_errors(tmp_path, capsys):
    res = make_results(tmp_path)
    assert main(["table", "--results", str(res), "--format", "latex", "--output", "-"]) == 0
    assert capsys.readouterr().out.startswith("% Generated by `python -m bench table --format latex`")
    assert main(["table", "--results", str(res), "--format", "csv"]) == 0
    assert (res / "leaderboard.csv").read_text().startswith("task,protocol,dataset,method")
    assert main(["table", "--results", str(res)]) == 0 and (res / "leaderboard.md").is_file()
    assert main(["table", "--results", str(tmp_path / "nope"), "--format", "html"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: results directory") and "--results" in err[0]
    assert not (tmp_path / "nope").exists()
