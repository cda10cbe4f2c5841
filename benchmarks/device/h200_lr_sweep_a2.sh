#!/bin/bash
# Call A2 (after call A's runs were lost with the machine: the next call came too late). At
# epoch 10 of call A, lr 0.01 trained faster than 0.005, and the cifar10-1 run at lr 0.005 reached
# query accuracy 0.873. Here: cifar10-1 Lite0 lr 0.005 40 epochs (collected in this call), and
# paper-protocol Lite0 48 and 128 bits at lr 0.01, 24 epochs, started with setsid (call C2 collects).
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:/root/repo PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
mkdir -p /root/stash /root/runs && cp -r .data /root/stash/ && cp -r . /root/repo 2>/dev/null; t setup
cd /root/repo
P="--data /root/stash/.data --dataset cifar10 --no-plots --no-timing"
run() { local tag=$1; shift; setsid nohup python3 benchmarks/reproduce.py $P --out /root/runs/$tag "$@" > /root/runs/$tag.log 2>&1 < /dev/null & }
run p48_lr01 --protocol paper --bits 48 --backbone efficientnet_lite0 --epochs 24 --lr 0.01
run p128_lr01 --protocol paper --bits 128 --backbone efficientnet_lite0 --epochs 24 --lr 0.01
run c1_l0_lr005 --protocol cifar10-1 --bits 48 --backbone efficientnet_lite0 --epochs 40 --lr 0.005
collect() { R=$OUT/r; mkdir -p $R; for f in /root/runs/*.log; do tr '\r' '\n' < $f | grep -v "batch/s" > $R/$(basename $f); done
  for d in /root/runs/*/; do cp $d/*.json $R/$(basename $d).json 2>/dev/null; done
  grep -h "query-set accuracy\|mAP\|BCS" $R/*.log | tail -n 12; (cd $OUT && tar czf r.tgz r && rm -rf r); }
while [ $(( $(date +%s) - T0 )) -lt 560 ] && [ ! -f /root/runs/c1_l0_lr005/cifar10-1_efficientnet_lite0_48bits.json ]; do sleep 5; done
t "cifar10-1 done"; for f in /root/runs/p*.log; do echo "$f: $(tr '\r' '\n' < $f | grep 'epoch' | tail -n 1)"; done
collect; t leaving
