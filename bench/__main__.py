import os
import sys

# Before torch (and its OpenMP runtime) loads: idle OpenMP threads sleep instead of spin-waiting, which on a
# shared or oversubscribed CPU (several ranks, loader workers, other jobs) burns several times the CPU time a
# run needs (measured in docs/SCALING.md). A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402

sys.exit(main())
