#!/bin/bash
# Call 1: CutMix fine-tuning, three reproduce runs at once on one H200 (paper 48 + export, paper 128, cifar10-1 48).
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R; t setup
L=$(( 555 - ($(date +%s) - T0) ))
COMMON="--data .data --dataset cifar10 --backbone efficientnet_lite0 --mix cutmix --no-plots --no-timing --quiet --out $R/repro"
timeout $L python3 benchmarks/reproduce.py $COMMON --protocol paper --bits 48 --epochs 15 --export /tmp/h > $R/a48.log 2>&1 & P1=$!
timeout $L python3 benchmarks/reproduce.py $COMMON --protocol paper --bits 128 --epochs 15 > $R/b128.log 2>&1 & P2=$!
timeout $L python3 benchmarks/reproduce.py $COMMON --protocol cifar10-1 --bits 48 --epochs 40 > $R/c1.log 2>&1 & P3=$!
(for i in $(seq 1 50); do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; sleep 10; done) > $R/smi.log 2>&1 & PS=$!
wait $P1 $P2 $P3; t "runs done"; kill $PS 2>/dev/null
tail -3 $R/*.log
cd $OUT && tar czf r.tgz r && rm -rf r
if [ -d /tmp/h ]; then rm -f /tmp/h/model.pt; tar cf - -C /tmp h | split -b 15m - $OUT/harvest.tar.; fi
ls -la $OUT
