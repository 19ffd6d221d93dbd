"""``bench table --format md|latex|csv|html``: one entry point that renders the leaderboard of a results
directory in any of its formats (:mod:`bench.table` Markdown, :mod:`bench.table_formats` LaTeX/CSV,
:mod:`bench.leaderboard_html` the page) and writes it atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import BenchError, what_is_at
from .io import write_text
from .leaderboard_html import leaderboard_html
from .table import leaderboard_markdown
from .table_formats import FORMATS, leaderboard_csv, leaderboard_latex


# --- writing --------------------------------------------------------------------------------------------
def render(results_dir: str | Path, fmt: str) -> str:
    """The leaderboard of ``results_dir`` in format ``fmt`` (a key of :data:`FORMATS`)."""
    if fmt == "md":
        return leaderboard_markdown(results_dir)
    if fmt == "latex":
        return leaderboard_latex(results_dir)
    if fmt == "csv":
        return leaderboard_csv(results_dir)
    if fmt == "html":
        return leaderboard_html(results_dir)
    raise BenchError(f"unknown table format '{fmt}'", f"use one of {', '.join(FORMATS)}")


def write_table(results_dir: str | Path, fmt: str = "md", output: Optional[str] = None) -> Optional[Path]:
    """Write the leaderboard in ``fmt`` to ``output`` (default ``<results>/<FORMATS[fmt]>``; ``-``: stdout,
    returns None). Nothing is written when the records cannot be read."""
    if fmt not in FORMATS:
        raise BenchError(f"unknown table format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    if not Path(results_dir).is_dir():
        raise BenchError(
            f"results directory {results_dir} {what_is_at(results_dir, 'directory')}",
            "pass an existing results directory with --results (records are in <results>/runs/)",
        )
    text = render(results_dir, fmt)
    if output == "-":
        import sys

        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return None
    path = Path(output) if output else Path(results_dir) / FORMATS[fmt]
    write_text(path, text)
    return path
