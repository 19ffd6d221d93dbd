#!/usr/bin/env bash
# OMP A/B: whole-process CPU seconds of `perf train --ranks 2` (demo scale), with/without OMP_WAIT_POLICY=PASSIVE
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD BENCH_DATA=${BENCH_DATA:-/tmp/bench_omp_ab_data}
unset OMP_NUM_THREADS OMP_WAIT_POLICY
OLD='import sys; from bench.cli import main; sys.exit(main())'   # the entry point without the PASSIVE default
ARGS="perf train --ranks 2 --variants --steps 8 --warmup 2"
python -m bench perf train --variants demo --steps 1 --warmup 0 > /dev/null 2>&1  # generate the demo scenes once
for threads in 4 2; do
  for mode in default passive; do
    uptime
    if [ $mode = default ]; then cmd=(python -c "$OLD"); else cmd=(python -m bench); fi
    /usr/bin/time -f "RESULT mode=$mode threads_total=$threads user=%U sys=%S wall=%e" "${cmd[@]}" $ARGS --threads $threads 2>&1 | grep RESULT
  done
done
uptime
