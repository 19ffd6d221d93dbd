"""bench: a harness for 3D-aware fine-tuning of vision foundation models."""

import atexit as _atexit
import gc as _gc

__version__ = "0.1.0"

# At interpreter exit CPython's finalisation runs the cyclic garbage collector over every object still alive: in
# a process that imported torch, timm and hydra that walk is ~0.9 of the ~1.2 s the process spends exiting
# (docs/SCALING.md), paid by every CLI run, rank, sweep job and test subprocess. Nothing of bench needs it at
# exit (records and checkpoints are written and renamed before a command returns), so the survivors are moved
# out of the collector's reach; the other atexit handlers (logging, multiprocessing, weakref finalizers) still run.
_atexit.register(_gc.freeze)
