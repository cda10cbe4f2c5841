#!/bin/bash
# Call 4: call 3 again after the per-Searcher route cache: 3 synthetic cases, then real-statistics codes at 1e8 (BCS; distinct codes counted as uint64 keys).
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whlF/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R; t setup
timeout 95 python3 benchmarks/bench_searcher_cuda.py --json $R/searcher_cuda_h200.json > $R/sc.log 2>&1; t "synthetic rc $?"
L=$(( 430 - ($(date +%s) - T0) ))
timeout $L python3 benchmarks/bench_searcher_cuda.py --cases realgen --source .seed --n 1e8 --json $R/searcher_cuda_h200_realgen1e8.json > $R/sc1e8.log 2>&1; t "1e8 rc $?"
tail -n 2 $R/*.log | cut -c1-300
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
