"""Worker of tests/test_distributed_probe.py, started by ``tests/loopback.py:torchrun`` (loopback only; each
rank's stdout in its own file, so the lines below are whole lines of one rank).

``python tests/dist_probe.py JOBS.json`` runs the probe jobs of the file one after the other in this launch
(one process group; a list, so several probes share the launch's start-up): each job
``{"root", "task", "stop_after", "overrides"}`` evaluates TASK (a dense probe) on the frozen, seeded backbone
of the overrides with ``DenseTask.evaluate(workdir=ROOT/work)`` (resuming from the cell's probe directory
under ``paths.cache_dir``), as ``bench.runner.run_cell`` does on every rank. Ranks other than 0 record every
file they create, write, rename or delete under any job's ROOT and print the list as ``WRITES <json>`` on
exit; rank 0 prints ``METRICS <json>``, the list of the jobs' metrics (``null`` for a job stopped early).
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
    jobs = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        watched = [_watch(str(Path(job["root"]))) for job in jobs]
        atexit.register(lambda: print("WRITES " + json.dumps([w for seen in watched for w in seen]), flush=True))
    import torch

    torch.set_num_threads(1)
    from bench import distributed as dist
    from bench.backbones import build_backbone
    from bench.config import compose
    from bench.registry import TASKS
    from bench.seed import seed_everything

    dist.init("cpu")
    metrics = []
    for job in jobs:
        task, stop_after = job["task"], int(job["stop_after"])
        cfg = compose([f"task={task}", *job["overrides"]])
        seed_everything(0)
        backbone = build_backbone(cfg.backbone).eval()
        seed_everything(0)
        metrics.append(
            TASKS.get(task)().evaluate(backbone, cfg, Path(job["root"]) / "work", stop_after=stop_after or None)
        )
    if rank == 0:
        print("METRICS " + json.dumps(metrics), flush=True)
    dist.shutdown()


if __name__ == "__main__":
    main()
