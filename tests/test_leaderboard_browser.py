"""The HTML leaderboard in a real browser: headless Chromium opens the page (file://, no server, no network),
sorts a column and filters a task through the page's own script (the URL query/hash it reads on load, the same
code a header click or a filter change runs), and the DOM and a screenshot are checked.

Chromium is Debian's ``chromium`` package: installed here as root when missing (apt-get, like the SLURM test
cluster's set-up in tests/slurm/cluster.sh); elsewhere the tests are skipped with the reason, except in CI
(``CI=true``), where they must run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from leaderboard_fixture import make_results
from test_table_formats import parse_page

from bench.table_output import write_table

APT = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300"]
HEADER, ROWS, PAGE = (45, 62, 80), {(255, 255, 255), (238, 243, 251)}, (247, 247, 247)  # the page's CSS colours


def _install_chromium() -> str | None:
    """Path of chromium, apt-get installing Debian's package as root when it is missing; None + reason otherwise."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("chromium is not installed and this is not a root Debian system with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    pkg = ["install", "-y", "--no-install-recommends", "chromium"]
    if subprocess.run(APT + pkg, env=env, capture_output=True, timeout=1800).returncode != 0:
        subprocess.run(APT + ["update"], env=env, capture_output=True, timeout=900)
        run = subprocess.run(APT + pkg, env=env, capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            raise RuntimeError(f"apt-get install chromium failed: {run.stderr.strip()[-300:]}")
    exe = shutil.which("chromium")
    if not exe:
        raise RuntimeError("apt-get installed chromium but no chromium command is on PATH")
    return exe


@pytest.fixture(scope="module")
def chromium():
    try:
        return _install_chromium()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        (pytest.fail if os.environ.get("CI", "").lower() == "true" else pytest.skip)(f"no headless Chromium: {e}")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    res = make_results(tmp_path_factory.mktemp("lb"))
    return write_table(res, "html")


def _browse(exe: str, url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars"]
    cmd += ["--force-device-scale-factor=1", f"--user-data-dir={tmp / 'profile'}", *args, url]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def _visible(dom) -> list:
    """(task, method, rmse sort key or '') of the rows the browser shows, in DOM order."""
    out = []
    for s in dom.sections:
        if "hidden" in s["attrs"]:
            continue
        for r in s["rows"]:
            if "hidden" not in r["attrs"]:
                out.append((s["attrs"]["data-task"], r["attrs"]["data-method"], r["cells"][3][0].get("data-sort")))
    return out


@pytest.mark.slow
def test_sort_and_filter_in_chromium(chromium, page, tmp_path):
    url = page.resolve().as_uri()
    dom_text = _browse(chromium, f"{url}?task=synth_depth&sort=rmse&dir=asc", tmp_path, "--dump-dom").stdout
    dom = parse_page(dom_text)
    # filtered to one task, sorted by rmse ascending (the page's order is dinov2, mef, splat_distill)
    assert _visible(dom) == [
        ("synth_depth", "splat_distill", "1.0"),
        ("synth_depth", "mef", "1.8"),
        ("synth_depth", "dinov2", "2.0"),
    ]
    assert 'data-shown-rows="3"' in dom_text and 'aria-sort="ascending">rmse' in dom_text
    dom = parse_page(_browse(chromium, f"{url}?task=synth_depth&sort=a1&dir=desc", tmp_path, "--dump-dom").stdout)
    assert [m for _, m, _ in _visible(dom)] == ["dinov2", "mef", "splat_distill"]  # a1 0.8, 0.75, 0.6
    assert "3 rows shown" in dom_text

    # method filter from the URL hash (published rows follow their method), descending text sort of every table
    dom = parse_page(
        _browse(chromium, f"{url}#method=splat_distill&sort=method&dir=desc", tmp_path, "--dump-dom").stdout
    )
    assert [(t, m) for t, m, _ in _visible(dom)] == [
        ("synth_depth", "splat_distill"),
        ("synth_seg", "splat_distill"),
        ("nyu_depth", "splat_distill"),
    ]
    # without parameters the page shows every row in the Markdown order
    dom = parse_page(_browse(chromium, url, tmp_path, "--dump-dom").stdout)
    assert [m for _, m, _ in _visible(dom)] == ["dinov2", "mef", "splat_distill", "dinov2", "splat_distill"] + [
        "fit3d",
        "splat_distill",
    ]


def _stripes(png: Path, x: int = 20) -> int:
    """Rows of the first table in a screenshot: along the column of pixels at ``x`` (the cells' left padding),
    after the header's dark band, the runs of the two row background colours until the page background."""
    from PIL import Image

    img = Image.open(png).convert("RGB")
    col = [img.getpixel((x, y)) for y in range(img.height)]
    runs, y = [], 0
    while y < len(col):
        z = y
        while z < len(col) and col[z] == col[y]:
            z += 1
        runs.append((col[y], z - y))
        y = z
    start = next(i for i, (c, n) in enumerate(runs) if c == HEADER and n >= 8)
    rows = 0
    for c, n in runs[start + 1 :]:
        if c == PAGE and n >= 4:
            break
        rows += c in ROWS and n >= 8
    return rows


def test_screenshot_shows_the_filtered_rows(chromium, page, tmp_path):
    from PIL import Image

    shot = tmp_path / "page.png"
    url = page.resolve().as_uri() + "?task=synth_depth&sort=rmse&dir=asc"
    _browse(chromium, url, tmp_path, f"--screenshot={shot}", "--window-size=1200,800")
    img = Image.open(shot)
    assert img.size == (1200, 800)
    colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50 and max(n for n, _ in colours) < 0.95 * 1200 * 800  # not blank
    assert _stripes(shot) == 3
    _browse(chromium, page.resolve().as_uri() + "?task=synth_seg", tmp_path, f"--screenshot={shot}")
    assert _stripes(shot) == 2
