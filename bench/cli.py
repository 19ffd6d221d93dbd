"""``python -m bench <command>``: the command-line entry point.

Commands (``python -m bench COMMAND --help`` for each one's options):

* ``run`` -- one cell (method x backbone x task): obtain the backbone, evaluate the task, write its record;
* ``sweep`` -- a grid of cells as SLURM (submitit) or local jobs (:mod:`bench.sweep`);
* ``table`` -- rebuild ``results/leaderboard.md`` (or ``--format latex|csv|html``) from the records;
* ``list`` -- the registered methods, tasks, backbones, datasets and benchmarks;
* ``data NAME`` -- check a prepared dataset (what is missing, where to get it) or generate a synthetic set;
* ``perf NAME`` -- a benchmark that measures compared variants side by side and prints ratios;
* ``hub`` -- pull / push checkpoints from / to the Hugging Face Hub;
* ``figures`` -- the mini-benchmark figures from the records (:mod:`bench.figures`);
* ``pretrain-reconstructor`` -- train Splat-and-Distill's reconstructor (``model=learned``: pretrain bench's cost volume;
  ``model=mvsplat``: fine-tune MVSplat's encoder from ``re10k.ckpt``).

Every user-fixable failure is a :class:`bench.errors.BenchError`, printed as one line
(``error: <problem>. Fix: <fix>``) with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from .errors import BenchError

# Commands implemented in other modules: name -> (module, help). Each module has
# add_arguments(parser) and main(args).
EXTERNAL_COMMANDS = {
    "sweep": ("bench.sweep", "run a grid of cells on SLURM (submitit) or locally"),
    "figures": ("bench.figures", "draw the mini-benchmark figures (PCA, depth/normals, matches) from the records"),
    "pretrain-reconstructor": (
        "methods.splat_distill.pretrain",
        "train Splat-and-Distill's reconstructor: model=learned (pretrain) or model=mvsplat (fine-tune re10k.ckpt)",
    ),
}


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="[%(asctime)s %(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _hub_logs_once()


def _hub_logs_once() -> None:
    """huggingface_hub puts its own stderr handler on its logger AND lets records propagate to ours,
    so each of its warnings (e.g. "Retrying in 1s [Retry 1/5]") was printed twice: drop its handler."""
    try:
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.get_logger()  # makes it configure its handler now, so that it can be removed
    except ImportError:
        return
    hf_root = logging.getLogger("huggingface_hub")
    for h in list(hf_root.handlers):
        hf_root.removeHandler(h)
    hf_root.propagate = True


def cmd_run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from .config import compose
    from .runner import run_cell

    cfg = compose(args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    rec = run_cell(cfg)
    if rec is None:  # rank > 0 of a multi-rank run: rank 0 prints and records
        return 0
    metrics = "  ".join(f"{k}={v:.4g}" for k, v in rec["metrics"].items() if k in rec["report"])
    print(f"{rec['method']} x {rec['backbone']} x {rec['task']} (seed {rec['seed']}): {metrics}")
    print(f"record: {rec['_path']}\nrun dir: {rec['run_dir']}")
    print(f"leaderboard: python -m bench table --results {cfg.paths.results_dir}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from .records import default_results_dir
    from .table_output import write_table

    path = write_table(args.results or default_results_dir(), args.format, args.output)
    if path is not None:
        print(f"wrote {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .config import group_options
    from .registry import BACKBONES, DATASETS, METHODS, PERF, TASKS

    for title, reg in (
        ("methods", METHODS),
        ("tasks", TASKS),
        ("backbones", BACKBONES),
        ("datasets", DATASETS),
        ("benchmarks (python -m bench perf NAME)", PERF),
    ):
        print(f"{title}:")
        for e in reg.entries():
            print(f"  {e.name:<22} {e.description}")
    for group in ("experiment", "cluster"):
        print(f"{group} recipes: {', '.join(group_options(group))}")
    from tasks.protocol_record import list_protocols

    print("protocols (protocol=NAME; rules and deviations: docs/PROTOCOLS.md):")
    for line in list_protocols():
        print(f"  {line}")
    return 0


def _add_registry_commands(sub: argparse._SubParsersAction, name: str, help: str, registry, full: bool) -> None:
    """``name`` with one sub-command per registry entry; without ``full`` only the command's line of the top
    help (listing the entries loads every plugin, torch and timm included: done only when asked for)."""
    p = sub.add_parser(name, help=help, description=help)
    if not full:
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    inner = p.add_subparsers(dest="entry", metavar="NAME", required=True)
    for e in registry.entries():
        q = inner.add_parser(e.name, help=e.description, description=e.description)
        if hasattr(e.obj, "add_arguments"):
            e.obj.add_arguments(q)
        q.set_defaults(func=lambda a, obj=e.obj: _call_entry(obj, a))


def _call_entry(obj, args) -> int:
    fn = obj.cli if hasattr(obj, "cli") else obj
    rc = fn(args)
    return int(rc or 0)


# -- hub: python -m bench hub pull|push ----------------------------------------------------------
def _add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m bench hub`` (the client is :mod:`bench.hub`)."""
    sub = parser.add_subparsers(dest="hub_command", metavar="{pull,push}", required=True)
    p = sub.add_parser(
        "pull",
        help="download a repo, some files, or one hf:// file into the local cache",
        description="Download from the Hub into the local cache (HF_HOME / HF_HUB_CACHE) or "
        "--local-dir and print where. With HF_HUB_OFFLINE=1 only the cache is used.",
    )
    p.add_argument("repo", help="org/name, or hf://org/name/path/to/file[@revision]")
    p.add_argument("--revision", help="branch, tag or commit sha (default: main)")
    p.add_argument(
        "--files",
        nargs="+",
        metavar="FILE",
        help="only these files (exact names, or glob patterns such as '*.safetensors')",
    )
    p.add_argument("--local-dir", help="place the files in this directory instead of the cache")
    p = sub.add_parser(
        "push",
        help="upload a checkpoint (file, directory, run or trained backbone) to org/name",
        description="Upload a checkpoint to a Hub model repo as one commit, with a model card. "
        "SOURCE: a checkpoint file or directory, a run directory (its record names "
        "the trained backbone), or a trained backbone's cache key.",
    )
    p.add_argument("source", help="checkpoint file/directory, run directory, or trained-backbone cache key")
    p.add_argument("repo", help="target repo, org/name (created if missing)")
    p.add_argument("--branch", "--revision", dest="branch", help="branch to commit to (created from main if new)")
    p.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    p.add_argument("--message", "-m", help="commit message")
    p.add_argument("--include", nargs="+", metavar="GLOB", help="only push files matching these patterns")
    p.add_argument("--exclude", nargs="+", metavar="GLOB", help="do not push files matching these patterns")


def _has_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def cmd_hub(args: argparse.Namespace) -> int:
    """Run ``python -m bench hub pull|push``; prints where things went."""
    from .hub import hub_download, hub_push, hub_snapshot, parse_hf_path

    if args.hub_command == "push":
        res = hub_push(
            args.source,
            args.repo,
            branch=args.branch,
            private=args.private,
            message=args.message,
            include=args.include,
            exclude=args.exclude,
        )
        print(
            f"pushed {len(res['files'])} files to {res['repo_id']}@{res['revision']} "
            f"(commit {res['commit']}): {', '.join(res['files'])}"
        )
        print(f"url: {res['url']}")
        weights = [f for f in res["files"] if f.endswith((".safetensors", ".pth", ".pt", ".bin"))]
        if weights:
            print(f"use: hf://{res['repo_id']}/{weights[0]}@{res['commit']}")
        return 0
    repo, revision, files = args.repo, args.revision, list(args.files or [])
    if repo.startswith("hf://"):
        repo, name, ref_rev = parse_hf_path(repo)
        files, revision = files + [name], revision or ref_rev
    exact = [f for f in files if not _has_glob(f)]
    globs = [f for f in files if _has_glob(f)]
    for f in exact:
        print(f"{f}: {hub_download(repo, f, revision, local_dir=args.local_dir)}")
    if globs or not files:
        where = hub_snapshot(repo, revision, allow_patterns=globs or None, local_dir=args.local_dir)
        print(f"{repo}{'@' + revision if revision else ''}: {where}")
    return 0


def _command(argv: List[str]) -> Optional[str]:
    """The sub-command named in ``argv`` (its first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; the registries (every plugin: torch, timm) and the modules of the external commands are
    loaded only for the ``command`` that needs them, so ``--help``, ``table`` or ``hub`` start fast."""
    from .registry import DATASETS, PERF

    parser = _main_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run_command(sub)
    _add_table_command(sub)
    sub.add_parser("list", help="list methods, tasks, backbones, datasets and benchmarks").set_defaults(func=cmd_list)
    _add_registry_commands(
        sub, "data", "check a prepared dataset or generate synthetic scenes", DATASETS, command == "data"
    )
    _add_registry_commands(sub, "perf", "run a benchmark (ratios measured side by side)", PERF, command == "perf")
    p = sub.add_parser(
        "hub",
        help="pull/push checkpoints from/to the Hugging Face Hub",
        description="pull/push checkpoints from/to the Hugging Face Hub",
    )
    _add_hub_arguments(p)
    p.set_defaults(func=cmd_hub)
    _add_external_commands(sub, command)
    return parser


def _main_parser() -> argparse.ArgumentParser:
    """The top-level parser (description, examples, ``--verbose``), without its commands."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="bench: does a fine-tuning method make a 2D backbone more 3D-aware? "
        "Methods x tasks, one record per cell.",
        epilog="examples:\n"
        "  python -m bench run experiment=demo                 # offline, CPU, minutes\n"
        "  python -m bench run method=splat_distill task=nyu_depth\n"
        "  python -m bench sweep method=dinov2,splat_distill task=synth_depth,synth_seg --dry-run\n"
        "  python -m bench table                               # results/leaderboard.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _add_run_command(sub) -> None:
    """``run``: one cell from hydra overrides."""
    p = sub.add_parser(
        "run",
        help="run one cell (method x backbone x task) and write its record",
        description="Run one cell. Arguments are hydra overrides, e.g. method=splat_distill "
        "task=nyu_depth backbone=dinov2_vitb14 seed=1 experiment=demo.",
    )
    p.add_argument("overrides", nargs="*", help="hydra overrides key=value")
    p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    p.set_defaults(func=cmd_run)


def _add_table_command(sub) -> None:
    """``table``: the leaderboard in one of its formats."""
    p = sub.add_parser(
        "table",
        help="rebuild results/leaderboard.md (or .tex/.csv/.html) from the records",
        description="Rebuild the leaderboard from the records: Markdown (results/leaderboard.md), LaTeX booktabs "
        "tables (leaderboard.tex), one CSV row per configuration with per-seed columns (leaderboard.csv) or a "
        "self-contained HTML page (leaderboard.html), all from the same rows.",
    )
    p.add_argument(
        "--results", default=None, help="results directory (default: $BENCH_RESULTS, else $BENCH_ROOT/results)"
    )
    p.add_argument(
        "--format",
        choices=["md", "latex", "csv", "html"],
        default="md",
        help="output format (default: md)",
    )
    p.add_argument("--output", default=None, help="file to write (default: <results>/leaderboard.<ext>; -: stdout)")
    p.set_defaults(func=cmd_table)


def _add_external_commands(sub, command: Optional[str]) -> None:
    """The commands in EXTERNAL_COMMANDS: only ``command``'s module is imported (and adds its arguments);
    the others are placeholders that show in ``--help``. A module missing from this checkout is left out."""
    for name, (module, help) in EXTERNAL_COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help, description=help).add_argument(
                "rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS
            )
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue  # command not available in this checkout
            raise
        q = sub.add_parser(name, help=help, description=help)
        mod.add_arguments(q)
        q.set_defaults(func=mod.main)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(_command(argv))
        args = parser.parse_args(argv)
        _setup_logging(args.verbose)
        return int(args.func(args) or 0)
    except BenchError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
