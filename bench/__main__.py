import gc
import os
import sys

# Before torch (and its OpenMP runtime) loads: idle OpenMP threads sleep instead of spin-waiting, which on a
# shared or oversubscribed CPU (several ranks, loader workers, other jobs) burns several times the CPU time a
# run needs (measured in docs/SCALING.md). A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402

rc = main()
# The command is done (records and checkpoints are written and renamed, files closed). At exit CPython's
# finalisation runs the cyclic garbage collector over every object still alive (torch, timm, hydra: ~0.9 of the
# ~1.2 s a run spends exiting on a 2-core machine, docs/SCALING.md); freezing them skips that walk. atexit
# handlers (logging, multiprocessing, weakref finalizers) still run.
gc.freeze()
sys.exit(rc)
