#!/bin/bash
# Call 2: the product's default recipe (no mix), paper protocol 48 bits 14 epochs, with --export: the real-statistics seed for bench_scale / bench_searcher_cuda.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R; t setup
timeout 540 python3 benchmarks/reproduce.py --data .data --dataset cifar10 --backbone efficientnet_lite0 --protocol paper --bits 48 --epochs 14 --no-plots --no-timing --quiet --out $R/repro --export /tmp/h > $R/a48.log 2>&1
t "run rc $?"; tail -n 3 $R/a48.log
cd $OUT && tar czf r.tgz r && rm -rf r
if [ -d /tmp/h ]; then rm -f /tmp/h/model.pt; tar cf - -C /tmp h | split -b 15m - $OUT/harvest.tar.; fi
ls -la $OUT
