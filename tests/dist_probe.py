"""Worker of tests/test_distributed_probe.py, started by ``tests/loopback.py:torchrun`` (loopback only; each
rank's stdout in its own file, so the lines below are whole lines of one rank).

``python tests/dist_probe.py ROOT TASK STOP_AFTER overrides...`` evaluates TASK (a dense probe) on the
frozen, seeded backbone of the overrides with ``DenseTask.evaluate(workdir=ROOT/work)`` (resuming from
the cell's probe directory under ``paths.cache_dir``), as ``bench.runner.run_cell`` does on every
rank. Ranks other than 0 record every file they create, write, rename or delete under ROOT and print
the list as ``WRITES <json>`` on exit; rank 0 prints ``METRICS <json>`` (``null`` when stopped early).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_snd import _watch  # noqa: E402


def main() -> None:
    root, task, stop_after, overrides = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    rank = int(os.environ.get("RANK", "0"))
    writes = _watch(str(root)) if rank != 0 else None
    if writes is not None:
        atexit.register(lambda: print("WRITES " + json.dumps(writes), flush=True))
    import torch

    torch.set_num_threads(1)
    from bench import distributed as dist
    from bench.backbones import build_backbone
    from bench.config import compose
    from bench.registry import TASKS
    from bench.seed import seed_everything

    cfg = compose([f"task={task}", *overrides])
    dist.init("cpu")
    seed_everything(0)
    backbone = build_backbone(cfg.backbone).eval()
    seed_everything(0)
    metrics = TASKS.get(task)().evaluate(backbone, cfg, root / "work", stop_after=stop_after or None)
    if rank == 0:
        print("METRICS " + json.dumps(metrics), flush=True)
    dist.shutdown()


if __name__ == "__main__":
    main()
