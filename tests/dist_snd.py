"""Worker of tests/test_distributed.py, started by ``tests/loopback.py:torchrun`` (loopback only; each rank's
stdout in its own file).

``python tests/dist_snd.py JOBS.json`` runs the training jobs of the file one after the other in this launch
(one process group; a list, so several runs share the launch's start-up). Each job
``{"workdir", "out", "stop_after", "overrides"}`` trains the configured method (Splat-and-Distill, MEF) in
WORKDIR (resuming from it), and rank 0 saves the trained weights to OUT (a ``.pt``). Ranks other than 0 install
an audit hook that records every file they create, write, rename or delete under any WORKDIR's parent, and
print the list as ``WRITES <json>`` on exit (stdout is not a file write).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path


def _watch(root: str) -> list:
    seen: list = []

    def hook(event, args):
        path = None
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = (args[1] or "r"), (args[2] or 0)
            writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            path = args[0] if writing else None
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "shutil.rmtree"):
            path = args[0]
        if path is None or isinstance(path, int):
            return
        p = os.path.abspath(os.fsdecode(path))
        if p == root or p.startswith(root.rstrip(os.sep) + os.sep):
            seen.append([event, p])

    sys.addaudithook(hook)
    return seen


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        parents = sorted({str(Path(job["workdir"]).parent) for job in jobs})
        watched = [_watch(parent) for parent in parents]
        atexit.register(lambda: print("WRITES " + json.dumps([w for seen in watched for w in seen]), flush=True))
    import torch

    torch.set_num_threads(1)
    from bench.backbones import build_backbone
    from bench.config import compose
    from bench.registry import METHODS
    from bench.seed import seed_everything

    for job in jobs:
        cfg = compose(job["overrides"])
        seed_everything(0)
        stop_after = int(job["stop_after"]) or None
        bb = METHODS.get(cfg.method.name)().fit(build_backbone(cfg.backbone), cfg, Path(job["workdir"]), stop_after)
        state = bb.model.state_dict() if cfg.method.name == "splat_distill" else bb.state_dict()  # MEF: + its head
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in state.items()}, job["out"])


if __name__ == "__main__":
    main()
