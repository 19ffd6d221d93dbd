"""CLI: ``python -m bench data synthetic``, and the ``synthetic`` entry of the dataset registry."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..layout import register_command
from .spec import CLASSES, default_root
from .writer import generate, holds_set, reuse_or_generate


# ----------------------------------------------------------------------------------------------
# CLI: python -m bench data synthetic --scenes N --views V --size H W --seed S --out DIR
# ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenes", type=int, default=8, help="number of rooms (default 8)")
    p.add_argument("--views", type=int, default=24, help="views per room (default 24)")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=[224, 224],
        metavar=("H", "W"),
        help="image height and width (default 224 224)",
    )
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--supersample", type=int, default=2, help="RGB anti-aliasing factor per axis (default 2)")
    p.add_argument("--hfov", type=float, default=70.0, help="horizontal field of view, degrees (default 70)")
    p.add_argument("--out", default=None, help="output directory (default ${BENCH_DATA:-data}/synthetic)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes, at most one per scene (default: 2 for large sets, else 1)",
    )
    p.add_argument("--force", action="store_true", help="re-generate even if a matching set exists")


def cli(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_root()
    kw = dict(
        scenes=args.scenes,
        views=args.views,
        size=args.size,
        seed=args.seed,
        supersample=args.supersample,
        hfov_deg=args.hfov,
    )
    how = reuse_or_generate(
        out, args.force, lambda r: holds_set(r, **kw), lambda r: generate(r, **kw, progress=True, workers=args.workers)
    )
    nbytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"synthetic scenes: {args.scenes} x {args.views} views at {args.size[0]}x{args.size[1]}, "
        f"seed {args.seed} -> {out} ({nbytes / 2**20:.1f} MiB, {how})"
    )
    print("classes: " + ", ".join(f"{i} {c}" for i, c in enumerate(CLASSES)))
    return 0


SyntheticData = register_command(
    "synthetic",
    "built-in procedural rooms: RGB, exact depth/normals/semantic/instance (ScanNet++ DSLR layout); generated offline",
    add_arguments,
    cli,
)
